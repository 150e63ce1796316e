// Checks every kernel target this CPU runs against the scalar reference (MatMulReference), the
// element decoders against independent formulas, and the kernel thread pool.
#include "core/kernels/matmul.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/kernels/thread_pool.h"

namespace expertmesh::kernels {
namespace {

// ---------- element decoders vs formulas written independently of matmul_ref.cc ----------

TEST(DecodeTest, E4M3AllBytes) {
  for (int b = 0; b < 256; ++b) {
    const int sign = (b & 0x80) ? -1 : 1;
    const int e = (b >> 3) & 0xF;
    const int m = b & 0x7;
    const float got = DecodeE4M3(static_cast<uint8_t>(b));
    if ((b & 0x7F) == 0x7F) {
      EXPECT_TRUE(std::isnan(got)) << b;
      continue;
    }
    // Subnormal: m/8 * 2^-6 = m * 2^-9; normal: (8 + m)/8 * 2^(e-7) = (8 + m) * 2^(e-10).
    const double want =
        e == 0 ? sign * m * std::pow(2.0, -9) : sign * (8 + m) * std::pow(2.0, e - 10);
    EXPECT_EQ(static_cast<double>(got), want) << b;
    if (b == 0x80) {
      EXPECT_TRUE(std::signbit(got));
    }
  }
  EXPECT_EQ(DecodeE4M3(0x7E), 448.0f);
  EXPECT_EQ(DecodeE4M3(0xFE), -448.0f);
  EXPECT_EQ(DecodeE4M3(0x01), 1.0f / 512.0f);  // smallest subnormal
  EXPECT_EQ(DecodeE4M3(0x08), 1.0f / 64.0f);   // smallest normal
}

TEST(DecodeTest, E2M1AllCodes) {
  for (int q = 0; q < 16; ++q) {
    const int e = (q >> 1) & 3;
    const int m = q & 1;
    const double mag = e == 0 ? 0.5 * m : (2 + m) * std::pow(2.0, e - 2);
    const double want = (q & 8) ? -mag : mag;
    EXPECT_EQ(static_cast<double>(DecodeE2M1(static_cast<uint8_t>(q))), want) << q;
  }
  EXPECT_EQ(DecodeE2M1(0x7), 6.0f);
  EXPECT_EQ(DecodeE2M1(0xF), -6.0f);
}

TEST(DecodeTest, E8M0AllBytes) {
  for (int b = 0; b < 255; ++b) {
    EXPECT_EQ(static_cast<double>(DecodeE8M0(static_cast<uint8_t>(b))), std::pow(2.0, b - 127))
        << b;
  }
  EXPECT_TRUE(std::isnan(DecodeE8M0(0xFF)));
}

TEST(DecodeTest, BF16AllValues) {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const int sign = (bits & 0x8000) ? -1 : 1;
    const int e = (bits >> 7) & 0xFF;
    const int m = bits & 0x7F;
    const float got = DecodeBF16(static_cast<uint16_t>(bits));
    if (e == 0xFF) {
      EXPECT_TRUE(m == 0 ? std::isinf(got) : std::isnan(got)) << bits;
      continue;
    }
    const double want =
        e == 0 ? sign * m * std::pow(2.0, -133) : sign * (128 + m) * std::pow(2.0, e - 134);
    ASSERT_EQ(static_cast<double>(got), want) << bits;
  }
}

// ---------- random weights in every checkpoint format ----------

struct TestMatrix {
  WeightMatrix w;
  std::vector<uint8_t> data;
  std::vector<uint8_t> scales;
};

TestMatrix MakeMatrix(WeightFormat format, ScaleFormat scale_format, int64_t rows, int64_t cols,
                      std::mt19937& rng, int64_t block_rows = 128, int64_t block_cols = 128) {
  TestMatrix m;
  m.w.format = format;
  m.w.rows = rows;
  m.w.cols = cols;
  m.w.block_rows = block_rows;
  m.w.block_cols = block_cols;
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::uniform_int_distribution<int> byte(0, 255);
  int64_t num_scales = 0;
  switch (format) {
    case WeightFormat::kF32: {
      m.data.resize(rows * cols * 4);
      for (int64_t i = 0; i < rows * cols; ++i) {
        const float v = uni(rng);
        std::memcpy(m.data.data() + 4 * i, &v, 4);
      }
      break;
    }
    case WeightFormat::kBF16: {
      m.data.resize(rows * cols * 2);
      for (int64_t i = 0; i < rows * cols; ++i) {
        const float v = uni(rng) * 8.0f;
        uint32_t bits;
        std::memcpy(&bits, &v, 4);
        const uint16_t h = static_cast<uint16_t>(bits >> 16);
        std::memcpy(m.data.data() + 2 * i, &h, 2);
      }
      break;
    }
    case WeightFormat::kFP8E4M3: {
      m.data.resize(rows * cols);
      for (auto& b : m.data) {
        do {
          b = static_cast<uint8_t>(byte(rng));
        } while ((b & 0x7F) == 0x7F);  // NaN codes are tested separately
      }
      num_scales = ((rows + block_rows - 1) / block_rows) * ((cols + block_cols - 1) / block_cols);
      break;
    }
    case WeightFormat::kFP4E2M1: {
      m.data.resize(rows * cols / 2);
      for (auto& b : m.data) b = static_cast<uint8_t>(byte(rng));
      num_scales = rows * cols / 32;
      break;
    }
  }
  m.w.data = m.data.data();
  if (num_scales > 0) {
    m.w.scale_format = scale_format;
    if (scale_format == ScaleFormat::kE8M0) {
      std::uniform_int_distribution<int> exp(120, 130);
      m.scales.resize(num_scales);
      for (auto& s : m.scales) s = static_cast<uint8_t>(exp(rng));
    } else {
      std::uniform_real_distribution<float> pos(0.01f, 2.0f);
      m.scales.resize(num_scales * 4);
      for (int64_t i = 0; i < num_scales; ++i) {
        const float v = pos(rng);
        std::memcpy(m.scales.data() + 4 * i, &v, 4);
      }
    }
    m.w.scales = m.scales.data();
  }
  return m;
}

std::vector<float> RandomVector(int64_t size, std::mt19937& rng) {
  std::uniform_real_distribution<float> uni(-2.0f, 2.0f);
  std::vector<float> v(size);
  for (auto& f : v) f = uni(rng);
  return v;
}

// Sum over k of |w[r][k] x[i][k]| for every (i, r): the scale of the float32 summation error.
std::vector<double> AbsDotScale(const WeightMatrix& w, const std::vector<float>& x, int64_t n) {
  std::vector<double> out(n * w.rows);
  std::vector<float> row(w.cols);
  for (int64_t r = 0; r < w.rows; ++r) {
    DequantizeRow(w, r, row.data());
    for (int64_t i = 0; i < n; ++i) {
      double s = 0.0;
      for (int64_t k = 0; k < w.cols; ++k) s += std::fabs(double{row[k]} * x[i * w.cols + k]);
      out[i * w.rows + r] = s;
    }
  }
  return out;
}

// Every format dequantizes exactly to float32, so the kernels differ from the double-precision
// reference only by float32 summation order: a few ulps of sum|w x| for these lengths (< 1000).
double RelTolerance(WeightFormat format) {
  switch (format) {
    case WeightFormat::kF32:
    case WeightFormat::kBF16:
    case WeightFormat::kFP8E4M3:
    case WeightFormat::kFP4E2M1:
      return 2e-6;
  }
  return 0.0;
}

std::string Describe(KernelTarget t, const WeightMatrix& w, int64_t n) {
  return std::string(KernelTargetName(t)) +
         " format=" + std::to_string(static_cast<int>(w.format)) +
         " scale=" + std::to_string(static_cast<int>(w.scale_format)) + " " +
         std::to_string(w.rows) + "x" + std::to_string(w.cols) + " n=" + std::to_string(n);
}

class TargetTest : public ::testing::Test {
 protected:
  void TearDown() override {
    ResetKernelTargetForTest();
    SetKernelThreads(0);
  }

