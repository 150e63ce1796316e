// The generation path shared by `POST /v1/chat/completions` and `POST /v1/messages`: V4 chat
// encoding, tokenizing, picking an attention worker (router, by load; or a fixed one), the
// Generate stream, incremental detokenizing, stop strings and the streaming chat parser. Each API
// shapes the answer through a GenerationSink: OpenAI's in gateway/openai_api.h, Anthropic's in
// gateway/messages_api.h.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "absl/time/time.h"
#include "core/chat/parser.h"
#include "core/tokenizer/tokenizer.h"
#include "gateway/chat_request.h"
#include "gateway/http_server.h"
#include "gateway/model_info.h"
#include "grpcpp/channel.h"
#include "nlohmann/json_fwd.hpp"

namespace expertmesh::gateway {

struct GenerationOptions {
  std::string router;            // "host:port"; PickAttentionWorker chooses the worker
  std::string attention_worker;  // fixed worker, used when set (or when there is no router)
  absl::Duration generate_timeout = absl::Minutes(30);  // deadline of one Generate call
  absl::Duration pick_timeout = absl::Seconds(2);
  absl::Duration idle_interval = absl::Seconds(5);  // GenerationSink::Idle while waiting
};

// What one generation runs, whichever API asked for it.
struct GenerationInput {
  std::vector<chat::Message> messages;
  chat::EncodeOptions encode;
  double temperature = 1.0;
  double top_p = 1.0;
  uint32_t top_k = 0;
  std::optional<uint64_t> seed;
  uint32_t max_tokens = 0;  // 0 = until the context is full
  std::vector<std::string> stop;
  // Text the answer is made to begin with: appended to the prompt's tokens and fed to the
  // parser first, as if generated (e.g. the opening of a DSML tool call to force one). Not
  // counted in completion_tokens.
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
  uint32_t completion_tokens = 0;
  std::string stop_sequence;  // the stop string that ended the text, if one did
  bool stopped_by_string = false;
  bool length = false;  // max_tokens (or the context) ended it
  const chat::ParsedMessage* message = nullptr;
};

// Shapes the answer of one API. Called on the generation's thread, in this order: Begin (once,
// at the first token) and Delta..., then exactly one of Fail or Finish (Begin may not have
// happened, e.g. an error before any token or an empty answer). Nothing is called after the
// client hung up.
class GenerationSink {
 public:
  virtual ~GenerationSink() = default;
  // False: the client is gone (the generation is cancelled).
  virtual bool Begin(uint32_t prompt_tokens) = 0;
  virtual bool Delta(const chat::StreamDelta& delta) = 0;
  // With GenerationInput.logprobs: the tokens behind the Delta calls that follow (called before
  // them, in order).
  virtual bool Tokens(const std::vector<GeneratedToken>& tokens) { return true; }
  // Called about every GenerationOptions.idle_interval while no token arrives (before the first
  // token too, after Begin-less waits): e.g. Anthropic's `ping` event. False: the client is gone.
  virtual bool Idle() { return true; }
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

class Generator {
 public:
  // `tokenizer` must outlive this.
  Generator(ModelInfo model, const tokenizer::Tokenizer* tokenizer, GenerationOptions options);

  // The shared core: runs `input` as sequence `id`, reporting to `sink` (blocking). `writer` is
  // watched for a client that hangs up. Thread-safe.
  void Generate(const GenerationInput& input, const std::string& id, ResponseWriter& writer,
                GenerationSink& sink);
  // The prompt's token ids, as Generate would send them; or the error to answer.
  std::optional<ApiError> PromptIds(const GenerationInput& input, std::vector<int32_t>* ids) const;

  const ModelInfo& model() const { return model_; }

 private:
  std::shared_ptr<grpc::Channel> Channel(const std::string& address);
  // The attention worker for a request, or the error to answer (503 with Retry-After).
  std::optional<ApiError> PickWorker(const std::string& tenant, std::string* address);

  const ModelInfo model_;
  const tokenizer::Tokenizer* const tokenizer_;
  const GenerationOptions options_;
  std::optional<int32_t> eos_id_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_;
};

}  // namespace expertmesh::gateway
