#include "gateway/messages_api.h"

#include <algorithm>
#include <set>

#include "absl/strings/escaping.h"
#include "core/chat/encoder.h"
#include "nlohmann/json.hpp"

namespace expertmesh::gateway {
namespace {

using chat::JsonValue;
using nlohmann::json;

HttpResponse AnthropicErrorResponse(const ApiError& e) { return ErrorResponse(e, true); }

ApiError NotSupported(const std::string& field, const std::string& what) {
  return InvalidField(field, what + " is not supported yet by this server");
}

std::string Index(const std::string& field, size_t i) {
  return field + "[" + std::to_string(i) + "]";
}

// The line Claude Code puts first in its system prompt for billing. It changes per request
// (`cch=`), so left in the prompt it would defeat prefix reuse; the model has no use for it.
constexpr std::string_view kBillingHeader = "x-anthropic-billing-header:";

std::string StripBillingLine(const std::string& text) {
  if (text.rfind(kBillingHeader, 0) != 0) return text;
  const size_t nl = text.find('\n');
  if (nl == std::string::npos) return "";
  return text.substr(nl + 1);
}

void JoinParagraph(std::string* to, const std::string& text) {
  if (!to->empty() && !text.empty()) to->append("\n\n");
  to->append(text);
}

const JsonValue* BlockType(const JsonValue& block) {
  const JsonValue* type = block.is_object() ? JsonField(block, "type") : nullptr;
  return type != nullptr && type->is_string() ? type : nullptr;
}

// `system` (top level, or a system-role message): a string or text blocks, joined by a blank
// line, the billing line left out.
std::optional<ApiError> SystemText(const JsonValue& content, const std::string& field,
                                   std::string* text) {
  if (content.is_string()) {
    *text = StripBillingLine(content.str());
    return std::nullopt;
  }
  if (!content.is_array()) return InvalidField(field, "must be a string or an array of blocks");
  for (size_t i = 0; i < content.items().size(); ++i) {
    const JsonValue& block = content.items()[i];
    const std::string at = Index(field, i);
    const JsonValue* type = BlockType(block);
    if (type == nullptr || type->str() != "text") {
      return InvalidField(at + ".type", "must be \"text\" (the block must be an object)");
    }
    const JsonValue* s = JsonField(block, "text");
    if (s == nullptr || !s->is_string()) return InvalidField(at + ".text", "must be a string");
    JoinParagraph(text, StripBillingLine(s->str()));
  }
  return std::nullopt;
}

std::optional<ApiError> UnsupportedBlock(const std::string& at, const std::string& t) {
  if (t == "image" || t == "document") {
    return InvalidField(at + ".type", "'" + t + "' blocks are not supported (text only model)");
  }
  if (t == "server_tool_use" || t == "web_search_tool_result" || t == "container_upload" ||
      t == "search_result" || t == "mcp_tool_use" || t == "mcp_tool_result") {
    return NotSupported(at + ".type", "a '" + t + "' block");
  }
  return InvalidField(at + ".type", "unknown or misplaced block type '" + t + "'");
}

// A tool_result block as the V4 tool message the encoder merges into the user turn.
std::optional<ApiError> ToolResult(const JsonValue& block, const std::string& at,
                                   chat::Message* msg) {
  msg->role = chat::Role::kTool;
  const JsonValue* id = JsonField(block, "tool_use_id");
  if (id == nullptr || !id->is_string() || id->str().empty()) {
    return InvalidField(at + ".tool_use_id", "must be a non-empty string");
  }
  msg->tool_call_id = id->str();
  if (const JsonValue* e = JsonField(block, "is_error"); e != nullptr && !e->is_bool()) {
    return InvalidField(at + ".is_error", "must be a boolean");
  }
  const JsonValue* content = JsonField(block, "content");
  if (content == nullptr || content->is_string()) {
    if (content != nullptr) msg->content = content->str();
    return std::nullopt;
  }
  if (!content->is_array()) {
    return InvalidField(at + ".content", "must be a string or an array of blocks");
  }
  std::vector<chat::ContentPart> parts;
  for (size_t i = 0; i < content->items().size(); ++i) {
    const JsonValue& part = content->items()[i];
    const std::string pat = Index(at + ".content", i);
    const JsonValue* type = BlockType(part);
    if (type == nullptr) return InvalidField(pat + ".type", "must be a string");
    if (type->str() != "text") return UnsupportedBlock(pat, type->str());
    const JsonValue* s = JsonField(part, "text");
    if (s == nullptr || !s->is_string()) return InvalidField(pat + ".text", "must be a string");
    parts.push_back({"text", s->str()});
    JoinParagraph(&msg->content, s->str());
  }
  msg->parts = std::move(parts);
  return std::nullopt;
}

// One user turn: its tool_result blocks (first, as the API requires) become tool messages, the
// text blocks one user message after them.
std::optional<ApiError> UserTurn(const JsonValue& content, const std::string& field,
                                 std::vector<chat::Message>* out) {
  chat::Message user;
  user.role = chat::Role::kUser;
  if (content.is_string()) {
    user.content = content.str();
    out->push_back(std::move(user));
    return std::nullopt;
  }
  if (!content.is_array()) return InvalidField(field, "must be a string or an array of blocks");
  bool text_seen = false;
  for (size_t i = 0; i < content.items().size(); ++i) {
    const JsonValue& block = content.items()[i];
    const std::string at = Index(field, i);
    const JsonValue* type = BlockType(block);
    if (type == nullptr) {
      return InvalidField(at + ".type", "must be a string (the block must be an object)");
    }
    const std::string& t = type->str();
    if (t == "text") {
      const JsonValue* s = JsonField(block, "text");
      if (s == nullptr || !s->is_string()) return InvalidField(at + ".text", "must be a string");
      JoinParagraph(&user.content, s->str());
      text_seen = true;
    } else if (t == "tool_result") {
      if (text_seen) {
        return InvalidField(at + ".type",
                            "tool_result blocks must come before any text in a user turn");
      }
      chat::Message tool;
      if (std::optional<ApiError> e = ToolResult(block, at, &tool)) return e;
      out->push_back(std::move(tool));
    } else {
      return UnsupportedBlock(at, t);
    }
  }
  if (text_seen || content.items().empty()) out->push_back(std::move(user));
  return std::nullopt;
}

// One assistant turn: text, reasoning (thinking blocks, or the reasoning our own signature
// carries when display was "omitted"), tool calls.
std::optional<ApiError> AssistantTurn(const JsonValue& content, const std::string& field,
                                      chat::Message* msg) {
  msg->role = chat::Role::kAssistant;
  if (content.is_string()) {
    msg->content = content.str();
    return std::nullopt;
  }
  if (!content.is_array()) return InvalidField(field, "must be a string or an array of blocks");
  for (size_t i = 0; i < content.items().size(); ++i) {
    const JsonValue& block = content.items()[i];
    const std::string at = Index(field, i);
    const JsonValue* type = BlockType(block);
    if (type == nullptr) {
      return InvalidField(at + ".type", "must be a string (the block must be an object)");
    }
    const std::string& t = type->str();
    if (t == "text") {
      const JsonValue* s = JsonField(block, "text");
      if (s == nullptr || !s->is_string()) return InvalidField(at + ".text", "must be a string");
      JoinParagraph(&msg->content, s->str());
    } else if (t == "thinking") {
      const JsonValue* s = JsonField(block, "thinking");
      if (s == nullptr || !s->is_string()) {
        return InvalidField(at + ".thinking", "must be a string");
      }
      std::string reasoning = s->str();
      const JsonValue* sig = JsonField(block, "signature");
      if (sig != nullptr && !sig->is_string()) {
        return InvalidField(at + ".signature", "must be a string");
      }
      if (reasoning.empty() && sig != nullptr) {
        reasoning = ThinkingFromSignature(sig->str()).value_or("");
      }
      msg->reasoning_content.append(reasoning);
    } else if (t == "redacted_thinking") {
      // Opaque to this model: nothing to put back into the prompt.
    } else if (t == "tool_use") {
      chat::ToolCall call;
      const JsonValue* id = JsonField(block, "id");
      if (id == nullptr || !id->is_string() || id->str().empty()) {
        return InvalidField(at + ".id", "must be a non-empty string");
      }
      const JsonValue* name = JsonField(block, "name");
      if (name == nullptr || !name->is_string() || name->str().empty()) {
        return InvalidField(at + ".name", "must be a non-empty string");
      }
      const JsonValue* input = block.Find("input");
      if (input == nullptr || !input->is_object()) {
        return InvalidField(at + ".input", "must be an object");
      }
      call.id = id->str();
      call.name = name->str();
      call.arguments = input->DumpPython();
      msg->tool_calls.push_back(std::move(call));
    } else {
      return UnsupportedBlock(at, t);
    }
  }
  return std::nullopt;
}

bool ValidToolName(const std::string& name) {
  if (name.empty() || name.size() > 128) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '-';
  });
}

