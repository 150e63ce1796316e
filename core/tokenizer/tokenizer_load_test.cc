// Loading tokenizer.json: a small hand-made file, its two merge spellings, and malformed or
// unsupported variants that must fail with an error naming the field at fault.
#include <gtest/gtest.h>

#include <functional>
#include <nlohmann/json.hpp>

#include "core/tokenizer/bpe.h"
#include "core/tokenizer/pretokenizer.h"
#include "core/tokenizer/tokenizer.h"

namespace expertmesh::tokenizer {
namespace {

using nlohmann::json;

// Byte-level vocabulary of all 256 bytes (ids 0..255) plus a few merges spelling "hello",
// " world", and an added token. Pieces and merges follow the rules of the reference: merges apply
// lowest rank first.
json SmallTokenizer() {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[BytesToByteLevel(std::string(1, static_cast<char>(b)))] = b;
  const char* merged[] = {"he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld"};
  int id = 256;
  for (const char* m : merged) vocab[m] = id++;
  json tok = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", json::array({{{"id", 300},
                                     {"content", "<eot>"},
                                     {"single_word", false},
                                     {"lstrip", false},
                                     {"rstrip", false},
                                     {"normalized", false},
                                     {"special", true}}})},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers", json::array({{{"type", "Split"},
                                        {"pattern", {{"Regex", kDeepSeekPatterns[0]}}},
                                        {"behavior", "Isolated"},
                                        {"invert", false}},
                                       {{"type", "Split"},
                                        {"pattern", {{"Regex", kDeepSeekPatterns[2]}}},
                                        {"behavior", "Isolated"},
                                        {"invert", false}},
                                       {{"type", "ByteLevel"},
                                        {"add_prefix_space", false},
                                        {"trim_offsets", true},
                                        {"use_regex", false}}})}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"vocab", vocab},
        {"merges",
         json::array({"h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"})}}},
  };
  return tok;
}

TEST(TokenizerLoadTest, SmallFileEncodesWithItsMerges) {
  auto tok = Tokenizer::FromJson(SmallTokenizer().dump());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 301);
  EXPECT_EQ((*tok)->Encode("hello world"), (std::vector<int32_t>{259, 264}));
  EXPECT_EQ((*tok)->Encode("hello<eot> world"), (std::vector<int32_t>{259, 300, 264}));
  EXPECT_EQ((*tok)->Encode("hello<eot>", false).size(), 6u);  // hello < e o t >
  // "helo": h+e merges (rank 0), then no rule joins he+l (only he+ll), so he, l, o.
  EXPECT_EQ((*tok)->Encode("helo"), (std::vector<int32_t>{256, 'l', 'o'}));
  EXPECT_EQ((*tok)->Decode({259, 300, 264}), "hello<eot> world");
}

TEST(TokenizerLoadTest, PairFormMergesEqualStringForm) {
  json j = SmallTokenizer();
  json pairs = json::array();
  for (const auto& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    pairs.push_back({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)});
  }
  j["model"]["merges"] = pairs;
  auto a = Tokenizer::FromJson(SmallTokenizer().dump());
  auto b = Tokenizer::FromJson(j.dump());
  ASSERT_TRUE(a.ok() && b.ok());
  for (const char* text : {"hello world", "hellohello worldworld", "hel lo wor ld"}) {
    EXPECT_EQ((*a)->Encode(text), (*b)->Encode(text)) << text;
  }
}

TEST(TokenizerLoadTest, IgnoreMergesTakesWholeVocabularyPieces) {
  // With ignore_merges a piece that is itself in the vocabulary is one token even where the
  // merges would not build it ("hell" + "o" needs rank 3, but we drop that merge).
  json j = SmallTokenizer();
  j["model"]["merges"].erase(3);
  j["model"]["ignore_merges"] = true;
  auto tok = Tokenizer::FromJson(j.dump());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->Encode("hello"), std::vector<int32_t>{259});
  j["model"]["ignore_merges"] = false;
  auto plain = Tokenizer::FromJson(j.dump());
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ((*plain)->Encode("hello"), (std::vector<int32_t>{258, 'o'}));
}

struct BadCase {
  const char* name;
  std::function<void(json&)> mutate;
  const char* expected;  // substring of the error message
};

