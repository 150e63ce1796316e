#include "gateway/openai_api.h"

#include <cctype>
#include <string>

#include "absl/time/clock.h"
#include "gateway/completions_api.h"
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

json TokenBytesJson(const std::string& bytes) {
  json b = json::array();
  for (unsigned char c : bytes) b.push_back(c);
  return b;
}

// `choices[].logprobs` for these tokens: every generated token in order, reasoning and
// tool-call markup included, so that the entries match completion_tokens.
json LogprobsJson(const std::vector<GeneratedToken>& tokens) {
  json content = json::array();
  for (const GeneratedToken& t : tokens) {
    json top = json::array();
    for (const auto& [bytes, lp] : t.top) {
      top.push_back({{"token", bytes}, {"logprob", lp}, {"bytes", TokenBytesJson(bytes)}});
    }
    content.push_back({{"token", t.bytes},
                       {"logprob", t.logprob},
                       {"bytes", TokenBytesJson(t.bytes)},
                       {"top_logprobs", std::move(top)}});
  }
  return {{"content", std::move(content)}, {"refusal", nullptr}};
}

std::string FinishReason(const chat::ParsedMessage& m, bool length) {
  if (!m.tool_calls.empty()) return "tool_calls";
  return length ? "length" : "stop";
}

// `cached`: prompt tokens loaded from the kv-store (part of `prompt`, as in OpenAI's usage).
json UsageWithCache(uint32_t prompt, uint32_t completion, uint32_t cached) {
  return {{"prompt_tokens", prompt},
          {"completion_tokens", completion},
          {"total_tokens", prompt + completion},
          {"prompt_tokens_details", {{"cached_tokens", cached}}}};
}