  // Runs MatMul on every supported target and compares with the reference.
  void CheckAllTargets(const WeightMatrix& w, int64_t n, std::mt19937& rng) {
    const std::vector<float> x = RandomVector(n * w.cols, rng);
    std::vector<float> want(n * w.rows);
    MatMulReference(w, x.data(), n, want.data());
    const std::vector<double> scale = AbsDotScale(w, x, n);
    for (KernelTarget t : SupportedKernelTargets()) {
      ASSERT_TRUE(ForceKernelTargetForTest(t));
      std::vector<float> got(n * w.rows, -12345.0f);
      MatMul(w, x.data(), n, got.data());
      int bad = 0;
      for (int64_t j = 0; j < n * w.rows && bad < 5; ++j) {
        const double tol = RelTolerance(w.format) * scale[j] + 1e-30;
        if (!(std::fabs(double{got[j]} - want[j]) <= tol)) {
          ADD_FAILURE() << Describe(t, w, n) << " at i=" << j / w.rows << " r=" << j % w.rows
                        << ": got " << got[j] << " want " << want[j] << " tol " << tol;
          ++bad;
        }
      }
    }
    ResetKernelTargetForTest();
  }
};

TEST_F(TargetTest, AllFormatsOddShapes) {
  std::mt19937 rng(1234);
  const int64_t kRows[] = {1, 5, 37, 133};
  const int64_t kCols[] = {40, 129, 300};
  const int64_t kFp4Cols[] = {32, 96, 320};
  const int64_t kN[] = {1, 2, 5, 33};
  struct Case {
    WeightFormat format;
    ScaleFormat scale;
  };
  const Case kCases[] = {
      {WeightFormat::kF32, ScaleFormat::kNone},     {WeightFormat::kBF16, ScaleFormat::kNone},
      {WeightFormat::kFP8E4M3, ScaleFormat::kE8M0}, {WeightFormat::kFP8E4M3, ScaleFormat::kF32},
      {WeightFormat::kFP4E2M1, ScaleFormat::kE8M0}, {WeightFormat::kFP4E2M1, ScaleFormat::kF32}};
  for (const Case& c : kCases) {
    for (int64_t rows : kRows) {
      for (int ci = 0; ci < 3; ++ci) {
        const int64_t cols = c.format == WeightFormat::kFP4E2M1 ? kFp4Cols[ci] : kCols[ci];
        // Small FP8 blocks so these shapes cross several row and column blocks.
        const TestMatrix m = MakeMatrix(c.format, c.scale, rows, cols, rng, 16, 64);
        for (int64_t n : kN) CheckAllTargets(m.w, n, rng);
      }
    }
  }
}

TEST_F(TargetTest, CheckpointBlocksAndThreads) {
  std::mt19937 rng(99);
  // Large enough to be split over the pool; 128x128 FP8 blocks as in real checkpoints, with a
  // partial last block in both directions.
  for (int threads : {1, 3}) {
    SetKernelThreads(threads);
    const TestMatrix fp8 = MakeMatrix(WeightFormat::kFP8E4M3, ScaleFormat::kE8M0, 300, 1000, rng);
    for (int64_t n : {1, 2, 5}) CheckAllTargets(fp8.w, n, rng);
    const TestMatrix fp4 = MakeMatrix(WeightFormat::kFP4E2M1, ScaleFormat::kE8M0, 290, 1024, rng);
    for (int64_t n : {1, 3}) CheckAllTargets(fp4.w, n, rng);
  }
}

// 96-column blocks straddle the GEMM path's 512-column tiles (a scale change inside a tile and a
// tile that starts inside a block).
// Long rows: more columns than the SIMD kernels' scratch tile (the generic kernel dequantizes a
// whole row into the same scratch).
TEST_F(TargetTest, LongRows) {
  std::mt19937 rng(23);
  for (WeightFormat f : {WeightFormat::kFP8E4M3, WeightFormat::kFP4E2M1, WeightFormat::kBF16}) {
    const TestMatrix m = MakeMatrix(f, ScaleFormat::kE8M0, 9, 8192 + 96, rng);
    for (int64_t n : {1, 3}) CheckAllTargets(m.w, n, rng);
  }
}

TEST_F(TargetTest, FP8BlocksNotDividingTheColumnTile) {
  std::mt19937 rng(17);
  const TestMatrix m =
      MakeMatrix(WeightFormat::kFP8E4M3, ScaleFormat::kE8M0, 40, 1100, rng, 32, 96);
  for (int64_t n : {1, 2, 4}) CheckAllTargets(m.w, n, rng);
}

TEST_F(TargetTest, FP8BlockColsNotMultipleOf32UsesGenericPath) {
  std::mt19937 rng(5);
  const TestMatrix m = MakeMatrix(WeightFormat::kFP8E4M3, ScaleFormat::kF32, 20, 100, rng, 8, 24);
  for (int64_t n : {1, 5}) CheckAllTargets(m.w, n, rng);
}

TEST_F(TargetTest, ThreadCountDoesNotChangeResults) {
  std::mt19937 rng(7);
  const TestMatrix m = MakeMatrix(WeightFormat::kFP8E4M3, ScaleFormat::kE8M0, 515, 1024, rng);
  const std::vector<float> x = RandomVector(3 * 1024, rng);
  for (KernelTarget t : SupportedKernelTargets()) {
    ASSERT_TRUE(ForceKernelTargetForTest(t));
    SetKernelThreads(1);
    std::vector<float> one(3 * 515), many(3 * 515);
    MatMul(m.w, x.data(), 3, one.data());
    SetKernelThreads(4);
    MatMul(m.w, x.data(), 3, many.data());
    EXPECT_EQ(one, many) << KernelTargetName(t);
  }
}

// x = unit vectors, so y[i][r] = W[r][i] exactly: every code and scale byte through every SIMD
// decoder, compared with the reference dequantization.
TEST_F(TargetTest, EveryCodeAndScaleDecodesExactly) {
  std::vector<uint8_t> fp8(2 * 256);
  std::vector<uint8_t> fp8_scales = {127, 3};  // 1 and 2^-124 (small, still exact)
  for (int c = 0; c < 256; ++c) {
    fp8[c] = static_cast<uint8_t>((c & 0x7F) == 0x7F ? 0x00 : c);
    fp8[256 + c] = static_cast<uint8_t>(255 - c == 0x7F || 255 - c == 0xFF ? 0x80 : 255 - c);
  }
  WeightMatrix w8;
  w8.format = WeightFormat::kFP8E4M3;
  w8.scale_format = ScaleFormat::kE8M0;
  w8.data = fp8.data();
  w8.scales = fp8_scales.data();
  w8.rows = 2;
  w8.cols = 256;
  w8.block_rows = 1;
  w8.block_cols = 256;

  // FP4: 32 rows of 8 groups: 256 group scales.
  const int64_t rows4 = 32, cols4 = 256;
  std::vector<uint8_t> fp4(rows4 * cols4 / 2);
  std::vector<uint8_t> fp4_scales(rows4 * cols4 / 32);
  for (size_t i = 0; i < fp4.size(); ++i) fp4[i] = static_cast<uint8_t>(i * 37 + 11);
  // 0 (a subnormal scale) .. 252, the largest for which 6 * scale is still finite.
  for (size_t i = 0; i < fp4_scales.size(); ++i) fp4_scales[i] = static_cast<uint8_t>(i % 253);
  WeightMatrix w4;
  w4.format = WeightFormat::kFP4E2M1;
  w4.scale_format = ScaleFormat::kE8M0;
  w4.data = fp4.data();
  w4.scales = fp4_scales.data();
  w4.rows = rows4;
  w4.cols = cols4;

  for (const WeightMatrix* w : {&w8, &w4}) {
    std::vector<float> eye(w->cols * w->cols, 0.0f);
    for (int64_t i = 0; i < w->cols; ++i) eye[i * w->cols + i] = 1.0f;
    std::vector<float> row(w->cols);
    for (KernelTarget t : SupportedKernelTargets()) {
      ASSERT_TRUE(ForceKernelTargetForTest(t));
      std::vector<float> y(w->cols * w->rows);
      MatMul(*w, eye.data(), w->cols, y.data());
      for (int64_t r = 0; r < w->rows; ++r) {
        DequantizeRow(*w, r, row.data());
        for (int64_t i = 0; i < w->cols; ++i) {
          ASSERT_EQ(y[i * w->rows + r], row[i])
              << KernelTargetName(t) << " format " << static_cast<int>(w->format) << " r=" << r
              << " col=" << i;
        }
      }
      // The GEMV path decodes in registers rather than into a tile: check it per column too.
      for (int64_t i = 0; i < w->cols; i += 7) {
        std::vector<float> y1(w->rows);
        MatMul(*w, eye.data() + i * w->cols, 1, y1.data());
        for (int64_t r = 0; r < w->rows; ++r) {
          DequantizeRow(*w, r, row.data());
          ASSERT_EQ(y1[r], row[i]) << KernelTargetName(t) << " r=" << r << " col=" << i;
        }
      }
    }
  }
}

TEST_F(TargetTest, NaNCodesAndScalesPropagate) {
  std::mt19937 rng(3);
  for (int64_t n : {1, 4}) {
    TestMatrix m = MakeMatrix(WeightFormat::kFP8E4M3, ScaleFormat::kE8M0, 6, 256, rng, 2, 128);
    m.data[0 * 256 + 77] = 0x7F;   // row 0: NaN code
    m.data[2 * 256 + 200] = 0xFF;  // row 2: negative NaN code
    m.scales[2 * 2 + 1] = 0xFF;    // rows 4-5, column block 1: NaN scale
    const std::vector<float> x = RandomVector(n * 256, rng);
    for (KernelTarget t : SupportedKernelTargets()) {
      ASSERT_TRUE(ForceKernelTargetForTest(t));
      std::vector<float> y(n * 6);
      MatMul(m.w, x.data(), n, y.data());
      for (int64_t i = 0; i < n; ++i) {
        for (int r = 0; r < 6; ++r) {
          EXPECT_EQ(std::isnan(y[i * 6 + r]), r == 0 || r == 2 || r >= 4)
              << KernelTargetName(t) << " n=" << n << " r=" << r;
        }
      }
    }
  }
}

// ---------- batch invariance (MODEL.md): y[i][r] depends on x row i and W only ----------

struct FormatCase {
  WeightFormat format;
  ScaleFormat scale;
};
constexpr FormatCase kAllFormats[] = {
    {WeightFormat::kF32, ScaleFormat::kNone},     {WeightFormat::kBF16, ScaleFormat::kNone},
    {WeightFormat::kFP8E4M3, ScaleFormat::kE8M0}, {WeightFormat::kFP8E4M3, ScaleFormat::kF32},
    {WeightFormat::kFP4E2M1, ScaleFormat::kE8M0}, {WeightFormat::kFP4E2M1, ScaleFormat::kF32}};

class BatchInvarianceTest : public TargetTest {
 protected:
  void TearDown() override {
    SetKernelVariantForBench(KernelVariant::kInvariant);
    TargetTest::TearDown();
  }

