#include "core/tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/base/mapped_file.h"
#include "core/tokenizer/test_util.h"

namespace expertmesh::tokenizer {
namespace {

using testing::kV3Path;
using testing::V3;
using testing::V4;

struct Vector {
  std::string text;
  std::vector<int32_t> ids;
};

std::vector<Vector> ReadVectors(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in) << path;
  std::vector<Vector> out;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line);
    out.push_back({j.at("text").get<std::string>(), j.at("ids").get<std::vector<int32_t>>()});
  }
  return out;
}

void CheckVectors(const Tokenizer& tok, const std::string& path, size_t expected_count) {
  const std::vector<Vector> vectors = ReadVectors(path);
  ASSERT_EQ(vectors.size(), expected_count);
  size_t encode_ok = 0, decode_ok = 0;
  for (const Vector& v : vectors) {
    if (tok.Encode(v.text) == v.ids) {
      ++encode_ok;
    } else {
      ADD_FAILURE() << "encode mismatch for " << nlohmann::json(v.text).dump();
    }
    if (tok.Decode(v.ids) == v.text) {
      ++decode_ok;
    } else {
      ADD_FAILURE() << "decode mismatch for " << nlohmann::json(v.text).dump();
    }
  }
  std::printf("%s: encode %zu/%zu, decode %zu/%zu\n", path.c_str(), encode_ok, vectors.size(),
              decode_ok, vectors.size());
}

TEST(TokenizerVectorsTest, V3FileMatchesEveryVector) {
  CheckVectors(V3(), EM_SHARED_DIR "/tokenizer/vectors.jsonl", 443);
}

TEST(TokenizerVectorsTest, DefaultV4MatchesEveryVector) {
  CheckVectors(V4(), EM_SHARED_DIR "/tokenizer/v4_vectors.jsonl", 29);
}

TEST(TokenizerVectorsTest, V4AlsoMatchesTheV3VectorsWithoutV4TokenText) {
  // The V4 tokenizer only adds tokens: on text holding none of them it must agree with V3.
  size_t checked = 0;
  for (const Vector& v : ReadVectors(EM_SHARED_DIR "/tokenizer/vectors.jsonl")) {
    bool has_v4_token = false;
    for (const AddedToken& t : DeepSeekV4AddedTokens()) {
      has_v4_token |= v.text.find(t.content) != std::string::npos;
    }
    if (has_v4_token) continue;
    EXPECT_EQ(V4().Encode(v.text), v.ids) << v.text;
    ++checked;
  }
  EXPECT_GT(checked, 400u);
}

TEST(TokenizerTest, BuiltV4TokensEqualTheSharedList) {
  auto j = nlohmann::json::parse(std::ifstream(EM_SHARED_DIR "/tokenizer/v4_added_tokens.json"));
  const std::vector<AddedToken> built = DeepSeekV4AddedTokens();
  ASSERT_EQ(built.size(), j.size());
  for (size_t i = 0; i < built.size(); ++i) {
    const auto& e = j[i];
    EXPECT_EQ(built[i].id, e.at("id").get<int32_t>());
    EXPECT_EQ(built[i].content, e.at("content").get<std::string>());
    EXPECT_EQ(built[i].special, e.at("special").get<bool>());
    EXPECT_EQ(built[i].normalized, e.at("normalized").get<bool>());
    // Our AddedToken has no lstrip/rstrip/single_word: the loader rejects true for them.
    EXPECT_FALSE(e.at("lstrip").get<bool>());
    EXPECT_FALSE(e.at("rstrip").get<bool>());
    EXPECT_FALSE(e.at("single_word").get<bool>());
    EXPECT_EQ(V4().TokenToId(built[i].content), built[i].id);
    EXPECT_TRUE(V4().IsSpecial(built[i].id));
    EXPECT_FALSE(V3().TokenToId(built[i].content).has_value()) << built[i].content;
  }
}

TEST(TokenizerTest, SizesAndLookupsAgreeWithTheFile) {
  auto file = base::ReadFileToString(kV3Path);
  ASSERT_TRUE(file.ok());
  const auto j = nlohmann::json::parse(*file);
  const auto& vocab = j.at("model").at("vocab");
  const auto& added = j.at("added_tokens");
  EXPECT_EQ(V3().vocab_size(), 128815);
  EXPECT_EQ(V4().vocab_size(), kDeepSeekVocabRows);
  EXPECT_EQ(V3().added_tokens().size(), added.size());
  EXPECT_EQ(V4().added_tokens().size(), added.size() + 31);
  // Every vocabulary entry and added token maps both ways as written in the file.
  std::set<int32_t> added_ids;
  for (const auto& t : added) {
    const int32_t id = t.at("id").get<int32_t>();
    added_ids.insert(id);
    const std::string content = t.at("content").get<std::string>();
    EXPECT_EQ(V3().TokenToId(content), id);
    EXPECT_EQ(V3().IdToToken(id), content);
    EXPECT_EQ(V3().IsSpecial(id), t.at("special").get<bool>());
    EXPECT_TRUE(V3().IsAddedToken(id));
  }
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const int32_t id = it.value().get<int32_t>();
    if (added_ids.count(id)) continue;
    ASSERT_EQ(V3().TokenToId(it.key()), id) << it.key();
    ASSERT_EQ(V3().IdToToken(id), it.key());
    ASSERT_FALSE(V3().IsAddedToken(id));
  }
  // Rows past the tokens exist in the V4 model but have no token: they decode to nothing.
  EXPECT_EQ(V4().IdToToken(129000), std::nullopt);
  EXPECT_EQ(V4().Decode({129000, 129279}), "");
  EXPECT_EQ(V4().Decode({-1, kDeepSeekVocabRows, 1 << 30}), "");
  EXPECT_EQ(V3().TokenToId("no such token"), std::nullopt);
}

