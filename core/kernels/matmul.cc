// MatMul's dispatcher: picks the kernel target once from what the CPU reports, lays the
// activations out as the SIMD kernels read them, and splits output rows over the kernel pool.
#include "core/kernels/matmul.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "core/kernels/matmul_internal.h"
#include "core/kernels/thread_pool.h"

namespace expertmesh::kernels {
namespace {

// Below this many multiply-adds per extra thread, waking a worker costs more than it saves
// (a GEMV of 256K FP8 weights takes about 10 us on one core here).
constexpr int64_t kMinMacsPerThread = int64_t{1} << 18;
// Tasks per thread: more than one, so that a thread the OS preempts (a shared VM) holds up at
// most a small slice of the rows while the others claim the rest; each task still streams a
// long contiguous run of weight rows, and a claim is one CAS.
constexpr int64_t kTasksPerThread = 8;
// Rows per task are a multiple of this (the kernels' row blocking: 4 on the GEMV path, up to 8
// per GEMM tile).
constexpr int64_t kRowUnit = 8;

bool CpuSupports(KernelTarget t) {
  switch (t) {
    case KernelTarget::kGeneric:
      return true;
    case KernelTarget::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
    case KernelTarget::kAvx512:
      __builtin_cpu_init();
      return CpuSupports(KernelTarget::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
  }
  return false;
}

constexpr KernelTarget kAllTargets[] = {KernelTarget::kAvx512, KernelTarget::kAvx2,
                                        KernelTarget::kGeneric};

KernelTarget DefaultTarget() {
  KernelTarget best = KernelTarget::kGeneric;
  for (KernelTarget t : kAllTargets) {
    if (CpuSupports(t)) {
      best = t;
      break;
    }
  }
  // EM_KERNEL_TARGET may only ask for a target the CPU runs (for benchmarking lower targets).
  if (const char* env = std::getenv("EM_KERNEL_TARGET"); env != nullptr) {
    for (KernelTarget t : kAllTargets) {
      if (KernelTargetName(t) == env && CpuSupports(t)) return t;
    }
  }
  return best;
}

std::atomic<int> g_forced{-1};
std::atomic<bool> g_legacy{false};

KernelTarget CurrentTarget() {
  const int forced = g_forced.load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<KernelTarget>(forced);
  static const KernelTarget kDefault = DefaultTarget();
  return kDefault;
}

internal::RowsKernel KernelFor(KernelTarget t) {
  switch (t) {
    case KernelTarget::kAvx512:
      return &internal::MatMulRowsAvx512;
    case KernelTarget::kAvx2:
      return &internal::MatMulRowsAvx2;
    case KernelTarget::kGeneric:
      break;
  }
  return &internal::MatMulRowsGeneric;
}

// Copies x into the SIMD layout (matmul_internal.h) when it is not already in it.
internal::PreparedX PrepareX(const WeightMatrix& w, const float* x, int64_t n,
                             std::vector<float>& buf) {
  const int64_t cols = w.cols;
  const bool fp4 = w.format == WeightFormat::kFP4E2M1;
  if (!fp4 && cols % 32 == 0) return {x, cols, n, false};
  const int64_t stride = (cols + 31) / 32 * 32;
  buf.assign(static_cast<size_t>(n * stride), 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float* src = x + i * cols;
    float* dst = buf.data() + i * stride;
    if (!fp4) {
      std::memcpy(dst, src, cols * sizeof(float));
      continue;
    }
    for (int64_t g = 0; g < cols; g += 32) {
      for (int j = 0; j < 16; ++j) {
        dst[g + j] = src[g + 2 * j];
        dst[g + 16 + j] = src[g + 2 * j + 1];
      }
    }
  }
  return {buf.data(), stride, n, false};
}

struct MatMulJob {
  internal::RowsKernel kernel;
  const WeightMatrix* w;
  internal::PreparedX x;
  float* y;
  int64_t units;
  int64_t tasks;
};

// Per-thread kernel scratch, 64-byte aligned (the kernels keep whole vectors in it).
float* ThreadScratch(int64_t floats) {
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < floats + 16) {
    scratch.resize(static_cast<size_t>(floats + 16));
  }
  const uintptr_t p = reinterpret_cast<uintptr_t>(scratch.data());
  return scratch.data() + ((64 - p % 64) % 64) / sizeof(float);
}

void RunMatMulTask(void* ctx, int64_t task) {
  const auto& job = *static_cast<const MatMulJob*>(ctx);
  const int64_t begin = std::min(job.w->rows, job.units * task / job.tasks * kRowUnit);
  const int64_t end = std::min(job.w->rows, job.units * (task + 1) / job.tasks * kRowUnit);
  if (begin >= end) return;
  job.kernel(*job.w, job.x, job.y, begin, end,
             ThreadScratch(internal::ScratchFloats(job.x.n, job.w->cols)));
}

}  // namespace

std::string_view KernelTargetName(KernelTarget target) {
  switch (target) {
    case KernelTarget::kAvx512:
      return "avx512";
    case KernelTarget::kAvx2:
      return "avx2";
    case KernelTarget::kGeneric:
      break;
  }
  return "generic";
}

KernelTarget ActiveKernelTarget() { return CurrentTarget(); }

std::string_view ActiveKernelTargetName() { return KernelTargetName(CurrentTarget()); }

std::vector<KernelTarget> SupportedKernelTargets() {
  std::vector<KernelTarget> out;
  for (KernelTarget t : kAllTargets) {
    if (CpuSupports(t)) out.push_back(t);
  }
  return out;
}

bool ForceKernelTargetForTest(KernelTarget target) {
  if (!CpuSupports(target)) return false;
  g_forced.store(static_cast<int>(target), std::memory_order_relaxed);
  return true;
}

void ResetKernelTargetForTest() { g_forced.store(-1, std::memory_order_relaxed); }

void SetKernelVariantForBench(KernelVariant variant) {
  g_legacy.store(variant == KernelVariant::kLegacy, std::memory_order_relaxed);
}

KernelVariant KernelVariantForBench() {
  return g_legacy.load(std::memory_order_relaxed) ? KernelVariant::kLegacy
                                                  : KernelVariant::kInvariant;
}

void MatMul(const WeightMatrix& w, const float* x, int64_t n, float* y) {
  if (n <= 0 || w.rows <= 0) return;
  if (w.cols <= 0) {
    std::fill(y, y + n * w.rows, 0.0f);
    return;
  }
  KernelTarget target = CurrentTarget();
  if (!internal::SimdHandles(w)) target = KernelTarget::kGeneric;

  thread_local std::vector<float> x_buf;
  internal::PreparedX px = target == KernelTarget::kGeneric
                               ? internal::PreparedX{x, w.cols, n, false}
                               : PrepareX(w, x, n, x_buf);
  px.legacy_fp8_gemv = g_legacy.load(std::memory_order_relaxed);

  MatMulJob job{KernelFor(target), &w, px, y, (w.rows + kRowUnit - 1) / kRowUnit, 1};
  ThreadPool& pool = KernelPool();
  const int64_t macs = w.rows * w.cols * n;
  const int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(pool.threads(), macs / kMinMacsPerThread));
  if (threads > 1) job.tasks = std::min(job.units, threads * kTasksPerThread);
  if (job.tasks <= 1) {
    job.tasks = 1;
    RunMatMulTask(&job, 0);
    return;
  }
  pool.Run(job.tasks, &RunMatMulTask, &job);
}

