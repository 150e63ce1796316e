#include "core/model/quantize.h"

#include <algorithm>
#include <array>
#include <cmath>

#include "core/kernels/matmul.h"

namespace expertmesh::model {

int BlockScaleExponent(float amax, float qmax, float amax_floor) {
  float ratio = std::max(amax, amax_floor) / qmax;
  int e = 0;
  float m = std::frexp(ratio, &e);  // ratio = m * 2^e, m in [0.5, 1)
  return m == 0.5f ? e - 1 : e;
}

namespace {

// Rounds v to a multiple of `step` (a power of two), ties to even multiple.
float RoundToStep(float v, float step) { return std::nearbyint(v / step) * step; }

}  // namespace

float RoundToE4M3(float v) {
  float a = std::fabs(v);
  if (a == 0.0f) return v;
  // Normal numbers have 3 mantissa bits; below 2^-6 the subnormal step is 2^-9.
  float step;
  if (a < 0x1p-6f) {
    step = 0x1p-9f;
  } else {
    int e = 0;
    std::frexp(a, &e);  // a in [2^(e-1), 2^e)
    step = std::ldexp(1.0f, e - 1 - 3);
  }
  float r = RoundToStep(a, step);
  return std::copysign(std::min(r, kFp8Max), v);
}

float RoundToE2M1(float v) {
  static constexpr float kGrid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  float a = std::min(std::fabs(v), kFp4Max);
  int best = 0;
  for (int i = 1; i < 8; ++i) {
    float d_best = std::fabs(a - kGrid[best]);
    float d = std::fabs(a - kGrid[i]);
    // Ties go to the even code (even mantissa bit).
    if (d < d_best || (d == d_best && (i % 2 == 0))) best = i;
  }
  return std::copysign(kGrid[best], v);
}

namespace {

template <float (*Round)(float)>
void RoundBlocks(float* x, int64_t n, int block, float qmax, float amax_floor) {
  for (int64_t b = 0; b < n; b += block) {
    int64_t len = std::min<int64_t>(block, n - b);
    float amax = 0.0f;
    for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(x[b + i]));
    int k = BlockScaleExponent(amax, qmax, amax_floor);
    for (int64_t i = 0; i < len; ++i) {
      float v = std::ldexp(x[b + i], -k);
      v = std::clamp(v, -qmax, qmax);
      x[b + i] = std::ldexp(Round(v), k);
    }
  }
}

}  // namespace

void RoundFp8Blocks(float* x, int64_t n, int block) {
  RoundBlocks<RoundToE4M3>(x, n, block, kFp8Max, 1e-4f);
}

void RoundFp4Blocks(float* x, int64_t n, int block) {
  RoundBlocks<RoundToE2M1>(x, n, block, kFp4Max, 6.0f * 0x1p-126f);
}

bool EncodeE4M3(float v, uint8_t* code) {
  // Codes 0x00..0x7E are the non-negative values in increasing order.
  static const std::array<float, 0x7F> kValues = [] {
    std::array<float, 0x7F> t{};
    for (int c = 0; c < 0x7F; ++c) t[c] = kernels::DecodeE4M3(static_cast<uint8_t>(c));
    return t;
  }();
  float a = std::fabs(v);
  auto it = std::lower_bound(kValues.begin(), kValues.end(), a);
  if (it == kValues.end() || *it != a) return false;
  *code = static_cast<uint8_t>((std::signbit(v) ? 0x80 : 0x00) | (it - kValues.begin()));
  return true;
}

bool EncodeE2M1(float v, uint8_t* code) {
  uint8_t sign = std::signbit(v) ? 0x8 : 0x0;
  for (int c = 0; c < 8; ++c) {
    if (kernels::DecodeE2M1(static_cast<uint8_t>(c)) == std::fabs(v)) {
      *code = static_cast<uint8_t>(sign | c);
      return true;
    }
  }
  return false;
}

}  // namespace expertmesh::model
