// Matrix products of checkpoint-format weights with float32 activations. Weights stay in their
// stored codes (BF16, FP8 e4m3 with 2-D block scales, FP4 e2m1 with per-32 scales) and are
// dequantized inside the kernel, so a layer needs the memory it has on disk (MODEL.md,
// Checkpoint format). SIMD variants are chosen at run time; MatMulReference is the oracle.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace expertmesh::kernels {

enum class WeightFormat {
  kF32,      // float32, rows*cols values
  kBF16,     // bfloat16 bits (uint16), rows*cols values
  kFP8E4M3,  // one e4m3 byte per value; scales per [block_rows x block_cols] block
  kFP4E2M1,  // two e2m1 codes per byte, low nibble = even column; one scale per 32 columns
};

enum class ScaleFormat {
  kNone,  // F32 / BF16 weights
  kE8M0,  // one byte per scale: 2^(byte - 127)
  kF32,   // float32 scales
};

// A read-only view of one weight matrix W [rows, cols] (PyTorch Linear layout: y = W x).
// Nothing is owned; the bytes usually live in a memory-mapped checkpoint.
struct WeightMatrix {
  WeightFormat format = WeightFormat::kF32;
  const void* data = nullptr;
  ScaleFormat scale_format = ScaleFormat::kNone;
  // FP8: [ceil(rows/block_rows), ceil(cols/block_cols)] row-major.
  // FP4: [rows, cols/32] row-major.
  const void* scales = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t block_rows = 128;  // FP8 only (quantization_config.weight_block_size)
  int64_t block_cols = 128;
};

// y[n][rows] = sum_k x[n][k] * W[rows][k], all row-major float32. n == 1 is a GEMV.
// Uses the best kernel this CPU supports and the kernel thread pool (small products run on the
// caller alone, so the pool's wake-up is only paid where it pays off). Thread-safe; concurrent
// calls while the pool is busy run single-threaded on their caller.
// REQUIRES: FP4 weights have cols % 32 == 0 (checked by the loader, not here); y does not
// overlap x. FP8 with block_cols % 32 != 0 runs on the (slower) generic kernel.
void MatMul(const WeightMatrix& w, const float* x, int64_t n, float* y);

// Kernel variants, best first. Each is compiled with its own function-level target options and
// chosen at run time from what the CPU reports (docs/kernels.md).
enum class KernelTarget {
  kAvx512,   // AVX512F/BW/DQ/VL + F16C + FMA
  kAvx2,     // AVX2 + FMA + F16C
  kGeneric,  // portable C++ (blocked scalar loops)
};

// "avx512", "avx2" or "generic".
std::string_view KernelTargetName(KernelTarget target);
// The target MatMul uses now: the best one this CPU supports, unless the environment variable
// EM_KERNEL_TARGET names a supported lower one, or a test forced one.
KernelTarget ActiveKernelTarget();
std::string_view ActiveKernelTargetName();
// Every target this CPU can run, best first (kGeneric always).
std::vector<KernelTarget> SupportedKernelTargets();
// Test hook: makes MatMul use `target`. Returns false (and changes nothing) when this CPU
// cannot run it. Not synchronized with MatMul calls running at the same time.
bool ForceKernelTargetForTest(KernelTarget target);
// Undoes ForceKernelTargetForTest.
void ResetKernelTargetForTest();

// Which FP8 GEMV MatMul runs. kInvariant (the default) applies each FP8 block scale to the decoded
// weights before the FMA, exactly as the GEMM tile does, so an output element's bits do not
// depend on n (MODEL.md, Batch invariance). kLegacy is the earlier kernel, which sums each scale
// block's columns and applies the scale to the partial sum: one multiply fewer per weight vector
// but different bits from the GEMM path. Only for benchmarks comparing the two; not
// synchronized with MatMul calls running at the same time.
enum class KernelVariant { kInvariant, kLegacy };
void SetKernelVariantForBench(KernelVariant variant);
KernelVariant KernelVariantForBench();

// Number of threads (the caller included) kernels split work over. Default: the environment
// variable EM_THREADS if set, else std::thread::hardware_concurrency(). threads <= 0 restores the
// default. Thread-safe; kernels already running finish on the threads they started with.
void SetKernelThreads(int threads);
int KernelThreads();

// Scalar reference implementation: the oracle for every SIMD variant. Single-threaded.
void MatMulReference(const WeightMatrix& w, const float* x, int64_t n, float* y);

// Bytes the matrix spans in memory: its codes plus its scales.
uint64_t MatrixBytes(const WeightMatrix& w);

// Writes row `row` of W dequantized to float32 into out[cols] (embedding lookup).
void DequantizeRow(const WeightMatrix& w, int64_t row, float* out);

// Value of one e4m3 byte / one e2m1 nibble / one e8m0 scale byte / one bf16 (MODEL.md).
float DecodeE4M3(uint8_t byte);
float DecodeE2M1(uint8_t nibble);
float DecodeE8M0(uint8_t byte);
float DecodeBF16(uint16_t bits);

}  // namespace expertmesh::kernels