// `tools` as the OpenAI function objects the V4 encoder renders ({"type": "function",
// "function": {"name", "description", "parameters"}}).
std::optional<ApiError> Tools(const JsonValue& tools, std::vector<JsonValue>* out,
                              std::set<std::string>* names) {
  if (!tools.is_array()) return InvalidField("tools", "must be an array");
  std::vector<JsonValue> openai;
  for (size_t i = 0; i < tools.items().size(); ++i) {
    const JsonValue& t = tools.items()[i];
    const std::string at = Index("tools", i);
    if (!t.is_object()) return InvalidField(at, "must be an object");
    if (const JsonValue* type = JsonField(t, "type")) {
      if (!type->is_string()) return InvalidField(at + ".type", "must be a string");
      if (type->str() != "custom") {
        return InvalidField(at + ".type", "tool type '" + type->str() +
                                              "' is not supported: only custom tools (name, "
                                              "description, input_schema) run on this server");
      }
    }
    const JsonValue* name = JsonField(t, "name");
    if (name == nullptr || !name->is_string() || !ValidToolName(name->str())) {
      return InvalidField(at + ".name", "must be 1 to 128 characters of [a-zA-Z0-9_-]");
    }
    if (!names->insert(name->str()).second) {
      return InvalidField(at + ".name", "'" + name->str() + "' is not unique");
    }
    const JsonValue* description = JsonField(t, "description");
    if (description != nullptr && !description->is_string()) {
      return InvalidField(at + ".description", "must be a string");
    }
    const JsonValue* schema = JsonField(t, "input_schema");
    if (schema == nullptr || !schema->is_object()) {
      return InvalidField(at + ".input_schema", "must be an object (a JSON schema)");
    }
    if (const JsonValue* cc = JsonField(t, "cache_control"); cc != nullptr && !cc->is_object()) {
      return InvalidField(at + ".cache_control", "must be an object");
    }
    std::vector<JsonValue::Member> fn = {{"name", *name}};
    if (description != nullptr) fn.emplace_back("description", *description);
    fn.emplace_back("parameters", *schema);
    openai.push_back(JsonValue::Object(
        {{"type", JsonValue::String("function")}, {"function", JsonValue::Object(std::move(fn))}}));
  }
  // The OpenAI route's own check and shape, so both APIs give the encoder the same tools.
  absl::StatusOr<std::vector<JsonValue>> parsed =
      chat::ParseTools(JsonValue::Array(std::move(openai)), "tools");
  if (!parsed.ok()) return InvalidField("tools", std::string(parsed.status().message()));
  *out = std::move(*parsed);
  return std::nullopt;
}

