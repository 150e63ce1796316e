// CRC32C against published check values (RFC 3720 B.4 and the catalogue's "123456789"), and
// the hardware and table paths against each other on every length and alignment.
#include "core/state/crc32c.h"

#include <string>

#include "core/base/hash.h"
#include "gtest/gtest.h"

namespace expertmesh::state {
namespace {

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
}

TEST(Crc32c, ExtendEqualsWhole) {
  const std::string s = "The quick brown fox jumps over the lazy dog, twice over.";
  for (size_t cut = 0; cut <= s.size(); ++cut) {
    EXPECT_EQ(Crc32cExtend(Crc32c(s.substr(0, cut)), s.substr(cut)), Crc32c(s)) << cut;
  }
}

TEST(Crc32c, HardwareAndPortableAgree) {
  std::string buf(300, '\0');
  for (size_t i = 0; i < buf.size(); ++i) {
    buf[i] = static_cast<char>(base::SplitMix64Hash(i) & 0xFF);
  }
  const auto* p = reinterpret_cast<const uint8_t*>(buf.data());
  // "123456789" through the portable path alone, so the table is checked on any CPU.
  const auto* q = reinterpret_cast<const uint8_t*>("123456789");
  EXPECT_EQ(~internal::Crc32cPortable(~0u, q, 9), 0xE3069283u);
  if (!internal::HaveHardwareCrc32c()) {
    std::printf("no SSE4.2 on this CPU: only the portable path is in use\n");
    return;
  }
  for (size_t off = 0; off < 9; ++off) {
    for (size_t n = 0; n + off <= 260; ++n) {
      ASSERT_EQ(internal::Crc32cHardware(0x12345678u, p + off, n),
                internal::Crc32cPortable(0x12345678u, p + off, n))
          << "offset " << off << " length " << n;
    }
  }
}

}  // namespace
}  // namespace expertmesh::state
