// The single-process reference engine: a session of sequences over one Model, with prefill
// (whole or chunked), batched decode steps over sequences at different positions, and sampling
// (greedy, or temperature with top-k / top-p and a seed). The cluster is compared against it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/model/model.h"

namespace expertmesh::engine {

struct SamplingParams {
  double temperature = 0.0;  // <= 0: greedy (argmax, ties to the lower id)
  double top_p = 1.0;        // nucleus: smallest set of tokens with probability mass >= top_p
  int top_k = 0;             // 0: no limit
  uint64_t seed = 0;
};

// Sampling is keyed, not streamed (MODEL.md, Batch invariance): every random draw is a pure
// function of (seed, choice index, absolute position of the token being sampled), so a token
// comes out the same whatever else shares the batch, in whatever order sequences are sampled,
// and after a resume or a failover.

// The uniform double in [0, 1) that SampleToken draws for (seed, choice_index, position): a
// counter-based hash (three rounds of a splitmix64-style finalizer), 53 random bits.
double KeyedUniform(uint64_t seed, uint64_t choice_index, int64_t position);

// One token from `logits` [V]: greedy (ArgMax) when p.temperature <= 0; otherwise softmax of
// logits / temperature over the top_k most likely tokens (0 = all; ties: lower id first), cut to
// the smallest prefix with mass >= top_p, renormalized, then inverse-CDF with
// KeyedUniform(p.seed, choice_index, position). `position` is the absolute position the sampled
// token will have in its sequence (the prompt's first token is position 0); choice_index tells
// apart several choices (n > 1) of one request. REQUIRES: logits non-empty.
int32_t SampleToken(absl::Span<const float> logits, const SamplingParams& p, uint64_t choice_index,
                    int64_t position);

// The `n` most likely tokens of the distribution softmax(logits) (the model's own, before
// temperature / top-k / top-p) with their log-probabilities, most likely first (ties: lower id
// first). n is clipped to [0, V]. Computed in double over the logits in index order, so the
// result is deterministic; the values are rounded to float at the end.
std::vector<std::pair<int32_t, float>> TopLogprobs(absl::Span<const float> logits, int n);

// log softmax(logits)[token], computed as TopLogprobs does. REQUIRES: 0 <= token < V.
float TokenLogprob(absl::Span<const float> logits, int32_t token);

// Thin wrapper over SampleToken for code that keeps its params in one place.
class Sampler {
 public:
  explicit Sampler(SamplingParams params) : params_(params) {}
  // The token for absolute position `position` (see SampleToken).
  int32_t Sample(absl::Span<const float> logits, int64_t position,
                 uint64_t choice_index = 0) const {
    return SampleToken(logits, params_, choice_index, position);
  }
  // Keyed by the number of earlier calls to this overload (position 0, 1, 2, ...): for callers
  // that have no position. Prefer the keyed overload.
  int32_t Sample(absl::Span<const float> logits) { return Sample(logits, calls_++); }

 private:
  SamplingParams params_;
  int64_t calls_ = 0;
};

// Greedy choice: the index of the largest logit (the lowest index among equals).
int32_t ArgMax(absl::Span<const float> logits);

using SequenceId = int64_t;

// Not thread-safe: one call at a time.
class Engine {
 public:
  explicit Engine(model::Model* model) : model_(model) {}  // not owned

  SequenceId AddSequence();
  // Adopts a restored state (e.g. from the kv-store).
  SequenceId AddSequence(model::SequenceState state);
  absl::Status RemoveSequence(SequenceId id);
  // Errors: NotFound for an unknown id.
  absl::StatusOr<const model::SequenceState*> State(SequenceId id) const;

  // Feeds `tokens` to sequence `id` in chunks of at most `chunk` tokens (0 = one piece) and
  // returns the logits after the last token [V]. Errors: NotFound, the model's errors.
  absl::StatusOr<std::vector<float>> Prefill(SequenceId id, absl::Span<const int32_t> tokens,
                                             int64_t chunk = 0);

  // One decode step for several sequences at once (each at its own position): feeds tokens[i]
  // to ids[i] in a single batched forward pass and returns logits [ids.size(), V].
  // Errors: InvalidArgument for mismatched sizes or a repeated id; NotFound; the model's.
  absl::StatusOr<std::vector<float>> Decode(absl::Span<const SequenceId> ids,
                                            absl::Span<const int32_t> tokens);

  // One forward pass over several sequences, each with its own run of new tokens (prefill
  // chunks and decode tokens mixed): returns each sequence's last-token logits
  // [ids.size(), V]. Errors: as Decode, and InvalidArgument for an empty run.
  absl::StatusOr<std::vector<float>> Step(absl::Span<const SequenceId> ids,
                                          absl::Span<const absl::Span<const int32_t>> tokens);

  model::Model& model() { return *model_; }

 private:
  absl::StatusOr<model::SequenceState*> Find(SequenceId id);

  model::Model* model_;
  SequenceId next_id_ = 1;
  std::map<SequenceId, std::unique_ptr<model::SequenceState>> seqs_;
};

// Result of Generate.
struct Generation {
  std::vector<int32_t> ids;  // the new tokens
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t prompt_tokens = 0;
};

// Single-sequence generation: prefill `prompt` (in chunks of `chunk`, 0 = one piece), then
// sample up to max_new tokens, stopping after `stop_id` if >= 0. Errors: those of Engine.
absl::StatusOr<Generation> Generate(model::Model& model, absl::Span<const int32_t> prompt,
                                    int64_t max_new, const SamplingParams& params,
                                    int64_t chunk = 0, int32_t stop_id = -1);

}  // namespace expertmesh::engine