enum class Choice { kAuto, kAny, kTool, kNone };

std::optional<ApiError> ParseToolChoice(const JsonValue& v, const std::set<std::string>& names,
                                   Choice* choice, std::string* name) {
  const JsonValue* type = v.is_object() ? JsonField(v, "type") : nullptr;
  if (type == nullptr || !type->is_string()) {
    return InvalidField("tool_choice.type", "must be auto, any, tool or none");
  }
  const std::string& t = type->str();
  if (t == "auto") {
    *choice = Choice::kAuto;
  } else if (t == "any") {
    *choice = Choice::kAny;
  } else if (t == "none") {
    *choice = Choice::kNone;
  } else if (t == "tool") {
    *choice = Choice::kTool;
    const JsonValue* n = JsonField(v, "name");
    if (n == nullptr || !n->is_string() || names.count(n->str()) == 0) {
      return InvalidField("tool_choice.name", "must name one of the request's tools");
    }
    *name = n->str();
  } else {
    return InvalidField("tool_choice.type", "must be auto, any, tool or none");
  }
  if ((*choice == Choice::kAny || *choice == Choice::kTool) && names.empty()) {
    return InvalidField("tool_choice", "forces a tool call, but the request has no tools");
  }
  if (const JsonValue* d = JsonField(v, "disable_parallel_tool_use"); d != nullptr &&
                                                                       !d->is_bool()) {
    return InvalidField("tool_choice.disable_parallel_tool_use", "must be a boolean");
  }
  return std::nullopt;
}

// `context_management.edits`: clear_thinking_20251015 drops the reasoning of all but the last
// `keep` thinking turns (keep "all": none). Returns the edits that cleared something.
std::optional<ApiError> ContextManagement(const JsonValue& v, std::vector<chat::Message>* msgs,
                                          std::vector<AppliedContextEdit>* applied,
                                          std::vector<std::string>* cleared) {
  if (!v.is_object()) return InvalidField("context_management", "must be an object");
  const JsonValue* edits = JsonField(v, "edits");
  if (edits == nullptr) return std::nullopt;
  if (!edits->is_array()) return InvalidField("context_management.edits", "must be an array");
  for (size_t i = 0; i < edits->items().size(); ++i) {
    const JsonValue& edit = edits->items()[i];
    const std::string at = Index("context_management.edits", i);
    const JsonValue* type = BlockType(edit);
    if (type == nullptr) return InvalidField(at + ".type", "must be a string");
    if (type->str() == "clear_tool_uses_20250919") {
      return NotSupported(at + ".type", "the edit 'clear_tool_uses_20250919'");
    }
    if (type->str() != "clear_thinking_20251015") {
      return InvalidField(at + ".type", "unknown edit type '" + type->str() +
                                            "' (known: clear_thinking_20251015)");
    }
    // The API's default keeps the last thinking turn.
    std::optional<int64_t> keep = 1;
    if (const JsonValue* k = JsonField(edit, "keep")) {
      if (k->is_string() && k->str() == "all") {
        keep.reset();
      } else {
        const JsonValue* kt = k->is_object() ? JsonField(*k, "type") : nullptr;
        const JsonValue* kv = k->is_object() ? JsonField(*k, "value") : nullptr;
        const int64_t n = kv != nullptr ? JsonInteger(*kv).value_or(-1) : -1;
        if (kt == nullptr || !kt->is_string() || kt->str() != "thinking_turns" || n < 0) {
          return InvalidField(at + ".keep",
                              "must be \"all\" or {\"type\": \"thinking_turns\", \"value\": N}");
        }
        keep = n;
      }
    }
    if (!keep) continue;
    AppliedContextEdit a;
    a.type = type->str();
    int64_t kept = 0;
    for (auto it = msgs->rbegin(); it != msgs->rend(); ++it) {
      if (it->role != chat::Role::kAssistant || it->reasoning_content.empty()) continue;
      if (kept < *keep) {
        ++kept;
        continue;
      }
      cleared->push_back(std::move(it->reasoning_content));
      it->reasoning_content.clear();
      ++a.cleared_thinking_turns;
    }
    if (a.cleared_thinking_turns > 0) applied->push_back(std::move(a));
  }
  return std::nullopt;
}

