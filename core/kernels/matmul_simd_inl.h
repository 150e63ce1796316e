// The SIMD MatMul kernels, written once over a "traits" type T that supplies vector width,
// arithmetic and the weight decoders for one instruction set (matmul_avx512.cc, matmul_avx2.cc).
//
// No include guard: each target's .cc file includes it exactly once. Each includer defines T in
// an anonymous namespace inside a `#pragma GCC target` region and then includes this file, so
// every instantiation is compiled for that target and has internal linkage: no inline function
// compiled for AVX-512 can be merged into baseline code by the linker. For the same reason this
// file calls no std:: templates.
//
// T provides: V (a float vector of T::kLanes lanes, kLanes dividing 32), the blocking constants
// kDirectRows, kDirectMaxN, kTileRows, kGemmN, the ops Zero, Load, Store, Set1, Fma, Mul, Sum
// (horizontal add), KeepInRegister(V&) (stops the compiler from re-loading an operand that is
// reused across FMAs), and the decoders, per 32 weight columns:
//   BF16x32(const uint16_t*, V*), F32x32(const float*, V*),
//   FP8x32(const uint8_t*, V*)          -> e4m3 value * 2^-8 (exact; NaN codes give NaN),
//   FP8x32Raw(const uint8_t*, V*)       -> the same for bytes known to hold no NaN code,
//   FP8HasNaN(const uint8_t*, int64_t bytes) -> whether a NaN code is among them (bytes % 32 == 0),
//   FP4Prep(float scale) -> T::FP4State, FP4x32(const uint8_t*, const FP4State&, V*)
//                                       -> e2m1 value * scale, even columns then odd columns.

namespace expertmesh::kernels::internal {
namespace {

static inline int64_t MinI(int64_t a, int64_t b) { return a < b ? a : b; }

static constexpr float E8M0Bits(int byte) {
  // 2^(byte-127); byte 0 is the float32 subnormal 2^-127; 0xFF is NaN, as DecodeE8M0.
  return __builtin_bit_cast(float, byte == 0xFF ? 0x7FC00000u
                                   : byte == 0  ? 0x00400000u
                                                : static_cast<uint32_t>(byte) << 23);
}

struct E8M0Table {
  float v[256];
  constexpr E8M0Table() : v() {
    for (int b = 0; b < 256; ++b) v[b] = E8M0Bits(b);
  }
};
alignas(64) static constexpr E8M0Table kE8M0;

static inline float E8M0Value(uint8_t byte) { return kE8M0.v[byte]; }

static inline float ScaleValue(const WeightMatrix& w, int64_t index) {
  if (w.scale_format == ScaleFormat::kE8M0) {
    return E8M0Value(static_cast<const uint8_t*>(w.scales)[index]);
  }
  if (w.scale_format == ScaleFormat::kF32) return static_cast<const float*>(w.scales)[index];
  return 1.0f;
}

// How far ahead the FP4 GEMV path prefetches each weight row (measured a few percent faster;
// the same for FP8 measured no gain).
constexpr int64_t kPrefetchBytes = 1024;

// Powers of two used by the FP8 decode (value * 2^-8) and its undoing.
constexpr float kFP8Unscale = 256.0f;
constexpr float kFP8Prescale = 1.0f / 256.0f;

// Decodes the last, partial 32-column step of a row [k, end) with the scalar decoders into
// `buf` (zero-filled to 32), in the same scaling the SIMD decoders use (FP8: times 2^-8).
template <WeightFormat F>
static inline void DecodeTail(const WeightMatrix& w, int64_t r, int64_t k, int64_t end,
                              float* buf) {
  for (int j = 0; j < 32; ++j) buf[j] = 0.0f;
  for (int64_t c = k; c < end; ++c) {
    float v;
    if constexpr (F == WeightFormat::kF32) {
      v = static_cast<const float*>(w.data)[r * w.cols + c];
    } else if constexpr (F == WeightFormat::kBF16) {
      v = DecodeBF16(static_cast<const uint16_t*>(w.data)[r * w.cols + c]);
    } else {
      v = DecodeE4M3(static_cast<const uint8_t*>(w.data)[r * w.cols + c]) * kFP8Prescale;
    }
    buf[c - k] = v;
  }
}

template <class T>
struct Kernels {
  using V = typename T::V;
  static constexpr int kVecs = 32 / T::kLanes;  // vectors per 32-column step

