#include "core/state/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace expertmesh::state {
namespace internal {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;

// Table k maps a byte that is k positions from the end of an 8-byte word to its contribution
// to the register, so eight lookups advance the CRC by a whole word.
constexpr std::array<std::array<uint32_t, 256>, 8> MakeTables() {
  std::array<std::array<uint32_t, 256>, 8> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int b = 0; b < 8; ++b) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
    t[0][i] = c;
  }
  for (int k = 1; k < 8; ++k) {
    for (uint32_t i = 0; i < 256; ++i) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFF];
  }
  return t;
}

constexpr auto kTables = MakeTables();

uint64_t LoadLe64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

uint32_t Crc32cPortable(uint32_t reg, const uint8_t* p, size_t n) {
  const auto& t = kTables;
  while (n >= 8) {
    const uint64_t w = LoadLe64(p) ^ reg;
    reg = t[7][w & 0xFF] ^ t[6][(w >> 8) & 0xFF] ^ t[5][(w >> 16) & 0xFF] ^
          t[4][(w >> 24) & 0xFF] ^ t[3][(w >> 32) & 0xFF] ^ t[2][(w >> 40) & 0xFF] ^
          t[1][(w >> 48) & 0xFF] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) reg = (reg >> 8) ^ t[0][(reg ^ *p++) & 0xFF];
  return reg;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t Crc32cHardware(uint32_t reg, const uint8_t* p,
                                                          size_t n) {
  uint64_t r = reg;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);  // x86 is little-endian, as the CRC's byte order wants
    r = _mm_crc32_u64(r, w);
    p += 8;
    n -= 8;
  }
  uint32_t r32 = static_cast<uint32_t>(r);
  while (n-- > 0) r32 = _mm_crc32_u8(r32, *p++);
  return r32;
}

bool HaveHardwareCrc32c() {
  static const bool have = __builtin_cpu_supports("sse4.2");
  return have;
}
#else
uint32_t Crc32cHardware(uint32_t reg, const uint8_t* p, size_t n) {
  return Crc32cPortable(reg, p, n);
}
bool HaveHardwareCrc32c() { return false; }
#endif

}  // namespace internal

uint32_t Crc32cExtend(uint32_t crc, std::string_view data) {
  const auto* p = reinterpret_cast<const uint8_t*>(data.data());
  const uint32_t reg = ~crc;
  return ~(internal::HaveHardwareCrc32c() ? internal::Crc32cHardware(reg, p, data.size())
                                          : internal::Crc32cPortable(reg, p, data.size()));
}

uint32_t Crc32c(std::string_view data) { return Crc32cExtend(0, data); }

}  // namespace expertmesh::state
