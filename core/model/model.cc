#include "core/model/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include "core/base/status_macros.h"
#include "core/kernels/matmul.h"
#include "core/kernels/thread_pool.h"
#include "core/model/quantize.h"

namespace expertmesh::model {
namespace {

using kernels::MatMul;
using kernels::WeightMatrix;

// Dot product with 8 independent partial sums, which the compiler keeps in vector registers.
float Dot(const float* a, const float* b, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Scratch buffers.
std::vector<float> Buf(int64_t n) { return std::vector<float>(static_cast<size_t>(n)); }

}  // namespace

struct Model::Batch {
  struct Seg {
    SequenceState* state;
    int64_t begin;  // first row in the batch
    int64_t count;
    int64_t p0;  // position of the first token
  };
  int64_t n = 0;
  std::vector<int32_t> tokens;
  std::vector<int64_t> pos;
  std::vector<size_t> seg_of;  // segment index of each row
  std::vector<Seg> segs;
};

Model::Model(std::unique_ptr<Checkpoint> ckpt, ModelWeights weights)
    : ckpt_(std::move(ckpt)),
      config_(ckpt_->config()),
      weights_(std::move(weights)),
      rope_plain_(config_, false),
      rope_compressed_(config_, true) {}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   const LoadOptions& options) {
  EM_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(dir));
  EM_ASSIGN_OR_RETURN(ModelWeights w, LoadModelWeights(*ckpt, options));
  return std::unique_ptr<Model>(new Model(std::move(ckpt), std::move(w)));
}

