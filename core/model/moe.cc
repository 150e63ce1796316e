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

absl::Status RunMoe(const ModelConfig& c, int block, const MoeWeights& w, const float* x,
                    const int32_t* tokens, int64_t n, ExpertExecutor* remote, float* out) {
  const int64_t D = c.hidden_size;
  EM_ASSIGN_OR_RETURN(Routing r, Route(c, w, c.IsHashLayer(block), x, tokens, n));
  if (w.shared) {
    RunExpert(*w.shared, c.swiglu_limit, x, n, nullptr, out);
  } else {
    std::fill(out, out + n * D, 0.0f);
  }
  // Group tokens by expert so that each expert runs as one GEMM over its tokens.
  const int E = c.n_routed_experts;
  std::vector<std::vector<int64_t>> rows(E);
  std::vector<std::vector<float>> wts(E);
  for (int64_t t = 0; t < n; ++t) {
    for (int j = 0; j < r.k; ++j) {
      rows[r.experts[t * r.k + j]].push_back(t);
      wts[r.experts[t * r.k + j]].push_back(r.weights[t * r.k + j]);
    }
  }
  std::vector<float> xe, ye;
  for (int e = 0; e < E; ++e) {
    const int64_t m = static_cast<int64_t>(rows[e].size());
    if (m == 0) continue;
    xe.resize(m * D);
    ye.resize(m * D);
    for (int64_t i = 0; i < m; ++i) {
      std::copy(x + rows[e][i] * D, x + (rows[e][i] + 1) * D, xe.data() + i * D);
    }
    if (w.experts[e]) {
      RunExpert(*w.experts[e], c.swiglu_limit, xe.data(), m, wts[e].data(), ye.data());
    } else if (remote) {
      EM_RETURN_IF_ERROR(remote->Run(block, e, xe.data(), m, wts[e].data(), ye.data()));
    } else {
      return absl::FailedPreconditionError("expert " + std::to_string(e) + " of block " +
                                           std::to_string(block) +
                                           " is not loaded and no expert executor is set");
    }
    for (int64_t i = 0; i < m; ++i) {
      float* o = out + rows[e][i] * D;
      const float* y = ye.data() + i * D;
      for (int64_t j = 0; j < D; ++j) o[j] += y[j];
    }
  }
  return absl::OkStatus();
}

}  // namespace expertmesh::model
