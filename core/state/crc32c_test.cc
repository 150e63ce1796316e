// CRC32C against published check values (RFC 3720 B.4 and the catalogue's "123456789"), and
// the hardware path (three interleaved streams joined by shift tables) against the portable
// table path on every short length and alignment, around the stream-block edges and on
// multi-MiB buffers, with a bit-at-a-time reference as a third, independent opinion.
#include "core/state/crc32c.h"

#include <cstdio>
#include <string>
#include <vector>

#include "core/base/hash.h"
#include "gtest/gtest.h"

namespace expertmesh::state {
namespace {

using internal::kCrc32cLongBlock;
using internal::kCrc32cShortBlock;

// The definition itself, one bit at a time: shares no table or instruction with either path.
uint32_t BitwiseRaw(uint32_t reg, const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    reg ^= p[i];
    for (int b = 0; b < 8; ++b) reg = (reg & 1) ? (reg >> 1) ^ 0x82F63B78u : reg >> 1;
  }
  return reg;
}

std::string RandomBytes(size_t n, uint64_t seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t v = base::SplitMix64Hash(seed * 0x9E3779B97F4A7C15ull + i);
    for (size_t j = 0; j < 8 && i + j < n; ++j) s[i + j] = static_cast<char>(v >> (8 * j));
  }
  return s;
}

const uint8_t* Bytes(const std::string& s) { return reinterpret_cast<const uint8_t*>(s.data()); }

bool Hardware() {
  if (internal::HaveHardwareCrc32c()) return true;
  std::printf("no SSE4.2 on this CPU: only the portable path is in use\n");
  return false;
}

TEST(Crc32c, KnownVectors) {
  EXPECT_EQ(Crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(Crc32c(""), 0u);
  EXPECT_EQ(Crc32c(std::string(32, '\0')), 0x8A9136AAu);
  EXPECT_EQ(Crc32c(std::string(32, '\xFF')), 0x62A8AB43u);
  std::string up, down;
  for (int i = 0; i < 32; ++i) {
    up.push_back(static_cast<char>(i));
    down.push_back(static_cast<char>(31 - i));
  }
  EXPECT_EQ(Crc32c(up), 0x46DD794Eu);
  EXPECT_EQ(Crc32c(down), 0x113FDB5Cu);
  // RFC 3720 B.4's last vector: an iSCSI SCSI Read (10) command PDU.
  const uint8_t pdu[48] = {0x01, 0xC0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                           0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00,
                           0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18, 0x28, 0x00, 0x00, 0x00,
                           0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
  EXPECT_EQ(Crc32c(std::string_view(reinterpret_cast<const char*>(pdu), sizeof(pdu))),
            0xD9963A56u);
}

TEST(Crc32c, EveryPathGivesTheCheckValue) {
  const auto* q = reinterpret_cast<const uint8_t*>("123456789");
  EXPECT_EQ(~BitwiseRaw(~0u, q, 9), 0xE3069283u);
  EXPECT_EQ(~internal::Crc32cPortable(~0u, q, 9), 0xE3069283u);
  if (!Hardware()) return;
  EXPECT_EQ(~internal::Crc32cHardware(~0u, q, 9), 0xE3069283u);
  // Zeros long enough for both stream widths: the known value of 32 zero bytes, extended by
  // zero runs whose CRC is checked against the bitwise definition.
  const std::string zeros(3 * kCrc32cLongBlock + 3 * kCrc32cShortBlock + 5, '\0');
  EXPECT_EQ(~internal::Crc32cHardware(~0u, Bytes(zeros), 32), 0x8A9136AAu);
  EXPECT_EQ(internal::Crc32cHardware(~0u, Bytes(zeros), zeros.size()),
            BitwiseRaw(~0u, Bytes(zeros), zeros.size()));
}

TEST(Crc32c, PortableMatchesBitwise) {
  const std::string buf = RandomBytes(3 * kCrc32cLongBlock + 1000, 1);
  for (size_t off = 0; off < 16; ++off) {
    for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{63}, size_t{1000},
                     buf.size() - 16}) {
      ASSERT_EQ(internal::Crc32cPortable(0x9ABCDEF0u, Bytes(buf) + off, n),
                BitwiseRaw(0x9ABCDEF0u, Bytes(buf) + off, n))
          << "offset " << off << " length " << n;
    }
  }
}

TEST(Crc32c, HardwareMatchesPortableOnEveryShortLengthAndAlignment) {
  if (!Hardware()) return;
  const std::string buf = RandomBytes(1024 + 16, 2);
  for (size_t off = 0; off < 16; ++off) {
    for (size_t n = 0; n <= 1024; ++n) {
      for (uint32_t reg : {0u, ~0u, 0x12345678u}) {
        ASSERT_EQ(internal::Crc32cHardware(reg, Bytes(buf) + off, n),
                  internal::Crc32cPortable(reg, Bytes(buf) + off, n))
            << "offset " << off << " length " << n << " register " << reg;
      }
    }
  }
}