namespace {

struct HcOut {
  std::vector<float> y;     // [N, D]
  std::vector<float> post;  // [N, Hc]
  std::vector<float> comb;  // [N, Hc, Hc]
};

// hc_pre (MODEL.md, Block): mixing weights from the streams X [N, Hc, D].
HcOut HcPre(const ModelConfig& c, const HcWeights& w, const float* X, int64_t n) {
  const int Hc = c.hc_mult;
  const int64_t D = c.hidden_size;
  const int M = (2 + Hc) * Hc;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float hc_eps = static_cast<float>(c.hc_eps);
  std::vector<float> mix = Buf(n * M);
  MatMul(w.fn, X, n, mix.data());
  HcOut o{Buf(n * D), Buf(n * Hc), Buf(n * Hc * Hc)};
  std::vector<float> pre(Hc);
  for (int64_t t = 0; t < n; ++t) {
    const float* xs = X + t * Hc * D;
    float* m = mix.data() + t * M;
    const float s = RmsScale(xs, Hc * D, eps);
    for (int i = 0; i < M; ++i) m[i] *= s;
    for (int j = 0; j < Hc; ++j) {
      pre[j] = Sigmoid(m[j] * w.scale[0] + w.base[j]) + hc_eps;
      o.post[t * Hc + j] = 2.0f * Sigmoid(m[Hc + j] * w.scale[1] + w.base[Hc + j]);
    }
    float* cm = o.comb.data() + t * Hc * Hc;
    for (int a = 0; a < Hc; ++a) {
      float* row = cm + a * Hc;
      float mx = -std::numeric_limits<float>::infinity();
      for (int b = 0; b < Hc; ++b) {
        row[b] = m[2 * Hc + a * Hc + b] * w.scale[2] + w.base[2 * Hc + a * Hc + b];
        mx = std::max(mx, row[b]);
      }
      float sum = 0.0f;
      for (int b = 0; b < Hc; ++b) sum += (row[b] = std::exp(row[b] - mx));
      for (int b = 0; b < Hc; ++b) row[b] = row[b] / sum + hc_eps;
    }
    auto norm_cols = [&] {
      for (int b = 0; b < Hc; ++b) {
        float sum = 0.0f;
        for (int a = 0; a < Hc; ++a) sum += cm[a * Hc + b];
        for (int a = 0; a < Hc; ++a) cm[a * Hc + b] /= (sum + hc_eps);
      }
    };
    norm_cols();
    for (int it = 1; it < c.hc_sinkhorn_iters; ++it) {
      for (int a = 0; a < Hc; ++a) {
        float sum = 0.0f;
        for (int b = 0; b < Hc; ++b) sum += cm[a * Hc + b];
        for (int b = 0; b < Hc; ++b) cm[a * Hc + b] /= (sum + hc_eps);
      }
      norm_cols();
    }
    float* y = o.y.data() + t * D;
    for (int64_t i = 0; i < D; ++i) {
      float acc = 0.0f;
      for (int j = 0; j < Hc; ++j) acc += pre[j] * xs[j * D + i];
      y[i] = acc;
    }
  }
  return o;
}

// hc_post: X[b] = post[b] * f + sum_a comb[a][b] * X[a], in place.
void HcPost(const ModelConfig& c, const HcOut& h, const float* f, int64_t n, float* X) {
  const int Hc = c.hc_mult;
  const int64_t D = c.hidden_size;
  std::vector<float> old(Hc * D);
  for (int64_t t = 0; t < n; ++t) {
    float* xs = X + t * Hc * D;
    std::copy(xs, xs + Hc * D, old.begin());
    const float* cm = h.comb.data() + t * Hc * Hc;
    const float* ft = f + t * D;
    for (int b = 0; b < Hc; ++b) {
      const float p = h.post[t * Hc + b];
      for (int64_t i = 0; i < D; ++i) {
        float acc = p * ft[i];
        for (int a = 0; a < Hc; ++a) acc += cm[a * Hc + b] * old[a * D + i];
        xs[b * D + i] = acc;
      }
    }
  }
}

// Feeds one token's compressor rows (a = wkv x, g = wgate x + ape) at position `pos`; when the
// token completes a window, appends the new entry to `entries` (MODEL.md, Compressor).
void CompressorStep(const ModelConfig& c, const CompressorWeights& w, const Rope& rope,
                    CompressorState& st, int64_t pos, const float* a, const float* g,
                    std::vector<float>& entries) {
  const int ratio = w.ratio, width = w.width, row = w.coff * width;
  const int slot = static_cast<int>(pos % ratio);
  std::copy(a, a + row, st.a.begin() + slot * row);
  std::copy(g, g + row, st.g.begin() + slot * row);
  if ((pos + 1) % ratio != 0) return;
  const int64_t m = (pos + 1) / ratio - 1;
  std::vector<float> e(width);
  const bool overlap = w.coff == 2;
  const bool have_prev = overlap && m > 0;
  for (int i = 0; i < width; ++i) {
    float mx = -std::numeric_limits<float>::infinity();
    const int off = overlap ? width : 0;  // the current window's half
    for (int s = 0; s < ratio; ++s) mx = std::max(mx, st.g[s * row + off + i]);
    if (have_prev) {
      for (int s = 0; s < ratio; ++s) mx = std::max(mx, st.prev_g[s * row + i]);
    }
    float den = 0.0f, num = 0.0f;
    for (int s = 0; s < ratio; ++s) {
      float p = std::exp(st.g[s * row + off + i] - mx);
      den += p;
      num += p * st.a[s * row + off + i];
    }
    if (have_prev) {
      for (int s = 0; s < ratio; ++s) {
        float p = std::exp(st.prev_g[s * row + i] - mx);
        den += p;
        num += p * st.prev_a[s * row + i];
      }
    }
    e[i] = num / den;
  }
  RmsNorm(e.data(), w.norm.data(), width, static_cast<float>(c.rms_norm_eps), e.data());
  const int r = rope.rope_dim();
  std::vector<float> cs(r / 2), sn(r / 2);
  rope.Angles(m * ratio, cs.data(), sn.data());
  rope.Apply(e.data() + width - r, cs.data(), sn.data(), false);
  if (w.rotate) {
    HadamardTransform(e.data(), width);
    RoundFp4Blocks(e.data(), width);
  } else {
    RoundFp8Blocks(e.data(), width - r);
  }
  entries.insert(entries.end(), e.begin(), e.end());
  if (overlap) {
    st.prev_a = st.a;
    st.prev_g = st.g;
  }
}

}  // namespace

