#include "core/model/ops.h"

#include <algorithm>
#include <cmath>

namespace expertmesh::model {

float RmsScale(const float* x, int64_t n, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  return static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
}

void RmsNorm(const float* x, const float* w, int64_t n, float eps, float* out) {
  float s = RmsScale(x, n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (w ? w[i] : 1.0f) * (x[i] * s);
}

void HadamardTransform(float* x, int n) {
  for (int h = 1; h < n; h *= 2) {
    for (int i = 0; i < n; i += 2 * h) {
      for (int j = i; j < i + h; ++j) {
        float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
  float s = 1.0f / std::sqrt(static_cast<float>(n));
  for (int i = 0; i < n; ++i) x[i] *= s;
}

Rope::Rope(const ModelConfig& config, bool compressed) : rope_dim_(config.qk_rope_head_dim) {
  const int r = rope_dim_;
  const double base = compressed ? config.compress_rope_theta : config.rope_theta;
  freqs_.resize(r / 2);
  std::vector<double> f(r / 2);
  for (int i = 0; i < r / 2; ++i) f[i] = 1.0 / std::pow(base, 2.0 * i / r);
  const RopeScaling& ys = config.rope_scaling;
  if (compressed && ys.factor > 1.0 && ys.original_max_position_embeddings > 0) {
    const double orig = static_cast<double>(ys.original_max_position_embeddings);
    auto corr = [&](double beta) {
      return r * std::log(orig / (beta * 2.0 * M_PI)) / (2.0 * std::log(base));
    };
    double low = std::clamp(std::floor(corr(ys.beta_fast)), 0.0, static_cast<double>(r - 1));
    double high = std::clamp(std::ceil(corr(ys.beta_slow)), 0.0, static_cast<double>(r - 1));
    if (low == high) high += 0.001;
    for (int i = 0; i < r / 2; ++i) {
      double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      f[i] = f[i] / ys.factor * ramp + f[i] * (1.0 - ramp);
    }
  }
  for (int i = 0; i < r / 2; ++i) freqs_[i] = static_cast<float>(f[i]);
}

void Rope::Angles(int64_t pos, float* cs, float* sn) const {
  const float p = static_cast<float>(pos);
  for (size_t i = 0; i < freqs_.size(); ++i) {
    float a = p * freqs_[i];
    cs[i] = std::cos(a);
    sn[i] = std::sin(a);
  }
}

void Rope::Apply(float* x, const float* cs, const float* sn, bool inverse) const {
  for (int i = 0; i < rope_dim_ / 2; ++i) {
    float c = cs[i], s = inverse ? -sn[i] : sn[i];
    float a = x[2 * i], b = x[2 * i + 1];
    x[2 * i] = a * c - b * s;
    x[2 * i + 1] = a * s + b * c;
  }
}

}  // namespace expertmesh::model
