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
namespace {

// Joining two stretches needs the first one's register advanced over the second one's length
// of zeros (CRC(r, A.B) = CRC(CRC(r, A), 0^|B|) ^ CRC(0, B), the raw register being linear in
// the register and the bytes together). That advance is linear in the 32-bit register, so it is
// four byte-indexed tables whose entries are the images of each byte position, built from the
// images of the 32 single bits, which the portable path computes over real zero bytes (so the
// operator cannot drift from the CRC it joins).
struct ShiftTable {
  std::array<std::array<uint32_t, 256>, 4> t;

  uint32_t Apply(uint32_t r) const {
    return t[0][r & 0xFF] ^ t[1][(r >> 8) & 0xFF] ^ t[2][(r >> 16) & 0xFF] ^ t[3][r >> 24];
  }
};

ShiftTable MakeShiftTable(size_t zeros_len) {
  static constexpr uint8_t kZeros[kCrc32cLongBlock] = {};
  uint32_t bit_image[32];
  for (int i = 0; i < 32; ++i) {
    uint32_t r = 1u << i;
    for (size_t left = zeros_len; left > 0;) {
      const size_t step = left < sizeof(kZeros) ? left : sizeof(kZeros);
      r = Crc32cPortable(r, kZeros, step);
      left -= step;
    }
    bit_image[i] = r;
  }
  ShiftTable s{};
  for (int k = 0; k < 4; ++k) {
    for (uint32_t v = 1; v < 256; ++v) {
      s.t[k][v] = s.t[k][v & (v - 1)] ^ bit_image[8 * k + __builtin_ctz(v)];
    }
  }
  return s;
}

struct JoinTables {
  ShiftTable long_block = MakeShiftTable(kCrc32cLongBlock);
  ShiftTable short_block = MakeShiftTable(kCrc32cShortBlock);
};

const JoinTables& Join() {
  static const JoinTables tables;  // ~1 ms once; only inputs of 768+ bytes ask for it
  return tables;
}

__attribute__((target("sse4.2"))) inline uint64_t Crc64(uint64_t r, const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);  // x86 is little-endian, as the CRC's byte order wants
  return _mm_crc32_u64(r, w);
}

// Consumes whole stretches of three adjacent kBlock-byte blocks from (*p, *n): blocks two and
// three start from a zero register so that no chain waits on another, and the three are joined
// after the stretch. kBlock is a compile-time constant so the loop has a fixed trip count.
template <size_t kBlock>
__attribute__((target("sse4.2"))) uint32_t ThreeStreams(uint32_t reg, const uint8_t** p,
                                                         size_t* n, const ShiftTable& shift) {
  static_assert(kBlock % 8 == 0);
  const uint8_t* q = *p;
  size_t left = *n;
  while (left >= 3 * kBlock) {
    uint64_t a = reg, b = 0, c = 0;
#pragma GCC unroll 4
    for (size_t i = 0; i < kBlock; i += 8) {
      a = Crc64(a, q + i);
      b = Crc64(b, q + kBlock + i);
      c = Crc64(c, q + 2 * kBlock + i);
    }
    reg = shift.Apply(shift.Apply(static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b)) ^
          static_cast<uint32_t>(c);
    q += 3 * kBlock;
    left -= 3 * kBlock;
  }
  *p = q;
  *n = left;
  return reg;
}

}  // namespace

__attribute__((target("sse4.2"))) uint32_t Crc32cHardware(uint32_t reg, const uint8_t* p,
                                                          size_t n) {
  if (n >= 3 * kCrc32cShortBlock) {
    // 8-byte-aligned loads from here on: an unaligned word straddles a cache line every 8th load.
    while ((reinterpret_cast<uintptr_t>(p) & 7) != 0) {
      reg = _mm_crc32_u8(reg, *p++);
      --n;
    }
    const JoinTables& join = Join();
    reg = ThreeStreams<kCrc32cLongBlock>(reg, &p, &n, join.long_block);
    reg = ThreeStreams<kCrc32cShortBlock>(reg, &p, &n, join.short_block);
  }
  uint64_t r = reg;
  while (n >= 8) {
    r = Crc64(r, p);
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