std::optional<size_t> PromptLength(const GenerationInput& in, const tokenizer::Tokenizer& tok) {
  absl::StatusOr<chat::EncodedChat> encoded = chat::EncodeChat(in.messages, in.encode);
  if (!encoded.ok()) return std::nullopt;
  absl::StatusOr<std::vector<int32_t>> ids = chat::ChatIds(*encoded, tok);
  if (!ids.ok()) return std::nullopt;
  return ids->size();
}

}  // namespace

std::string ThinkingSignature(std::string_view thinking) {
  return "emt1." + absl::WebSafeBase64Escape(absl::string_view(thinking.data(), thinking.size()));
}

std::optional<std::string> ThinkingFromSignature(std::string_view signature) {
  constexpr std::string_view kPrefix = "emt1.";
  if (signature.substr(0, kPrefix.size()) != kPrefix) return std::nullopt;
  std::string out;
  const std::string_view body = signature.substr(kPrefix.size());
  if (!absl::WebSafeBase64Unescape(absl::string_view(body.data(), body.size()), &out)) {
    return std::nullopt;
  }
  return out;
}

std::optional<ApiError> ParseMessagesRequest(std::string_view text, const ServedModel& served,
                                             bool count_only, MessagesRequest* out,
                                             const tokenizer::Tokenizer* tokenizer) {
  JsonValue body;
  if (std::optional<ApiError> e = ParseBodyAndModel(text, served, &body, &out->model)) return e;

  GenerationInput& in = out->input;
  std::string system;
  if (const JsonValue* v = JsonField(body, "system")) {
    if (std::optional<ApiError> e = SystemText(*v, "system", &system)) return e;
  }
  const JsonValue* messages = JsonField(body, "messages");
  if (messages == nullptr || !messages->is_array() || messages->items().empty()) {
    return InvalidField("messages", "must be a non-empty array of messages");
  }
  std::vector<chat::Message>& msgs = in.messages;
  for (size_t i = 0; i < messages->items().size(); ++i) {
    const JsonValue& m = messages->items()[i];
    const std::string at = Index("messages", i);
    if (!m.is_object()) return InvalidField(at, "must be an object");
    const JsonValue* role = JsonField(m, "role");
    if (role == nullptr || !role->is_string() ||
        (role->str() != "user" && role->str() != "assistant" && role->str() != "system")) {
      return InvalidField(at + ".role", "must be user, assistant or system");
    }
    const JsonValue* content = JsonField(m, "content");
    if (content == nullptr) return InvalidField(at + ".content", "is required");
    if (role->str() == "user") {
      if (std::optional<ApiError> e = UserTurn(*content, at + ".content", &msgs)) return e;
    } else if (role->str() == "assistant") {
      chat::Message msg;
      if (std::optional<ApiError> e = AssistantTurn(*content, at + ".content", &msg)) return e;
      msgs.push_back(std::move(msg));
    } else {
      // A system message inside `messages` (coding agents send reminders so). Before any turn it
      // extends the system prompt; later it joins the user turn before it after a blank line.
      // Rendered as a V4 system message it would run into the text around it with no role tag.
      std::string s;
      if (std::optional<ApiError> e = SystemText(*content, at + ".content", &s)) return e;
      if (msgs.empty()) {
        JoinParagraph(&system, s);
      } else if (msgs.back().role == chat::Role::kUser) {
        JoinParagraph(&msgs.back().content, s);
      } else {
        // After tool results or an assistant turn: a user message, which the encoder merges
        // into the adjacent user turn as a text block (joined by a blank line too).
        chat::Message user;
        user.role = chat::Role::kUser;
        user.content = s;
        msgs.push_back(std::move(user));
      }
    }
  }
  if (msgs.empty()) {
    return InvalidField("messages", "must hold at least one user or assistant message");
  }
  if (JsonField(body, "system") != nullptr || !system.empty()) {
    chat::Message m;
    m.role = chat::Role::kSystem;
    m.content = std::move(system);
    msgs.insert(msgs.begin(), std::move(m));
  }

  // Thinking: V4 thinking mode when enabled (or adaptive), chat mode otherwise.
  std::optional<int64_t> budget;
  if (const JsonValue* v = JsonField(body, "thinking")) {
    const JsonValue* type = v->is_object() ? JsonField(*v, "type") : nullptr;
    if (type == nullptr || !type->is_string()) {
      return InvalidField("thinking.type", "must be enabled, adaptive or disabled");
    }
    if (type->str() == "enabled" || type->str() == "adaptive") {
      out->thinking = true;
      in.encode.thinking_mode = chat::ThinkingMode::kThinking;
      in.encode.reasoning_effort = chat::ReasoningEffort::kHigh;
    } else if (type->str() != "disabled") {
      return InvalidField("thinking.type", "must be enabled, adaptive or disabled");
    }
    if (const JsonValue* b = JsonField(*v, "budget_tokens")) {
      budget = JsonInteger(*b);
      if (!budget || *budget < 1024 || *budget > (int64_t{1} << 31)) {
        return InvalidField("thinking.budget_tokens", "must be an integer >= 1024");
      }
    } else if (type->str() == "enabled") {
      return InvalidField("thinking.budget_tokens", "is required with type enabled");
    }
    if (const JsonValue* d = JsonField(*v, "display")) {
      if (!d->is_string() || (d->str() != "summarized" && d->str() != "omitted")) {
        return InvalidField("thinking.display", "must be summarized or omitted");
      }
      out->omit_thinking = d->str() == "omitted";
    }
    // Adaptive thinking decides its own length: a budget only binds `enabled`.
    if (type->str() == "enabled") in.max_thinking_tokens = static_cast<uint32_t>(*budget);
  }
  if (const JsonValue* v = JsonField(body, "output_config")) {
    if (!v->is_object()) return InvalidField("output_config", "must be an object");
    if (const JsonValue* e = JsonField(*v, "effort")) {
      if (!e->is_string() || (e->str() != "low" && e->str() != "medium" && e->str() != "high" &&
                              e->str() != "max")) {
        return InvalidField("output_config.effort", "must be low, medium, high or max");
      }
      // V4 knows two thinking efforts: max, and high for everything below it. Effort does not
      // switch thinking on by itself.
      if (out->thinking) {
        in.encode.reasoning_effort =
            e->str() == "max" ? chat::ReasoningEffort::kMax : chat::ReasoningEffort::kHigh;
      }
    }
    if (JsonField(*v, "format") != nullptr) {
      return NotSupported("output_config.format",
                          "a structured output format (the output cannot be constrained)");
    }
  }

  // Tools: the same V4 rendering as the OpenAI route.
  std::vector<JsonValue> tools;
  std::set<std::string> tool_names;
  if (const JsonValue* v = JsonField(body, "tools")) {
    if (std::optional<ApiError> e = Tools(*v, &tools, &tool_names)) return e;
  }
  Choice choice = Choice::kAuto;
  std::string choice_name;
  if (const JsonValue* v = JsonField(body, "tool_choice")) {
    if (std::optional<ApiError> e = ParseToolChoice(*v, tool_names, &choice, &choice_name)) return e;
    if (out->thinking && (choice == Choice::kAny || choice == Choice::kTool)) {
      // As the Anthropic API: a forced call would skip the thinking.
      return InvalidField("tool_choice",
                          "forcing tool use (any, tool) is not compatible with thinking; use "
                          "auto or none");
    }
  }
  switch (choice) {
    case Choice::kAuto:
      break;
    case Choice::kNone:
      // As on the OpenAI route: the tools stay out of the prompt, and should the model still
      // open a call, the text ends there.
      tools.clear();
      out->tool_stop = std::string(ToolCallOpeningStop());
      in.stop.push_back(out->tool_stop);
      break;
    case Choice::kAny:
      in.assistant_prefix = ForcedToolCallPrefix(in.encode.thinking_mode, "");
      break;
    case Choice::kTool:
      in.assistant_prefix = ForcedToolCallPrefix(in.encode.thinking_mode, choice_name);
      break;
  }
  out->has_tools = !tools.empty();
  chat::AttachRequestTools(std::move(tools), &msgs);

  if (const JsonValue* v = JsonField(body, "context_management")) {
    std::vector<AppliedContextEdit> applied;
    std::vector<std::string> cleared;
    const GenerationInput before = in;
    if (std::optional<ApiError> e = ContextManagement(*v, &msgs, &applied, &cleared)) return e;
    if (tokenizer != nullptr && !applied.empty()) {
      // What the edits removed from this prompt (nothing where V4 drops the thinking anyway).
      std::optional<size_t> was = PromptLength(before, *tokenizer);
      std::optional<size_t> now = PromptLength(in, *tokenizer);
      if (was && now && *was > *now && applied.size() == 1) {
        applied[0].cleared_input_tokens = static_cast<uint32_t>(*was - *now);
      }
    }
    out->context_edits = std::move(applied);
  }
  if (count_only) return std::nullopt;

  const JsonValue* max_tokens = JsonField(body, "max_tokens");
  if (max_tokens == nullptr) return InvalidField("max_tokens", "is required");
  std::optional<int64_t> n = JsonInteger(*max_tokens);
  if (!n || *n < 1 || *n > (int64_t{1} << 31)) {
    return InvalidField("max_tokens", "must be an integer >= 1");
  }
  in.max_tokens = static_cast<uint32_t>(*n);
  if (in.max_thinking_tokens > 0 && in.max_thinking_tokens >= in.max_tokens) {
    return InvalidField("thinking.budget_tokens", "must be less than max_tokens");
  }

  if (const JsonValue* v = JsonField(body, "temperature")) {
    std::optional<double> d = JsonNumber(*v);
    if (!d || *d < 0 || *d > 1) return InvalidField("temperature", "must be a number in [0, 1]");
    in.temperature = *d;
  }
  if (const JsonValue* v = JsonField(body, "top_p")) {
    std::optional<double> d = JsonNumber(*v);
    if (!d || *d <= 0 || *d > 1) return InvalidField("top_p", "must be a number in (0, 1]");
    in.top_p = *d;
  }
  if (const JsonValue* v = JsonField(body, "top_k")) {
    std::optional<int64_t> i = JsonInteger(*v);
    if (!i || *i < 0 || *i > 1000000) return InvalidField("top_k", "must be an integer >= 0");
    in.top_k = static_cast<uint32_t>(*i);
  }
  if (const JsonValue* v = JsonField(body, "stop_sequences")) {
    if (!v->is_array()) return InvalidField("stop_sequences", "must be an array of strings");
    for (size_t i = 0; i < v->items().size(); ++i) {
      const JsonValue& s = v->items()[i];
      if (!s.is_string() || s.str().empty()) {
        return InvalidField(Index("stop_sequences", i), "must be a non-empty string");
      }
      in.stop.push_back(s.str());
    }
  }
  if (const JsonValue* v = JsonField(body, "stream")) {
    if (!v->is_bool()) return InvalidField("stream", "must be a boolean");
    out->stream = v->bool_value();
  }
  if (const JsonValue* v = JsonField(body, "metadata")) {
    if (!v->is_object()) return InvalidField("metadata", "must be an object");
    if (const JsonValue* u = JsonField(*v, "user_id")) {
      if (!u->is_string()) return InvalidField("metadata.user_id", "must be a string");
      in.user = u->str();
    }
  }
  return std::nullopt;
}

