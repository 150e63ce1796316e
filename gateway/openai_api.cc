#include "gateway/openai_api.h"

#include "absl/time/clock.h"
#include "nlohmann/json.hpp"

namespace expertmesh::gateway {
namespace {

using nlohmann::json;

json DeltaJson(const chat::StreamDelta& d) {
  json delta = json::object();
  if (!d.reasoning_content.empty()) delta["reasoning_content"] = d.reasoning_content;
  if (!d.content.empty()) delta["content"] = d.content;
  if (!d.tool_calls.empty()) {
    json calls = json::array();
    for (const chat::ToolCallDelta& t : d.tool_calls) {
      json c = {{"index", t.index}};
      json fn = json::object();
      if (!t.id.empty()) {
        c["id"] = t.id;
        c["type"] = "function";
      }
      if (!t.name.empty()) fn["name"] = t.name;
      fn["arguments"] = t.arguments;
      c["function"] = fn;
      calls.push_back(c);
    }
    delta["tool_calls"] = calls;
  }
  return delta;
}

// The OpenAI chat.completion answer: SSE chunks (streamed from the first token) or one body.
class OpenAiSink : public GenerationSink {
 public:
  OpenAiSink(const ChatRequest& request, ResponseWriter& writer, std::string id, std::string model)
      : request_(request),
        writer_(writer),
        id_(std::move(id)),
        model_(std::move(model)),
        created_(absl::ToUnixSeconds(absl::Now())) {}

  bool Begin(uint32_t) override {
    if (!request_.stream) return true;
    return StartStream();
  }
  bool Delta(const chat::StreamDelta& d) override {
    if (!request_.stream) return true;
    return writer_.Write(Chunk(Choice(DeltaJson(d), nullptr)));
  }
  void Fail(const ApiError& e) override {
    if (!streaming_) {
      writer_.Respond(ErrorResponse(e));
      return;
    }
    // After streaming began: an error chunk, then the end marker, never a silently cut stream.
    writer_.Write("data: " + json::parse(e.ToJson()).dump() + "\n\n");
    writer_.Write("data: [DONE]\n\n");
    writer_.End();
  }
  void Finish(const GenerationOutcome& o) override {
    const chat::ParsedMessage& m = *o.message;
    std::string finish = "stop";
    if (!m.tool_calls.empty()) {
      finish = "tool_calls";
    } else if (o.length) {
      finish = "length";
    }
    json usage = {{"prompt_tokens", o.prompt_tokens},
                  {"completion_tokens", o.completion_tokens},
                  {"total_tokens", o.prompt_tokens + o.completion_tokens},
                  {"prompt_tokens_details", {{"cached_tokens", 0}}}};
    if (request_.stream) {
      if (!streaming_ && !StartStream()) return;
      if (!writer_.Write(Chunk(Choice(json::object(), finish)))) return;
      if (request_.include_usage) {
        json c = {{"id", id_},       {"object", "chat.completion.chunk"}, {"created", created_},
                  {"model", model_}, {"choices", json::array()},          {"usage", usage}};
        if (!writer_.Write("data: " + Dump(c) + "\n\n")) return;
      }
      writer_.Write("data: [DONE]\n\n");
      writer_.End();
      return;
    }
    json message = {{"role", "assistant"}, {"content", m.content}};
    if (request_.encode.thinking_mode == chat::ThinkingMode::kThinking) {
      message["reasoning_content"] = m.reasoning_content;
    }
    if (!m.tool_calls.empty()) {
      json calls = json::array();
      for (const chat::ParsedToolCall& t : m.tool_calls) {
        calls.push_back({{"id", t.id},
                         {"type", "function"},
                         {"function", {{"name", t.name}, {"arguments", t.arguments}}}});
      }
      message["tool_calls"] = calls;
    }
    json body = {{"id", id_},
                 {"object", "chat.completion"},
                 {"created", created_},
                 {"model", model_},
                 {"choices", json::array({{{"index", 0},
                                           {"message", message},
                                           {"logprobs", nullptr},
                                           {"finish_reason", finish}}})},
                 {"usage", usage}};
    HttpResponse r;
    r.body = Dump(body);
    writer_.Respond(std::move(r));
  }

 private:
  bool StartStream() {
    streaming_ = writer_.BeginStream(200, "text/event-stream");
    return streaming_ &&
           writer_.Write(Chunk(Choice({{"role", "assistant"}, {"content", ""}}, nullptr)));
  }
  std::string Chunk(json choices) const {
    json c = {{"id", id_},
              {"object", "chat.completion.chunk"},
              {"created", created_},
              {"model", model_},
              {"choices", std::move(choices)}};
    if (request_.include_usage) c["usage"] = nullptr;
    return "data: " + Dump(c) + "\n\n";
  }
  static json Choice(json delta, json finish) {
    return json::array({{{"index", 0},
                         {"delta", std::move(delta)},
                         {"logprobs", nullptr},
                         {"finish_reason", std::move(finish)}}});
  }

  const ChatRequest& request_;
  ResponseWriter& writer_;
  const std::string id_;
  const std::string model_;
  const int64_t created_;
  bool streaming_ = false;  // headers sent
};

}  // namespace

void RunChatCompletion(Generator& core, const ChatRequest& request, ResponseWriter& writer) {
  GenerationInput input;
  input.messages = request.messages;
  input.encode = request.encode;
  input.temperature = request.temperature;
  input.top_p = request.top_p;
  input.top_k = request.top_k;
  input.seed = request.seed;
  input.max_tokens = request.max_tokens;
  input.stop = request.stop;
  input.user = request.user;
  const std::string id = NewId("chatcmpl-");
  OpenAiSink sink(request, writer, id, core.model().id);
  core.Generate(input, id, writer, sink);
}

}  // namespace expertmesh::gateway