uint64_t MatrixBytes(const WeightMatrix& w) {
  const uint64_t elems = static_cast<uint64_t>(w.rows) * static_cast<uint64_t>(w.cols);
  uint64_t bytes = 0;
  switch (w.format) {
    case WeightFormat::kF32:
      bytes = elems * 4;
      break;
    case WeightFormat::kBF16:
      bytes = elems * 2;
      break;
    case WeightFormat::kFP8E4M3:
      bytes = elems;
      break;
    case WeightFormat::kFP4E2M1:
      bytes = (elems + 1) / 2;
      break;
  }
  const uint64_t scale_size = w.scale_format == ScaleFormat::kE8M0  ? 1
                              : w.scale_format == ScaleFormat::kF32 ? 4
                                                                    : 0;
  uint64_t scales = 0;
  if (w.format == WeightFormat::kFP8E4M3 && w.block_rows > 0 && w.block_cols > 0) {
    scales = static_cast<uint64_t>((w.rows + w.block_rows - 1) / w.block_rows) *
             static_cast<uint64_t>((w.cols + w.block_cols - 1) / w.block_cols);
  } else if (w.format == WeightFormat::kFP4E2M1) {
    scales = static_cast<uint64_t>(w.rows) * static_cast<uint64_t>(w.cols / 32);
  }
  return bytes + scales * scale_size;
}

}  // namespace expertmesh::kernels