namespace {

std::string Event(const std::string& type, const json& data) {
  return "event: " + type + "\ndata: " + Dump(data) + "\n\n";
}

// Anthropic's split: input_tokens are the prompt tokens after the last cache hit, so
// input_tokens + cache_read_input_tokens is the whole prompt (what count_tokens says).
json Usage(uint32_t prompt, uint32_t output, uint32_t cached = 0) {
  return {{"input_tokens", prompt - std::min(cached, prompt)},
          {"output_tokens", output},
          {"cache_read_input_tokens", std::min(cached, prompt)},
          {"cache_creation_input_tokens", 0}};
}

json ContextManagementJson(const std::vector<AppliedContextEdit>& edits) {
  json applied = json::array();
  for (const AppliedContextEdit& e : edits) {
    applied.push_back({{"type", e.type},
                       {"cleared_thinking_turns", e.cleared_thinking_turns},
                       {"cleared_input_tokens", e.cleared_input_tokens}});
  }
  return {{"applied_edits", std::move(applied)}};
}

// Tool-use ids in Anthropic's style; the parser's own ids are deterministic per request.
std::string ToolUseId(const std::string& parser_id) {
  constexpr std::string_view kCall = "call_";
  if (parser_id.rfind(kCall, 0) == 0) return "toolu_" + parser_id.substr(kCall.size());
  return "toolu_" + parser_id;
}

// A call's input as the object the API returns. The arguments are JSON object text unless the
// output broke off mid-call (e.g. at max_tokens); then there is no object to give.
json ToolInput(const std::string& arguments) {
  json input = json::parse(arguments, nullptr, /*allow_exceptions=*/false);
  if (input.is_discarded() || !input.is_object()) return json::object();
  return input;
}

}  // namespace

