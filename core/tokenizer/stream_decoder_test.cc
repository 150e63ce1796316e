// The streaming decoder (the UTF-8 repair it builds on is tested in core/base/utf8_test.cc).
#include <gtest/gtest.h>

#include "core/base/utf8.h"
#include "core/tokenizer/test_util.h"
#include "core/tokenizer/tokenizer.h"

namespace expertmesh::tokenizer {
namespace {

using testing::V4;

TEST(StreamDecoderTest, HoldsPartialCharactersUntilComplete) {
  // Ids of single bytes: find the tokens for the bytes of "é" (C3 A9) and "😀" (F0 9F 98 80).
  const Tokenizer& tok = V4();
  auto byte_id = [&](uint8_t b) { return tok.Encode(std::string(1, static_cast<char>(b))).at(0); };
  StreamDecoder d(tok);
  EXPECT_EQ(d.Add(byte_id(0xF0)), "");
  EXPECT_EQ(d.pending_bytes(), 1u);
  EXPECT_EQ(d.Add(byte_id(0x9F)), "");
  EXPECT_EQ(d.Add(byte_id(0x98)), "");
  EXPECT_EQ(d.Add(byte_id(0x80)), "\xF0\x9F\x98\x80");
  EXPECT_EQ(d.pending_bytes(), 0u);
  EXPECT_EQ(d.Add(byte_id(0xC3)), "");
  // A byte that cannot continue the character: the held byte is U+FFFD at once.
  EXPECT_EQ(d.Add(byte_id('x')), "\uFFFDx");
  EXPECT_EQ(d.Add(byte_id(0xE4)), "");
  EXPECT_EQ(d.Flush(), "\uFFFD");
  EXPECT_EQ(d.Flush(), "");
  // Ids without a token emit nothing and keep what is held.
  EXPECT_EQ(d.Add(byte_id(0xC3)), "");
  EXPECT_EQ(d.Add(129000), "");
  EXPECT_EQ(d.Add(byte_id(0xA9)), "\xC3\xA9");
}

TEST(StreamDecoderTest, RandomIdsEqualWholeDecode) {
  const Tokenizer& tok = V4();
  testing::UnicodeFuzzer fuzz(7);
  const int iterations = testing::FuzzIterations(300);
  for (int it = 0; it < iterations; ++it) {
    std::vector<int32_t> ids;
    const size_t n = fuzz.Below(40);
    for (size_t i = 0; i < n; ++i) {
      // Mostly real tokens (including the many that hold partial characters), some added
      // tokens, some ids without a token.
      switch (fuzz.Below(8)) {
        case 0:
          ids.push_back(static_cast<int32_t>(fuzz.Below(kDeepSeekVocabRows)));
          break;
        case 1:
          ids.push_back(static_cast<int32_t>(128000 + fuzz.Below(1280)));
          break;
        default:
          ids.push_back(static_cast<int32_t>(fuzz.Below(128000)));
      }
    }
    StreamDecoder d(tok);
    std::string streamed;
    for (int32_t id : ids) {
      const std::string piece = d.Add(id);
      ASSERT_TRUE(base::IsValidUtf8(piece));  // never splits a character
      ASSERT_LE(d.pending_bytes(), 3u);
      streamed += piece;
    }
    streamed += d.Flush();
    ASSERT_EQ(streamed, tok.Decode(ids));
  }
}

TEST(StreamDecoderTest, RandomByteChunksEqualLossyDecode) {
  testing::UnicodeFuzzer fuzz(11);
  const int iterations = testing::FuzzIterations(2000);
  for (int it = 0; it < iterations; ++it) {
    const std::string bytes = fuzz.Below(2) == 0 ? fuzz.RandomBytes(64) : fuzz.RandomUnicode(24);
    StreamDecoder d(V4());
    std::string streamed;
    size_t pos = 0;
    while (pos < bytes.size()) {
      const size_t len = std::min(bytes.size() - pos, 1 + fuzz.Below(6));
      std::string piece;
      d.AddBytes(std::string_view(bytes).substr(pos, len), &piece);
      ASSERT_TRUE(base::IsValidUtf8(piece));
      streamed += piece;
      pos += len;
    }
    streamed += d.Flush();
    ASSERT_EQ(streamed, base::Utf8Lossy(bytes));
  }
}

TEST(StreamDecoderTest, EncodedTextStreamsBackExactly) {
  const Tokenizer& tok = V4();
  testing::UnicodeFuzzer fuzz(13);
  const int iterations = testing::FuzzIterations(300);
  for (int it = 0; it < iterations; ++it) {
    const std::string text = fuzz.RandomUnicode(60);
    StreamDecoder d(tok);
    std::string streamed;
    for (int32_t id : tok.Encode(text)) d.Add(id, &streamed);
    EXPECT_EQ(d.pending_bytes(), 0u);
    streamed += d.Flush();
    ASSERT_EQ(streamed, text);
  }
}

}  // namespace
}  // namespace expertmesh::tokenizer
