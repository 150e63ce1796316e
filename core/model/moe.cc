#include "core/model/moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "core/base/status_macros.h"
#include "core/kernels/matmul.h"

namespace expertmesh::model {

void RunExpert(const ExpertWeights& w, double swiglu_limit, const float* x, int64_t n,
               const float* token_weights, float* out) {
  const int64_t inter = w.w1.rows;
  std::vector<float> g(n * inter), u(n * inter);
  kernels::MatMul(w.w1, x, n, g.data());
  kernels::MatMul(w.w3, x, n, u.data());
  const float lim = static_cast<float>(swiglu_limit);
  for (int64_t t = 0; t < n; ++t) {
    const float tw = token_weights ? token_weights[t] : 1.0f;
    float* gr = g.data() + t * inter;
    const float* ur = u.data() + t * inter;
    for (int64_t i = 0; i < inter; ++i) {
      float gv = gr[i], uv = ur[i];
      if (lim > 0) {
        uv = std::clamp(uv, -lim, lim);
        gv = std::min(gv, lim);
      }
      float silu = gv / (1.0f + std::exp(-gv));
      gr[i] = silu * uv * tw;
    }
  }
  kernels::MatMul(w.w2, g.data(), n, out);
}

namespace {

float Score(ScoringFunc f, float z) {
  switch (f) {
    case ScoringFunc::kSqrtSoftplus: {
      // softplus as torch computes it (linear above 20).
      float sp = z > 20.0f ? z : std::log1p(std::exp(z));
      return std::sqrt(sp);
    }
    case ScoringFunc::kSigmoid:
      return 1.0f / (1.0f + std::exp(-z));
    case ScoringFunc::kSoftmax:
      return z;  // normalized per token below
  }
  return z;
}

}  // namespace

absl::StatusOr<Routing> Route(const ModelConfig& c, const MoeWeights& w, bool hash_layer,
                              const float* x, const int32_t* tokens, int64_t n) {
  const int E = c.n_routed_experts, k = c.num_experts_per_tok;
  std::vector<float> logits(n * E);
  kernels::MatMul(w.gate, x, n, logits.data());
  Routing r;
  r.k = k;
  r.experts.resize(n * k);
  r.weights.resize(n * k);
  std::vector<float> s(E), sel(E);
  std::vector<int> order(E);
  for (int64_t t = 0; t < n; ++t) {
    const float* z = logits.data() + t * E;
    for (int e = 0; e < E; ++e) s[e] = Score(c.scoring_func, z[e]);
    if (c.scoring_func == ScoringFunc::kSoftmax) {
      float m = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (int e = 0; e < E; ++e) sum += (s[e] = std::exp(s[e] - m));
      for (int e = 0; e < E; ++e) s[e] = static_cast<float>(s[e] / sum);
    }
    int* ex = r.experts.data() + t * k;
    if (hash_layer) {
      const int32_t tok = tokens[t];
      if (tok < 0 || tok >= c.vocab_size) {
        return absl::InvalidArgumentError("token id " + std::to_string(tok) + " out of range");
      }
      for (int j = 0; j < k; ++j) {
        int32_t e = w.tid2eid[static_cast<size_t>(tok) * k + j];
        if (e < 0 || e >= E) {
          return absl::InvalidArgumentError("gate.tid2eid[" + std::to_string(tok) +
                                            "] names expert " + std::to_string(e));
        }
        ex[j] = e;
      }
    } else {
      for (int e = 0; e < E; ++e) sel[e] = s[e] + (w.bias.empty() ? 0.0f : w.bias[e]);
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int b) {
        return sel[a] > sel[b] || (sel[a] == sel[b] && a < b);
      });
      for (int j = 0; j < k; ++j) ex[j] = order[j];
    }
    float* wt = r.weights.data() + t * k;
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += (wt[j] = s[ex[j]]);
    const bool normalize = c.scoring_func != ScoringFunc::kSoftmax && c.norm_topk_prob;
    for (int j = 0; j < k; ++j) {
      if (normalize) wt[j] /= sum;
      wt[j] *= static_cast<float>(c.routed_scaling_factor);
    }
  }
  return r;
}

namespace {

// The synchronous executor's dispatch, already complete when Start returns.
class DoneExperts final : public PendingExperts {
 public:
  explicit DoneExperts(ExpertResults r) : r_(std::move(r)) {}
  absl::StatusOr<ExpertResults> Wait() override { return std::move(r_); }

