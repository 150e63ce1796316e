// Small, fully specified hashes whose bits are part of formats and contracts (checkpoint
// generation, the sampler's keyed uniforms, checksums): unlike std::hash or absl::Hash they give
// the same value on every platform, compiler and release, so they may be stored and compared.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace expertmesh::base {

// FNV-1a, 64-bit (the published offset basis and prime).
inline constexpr uint64_t kFnv1a64OffsetBasis = 0xcbf29ce484222325ull;
inline constexpr uint64_t kFnv1a64Prime = 0x100000001b3ull;

// FNV-1a 64 of `bytes`, starting from `basis` (a different basis only where a stored format
// was defined with one).
constexpr uint64_t Fnv1a64(std::string_view bytes, uint64_t basis = kFnv1a64OffsetBasis) {
  uint64_t h = basis;
  for (char c : bytes) h = (h ^ static_cast<uint8_t>(c)) * kFnv1a64Prime;
  return h;
}

// The golden-ratio increment of splitmix64 (odd, so adding it walks all 2^64 states).
inline constexpr uint64_t kSplitMix64Gamma = 0x9E3779B97F4A7C15ull;

// splitmix64's output function (the constants are its published ones): a bijection on 64 bits
// whose every output bit depends on every input bit.
constexpr uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The splitmix64 output for state `x` (one step from x - gamma): a stateless hash of an
// integer, for ids and keys derived from counters.
constexpr uint64_t SplitMix64Hash(uint64_t x) { return Mix64(x + kSplitMix64Gamma); }

}  // namespace expertmesh::base
