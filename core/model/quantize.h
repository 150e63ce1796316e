// The quantization-aware-training roundings that are part of the DeepSeek-V4 model (MODEL.md,
// Numerics contract): blocks of values share a power-of-two scale 2^ceil(log2(amax/qmax)) and
// each value is rounded to the nearest FP8 e4m3 (blocks of 64) or FP4 e2m1 (blocks of 32) grid
// value, ties to even. The rounded values are exactly code * 2^exponent, which is what the
// state serializer stores.
#pragma once

#include <cstdint>

namespace expertmesh::model {

inline constexpr int kFp8Block = 64;
inline constexpr int kFp4Block = 32;
inline constexpr float kFp8Max = 448.0f;
inline constexpr float kFp4Max = 6.0f;

// Exponent k of the block scale 2^k for a block whose largest magnitude is `amax`:
// k = ceil(log2(max(amax, floor) / qmax)), computed exactly (no log2 rounding).
int BlockScaleExponent(float amax, float qmax, float amax_floor);

// Nearest e4m3 / e2m1 grid value of v, ties to even. REQUIRES |v| <= 448 / 6 (callers clamp).
float RoundToE4M3(float v);
float RoundToE2M1(float v);

// In-place QAT rounding of x[0..n) in consecutive blocks (the last block may be shorter).
// FP8: qmax 448, amax floor 1e-4. FP4: qmax 6, amax floor 6 * 2^-126.
void RoundFp8Blocks(float* x, int64_t n, int block = kFp8Block);
void RoundFp4Blocks(float* x, int64_t n, int block = kFp4Block);

// Codes of exact grid values (v must be a value RoundToE4M3 / RoundToE2M1 can return; returns
// false otherwise, so a serializer can fall back to raw floats).
bool EncodeE4M3(float v, uint8_t* code);
bool EncodeE2M1(float v, uint8_t* code);

}  // namespace expertmesh::model