  // The pool row that sits at batch position i of a batch of n: a different row at each
  // position for each n, so every row is seen at many positions and beside many neighbours.
  static int64_t PoolRow(int64_t i, int64_t n, int64_t pool) { return (3 * i + n) % pool; }

  // Number of output elements of MatMul(w, batch of n) that are not bit-identical to the same
  // row's n = 1 product, over n = 1..max_n and kernel threads 1 and 2, on the active target.
  // Reports the first few differences when `report`.
  int64_t CountVariantBits(const WeightMatrix& w, const std::vector<float>& pool, int64_t max_n,
                           bool report) {
    const int64_t pool_rows = static_cast<int64_t>(pool.size()) / w.cols;
    SetKernelThreads(1);
    std::vector<float> single(pool_rows * w.rows);
    for (int64_t p = 0; p < pool_rows; ++p) {
      MatMul(w, pool.data() + p * w.cols, 1, single.data() + p * w.rows);
    }
    int64_t diffs = 0;
    for (int threads : {1, 2}) {
      SetKernelThreads(threads);
      for (int64_t n = 1; n <= max_n; ++n) {
        std::vector<float> x(n * w.cols);
        for (int64_t i = 0; i < n; ++i) {
          std::memcpy(x.data() + i * w.cols, pool.data() + PoolRow(i, n, pool_rows) * w.cols,
                      w.cols * sizeof(float));
        }
        std::vector<float> y(n * w.rows, -12345.0f);
        MatMul(w, x.data(), n, y.data());
        for (int64_t i = 0; i < n; ++i) {
          const float* want = single.data() + PoolRow(i, n, pool_rows) * w.rows;
          const float* got = y.data() + i * w.rows;
          if (std::memcmp(got, want, w.rows * sizeof(float)) == 0) continue;
          for (int64_t r = 0; r < w.rows; ++r) {
            if (std::memcmp(got + r, want + r, sizeof(float)) == 0) continue;
            if (report && diffs < 5) {
              ADD_FAILURE() << Describe(ActiveKernelTarget(), w, n) << " threads=" << threads
                            << " i=" << i << " r=" << r << ": got " << got[r] << " want (n=1) "
                            << want[r];
            }
            ++diffs;
          }
        }
      }
    }
    return diffs;
  }
};

TEST_F(BatchInvarianceTest, EveryFormatTargetBatchSizeAndThreadCount) {
  std::mt19937 rng(2024);
  struct Shape {
    int64_t rows, cols, fp4_cols, block_rows, block_cols;
  };
  // Row counts that are not multiples of the GEMV (4) or GEMM (4 / 8) row blocking, columns with
  // a partial last 32-column step (FP4 needs whole groups), more columns than one 512-column GEMM
  // tile, FP8 blocks that straddle tiles, and one product large enough to be split over 2 threads.
  const Shape kShapes[] = {{37, 300, 320, 16, 64},
                           {133, 1100, 1088, 128, 128},
                           {42, 1100, 1088, 32, 96},
                           {3, 40, 32, 1, 32}};
  for (const FormatCase& c : kAllFormats) {
    for (const Shape& s : kShapes) {
      const int64_t cols = c.format == WeightFormat::kFP4E2M1 ? s.fp4_cols : s.cols;
      const TestMatrix m =
          MakeMatrix(c.format, c.scale, s.rows, cols, rng, s.block_rows, s.block_cols);
      const std::vector<float> pool = RandomVector(7 * cols, rng);
      for (KernelTarget t : SupportedKernelTargets()) {
        ASSERT_TRUE(ForceKernelTargetForTest(t));
        EXPECT_EQ(CountVariantBits(m.w, pool, 40, /*report=*/true), 0)
            << Describe(t, m.w, 40) << " block " << s.block_rows << "x" << s.block_cols;
      }
    }
  }
}

// The check above can fail: the legacy FP8 GEMV (scale applied to per-block partial sums) gives
// other bits than the GEMM path for the same rows, so it is caught on every SIMD target.
TEST_F(BatchInvarianceTest, DetectsTheLegacyFP8Gemv) {
  std::mt19937 rng(31);
  const TestMatrix m = MakeMatrix(WeightFormat::kFP8E4M3, ScaleFormat::kF32, 64, 1024, rng);
  const std::vector<float> pool = RandomVector(5 * 1024, rng);
  SetKernelVariantForBench(KernelVariant::kLegacy);
  EXPECT_EQ(KernelVariantForBench(), KernelVariant::kLegacy);
  for (KernelTarget t : SupportedKernelTargets()) {
    if (t == KernelTarget::kGeneric) continue;  // one code path for every n
    ASSERT_TRUE(ForceKernelTargetForTest(t));
    EXPECT_GT(CountVariantBits(m.w, pool, 6, /*report=*/false), 0) << KernelTargetName(t);
  }
  SetKernelVariantForBench(KernelVariant::kInvariant);
  for (KernelTarget t : SupportedKernelTargets()) {
    ASSERT_TRUE(ForceKernelTargetForTest(t));
    EXPECT_EQ(CountVariantBits(m.w, pool, 6, /*report=*/true), 0) << KernelTargetName(t);
  }
}

TEST(KernelTargetTest, NamesAndForcing) {
  const std::vector<KernelTarget> targets = SupportedKernelTargets();
  ASSERT_FALSE(targets.empty());
  EXPECT_EQ(targets.back(), KernelTarget::kGeneric);
  for (KernelTarget t : targets) {
    ASSERT_TRUE(ForceKernelTargetForTest(t));
    EXPECT_EQ(ActiveKernelTarget(), t);
    EXPECT_EQ(ActiveKernelTargetName(), KernelTargetName(t));
  }
  ResetKernelTargetForTest();
  const std::string active(ActiveKernelTargetName());
  EXPECT_TRUE(active == "avx512" || active == "avx2" || active == "generic") << active;
}

// ---------- thread pool ----------

TEST(ThreadPoolTest, RunsEveryTaskOnce) {
  ThreadPool pool(4);
  for (int64_t tasks : {1, 2, 3, 17, 1000}) {
    std::vector<std::atomic<int>> hits(tasks);
    struct Ctx {
      std::vector<std::atomic<int>>* hits;
    } ctx{&hits};
    pool.Run(
        tasks, [](void* c, int64_t t) { (*static_cast<Ctx*>(c)->hits)[t].fetch_add(1); }, &ctx);
    for (int64_t t = 0; t < tasks; ++t) ASSERT_EQ(hits[t].load(), 1) << t;
  }
}

TEST(ThreadPoolTest, NestedAndConcurrentCallsRunInline) {
  ThreadPool pool(3);
  std::atomic<int64_t> total{0};
  struct Ctx {
    ThreadPool* pool;
    std::atomic<int64_t>* total;
  } ctx{&pool, &total};
  auto outer = [](void* c, int64_t) {
    auto* cx = static_cast<Ctx*>(c);
    cx->pool->Run(
        10, [](void* c2, int64_t) { static_cast<Ctx*>(c2)->total->fetch_add(1); }, c);
  };
  std::vector<std::thread> callers;
  for (int k = 0; k < 4; ++k) {
    callers.emplace_back([&] {
      for (int rep = 0; rep < 50; ++rep) pool.Run(6, outer, &ctx);
    });
  }
  for (auto& th : callers) th.join();
  EXPECT_EQ(total.load(), 4 * 50 * 6 * 10);
}

TEST(ThreadPoolTest, ParallelForCoversRange) {
  SetKernelThreads(3);
  std::vector<std::atomic<int>> hits(10007);
  ParallelFor(10007, 100, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
  });
  for (size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i].load(), 1) << i;
  EXPECT_EQ(KernelThreads(), 3);
  SetKernelThreads(0);
  EXPECT_GE(KernelThreads(), 1);
}

