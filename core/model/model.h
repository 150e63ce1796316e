// The DeepSeek-V4 forward pass (MODEL.md, Forward pass): embedding, mHC blocks with attention
// (window + compressed entries, indexer) and MoE, the head, and the MTP blocks. A forward pass
// takes a batch of segments (each a run of new tokens of one sequence at that sequence's
// position), so a prefill chunk of T tokens or a decode batch of many sequences runs every
// linear layer as one matrix product over all their tokens.
#pragma once

#include <atomic>
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
  // A segment whose routed experts are unavailable (no live replica) ends with that error in
  // ForwardPass::segment_status() while the other segments go on, exact; otherwise the whole
  // pass fails with it. The failed segments' states are then unusable.
  bool isolate_expert_failures = false;
  // If set, called before each block with the pass's row count (tests and benchmarks use it to
  // add attention-side work; see the attention worker's --inject-attention-delay-us).
  std::function<void(int block, int64_t rows)> before_block;
};

class Model;

// One forward pass over a batch of segments that stops at each layer's MoE while the routed
// experts compute elsewhere: Advance() runs until the pass waits on remote experts, so the
// caller can advance another pass (a micro-batch) meanwhile, ping-pong. Model::Forward is
// BeginForward plus Advance until done. Not thread-safe; the segments' states belong to the
// pass until it is done.
class ForwardPass {
 public:
  ~ForwardPass();
  ForwardPass(const ForwardPass&) = delete;
  ForwardPass& operator=(const ForwardPass&) = delete;

  // Waits for the pending experts (if any), then runs layers until the next remote dispatch is
  // in flight or the pass is done. Errors: the model's; the pass is then dead.
  absl::Status Advance();
  bool done() const;
  // True while remote experts are in flight (the next Advance waits for them).
  bool waiting() const;
  // Logits as Forward returns them; valid once done.
  std::vector<float>& logits();
  // Per segment: OK, or the error that ended it (see isolate_expert_failures).
  const std::vector<absl::Status>& segment_status() const;

 private:
  friend class Model;
  struct State;
  explicit ForwardPass(std::unique_ptr<State> s);
  std::unique_ptr<State> s_;
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

  // Experts not loaded locally run through `executor` (not owned; may be null), one expert at
  // a time, synchronously.
  void set_expert_executor(ExpertExecutor* executor);
  // Experts not loaded locally run through `dispatcher` (not owned; may be null): one dispatch
  // per layer and pass, overlapped with the shared expert. Replaces any executor.
  void set_expert_dispatcher(ExpertDispatcher* dispatcher) { dispatcher_ = dispatcher; }
  // Total time forward passes spent blocked on remote experts (after the shared and local
  // experts were done), in seconds since load: what the network and the expert workers cost
  // beyond the overlap.
  double expert_wait_seconds() const { return expert_wait_ns_.load() * 1e-9; }

  // Runs the trunk over the segments' tokens and returns logits [rows, V] (see ForwardOptions).
  // Errors: InvalidArgument for a token id out of range, an empty segment or a state of another
  // shape; MoE errors. On error the states are unspecified.
  absl::StatusOr<std::vector<float>> Forward(absl::Span<const Segment> segments,
                                             const ForwardOptions& options);

  // Starts a resumable forward pass (see ForwardPass); `options` is copied. Errors: as Forward's
  // argument checks.
  absl::StatusOr<std::unique_ptr<ForwardPass>> BeginForward(absl::Span<const Segment> segments,
                                                            const ForwardOptions& options);

  // MTP block `index`: `segments` hold the NEXT tokens (token t+1 for trunk position t) and
  // advance state->mtp_position; `streams` are the trunk's final streams [N, Hc, D] for the same
  // positions. Returns logits [rows, V] predicting token t+2. Errors as Forward, and
  // FailedPrecondition if the MTP weights were not loaded.
  absl::StatusOr<std::vector<float>> ForwardMtp(int index, absl::Span<const Segment> segments,
                                                const float* streams, bool all_logits);

 private:
  Model(std::unique_ptr<Checkpoint> ckpt, ModelWeights weights);

  friend class ForwardPass;
  struct Batch;     // per-forward token bookkeeping
  struct LayerMoe;  // one block between its MoE start and finish
  absl::Status RunBlock(const BlockWeights& w, Batch& b, std::vector<float>& X);
  absl::Status StartBlock(const BlockWeights& w, Batch& b, std::vector<float>& X, LayerMoe& lm);
  absl::Status FinishBlock(Batch& b, std::vector<float>& X, LayerMoe& lm,
                           std::vector<absl::Status>* segment_status);
  void Attention(const BlockWeights& w, Batch& b, const float* x, float* out);
  std::vector<float> Head(const HcWeights& hc, const std::vector<float>& norm, const Batch& b,
                          const std::vector<float>& X, bool all_logits);

  std::unique_ptr<Checkpoint> ckpt_;
  ModelConfig config_;
  ModelWeights weights_;
  Rope rope_plain_, rope_compressed_;
  std::unique_ptr<ExecutorDispatcher> executor_dispatcher_;
  ExpertDispatcher* dispatcher_ = nullptr;
  std::atomic<int64_t> expert_wait_ns_{0};
};

}  // namespace expertmesh::model
