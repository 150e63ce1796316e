#include "core/state/codes.h"

#include <algorithm>
#include <cmath>

#include "core/kernels/matmul.h"
#include "core/model/quantize.h"

namespace expertmesh::state::internal {
namespace {

// Codes for one block and the exponent k with x == code * 2^k exactly, or false.
bool EncodeScaled(const float* x, int len, float qmax, float floor, bool fp4, uint8_t* codes,
                  int* k_out) {
  float amax = 0;
  for (int i = 0; i < len; ++i) amax = std::max(amax, std::fabs(x[i]));
  const int k0 = model::BlockScaleExponent(amax, qmax, floor);
  // Rounding up to a power of two can lower the exponent by one; both decode exactly.
  for (int k : {k0, k0 + 1}) {
    if (k + 127 < 0 || k + 127 >= kRawBlock) continue;
    bool ok = true;
    for (int i = 0; i < len && ok; ++i) {
      const float v = std::ldexp(x[i], -k);
      ok = fp4 ? model::EncodeE2M1(v, &codes[i]) : model::EncodeE4M3(v, &codes[i]);
      if (ok && std::ldexp(v, k) != x[i]) ok = false;
    }
    if (ok) {
      *k_out = k;
      return true;
    }
  }
  return false;
}

}  // namespace

void Writer::Fp8Blocks(const float* x, int n) {
  uint8_t codes[model::kFp8Block];
  for (int b = 0; b < n; b += model::kFp8Block) {
    const int len = std::min(model::kFp8Block, n - b);
    int k = 0;
    if (EncodeScaled(x + b, len, model::kFp8Max, 1e-4f, false, codes, &k)) {
      U8(static_cast<uint8_t>(k + 127));
      Raw(codes, len);
    } else {
      U8(kRawBlock);
      F32(x + b, len);
    }
  }
}

void Writer::Fp4Blocks(const float* x, int n) {
  uint8_t codes[model::kFp4Block];
  for (int b = 0; b < n; b += model::kFp4Block) {
    const int len = std::min(model::kFp4Block, n - b);
    int k = 0;
    if (EncodeScaled(x + b, len, model::kFp4Max, 6.0f * 0x1p-126f, true, codes, &k)) {
      U8(static_cast<uint8_t>(k + 127));
      for (int i = 0; i < len; i += 2) {
        U8(static_cast<uint8_t>(codes[i] | ((i + 1 < len ? codes[i + 1] : 0) << 4)));
      }
    } else {
      U8(kRawBlock);
      F32(x + b, len);
    }
  }
}

void Reader::Fp8Blocks(float* x, int n) {
  for (int b = 0; b < n && ok_; b += model::kFp8Block) {
    const int len = std::min(model::kFp8Block, n - b);
    const uint8_t e = U8();
    if (e == kRawBlock) {
      F32(x + b, len);
      continue;
    }
    for (int i = 0; i < len; ++i) {
      x[b + i] = std::ldexp(kernels::DecodeE4M3(U8()), static_cast<int>(e) - 127);
    }
  }
}

void Reader::Fp4Blocks(float* x, int n) {
  for (int b = 0; b < n && ok_; b += model::kFp4Block) {
    const int len = std::min(model::kFp4Block, n - b);
    const uint8_t e = U8();
    if (e == kRawBlock) {
      F32(x + b, len);
      continue;
    }
    for (int i = 0; i < len; i += 2) {
      const uint8_t byte = U8();
      x[b + i] = std::ldexp(kernels::DecodeE2M1(byte & 0xF), static_cast<int>(e) - 127);
      if (i + 1 < len) {
        x[b + i + 1] = std::ldexp(kernels::DecodeE2M1(byte >> 4), static_cast<int>(e) - 127);
      }
    }
  }
}

int64_t Fp8Bytes(int64_t n) { return n + (n + model::kFp8Block - 1) / model::kFp8Block; }

int64_t Fp4Bytes(int64_t n) {
  const int64_t full = n / model::kFp4Block, tail = n % model::kFp4Block;
  return full * (1 + model::kFp4Block / 2) + (tail > 0 ? 1 + (tail + 1) / 2 : 0);
}

}  // namespace expertmesh::state::internal