AnthropicAnswer::AnthropicAnswer(const MessagesRequest& request, std::string id,
                                 std::string model)
    : stream_(request.stream),
      omit_thinking_(request.omit_thinking),
      tool_stop_(request.tool_stop),
      context_edits_(request.context_edits),
      id_(std::move(id)),
      model_(std::move(model)) {}

std::string AnthropicAnswer::Ping() { return Event("ping", {{"type", "ping"}}); }

std::string AnthropicAnswer::Error(const ApiError& error) {
  return Event("error", json::parse(error.ToAnthropicJson()));
}

std::string AnthropicAnswer::Start(uint32_t prompt_tokens, uint32_t cached_prompt_tokens) const {
  json message = {{"id", id_},
                  {"type", "message"},
                  {"role", "assistant"},
                  {"model", model_},
                  {"content", json::array()},
                  {"stop_reason", nullptr},
                  {"stop_sequence", nullptr},
                  {"usage", Usage(prompt_tokens, 0, cached_prompt_tokens)}};
  return Event("message_start", {{"type", "message_start"}, {"message", std::move(message)}});
}

std::string AnthropicAnswer::OpenBlock(Block block) {
  std::string out = CloseBlock();
  blocks_.push_back(std::move(block));
  const Block& b = blocks_.back();
  if (!stream_) return out;
  json start;
  switch (b.kind) {
    case Block::Kind::kThinking:
      start = {{"type", "thinking"}, {"thinking", ""}, {"signature", ""}};
      break;
    case Block::Kind::kText:
      start = {{"type", "text"}, {"text", ""}};
      break;
    case Block::Kind::kToolUse:
      start = {{"type", "tool_use"}, {"id", b.id}, {"name", b.name}, {"input", json::object()}};
      break;
  }
  open_ = true;
  out += Event("content_block_start", {{"type", "content_block_start"},
                                       {"index", blocks_.size() - 1},
                                       {"content_block", std::move(start)}});
  return out;
}

