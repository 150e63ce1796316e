// OpenAI's legacy `POST /v1/completions`: a prompt given as text or token ids, completed as
// plain text (no chat template, no chat parsing), answered as `text_completion` objects (one
// body, or SSE chunks then `data: [DONE]`). Also the machinery both OpenAI routes use for
// `n > 1`: n generations run at once and combined into one answer.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gateway/chat_request.h"
#include "gateway/generation.h"
#include "gateway/http_server.h"
#include "nlohmann/json_fwd.hpp"

namespace expertmesh::gateway {

struct CompletionRequest : OpenAiSampling {
  std::string model;
  // Exactly one of the two: text is tokenized as plain text after a BOS (no added-token
  // matching: a control string in the text stays text); ids are sent as they are.
  std::optional<std::string> prompt_text;
  std::vector<int32_t> prompt_ids;
  uint32_t max_tokens = 16;  // OpenAI's default for this API
  // `logprobs: N`: the sampled token's logprob and N alternatives (0..5) per token.
  std::optional<uint32_t> logprobs;
  bool echo = false;  // the prompt's text comes first in `text`
};

// Parses and validates the body. `vocab_size` bounds the token ids of an id prompt (0 = no
// bound). Errors name the field (OpenAI's shape).
std::optional<ApiError> ParseCompletionRequest(std::string_view body, const ServedModel& served,
                                               int32_t vocab_size, CompletionRequest* out);

// Tokenizes the prompt and starts the generation(s); the answer goes through `writer`.
// Returns at once. Thread-safe.
void RunCompletion(Generator& core, std::shared_ptr<const CompletionRequest> request,
                   std::shared_ptr<ResponseWriter> writer);

// --- n > 1 (shared with chat completions) ---

// The seed of choice `index` when the request has `seed`: choice 0 uses it as given (so n = 1
// and the first of n choices agree), choice i > 0 a SplitMix64 mix of (seed, i), so the choices
// differ from each other yet the whole answer is reproducible.
uint64_t ChoiceSeed(uint64_t seed, uint32_t index);

// One finished choice of a combined (non-streamed) answer.
struct ChoiceResult {
  chat::ParsedMessage message;         // the parsed answer (chat)
  std::string text;                    // the content deltas concatenated (plain completions)
  std::vector<GeneratedToken> tokens;  // with GenerationInput.logprobs
  uint32_t prompt_tokens = 0;
  // Of prompt_tokens, those loaded from the kv-store (GenerationOutcome.cached_prompt_tokens).
  uint32_t cached_prompt_tokens = 0;
  uint32_t completion_tokens = 0;
  bool length = false;  // max_tokens or the context ended it
};

// Starts inputs[i] as choice i (sequence `id` for a single choice, `id`-i otherwise), all at
// once. When every choice has finished, `done` runs once (on the thread of the last one) with
// the results in index order and must answer through `writer`. The first failure answers its
// error (OpenAI's shape) and cancels the other choices; a client that hangs up cancels them
// all and nothing is answered.
void StartChoices(Generator& core, std::vector<GenerationInput> inputs, const std::string& id,
                  std::shared_ptr<ResponseWriter> writer,
                  std::function<void(std::vector<ChoiceResult>&)> done);

// The combined answer `done` sends: {id, object, created, model, choices, usage}, choice i made
// by `choice`. One prompt, n completions: usage counts the prompt once (as OpenAI does) and sums
// the completions; the prompt's cached tokens are the most any choice loaded from the kv-store
// (the choices start at once, so which of them hits is a race). `usage(prompt, completion,
// cached)` shapes it.
HttpResponse ChoicesAnswer(
    std::string_view object, const std::string& id, int64_t created, const std::string& model,
    const std::vector<ChoiceResult>& results,
    const std::function<nlohmann::json(size_t, const ChoiceResult&)>& choice,
    const std::function<nlohmann::json(uint32_t, uint32_t, uint32_t)>& usage);

}  // namespace expertmesh::gateway
