// Scalar reference kernels and the element decoders they share with the SIMD variants.
#include <cmath>
#include <cstring>
#include <vector>

#include "core/kernels/matmul.h"

namespace expertmesh::kernels {

float DecodeE4M3(uint8_t byte) {
  const int sign = byte >> 7;
  const int exp = (byte >> 3) & 0xF;
  const int mant = byte & 0x7;
  float v;
  if (exp == 0xF && mant == 0x7) {
    v = std::nanf("");  // e4m3 "fn": no infinities, only this NaN pattern
  } else if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant) / 8.0f, -6);  // subnormal
  } else {
    v = std::ldexp(1.0f + static_cast<float>(mant) / 8.0f, exp - 7);
  }
  return sign ? -v : v;
}

float DecodeE2M1(uint8_t nibble) {
  static constexpr float kMagnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float v = kMagnitude[nibble & 0x7];
  return (nibble & 0x8) ? -v : v;
}

float DecodeE8M0(uint8_t byte) {
  if (byte == 0xFF) return std::nanf("");
  return std::ldexp(1.0f, static_cast<int>(byte) - 127);
}

float DecodeBF16(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

namespace {

float ScaleAt(const WeightMatrix& w, int64_t index) {
  if (w.scale_format == ScaleFormat::kE8M0) {
    return DecodeE8M0(static_cast<const uint8_t*>(w.scales)[index]);
  }
  return static_cast<const float*>(w.scales)[index];
}

}  // namespace

void DequantizeRow(const WeightMatrix& w, int64_t row, float* out) {
  const int64_t cols = w.cols;
  switch (w.format) {
    case WeightFormat::kF32:
      std::memcpy(out, static_cast<const float*>(w.data) + row * cols, cols * sizeof(float));
      return;
    case WeightFormat::kBF16: {
      const uint16_t* p = static_cast<const uint16_t*>(w.data) + row * cols;
      for (int64_t c = 0; c < cols; ++c) out[c] = DecodeBF16(p[c]);
      return;
    }
    case WeightFormat::kFP8E4M3: {
      const uint8_t* p = static_cast<const uint8_t*>(w.data) + row * cols;
      const int64_t scale_cols = (cols + w.block_cols - 1) / w.block_cols;
      const int64_t scale_row = row / w.block_rows;
      for (int64_t c = 0; c < cols; ++c) {
        out[c] = DecodeE4M3(p[c]) * ScaleAt(w, scale_row * scale_cols + c / w.block_cols);
      }
      return;
    }
    case WeightFormat::kFP4E2M1: {
      const uint8_t* p = static_cast<const uint8_t*>(w.data) + row * (cols / 2);
      const int64_t groups = cols / 32;
      for (int64_t c = 0; c < cols; ++c) {
        const uint8_t byte = p[c / 2];
        const uint8_t nibble = (c & 1) ? (byte >> 4) : (byte & 0xF);
        out[c] = DecodeE2M1(nibble) * ScaleAt(w, row * groups + c / 32);
      }
      return;
    }
  }
}

void MatMulReference(const WeightMatrix& w, const float* x, int64_t n, float* y) {
  std::vector<float> row(static_cast<size_t>(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    DequantizeRow(w, r, row.data());
    for (int64_t i = 0; i < n; ++i) {
      const float* xi = x + i * w.cols;
      double acc = 0.0;
      for (int64_t c = 0; c < w.cols; ++c) acc += static_cast<double>(row[c]) * xi[c];
      y[i * w.rows + r] = static_cast<float>(acc);
    }
  }
}

}  // namespace expertmesh::kernels
