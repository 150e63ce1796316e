#include "gateway/messages_api.h"

#include "nlohmann/json.hpp"

namespace expertmesh::gateway {
namespace {

using chat::JsonValue;
using nlohmann::json;

HttpResponse AnthropicErrorResponse(const ApiError& e) { return ErrorResponse(e, true); }

ApiError NotSupported(const std::string& field, const std::string& what) {
  return InvalidField(field, what + " is not supported yet by this server");
}

// A content value (string or array of blocks) as the text the V4 encoding carries; thinking
// blocks (assistant turns only) go to `reasoning`.
std::optional<ApiError> ContentText(const JsonValue& content, const std::string& field,
                                    bool assistant, std::string* text, std::string* reasoning) {
  if (content.is_string()) {
    *text = content.str();
    return std::nullopt;
  }
  if (!content.is_array()) return InvalidField(field, "must be a string or an array of blocks");
  std::vector<std::string> parts;
  for (size_t i = 0; i < content.items().size(); ++i) {
    const JsonValue& block = content.items()[i];
    const std::string at = field + "[" + std::to_string(i) + "]";
    const JsonValue* type = block.is_object() ? JsonField(block, "type") : nullptr;
    if (type == nullptr || !type->is_string()) {
      return InvalidField(at + ".type", "must be a string (the block must be an object)");
    }
    const std::string& t = type->str();
    if (t == "text") {
      const JsonValue* s = JsonField(block, "text");
      if (s == nullptr || !s->is_string()) return InvalidField(at + ".text", "must be a string");
      parts.push_back(s->str());
    } else if (t == "thinking" && assistant) {
      const JsonValue* s = JsonField(block, "thinking");
      if (s == nullptr || !s->is_string()) {
        return InvalidField(at + ".thinking", "must be a string");
      }
      reasoning->append(s->str());
    } else if (t == "redacted_thinking" && assistant) {
      // Opaque to this model: nothing to put back into the prompt.
    } else if (t == "image" || t == "document") {
      return InvalidField(at + ".type", "'" + t + "' blocks are not supported (text only model)");
    } else if (t == "tool_use" || t == "tool_result" || t == "thinking" || t == "server_tool_use" ||
               t == "web_search_tool_result") {
      return NotSupported(at + ".type", "a '" + t + "' block here");
    } else {
      return InvalidField(at + ".type", "unknown block type '" + t + "'");
    }
  }
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i > 0) text->append("\n\n");
    text->append(parts[i]);
  }
  return std::nullopt;
}

}  // namespace

std::optional<ApiError> ParseMessagesRequest(std::string_view text, const ServedModel& served,
                                             bool count_only, MessagesRequest* out) {
  JsonValue body;
  if (std::optional<ApiError> e = ParseBodyAndModel(text, served, &body, &out->model)) return e;

  GenerationInput& in = out->input;
  if (const JsonValue* v = JsonField(body, "system")) {
    chat::Message m;
    m.role = chat::Role::kSystem;
    std::string ignored;
    if (std::optional<ApiError> e = ContentText(*v, "system", false, &m.content, &ignored)) {
      return e;
    }
    in.messages.push_back(std::move(m));
  }
  const JsonValue* messages = JsonField(body, "messages");
  if (messages == nullptr || !messages->is_array() || messages->items().empty()) {
    return InvalidField("messages", "must be a non-empty array of messages");
  }
  for (size_t i = 0; i < messages->items().size(); ++i) {
    const JsonValue& m = messages->items()[i];
    const std::string at = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) return InvalidField(at, "must be an object");
    const JsonValue* role = JsonField(m, "role");
    if (role == nullptr || !role->is_string() ||
        (role->str() != "user" && role->str() != "assistant")) {
      return InvalidField(at + ".role", "must be user or assistant");
    }
    const JsonValue* content = JsonField(m, "content");
    if (content == nullptr) return InvalidField(at + ".content", "is required");
    chat::Message msg;
    const bool assistant = role->str() == "assistant";
    msg.role = assistant ? chat::Role::kAssistant : chat::Role::kUser;
    if (std::optional<ApiError> e = ContentText(*content, at + ".content", assistant, &msg.content,
                                                &msg.reasoning_content)) {
      return e;
    }
    in.messages.push_back(std::move(msg));
  }

  // Thinking: V4 thinking mode when enabled (or adaptive), chat mode otherwise.
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
      std::optional<int64_t> n = JsonInteger(*b);
      if (!n || *n < 1) return InvalidField("thinking.budget_tokens", "must be an integer >= 1");
    }
  }
  if (const JsonValue* v = JsonField(body, "tools")) {
    if (!v->is_array()) return InvalidField("tools", "must be an array");
    if (!v->items().empty()) return NotSupported("tools", "tools on /v1/messages");
  }
  if (JsonField(body, "tool_choice") != nullptr) {
    return NotSupported("tool_choice", "tool_choice on /v1/messages");
  }
  if (count_only) return std::nullopt;

  const JsonValue* max_tokens = JsonField(body, "max_tokens");
  if (max_tokens == nullptr) return InvalidField("max_tokens", "is required");
  std::optional<int64_t> n = JsonInteger(*max_tokens);
  if (!n || *n < 1 || *n > (int64_t{1} << 31)) {
    return InvalidField("max_tokens", "must be an integer >= 1");
  }
  in.max_tokens = static_cast<uint32_t>(*n);

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
        return InvalidField("stop_sequences[" + std::to_string(i) + "]",
                            "must be a non-empty string");
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

