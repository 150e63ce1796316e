#include "gateway/completions_api.h"

#include <algorithm>
#include <mutex>
#include <utility>

#include "absl/time/clock.h"
#include "core/chat/encoder.h"
#include "nlohmann/json.hpp"

namespace expertmesh::gateway {
namespace {

using chat::JsonValue;
using nlohmann::json;

// --- n choices ---

// The choices of one answer: their results, the first error, and the cancel hooks of the
// generations still running (fired when the client leaves or a choice fails).
class ChoiceSet {
 public:
  ChoiceSet(size_t n, std::shared_ptr<ResponseWriter> writer,
            std::function<void(std::vector<ChoiceResult>&)> done)
      : writer_(std::move(writer)), done_(std::move(done)), results_(n), remaining_(n) {}

  const std::shared_ptr<ResponseWriter>& writer() const { return writer_; }

  bool gone() const {
    std::lock_guard<std::mutex> lock(mu_);
    return ended_ || writer_->client_gone();
  }

  void AddCancel(std::function<void()> cancel) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!ended_) {
        cancels_.push_back(std::move(cancel));
        return;
      }
    }
    cancel();
  }

  // Ends the set without an answer (the client is gone) and cancels what still runs.
  void Abort() {
    std::vector<std::function<void()>> cancels;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ended_ = true;
      cancels.swap(cancels_);
    }
    for (auto& c : cancels) c();
  }

  void Finish(size_t index, ChoiceResult result) {
    std::vector<ChoiceResult> all;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (ended_) return;
      results_[index] = std::move(result);
      if (--remaining_ > 0) return;
      ended_ = true;
      // The hooks may hold the generations' state; dropping them breaks the cycle through
      // the choice writers.
      cancels_.clear();
      all.swap(results_);
    }
    done_(all);
  }

  void Fail(const ApiError& e) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (ended_) return;
    }
    Abort();
    writer_->Respond(ErrorResponse(e));
  }

 private:
  const std::shared_ptr<ResponseWriter> writer_;
  const std::function<void(std::vector<ChoiceResult>&)> done_;
  mutable std::mutex mu_;
  std::vector<ChoiceResult> results_;
  size_t remaining_;
  bool ended_ = false;
  std::vector<std::function<void()>> cancels_;
};

// What one choice's generation sees as its client: gone when the real client is or when the
// set has ended (a sibling failed), so the generation stops; it never writes (the set answers).
class ChoiceWriter : public ResponseWriter {
 public:
  explicit ChoiceWriter(std::shared_ptr<ChoiceSet> set) : set_(std::move(set)) {}
  bool Respond(HttpResponse) override { return false; }
  bool BeginStream(int, const std::string&) override { return false; }
  bool Write(std::string) override { return false; }
  size_t queued_bytes() const override { return 0; }
  bool OnDrained(std::function<void()>) override { return false; }
  void End() override {}
  bool client_gone() const override { return set_->gone(); }
  void OnClientGone(std::function<void()> callback) override {
    set_->AddCancel(std::move(callback));
  }

 private:
  const std::shared_ptr<ChoiceSet> set_;
};

// Collects one choice.
class CollectSink : public GenerationSink {
 public:
  CollectSink(std::shared_ptr<ChoiceSet> set, size_t index) : set_(std::move(set)), index_(index) {}
  bool Begin(uint32_t prompt_tokens, uint32_t cached_prompt_tokens) override {
    result_.prompt_tokens = prompt_tokens;
    result_.cached_prompt_tokens = cached_prompt_tokens;
    return !set_->gone();
  }
  bool Delta(const chat::StreamDelta& d) override {
    result_.text += d.content;
    return !set_->gone();
  }
  bool Tokens(const std::vector<GeneratedToken>& tokens) override {
    result_.tokens.insert(result_.tokens.end(), tokens.begin(), tokens.end());
    return !set_->gone();
  }
  void Fail(const ApiError& e) override { set_->Fail(e); }
  void Finish(const GenerationOutcome& o) override {
    if (o.message != nullptr) result_.message = *o.message;
    result_.prompt_tokens = o.prompt_tokens;
    result_.cached_prompt_tokens = o.cached_prompt_tokens;
    result_.completion_tokens = o.completion_tokens;
    result_.length = o.length;
    set_->Finish(index_, std::move(result_));
  }

 private:
  const std::shared_ptr<ChoiceSet> set_;
  const size_t index_;
  ChoiceResult result_;
};

// --- text completions ---

const JsonValue* Field(const JsonValue& body, std::string_view key) { return JsonField(body, key); }

ApiError NotSupported(std::string param, const std::string& what) {
  ApiError e = InvalidField(std::move(param), what + " is not supported by this server");
  e.code = "unsupported_parameter";
  return e;
}

