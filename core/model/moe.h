// The mixture-of-experts feed-forward of a DeepSeek-V4 block (MODEL.md, MoE): the gate's
// routing, and the SwiGLU expert as a self-contained function so that an expert worker can run
// "expert e of block l on tokens X with routing weights w" for the local engine or a remote one.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
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

// Runs experts that this process does not host, one expert at a time, synchronously (the
// simplest executor: tests, or a caller with no network). Implementations must be
// thread-compatible with one forward pass at a time.
class ExpertExecutor {
 public:
  virtual ~ExpertExecutor() = default;
  // Same contract as RunExpert for expert `expert` of block `block`.
  virtual absl::Status Run(int block, int expert, const float* x, int64_t n,
                           const float* token_weights, float* out) = 0;
};

// The routed work of one expert in one layer's MoE: which rows of the layer's input go to it,
// with their gate weights.
struct ExpertWorkItem {
  int expert = 0;
  std::vector<int64_t> rows;
  std::vector<float> weights;
};

// What an ExpertDispatcher returns for one layer.
struct ExpertResults {
  // outputs[i] is [items[i].rows.size(), D]: RunExpert's output for each row of item i (the gate
  // weight applied inside the expert), never summed across experts: the caller combines every
  // row's experts in ascending expert order, so the sum is independent of placement.
  std::vector<std::vector<float>> outputs;
  // Items that could not be computed anywhere (no live replica within the retry budget). Their
  // rows' sequences must end with `error`; every other row is exact.
  std::vector<size_t> failed_items;
  // UNAVAILABLE naming the missing (layer, expert) pairs when failed_items is non-empty.
  absl::Status error;
};

// A dispatch in flight.
class PendingExperts {
 public:
  virtual ~PendingExperts() = default;
  // Blocks until every item is computed or given up (bounded by the dispatcher's deadlines and
  // retry budget). A non-OK status fails the whole forward pass (e.g. shutting down); items
  // that are unavailable are reported in ExpertResults instead.
  virtual absl::StatusOr<ExpertResults> Wait() = 0;
};

// Computes routed experts elsewhere (expert workers): ONE dispatch per expert worker per layer
// per call, carrying every row that worker's experts need. The forward pass starts it, computes
// the shared expert and the locally hosted experts meanwhile, then waits.
class ExpertDispatcher {
 public:
  virtual ~ExpertDispatcher() = default;
  // Starts computing `items` (ascending expert ids, each with at least one row) of layer
  // `block` on x[n][D]. x is only read during the call. Thread-safe: several passes
  // (micro-batches) may have dispatches in flight at once.
  virtual absl::StatusOr<std::unique_ptr<PendingExperts>> Start(
      int block, const float* x, int64_t n, int64_t D, std::vector<ExpertWorkItem> items) = 0;
};

// Adapts a synchronous ExpertExecutor into a dispatcher (computes in Start).
class ExecutorDispatcher final : public ExpertDispatcher {
 public:
  explicit ExecutorDispatcher(ExpertExecutor* executor) : executor_(executor) {}
  absl::StatusOr<std::unique_ptr<PendingExperts>> Start(int block, const float* x, int64_t n,
                                                        int64_t D,
                                                        std::vector<ExpertWorkItem> items) override;

 private:
  ExpertExecutor* executor_;
};

// One layer's MoE between its start (route, dispatch the remote experts, compute the shared
// and local experts) and its finish (wait, combine).
struct MoeStep {
  int block = 0;
  int64_t n = 0;
  std::vector<ExpertWorkItem> items;           // every routed expert with rows, ascending
  std::vector<std::vector<float>> outputs;     // per item, [rows, D]
  std::vector<size_t> remote_items;            // indices of items sent to the dispatcher
  std::vector<float> shared;                   // [n, D] shared expert output (or zeros)
  std::unique_ptr<PendingExperts> pending;     // null when nothing is remote
};

// Routes x[n][D], starts the remote experts through `remote` (may be null when all are
// local), then computes the shared expert and the local experts. Errors: Route's;
// FailedPrecondition naming the (block, expert) when an expert is neither loaded nor
// reachable; the dispatcher's Start errors.
absl::Status StartMoe(const ModelConfig& config, int block, const MoeWeights& w, const float* x,
                      const int32_t* tokens, int64_t n, ExpertDispatcher* remote, MoeStep* step);

// Waits for the remote experts and writes out[n][D] = shared + the routed experts of each row
// in ascending expert order. Rows whose experts failed get only what was computed and are
// listed in *failed_rows (when failed_rows is null such a failure is returned as the error).
absl::Status FinishMoe(const ModelConfig& config, MoeStep& step, float* out,
                       std::vector<int64_t>* failed_rows, absl::Status* failure);

// MoE output for x[n][D] into out[n][D] (overwritten): StartMoe then FinishMoe, synchronously,
// with a synchronous executor for the experts not loaded here (may be null).
absl::Status RunMoe(const ModelConfig& config, int block, const MoeWeights& w, const float* x,
                    const int32_t* tokens, int64_t n, ExpertExecutor* remote, float* out);

}  // namespace expertmesh::model
