// MatMul kernels for AVX2 with FMA and F16C (x86-64 from Haswell / Zen 1 on). Compiled for that
// target with a function-level pragma; only called after the dispatcher saw the CPU support it.
//
// Decoders (per 32 weight columns), as in matmul_avx512.cc where the ISA allows:
// - FP8 e4m3 -> IEEE half by sign-extend, shift and mask (value * 2^-8), widened by vcvtph2ps.
// - FP4 e2m1: every e2m1 value is a half whose low byte is zero, so pshufb looks up the high byte
//   from a 16-entry table; unpacking with zero bytes and vcvtph2ps make floats, then the group
//   scale is multiplied in.
#include <immintrin.h>

#include <cstdint>

#include "core/kernels/matmul_internal.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")

namespace expertmesh::kernels::internal {
namespace {

struct Avx2 {
  using V = __m256;
  using FP4State = __m256;  // the group scale, broadcast
  static constexpr int kLanes = 8;
  static constexpr int kDirectRows = 4;
  static constexpr int kDirectMaxN = 1;  // 16 registers: 4 rows x 2 inputs x 2 sums would spill
  static constexpr int kTileRows = 4;    // GEMM: 4 weight rows x 2 activation rows = 8 sums
  static constexpr int kGemmN = 2;

  static inline V Zero() { return _mm256_setzero_ps(); }
  static inline V Load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline V Set1(float f) { return _mm256_set1_ps(f); }
  static inline V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline void KeepInRegister(V& v) { __asm__("" : "+x"(v)); }
  static inline float Sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static inline void F32x32(const float* p, V* out) {
    for (int j = 0; j < 4; ++j) out[j] = _mm256_loadu_ps(p + 8 * j);
  }

  static inline void BF16x32(const uint16_t* p, V* out) {
    for (int j = 0; j < 4; ++j) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * j));
      out[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }

  // NaN codes (0x7F, 0xFF) come out as finite values: callers that cannot rule them out use
  // FP8x32, or FP8HasNaN first.
  static inline void FP8x32Raw(const uint8_t* p, V* out) {
    for (int j = 0; j < 4; ++j) {
      __m128i h = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * j)));
      h = _mm_and_si128(_mm_slli_epi16(h, 7), _mm_set1_epi16(static_cast<short>(0xBF80)));
      out[j] = _mm256_cvtph_ps(h);
    }
  }

  static inline void FP8x32(const uint8_t* p, V* out) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const int nan = _mm256_movemask_epi8(
        _mm256_cmpeq_epi8(_mm256_or_si256(raw, _mm256_set1_epi8(static_cast<char>(0x80))),
                          _mm256_set1_epi8(static_cast<char>(0xFF))));
    FP8x32Raw(p, out);
    if (__builtin_expect(nan != 0, 0)) {
      for (int j = 0; j < 4; ++j) {
        const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        const __m256i m = _mm256_cmpeq_epi32(
            _mm256_and_si256(_mm256_set1_epi32((nan >> (8 * j)) & 0xFF), lane_bit), lane_bit);
        out[j] = _mm256_blendv_ps(out[j], _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)),
                                  _mm256_castsi256_ps(m));
      }
    }
  }

  // Whether any of p[0, bytes) is a NaN code; bytes is a multiple of 32.
  static inline bool FP8HasNaN(const uint8_t* p, int64_t bytes) {
    __m256i any = _mm256_setzero_si256();
    for (int64_t b = 0; b < bytes; b += 32) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + b));
      any = _mm256_or_si256(
          any, _mm256_cmpeq_epi8(_mm256_or_si256(raw, _mm256_set1_epi8(static_cast<char>(0x80))),
                                 _mm256_set1_epi8(static_cast<char>(0xFF))));
    }
    return !_mm256_testz_si256(any, any);
  }

  static inline FP4State FP4Prep(float scale) { return _mm256_set1_ps(scale); }

  static inline void FP4x32(const uint8_t* p, const FP4State& scale, V* out) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    // High bytes of the halves of 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives.
    const __m128i table =
        _mm_setr_epi8(0x00, 0x38, 0x3C, 0x3E, 0x40, 0x42, 0x44, 0x46, static_cast<char>(0x80),
                      static_cast<char>(0xB8), static_cast<char>(0xBC), static_cast<char>(0xBE),
                      static_cast<char>(0xC0), static_cast<char>(0xC2), static_cast<char>(0xC4),
                      static_cast<char>(0xC6));
    const __m128i even = _mm_shuffle_epi8(table, _mm_and_si128(b, low4));
    const __m128i odd = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(b, 4), low4));
    const __m128i zero = _mm_setzero_si128();
    out[0] = _mm256_mul_ps(_mm256_cvtph_ps(_mm_unpacklo_epi8(zero, even)), scale);
    out[1] = _mm256_mul_ps(_mm256_cvtph_ps(_mm_unpackhi_epi8(zero, even)), scale);
    out[2] = _mm256_mul_ps(_mm256_cvtph_ps(_mm_unpacklo_epi8(zero, odd)), scale);
    out[3] = _mm256_mul_ps(_mm256_cvtph_ps(_mm_unpackhi_epi8(zero, odd)), scale);
  }
};

}  // namespace
}  // namespace expertmesh::kernels::internal

#include "core/kernels/matmul_simd_inl.h"

namespace expertmesh::kernels::internal {

void MatMulRowsAvx2(const WeightMatrix& w, const PreparedX& x, float* y, int64_t row_begin,
                    int64_t row_end, float* scratch) {
  Kernels<Avx2>::MatMulRows(w, x, y, row_begin, row_end, scratch);
}

}  // namespace expertmesh::kernels::internal

#pragma GCC pop_options