 private:
  ExpertResults r_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<PendingExperts>> ExecutorDispatcher::Start(
    int block, const float* x, int64_t n, int64_t D, std::vector<ExpertWorkItem> items) {
  ExpertResults r;
  r.outputs.resize(items.size());
  std::vector<float> xe;
  for (size_t i = 0; i < items.size(); ++i) {
    const ExpertWorkItem& it = items[i];
    const int64_t m = static_cast<int64_t>(it.rows.size());
    xe.resize(m * D);
    for (int64_t j = 0; j < m; ++j) {
      std::copy(x + it.rows[j] * D, x + (it.rows[j] + 1) * D, xe.data() + j * D);
    }
    r.outputs[i].resize(m * D);
    EM_RETURN_IF_ERROR(
        executor_->Run(block, it.expert, xe.data(), m, it.weights.data(), r.outputs[i].data()));
  }
  return std::unique_ptr<PendingExperts>(new DoneExperts(std::move(r)));
}

absl::Status StartMoe(const ModelConfig& c, int block, const MoeWeights& w, const float* x,
                      const int32_t* tokens, int64_t n, ExpertDispatcher* remote, MoeStep* step) {
  const int64_t D = c.hidden_size;
  EM_ASSIGN_OR_RETURN(Routing r, Route(c, w, c.IsHashLayer(block), x, tokens, n));
  step->block = block;
  step->n = n;
  step->items.clear();
  step->remote_items.clear();
  step->pending.reset();
  // Each expert's rows in token order, so that an expert runs as one GEMM over its rows.
  const int E = c.n_routed_experts;
  std::vector<int> item_of(E, -1);
  std::vector<ExpertWorkItem> by_expert(E);
  for (int64_t t = 0; t < n; ++t) {
    for (int j = 0; j < r.k; ++j) {
      const int e = r.experts[t * r.k + j];
      by_expert[e].rows.push_back(t);
      by_expert[e].weights.push_back(r.weights[t * r.k + j]);
    }
  }
  for (int e = 0; e < E; ++e) {
    if (by_expert[e].rows.empty()) continue;
    by_expert[e].expert = e;
    step->items.push_back(std::move(by_expert[e]));
  }
  step->outputs.assign(step->items.size(), {});
  std::vector<ExpertWorkItem> remote_work;
  for (size_t i = 0; i < step->items.size(); ++i) {
    const int e = step->items[i].expert;
    if (w.experts[e]) continue;
    if (remote == nullptr) {
      return absl::FailedPreconditionError("expert " + std::to_string(e) + " of block " +
                                           std::to_string(block) +
                                           " is not loaded and no expert executor is set");
    }
    step->remote_items.push_back(i);
    remote_work.push_back(step->items[i]);
  }
  // Remote experts first, so that they compute while this process does the shared expert and
  // the local ones.
  if (!remote_work.empty()) {
    EM_ASSIGN_OR_RETURN(step->pending, remote->Start(block, x, n, D, std::move(remote_work)));
  }
  step->shared.assign(n * D, 0.0f);
  if (w.shared) RunExpert(*w.shared, c.swiglu_limit, x, n, nullptr, step->shared.data());
  std::vector<float> xe;
  for (size_t i = 0; i < step->items.size(); ++i) {
    const ExpertWorkItem& it = step->items[i];
    if (!w.experts[it.expert]) continue;
    const int64_t m = static_cast<int64_t>(it.rows.size());
    xe.resize(m * D);
    for (int64_t j = 0; j < m; ++j) {
      std::copy(x + it.rows[j] * D, x + (it.rows[j] + 1) * D, xe.data() + j * D);
    }
    step->outputs[i].resize(m * D);
    RunExpert(*w.experts[it.expert], c.swiglu_limit, xe.data(), m, it.weights.data(),
              step->outputs[i].data());
  }
  return absl::OkStatus();
}

absl::Status FinishMoe(const ModelConfig& c, MoeStep& step, float* out,
                       std::vector<int64_t>* failed_rows, absl::Status* failure) {
  const int64_t D = c.hidden_size, n = step.n;
  std::vector<bool> failed_item(step.items.size(), false);
  if (step.pending) {
    EM_ASSIGN_OR_RETURN(ExpertResults res, step.pending->Wait());
    step.pending.reset();
    if (res.outputs.size() != step.remote_items.size()) {
      return absl::InternalError("expert dispatcher returned " +
                                 std::to_string(res.outputs.size()) + " outputs for " +
                                 std::to_string(step.remote_items.size()) + " experts");
    }
    for (size_t f : res.failed_items) {
      if (f < failed_item.size()) failed_item[step.remote_items[f]] = true;
    }
    if (!res.failed_items.empty()) {
      if (failed_rows == nullptr) return res.error;
      if (failure != nullptr) *failure = res.error;
    }
    for (size_t j = 0; j < step.remote_items.size(); ++j) {
      const size_t i = step.remote_items[j];
      if (failed_item[i]) continue;
      const size_t want = step.items[i].rows.size() * static_cast<size_t>(D);
      if (res.outputs[j].size() != want) {
        return absl::InternalError("expert " + std::to_string(step.items[i].expert) +
                                   " of block " + std::to_string(step.block) + " returned " +
                                   std::to_string(res.outputs[j].size()) + " values, want " +
                                   std::to_string(want));
      }
      step.outputs[i] = std::move(res.outputs[j]);
    }
  }
  // The single process's order: shared expert, then routed experts by ascending id.
  std::copy(step.shared.begin(), step.shared.end(), out);
  for (size_t i = 0; i < step.items.size(); ++i) {
    const ExpertWorkItem& it = step.items[i];
    if (failed_item[i]) {
      for (int64_t row : it.rows) failed_rows->push_back(row);
      continue;
    }
    for (size_t m = 0; m < it.rows.size(); ++m) {
      float* o = out + it.rows[m] * D;
      const float* y = step.outputs[i].data() + m * D;
      for (int64_t j = 0; j < D; ++j) o[j] += y[j];
    }
  }
  if (failed_rows != nullptr) {
    std::sort(failed_rows->begin(), failed_rows->end());
    failed_rows->erase(std::unique(failed_rows->begin(), failed_rows->end()), failed_rows->end());
  }
  (void)n;
  return absl::OkStatus();
}

absl::Status RunMoe(const ModelConfig& c, int block, const MoeWeights& w, const float* x,
                    const int32_t* tokens, int64_t n, ExpertExecutor* remote, float* out) {
  ExecutorDispatcher dispatcher(remote);
  MoeStep step;
  EM_RETURN_IF_ERROR(
      StartMoe(c, block, w, x, tokens, n, remote ? &dispatcher : nullptr, &step));
  return FinishMoe(c, step, out, nullptr, nullptr);
}

}  // namespace expertmesh::model