TEST(TokenizerLoadTest, MalformedFilesNameWhatIsWrong) {
  const BadCase cases[] = {
      {"root array", [](json& j) { j = json::array(); }, "expected an object"},
      {"no model", [](json& j) { j.erase("model"); }, "model: missing"},
      {"model type", [](json& j) { j["model"]["type"] = "WordPiece"; }, "model.type: only BPE"},
      {"no vocab", [](json& j) { j["model"].erase("vocab"); }, "model.vocab: missing"},
      {"vocab id type", [](json& j) { j["model"]["vocab"]["he"] = "x"; },
       "model.vocab[\"he\"]: expected an integer id"},
      {"negative id", [](json& j) { j["model"]["vocab"]["he"] = -4; }, "out of range"},
      {"duplicate vocab id", [](json& j) { j["model"]["vocab"]["he"] = 257; },
       "is used by two tokens"},
      {"merges type", [](json& j) { j["model"]["merges"] = "h e"; },
       "model.merges: expected an array"},
      {"merge without space", [](json& j) { j["model"]["merges"][1] = "ll"; },
       "model.merges[1]: expected \"left right\""},
      {"merge unknown token", [](json& j) { j["model"]["merges"][2] = "zz ll"; },
       "model.merges[2]: token 'zz' is not in model.vocab"},
      {"merge result missing", [](json& j) { j["model"]["merges"][2] = "ll he"; },
       "model.merges[2]: the merged token 'llhe' is not in model.vocab"},
      {"merge pair size",
       [](json& j) {
         j["model"]["merges"][0] = json::array({"h", "e", "x"});
       },
       "model.merges[0]: expected a pair"},
      {"dropout", [](json& j) { j["model"]["dropout"] = 0.1; }, "model.dropout"},
      {"byte fallback", [](json& j) { j["model"]["byte_fallback"] = true; }, "model.byte_fallback"},
      {"suffix", [](json& j) { j["model"]["end_of_word_suffix"] = "</w>"; },
       "model.end_of_word_suffix"},
      {"unk not in vocab", [](json& j) { j["model"]["unk_token"] = "<unk>"; }, "model.unk_token"},
      {"normalizer",
       [](json& j) {
         j["normalizer"] = {{"type", "NFC"}};
       },
       "normalizer.type: 'NFC' is not supported"},
      {"normalizer sequence",
       [](json& j) {
         j["normalizer"] = {{"type", "Sequence"},
                            {"normalizers", json::array({{{"type", "NFC"}}})}};
       },
       "normalizer.normalizers"},
      {"pre_tokenizer null", [](json& j) { j["pre_tokenizer"] = nullptr; }, "pre_tokenizer"},
      {"pre_tokenizer type",
       [](json& j) {
         j["pre_tokenizer"] = {{"type", "Whitespace"}};
       },
       "pre_tokenizer.type: 'Whitespace' is not supported"},
      {"split behavior",
       [](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"; },
       "pre_tokenizer.pretokenizers[0].behavior: 'Removed' is not supported"},
      {"split invert", [](json& j) { j["pre_tokenizer"]["pretokenizers"][1]["invert"] = true; },
       "pre_tokenizer.pretokenizers[1].invert"},
      {"split string pattern",
       [](json& j) {
         j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"String", " "}};
       },
       "pre_tokenizer.pretokenizers[0].pattern"},
      {"bad regex",
       [](json& j) {
         j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "(ab"}};
       },
       "Split pattern 0: pattern does not compile"},
      {"regex with \\w",
       [](json& j) {
         j["pre_tokenizer"]["pretokenizers"][1]["pattern"] = {{"Regex", "\\w+"}};
       },
       "Split pattern 1: pattern uses \\w"},
      {"no ByteLevel", [](json& j) { j["pre_tokenizer"]["pretokenizers"].erase(2); },
       "a ByteLevel step is required"},
      {"ByteLevel regex",
       [](json& j) { j["pre_tokenizer"]["pretokenizers"][2]["use_regex"] = true; },
       "pre_tokenizer.pretokenizers[2].use_regex"},
      {"ByteLevel prefix",
       [](json& j) { j["pre_tokenizer"]["pretokenizers"][2]["add_prefix_space"] = true; },
       "pre_tokenizer.pretokenizers[2].add_prefix_space"},
      {"decoder",
       [](json& j) {
         j["decoder"] = {{"type", "WordPiece"}};
       },
       "decoder.type: 'WordPiece' is not supported"},
      {"decoder null", [](json& j) { j["decoder"] = nullptr; }, "decoder"},
      {"added lstrip", [](json& j) { j["added_tokens"][0]["lstrip"] = true; },
       "added_tokens[0].lstrip: true is not supported"},
      {"added single_word", [](json& j) { j["added_tokens"][0]["single_word"] = true; },
       "added_tokens[0].single_word"},
      {"added id", [](json& j) { j["added_tokens"][0]["id"] = "300"; }, "added_tokens[0].id"},
      {"huge id", [](json& j) { j["added_tokens"][0]["id"] = int64_t{1} << 40; },
       "added_tokens[0].id: id 1099511627776 is out of range"},
      {"added content", [](json& j) { j["added_tokens"][0].erase("content"); },
       "added_tokens[0].content: missing"},
      {"added twice",
       [](json& j) {
         json t = j["added_tokens"][0];
         t["id"] = 301;
         j["added_tokens"].push_back(t);
       },
       "content '<eot>' is listed twice"},
  };
  for (const BadCase& c : cases) {
    json j = SmallTokenizer();
    c.mutate(j);
    auto tok = Tokenizer::FromJson(j.dump());
    ASSERT_FALSE(tok.ok()) << c.name;
    EXPECT_TRUE(absl::IsInvalidArgument(tok.status())) << c.name << ": " << tok.status();
    EXPECT_NE(std::string(tok.status().message()).find(c.expected), std::string::npos)
        << c.name << ": got \"" << tok.status().message() << "\", expected \"" << c.expected
        << "\"";
  }
}

TEST(TokenizerLoadTest, NotJsonAndMissingFile) {
  auto bad = Tokenizer::FromJson("{\"model\": ");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("not valid JSON"), std::string::npos);
  auto missing = Tokenizer::FromFile("/nonexistent/dir/tokenizer.json");
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(absl::IsNotFound(missing.status())) << missing.status();
  EXPECT_NE(std::string(missing.status().message()).find("/nonexistent/dir/tokenizer.json"),
            std::string::npos);
}

TEST(TokenizerLoadTest, AcceptedVariants) {
  // An empty normalizer Sequence (what the DeepSeek file has), a missing model.type (older files)
  // and any post_processor (Encode never adds tokens, so it is not used).
  json j = SmallTokenizer();
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array()}};
  j["model"].erase("type");
  j["post_processor"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}};
  auto tok = Tokenizer::FromJson(j.dump());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->Encode("hello"), std::vector<int32_t>{259});
}

}  // namespace
}  // namespace expertmesh::tokenizer
