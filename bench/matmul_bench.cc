// matmul_bench: the kernels against this machine's memory bandwidth, all measured in one run.
//   1. STREAM-like triad (doubles, arrays far bigger than the caches): 1 thread and all threads.
//   2. GEMV (n = 1) effective bandwidth, weight + scale bytes read per second, for FP8, FP4 and
//      BF16 matrices of 64 MiB, printed with its ratio to the triad of the same thread count.
//   3. GEMM GFLOP/s at n = 32 on the same matrices.
//   4. One DeepSeek-V4-Flash-shaped layer's linear layers (composed from MatMul calls with the
//      real shapes and checkpoint formats, top-6 routing over 256 FP4 experts), ms per token at
//      batch 1 and batch 32. What it includes and leaves out is printed with the figures.
//   --variants instead: the batch-invariant FP8 GEMV against the legacy one
//      (SetKernelVariantForBench), interleaved, 1 thread, L2-, L3- and DRAM-sized matrices.
// Usage: matmul_bench [--threads N] [--skip-layer] [--quick] [--variants]
// Memory: about 0.8 GB for the triad (freed before the rest), then about 3.7 GB for the layer.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "core/base/hash.h"
#include "core/kernels/matmul.h"
#include "core/kernels/thread_pool.h"

namespace expertmesh::kernels {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double ProcessCpuSeconds() {
  rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
         1e-6 * (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

// The share of `threads` cores this process got during the last BestSeconds: on a shared
// machine, well under 100% means other work took the cores and the figures are low.
double g_last_cpu_share = 0.0;
// CPU seconds (all threads) per call during the last BestSeconds. On 1 thread, bytes divided by
// it is what the kernel streams per second of core time it actually got: a figure that other
// processes on the machine disturb much less than the wall-clock one.
double g_last_cpu_per_call = 0.0;

// Best (minimum) seconds per call over at least `min_reps` calls and `min_seconds` in total,
// after one warm-up call: the STREAM convention, used for every figure here alike.
double BestSeconds(const std::function<void()>& fn, int min_reps, double min_seconds) {
  fn();
  double best = 1e30, total = 0.0;
  const double cpu0 = ProcessCpuSeconds();
  int reps = 0;
  while ((reps < min_reps || total < min_seconds) && reps < 1000) {
    const auto t0 = Clock::now();
    fn();
    const double s = Seconds(t0, Clock::now());
    best = std::min(best, s);
    total += s;
    ++reps;
  }
  const double cpu = ProcessCpuSeconds() - cpu0;
  g_last_cpu_share = cpu / (total * KernelThreads());
  g_last_cpu_per_call = cpu / reps;
  return best;
}

// Fills bytes with a fast deterministic generator (splitmix64), in parallel on the kernel pool.
void FillRandomBytes(uint8_t* p, size_t size, uint64_t seed) {
  const int64_t words = static_cast<int64_t>(size / 8);
  ParallelFor(words, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const uint64_t z =
          base::Mix64(seed + base::kSplitMix64Gamma * static_cast<uint64_t>(i + 1));
      std::memcpy(p + 8 * i, &z, 8);
    }
  });
  for (size_t i = static_cast<size_t>(words) * 8; i < size; ++i) p[i] = static_cast<uint8_t>(i);
}

// A weight matrix in a checkpoint format, owning its (random) bytes.
struct OwnedMatrix {
  WeightMatrix w;
  std::vector<uint8_t> data;
  std::vector<uint8_t> scales;
  size_t Bytes() const { return data.size() + scales.size(); }
};

OwnedMatrix MakeWeights(WeightFormat format, int64_t rows, int64_t cols, uint64_t seed) {
  OwnedMatrix m;
  m.w.format = format;
  m.w.rows = rows;
  m.w.cols = cols;
  size_t bytes = 0, scales = 0;
  switch (format) {
    case WeightFormat::kF32:
      bytes = rows * cols * 4;
      break;
    case WeightFormat::kBF16:
      bytes = rows * cols * 2;
      break;
    case WeightFormat::kFP8E4M3:
      bytes = rows * cols;
      scales = ((rows + 127) / 128) * ((cols + 127) / 128);
      break;
    case WeightFormat::kFP4E2M1:
      bytes = rows * cols / 2;
      scales = rows * (cols / 32);
      break;
  }
  m.data.resize(bytes);
  FillRandomBytes(m.data.data(), bytes, seed);
  if (format == WeightFormat::kF32 || format == WeightFormat::kBF16) {
    // Random bit patterns include NaNs and huge values; give every element a moderate exponent.
    const size_t elem = format == WeightFormat::kF32 ? 4 : 2;
    for (size_t i = elem - 1; i < bytes; i += elem) m.data[i] = (m.data[i] & 0x80) | 0x3C;
  }
  if (format == WeightFormat::kFP8E4M3) {
    for (auto& b : m.data) {
      if ((b & 0x7F) == 0x7F) b = 0x7E;  // no NaN codes, as in a real checkpoint
    }
  }
  if (scales > 0) {
    m.scales.resize(scales);
    for (size_t i = 0; i < scales; ++i) m.scales[i] = static_cast<uint8_t>(120 + i % 8);
    m.w.scale_format = ScaleFormat::kE8M0;
    m.w.scales = m.scales.data();
  }
  m.w.data = m.data.data();
  return m;
}

std::vector<float> RandomActivations(int64_t count, uint64_t seed) {
  std::vector<float> v(count);
  uint64_t s = seed * 2654435761u + 1;
  for (auto& f : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    f = static_cast<float>(static_cast<int64_t>(s >> 40) - (1 << 23)) / (1 << 23);
  }
  return v;
}

const char* FormatName(WeightFormat f) {
  switch (f) {
    case WeightFormat::kF32:
      return "F32";
    case WeightFormat::kBF16:
      return "BF16";
    case WeightFormat::kFP8E4M3:
      return "FP8";
    case WeightFormat::kFP4E2M1:
      return "FP4";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------
// 1. Triad: a[i] = b[i] + s * c[i]; 24 bytes moved per element (STREAM counts no write-allocate).

struct Bandwidth {
  double wall_gbs;      // bytes / best wall time
  double per_core_gbs;  // bytes / CPU seconds per call (all threads)
};

Bandwidth Triad(int threads, bool quick) {
  SetKernelThreads(threads);
  const int64_t n = int64_t{1} << (quick ? 24 : 25);  // 3 x 256 MiB, far beyond the 32 MiB L3
  std::unique_ptr<double[]> a(new double[n]), b(new double[n]), c(new double[n]);
  ParallelFor(n, 1 << 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      a[i] = 0.0;
      b[i] = 1.0 + static_cast<double>(i & 7);
      c[i] = 2.0;
    }
  });
  const double scalar = 3.0;
  const double s = BestSeconds(
      [&] {
        ParallelFor(n, 1 << 16, [&](int64_t lo, int64_t hi) {
          double* __restrict pa = a.get();
          const double* __restrict pb = b.get();
          const double* __restrict pc = c.get();
          for (int64_t i = lo; i < hi; ++i) pa[i] = pb[i] + scalar * pc[i];
        });
      },
      5, quick ? 0.2 : 0.5);
  if (a[n - 1] != b[n - 1] + scalar * c[n - 1]) std::fprintf(stderr, "triad check failed\n");
  const double bytes = 24.0 * static_cast<double>(n);
  return {bytes / s / 1e9, bytes / g_last_cpu_per_call / 1e9};
}

// ---------------------------------------------------------------------------------------------
// 4. One V4-Flash layer's linear layers.

struct LayerShapes {
  // MODEL.md, V4-Flash column.
  static constexpr int64_t kD = 4096, kH = 64, kHeadDim = 512, kQ = 1024, kG = 8, kR = 1024;
  static constexpr int64_t kExperts = 256, kTopK = 6, kInter = 2048, kHc = 4;
  static constexpr int64_t kIndexHeads = 64, kIndexDim = 128;
};

struct Layer {
  // Attention (FP8, 128x128 E8M0 blocks).
  OwnedMatrix wq_a, wq_b, wkv, wo_a, wo_b;
  // A ratio-4 (CSA) layer's compressor and indexer projections (FP8 assumed, as the other
  // quantized linears of the checkpoint).
  OwnedMatrix cmp_wkv, cmp_wgate, idx_wq_b, idx_weights, idx_cmp_wkv, idx_cmp_wgate;
  // Hyper-connection mixers (F32) and the MoE gate (BF16).
  OwnedMatrix hc_attn, hc_ffn, gate;
  // Routed experts (FP4, per-32 E8M0 scales) and the shared expert (FP8).
  std::vector<OwnedMatrix> w1, w2, w3;
  OwnedMatrix s_w1, s_w2, s_w3;