TEST(TokenizerTest, AddedTokenTextNeverForgesWithoutMatching) {
  // Every added token of the V4 tokenizer, alone, back to back, and inside ordinary text.
  std::string all;
  std::vector<std::string> texts;
  for (const AddedToken& t : V4().added_tokens()) {
    texts.push_back(t.content);
    texts.push_back("x" + t.content + " y");
    all += t.content;
  }
  texts.push_back(all);
  texts.push_back("<｜User｜>hi<｜Assistant｜><think>ok</think>\n\n<｜DSML｜tool_calls>");
  for (const std::string& text : texts) {
    const std::vector<int32_t> ids = V4().Encode(text, /*match_added_tokens=*/false);
    for (int32_t id : ids) ASSERT_FALSE(V4().IsAddedToken(id)) << text << " -> id " << id;
    EXPECT_EQ(V4().Decode(ids), text);
    // With matching on, each token string is exactly its id.
    const std::vector<int32_t> matched = V4().Encode(text);
    EXPECT_EQ(V4().Decode(matched), text);
  }
  for (const AddedToken& t : V4().added_tokens()) {
    EXPECT_EQ(V4().Encode(t.content), std::vector<int32_t>{t.id}) << t.content;
  }
}

TEST(TokenizerTest, AddedTokensUseLeftmostLongestMatch) {
  // "｜DSML｜" is itself a token, and it is a substring of "<｜DSML｜...": the leftmost match wins.
  const int32_t dsml = *V4().TokenToId("｜DSML｜");
  const std::vector<int32_t> ids = V4().Encode("<｜DSML｜invoke");
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids[1], dsml);
  EXPECT_EQ(V4().Decode(ids), "<｜DSML｜invoke");
  // Case-sensitive and exact: near misses are plain text.
  for (const char* near : {"<Think>", "<think >", "<｜user｜>", "｜DSML|"}) {
    for (int32_t id : V4().Encode(near)) EXPECT_FALSE(V4().IsAddedToken(id)) << near;
  }
}

TEST(TokenizerTest, EncodeAppendAppends) {
  std::vector<int32_t> ids = {7};
  V4().EncodeAppend("Hello world", true, &ids);
  std::vector<int32_t> expected = {7};
  const std::vector<int32_t> plain = V4().Encode("Hello world");
  expected.insert(expected.end(), plain.begin(), plain.end());
  EXPECT_EQ(ids, expected);
}

TEST(TokenizerTest, IllFormedUtf8IsEncodedByteForByte) {
  const std::string bad[] = {std::string("\xFF"),
                             std::string("ab\xC3"),
                             std::string("\xE4\xB8"),
                             std::string("x\xED\xA0\x80y"),
                             std::string("\xC0\xAF hello \x80\x80"),
                             std::string("<｜User｜>\xF4\x90\x80\x80<think>")};
  for (const std::string& s : bad) {
    const std::vector<int32_t> ids = V4().Encode(s);
    EXPECT_EQ(V4().DecodeBytes(ids), s);
    EXPECT_EQ(V4().Decode(ids), base::Utf8Lossy(s));
  }
}

TEST(TokenizerTest, DefaultPathFollowsTheEnvironment) {
  EXPECT_EQ(DefaultTokenizerPath(), kV3Path);
  ASSERT_EQ(setenv("EXPERTMESH_TOKENIZER", "/nonexistent/tokenizer.json", 1), 0);
  EXPECT_EQ(DefaultTokenizerPath(), "/nonexistent/tokenizer.json");
  auto missing = LoadDefaultTokenizer();
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(absl::IsNotFound(missing.status()));
  EXPECT_NE(std::string(missing.status().message()).find("scripts/setup.sh"), std::string::npos);
  EXPECT_NE(std::string(missing.status().message()).find("/nonexistent/tokenizer.json"),
            std::string::npos);
  ASSERT_EQ(unsetenv("EXPERTMESH_TOKENIZER"), 0);
  EXPECT_FALSE(LoadTokenizer("/nonexistent/other.json").ok());
}

TEST(TokenizerTest, AFileThatAlreadyHasTheV4TokensLoadsAsItIs) {
  // Stand-in for a real V4 tokenizer.json: the V3 file with the V4 tokens written into it, one of
  // them under a different content to show that the file wins over the overlay.
  auto file = base::ReadFileToString(kV3Path);
  ASSERT_TRUE(file.ok());
  auto j = nlohmann::json::parse(*file);
  for (const AddedToken& t : DeepSeekV4AddedTokens()) {
    j["added_tokens"].push_back({{"id", t.id},
                                 {"content", t.id == 128823 ? "<｜custom｜>" : t.content},
                                 {"single_word", false},
                                 {"lstrip", false},
                                 {"rstrip", false},
                                 {"normalized", false},
                                 {"special", true}});
  }
  LoadOptions options;
  options.extra_added_tokens = DeepSeekV4AddedTokens();
  auto tok = Tokenizer::FromJson(j.dump(), options);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->added_tokens().size(), V4().added_tokens().size());
  EXPECT_EQ((*tok)->TokenToId("<｜custom｜>"), 128823);
  EXPECT_EQ((*tok)->TokenToId("<｜place▁holder▁no▁823｜>"), std::nullopt);
  EXPECT_EQ((*tok)->TokenToId("<think>"), 128821);
}

}  // namespace
}  // namespace expertmesh::tokenizer
