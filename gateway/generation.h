// The generation path shared by `POST /v1/chat/completions` and `POST /v1/messages`: V4 chat
// encoding, tokenizing, picking an attention worker (router, by load; or a fixed one), the
// Generate stream, incremental detokenizing, stop strings and the streaming chat parser. Each API
// shapes the answer through a GenerationSink: OpenAI's in gateway/openai_api.h, Anthropic's in
// gateway/messages_api.h.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <thread>

#include "absl/time/time.h"
#include "core/chat/parser.h"
#include "core/tokenizer/tokenizer.h"
#include "gateway/chat_request.h"
#include "gateway/http_server.h"
#include "gateway/model_info.h"
#include "grpcpp/channel.h"
#include "nlohmann/json_fwd.hpp"

namespace expertmesh::gateway {

struct GatewayMetrics;  // gateway/gateway_metrics.h

struct GenerationOptions {
  std::string router;            // "host:port"; PickAttentionWorker chooses the worker
  std::string attention_worker;  // fixed worker, used when set (or when there is no router)
  // Deadline of the whole generation's Generate calls (resubmits included).
  absl::Duration generate_timeout = absl::Minutes(30);
  absl::Duration pick_timeout = absl::Seconds(2);
  absl::Duration idle_interval = absl::Seconds(5);  // GenerationSink::Idle while waiting
  // Optional (must outlive the Generator): token counts, latencies, active streams, resubmits.
  GatewayMetrics* metrics = nullptr;
  // Failover: a Generate stream that ends retriably (the worker died, stopped or handed the
  // sequence over while draining: UNAVAILABLE, CANCELLED not asked for by the gateway, or
  // ABORTED "resubmit: ...") is resubmitted, at most this many times per generation, to another
  // attention worker the router knows, with the tokens already streamed as
  // SequenceRequest.resumed_tokens; the client's stream goes on as if nothing happened. Only
  // with a router (a fixed attention_worker leaves nowhere to go).
  int max_resubmits = 3;
};

// What one generation runs, whichever API asked for it.
struct GenerationInput {
  std::vector<chat::Message> messages;
  chat::EncodeOptions encode;
  // When set, used as the prompt instead of encoding messages (OpenAI /v1/completions).
  std::vector<int32_t> prompt_ids;
  // A plain text completion (/v1/completions): the generated text goes to StreamDelta.content
  // byte for byte, without the chat parser (no reasoning / tool-call split, no EOS handling).
  bool raw_text = false;
  double temperature = 1.0;
  double top_p = 1.0;
  uint32_t top_k = 0;
  std::optional<uint64_t> seed;
  uint32_t max_tokens = 0;  // 0 = until the context is full
  std::vector<std::string> stop;
  // Text the answer is made to begin with: appended to the prompt's tokens and fed to the
  // parser first, as if generated (e.g. the opening of a DSML tool call to force one). Not
  // counted in completion_tokens (it is in prompt_tokens: the worker receives it as prompt).
  // Tokenized with added-token matching on (DSML markup and `</think>` become their ids, as the
  // model would have generated them): it must not carry client text unchecked. The deltas the
  // parser makes of it go to the sink right after Begin, like generated ones.
  std::string assistant_prefix;
  // Per-token log-probabilities (GenerationSink::Tokens); top_logprobs alternatives each.
  bool logprobs = false;
  uint32_t top_logprobs = 0;
  // Thinking budget (thinking mode only): after this many generated tokens without `</think>`,
  // the attention worker forces `</think>` (SamplingParams.max_thinking_tokens). 0 = none.
  uint32_t max_thinking_tokens = 0;
  std::string user;    // the API's end-user field (OpenAI `user`, Anthropic metadata.user_id)
  std::string tenant;  // from the API key; travels to the router and the attention worker
  // Held until the generation ends (Fail or Finish returned, or the client is gone): e.g. a
  // per-key concurrency slot.
  std::shared_ptr<void> lease;
};

// One generated token as the worker reported it (GenerationInput.logprobs).
struct GeneratedToken {
  int32_t id = 0;
  std::string bytes;  // the token's own bytes (may be part of a UTF-8 character)
  float logprob = 0;
  std::vector<std::pair<std::string, float>> top;  // best first: (token bytes, logprob)
};

struct GenerationOutcome {
  uint32_t prompt_tokens = 0;
  // Of prompt_tokens, those the attention worker loaded from the kv-store instead of computing
  // (its first SequenceTokens message's cached_prompt_tokens).
  uint32_t cached_prompt_tokens = 0;
  uint32_t completion_tokens = 0;
  std::string stop_sequence;  // the stop string that ended the text, if one did
  bool stopped_by_string = false;
  bool length = false;  // max_tokens (or the context) ended it
  const chat::ParsedMessage* message = nullptr;
};

// Shapes the answer of one API. Called on gRPC callback threads (Fail also on Start's caller
// for errors found before any call), one call at a time per generation, in this order: Begin
// (once, at the first token) and Delta..., then exactly one of Fail or Finish (Begin may not
// have happened, e.g. an error before any token or an empty answer). Nothing is called after
// the client hung up. Must not block: ResponseWriter::Write only queues, and the generation
// stops reading from the worker while the writer's queue is over its limit.
class GenerationSink {
 public:
  virtual ~GenerationSink() = default;
  // False: the client is gone (the generation is cancelled). `cached_prompt_tokens`: of the
  // prompt, those the worker loaded from the kv-store (GenerationOutcome.cached_prompt_tokens;
  // known here because Begin waits for the worker's first message).
  virtual bool Begin(uint32_t prompt_tokens, uint32_t cached_prompt_tokens) = 0;
  virtual bool Delta(const chat::StreamDelta& delta) = 0;
  // With GenerationInput.logprobs: the tokens behind the Delta calls that follow (called before
  // them, in order).
  virtual bool Tokens(const std::vector<GeneratedToken>& tokens) { return true; }
  // Called about every GenerationOptions.idle_interval while no token arrives (before the first
  // token too, after Begin-less waits): e.g. Anthropic's `ping` event. False: the client is gone.
  // `prompt_tokens` is the prompt length, so a sink may open its stream before the first token
  // (Anthropic: message_start, then ping); the kv-store hit is not known yet then (it comes with
  // Begin).
  virtual bool Idle(uint32_t prompt_tokens) { return true; }
  virtual void Fail(const ApiError& error) = 0;
  virtual void Finish(const GenerationOutcome& outcome) = 0;
};

// Helpers shared by the API shapes: compact JSON (invalid UTF-8 replaced), a fresh response id
// (`prefix` + 20 hex digits), an error as a whole response in OpenAI's or Anthropic's shape, and
// the 503 (Retry-After: 1) for "no attention worker can take it now".
std::string Dump(const nlohmann::json& j);
std::string NewId(std::string_view prefix);
HttpResponse ErrorResponse(const ApiError& e, bool anthropic = false);
ApiError Unavailable(const std::string& message);

class Generation;  // one running generation (generation.cc)

class Generator {
 public:
  // `tokenizer` must outlive this.
  Generator(ModelInfo model, const tokenizer::Tokenizer* tokenizer, GenerationOptions options);

