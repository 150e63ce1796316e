#include "core/model/ops.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace expertmesh::model {
namespace {

TEST(Ops, HadamardIsOrthonormalSylvester) {
  // Column j of H/sqrt(n): transform of the unit vector e_j; entry i is (-1)^popcount(i&j).
  const int n = 16;
  for (int j = 0; j < n; ++j) {
    std::vector<float> x(n, 0.0f);
    x[j] = 1.0f;
    HadamardTransform(x.data(), n);
    for (int i = 0; i < n; ++i) {
      float want = (__builtin_popcount(i & j) % 2 ? -1.0f : 1.0f) / 4.0f;
      EXPECT_FLOAT_EQ(x[i], want);
    }
  }
}

TEST(Ops, RmsNorm) {
  std::vector<float> x = {3.0f, 4.0f}, w = {1.0f, 2.0f}, out(2);
  RmsNorm(x.data(), w.data(), 2, 0.0f, out.data());
  const float rms = std::sqrt(12.5f);
  EXPECT_NEAR(out[0], 3.0f / rms, 1e-6);
  EXPECT_NEAR(out[1], 8.0f / rms, 1e-6);
}

ModelConfig RopeConfig() {
  ModelConfig c;
  c.qk_rope_head_dim = 8;
  c.rope_theta = 10000.0;
  c.compress_rope_theta = 160000.0;
  c.rope_scaling = {16.0, 32.0, 1.0, 65536};
  return c;
}

TEST(Ops, RopeRotatesPairsAndInverts) {
  Rope rope(RopeConfig(), false);
  std::vector<float> cs(4), sn(4);
  rope.Angles(3, cs.data(), sn.data());
  // Pair 0 has frequency 1: angle 3.
  EXPECT_NEAR(cs[0], std::cos(3.0f), 1e-6);
  EXPECT_NEAR(sn[0], std::sin(3.0f), 1e-6);
  // Pair 1: 10000^(-2/8).
  EXPECT_NEAR(cs[1], std::cos(3.0 * std::pow(10000.0, -0.25)), 1e-6);
  std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8}, y = x;
  rope.Apply(y.data(), cs.data(), sn.data(), false);
  EXPECT_NEAR(y[0], 1 * std::cos(3.0f) - 2 * std::sin(3.0f), 1e-5);
  EXPECT_NEAR(y[1], 1 * std::sin(3.0f) + 2 * std::cos(3.0f), 1e-5);
  rope.Apply(y.data(), cs.data(), sn.data(), true);
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(y[i], x[i], 1e-5);
}

TEST(Ops, YarnScalesOnlyLowFrequencies) {
  // r = 8, base 160000, orig 65536: low = floor(8 ln(65536/(64 pi)) / (2 ln 160000)) = 1,
  // high = ceil(8 ln(65536/(2 pi)) / (2 ln 160000)) = 4 -> clamped to 4 (<= r-1).
  Rope rope(RopeConfig(), true);
  std::vector<float> cs(4), sn(4);
  rope.Angles(1, cs.data(), sn.data());
  const double base = 160000.0;
  for (int i = 0; i < 4; ++i) {
    double f = std::pow(base, -2.0 * i / 8);
    double ramp = std::clamp((i - 1.0) / (4.0 - 1.0), 0.0, 1.0);
    double want = f / 16.0 * ramp + f * (1 - ramp);
    EXPECT_NEAR(std::atan2(sn[i], cs[i]), want, 1e-6) << i;
  }
}

}  // namespace
}  // namespace expertmesh::model
