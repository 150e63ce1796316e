// A deterministic PRNG for data that must be identical everywhere (generated checkpoints, test
// and benchmark corpora): splitmix64 with integer-only derived draws, where std::mt19937 with
// std:: distributions differs between standard libraries.
#pragma once

#include <cstdint>
#include <string_view>

#include "core/base/hash.h"

namespace expertmesh::base {

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  // An independent stream per (seed, name): the name is hashed into the seed, and the first
  // output is dropped so that nearby seeds do not start with correlated states.
  SplitMix64(uint64_t seed, std::string_view stream) : state_(seed ^ Fnv1a64(stream)) { Next(); }

  uint64_t Next() {
    state_ += kSplitMix64Gamma;
    return Mix64(state_);
  }
  // Uniform in [0, n) by multiply-shift of the top 32 bits: no division, and the bias is below
  // n / 2^32, negligible for the small n it is used with.
  uint32_t Below(uint32_t n) { return static_cast<uint32_t>(((Next() >> 32) * n) >> 32); }
  // Uniform in [0, 1) with 24 random bits: every value is an exact float.
  float UniformFloat() { return static_cast<float>(Next() >> 40) * (1.0f / 16777216.0f); }
  // Uniform in [0, 1) with 53 random bits: every value is an exact double.
  double UniformDouble() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

 private:
  uint64_t state_;
};

}  // namespace expertmesh::base
