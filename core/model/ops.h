// Small vector operations of the DeepSeek-V4 forward pass (MODEL.md): RMSNorm, RoPE with YaRN,
// the normalized Sylvester Hadamard transform. All float32, single-threaded, allocation-free.
#pragma once

#include <cstdint>
#include <vector>

#include "core/model/config.h"

namespace expertmesh::model {

// out[i] = w[i] * x[i] / sqrt(mean(x^2) + eps); w may be null (no weight). out may alias x.
void RmsNorm(const float* x, const float* w, int64_t n, float eps, float* out);

// 1 / sqrt(mean(x^2) + eps).
float RmsScale(const float* x, int64_t n, float eps);

inline float Sigmoid(float x) { return 1.0f / (1.0f + __builtin_expf(-x)); }

// In place: x <- H x / sqrt(n), H the Sylvester-order Hadamard matrix. REQUIRES: n power of 2.
void HadamardTransform(float* x, int n);

// Rotary embedding frequencies of one layer kind (MODEL.md, RoPE): window-only layers use
// rope_theta without YaRN; layers with ratio > 0 use compress_rope_theta with YaRN.
class Rope {
 public:
  Rope() = default;
  Rope(const ModelConfig& config, bool compressed);

  int rope_dim() const { return rope_dim_; }
  // cos/sin of pos * f_i for i < rope_dim/2, written to cs[0..rope_dim/2) and sn[...].
  void Angles(int64_t pos, float* cs, float* sn) const;
  // Rotates the pairs (2i, 2i+1) of x[0..rope_dim) by +angle (or -angle if inverse).
  void Apply(float* x, const float* cs, const float* sn, bool inverse) const;

 private:
  int rope_dim_ = 0;
  std::vector<float> freqs_;
};

}  // namespace expertmesh::model
