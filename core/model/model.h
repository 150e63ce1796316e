// The DeepSeek-V4 forward pass (MODEL.md, Forward pass): embedding, mHC blocks with attention
// (window + compressed entries, indexer) and MoE, the head, and the MTP blocks. A forward pass
// takes a batch of segments (each a run of new tokens of one sequence at that sequence's
// position), so a prefill chunk of T tokens or a decode batch of many sequences runs every
// linear layer as one matrix product over all their tokens.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/model/checkpoint.h"
#include "core/model/config.h"
#include "core/model/moe.h"
#include "core/model/ops.h"
#include "core/model/sequence_state.h"
#include "core/model/weights.h"

namespace expertmesh::model {

// New tokens of one sequence; they take positions state->position, state->position + 1, ...
// and the state advances by tokens.size().
struct Segment {
  SequenceState* state = nullptr;
  absl::Span<const int32_t> tokens;
};

struct ForwardOptions {
  // All tokens' logits (rows in segment order), or only each segment's last token's.
  bool all_logits = false;
  // If set, receives the final residual streams [N, Hc, D] (before the head), e.g. for MTP.
  std::vector<float>* final_streams = nullptr;
  // If set, called after each trunk layer with its output streams [N, Hc, D].
  std::function<void(int layer, const float* streams, int64_t n)> layer_out;
};

// Thread-compatible: concurrent Forward calls must use disjoint states; the weights are shared
// read-only.
class Model {
 public:
  // Opens the checkpoint in `dir` and maps the weights (see LoadOptions).
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     const LoadOptions& options = {});

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  SequenceState NewState() const { return SequenceState::Create(config_); }

  // Experts not loaded locally run through `executor` (not owned; may be null).
  void set_expert_executor(ExpertExecutor* executor) { remote_ = executor; }

  // Runs the trunk over the segments' tokens and returns logits [rows, V] (see ForwardOptions).
  // Errors: InvalidArgument for a token id out of range, an empty segment or a state of another
  // shape; MoE errors. On error the states are unspecified.
  absl::StatusOr<std::vector<float>> Forward(absl::Span<const Segment> segments,
                                             const ForwardOptions& options);

  // MTP block `index`: `segments` hold the NEXT tokens (token t+1 for trunk position t) and
  // advance state->mtp_position; `streams` are the trunk's final streams [N, Hc, D] for the same
  // positions. Returns logits [rows, V] predicting token t+2. Errors as Forward, and
  // FailedPrecondition if the MTP weights were not loaded.
  absl::StatusOr<std::vector<float>> ForwardMtp(int index, absl::Span<const Segment> segments,
                                                const float* streams, bool all_logits);

 private:
  Model(std::unique_ptr<Checkpoint> ckpt, ModelWeights weights);

  struct Batch;  // per-forward token bookkeeping
  absl::Status RunBlock(const BlockWeights& w, Batch& b, std::vector<float>& X);
  void Attention(const BlockWeights& w, Batch& b, const float* x, float* out);
  std::vector<float> Head(const HcWeights& hc, const std::vector<float>& norm, const Batch& b,
                          const std::vector<float>& X, bool all_logits);

  std::unique_ptr<Checkpoint> ckpt_;
  ModelConfig config_;
  ModelWeights weights_;
  Rope rope_plain_, rope_compressed_;
  ExpertExecutor* remote_ = nullptr;
};

}  // namespace expertmesh::model
