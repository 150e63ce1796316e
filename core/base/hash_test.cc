#include "core/base/hash.h"

#include <set>

#include "core/base/random.h"
#include "gtest/gtest.h"

namespace expertmesh::base {
namespace {

TEST(HashTest, Fnv1a64MatchesThePublishedVectors) {
  // Test vectors of the FNV reference (isthe.com/chongo/tech/comp/fnv).
  EXPECT_EQ(Fnv1a64(""), 0xcbf29ce484222325ull);
  EXPECT_EQ(Fnv1a64("a"), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(Fnv1a64("foobar"), 0x85944171f73967e8ull);
  // A custom basis is honoured: it is the empty input's hash.
  EXPECT_EQ(Fnv1a64("", 12345), 12345u);
  EXPECT_NE(Fnv1a64("x", 12345), Fnv1a64("x"));
  // Bytes >= 0x80 are hashed as unsigned.
  EXPECT_EQ(Fnv1a64("\xff"), (kFnv1a64OffsetBasis ^ 0xffull) * kFnv1a64Prime);
}

TEST(HashTest, SplitMix64MatchesTheReferenceSequence) {
  // splitmix64.c (Vigna) seeded with 0 starts 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4, ...
  SplitMix64 gen(0);
  EXPECT_EQ(gen.Next(), 0xe220a8397b1dcdafull);
  EXPECT_EQ(gen.Next(), 0x6e789e6aa1b965f4ull);
  EXPECT_EQ(gen.Next(), 0x06c45d188009454full);
  EXPECT_EQ(SplitMix64Hash(0), 0xe220a8397b1dcdafull);
  EXPECT_EQ(SplitMix64Hash(kSplitMix64Gamma), 0x6e789e6aa1b965f4ull);
}

TEST(HashTest, Mix64IsABijectionOnASample) {
  std::set<uint64_t> seen;
  for (uint64_t i = 0; i < 4096; ++i) seen.insert(Mix64(i));
  EXPECT_EQ(seen.size(), 4096u);
  EXPECT_EQ(Mix64(0), 0u);  // the finalizer fixes zero; SplitMix64Hash adds gamma first
}

TEST(RandomTest, NamedStreamsAreIndependentAndReproducible) {
  SplitMix64 a(7, "layers.0.attn"), b(7, "layers.0.attn"), c(7, "layers.1.attn");
  const uint64_t first = a.Next();
  EXPECT_EQ(first, b.Next());
  EXPECT_NE(first, c.Next());
  // The stream's state is seed ^ FNV(name), stepped once before the first draw.
  SplitMix64 manual(7 ^ Fnv1a64("layers.0.attn"));
  manual.Next();
  EXPECT_EQ(manual.Next(), first);
}

TEST(RandomTest, DerivedDrawsStayInRange) {
  SplitMix64 gen(42);
  std::set<uint32_t> below;
  for (int i = 0; i < 2000; ++i) {
    const uint32_t v = gen.Below(5);
    ASSERT_LT(v, 5u);
    below.insert(v);
    const float f = gen.UniformFloat();
    ASSERT_GE(f, 0.0f);
    ASSERT_LT(f, 1.0f);
    const double d = gen.UniformDouble();
    ASSERT_GE(d, 0.0);
    ASSERT_LT(d, 1.0);
  }
  EXPECT_EQ(below.size(), 5u);  // 2000 draws hit every value of 5
}

}  // namespace
}  // namespace expertmesh::base