void Model::Attention(const BlockWeights& bw, Batch& b, const float* x, float* out) {
  const ModelConfig& c = config_;
  const AttentionWeights& w = bw.attn;
  const int64_t n = b.n;
  const int H = c.num_attention_heads, d = c.head_dim, r = c.qk_rope_head_dim;
  const int Q = c.q_lora_rank, G = c.o_groups, R = c.o_lora_rank, W = c.sliding_window;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const Rope& rope = w.ratio > 0 ? rope_compressed_ : rope_plain_;

  // Projections for all tokens at once.
  std::vector<float> qr = Buf(n * Q);
  MatMul(w.wq_a, x, n, qr.data());
  for (int64_t t = 0; t < n; ++t) RmsNorm(&qr[t * Q], w.q_norm.data(), Q, eps, &qr[t * Q]);
  std::vector<float> q = Buf(n * H * d);
  MatMul(w.wq_b, qr.data(), n, q.data());
  std::vector<float> kv = Buf(n * d);
  MatMul(w.wkv, x, n, kv.data());
  std::vector<float> cs(r / 2), sn(r / 2);
  for (int64_t t = 0; t < n; ++t) {
    rope.Angles(b.pos[t], cs.data(), sn.data());
    for (int h = 0; h < H; ++h) {
      float* qh = &q[(t * H + h) * d];
      RmsNorm(qh, nullptr, d, eps, qh);
      rope.Apply(qh + d - r, cs.data(), sn.data(), false);
    }
    float* k = &kv[t * d];
    RmsNorm(k, w.kv_norm.data(), d, eps, k);
    rope.Apply(k + d - r, cs.data(), sn.data(), false);
    RoundFp8Blocks(k, d - r);
  }

  // Compressor and indexer inputs.
  std::vector<float> ca, cg, ia, ig, iq, iw;
  const int Id = c.index_head_dim, IH = c.index_n_heads;
  auto compressor_rows = [&](const CompressorWeights& cw, std::vector<float>& a,
                             std::vector<float>& g) {
    const int row = cw.coff * cw.width;
    a = Buf(n * row);
    g = Buf(n * row);
    MatMul(cw.wkv, x, n, a.data());
    MatMul(cw.wgate, x, n, g.data());
    for (int64_t t = 0; t < n; ++t) {
      const float* ape = &cw.ape[(b.pos[t] % cw.ratio) * row];
      for (int i = 0; i < row; ++i) g[t * row + i] += ape[i];
    }
  };
  if (w.compressor) compressor_rows(*w.compressor, ca, cg);
  if (w.indexer) {
    compressor_rows(w.indexer->compressor, ia, ig);
    iq = Buf(n * IH * Id);
    MatMul(w.indexer->wq_b, qr.data(), n, iq.data());
    for (int64_t t = 0; t < n; ++t) {
      rope.Angles(b.pos[t], cs.data(), sn.data());
      for (int h = 0; h < IH; ++h) {
        float* qh = &iq[(t * IH + h) * Id];
        rope.Apply(qh + Id - r, cs.data(), sn.data(), false);
        HadamardTransform(qh, Id);
        RoundFp4Blocks(qh, Id);
      }
    }
    iw = Buf(n * IH);
    MatMul(w.indexer->weights_proj, x, n, iw.data());
    const float ws = 1.0f / std::sqrt(static_cast<float>(Id) * static_cast<float>(IH));
    for (float& v : iw) v *= ws;
  }

  std::vector<float> o = Buf(n * H * d);
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(d));
  const size_t nseg = b.segs.size();
  std::vector<std::vector<const float*>> wins(nseg);  // wins[s][p - win_lo[s]]
  std::vector<int64_t> win_lo(nseg);
  for (size_t si = 0; si < nseg; ++si) {
    const Batch::Seg& sg = b.segs[si];
    BlockState& st = sg.state->blocks[bw.block];
    // Compressors first: entries completed inside the chunk are visible to later tokens.
    if (w.compressor) {
      const int row = w.compressor->coff * w.compressor->width;
      for (int64_t i = 0; i < sg.count; ++i) {
        const int64_t t = sg.begin + i;
        CompressorStep(c, *w.compressor, rope, st.compressor, b.pos[t], &ca[t * row], &cg[t * row],
                       st.compressed);
      }
    }
    if (w.indexer) {
      const CompressorWeights& icw = w.indexer->compressor;
      const int row = icw.coff * icw.width;
      for (int64_t i = 0; i < sg.count; ++i) {
        const int64_t t = sg.begin + i;
        CompressorStep(c, icw, rope, st.index_compressor, b.pos[t], &ia[t * row], &ig[t * row],
                       st.index_keys);
      }
    }
    // Window keys: the ring's positions before the chunk, then the chunk's own.
    const int64_t lo = std::max<int64_t>(0, sg.p0 - (W - 1));
    win_lo[si] = lo;
    for (int64_t p = lo; p < sg.p0; ++p) wins[si].push_back(&st.window[(p % W) * d]);
    for (int64_t i = 0; i < sg.count; ++i) wins[si].push_back(&kv[(sg.begin + i) * d]);
  }

  // Tokens are independent from here on (the state is only read): spread them over the
  // kernel threads, each with its own scratch.
  kernels::ParallelFor(n, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> sel;
    std::vector<float> scores, idx_scores;
    std::vector<int64_t> order;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = b.pos[t];
      const size_t si = b.seg_of[t];
      const BlockState& st = b.segs[si].state->blocks[bw.block];
      const int64_t lo = win_lo[si];
      const std::vector<const float*>& win = wins[si];
      sel.clear();
      for (int64_t wp = std::max<int64_t>(lo, p - W + 1); wp <= p; ++wp) {
        sel.push_back(win[wp - lo]);
      }
      if (w.ratio > 0) {
        const int64_t visible = (p + 1) / w.ratio;
        if (w.indexer && visible > c.index_topk) {
          idx_scores.assign(visible, 0.0f);
          for (int64_t m = 0; m < visible; ++m) {
            const float* km = &st.index_keys[m * Id];
            float s = 0.0f;
            for (int h = 0; h < IH; ++h) {
              const float dot = Dot(&iq[(t * IH + h) * Id], km, Id);
              s += iw[t * IH + h] * std::max(dot, 0.0f);
            }
            idx_scores[m] = s;
          }
          order.resize(visible);
          std::iota(order.begin(), order.end(), 0);
          std::partial_sort(order.begin(), order.begin() + c.index_topk, order.end(),
                            [&](int64_t a, int64_t bb) {
                              return idx_scores[a] > idx_scores[bb] ||
                                     (idx_scores[a] == idx_scores[bb] && a < bb);
                            });
          for (int j = 0; j < c.index_topk; ++j) sel.push_back(&st.compressed[order[j] * d]);
        } else {
          for (int64_t m = 0; m < visible; ++m) sel.push_back(&st.compressed[m * d]);
        }
      }
      scores.resize(sel.size());
      for (int h = 0; h < H; ++h) {
        const float* qh = &q[(t * H + h) * d];
        float mx = -std::numeric_limits<float>::infinity();
        for (size_t j = 0; j < sel.size(); ++j) {
          scores[j] = Dot(qh, sel[j], d) * inv_sqrt_d;
          mx = std::max(mx, scores[j]);
        }
        float den = std::exp(w.attn_sink[h] - mx);
        for (size_t j = 0; j < sel.size(); ++j) den += (scores[j] = std::exp(scores[j] - mx));
        float* oh = &o[(t * H + h) * d];
        std::fill(oh, oh + d, 0.0f);
        for (size_t j = 0; j < sel.size(); ++j) {
          const float pj = scores[j] / den;
          const float* v = sel[j];
          for (int k = 0; k < d; ++k) oh[k] += pj * v[k];
        }
      }
    }
  });
  for (const Batch::Seg& sg : b.segs) {
    BlockState& st = sg.state->blocks[bw.block];
    // The ring keeps the last W positions.
    for (int64_t i = std::max<int64_t>(0, sg.count - W); i < sg.count; ++i) {
      const int64_t p = sg.p0 + i;
      std::copy(&kv[(sg.begin + i) * d], &kv[(sg.begin + i + 1) * d], &st.window[(p % W) * d]);
    }
  }

  // Inverse RoPE on the outputs, then the grouped output projection.
  for (int64_t t = 0; t < n; ++t) {
    rope.Angles(b.pos[t], cs.data(), sn.data());
    for (int h = 0; h < H; ++h) rope.Apply(&o[(t * H + h) * d] + d - r, cs.data(), sn.data(), true);
  }
  const int64_t gin = static_cast<int64_t>(H) * d / G;
  std::vector<float> xg = Buf(n * gin), z = Buf(n * G * R), full;
  for (int g = 0; g < G; ++g) {
    for (int64_t t = 0; t < n; ++t) {
      std::copy(&o[t * H * d + g * gin], &o[t * H * d + (g + 1) * gin], &xg[t * gin]);
    }
    WeightMatrix sub;
    std::vector<float> zg = Buf(n * R);
    if (SliceRows(w.wo_a, static_cast<int64_t>(g) * R, R, &sub)) {
      MatMul(sub, xg.data(), n, zg.data());
    } else {
      full = Buf(n * G * R);
      MatMul(w.wo_a, xg.data(), n, full.data());
      for (int64_t t = 0; t < n; ++t) {
        std::copy(&full[t * G * R + g * R], &full[t * G * R + (g + 1) * R], &zg[t * R]);
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      std::copy(&zg[t * R], &zg[(t + 1) * R], &z[t * G * R + g * R]);
    }
  }
  MatMul(w.wo_b, z.data(), n, out);
}