// The Anthropic message answer. Blocks open lazily as text of their kind arrives (thinking
// before text); a kind change closes the open block.
class AnthropicSink : public GenerationSink {
 public:
  AnthropicSink(const MessagesRequest& request, ResponseWriter& writer, std::string id,
                std::string model)
      : request_(request), writer_(writer), id_(std::move(id)), model_(std::move(model)) {}

  bool Begin(uint32_t prompt_tokens) override {
    if (!request_.stream) return true;
    return StartStream(prompt_tokens);
  }
  bool Delta(const chat::StreamDelta& d) override {
    if (!d.reasoning_content.empty() && !Append("thinking", d.reasoning_content)) return false;
    if (!d.content.empty() && !Append("text", d.content)) return false;
    return true;  // tool calls cannot occur: tools are refused in this slice
  }
  void Fail(const ApiError& e) override {
    if (!streaming_) {
      writer_.Respond(AnthropicErrorResponse(e));
      return;
    }
    // After streaming began: an `error` event ends the stream, never a silent cut.
    writer_.Write(Event("error", json::parse(e.ToAnthropicJson())));
    writer_.End();
  }
  void Finish(const GenerationOutcome& o) override {
    std::string stop_reason = "end_turn";
    json stop_sequence = nullptr;
    if (o.stopped_by_string) {
      stop_reason = "stop_sequence";
      stop_sequence = o.stop_sequence;
    } else if (o.length) {
      stop_reason = "max_tokens";
    }
    if (request_.stream && !streaming_ && !StartStream(o.prompt_tokens)) return;
    // An answer has at least one text block, as Anthropic's do.
    if (blocks_.empty() || blocks_.back().first != "text") {
      if (!Append("text", "")) return;
    }
    if (request_.stream) {
      if (!CloseBlock()) return;
      json delta = {{"type", "message_delta"},
                    {"delta", {{"stop_reason", stop_reason}, {"stop_sequence", stop_sequence}}},
                    {"usage", {{"output_tokens", o.completion_tokens}}}};
      if (!writer_.Write(Event("message_delta", delta))) return;
      writer_.Write(Event("message_stop", {{"type", "message_stop"}}));
      writer_.End();
      return;
    }
    json content = json::array();
    for (const auto& [type, text] : blocks_) {
      if (type == "thinking") {
        content.push_back({{"type", "thinking"}, {"thinking", text}, {"signature", ""}});
      } else {
        content.push_back({{"type", "text"}, {"text", text}});
      }
    }
    json body = Message(content, stop_reason, stop_sequence, o.prompt_tokens, o.completion_tokens);
    HttpResponse r;
    r.body = Dump(body);
    writer_.Respond(std::move(r));
  }

 private:
  json Message(json content, json stop_reason, json stop_sequence, uint32_t input,
               uint32_t output) const {
    return {{"id", id_},
            {"type", "message"},
            {"role", "assistant"},
            {"model", model_},
            {"content", std::move(content)},
            {"stop_reason", std::move(stop_reason)},
            {"stop_sequence", std::move(stop_sequence)},
            {"usage",
             {{"input_tokens", input},
              {"output_tokens", output},
              {"cache_read_input_tokens", 0},
              {"cache_creation_input_tokens", 0}}}};
  }
  static std::string Event(const std::string& type, const json& data) {
    return "event: " + type + "\ndata: " + Dump(data) + "\n\n";
  }
  bool StartStream(uint32_t prompt_tokens) {
    streaming_ = writer_.BeginStream(200, "text/event-stream");
    return streaming_ &&
           writer_.Write(Event("message_start", {{"type", "message_start"},
                                                 {"message", Message(json::array(), nullptr,
                                                                     nullptr, prompt_tokens, 0)}}));
  }
  bool CloseBlock() {
    if (!open_) return true;
    open_ = false;
    return writer_.Write(Event("content_block_stop",
                               {{"type", "content_block_stop"}, {"index", blocks_.size() - 1}}));
  }
  bool Append(const std::string& type, const std::string& text) {
    const bool fresh = blocks_.empty() || blocks_.back().first != type;
    if (fresh) {
      if (request_.stream && !CloseBlock()) return false;
      blocks_.emplace_back(type, "");
    }
    blocks_.back().second += text;
    if (!request_.stream) return true;
    const size_t index = blocks_.size() - 1;
    if (fresh) {
      json start = type == "thinking"
                       ? json{{"type", "thinking"}, {"thinking", ""}, {"signature", ""}}
                       : json{{"type", "text"}, {"text", ""}};
      if (!writer_.Write(Event(
              "content_block_start",
              {{"type", "content_block_start"}, {"index", index}, {"content_block", start}}))) {
        return false;
      }
      open_ = true;
    }
    if (text.empty()) return true;
    json delta = type == "thinking" ? json{{"type", "thinking_delta"}, {"thinking", text}}
                                    : json{{"type", "text_delta"}, {"text", text}};
    return writer_.Write(
        Event("content_block_delta",
              {{"type", "content_block_delta"}, {"index", index}, {"delta", delta}}));
  }

  const MessagesRequest& request_;
  ResponseWriter& writer_;
  const std::string id_;
  const std::string model_;
  bool streaming_ = false;  // headers sent
  bool open_ = false;       // the last block's content_block_stop is still due
  std::vector<std::pair<std::string, std::string>> blocks_;  // (type, text)
};

}  // namespace

void RunMessages(Generator& core, const MessagesRequest& request, ResponseWriter& writer) {
  const std::string id = NewId("msg_");
  AnthropicSink sink(request, writer, id, core.model().id);
  core.Generate(request.input, id, writer, sink);
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