std::string AnthropicAnswer::CloseBlock() {
  if (!open_) return "";
  open_ = false;
  const size_t index = blocks_.size() - 1;
  std::string out;
  if (blocks_.back().kind == Block::Kind::kThinking) {
    // The signature comes last, once the block's reasoning is whole.
    out += Event("content_block_delta",
                 {{"type", "content_block_delta"},
                  {"index", index},
                  {"delta",
                   {{"type", "signature_delta"},
                    {"signature", ThinkingSignature(blocks_.back().text)}}}});
  }
  out += Event("content_block_stop", {{"type", "content_block_stop"}, {"index", index}});
  return out;
}

std::string AnthropicAnswer::AppendText(Block::Kind kind, const std::string& text) {
  std::string out;
  if (blocks_.empty() || blocks_.back().kind != kind) out += OpenBlock(Block{kind});
  blocks_.back().text += text;
  if (!stream_ || text.empty()) return out;
  if (kind == Block::Kind::kThinking) {
    if (omit_thinking_) return out;
    return out + Event("content_block_delta", {{"type", "content_block_delta"},
                                               {"index", blocks_.size() - 1},
                                               {"delta", {{"type", "thinking_delta"},
                                                          {"thinking", text}}}});
  }
  return out + Event("content_block_delta",
                     {{"type", "content_block_delta"},
                      {"index", blocks_.size() - 1},
                      {"delta", {{"type", "text_delta"}, {"text", text}}}});
}

std::string AnthropicAnswer::Delta(const chat::StreamDelta& d) {
  std::string out;
  if (!d.reasoning_content.empty()) out += AppendText(Block::Kind::kThinking, d.reasoning_content);
  if (!d.content.empty()) out += AppendText(Block::Kind::kText, d.content);
  for (const chat::ToolCallDelta& c : d.tool_calls) {
    if (blocks_.empty() || blocks_.back().kind != Block::Kind::kToolUse ||
        blocks_.back().call != c.index) {
      Block b{Block::Kind::kToolUse};
      b.id = ToolUseId(c.id);
      b.name = c.name;
      b.call = c.index;
      out += OpenBlock(std::move(b));
    }
    blocks_.back().text += c.arguments;
    if (stream_ && !c.arguments.empty()) {
      out += Event("content_block_delta",
                   {{"type", "content_block_delta"},
                    {"index", blocks_.size() - 1},
                    {"delta", {{"type", "input_json_delta"}, {"partial_json", c.arguments}}}});
    }
  }
  return out;
}

std::string AnthropicAnswer::EnsureAnswerBlock() {
  for (const Block& b : blocks_) {
    if (b.kind != Block::Kind::kThinking) return "";
  }
  // An answer has a text block when it has no tool call, as Anthropic's do.
  return OpenBlock(Block{Block::Kind::kText});
}

std::string AnthropicAnswer::StopReason(const GenerationOutcome& o, bool* stop_sequence) const {
  *stop_sequence = false;
  if (o.stopped_by_string && !(o.stop_sequence == tool_stop_ && !tool_stop_.empty())) {
    *stop_sequence = true;
    return "stop_sequence";
  }
  if (o.length) return "max_tokens";
  for (const Block& b : blocks_) {
    if (b.kind == Block::Kind::kToolUse) return "tool_use";
  }
  return "end_turn";
}

std::string AnthropicAnswer::Finish(const GenerationOutcome& o) {
  std::string out = EnsureAnswerBlock();
  out += CloseBlock();
  bool is_stop_sequence = false;
  const std::string reason = StopReason(o, &is_stop_sequence);
  json delta = {{"type", "message_delta"},
                {"delta",
                 {{"stop_reason", reason},
                  {"stop_sequence", is_stop_sequence ? json(o.stop_sequence) : json(nullptr)}}},
                // message_start may have gone out before the hit was known (a long wait for the
                // first token: AnthropicSink::Idle); the final split is here either way (the SDKs
                // take these fields from message_delta).
                {"usage",
                 {{"output_tokens", o.completion_tokens},
                  {"input_tokens", o.prompt_tokens - std::min(o.cached_prompt_tokens,
                                                              o.prompt_tokens)},
                  {"cache_read_input_tokens", std::min(o.cached_prompt_tokens, o.prompt_tokens)}}}};
  if (context_edits_) delta["context_management"] = ContextManagementJson(*context_edits_);
  out += Event("message_delta", delta);
  out += Event("message_stop", {{"type", "message_stop"}});
  return out;
}