  size_t ExpertBytes() const { return w1[0].Bytes() + w2[0].Bytes() + w3[0].Bytes(); }
};

std::unique_ptr<Layer> BuildLayer() {
  using S = LayerShapes;
  auto l = std::make_unique<Layer>();
  uint64_t seed = 100;
  const auto fp8 = [&](int64_t rows, int64_t cols) {
    return MakeWeights(WeightFormat::kFP8E4M3, rows, cols, seed++);
  };
  l->wq_a = fp8(S::kQ, S::kD);
  l->wq_b = fp8(S::kH * S::kHeadDim, S::kQ);
  l->wkv = fp8(S::kHeadDim, S::kD);
  l->wo_a = fp8(S::kG * S::kR, S::kH * S::kHeadDim / S::kG);
  l->wo_b = fp8(S::kD, S::kG * S::kR);
  l->cmp_wkv = fp8(2 * S::kHeadDim, S::kD);
  l->cmp_wgate = fp8(2 * S::kHeadDim, S::kD);
  l->idx_wq_b = fp8(S::kIndexHeads * S::kIndexDim, S::kQ);
  l->idx_weights = fp8(S::kIndexHeads, S::kD);
  l->idx_cmp_wkv = fp8(2 * S::kIndexDim, S::kD);
  l->idx_cmp_wgate = fp8(2 * S::kIndexDim, S::kD);
  l->hc_attn = MakeWeights(WeightFormat::kF32, (2 + S::kHc) * S::kHc, S::kHc * S::kD, seed++);
  l->hc_ffn = MakeWeights(WeightFormat::kF32, (2 + S::kHc) * S::kHc, S::kHc * S::kD, seed++);
  l->gate = MakeWeights(WeightFormat::kBF16, S::kExperts, S::kD, seed++);
  for (int64_t e = 0; e < S::kExperts; ++e) {
    l->w1.push_back(MakeWeights(WeightFormat::kFP4E2M1, S::kInter, S::kD, seed++));
    l->w3.push_back(MakeWeights(WeightFormat::kFP4E2M1, S::kInter, S::kD, seed++));
    l->w2.push_back(MakeWeights(WeightFormat::kFP4E2M1, S::kD, S::kInter, seed++));
  }
  l->s_w1 = fp8(S::kInter, S::kD);
  l->s_w3 = fp8(S::kInter, S::kD);
  l->s_w2 = fp8(S::kD, S::kInter);
  return l;
}

// Per-part timings of one step, seconds.
struct StepTimes {
  double hc = 0, attn = 0, csa = 0, gate = 0, experts = 0, shared = 0;
  double Total() const { return hc + attn + csa + gate + experts + shared; }
  size_t expert_bytes = 0;  // routed-expert weight bytes read this step
};

void Silu(const float* g, const float* u, int64_t n, float* h) {
  for (int64_t i = 0; i < n; ++i) {
    const float gg = std::min(g[i], 10.0f);
    const float uu = std::clamp(u[i], -10.0f, 10.0f);
    h[i] = gg / (1.0f + std::exp(-gg)) * uu;
  }
}

// One step of `batch` tokens through the layer's linear layers; x holds batch x D activations.
StepTimes RunLayerStep(const Layer& l, int64_t batch, const std::vector<float>& x) {
  using S = LayerShapes;
  StepTimes t;
  std::vector<float> big(batch * S::kH * S::kHeadDim), q(batch * S::kQ), kv(batch * S::kHeadDim);
  std::vector<float> out(batch * S::kD), z(batch * S::kG * S::kR), mix(batch * 24);
  std::vector<float> xs(batch * S::kHc * S::kD, 0.5f);
  auto t0 = Clock::now();
  MatMul(l.hc_attn.w, xs.data(), batch, mix.data());
  MatMul(l.hc_ffn.w, xs.data(), batch, mix.data());
  auto t1 = Clock::now();
  t.hc = Seconds(t0, t1);

  MatMul(l.wq_a.w, x.data(), batch, q.data());
  MatMul(l.wq_b.w, q.data(), batch, big.data());
  MatMul(l.wkv.w, x.data(), batch, kv.data());
  // wo_a: group g multiplies its own [R, H*d/G] block by the concatenated outputs of its heads.
  const int64_t gin = S::kH * S::kHeadDim / S::kG;
  std::vector<float> gx(batch * gin), gz(batch * S::kR);
  for (int64_t g = 0; g < S::kG; ++g) {
    for (int64_t b = 0; b < batch; ++b) {
      std::memcpy(gx.data() + b * gin, big.data() + b * S::kH * S::kHeadDim + g * gin,
                  gin * sizeof(float));
    }
    WeightMatrix block = l.wo_a.w;
    block.rows = S::kR;
    block.data = static_cast<const uint8_t*>(l.wo_a.w.data) + g * S::kR * gin;
    block.scales = static_cast<const uint8_t*>(l.wo_a.w.scales) + (g * S::kR / 128) * (gin / 128);
    MatMul(block, gx.data(), batch, gz.data());
    for (int64_t b = 0; b < batch; ++b) {
      std::memcpy(z.data() + b * S::kG * S::kR + g * S::kR, gz.data() + b * S::kR,
                  S::kR * sizeof(float));
    }
  }
  MatMul(l.wo_b.w, z.data(), batch, out.data());
  auto t2 = Clock::now();
  t.attn = Seconds(t1, t2);

  std::vector<float> ckv(batch * 2 * S::kHeadDim), iq(batch * S::kIndexHeads * S::kIndexDim);
  std::vector<float> iw(batch * S::kIndexHeads), ikv(batch * 2 * S::kIndexDim);
  MatMul(l.cmp_wkv.w, x.data(), batch, ckv.data());
  MatMul(l.cmp_wgate.w, x.data(), batch, ckv.data());
  MatMul(l.idx_wq_b.w, q.data(), batch, iq.data());
  MatMul(l.idx_weights.w, x.data(), batch, iw.data());
  MatMul(l.idx_cmp_wkv.w, x.data(), batch, ikv.data());
  MatMul(l.idx_cmp_wgate.w, x.data(), batch, ikv.data());
  auto t3 = Clock::now();
  t.csa = Seconds(t2, t3);

  // Gate and top-6 routing, then the tokens of each expert go through it together.
  std::vector<float> scores(batch * S::kExperts);
  MatMul(l.gate.w, x.data(), batch, scores.data());
  std::vector<std::vector<int64_t>> tokens_of(S::kExperts);
  std::vector<int> idx(S::kExperts);
  for (int64_t b = 0; b < batch; ++b) {
    std::iota(idx.begin(), idx.end(), 0);
    const float* s = scores.data() + b * S::kExperts;
    std::partial_sort(idx.begin(), idx.begin() + S::kTopK, idx.end(),
                      [&](int a, int c) { return s[a] > s[c]; });
    for (int k = 0; k < S::kTopK; ++k) tokens_of[idx[k]].push_back(b);
  }
  auto t4 = Clock::now();
  t.gate = Seconds(t3, t4);

  std::vector<float> ex(batch * S::kD), g(batch * S::kInter), u(batch * S::kInter),
      h(batch * S::kInter), eo(batch * S::kD);
  std::fill(out.begin(), out.end(), 0.0f);
  for (int64_t e = 0; e < S::kExperts; ++e) {
    const auto& toks = tokens_of[e];
    if (toks.empty()) continue;
    const int64_t n = static_cast<int64_t>(toks.size());
    for (int64_t j = 0; j < n; ++j) {
      std::memcpy(ex.data() + j * S::kD, x.data() + toks[j] * S::kD, S::kD * sizeof(float));
    }
    MatMul(l.w1[e].w, ex.data(), n, g.data());
    MatMul(l.w3[e].w, ex.data(), n, u.data());
    Silu(g.data(), u.data(), n * S::kInter, h.data());
    MatMul(l.w2[e].w, h.data(), n, eo.data());
    for (int64_t j = 0; j < n; ++j) {
      float* o = out.data() + toks[j] * S::kD;
      const float* src = eo.data() + j * S::kD;
      for (int64_t d = 0; d < S::kD; ++d) o[d] += 0.25f * src[d];
    }
    t.expert_bytes += l.ExpertBytes();
  }
  auto t5 = Clock::now();
  t.experts = Seconds(t4, t5);

  MatMul(l.s_w1.w, x.data(), batch, g.data());
  MatMul(l.s_w3.w, x.data(), batch, u.data());
  Silu(g.data(), u.data(), batch * S::kInter, h.data());
  MatMul(l.s_w2.w, h.data(), batch, eo.data());
  t.shared = Seconds(t5, Clock::now());
  return t;
}

void BenchLayer(int threads, bool quick) {
  using S = LayerShapes;
  std::printf(
      "\n[layer] One V4-Flash-shaped layer's linear layers (D=%lld, %lld heads x %lld, q_lora "
      "%lld, o groups %lld x %lld, %lld FP4 experts of %lld, top-%lld, shared expert FP8).\n"
      "  Measured: MatMul on every projection of a ratio-4 (CSA) layer with its real shape and\n"
      "  checkpoint format (FP8 128x128 E8M0 blocks; FP4 experts with per-32 E8M0 scales; BF16\n"
      "  gate; F32 hyper-connection mixers), top-6 routing from the gate's output, tokens grouped\n"
      "  per expert (one MatMul per expert with n = its tokens), SwiGLU, weighted sum.\n"
      "  Not measured: attention scores/softmax over the 128-token window and compressed\n"
      "  entries, RoPE, norms, Sinkhorn, compressor pooling, indexer top-k (vector work, small\n"
      "  next to the weight streaming at these batch sizes).\n",
      static_cast<long long>(S::kD), static_cast<long long>(S::kH),
      static_cast<long long>(S::kHeadDim), static_cast<long long>(S::kQ),
      static_cast<long long>(S::kG), static_cast<long long>(S::kR),
      static_cast<long long>(S::kExperts), static_cast<long long>(S::kInter),
      static_cast<long long>(S::kTopK));
  SetKernelThreads(threads);
  const auto tb = Clock::now();
  const std::unique_ptr<Layer> layer = BuildLayer();
  size_t total_bytes = 0;
  for (const OwnedMatrix* m :
       {&layer->wq_a, &layer->wq_b, &layer->wkv, &layer->wo_a, &layer->wo_b, &layer->cmp_wkv,
        &layer->cmp_wgate, &layer->idx_wq_b, &layer->idx_weights, &layer->idx_cmp_wkv,
        &layer->idx_cmp_wgate, &layer->hc_attn, &layer->hc_ffn, &layer->gate, &layer->s_w1,
        &layer->s_w2, &layer->s_w3}) {
    total_bytes += m->Bytes();
  }
  const size_t dense_bytes = total_bytes;
  total_bytes += layer->ExpertBytes() * S::kExperts;
  std::printf(
      "  weights: %.2f GB in memory (dense part %.1f MB, one expert %.2f MB), built in %.1f s\n",
      total_bytes / 1e9, dense_bytes / 1e6, layer->ExpertBytes() / 1e6, Seconds(tb, Clock::now()));

  for (int t : {1, threads}) {
    if (t == 1 && threads == 1 && t != threads) continue;
    SetKernelThreads(t);
    for (int64_t batch : {int64_t{1}, int64_t{32}}) {
      const int steps = quick ? 4 : (batch == 1 ? 24 : 8);
      StepTimes sum;
      RunLayerStep(*layer, batch, RandomActivations(batch * S::kD, 7));  // warm-up
      const double cpu0 = ProcessCpuSeconds();
      const auto wall0 = Clock::now();
      for (int s = 0; s < steps; ++s) {
        const StepTimes st =
            RunLayerStep(*layer, batch, RandomActivations(batch * S::kD, 1000 + s));
        sum.hc += st.hc;
        sum.attn += st.attn;
        sum.csa += st.csa;
        sum.gate += st.gate;
        sum.experts += st.experts;
        sum.shared += st.shared;
        sum.expert_bytes += st.expert_bytes;
      }
      const double cpu_share =
          (ProcessCpuSeconds() - cpu0) / (Seconds(wall0, Clock::now()) * KernelThreads());
      const double per_step = sum.Total() / steps;
      const double bytes_per_step =
          static_cast<double>(dense_bytes) + static_cast<double>(sum.expert_bytes) / steps;
      const double ms_tok = 1e3 * per_step / batch;
      std::printf(
          "  threads %2d batch %2lld: %8.3f ms/token (%.2f ms/step of %lld tokens; mean of %d "
          "steps) | weights read %.0f MB/step = %.1f GB/s | cpu share %.0f%%\n",
          t, static_cast<long long>(batch), ms_tok, 1e3 * per_step, static_cast<long long>(batch),
          steps, bytes_per_step / 1e6, bytes_per_step / per_step / 1e9, 100 * cpu_share);
      const double k = 1e3 / steps / batch;
      std::printf(
          "      ms/token by part: attention proj %.3f | CSA compressor+indexer proj %.3f | "
          "hc mixers %.3f | gate+routing %.3f | routed experts %.3f (%.1f experts/step) | "
          "shared expert %.3f\n",
          sum.attn * k, sum.csa * k, sum.hc * k, sum.gate * k, sum.experts * k,
          static_cast<double>(sum.expert_bytes) / layer->ExpertBytes() / steps, sum.shared * k);
    }
  }
}

// FP8 GEMV (n = 1 and 2, 1 thread), invariant vs legacy kernel variant. Rounds alternate the
// order (A B, B A, ...) so drift and neighbours' load hit both; best time per variant.
void BenchVariants(bool quick) {
  SetKernelThreads(1);
  std::printf("[variants] FP8 e4m3 GEMV, 1 thread, kernel target %s: best us per call\n",
              std::string(ActiveKernelTargetName()).c_str());
  for (int64_t size : {1024, 4096, 8192}) {
    const OwnedMatrix m = MakeWeights(WeightFormat::kFP8E4M3, size, size, 7);
    for (int64_t n : {1, 2}) {
      const std::vector<float> x = RandomActivations(n * size, 3);
      std::vector<float> y(n * size);
      double best[2] = {1e30, 1e30};
      const KernelVariant kV[2] = {KernelVariant::kInvariant, KernelVariant::kLegacy};
      for (int round = 0; round < (quick ? 4 : 10); ++round) {
        for (int k = 0; k < 2; ++k) {
          const int v = round % 2 == 0 ? k : 1 - k;
          SetKernelVariantForBench(kV[v]);
          best[v] =
              std::min(best[v], BestSeconds([&] { MatMul(m.w, x.data(), n, y.data()); }, 5, 0.05));
        }
      }
      std::printf("  %5lldx%-5lld n=%lld: invariant %9.1f us  legacy %9.1f us  speed ratio %.3f\n",
                  static_cast<long long>(size), static_cast<long long>(size),
                  static_cast<long long>(n), 1e6 * best[0], 1e6 * best[1], best[1] / best[0]);
    }
  }
  SetKernelVariantForBench(KernelVariant::kInvariant);
}

int Main(int argc, char** argv) {
  int threads = KernelThreads();
  bool skip_layer = false, quick = false, variants = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (a == "--skip-layer") {
      skip_layer = true;
    } else if (a == "--quick") {
      quick = true;
    } else if (a == "--variants") {
      variants = true;
    } else {
      std::fprintf(stderr,
                   "usage: matmul_bench [--threads N] [--skip-layer] [--quick] [--variants]\n"
                   "  Memory bandwidth (triad) vs GEMV, GEMM n=32, and one V4-Flash layer.\n"
                   "  EM_KERNEL_TARGET=avx2|generic benchmarks a lower kernel target.\n");
      return a == "--help" ? 0 : 2;
    }
  }
  if (threads < 1) threads = 1;
  if (variants) {
    BenchVariants(quick);
    return 0;
  }
  std::printf("matmul_bench: kernel target %s, threads 1 and %d\n",
              std::string(ActiveKernelTargetName()).c_str(), threads);

