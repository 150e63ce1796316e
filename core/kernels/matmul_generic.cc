// The portable kernel: dequantizes one weight row at a time (table lookups) and
// reuses it for every activation row, with eight independent partial sums per dot product so the
// compiler can vectorize it for the baseline ISA.
#include <algorithm>

#include "core/kernels/matmul_internal.h"

namespace expertmesh::kernels::internal {
namespace {

float Dot(const float* a, const float* b, int64_t len) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) {
    for (int j = 0; j < 8; ++j) s[j] += a[k + j] * b[k + j];
  }
  for (; k < len; ++k) s[0] += a[k] * b[k];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Value tables built once from the reference decoders, so the generic kernel decodes with one
// load per element instead of the reference's ldexp.
struct Tables {
  float e4m3[256];
  float e2m1[16];
  float e8m0[256];
  Tables() {
    for (int b = 0; b < 256; ++b) {
      e4m3[b] = DecodeE4M3(static_cast<uint8_t>(b));
      e8m0[b] = DecodeE8M0(static_cast<uint8_t>(b));
    }
    for (int q = 0; q < 16; ++q) e2m1[q] = DecodeE2M1(static_cast<uint8_t>(q));
  }
};

const Tables& GetTables() {
  static const Tables tables;
  return tables;
}

float Scale(const WeightMatrix& w, const Tables& t, int64_t index) {
  if (w.scale_format == ScaleFormat::kE8M0)
    return t.e8m0[static_cast<const uint8_t*>(w.scales)[index]];
  return static_cast<const float*>(w.scales)[index];
}

// Row r of W in float32 (the same values as DequantizeRow).
void DecodeRow(const WeightMatrix& w, int64_t r, float* out) {
  const Tables& t = GetTables();
  const int64_t cols = w.cols;
  switch (w.format) {
    case WeightFormat::kF32:
    case WeightFormat::kBF16:
      DequantizeRow(w, r, out);
      return;
    case WeightFormat::kFP8E4M3: {
      const uint8_t* p = static_cast<const uint8_t*>(w.data) + r * cols;
      const int64_t bc = w.block_cols;
      const int64_t scale_row = (r / w.block_rows) * ((cols + bc - 1) / bc);
      for (int64_t c0 = 0, g = 0; c0 < cols; c0 += bc, ++g) {
        const float s = Scale(w, t, scale_row + g);
        const int64_t c1 = std::min(cols, c0 + bc);
        for (int64_t c = c0; c < c1; ++c) out[c] = t.e4m3[p[c]] * s;
      }
      return;
    }
    case WeightFormat::kFP4E2M1: {
      const uint8_t* p = static_cast<const uint8_t*>(w.data) + r * (cols / 2);
      const int64_t groups = cols / 32;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = Scale(w, t, r * groups + g);
        for (int j = 0; j < 16; ++j) {
          const uint8_t b = p[g * 16 + j];
          out[g * 32 + 2 * j] = t.e2m1[b & 0xF] * s;
          out[g * 32 + 2 * j + 1] = t.e2m1[b >> 4] * s;
        }
      }
      return;
    }
  }
}

}  // namespace

void MatMulRowsGeneric(const WeightMatrix& w, const PreparedX& x, float* y, int64_t row_begin,
                       int64_t row_end, float* scratch) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* row = scratch;
    if (w.format == WeightFormat::kF32) {
      row = static_cast<const float*>(w.data) + r * w.cols;
    } else {
      DecodeRow(w, r, scratch);
    }
    for (int64_t i = 0; i < x.n; ++i) y[i * w.rows + r] = Dot(row, x.data + i * x.stride, w.cols);
  }
}

}  // namespace expertmesh::kernels::internal
