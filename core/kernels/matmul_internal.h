// Private interface between the MatMul dispatcher (matmul.cc) and the per-target kernels
// (matmul_{generic,avx2,avx512}.cc). Not for use outside core/kernels.
#pragma once

#include <cstdint>

#include "core/kernels/matmul.h"

namespace expertmesh::kernels::internal {

// Activations as the SIMD kernels read them: n rows of `stride` floats. stride >= cols; the
// columns past cols are zero, and stride is a multiple of 32 (so kernels step 32 columns at a
// time with no bounds check on x). For FP4 weights each 32-column group is stored as its 16 even
// columns then its 16 odd ones, the order the nibbles decode in (low nibble = even column).
struct PreparedX {
  const float* data = nullptr;
  int64_t stride = 0;
  int64_t n = 0;
  // KernelVariant::kLegacy: the FP8 GEMV applies scales to per-block partial sums (not invariant).
  bool legacy_fp8_gemv = false;
};

// Computes y[i * w.rows + r] for r in [row_begin, row_end) and i < x.n. `scratch` holds at
// least ScratchFloats(x.n, w.cols) floats, 64-byte aligned, owned by the calling thread.
// Single-threaded.
using RowsKernel = void (*)(const WeightMatrix& w, const PreparedX& x, float* y, int64_t row_begin,
                            int64_t row_end, float* scratch);

// SIMD GEMM blocking: a tile of at most kMaxTileRows rows x kKBlock columns of dequantized
// weights (16 KiB: stays in L1 while every activation row passes over it), then vector partial
// sums for up to kMaxTileRows x (n + 4) (row, activation row) pairs of at most 16 lanes. The
// generic kernel needs one dequantized row (cols floats).
inline constexpr int64_t kKBlock = 512;
inline constexpr int64_t kMaxTileRows = 8;
inline constexpr int64_t kTileFloats = kMaxTileRows * kKBlock;
inline constexpr int64_t ScratchFloats(int64_t n, int64_t cols) {
  const int64_t simd = kTileFloats + (n + 4) * kMaxTileRows * 16;
  return simd > cols ? simd : cols;
}

// The generic kernel reads x as given (stride = cols, natural column order, no padding).
void MatMulRowsGeneric(const WeightMatrix& w, const PreparedX& x, float* y, int64_t row_begin,
                       int64_t row_end, float* scratch);
void MatMulRowsAvx2(const WeightMatrix& w, const PreparedX& x, float* y, int64_t row_begin,
                    int64_t row_end, float* scratch);
void MatMulRowsAvx512(const WeightMatrix& w, const PreparedX& x, float* y, int64_t row_begin,
                      int64_t row_end, float* scratch);

// Whether the SIMD kernels handle this matrix's layout: FP8 needs block_cols % 32 == 0 (a scale
// group never splits a 32-column step), FP4 needs cols % 32 == 0. Others go to the generic one.
inline bool SimdHandles(const WeightMatrix& w) {
  if (w.format == WeightFormat::kFP8E4M3) return w.block_cols > 0 && w.block_cols % 32 == 0;
  if (w.format == WeightFormat::kFP4E2M1) return w.cols % 32 == 0;
  return true;
}

}  // namespace expertmesh::kernels::internal
