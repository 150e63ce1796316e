#include "core/base/utf8.h"

#include <string>

#include "gtest/gtest.h"

namespace expertmesh::base {
namespace {

TEST(Utf8Test, MaximalSubpartsFollowTheUnicodeStandard) {
  // The Unicode Standard, chapter 3, "U+FFFD Substitution of Maximal Subparts" (Table 3-8):
  // 61 F1 80 80 E1 80 C2 62 80 63 80 BF 64 -> a FFFD FFFD FFFD b FFFD c FFFD FFFD d.
  EXPECT_EQ(Utf8Lossy("\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64"),
            "a\uFFFD\uFFFD\uFFFDb\uFFFDc\uFFFD\uFFFDd");
  // Surrogates, overlongs and values past U+10FFFF are ill-formed byte by byte.
  EXPECT_EQ(Utf8Lossy("\xED\xA0\x80"), "\uFFFD\uFFFD\uFFFD");
  EXPECT_EQ(Utf8Lossy("\xC0\xAF"), "\uFFFD\uFFFD");
  EXPECT_EQ(Utf8Lossy("\xF4\x90\x80\x80"), "\uFFFD\uFFFD\uFFFD\uFFFD");
  EXPECT_EQ(Utf8Lossy("\xE4\xB8"), "\uFFFD");
  EXPECT_EQ(Utf8Lossy("ok \xF0\x9F\x98\x80"), "ok \xF0\x9F\x98\x80");
  EXPECT_TRUE(IsValidUtf8("plain ascii text that is long enough for the 8-byte loop"));
  EXPECT_FALSE(IsValidUtf8("plain ascii text that is long enough \xFF for the loop"));
  EXPECT_FALSE(IsValidUtf8("\xEF\xBF"));
}

TEST(Utf8Test, NextUtf8ClassifiesCompleteIncompleteAndInvalid) {
  EXPECT_EQ(NextUtf8("a").kind, Utf8Prefix::kComplete);
  EXPECT_EQ(NextUtf8("\xE4\xB8\xAD!").length, 3u);
  const Utf8Step truncated = NextUtf8("\xF0\x9F\x98");
  EXPECT_EQ(truncated.kind, Utf8Prefix::kIncomplete);
  EXPECT_EQ(truncated.length, 3u);
  // A lead byte followed by a non-continuation byte is one ill-formed byte, not two.
  const Utf8Step bad = NextUtf8("\xE4" "a");
  EXPECT_EQ(bad.kind, Utf8Prefix::kInvalid);
  EXPECT_EQ(bad.length, 1u);
  EXPECT_EQ(NextUtf8("\x80").kind, Utf8Prefix::kInvalid);
}

TEST(Utf8Test, HoldingTailKeepsOnlyACompletableEnd) {
  std::string out;
  EXPECT_EQ(AppendUtf8LossyHoldingTail("ab\xE4\xB8", &out), 2u);
  EXPECT_EQ(out, "ab");
  out.clear();
  // An ill-formed end can never complete: it is replaced, not held.
  EXPECT_EQ(AppendUtf8LossyHoldingTail("ab\xC0", &out), 0u);
  EXPECT_EQ(out, "ab\uFFFD");
}

TEST(Utf8Test, CodePointsRoundTripThroughEveryLength) {
  for (char32_t cp : {U'\x24', U'\xA2', U'\x20AC', U'\x10348', U'\x10FFFF'}) {
    std::string s;
    AppendCodePoint(cp, &s);
    ASSERT_TRUE(IsValidUtf8(s)) << static_cast<uint32_t>(cp);
    const Utf8Step step = NextUtf8(s);
    ASSERT_EQ(step.length, s.size());
    EXPECT_EQ(DecodeCodePoint(s, step.length), cp);
  }
  std::string surrogate;
  AppendCodePoint(0xD800, &surrogate);
  EXPECT_EQ(surrogate, "\xED\xA0\x80");
  EXPECT_FALSE(IsValidUtf8(surrogate));
}

}  // namespace
}  // namespace expertmesh::base
