#include "core/model/quantize.h"

#include <cmath>
#include <vector>

#include "core/kernels/matmul.h"
#include "gtest/gtest.h"

namespace expertmesh::model {
namespace {

TEST(Quantize, ScaleExponentIsExactCeilLog2) {
  EXPECT_EQ(BlockScaleExponent(448.0f, 448.0f, 1e-4f), 0);
  EXPECT_EQ(BlockScaleExponent(448.001f, 448.0f, 1e-4f), 1);
  EXPECT_EQ(BlockScaleExponent(224.0f, 448.0f, 1e-4f), -1);
  EXPECT_EQ(BlockScaleExponent(6.0f, 6.0f, 0.0f), 0);
  // The floor applies to all-zero blocks.
  EXPECT_EQ(BlockScaleExponent(0.0f, 448.0f, 1e-4f),
            static_cast<int>(std::ceil(std::log2(1e-4 / 448.0))));
}

TEST(Quantize, E4M3RoundsToNearestGridValueTiesToEven) {
  // Every code's value is a fixed point of the rounding.
  for (int c = 0; c < 0x7F; ++c) {
    float v = kernels::DecodeE4M3(static_cast<uint8_t>(c));
    EXPECT_EQ(RoundToE4M3(v), v) << c;
    EXPECT_EQ(RoundToE4M3(-v), -v) << c;
    uint8_t code = 0;
    ASSERT_TRUE(EncodeE4M3(v, &code));
    EXPECT_EQ(code, c);
  }
  // Between 1 (mantissa 000) and 1.125 (001): the midpoint goes to the even mantissa.
  EXPECT_EQ(RoundToE4M3(1.0625f), 1.0f);
  // Between 1.125 (001) and 1.25 (010): midpoint to 1.25.
  EXPECT_EQ(RoundToE4M3(1.1875f), 1.25f);
  EXPECT_EQ(RoundToE4M3(1.1f), 1.125f);
  // Subnormals: step 2^-9.
  EXPECT_EQ(RoundToE4M3(1.4f * 0x1p-9f), 0x1p-9f);
  EXPECT_EQ(RoundToE4M3(0.5f * 0x1p-9f), 0.0f);
  EXPECT_EQ(RoundToE4M3(448.0f), 448.0f);
  uint8_t code;
  EXPECT_FALSE(EncodeE4M3(1.1f, &code));
}

TEST(Quantize, E2M1RoundsToNearestGridValueTiesToEven) {
  EXPECT_EQ(RoundToE2M1(0.25f), 0.0f);
  EXPECT_EQ(RoundToE2M1(0.75f), 1.0f);
  EXPECT_EQ(RoundToE2M1(1.25f), 1.0f);
  EXPECT_EQ(RoundToE2M1(1.75f), 2.0f);
  EXPECT_EQ(RoundToE2M1(2.5f), 2.0f);
  EXPECT_EQ(RoundToE2M1(3.5f), 4.0f);
  EXPECT_EQ(RoundToE2M1(5.0f), 4.0f);
  EXPECT_EQ(RoundToE2M1(5.1f), 6.0f);
  EXPECT_EQ(RoundToE2M1(-2.9f), -3.0f);
  for (int c = 0; c < 16; ++c) {
    float v = kernels::DecodeE2M1(static_cast<uint8_t>(c));
    uint8_t code = 0;
    ASSERT_TRUE(EncodeE2M1(v, &code));
    EXPECT_EQ(kernels::DecodeE2M1(code), v);
  }
}

TEST(Quantize, BlocksShareAPowerOfTwoScale) {
  std::vector<float> x(100);
  for (int i = 0; i < 100; ++i) x[i] = std::sin(i * 0.37f) * (i < 64 ? 1000.0f : 0.01f);
  std::vector<float> y = x;
  RoundFp8Blocks(y.data(), 100);
  for (int b = 0; b < 2; ++b) {
    const int lo = b * 64, hi = b == 0 ? 64 : 100;
    float amax = 0;
    for (int i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(x[i]));
    const int k = BlockScaleExponent(amax, 448.0f, 1e-4f);
    for (int i = lo; i < hi; ++i) {
      float v = std::ldexp(y[i], -k);
      uint8_t code;
      EXPECT_TRUE(EncodeE4M3(v, &code)) << i;
      // Nearest: the error is at most half a step of the grid around the value.
      EXPECT_LE(std::fabs(y[i] - x[i]), std::fabs(x[i]) * 0.0625f + std::ldexp(0x1p-10f, k));
    }
  }
  std::vector<float> z(64, 0.0f);
  z[3] = 12.0f;  // amax 12 -> scale 2^1, 12/2 = 6 fits the grid exactly
  z[5] = 2.6f;   // 1.3 at scale 2 -> 1.5 -> 3.0
  RoundFp4Blocks(z.data(), 64);
  EXPECT_EQ(z[3], 12.0f);
  EXPECT_EQ(z[5], 3.0f);
}

}  // namespace
}  // namespace expertmesh::model