  // Decodes 32 columns [k, k+32) of row r into w32 (FP8: unscaled, times 2^-8; FP4: scaled by
  // the FP4State of the group; others: exact). REQUIRES k + 32 <= cols.
  template <WeightFormat F>
  static inline void Decode32(const WeightMatrix& w, int64_t r, int64_t k, V* w32) {
    if constexpr (F == WeightFormat::kF32) {
      T::F32x32(static_cast<const float*>(w.data) + r * w.cols + k, w32);
    } else if constexpr (F == WeightFormat::kBF16) {
      T::BF16x32(static_cast<const uint16_t*>(w.data) + r * w.cols + k, w32);
    } else if constexpr (F == WeightFormat::kFP8E4M3) {
      T::FP8x32(static_cast<const uint8_t*>(w.data) + r * w.cols + k, w32);
    } else {
      const int64_t groups = w.cols / 32;
      const typename T::FP4State st = T::FP4Prep(ScaleValue(w, r * groups + k / 32));
      T::FP4x32(static_cast<const uint8_t*>(w.data) + r * (w.cols / 2) + k / 2, st, w32);
    }
  }

  // acc[r][i] += dot(weights of rows r0..r0+R over [k0, k1), x rows i0..i0+N), with weights
  // decoded as Decode32 does. k0 is a multiple of 32; [k0, k1) ends before cols only at a
  // multiple of 32, and columns past cols are read as zero.
  template <WeightFormat F, int R, int N>
  static inline void DotRange(const WeightMatrix& w, int64_t r0, const PreparedX& x, int64_t i0,
                              int64_t k0, int64_t k1, V (&acc)[R][N]) {
    const float* xr[N];
    for (int i = 0; i < N; ++i) xr[i] = x.data + (i0 + i) * x.stride;
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
      for (int r = 0; r < R; ++r) {
        V wv[kVecs];
        Decode32<F>(w, r0 + r, k, wv);
        for (int i = 0; i < N; ++i) {
          for (int j = 0; j < kVecs; ++j) {
            acc[r][i] = T::Fma(wv[j], T::Load(xr[i] + k + j * T::kLanes), acc[r][i]);
          }
        }
      }
    }
    if constexpr (F != WeightFormat::kFP4E2M1) {
      if (k < k1) {
        alignas(64) float buf[32];
        for (int r = 0; r < R; ++r) {
          DecodeTail<F>(w, r0 + r, k, k1, buf);
          for (int i = 0; i < N; ++i) {
            for (int j = 0; j < kVecs; ++j) {
              acc[r][i] = T::Fma(T::Load(buf + j * T::kLanes), T::Load(xr[i] + k + j * T::kLanes),
                                 acc[r][i]);
            }
          }
        }
      }
    }
  }

