#include "gateway/model_info.h"

#include <filesystem>
#include <string>

#include "core/base/mapped_file.h"
#include "gateway/chat_request.h"
#include "gtest/gtest.h"
#include "tests/testing/model_config_json.h"

namespace expertmesh::gateway {
namespace {

std::string ModelDir(const std::string& name, const std::string& config_json) {
  const std::string dir = ::testing::TempDir() + "/gateway-model-info/" + name;
  std::filesystem::create_directories(dir);
  EXPECT_TRUE(base::WriteFileAtomically(dir + "/config.json", config_json).ok());
  return dir;
}

TEST(ModelInfoTest, ReadsTheConfigThroughTheModelParser) {
  const std::string dir = ModelDir("small", testing::SmallModelConfigJson(3, 1, 8));
  auto info = LoadModelInfo(dir + "/", "");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->id, "small");  // the base name, trailing slash ignored
  EXPECT_EQ(info->context_length, 1024u);
  EXPECT_EQ(info->vocab_size, 1024u);
  EXPECT_EQ(info->config.num_hidden_layers, 3);
  EXPECT_EQ(info->config.n_routed_experts, 8);
  EXPECT_GT(info->created, 0);
  auto named = LoadModelInfo(dir, "served-name");
  ASSERT_TRUE(named.ok()) << named.status();
  EXPECT_EQ(named->id, "served-name");
}

TEST(ModelInfoTest, APartialConfigIsRejectedNamingTheKey) {
  // What the gateway used to accept (any JSON object): the workers would refuse it.
  const std::string dir = ModelDir("partial", R"({"vocab_size": 1024, "hidden_size": 256})");
  auto info = LoadModelInfo(dir, "");
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(info.status().message().find("config.json"), std::string::npos) << info.status();
  EXPECT_NE(info.status().message().find("num_hidden_layers"), std::string::npos) << info.status();
}

TEST(ModelInfoTest, MissingConfigIsNotFound) {
  const std::string dir = ::testing::TempDir() + "/gateway-model-info/empty";
  std::filesystem::create_directories(dir);
  auto info = LoadModelInfo(dir, "");
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.status().code(), absl::StatusCode::kNotFound);
}

TEST(ModelInfoTest, AliasesNameTheServedModelOnly) {
  ModelInfo m;
  m.id = "tiny-a";
  ASSERT_TRUE(AddModelAliases({"claude-sonnet-4-5=tiny-a", "gpt-x=tiny-a"}, &m).ok());
  ServedModel served(m.id, m.aliases);
  EXPECT_TRUE(served.Serves("tiny-a"));
  EXPECT_TRUE(served.Serves("claude-sonnet-4-5"));
  EXPECT_FALSE(served.Serves("claude-opus"));
  EXPECT_FALSE(AddModelAliases({"x=other"}, &m).ok());
  EXPECT_FALSE(AddModelAliases({"=tiny-a"}, &m).ok());
  EXPECT_FALSE(AddModelAliases({"no-equals"}, &m).ok());
  ASSERT_TRUE(AddModelAliases({"*=tiny-a"}, &m).ok());
  EXPECT_TRUE(ServedModel(m.id, m.aliases).Serves("anything"));
}

}  // namespace
}  // namespace expertmesh::gateway
