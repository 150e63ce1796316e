#include "gateway/chat_request.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "core/chat/encoder.h"
#include "nlohmann/json.hpp"

namespace expertmesh::gateway {
namespace {

using chat::JsonValue;

const JsonValue* Field(const JsonValue& body, std::string_view key) { return JsonField(body, key); }
std::optional<double> Number(const JsonValue& v) { return JsonNumber(v); }
std::optional<int64_t> Integer(const JsonValue& v) { return JsonInteger(v); }

ApiError NotSupported(std::string param, const std::string& what) {
  ApiError e = InvalidField(param, what + " is not supported yet by this server");
  e.code = "unsupported_parameter";
  return e;
}

// The field name at the front of a core/chat error ("messages[2].content: must be ...").
std::string ParamOf(std::string_view message, std::string_view fallback) {
  const size_t colon = message.find(": ");
  if (colon == std::string_view::npos || message.substr(0, colon).find(' ') != std::string::npos)
    return std::string(fallback);
  return std::string(message.substr(0, colon));
}

}  // namespace

const JsonValue* JsonField(const JsonValue& body, std::string_view key) {
  const JsonValue* v = body.Find(key);
  return v == nullptr || v->is_null() ? nullptr : v;
}

std::optional<double> JsonNumber(const JsonValue& v) {
  if (!v.is_number()) return std::nullopt;
  errno = 0;
  const double d = std::strtod(v.str().c_str(), nullptr);
  if (errno == ERANGE || !std::isfinite(d)) return std::nullopt;
  return d;
}

std::optional<int64_t> JsonInteger(const JsonValue& v) {
  std::optional<double> d = JsonNumber(v);
  if (!d || std::floor(*d) != *d || std::fabs(*d) > 9.2e18) return std::nullopt;
  if (v.str().find_first_of(".eE") == std::string::npos) {
    errno = 0;
    const long long i = std::strtoll(v.str().c_str(), nullptr, 10);
    if (errno == ERANGE) return std::nullopt;
    return i;
  }
  return static_cast<int64_t>(*d);
}

std::string ApiError::ToAnthropicJson() const {
  std::string t = "api_error";
  if (status == 404) {
    t = "not_found_error";
  } else if (status == 413) {
    t = "request_too_large";
  } else if (status == 503 || status == 529) {
    t = "overloaded_error";
  } else if (status >= 400 && status < 500) {
    t = "invalid_request_error";
  }
  nlohmann::json j = {{"type", "error"}, {"error", {{"type", t}, {"message", message}}}};
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

ApiError InvalidField(std::string param, std::string message) {
  ApiError e;
  e.param = std::move(param);
  e.message = e.param.empty() ? std::move(message) : e.param + ": " + message;
  return e;
}

std::string ApiError::ToJson() const {
  nlohmann::json j = {{"error",
                       {{"message", message},
                        {"type", type},
                        {"param", param.empty() ? nlohmann::json(nullptr) : nlohmann::json(param)},
                        {"code", code.empty() ? nlohmann::json(nullptr) : nlohmann::json(code)}}}};
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

bool ServedModel::Serves(std::string_view name) const {
  if (name == id) return true;
  return std::any_of(aliases.begin(), aliases.end(),
                     [name](const std::string& a) { return a == "*" || a == name; });
}

std::optional<ApiError> ParseBodyAndModel(std::string_view text, const ServedModel& served,
                                          JsonValue* body, std::string* model) {
  absl::StatusOr<JsonValue> parsed = chat::ParseJson(text);
  if (!parsed.ok()) {
    return InvalidField("",
                        "the body is not valid JSON: " + std::string(parsed.status().message()));
  }
  if (!parsed->is_object()) return InvalidField("", "the body must be a JSON object");
  *body = std::move(*parsed);
  const JsonValue* m = Field(*body, "model");
  if (m == nullptr || !m->is_string()) return InvalidField("model", "must be a string");
  *model = m->str();
  if (!served.Serves(*model)) {
    ApiError e =
        InvalidField("model", "the model '" + *model + "' does not exist; this server serves '" +
                                  served.id + "'");
    e.status = 404;
    e.code = "model_not_found";
    return e;
  }
  return std::nullopt;
}

std::string_view ToolCallOpeningStop() { return "\n\n<｜DSML｜tool_calls>"; }

std::string ForcedToolCallPrefix(chat::ThinkingMode mode, std::string_view name) {
  std::string p;
  // The call can only be forced at the start of the answer, so a thinking turn is closed at
  // once (empty reasoning): the worker cannot be made to insert the opening after </think>.
  if (mode == chat::ThinkingMode::kThinking) p += chat::kThinkEnd;
  p += ToolCallOpeningStop();
  p += "\n";
  if (!name.empty()) {
    p += "<｜DSML｜invoke name=\"";
    p += name;
    p += "\">\n";
  }
  return p;
}

std::optional<ApiError> ParseOpenAiSampling(const JsonValue& body, OpenAiSampling* out) {
  if (const JsonValue* v = Field(body, "temperature")) {
    std::optional<double> d = Number(*v);
    if (!d || *d < 0 || *d > 2) return InvalidField("temperature", "must be a number in [0, 2]");
    out->temperature = *d;
  }
  if (const JsonValue* v = Field(body, "top_p")) {
    std::optional<double> d = Number(*v);
    if (!d || *d <= 0 || *d > 1) return InvalidField("top_p", "must be a number in (0, 1]");
    out->top_p = *d;
  }
  if (const JsonValue* v = Field(body, "top_k")) {
    std::optional<int64_t> i = Integer(*v);
    if (!i || *i < 0 || *i > 1000000) return InvalidField("top_k", "must be an integer >= 0");
    out->top_k = static_cast<uint32_t>(*i);
  }
  if (const JsonValue* v = Field(body, "seed")) {
    std::optional<int64_t> i = Integer(*v);
    if (!i) return InvalidField("seed", "must be an integer");
    out->seed = static_cast<uint64_t>(*i);
  }
  for (const char* name : {"frequency_penalty", "presence_penalty"}) {
    if (const JsonValue* v = Field(body, name)) {
      std::optional<double> d = Number(*v);
      if (!d || *d < -2 || *d > 2) return InvalidField(name, "must be a number in [-2, 2]");
      if (*d != 0) return NotSupported(name, std::string("a non-zero ") + name);
    }
  }
  if (const JsonValue* v = Field(body, "logit_bias")) {
    if (!v->is_object()) return InvalidField("logit_bias", "must be an object");
    if (!v->members().empty()) return NotSupported("logit_bias", "logit_bias");
  }

  if (const JsonValue* v = Field(body, "stop")) {
    if (v->is_string()) {
      if (!v->str().empty()) out->stop.push_back(v->str());
    } else if (v->is_array()) {
      if (v->items().size() > 4) return InvalidField("stop", "at most 4 stop sequences");
      for (size_t i = 0; i < v->items().size(); ++i) {
        const JsonValue& s = v->items()[i];
        if (!s.is_string() || s.str().empty()) {
          return InvalidField("stop[" + std::to_string(i) + "]", "must be a non-empty string");
        }
        out->stop.push_back(s.str());
      }
    } else {
      return InvalidField("stop", "must be a string or an array of strings");
    }
  }

  if (const JsonValue* v = Field(body, "stream")) {
    if (!v->is_bool()) return InvalidField("stream", "must be a boolean");
    out->stream = v->bool_value();
  }
  if (const JsonValue* v = Field(body, "stream_options")) {
    if (!v->is_object()) return InvalidField("stream_options", "must be an object");
    if (!out->stream) return InvalidField("stream_options", "is only allowed with stream: true");
    if (const JsonValue* u = Field(*v, "include_usage")) {
      if (!u->is_bool()) return InvalidField("stream_options.include_usage", "must be a boolean");
      out->include_usage = u->bool_value();
    }
  }
  if (const JsonValue* v = Field(body, "n")) {
    std::optional<int64_t> i = Integer(*v);
    if (!i || *i < 1 || *i > 16) return InvalidField("n", "must be an integer in [1, 16]");
    // Streamed choices would interleave n generations in one event stream; refused until the
    // answer can multiplex them (OpenAI allows it).
    if (*i > 1 && out->stream) {
      return NotSupported("n", "n > 1 with stream: true (request the choices without streaming)");
    }
    out->n = static_cast<uint32_t>(*i);
  }
  if (const JsonValue* v = Field(body, "user")) {
    if (!v->is_string()) return InvalidField("user", "must be a string");
    out->user = v->str();
  }
  return std::nullopt;
}

std::optional<ApiError> ParseChatRequest(std::string_view text, const ServedModel& served,
                                         ChatRequest* out) {
  JsonValue body;
  if (std::optional<ApiError> e = ParseBodyAndModel(text, served, &body, &out->model)) return e;

  const JsonValue* messages = Field(body, "messages");
  if (messages == nullptr || !messages->is_array() || messages->items().empty()) {
    return InvalidField("messages", "must be a non-empty array of messages");
  }
  absl::StatusOr<std::vector<chat::Message>> msgs = chat::ParseMessages(*messages);
  if (!msgs.ok()) {
    std::string m(msgs.status().message());
    std::string param = ParamOf(m, "messages");
    ApiError e;
    e.param = param;
    e.message = m;
    return e;
  }
  out->messages = std::move(*msgs);
  for (size_t i = 0; i < out->messages.size(); ++i) {
    const chat::Role r = out->messages[i].role;
    if (r == chat::Role::kLatestReminder) {
      return InvalidField("messages[" + std::to_string(i) + "].role",
                          "must be system, developer, user, assistant or tool");
    }
  }

  if (std::optional<ApiError> e = ParseOpenAiSampling(body, out)) return e;
  for (const char* name : {"max_tokens", "max_completion_tokens"}) {
    if (const JsonValue* v = Field(body, name)) {
      std::optional<int64_t> i = Integer(*v);
      if (!i || *i < 1 || *i > (int64_t{1} << 31)) {
        return InvalidField(name, "must be an integer >= 1");
      }
      // max_completion_tokens is the newer name and wins when both are given.
      if (out->max_tokens == 0 || std::string_view(name) == "max_completion_tokens") {
        out->max_tokens = static_cast<uint32_t>(*i);
      }
    }
  }
  if (const JsonValue* v = Field(body, "logprobs")) {
    if (!v->is_bool()) return InvalidField("logprobs", "must be a boolean");
    out->logprobs = v->bool_value();
  }
  if (const JsonValue* v = Field(body, "top_logprobs")) {
    std::optional<int64_t> i = Integer(*v);
    if (!i || *i < 0 || *i > 20)
      return InvalidField("top_logprobs", "must be an integer in [0, 20]");
    if (*i > 0 && !out->logprobs) return InvalidField("top_logprobs", "needs logprobs: true");
    out->top_logprobs = static_cast<uint32_t>(*i);
  }

  // Thinking: V4 chat mode unless the request asks for reasoning.
  if (const JsonValue* v = Field(body, "reasoning_effort")) {
    if (!v->is_string()) return InvalidField("reasoning_effort", "must be a string");
    const std::string& e = v->str();
    if (e == "none" || e == "minimal") {
      out->encode.thinking_mode = chat::ThinkingMode::kChat;
    } else if (e == "low" || e == "medium" || e == "high") {
      out->encode.thinking_mode = chat::ThinkingMode::kThinking;
      out->encode.reasoning_effort = chat::ReasoningEffort::kHigh;
    } else if (e == "xhigh" || e == "max") {
      out->encode.thinking_mode = chat::ThinkingMode::kThinking;
      out->encode.reasoning_effort = chat::ReasoningEffort::kMax;
    } else {
      return InvalidField("reasoning_effort",
                          "must be one of none, minimal, low, medium, high, xhigh, max");
    }
  }
  if (const JsonValue* v = Field(body, "chat_template_kwargs")) {
    if (!v->is_object()) return InvalidField("chat_template_kwargs", "must be an object");
    if (const JsonValue* t = Field(*v, "thinking")) {
      if (!t->is_bool()) return InvalidField("chat_template_kwargs.thinking", "must be a boolean");
      out->encode.thinking_mode =
          t->bool_value() ? chat::ThinkingMode::kThinking : chat::ThinkingMode::kChat;
      if (t->bool_value() && out->encode.reasoning_effort == chat::ReasoningEffort::kNone) {
        out->encode.reasoning_effort = chat::ReasoningEffort::kHigh;
      }
    }
  }

  // Tools: encoded into the prompt; calls come back through the streaming parser.
  std::vector<JsonValue> tools;
  if (const JsonValue* v = Field(body, "tools")) {
    absl::StatusOr<std::vector<JsonValue>> parsed = chat::ParseTools(*v, "tools");
    if (!parsed.ok()) {
      std::string m(parsed.status().message());
      ApiError e;
      e.param = ParamOf(m, "tools");
      e.message = m;
      return e;
    }
    tools = std::move(*parsed);
  }
  if (const JsonValue* v = Field(body, "tool_choice")) {
    if (v->is_string()) {
      const std::string& c = v->str();
      if (c == "auto") {
        out->tool_choice = ToolChoice::kAuto;
      } else if (c == "none") {
        out->tool_choice = ToolChoice::kNone;
      } else if (c == "required") {
        out->tool_choice = ToolChoice::kRequired;
      } else {
        return InvalidField("tool_choice", "must be auto, none, required or a named function");
      }
    } else if (v->is_object()) {
      const JsonValue* type = Field(*v, "type");
      if (type == nullptr || !type->is_string() || type->str() != "function") {
        return InvalidField("tool_choice.type", "must be \"function\"");
      }
      const JsonValue* fn = Field(*v, "function");
      if (fn == nullptr || !fn->is_object()) {
        return InvalidField("tool_choice.function", "must be an object with a name");
      }
      const JsonValue* name = Field(*fn, "name");
      if (name == nullptr || !name->is_string() || name->str().empty()) {
        return InvalidField("tool_choice.function.name", "must be a non-empty string");
      }
      out->tool_choice = ToolChoice::kFunction;
      out->tool_choice_name = name->str();
    } else {
      return InvalidField("tool_choice", "must be a string or an object");
    }
  }
  if (out->tool_choice == ToolChoice::kRequired || out->tool_choice == ToolChoice::kFunction) {
    if (tools.empty()) {
      return InvalidField("tool_choice", "a forced tool call needs a non-empty tools array");
    }
  }
  if (out->tool_choice == ToolChoice::kFunction) {
    const bool known = std::any_of(tools.begin(), tools.end(), [&](const JsonValue& t) {
      const JsonValue* fn = t.Find("function");
      const JsonValue* name = fn != nullptr ? fn->Find("name") : nullptr;
      return name != nullptr && name->is_string() && name->str() == out->tool_choice_name;
    });
    if (!known) {
      return InvalidField("tool_choice.function.name",
                          "no tool named '" + out->tool_choice_name + "' in tools");
    }
  }
  switch (out->tool_choice) {
    case ToolChoice::kAuto:
      break;
    case ToolChoice::kNone:
      // The definitions stay out of the prompt (the model is not offered them), and a call the
      // model writes anyway ends the text before its markup (a stop string the answer never
      // reports).
      tools.clear();
      out->stop.emplace_back(ToolCallOpeningStop());
      break;
    case ToolChoice::kRequired:
      out->assistant_prefix = ForcedToolCallPrefix(out->encode.thinking_mode, "");
      break;
    case ToolChoice::kFunction:
      out->assistant_prefix =
          ForcedToolCallPrefix(out->encode.thinking_mode, out->tool_choice_name);
      break;
  }
  out->has_tools = !tools.empty();
  if (!tools.empty()) chat::AttachRequestTools(std::move(tools), &out->messages);
  if (const JsonValue* v = Field(body, "parallel_tool_calls")) {
    if (!v->is_bool()) return InvalidField("parallel_tool_calls", "must be a boolean");
  }
  if (const JsonValue* v = Field(body, "response_format")) {
    const JsonValue* type = v->is_object() ? Field(*v, "type") : nullptr;
    if (type == nullptr || !type->is_string()) {
      return InvalidField("response_format", "must be an object with a string type");
    }
    if (type->str() != "text") {
      return NotSupported("response_format",
                          "response_format type '" + type->str() +
                              "' (the output cannot be constrained to a format)");
    }
  }
  if (const JsonValue* v = Field(body, "modalities")) {
    if (!v->is_array()) return InvalidField("modalities", "must be an array");
    for (const JsonValue& m : v->items()) {
      if (!m.is_string() || m.str() != "text") {
        return NotSupported("modalities", "an output modality other than text");
      }
    }
  }
  if (Field(body, "audio") != nullptr) return NotSupported("audio", "audio output");
  return std::nullopt;
}

}  // namespace expertmesh::gateway