TEST(ThreadPoolTest, EnvironmentSetsTheDefault) {
  ASSERT_EQ(setenv("EM_THREADS", "3", 1), 0);
  SetKernelThreads(0);
  EXPECT_EQ(KernelThreads(), 3);
  SetKernelThreads(2);  // an explicit count wins over the environment
  EXPECT_EQ(KernelThreads(), 2);
  ASSERT_EQ(unsetenv("EM_THREADS"), 0);
  SetKernelThreads(0);
  EXPECT_EQ(KernelThreads(), static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}

TEST_F(TargetTest, ConcurrentMatMulCalls) {
  std::mt19937 rng(11);
  SetKernelThreads(2);
  const TestMatrix m = MakeMatrix(WeightFormat::kFP4E2M1, ScaleFormat::kE8M0, 256, 1024, rng);
  const std::vector<float> x = RandomVector(2 * 1024, rng);
  std::vector<float> want(2 * 256);
  MatMul(m.w, x.data(), 2, want.data());
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int k = 0; k < 3; ++k) {
    threads.emplace_back([&] {
      std::vector<float> y(2 * 256);
      for (int rep = 0; rep < 20; ++rep) {
        MatMul(m.w, x.data(), 2, y.data());
        if (y != want) mismatches.fetch_add(1);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

}  // namespace
}  // namespace expertmesh::kernels