// An id prompt: a non-empty array of token ids below `vocab_size`.
std::optional<ApiError> ParseIds(const JsonValue& v, const std::string& param, int32_t vocab_size,
                                 std::vector<int32_t>* ids) {
  if (v.items().empty()) return InvalidField(param, "must not be empty");
  for (size_t i = 0; i < v.items().size(); ++i) {
    std::optional<int64_t> id = JsonInteger(v.items()[i]);
    if (!id || *id < 0 || (vocab_size > 0 && *id >= vocab_size) || *id > INT32_MAX) {
      return InvalidField(param + "[" + std::to_string(i) + "]",
                          "must be a token id in [0, " +
                              (vocab_size > 0 ? std::to_string(vocab_size) : "2^31") + ")");
    }
    ids->push_back(static_cast<int32_t>(*id));
  }
  return std::nullopt;
}

std::optional<ApiError> ParsePrompt(const JsonValue& v, int32_t vocab_size,
                                    CompletionRequest* out) {
  constexpr char kShape[] =
      "must be a string, an array of token ids, or an array holding one of these";
  if (v.is_string()) {
    out->prompt_text = v.str();
    return std::nullopt;
  }
  if (!v.is_array()) return InvalidField("prompt", kShape);
  if (v.items().empty()) return InvalidField("prompt", "must not be empty");
  const JsonValue& first = v.items()[0];
  if (first.is_number()) return ParseIds(v, "prompt", vocab_size, &out->prompt_ids);
  // A batch of prompts: only a batch of one is taken (one answer per request here).
  if (v.items().size() > 1) {
    return NotSupported("prompt", "more than one prompt per request (send one request each)");
  }
  if (first.is_string()) {
    out->prompt_text = first.str();
    return std::nullopt;
  }
  if (first.is_array()) return ParseIds(first, "prompt[0]", vocab_size, &out->prompt_ids);
  return InvalidField("prompt[0]", "must be a string or an array of token ids");
}

json CompletionLogprobs(const std::vector<GeneratedToken>& tokens, size_t* offset) {
  json toks = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
  for (const GeneratedToken& t : tokens) {
    toks.push_back(t.bytes);
    lps.push_back(t.logprob);
    json top = json::object();
    for (const auto& [bytes, lp] : t.top) top[bytes] = lp;
    tops.push_back(std::move(top));
    offs.push_back(*offset);
    *offset += t.bytes.size();
  }
  return {{"tokens", std::move(toks)},
          {"token_logprobs", std::move(lps)},
          {"top_logprobs", std::move(tops)},
          {"text_offset", std::move(offs)}};
}

// `cached`: prompt tokens loaded from the kv-store (part of `prompt`, as in OpenAI's usage).
json Usage(uint32_t prompt, uint32_t completion, uint32_t cached) {
  return {{"prompt_tokens", prompt},
          {"completion_tokens", completion},
          {"total_tokens", prompt + completion},
          {"prompt_tokens_details", {{"cached_tokens", std::min(cached, prompt)}}}};
}

// The streamed answer of one choice: a chunk per delta (with the logprobs of the tokens behind
// it), a last chunk with finish_reason, the usage chunk if asked, then [DONE].
class CompletionStreamSink : public GenerationSink {
 public:
  CompletionStreamSink(std::shared_ptr<const CompletionRequest> request,
                       std::shared_ptr<ResponseWriter> writer, std::string id, std::string model,
                       std::string echo)
      : request_(std::move(request)),
        writer_(std::move(writer)),
        id_(std::move(id)),
        model_(std::move(model)),
        echo_(std::move(echo)),
        created_(absl::ToUnixSeconds(absl::Now())) {}

  bool Begin(uint32_t, uint32_t) override { return Start(); }
  bool Tokens(const std::vector<GeneratedToken>& tokens) override {
    pending_.insert(pending_.end(), tokens.begin(), tokens.end());
    return true;
  }
  bool Delta(const chat::StreamDelta& d) override {
    if (d.content.empty()) return true;
    if (!streaming_ && !Start()) return false;
    return writer_->Write(Chunk(d.content, nullptr));
  }
  void Fail(const ApiError& e) override {
    if (!streaming_) {
      writer_->Respond(ErrorResponse(e));
      return;
    }
    writer_->Write("data: " + e.ToJson() + "\n\n");
    writer_->Write("data: [DONE]\n\n");
    writer_->End();
  }
  void Finish(const GenerationOutcome& o) override {
    if (!streaming_ && !Start()) return;
    if (!writer_->Write(Chunk("", o.length ? "length" : "stop"))) return;
    if (request_->include_usage) {
      json c = {{"id", id_},
                {"object", "text_completion"},
                {"created", created_},
                {"model", model_},
                {"choices", json::array()},
                {"usage", Usage(o.prompt_tokens, o.completion_tokens, o.cached_prompt_tokens)}};
      if (!writer_->Write("data: " + Dump(c) + "\n\n")) return;
    }
    writer_->Write("data: [DONE]\n\n");
    writer_->End();
  }