// One choice of a non-streamed chat.completion.
json ChoiceJson(size_t index, const ChatRequest& request, const chat::ParsedMessage& m,
                bool length, const std::vector<GeneratedToken>& tokens) {
  json message = {{"role", "assistant"}, {"content", m.content}};
  if (request.encode.thinking_mode == chat::ThinkingMode::kThinking) {
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
  return {{"index", index},
          {"message", std::move(message)},
          {"logprobs", request.logprobs ? LogprobsJson(tokens) : json(nullptr)},
          {"finish_reason", FinishReason(m, length)}};
}

// What the core runs for `request` (one choice).
GenerationInput ChatInput(const ChatRequest& request) {
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
  input.tenant = request.tenant;
  input.lease = request.lease;
  input.assistant_prefix = request.assistant_prefix;
  input.logprobs = request.logprobs;
  input.top_logprobs = request.top_logprobs;
  return input;
}

// The OpenAI chat.completion answer: SSE chunks (streamed from the first token) or one body.
class OpenAiSink : public GenerationSink {
 public:
  OpenAiSink(std::shared_ptr<const ChatRequest> request, std::shared_ptr<ResponseWriter> writer,
             std::string id, std::string model)
      : request_owner_(std::move(request)),
        writer_owner_(std::move(writer)),
        request_(*request_owner_),
        writer_(*writer_owner_),
        id_(std::move(id)),
        model_(std::move(model)),
        created_(absl::ToUnixSeconds(absl::Now())) {}

  bool Begin(uint32_t, uint32_t) override {
    if (!request_.stream) return true;
    return StartStream();
  }
  bool Delta(const chat::StreamDelta& d) override {
    if (!request_.stream) return true;
    return writer_.Write(Chunk(Choice(DeltaJson(d), nullptr, TakeLogprobs())));
  }
  bool Tokens(const std::vector<GeneratedToken>& tokens) override {
    tokens_.insert(tokens_.end(), tokens.begin(), tokens.end());
    return true;
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
    const std::string finish = FinishReason(m, o.length);
    const json usage = UsageWithCache(o.prompt_tokens, o.completion_tokens, o.cached_prompt_tokens);
    if (request_.stream) {
      if (!streaming_ && !StartStream()) return;
      // Tokens whose text was held back (a stop string's prefix, markup) ride on the last chunk.
      if (!writer_.Write(Chunk(Choice(json::object(), finish, TakeLogprobs())))) return;
      if (request_.include_usage) {
        json c = {{"id", id_},       {"object", "chat.completion.chunk"}, {"created", created_},
                  {"model", model_}, {"choices", json::array()},          {"usage", usage}};
        if (!writer_.Write("data: " + Dump(c) + "\n\n")) return;
      }
      writer_.Write("data: [DONE]\n\n");
      writer_.End();
      return;
    }
    json body = {{"id", id_},
                 {"object", "chat.completion"},
                 {"created", created_},
                 {"model", model_},
                 {"choices", json::array({ChoiceJson(0, request_, m, o.length, tokens_)})},
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
  static json Choice(json delta, json finish, json logprobs = nullptr) {
    return json::array({{{"index", 0},
                         {"delta", std::move(delta)},
                         {"logprobs", std::move(logprobs)},
                         {"finish_reason", std::move(finish)}}});
  }
  // The logprobs of the tokens reported since the last chunk (streaming), or null.
  json TakeLogprobs() {
    if (!request_.logprobs) return nullptr;
    json j = LogprobsJson(tokens_);
    tokens_.clear();
    return j;
  }

  // Owned: the sink outlives the HTTP handler that parsed the request.
  const std::shared_ptr<const ChatRequest> request_owner_;
  const std::shared_ptr<ResponseWriter> writer_owner_;
  const ChatRequest& request_;
  ResponseWriter& writer_;
  const std::string id_;
  const std::string model_;
  const int64_t created_;
  bool streaming_ = false;  // headers sent
  // GenerationInput.logprobs: streamed, those not yet in a chunk; else all of them.
  std::vector<GeneratedToken> tokens_;
};

// n > 1 (never streamed): n generations, combined into one chat.completion.
void RunChatChoices(Generator& core, std::shared_ptr<const ChatRequest> request,
                    GenerationInput input, const std::string& id,
                    std::shared_ptr<ResponseWriter> writer) {
  std::vector<GenerationInput> inputs(request->n, input);
  for (uint32_t i = 0; i < request->n; ++i) {
    if (request->seed) inputs[i].seed = ChoiceSeed(*request->seed, i);
  }
  const int64_t created = absl::ToUnixSeconds(absl::Now());
  const std::string model = core.model().id;
  StartChoices(core, std::move(inputs), id, writer,
               [request, writer, id, model, created](std::vector<ChoiceResult>& results) {
                 writer->Respond(ChoicesAnswer(
                     "chat.completion", id, created, model, results,
                     [&](size_t i, const ChoiceResult& r) {
                       return ChoiceJson(i, *request, r.message, r.length, r.tokens);
                     },
                     UsageWithCache));
               });
}

}  // namespace

HttpResponse ModelObject(const std::optional<ModelInfo>& model, std::string_view id) {
  std::string name;
  for (size_t i = 0; i < id.size(); ++i) {
    if (id[i] == '%' && i + 2 < id.size() && std::isxdigit(static_cast<unsigned char>(id[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(id[i + 2]))) {
      name += static_cast<char>(std::stoi(std::string(id.substr(i + 1, 2)), nullptr, 16));
      i += 2;
    } else {
      name += id[i];
    }
  }
  HttpResponse r;
  if (!model || name.empty() || !ServedModel(model->id, model->aliases).Serves(name)) {
    ApiError e = InvalidField("model", "the model '" + name + "' does not exist" +
                                           (model ? "; this server serves '" + model->id + "'"
                                                  : std::string("; no model is served")));
    e.status = 404;
    e.code = "model_not_found";
    return ErrorResponse(e);
  }
  r.body = Dump({{"id", name},
                 {"object", "model"},
                 {"created", model->created},
                 {"owned_by", "expertmesh"}});
  return r;
}

void RunChatCompletion(Generator& core, std::shared_ptr<const ChatRequest> request_ptr,
                       std::shared_ptr<ResponseWriter> writer) {
  const ChatRequest& request = *request_ptr;
  GenerationInput input = ChatInput(request);
  const std::string id = NewId("chatcmpl-");
  if (request.n > 1) {
    RunChatChoices(core, std::move(request_ptr), std::move(input), id, std::move(writer));
    return;
  }
  auto sink = std::make_unique<OpenAiSink>(std::move(request_ptr), writer, id, core.model().id);
  core.Start(std::move(input), id, std::move(writer), std::move(sink));
}

}  // namespace expertmesh::gateway