struct Model::LayerMoe {
  HcOut h;
  MoeStep step;
  std::vector<float> f;
};

void Model::set_expert_executor(ExpertExecutor* executor) {
  executor_dispatcher_ = executor ? std::make_unique<ExecutorDispatcher>(executor) : nullptr;
  dispatcher_ = executor_dispatcher_.get();
}

absl::Status Model::StartBlock(const BlockWeights& w, Batch& b, std::vector<float>& X,
                               LayerMoe& lm) {
  const ModelConfig& c = config_;
  const int64_t n = b.n, D = c.hidden_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  lm.f = Buf(n * D);
  {
    HcOut h = HcPre(c, w.hc_attn, X.data(), n);
    for (int64_t t = 0; t < n; ++t) RmsNorm(&h.y[t * D], w.attn_norm.data(), D, eps, &h.y[t * D]);
    Attention(w, b, h.y.data(), lm.f.data());
    HcPost(c, h, lm.f.data(), n, X.data());
  }
  lm.h = HcPre(c, w.hc_ffn, X.data(), n);
  for (int64_t t = 0; t < n; ++t) {
    RmsNorm(&lm.h.y[t * D], w.ffn_norm.data(), D, eps, &lm.h.y[t * D]);
  }
  return StartMoe(c, w.block, w.moe, lm.h.y.data(), b.tokens.data(), n, dispatcher_, &lm.step);
}

