// The mixture-of-experts feed-forward of a DeepSeek-V4 block (MODEL.md, MoE): the gate's
// routing, and the SwiGLU expert as a self-contained function so that an expert worker can run
// "expert e of block l on tokens X with routing weights w" for the local engine or a remote one.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "core/model/config.h"
#include "core/model/weights.h"

namespace expertmesh::model {

// out[n][D] = w2 (silu(min(w1 x, L)) * clamp(w3 x, -L, L) * token_weight) for each of the n
// rows of x[n][D] (L = swiglu_limit; no clamp when L <= 0). token_weights may be null (1).
// Overwrites out. Thread-safe (reads the weights only).
void RunExpert(const ExpertWeights& w, double swiglu_limit, const float* x, int64_t n,
               const float* token_weights, float* out);

// The routing of n tokens: experts[n*k + j] and weights[n*k + j] (the final weights including
// normalization and routed_scaling_factor).
struct Routing {
  int k = 0;
  std::vector<int> experts;
  std::vector<float> weights;
};

// Computes gate scores from x[n][D] and selects experts (hash layers use tid2eid[token]).
// Errors: InvalidArgument for a token id out of range or a tid2eid entry out of range.
absl::StatusOr<Routing> Route(const ModelConfig& config, const MoeWeights& w, bool hash_layer,
                              const float* x, const int32_t* tokens, int64_t n);

// Runs experts that this process does not host (an expert worker, via RPC). Implementations
// must be thread-compatible with one forward pass at a time.
class ExpertExecutor {
 public:
  virtual ~ExpertExecutor() = default;
  // Same contract as RunExpert for expert `expert` of block `block`.
  virtual absl::Status Run(int block, int expert, const float* x, int64_t n,
                           const float* token_weights, float* out) = 0;
};

// MoE output for x[n][D] into out[n][D] (overwritten): routed experts (local ones directly,
// the others through `remote`, which may be null when all are local) plus the shared expert.
// Errors: Route's; FailedPrecondition naming the (block, expert) when an expert is neither
// loaded nor reachable; the executor's errors.
absl::Status RunMoe(const ModelConfig& config, int block, const MoeWeights& w, const float* x,
                    const int32_t* tokens, int64_t n, ExpertExecutor* remote, float* out);

}  // namespace expertmesh::model