TEST(Crc32c, HardwareMatchesPortableAroundStreamBlockEdges) {
  if (!Hardware()) return;
  // Each stretch boundary of both widths, with the remainders that fall to the narrower width
  // and to the single chain, from every alignment (the hardware path aligns its loads first).
  std::vector<size_t> lengths;
  for (size_t stretches = 1; stretches <= 3; ++stretches) {
    for (size_t base : {3 * kCrc32cLongBlock * stretches,
                        3 * kCrc32cLongBlock * stretches + 3 * kCrc32cShortBlock,
                        3 * kCrc32cShortBlock * stretches}) {
      for (size_t d = 0; d <= 24; ++d) {
        lengths.push_back(base + d);
        lengths.push_back(base - d);
      }
    }
  }
  const std::string buf = RandomBytes(9 * kCrc32cLongBlock + 3 * kCrc32cShortBlock + 64, 3);
  for (size_t off = 0; off < 16; ++off) {
    for (size_t n : lengths) {
      ASSERT_LE(off + n, buf.size());
      ASSERT_EQ(internal::Crc32cHardware(0xCAFEF00Du, Bytes(buf) + off, n),
                internal::Crc32cPortable(0xCAFEF00Du, Bytes(buf) + off, n))
          << "offset " << off << " length " << n;
    }
  }
}

TEST(Crc32c, HardwareMatchesPortableOnMultiMiBBuffers) {
  if (!Hardware()) return;
  // The disk tier's block sizes (a 208 KiB tiny-model block, a 4 MiB V4-Flash one), an odd size
  // past both, each from an unaligned start too.
  for (size_t n : {size_t{212992}, size_t{4} << 20, (size_t{7} << 20) + 12345}) {
    const std::string buf = RandomBytes(n + 3, n);
    for (size_t off : {size_t{0}, size_t{3}}) {
      const uint32_t hw = internal::Crc32cHardware(~0u, Bytes(buf) + off, n);
      EXPECT_EQ(hw, internal::Crc32cPortable(~0u, Bytes(buf) + off, n)) << n << " +" << off;
      EXPECT_EQ(~hw, Crc32c(std::string_view(buf).substr(off, n))) << n << " +" << off;
    }
  }
  const std::string big = RandomBytes((size_t{4} << 20) + 77, 4);
  EXPECT_EQ(internal::Crc32cHardware(~0u, Bytes(big), big.size()),
            BitwiseRaw(~0u, Bytes(big), big.size()));
}

TEST(Crc32c, ExtendEqualsWhole) {
  const std::string s = "The quick brown fox jumps over the lazy dog, twice over.";
  for (size_t cut = 0; cut <= s.size(); ++cut) {
    EXPECT_EQ(Crc32cExtend(Crc32c(s.substr(0, cut)), s.substr(cut)), Crc32c(s)) << cut;
  }
}

TEST(Crc32c, ExtendAcrossSplitPointsOfLongBuffers) {
  // Cuts inside and at the edges of the three-stream stretches, and a read in 1 MiB pieces
  // (as the disk tier checks a record), all equal to the one-shot CRC and to the table path.
  const std::string buf = RandomBytes((size_t{3} << 20) + 4321, 5);
  const std::string_view v(buf);
  const uint32_t whole = Crc32c(v);
  EXPECT_EQ(whole, ~internal::Crc32cPortable(~0u, Bytes(buf), buf.size()));
  std::vector<size_t> cuts = {0, 1, 7, 8, 255, 256, 767, 768, 769, 4095, 4096, 12287, 12288,
                              12289, 12288 + 768, 100003, size_t{1} << 20, buf.size() - 1,
                              buf.size()};
  for (size_t i = 0; i < 64; ++i) cuts.push_back(base::SplitMix64Hash(i) % (buf.size() + 1));
  for (size_t cut : cuts) {
    EXPECT_EQ(Crc32cExtend(Crc32c(v.substr(0, cut)), v.substr(cut)), whole) << cut;
  }
  for (size_t piece : {size_t{1} << 20, size_t{12289}, size_t{1000}}) {
    uint32_t crc = 0;
    for (size_t at = 0; at < v.size(); at += piece) crc = Crc32cExtend(crc, v.substr(at, piece));
    EXPECT_EQ(crc, whole) << "pieces of " << piece;
  }
}

}  // namespace
}  // namespace expertmesh::state
