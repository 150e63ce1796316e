// Bounded, seeded fuzzing of encode/decode (EM_FUZZ_ITERATIONS=N for longer runs), and of the
// parts with two implementations: the BPE merge loop (array scan vs heap) and the pre-tokenizer
// (hand-written DeepSeek splitter vs the PCRE2 regexes).
#include <gtest/gtest.h>

#include <thread>

#include "core/base/utf8.h"
#include "core/tokenizer/bpe.h"
#include "core/tokenizer/pretokenizer.h"
#include "core/tokenizer/test_util.h"
#include "core/tokenizer/tokenizer.h"

namespace expertmesh::tokenizer {
namespace {

using testing::FuzzIterations;
using testing::UnicodeFuzzer;
using testing::V4;

std::vector<std::string> AddedTokenStrings() {
  std::vector<std::string> out;
  for (const AddedToken& t : V4().added_tokens()) out.push_back(t.content);
  return out;
}

TEST(TokenizerFuzzTest, RandomBytesNeverCrashAndRoundTrip) {
  UnicodeFuzzer fuzz(1);
  const int iterations = FuzzIterations(3000);
  for (int it = 0; it < iterations; ++it) {
    const std::string s = fuzz.RandomBytes(80);
    for (bool match : {true, false}) {
      const std::vector<int32_t> ids = V4().Encode(s, match);
      for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < V4().vocab_size());
      // Ill-formed input is encoded byte for byte, so even it comes back exactly.
      ASSERT_EQ(V4().DecodeBytes(ids), s);
      ASSERT_EQ(V4().Decode(ids), base::Utf8Lossy(s));
    }
  }
}

TEST(TokenizerFuzzTest, RandomUnicodeRoundTrips) {
  UnicodeFuzzer fuzz(2);
  const std::vector<std::string> specials = AddedTokenStrings();
  const int iterations = FuzzIterations(2000);
  for (int it = 0; it < iterations; ++it) {
    const std::string s = fuzz.RandomUnicode(80, specials);
    ASSERT_TRUE(base::IsValidUtf8(s));
    const std::vector<int32_t> matched = V4().Encode(s);
    ASSERT_EQ(V4().Decode(matched), s);
    const std::vector<int32_t> plain = V4().Encode(s, /*match_added_tokens=*/false);
    ASSERT_EQ(V4().Decode(plain), s);
    for (int32_t id : plain) ASSERT_FALSE(V4().IsAddedToken(id)) << s;
  }
}

TEST(TokenizerFuzzTest, EncodingIsDeterministicAcrossTheCache) {
  // The second pass is served from the BPE cache; results must not change.
  UnicodeFuzzer fuzz(3);
  std::vector<std::string> texts;
  std::vector<std::vector<int32_t>> first;
  for (int it = 0; it < FuzzIterations(300); ++it) {
    texts.push_back(fuzz.RandomUnicode(60));
    first.push_back(V4().Encode(texts.back()));
  }
  for (size_t i = 0; i < texts.size(); ++i) ASSERT_EQ(V4().Encode(texts[i]), first[i]);
}

TEST(TokenizerFuzzTest, ConcurrentEncodesAgreeWithSerialOnes) {
  // The BPE cache is shared between threads; results must not depend on interleaving.
  UnicodeFuzzer fuzz(6);
  std::vector<std::string> texts;
  for (int it = 0; it < FuzzIterations(400); ++it) texts.push_back(fuzz.RandomUnicode(50));
  auto fresh = Tokenizer::FromFile(testing::kV3Path);
  ASSERT_TRUE(fresh.ok());
  const Tokenizer& tok = **fresh;
  std::vector<std::vector<std::vector<int32_t>>> results(4);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < results.size(); ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = 0; i < texts.size(); ++i) {
        // Each thread walks the texts in its own order so that fills and hits interleave.
        results[t].push_back(tok.Encode(texts[(i * (t + 1)) % texts.size()]));
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (size_t t = 0; t < results.size(); ++t) {
    for (size_t i = 0; i < texts.size(); ++i) {
      ASSERT_EQ(results[t][i], testing::V3().Encode(texts[(i * (t + 1)) % texts.size()]));
    }
  }
}

TEST(TokenizerFuzzTest, MergeLoopsAgree) {
  // Both merge algorithms on words of every length class, including long single-class runs
  // where the array scan gives way to the heap.
  UnicodeFuzzer fuzz(4);
  std::vector<std::string> vocab_words;
  for (int32_t id = 0; id < 128000; id += 97) {
    vocab_words.push_back(std::string(V4().TokenBytes(id)));
  }
  const int iterations = FuzzIterations(1500);
  std::vector<int32_t> a, b;
  for (int it = 0; it < iterations; ++it) {
    std::string word;
    switch (fuzz.Below(4)) {
      case 0:
        word = fuzz.RandomUnicode(12);
        break;
      case 1:
        word = fuzz.RandomBytes(200);
        break;
      case 2:
        for (size_t i = 0, n = 1 + fuzz.Below(8); i < n; ++i) {
          word += vocab_words[fuzz.Below(vocab_words.size())];
        }
        break;
      default:
        word = std::string(1 + fuzz.Below(300), " \n-=a"[fuzz.Below(5)]);
    }
    if (word.empty()) continue;
    a.clear();
    b.clear();
    BpeForTesting(V4()).EncodeWordUncached(word, /*force_heap=*/false, &a);
    BpeForTesting(V4()).EncodeWordUncached(word, /*force_heap=*/true, &b);
    ASSERT_EQ(a, b) << word;
    std::string joined;
    for (int32_t id : a) joined += V4().TokenBytes(id);
    ASSERT_EQ(joined, word);
  }
}

std::vector<std::string> Pieces(const PreTokenizer& pre, std::string_view text, bool regex) {
  std::vector<std::string> out;
  auto emit = [&](std::string_view p) { out.emplace_back(p); };
  if (regex) {
    pre.SplitRegex(text, emit);
  } else {
    pre.Split(text, emit);
  }
  return out;
}

TEST(TokenizerFuzzTest, FastPreTokenizerEqualsTheRegexes) {
  auto pre =
      PreTokenizer::Create({kDeepSeekPatterns[0], kDeepSeekPatterns[1], kDeepSeekPatterns[2]});
  ASSERT_TRUE(pre.ok()) << pre.status();
  ASSERT_TRUE((*pre)->has_fast_path());
  UnicodeFuzzer fuzz(5);
  const int iterations = FuzzIterations(4000);
  for (int it = 0; it < iterations; ++it) {
    const std::string s = fuzz.RandomUnicode(it % 10 == 0 ? 400 : 40);
    ASSERT_EQ(Pieces(**pre, s, false), Pieces(**pre, s, true)) << s;
  }
}

TEST(TokenizerFuzzTest, FastPreTokenizerEqualsTheRegexesOnEveryCodePoint) {
  // Each scalar value in a few contexts that exercise every branch of the main pattern.
  auto pre =
      PreTokenizer::Create({kDeepSeekPatterns[0], kDeepSeekPatterns[1], kDeepSeekPatterns[2]});
  ASSERT_TRUE(pre.ok());
  const char* contexts[][2] = {{"", ""},    {"a", "b"},  {" ", "x"},      {"!", "ab"},
                               {"1", "\n"}, {"  ", " "}, {"\n", "\u0301"}};
  for (char32_t cp = 0; cp <= 0x10FFFF; ++cp) {
    if (cp >= 0xD800 && cp <= 0xDFFF) continue;
    // Outside the BMP, categories change rarely: sample (every 7th in planes 1-2, then sparser).
    if (cp > 0xFFFF && cp % 7 != 0) continue;
    if (cp > 0x30000 && cp % 61 != 0) continue;
    std::string c;
    base::AppendCodePoint(cp, &c);
    for (const auto& ctx : contexts) {
      const std::string s = std::string(ctx[0]) + c + c + ctx[1] + c;
      ASSERT_EQ(Pieces(**pre, s, false), Pieces(**pre, s, true))
          << "U+" << std::hex << static_cast<uint32_t>(cp);
    }
  }
}

}  // namespace
}  // namespace expertmesh::tokenizer