  // Weights decoded in registers, used once per activation row: the GEMV (and tiny-n) path.
  template <WeightFormat F, int R, int N>
  static void DirectBlock(const WeightMatrix& w, int64_t r0, const PreparedX& x, int64_t i0,
                          float* y) {
    if constexpr (F == WeightFormat::kFP4E2M1) {
      return DirectFP4Any<R, N>(w, r0, x, i0, y);
    }
    if constexpr (F == WeightFormat::kFP8E4M3) {
      if (!x.legacy_fp8_gemv) return DirectFP8Any<R, N>(w, r0, x, i0, y);
    }
    V acc[R][N];
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < N; ++i) acc[r][i] = T::Zero();
    }
    if constexpr (F == WeightFormat::kFP8E4M3) {
      // KernelVariant::kLegacy: sum each 2-D scale block's columns first, then apply its scale
      // once per row. Fewer multiplies, but not the GEMM tile's rounding.
      const int64_t bc = w.block_cols;
      const int64_t scale_cols = (w.cols + bc - 1) / bc;
      int64_t scale_row[R];  // index of each row's first scale
      for (int r = 0; r < R; ++r) scale_row[r] = ((r0 + r) / w.block_rows) * scale_cols;
      for (int64_t g0 = 0, g = 0; g0 < w.cols; g0 += bc, ++g) {
        V part[R][N];
        for (int r = 0; r < R; ++r) {
          for (int i = 0; i < N; ++i) part[r][i] = T::Zero();
        }
        DotRange<F, R, N>(w, r0, x, i0, g0, MinI(w.cols, g0 + bc), part);
        for (int r = 0; r < R; ++r) {
          const V s = T::Set1(ScaleValue(w, scale_row[r] + g) * kFP8Unscale);
          for (int i = 0; i < N; ++i) acc[r][i] = T::Fma(part[r][i], s, acc[r][i]);
        }
      }
    } else {
      DotRange<F, R, N>(w, r0, x, i0, 0, w.cols, acc);
    }
    for (int i = 0; i < N; ++i) {
      for (int r = 0; r < R; ++r) y[(i0 + i) * w.rows + r0 + r] = T::Sum(acc[r][i]);
    }
  }

  // The FP8 GEMV path. Per output element it performs the GEMM path's exact operation
  // sequence (DequantizeTile + TileBlock): each 32-column step's decoded weights are multiplied
  // by the block scale (times 2^8), then FMA'd into one vector accumulator in column order; the
  // partial last step is decoded by DecodeTail and scaled the same way. So y does not depend on
  // whether n took this path or the GEMM one. The scale is broadcast once per row per scale block
  // (usually every 4 steps), not per step.
  template <int R, int N, bool kE8M0>
  static void DirectFP8(const WeightMatrix& w, int64_t r0, const PreparedX& x, int64_t i0,
                        float* y) {
    V acc[R][N];
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < N; ++i) acc[r][i] = T::Zero();
    }
    const int64_t cols = w.cols;
    const int64_t bc = w.block_cols;
    const int64_t scale_cols = (cols + bc - 1) / bc;
    const uint8_t* wp[R];
    const uint8_t* s8[R];
    const float* s32[R];
    for (int r = 0; r < R; ++r) {
      wp[r] = static_cast<const uint8_t*>(w.data) + (r0 + r) * cols;
      const int64_t index = ((r0 + r) / w.block_rows) * scale_cols;
      s8[r] = static_cast<const uint8_t*>(w.scales) + index;
      s32[r] = static_cast<const float*>(w.scales) + index;
    }
    const float* xr[N];
    for (int i = 0; i < N; ++i) xr[i] = x.data + (i0 + i) * x.stride;
    const int64_t full = cols / 32 * 32;  // columns covered by whole 32-column steps
    for (int64_t g = 0, kb = 0; kb < cols; ++g, kb += bc) {
      V s[R];
      for (int r = 0; r < R; ++r) {
        s[r] = T::Set1((kE8M0 ? E8M0Value(s8[r][g]) : s32[r][g]) * kFP8Unscale);
      }
      const int64_t kend = MinI(kb + bc, full);
      if (kb < kend) {
        // One NaN scan of the block's bytes (64 per compare on AVX-512) instead of a compare
        // and a branch per row per 32 columns; a block with a NaN code takes the checked decoder.
        bool nan = false;
        for (int r = 0; r < R; ++r) nan |= T::FP8HasNaN(wp[r] + kb, kend - kb);
        if (__builtin_expect(nan, 0)) {
          FP8Steps<R, N, true>(wp, xr, s, kb, kend, acc);
        } else {
          FP8Steps<R, N, false>(wp, xr, s, kb, kend, acc);
        }
      }
      if (kb + bc >= cols && full < cols) {
        alignas(64) float buf[32];
        for (int r = 0; r < R; ++r) {
          DecodeTail<WeightFormat::kFP8E4M3>(w, r0 + r, full, cols, buf);
          for (int i = 0; i < N; ++i) {
            for (int j = 0; j < kVecs; ++j) {
              acc[r][i] = T::Fma(T::Mul(T::Load(buf + j * T::kLanes), s[r]),
                                 T::Load(xr[i] + full + j * T::kLanes), acc[r][i]);
            }
          }
        }
      }
    }
    for (int i = 0; i < N; ++i) {
      for (int r = 0; r < R; ++r) y[(i0 + i) * w.rows + r0 + r] = T::Sum(acc[r][i]);
    }
  }

  // DirectFP8's 32-column steps over [k0, k1) (whole steps): decode, scale, FMA.
  template <int R, int N, bool kCheckNaN>
  static inline void FP8Steps(const uint8_t* const (&wp)[R], const float* const (&xr)[N],
                              const V (&s)[R], int64_t k0, int64_t k1, V (&acc)[R][N]) {
    for (int64_t k = k0; k < k1; k += 32) {
      V xv[N][kVecs];
      for (int i = 0; i < N; ++i) {
        for (int j = 0; j < kVecs; ++j) xv[i][j] = T::Load(xr[i] + k + j * T::kLanes);
      }
      for (int r = 0; r < R; ++r) {
        V wv[kVecs];
        if constexpr (kCheckNaN) {
          T::FP8x32(wp[r] + k, wv);
        } else {
          T::FP8x32Raw(wp[r] + k, wv);
        }
        for (int j = 0; j < kVecs; ++j) wv[j] = T::Mul(wv[j], s[r]);
        for (int i = 0; i < N; ++i) {
          for (int j = 0; j < kVecs; ++j) acc[r][i] = T::Fma(wv[j], xv[i][j], acc[r][i]);
        }
      }
    }
  }

  template <int R, int N>
  static void DirectFP8Any(const WeightMatrix& w, int64_t r0, const PreparedX& x, int64_t i0,
                           float* y) {
    if (w.scale_format == ScaleFormat::kE8M0) return DirectFP8<R, N, true>(w, r0, x, i0, y);
    DirectFP8<R, N, false>(w, r0, x, i0, y);
  }

  // The FP4 GEMV path: per-row data and scale pointers hoisted, the scale format a template
  // parameter, so the loop over 32-column groups is only loads, lookups and FMAs.
  template <int R, int N, bool kE8M0>
  static void DirectFP4(const WeightMatrix& w, int64_t r0, const PreparedX& x, int64_t i0,
                        float* y) {
    V acc[R][N];
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < N; ++i) acc[r][i] = T::Zero();
    }
    const uint64_t groups = static_cast<uint64_t>(w.cols) / 32;
    const uint8_t* wp[R];
    const uint8_t* s8[R];
    const float* s32[R];
    for (int r = 0; r < R; ++r) {
      wp[r] = static_cast<const uint8_t*>(w.data) + (r0 + r) * groups * 16;
      s8[r] = static_cast<const uint8_t*>(w.scales) + (r0 + r) * groups;
      s32[r] = static_cast<const float*>(w.scales) + (r0 + r) * groups;
    }
    const float* xr[N];
    for (int i = 0; i < N; ++i) xr[i] = x.data + (i0 + i) * x.stride;
    for (uint64_t g = 0; g < groups; ++g) {
      V xv[N][kVecs];
      for (int i = 0; i < N; ++i) {
        for (int j = 0; j < kVecs; ++j) xv[i][j] = T::Load(xr[i] + g * 32 + j * T::kLanes);
      }
      if ((g & 3) == 0) {
        for (int r = 0; r < R; ++r) __builtin_prefetch(wp[r] + g * 16 + kPrefetchBytes);
      }
      for (int r = 0; r < R; ++r) {
        const typename T::FP4State st = T::FP4Prep(kE8M0 ? E8M0Value(s8[r][g]) : s32[r][g]);
        V wv[kVecs];
        T::FP4x32(wp[r] + g * 16, st, wv);
        for (int i = 0; i < N; ++i) {
          for (int j = 0; j < kVecs; ++j) acc[r][i] = T::Fma(wv[j], xv[i][j], acc[r][i]);
        }
      }
    }
    for (int i = 0; i < N; ++i) {
      for (int r = 0; r < R; ++r) y[(i0 + i) * w.rows + r0 + r] = T::Sum(acc[r][i]);
    }
  }

  template <int R, int N>
  static void DirectFP4Any(const WeightMatrix& w, int64_t r0, const PreparedX& x, int64_t i0,
                           float* y) {
    if (w.scale_format == ScaleFormat::kE8M0) return DirectFP4<R, N, true>(w, r0, x, i0, y);
    DirectFP4<R, N, false>(w, r0, x, i0, y);
  }

  // Writes columns [k0, k1) of rows [r0, r0+rows) dequantized (scales applied) into tile
  // (row stride kKBlock), in the column order of the prepared activations, zero past cols.
  // k0 is a multiple of 32; k1 - k0 <= kKBlock.
  template <WeightFormat F>
  static void DequantizeTile(const WeightMatrix& w, int64_t r0, int64_t rows, int64_t k0,
                             int64_t k1, float* tile) {
    const int64_t kend = MinI(k1, w.cols);
    for (int64_t rr = 0; rr < rows; ++rr) {
      const int64_t r = r0 + rr;
      float* out = tile + rr * kKBlock;  // column k goes to out[k - k0]
      int64_t k = k0;
      float sc = 1.0f;
      const float* srow = nullptr;
      const uint8_t* srow8 = nullptr;
      if constexpr (F == WeightFormat::kFP8E4M3) {
        const int64_t index = (r / w.block_rows) * ((w.cols + w.block_cols - 1) / w.block_cols);
        srow = static_cast<const float*>(w.scales) + index;
        srow8 = static_cast<const uint8_t*>(w.scales) + index;
      }
      const auto fp8_scale = [&](int64_t col) {
        const int64_t g = col / w.block_cols;
        return (w.scale_format == ScaleFormat::kE8M0 ? E8M0Value(srow8[g]) : srow[g]) * kFP8Unscale;
      };
      V s = T::Set1(1.0f);
      for (; k + 32 <= kend; k += 32) {
        V wv[kVecs];
        Decode32<F>(w, r, k, wv);
        if constexpr (F == WeightFormat::kFP8E4M3) {
          if (k == k0 || k % w.block_cols == 0) s = T::Set1(fp8_scale(k));
          for (int j = 0; j < kVecs; ++j) wv[j] = T::Mul(wv[j], s);
        }
        for (int j = 0; j < kVecs; ++j) T::Store(out + (k - k0) + j * T::kLanes, wv[j]);
      }
      if constexpr (F != WeightFormat::kFP4E2M1) {
        if (k < kend) {
          alignas(64) float buf[32];
          DecodeTail<F>(w, r, k, kend, buf);
          if constexpr (F == WeightFormat::kFP8E4M3) sc = fp8_scale(k);
          for (int j = 0; j < 32; ++j) out[k - k0 + j] = buf[j] * sc;
          k += 32;
        }
      }
      for (; k < k1; ++k) out[k - k0] = 0.0f;
    }
    for (int64_t rr = rows; rr < T::kTileRows; ++rr) {
      for (int64_t k = 0; k < k1 - k0; ++k) tile[rr * kKBlock + k] = 0.0f;
    }
  }

  // accv[r * N + i] (+)= tile row r · x row i0+i over the block's kl columns (vector partials;
  // horizontal sums only at the end of the row).
  template <int N>
  static void TileBlock(const float* tile, const PreparedX& x, int64_t i0, int64_t k0, int64_t kl,
                        bool first, V* accv) {
    constexpr int R = T::kTileRows;
    V acc[R][N];
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < N; ++i) acc[r][i] = first ? T::Zero() : accv[r * N + i];
    }
    const float* xr[N];
    for (int i = 0; i < N; ++i) xr[i] = x.data + (i0 + i) * x.stride + k0;
    for (int64_t k = 0; k < kl; k += T::kLanes) {
      V xv[N];
      for (int i = 0; i < N; ++i) xv[i] = T::Load(xr[i] + k);
      for (int r = 0; r < R; ++r) {
        V wv = T::Load(tile + r * kKBlock + k);
        T::KeepInRegister(wv);
        for (int i = 0; i < N; ++i) acc[r][i] = T::Fma(wv, xv[i], acc[r][i]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < N; ++i) accv[r * N + i] = acc[r][i];
    }
  }

  // GEMM: per tile of kTileRows rows and kKBlock columns (L1-resident), dequantize once, then
  // run every activation row block over it; partial sums stay vectors in `accv`.
  template <WeightFormat F>
  static void GemmRows(const WeightMatrix& w, const PreparedX& x, float* y, int64_t row_begin,
                       int64_t row_end, float* scratch) {
    constexpr int R = T::kTileRows;
    constexpr int NB = T::kGemmN;
    float* tile = scratch;
    V* accv = reinterpret_cast<V*>(scratch + kTileFloats);
    const int64_t len = x.stride;
    const int64_t nblocks = (x.n + NB - 1) / NB;
    for (int64_t r0 = row_begin; r0 < row_end; r0 += R) {
      const int64_t rows = MinI(R, row_end - r0);
      for (int64_t k0 = 0; k0 < len; k0 += kKBlock) {
        const int64_t kl = MinI(kKBlock, len - k0);
        DequantizeTile<F>(w, r0, rows, k0, k0 + kl, tile);
        const bool first = k0 == 0;
        for (int64_t b = 0; b < nblocks; ++b) {
          const int64_t i0 = b * NB;
          V* a = accv + b * R * NB;
          const int64_t left = x.n - i0;
          if (left >= NB) {
            TileBlock<NB>(tile, x, i0, k0, kl, first, a);
          } else if (left == 1) {
            TileBlock<1>(tile, x, i0, k0, kl, first, a);
          } else if constexpr (NB > 2) {
            if (left == 2) TileBlock<2>(tile, x, i0, k0, kl, first, a);
            if constexpr (NB > 3) {
              if (left == 3) TileBlock<3>(tile, x, i0, k0, kl, first, a);
            }
          }
        }
      }
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t i0 = b * NB;
        const int64_t nb = MinI(NB, x.n - i0);
        const V* a = accv + b * R * NB;
        for (int64_t i = 0; i < nb; ++i) {
          for (int64_t r = 0; r < rows; ++r) {
            y[(i0 + i) * w.rows + r0 + r] = T::Sum(a[r * nb + i]);
          }
        }
      }
    }
  }

  template <WeightFormat F>
  static void Rows(const WeightMatrix& w, const PreparedX& x, float* y, int64_t row_begin,
                   int64_t row_end, float* scratch) {
    constexpr int kR = T::kDirectRows;
    if (x.n > T::kDirectMaxN) return GemmRows<F>(w, x, y, row_begin, row_end, scratch);
    int64_t r = row_begin;
    for (; r + kR <= row_end; r += kR) {
      int64_t i = 0;
      if constexpr (T::kDirectMaxN >= 2) {
        for (; i + 2 <= x.n; i += 2) DirectBlock<F, kR, 2>(w, r, x, i, y);
      }
      for (; i < x.n; ++i) DirectBlock<F, kR, 1>(w, r, x, i, y);
    }
    for (; r < row_end; ++r) {
      for (int64_t i = 0; i < x.n; ++i) DirectBlock<F, 1, 1>(w, r, x, i, y);
    }
  }

  static void MatMulRows(const WeightMatrix& w, const PreparedX& x, float* y, int64_t row_begin,
                         int64_t row_end, float* scratch) {
    switch (w.format) {
      case WeightFormat::kF32:
        return Rows<WeightFormat::kF32>(w, x, y, row_begin, row_end, scratch);
      case WeightFormat::kBF16:
        return Rows<WeightFormat::kBF16>(w, x, y, row_begin, row_end, scratch);
      case WeightFormat::kFP8E4M3:
        return Rows<WeightFormat::kFP8E4M3>(w, x, y, row_begin, row_end, scratch);
      case WeightFormat::kFP4E2M1:
        return Rows<WeightFormat::kFP4E2M1>(w, x, y, row_begin, row_end, scratch);
    }
  }
};

}  // namespace
}  // namespace expertmesh::kernels::internal