absl::Status Model::FinishBlock(Batch& b, std::vector<float>& X, LayerMoe& lm,
                                std::vector<absl::Status>* segment_status) {
  std::vector<int64_t> failed_rows;
  absl::Status failure;
  const bool remote = lm.step.pending != nullptr;
  const auto t0 = std::chrono::steady_clock::now();
  absl::Status st = FinishMoe(config_, lm.step, lm.f.data(),
                              segment_status ? &failed_rows : nullptr, &failure);
  if (remote) {
    expert_wait_ns_.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::steady_clock::now() - t0)
                                  .count());
  }
  EM_RETURN_IF_ERROR(st);
  for (int64_t row : failed_rows) {
    absl::Status& st = (*segment_status)[b.seg_of[row]];
    if (st.ok()) st = failure;
  }
  HcPost(config_, lm.h, lm.f.data(), b.n, X.data());
  return absl::OkStatus();
}

absl::Status Model::RunBlock(const BlockWeights& w, Batch& b, std::vector<float>& X) {
  LayerMoe lm;
  EM_RETURN_IF_ERROR(StartBlock(w, b, X, lm));
  return FinishBlock(b, X, lm, nullptr);
}

std::vector<float> Model::Head(const HcWeights& hc, const std::vector<float>& norm, const Batch& b,
                               const std::vector<float>& X, bool all_logits) {
  const ModelConfig& c = config_;
  const int Hc = c.hc_mult;
  const int64_t D = c.hidden_size, V = c.vocab_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  std::vector<int64_t> rows;
  if (all_logits) {
    rows.resize(b.n);
    std::iota(rows.begin(), rows.end(), 0);
  } else {
    for (const Batch::Seg& s : b.segs) rows.push_back(s.begin + s.count - 1);
  }
  const int64_t m = static_cast<int64_t>(rows.size());
  std::vector<float> xs = Buf(m * Hc * D);
  for (int64_t i = 0; i < m; ++i) {
    std::copy(&X[rows[i] * Hc * D], &X[(rows[i] + 1) * Hc * D], &xs[i * Hc * D]);
  }
  std::vector<float> mix = Buf(m * Hc), y = Buf(m * D);
  MatMul(hc.fn, xs.data(), m, mix.data());
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = &xs[i * Hc * D];
    const float s = RmsScale(xi, Hc * D, eps);
    float* yi = &y[i * D];
    for (int j = 0; j < Hc; ++j) {
      const float pre =
          Sigmoid(mix[i * Hc + j] * s * hc.scale[0] + hc.base[j]) + static_cast<float>(c.hc_eps);
      for (int64_t k = 0; k < D; ++k) yi[k] += pre * xi[j * D + k];
    }
    RmsNorm(yi, norm.data(), D, eps, yi);
  }
  std::vector<float> logits = Buf(m * V);
  MatMul(weights_.head, y.data(), m, logits.data());
  return logits;
}