std::string AnthropicAnswer::Message(const GenerationOutcome& o) {
  EnsureAnswerBlock();
  open_ = false;
  json content = json::array();
  for (const Block& b : blocks_) {
    switch (b.kind) {
      case Block::Kind::kThinking:
        content.push_back({{"type", "thinking"},
                           {"thinking", omit_thinking_ ? std::string() : b.text},
                           {"signature", ThinkingSignature(b.text)}});
        break;
      case Block::Kind::kText:
        content.push_back({{"type", "text"}, {"text", b.text}});
        break;
      case Block::Kind::kToolUse:
        content.push_back(
            {{"type", "tool_use"}, {"id", b.id}, {"name", b.name}, {"input", ToolInput(b.text)}});
        break;
    }
  }
  bool is_stop_sequence = false;
  const std::string reason = StopReason(o, &is_stop_sequence);
  json body = {{"id", id_},
               {"type", "message"},
               {"role", "assistant"},
               {"model", model_},
               {"content", std::move(content)},
               {"stop_reason", reason},
               {"stop_sequence", is_stop_sequence ? json(o.stop_sequence) : json(nullptr)},
               {"usage", Usage(o.prompt_tokens, o.completion_tokens, o.cached_prompt_tokens)}};
  if (context_edits_) body["context_management"] = ContextManagementJson(*context_edits_);
  return Dump(body);
}

namespace {

// Sends the AnthropicAnswer: SSE events as they come when streaming, else one message.
class AnthropicSink : public GenerationSink {
 public:
  AnthropicSink(std::shared_ptr<const MessagesRequest> request,
                std::shared_ptr<ResponseWriter> writer, std::string id, std::string model)
      : writer_owner_(std::move(writer)),
        writer_(*writer_owner_),
        answer_(*request, std::move(id), std::move(model)) {}

  bool Begin(uint32_t prompt_tokens, uint32_t cached_prompt_tokens) override {
    if (!answer_.stream() || streaming_) return true;
    return StartStream(prompt_tokens, cached_prompt_tokens);
  }
  bool Delta(const chat::StreamDelta& d) override { return Send(answer_.Delta(d)); }
  bool Idle(uint32_t prompt_tokens) override {
    // A long prefill must not look like a dead connection: message_start goes out as soon as the
    // wait is noticeable, pings follow. (A refusal after this point is an `error` event, not a
    // 503, as with Anthropic's own API.) The kv-store hit is not known yet: message_start then
    // counts the whole prompt as input_tokens and message_delta carries the split.
    if (!answer_.stream()) return !writer_.client_gone();
    if (!streaming_ && !StartStream(prompt_tokens)) return false;
    return writer_.Write(AnthropicAnswer::Ping());
  }
  void Fail(const ApiError& e) override {
    if (!streaming_) {
      writer_.Respond(AnthropicErrorResponse(e));
      return;
    }
    // After streaming began: an `error` event ends the stream, never a silent cut.
    writer_.Write(AnthropicAnswer::Error(e));
    writer_.End();
  }
  void Finish(const GenerationOutcome& o) override {
    if (!answer_.stream()) {
      HttpResponse r;
      r.body = answer_.Message(o);
      writer_.Respond(std::move(r));
      return;
    }
    if (!streaming_ && !StartStream(o.prompt_tokens, o.cached_prompt_tokens)) return;
    if (!writer_.Write(answer_.Finish(o))) return;
    writer_.End();
  }

 private:
  bool StartStream(uint32_t prompt_tokens, uint32_t cached_prompt_tokens = 0) {
    streaming_ = writer_.BeginStream(200, "text/event-stream");
    return streaming_ && writer_.Write(answer_.Start(prompt_tokens, cached_prompt_tokens));
  }
  bool Send(std::string events) {
    if (events.empty()) return !writer_.client_gone();
    return writer_.Write(std::move(events));
  }

  // Owned: the sink outlives the HTTP handler that parsed the request.
  const std::shared_ptr<ResponseWriter> writer_owner_;
  ResponseWriter& writer_;
  AnthropicAnswer answer_;
  bool streaming_ = false;  // headers and message_start sent
};

}  // namespace

void RunMessages(Generator& core, std::shared_ptr<const MessagesRequest> request,
                 std::shared_ptr<ResponseWriter> writer) {
  const std::string id = NewId("msg_");
  GenerationInput input = request->input;
  auto sink = std::make_unique<AnthropicSink>(std::move(request), writer, id, core.model().id);
  core.Start(std::move(input), id, std::move(writer), std::move(sink));
}

HttpResponse CountMessageTokens(const Generator& core, const MessagesRequest& request) {
  std::vector<int32_t> ids;
  if (std::optional<ApiError> e = core.PromptIds(request.input, &ids)) {
    return AnthropicErrorResponse(*e);
  }
  HttpResponse r;
  r.body = Dump({{"input_tokens", ids.size()}});
  return r;
}

}  // namespace expertmesh::gateway