  const std::vector<int> thread_counts =
      threads == 1 ? std::vector<int>{1} : std::vector<int>{1, threads};
  std::vector<Bandwidth> triad;
  std::printf("\n[triad] a[i] = b[i] + s*c[i], 3 x %d MiB of doubles, best of >= 5 passes\n",
              quick ? 128 : 256);
  for (int t : thread_counts) {
    triad.push_back(Triad(t, quick));
    std::printf("  threads %2d: %7.1f GB/s  (cpu share %3.0f%%; per core-second %5.1f GB/s)\n", t,
                triad.back().wall_gbs, 100 * g_last_cpu_share, triad.back().per_core_gbs);
  }

  struct Shape {
    WeightFormat format;
    int64_t rows, cols;
  };
  const Shape shapes[] = {{WeightFormat::kFP8E4M3, 8192, 8192},
                          {WeightFormat::kFP4E2M1, 8192, 16384},
                          {WeightFormat::kBF16, 8192, 4096}};
  std::printf(
      "\n[gemv] n = 1, 64 MiB of weights (+ scales). GB/s = weight+scale bytes / best time; "
      "ratio = that / triad GB/s at the same thread count. Per core-second = the same bytes per "
      "CPU second used (all threads, spinning included), ratio = that / the triad's.\n");
  std::vector<OwnedMatrix> mats;
  for (const Shape& s : shapes)
    mats.push_back(MakeWeights(s.format, s.rows, s.cols, 42 + mats.size()));
  for (size_t ti = 0; ti < thread_counts.size(); ++ti) {
    SetKernelThreads(thread_counts[ti]);
    for (const OwnedMatrix& m : mats) {
      const std::vector<float> x = RandomActivations(m.w.cols, 1);
      std::vector<float> y(m.w.rows);
      const double s =
          BestSeconds([&] { MatMul(m.w, x.data(), 1, y.data()); }, 10, quick ? 0.2 : 0.5);
      const double gbs = m.Bytes() / s / 1e9;
      const double core_gbs = m.Bytes() / g_last_cpu_per_call / 1e9;
      std::printf(
          "  threads %2d %-4s %5lldx%-5lld: %7.3f ms %6.1f GB/s ratio %.2f (cpu share %3.0f%%; "
          "per core-second %5.1f GB/s ratio %.2f)\n",
          thread_counts[ti], FormatName(m.w.format), static_cast<long long>(m.w.rows),
          static_cast<long long>(m.w.cols), 1e3 * s, gbs, gbs / triad[ti].wall_gbs,
          100 * g_last_cpu_share, core_gbs, core_gbs / triad[ti].per_core_gbs);
    }
  }
  std::printf("\n[gemm] n = 32 on the same matrices; GFLOP/s = 2*rows*cols*32 / time\n");
  for (int t : thread_counts) {
    SetKernelThreads(t);
    for (const OwnedMatrix& m : mats) {
      const int64_t n = 32;
      const std::vector<float> x = RandomActivations(n * m.w.cols, 2);
      std::vector<float> y(n * m.w.rows);
      const double s =
          BestSeconds([&] { MatMul(m.w, x.data(), n, y.data()); }, 3, quick ? 0.2 : 0.5);
      std::printf("  threads %2d %-4s %5lldx%-5lld: %8.2f ms  %7.1f GFLOP/s  (cpu share %3.0f%%)\n",
                  t, FormatName(m.w.format), static_cast<long long>(m.w.rows),
                  static_cast<long long>(m.w.cols), 1e3 * s,
                  2.0 * m.w.rows * m.w.cols * n / s / 1e9, 100 * g_last_cpu_share);
    }
  }
  mats.clear();
  if (!skip_layer) BenchLayer(threads, quick);
  return 0;
}

}  // namespace
}  // namespace expertmesh::kernels

int main(int argc, char** argv) { return expertmesh::kernels::Main(argc, argv); }