 private:
  bool Start() {
    if (streaming_) return true;
    streaming_ = writer_->BeginStream(200, "text/event-stream");
    if (!streaming_) return false;
    return echo_.empty() || writer_->Write(Chunk(echo_, nullptr, /*with_tokens=*/false));
  }
  std::string Chunk(const std::string& text, json finish, bool with_tokens = true) {
    json logprobs = nullptr;
    if (request_->logprobs && with_tokens) {
      logprobs = CompletionLogprobs(pending_, &offset_);
      pending_.clear();
    }
    json c = {{"id", id_},
              {"object", "text_completion"},
              {"created", created_},
              {"model", model_},
              {"choices", json::array({{{"text", text},
                                        {"index", 0},
                                        {"logprobs", std::move(logprobs)},
                                        {"finish_reason", std::move(finish)}}})}};
    if (request_->include_usage) c["usage"] = nullptr;
    return "data: " + Dump(c) + "\n\n";
  }

  const std::shared_ptr<const CompletionRequest> request_;
  const std::shared_ptr<ResponseWriter> writer_;
  const std::string id_;
  const std::string model_;
  const std::string echo_;
  const int64_t created_;
  bool streaming_ = false;
  std::vector<GeneratedToken> pending_;  // reported by Tokens, not yet in a chunk
  size_t offset_ = 0;                    // text_offset of the next token
};

}  // namespace

uint64_t ChoiceSeed(uint64_t seed, uint32_t index) {
  if (index == 0) return seed;
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * index;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void StartChoices(Generator& core, std::vector<GenerationInput> inputs, const std::string& id,
                  std::shared_ptr<ResponseWriter> writer,
                  std::function<void(std::vector<ChoiceResult>&)> done) {
  auto set = std::make_shared<ChoiceSet>(inputs.size(), writer, std::move(done));
  std::weak_ptr<ChoiceSet> weak = set;
  writer->OnClientGone([weak] {
    if (auto s = weak.lock()) s->Abort();
  });
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (set->gone()) return;
    const std::string seq = inputs.size() == 1 ? id : id + "-" + std::to_string(i);
    core.Start(std::move(inputs[i]), seq, std::make_shared<ChoiceWriter>(set),
               std::make_unique<CollectSink>(set, i));
  }
}

HttpResponse ChoicesAnswer(std::string_view object, const std::string& id, int64_t created,
                           const std::string& model, const std::vector<ChoiceResult>& results,
                           const std::function<json(size_t, const ChoiceResult&)>& choice,
                           const std::function<json(uint32_t, uint32_t, uint32_t)>& usage) {
  json choices = json::array();
  uint32_t prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0;
  for (size_t i = 0; i < results.size(); ++i) {
    prompt_tokens = results[i].prompt_tokens;
    // The choices run at once, so which of them found the prompt stored is a race; the prompt
    // is counted once, with the most any choice loaded.
    cached_tokens = std::max(cached_tokens, results[i].cached_prompt_tokens);
    completion_tokens += results[i].completion_tokens;
    choices.push_back(choice(i, results[i]));
  }
  json body = {{"id", id},
               {"object", object},
               {"created", created},
               {"model", model},
               {"choices", std::move(choices)},
               {"usage", usage(prompt_tokens, completion_tokens, cached_tokens)}};
  HttpResponse r;
  r.body = Dump(body);
  return r;
}

