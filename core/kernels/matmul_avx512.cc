// MatMul kernels for AVX-512 (F/BW/DQ/VL with F16C and FMA). Compiled for that target with a
// function-level pragma; only ever called after the dispatcher saw the CPU support it.
//
// Decoders (per 32 weight columns):
// - FP8 e4m3: each byte is sign-extended to 16 bits, shifted left 7 and masked, which yields the
//   IEEE half with the same sign, exponent field and mantissa: exactly value * 2^-8, subnormals
//   included; vcvtph2ps widens it. The 2^8 goes back in with the block scale. The two NaN codes
//   (0x7F, 0xFF) are caught by one byte compare per 32 columns.
// - FP4 e2m1: the 16 codes' values, times the group's scale, form one 16-lane table; vpermps
//   looks nibbles up directly (it reads only the low 4 bits of each index).

// g++ 12's AVX-512 intrinsics start many results from _mm512_undefined_*(), which its
// uninitialized-use warnings flag once inlined (a header false positive, GCC PR 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <cstdint>

#include "core/kernels/matmul_internal.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2")

namespace expertmesh::kernels::internal {
namespace {

alignas(64) constexpr float kE2M1Table[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,
                                              4.0f,  6.0f,  -0.0f, -0.5f, -1.0f, -1.5f,
                                              -2.0f, -3.0f, -4.0f, -6.0f};

struct Avx512 {
  using V = __m512;
  using FP4State = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kDirectRows = 4;
  static constexpr int kDirectMaxN = 2;
  static constexpr int kTileRows = 8;  // GEMM: 8 weight rows x 3 activation rows = 24 sums
  static constexpr int kGemmN = 3;

  static inline V Zero() { return _mm512_setzero_ps(); }
  static inline V Load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline V Set1(float f) { return _mm512_set1_ps(f); }
  static inline V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
  // Otherwise g++ folds the weight load into each of the 3 FMAs that use it: 3x the L1 loads.
  static inline void KeepInRegister(V& v) { __asm__("" : "+v"(v)); }
  // Not _mm512_reduce_add_ps: with g++ 12 it trips -Wmaybe-uninitialized inside the header.
  static inline float Sum(V v) {
    const __m512 t = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m256 h = _mm512_castps512_ps256(t);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static inline void F32x32(const float* p, V* out) {
    out[0] = _mm512_loadu_ps(p);
    out[1] = _mm512_loadu_ps(p + 16);
  }

  static inline void BF16x32(const uint16_t* p, V* out) {
    for (int j = 0; j < 2; ++j) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * j));
      out[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }

  // Two 256-bit sign-extends: one 512-bit sign-extend of all 32 bytes measured slower here.
  // NaN codes (0x7F, 0xFF) come out as finite values: callers that cannot rule them out use
  // FP8x32, or FP8HasNaN first.
  static inline void FP8x32Raw(const uint8_t* p, V* out) {
    for (int j = 0; j < 2; ++j) {
      __m256i h =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j)));
      h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16(static_cast<short>(0xBF80)));
      out[j] = _mm512_cvtph_ps(h);
    }
  }

  static inline void FP8x32(const uint8_t* p, V* out) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __mmask32 nan =
        _mm256_cmpeq_epi8_mask(_mm256_or_si256(raw, _mm256_set1_epi8(static_cast<char>(0x80))),
                               _mm256_set1_epi8(static_cast<char>(0xFF)));
    FP8x32Raw(p, out);
    if (__builtin_expect(nan != 0, 0)) {
      const V qnan = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000));
      out[0] = _mm512_mask_mov_ps(out[0], static_cast<__mmask16>(nan), qnan);
      out[1] = _mm512_mask_mov_ps(out[1], static_cast<__mmask16>(nan >> 16), qnan);
    }
  }

  // Whether any of p[0, bytes) is a NaN code; bytes is a multiple of 32. 64 bytes per compare.
  static inline bool FP8HasNaN(const uint8_t* p, int64_t bytes) {
    __mmask64 any = 0;
    int64_t b = 0;
    for (; b + 64 <= bytes; b += 64) {
      const __m512i raw = _mm512_loadu_si512(p + b);
      any |= _mm512_cmpeq_epi8_mask(_mm512_or_si512(raw, _mm512_set1_epi8(static_cast<char>(0x80))),
                                    _mm512_set1_epi8(static_cast<char>(0xFF)));
    }
    if (b < bytes) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + b));
      any |= _mm256_cmpeq_epi8_mask(_mm256_or_si256(raw, _mm256_set1_epi8(static_cast<char>(0x80))),
                                    _mm256_set1_epi8(static_cast<char>(0xFF)));
    }
    return any != 0;
  }

  static inline FP4State FP4Prep(float scale) {
    return _mm512_mul_ps(_mm512_load_ps(kE2M1Table), _mm512_set1_ps(scale));
  }

  static inline void FP4x32(const uint8_t* p, const FP4State& table, V* out) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    out[0] = _mm512_permutexvar_ps(b, table);
    out[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  }
};

}  // namespace
}  // namespace expertmesh::kernels::internal

#include "core/kernels/matmul_simd_inl.h"

namespace expertmesh::kernels::internal {

void MatMulRowsAvx512(const WeightMatrix& w, const PreparedX& x, float* y, int64_t row_begin,
                      int64_t row_end, float* scratch) {
  Kernels<Avx512>::MatMulRows(w, x, y, row_begin, row_end, scratch);
}

}  // namespace expertmesh::kernels::internal

#pragma GCC pop_options