namespace {

absl::Status CheckSegments(const ModelConfig& c, absl::Span<const Segment> segments) {
  if (segments.empty()) return absl::InvalidArgumentError("forward: no segments");
  for (size_t i = 0; i < segments.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (segments[i].state == segments[j].state) {
        return absl::InvalidArgumentError("forward: a sequence state appears in two segments");
      }
    }
  }
  for (const Segment& s : segments) {
    if (s.state == nullptr || s.tokens.empty()) {
      return absl::InvalidArgumentError("forward: a segment has no state or no tokens");
    }
    if (static_cast<int>(s.state->blocks.size()) != c.NumBlocks()) {
      return absl::InvalidArgumentError("forward: sequence state has " +
                                        std::to_string(s.state->blocks.size()) +
                                        " blocks, the model " + std::to_string(c.NumBlocks()));
    }
    for (int32_t tok : s.tokens) {
      if (tok < 0 || tok >= c.vocab_size) {
        return absl::InvalidArgumentError("forward: token id " + std::to_string(tok) +
                                          " out of range [0, " + std::to_string(c.vocab_size) +
                                          ")");
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

struct ForwardPass::State {
  Model* model = nullptr;
  std::vector<Segment> segments;
  ForwardOptions options;
  Model::Batch b;
  std::vector<float> X;
  size_t layer = 0;          // next block to start (or the one waiting)
  bool waiting = false;      // block `layer` is between StartBlock and FinishBlock
  bool done = false;
  bool dead = false;
  Model::LayerMoe lm;
  std::vector<float> logits;
  std::vector<absl::Status> segment_status;
};

ForwardPass::ForwardPass(std::unique_ptr<State> s) : s_(std::move(s)) {}
ForwardPass::~ForwardPass() = default;
bool ForwardPass::done() const { return s_->done; }
bool ForwardPass::waiting() const { return s_->waiting; }
std::vector<float>& ForwardPass::logits() { return s_->logits; }
const std::vector<absl::Status>& ForwardPass::segment_status() const {
  return s_->segment_status;
}

absl::Status ForwardPass::Advance() {
  State& s = *s_;
  if (s.done) return absl::OkStatus();
  if (s.dead) return absl::FailedPreconditionError("forward pass already failed");
  Model& m = *s.model;
  std::vector<absl::Status>* seg_status =
      s.options.isolate_expert_failures ? &s.segment_status : nullptr;
  auto fail = [&](absl::Status st) {
    s.dead = true;
    return st;
  };
  const auto& layers = m.weights_.layers;
  while (true) {
    if (s.waiting) {
      absl::Status st = m.FinishBlock(s.b, s.X, s.lm, seg_status);
      s.waiting = false;
      if (!st.ok()) return fail(st);
      if (s.options.layer_out) s.options.layer_out(layers[s.layer].block, s.X.data(), s.b.n);
      ++s.layer;
    }
    if (s.layer == layers.size()) break;
    if (s.options.before_block) s.options.before_block(layers[s.layer].block, s.b.n);
    absl::Status st = m.StartBlock(layers[s.layer], s.b, s.X, s.lm);
    if (!st.ok()) return fail(st);
    s.waiting = true;
    // Yield only while something is really in flight elsewhere.
    if (s.lm.step.pending) return absl::OkStatus();
  }
  for (const Segment& seg : s.segments) {
    seg.state->position += static_cast<int64_t>(seg.tokens.size());
  }
  s.logits = m.Head(m.weights_.hc_head, m.weights_.norm, s.b, s.X, s.options.all_logits);
  if (s.options.final_streams) *s.options.final_streams = std::move(s.X);
  s.done = true;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ForwardPass>> Model::BeginForward(
    absl::Span<const Segment> segments, const ForwardOptions& options) {
  EM_RETURN_IF_ERROR(CheckSegments(config_, segments));
  const ModelConfig& c = config_;
  const int Hc = c.hc_mult;
  const int64_t D = c.hidden_size;
  auto st = std::make_unique<ForwardPass::State>();
  st->model = this;
  st->segments.assign(segments.begin(), segments.end());
  st->options = options;
  st->segment_status.assign(segments.size(), absl::OkStatus());
  Batch& b = st->b;
  for (const Segment& s : segments) {
    b.segs.push_back({s.state, b.n, static_cast<int64_t>(s.tokens.size()), s.state->position});
    for (size_t i = 0; i < s.tokens.size(); ++i) {
      b.tokens.push_back(s.tokens[i]);
      b.pos.push_back(s.state->position + static_cast<int64_t>(i));
      b.seg_of.push_back(b.segs.size() - 1);
    }
    b.n += static_cast<int64_t>(s.tokens.size());
  }
  std::vector<float>& X = st->X;
  X = Buf(b.n * Hc * D);
  std::vector<float> e = Buf(D);
  for (int64_t t = 0; t < b.n; ++t) {
    kernels::DequantizeRow(weights_.embed, b.tokens[t], e.data());
    for (int j = 0; j < Hc; ++j) std::copy(e.begin(), e.end(), &X[(t * Hc + j) * D]);
  }
  return std::unique_ptr<ForwardPass>(new ForwardPass(std::move(st)));
}

absl::StatusOr<std::vector<float>> Model::Forward(absl::Span<const Segment> segments,
                                                  const ForwardOptions& options) {
  ForwardOptions opts = options;
  opts.isolate_expert_failures = false;
  EM_ASSIGN_OR_RETURN(std::unique_ptr<ForwardPass> pass, BeginForward(segments, opts));
  while (!pass->done()) EM_RETURN_IF_ERROR(pass->Advance());
  return std::move(pass->logits());
}

absl::StatusOr<std::vector<float>> Model::ForwardMtp(int index, absl::Span<const Segment> segments,
                                                     const float* streams, bool all_logits) {
  if (index < 0 || index >= static_cast<int>(weights_.mtp.size())) {
    return absl::FailedPreconditionError("MTP block " + std::to_string(index) + " is not loaded");
  }
  EM_RETURN_IF_ERROR(CheckSegments(config_, segments));
  const ModelConfig& c = config_;
  const MtpWeights& mw = weights_.mtp[index];
  const int Hc = c.hc_mult;
  const int64_t D = c.hidden_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  Batch b;
  for (const Segment& s : segments) {
    b.segs.push_back({s.state, b.n, static_cast<int64_t>(s.tokens.size()), s.state->mtp_position});
    for (size_t i = 0; i < s.tokens.size(); ++i) {
      b.tokens.push_back(s.tokens[i]);
      b.pos.push_back(s.state->mtp_position + static_cast<int64_t>(i));
      b.seg_of.push_back(b.segs.size() - 1);
    }
    b.n += static_cast<int64_t>(s.tokens.size());
  }
  const int64_t n = b.n;
  std::vector<float> e = Buf(n * D), pe = Buf(n * D);
  for (int64_t t = 0; t < n; ++t) {
    kernels::DequantizeRow(weights_.embed, b.tokens[t], &e[t * D]);
    RmsNorm(&e[t * D], mw.enorm.data(), D, eps, &e[t * D]);
  }
  MatMul(mw.e_proj, e.data(), n, pe.data());
  std::vector<float> hn = Buf(n * Hc * D), X = Buf(n * Hc * D);
  for (int64_t r = 0; r < n * Hc; ++r)
    RmsNorm(&streams[r * D], mw.hnorm.data(), D, eps, &hn[r * D]);
  MatMul(mw.h_proj, hn.data(), n * Hc, X.data());
  for (int64_t t = 0; t < n; ++t) {
    for (int j = 0; j < Hc; ++j) {
      for (int64_t k = 0; k < D; ++k) X[(t * Hc + j) * D + k] += pe[t * D + k];
    }
  }
  EM_RETURN_IF_ERROR(RunBlock(mw.block, b, X));
  for (const Segment& s : segments) s.state->mtp_position += static_cast<int64_t>(s.tokens.size());
  return Head(mw.hc_head, mw.norm, b, X, all_logits);
}

}  // namespace expertmesh::model