std::optional<ApiError> ParseCompletionRequest(std::string_view text, const ServedModel& served,
                                               int32_t vocab_size, CompletionRequest* out) {
  JsonValue body;
  if (std::optional<ApiError> e = ParseBodyAndModel(text, served, &body, &out->model)) return e;
  const JsonValue* prompt = Field(body, "prompt");
  if (prompt == nullptr) return InvalidField("prompt", "is required");
  if (std::optional<ApiError> e = ParsePrompt(*prompt, vocab_size, out)) return e;
  if (std::optional<ApiError> e = ParseOpenAiSampling(body, out)) return e;
  if (const JsonValue* v = Field(body, "max_tokens")) {
    std::optional<int64_t> i = JsonInteger(*v);
    if (!i || *i < 1 || *i > (int64_t{1} << 31)) {
      return InvalidField("max_tokens", "must be an integer >= 1");
    }
    out->max_tokens = static_cast<uint32_t>(*i);
  }
  if (const JsonValue* v = Field(body, "logprobs")) {
    std::optional<int64_t> i = JsonInteger(*v);
    if (v->is_bool() || !i || *i < 0 || *i > 5) {
      return InvalidField("logprobs", "must be an integer in [0, 5]");
    }
    out->logprobs = static_cast<uint32_t>(*i);
  }
  if (const JsonValue* v = Field(body, "echo")) {
    if (!v->is_bool()) return InvalidField("echo", "must be a boolean");
    out->echo = v->bool_value();
    // The workers report the log-probabilities of generated tokens only.
    if (out->echo && out->logprobs) {
      return NotSupported("echo", "echo together with logprobs (prompt log-probabilities)");
    }
  }
  if (const JsonValue* v = Field(body, "suffix")) {
    if (!v->is_string()) return InvalidField("suffix", "must be a string");
    if (!v->str().empty()) {
      return NotSupported("suffix", "suffix (the model has no fill-in-the-middle format here)");
    }
  }
  if (const JsonValue* v = Field(body, "best_of")) {
    std::optional<int64_t> i = JsonInteger(*v);
    if (!i || *i < 1 || *i > 16) return InvalidField("best_of", "must be an integer in [1, 16]");
    if (*i != out->n) {
      return NotSupported("best_of", "best_of other than n (ranking extra candidates)");
    }
  }
  return std::nullopt;
}

void RunCompletion(Generator& core, std::shared_ptr<const CompletionRequest> request,
                   std::shared_ptr<ResponseWriter> writer) {
  const tokenizer::Tokenizer* tok = core.tokenizer();
  if (tok == nullptr) {
    writer->Respond(ErrorResponse(Unavailable("the gateway has no tokenizer loaded")));
    return;
  }
  std::vector<int32_t> ids = request->prompt_ids;
  std::string echo;
  if (request->prompt_text) {
    // The V4 prompt always starts with BOS (the chat encoder writes it too); the client's text
    // follows as plain text, so a control string in it stays text. Clients that need control
    // tokens send token ids.
    if (std::optional<int32_t> bos = tok->TokenToId(chat::kBos)) ids.push_back(*bos);
    tok->EncodeAppend(*request->prompt_text, /*match_added_tokens=*/false, &ids);
    if (request->echo) echo = *request->prompt_text;
  } else if (request->echo) {
    echo = tok->Decode(ids);
  }
  if (ids.empty()) {
    writer->Respond(ErrorResponse(InvalidField("prompt", "encodes to no token")));
    return;
  }
  const uint32_t context = core.model().context_length;
  if (context > 0 && ids.size() >= context) {
    writer->Respond(ErrorResponse(
        InvalidField("prompt", "the prompt is " + std::to_string(ids.size()) +
                                   " tokens; the model's context is " + std::to_string(context))));
    return;
  }

  GenerationInput base;
  base.prompt_ids = std::move(ids);
  base.raw_text = true;
  base.temperature = request->temperature;
  base.top_p = request->top_p;
  base.top_k = request->top_k;
  base.max_tokens = request->max_tokens;
  base.stop = request->stop;
  base.user = request->user;
  base.logprobs = request->logprobs.has_value();
  base.top_logprobs = request->logprobs.value_or(0);
  const std::string id = NewId("cmpl-");
  const std::string model = core.model().id;

  if (request->stream) {
    base.seed = request->seed;
    core.Start(std::move(base), id, writer,
               std::make_unique<CompletionStreamSink>(request, writer, id, model, echo));
    return;
  }
  std::vector<GenerationInput> inputs(request->n, base);
  for (uint32_t i = 0; i < request->n; ++i) {
    if (request->seed) inputs[i].seed = ChoiceSeed(*request->seed, i);
  }
  const int64_t created = absl::ToUnixSeconds(absl::Now());
  StartChoices(core, std::move(inputs), id, writer,
               [request, writer, id, model, echo, created](std::vector<ChoiceResult>& results) {
                 writer->Respond(ChoicesAnswer(
                     "text_completion", id, created, model, results,
                     [&](size_t i, const ChoiceResult& r) {
                       json logprobs = nullptr;
                       if (request->logprobs) {
                         size_t offset = echo.size();
                         logprobs = CompletionLogprobs(r.tokens, &offset);
                       }
                       return json{{"text", echo + r.text},
                                   {"index", i},
                                   {"logprobs", std::move(logprobs)},
                                   {"finish_reason", r.length ? "length" : "stop"}};
                     },
                     Usage));
               });
}

}  // namespace expertmesh::gateway