  // Waits for the generations still running (Drain first to bound the wait).
  ~Generator();

  // The shared core: runs `input` as sequence `id`, reporting to `sink`. Returns at once (it
  // tokenizes on the caller's thread; the router pick and the Generate stream are gRPC callback
  // calls). The generation owns input (input.lease is dropped when it ends), writer and sink
  // until it has called Fail or Finish or the client is gone; a client that hangs up cancels the
  // Generate call at once. Thread-safe.
  void Start(GenerationInput input, std::string id, std::shared_ptr<ResponseWriter> writer,
             std::unique_ptr<GenerationSink> sink);
  // The prompt's token ids (assistant_prefix included), as Start would send them; or the error
  // to answer.
  std::optional<ApiError> PromptIds(const GenerationInput& input, std::vector<int32_t>* ids) const;

  // Graceful shutdown: from now on Start answers 503 (Retry-After); running generations get
  // until `timeout` to finish, then the rest are cancelled with an error (an error chunk/event
  // once streaming, never a silent cut). Returns when none is left running. Thread-safe.
  void Drain(absl::Duration timeout);
  bool draining() const;
  // Generations started and not yet ended.
  size_t running() const;
  // Returns once no generation is running (each ends by itself, by its client leaving, or by
  // its deadline).
  void WaitIdle() const;

  const ModelInfo& model() const { return model_; }
  // Null when the gateway runs without a tokenizer.
  const tokenizer::Tokenizer* tokenizer() const { return tokenizer_; }
  // Generate calls resubmitted to another attention worker (failover) so far.
  int64_t resubmits() const { return resubmits_.load(); }

 private:
  friend class Generation;
  std::shared_ptr<grpc::Channel> Channel(const std::string& address);
  bool Register(Generation* g);  // false while draining
  void Unregister(Generation* g);
  void Tick();  // the idle ticker thread

  const ModelInfo model_;
  const tokenizer::Tokenizer* const tokenizer_;
  const GenerationOptions options_;
  std::optional<int32_t> eos_id_;
  std::optional<int32_t> think_end_id_;
  mutable std::mutex mu_;
  mutable std::condition_variable idle_;  // signalled when `live_` empties
  std::condition_variable tick_;  // wakes the ticker to stop
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_;
  std::set<Generation*> live_;
  bool stopping_ = false;   // ends the ticker
  std::thread ticker_;      // GenerationSink::Idle for every live generation
  bool draining_ = false;
  std::atomic<int64_t> resubmits_{0};
};

}  // namespace expertmesh::gateway
