// Integration test of the `expertmesh tokenize` / `detokenize` commands (the built binary).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/base/utf8.h"
#include "core/tokenizer/test_util.h"

namespace expertmesh::tokenizer {
namespace {

using nlohmann::json;
using testing::V3;
using testing::V4;

const std::string kBinary = EM_BINARY_DIR "/cli/expertmesh";

struct Result {
  int exit_code = -1;
  std::vector<std::string> lines;
};

// Runs the binary with `args`, feeding `input` on stdin.
Result RunCli(const std::string& args, const std::string& input) {
  char in_path[] = "/tmp/em_cli_tokenize_XXXXXX";
  const int fd = mkstemp(in_path);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(write(fd, input.data(), input.size()), static_cast<ssize_t>(input.size()));
  close(fd);
  const std::string cmd = kBinary + " " + args + " < " + in_path;
  Result r;
  FILE* pipe = popen(cmd.c_str(), "r");
  EXPECT_NE(pipe, nullptr);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  unlink(in_path);
  std::istringstream lines(out);
  std::string line;
  while (std::getline(lines, line)) r.lines.push_back(line);
  return r;
}

class CliTokenizeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(access(kBinary.c_str(), X_OK), 0)
        << kBinary << " is not built (the tokenizer_cli_test target depends on `expertmesh`)";
  }
};

std::vector<int32_t> Ids(const std::string& line) {
  return json::parse(line).at("ids").get<std::vector<int32_t>>();
}

TEST_F(CliTokenizeTest, TokenizeWritesOneLinePerInputWithErrorsInPlace) {
  const std::string a = "Hello <｜User｜> world, <think>2+2=4</think>";
  const std::string b = "中文和日本語のテキスト 12345";
  const std::string input = json{{"text", a}}.dump() + "\n" + "this is not json\n" +
                            "{\"text\": 5}\n" + "{\"ids\": [1]}\n" + "[1, 2]\n" +
                            json{{"text", b}}.dump() + "\n" + "{\"text\": \"\"}\n";
  const Result r = RunCli("tokenize", input);
  EXPECT_EQ(r.exit_code, 0);
  ASSERT_EQ(r.lines.size(), 7u);
  EXPECT_EQ(Ids(r.lines[0]), V4().Encode(a));
  for (int i : {1, 2, 3, 4}) {
    EXPECT_TRUE(json::parse(r.lines[i]).contains("error")) << r.lines[i];
  }
  EXPECT_EQ(Ids(r.lines[5]), V4().Encode(b));
  EXPECT_EQ(Ids(r.lines[6]), std::vector<int32_t>{});
  // The default is V4: <think> is one control id there, and not in the V3 file.
  EXPECT_NE(V4().Encode(a), V3().Encode(a));
  const Result v3 = RunCli("tokenize --tokenizer " + testing::kV3Path, json{{"text", a}}.dump());
  ASSERT_EQ(v3.lines.size(), 1u);
  EXPECT_EQ(Ids(v3.lines[0]), V3().Encode(a));
}

TEST_F(CliTokenizeTest, DetokenizeChecksIdsAndWritesValidUtf8) {
  const std::vector<int32_t> ids = V4().Encode("Grüße, 世界! <｜Assistant｜>");
  // An id holding only the first bytes of a character, alone: U+FFFD, still valid JSON/UTF-8.
  const std::vector<int32_t> partial = V4().Encode("\xE4\xB8");
  const std::string input = json{{"ids", ids}}.dump() + "\n" + "{\"ids\": [1, \"a\"]}\n" +
                            "{\"ids\": [129280]}\n" + "{\"ids\": [-3]}\n" + "{\"text\": \"x\"}\n" +
                            "{\"ids\": [129000]}\n" + json{{"ids", partial}}.dump() + "\n" +
                            "{\"ids\": 7}\n" + "{\"ids\": [1.5]}\n";
  const Result r = RunCli("detokenize", input);
  EXPECT_EQ(r.exit_code, 0);
  ASSERT_EQ(r.lines.size(), 9u);
  EXPECT_EQ(json::parse(r.lines[0]).at("text"), "Grüße, 世界! <｜Assistant｜>");
  for (int i : {1, 2, 3, 4, 7, 8}) {
    EXPECT_TRUE(json::parse(r.lines[i]).contains("error")) << r.lines[i];
  }
  EXPECT_EQ(json::parse(r.lines[5]).at("text"), "");
  EXPECT_EQ(json::parse(r.lines[6]).at("text"), "\uFFFD");
  for (const std::string& line : r.lines) EXPECT_TRUE(base::IsValidUtf8(line));
  // With the V3 file, ids past its last token are out of range.
  const Result v3 = RunCli("detokenize --tokenizer " + testing::kV3Path, "{\"ids\": [128815]}\n");
  ASSERT_EQ(v3.lines.size(), 1u);
  EXPECT_TRUE(json::parse(v3.lines[0]).contains("error"));
}

TEST_F(CliTokenizeTest, HelpAndBadArguments) {
  EXPECT_EQ(RunCli("tokenize --help", "").exit_code, 0);
  EXPECT_EQ(RunCli("detokenize --help", "").exit_code, 0);
  EXPECT_NE(RunCli("tokenize --bogus", "").exit_code, 0);
  EXPECT_NE(RunCli("tokenize --tokenizer /nonexistent.json", "{\"text\":\"a\"}\n").exit_code, 0);
}

}  // namespace
}  // namespace expertmesh::tokenizer
