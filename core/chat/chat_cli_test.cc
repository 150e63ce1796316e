// End-to-end test of `expertmesh chat-encode` and `expertmesh chat-parse` (cli/cmd_chat.cc) on
// the shared case files: one output line per input line, in order, bad lines answered with
// {"error"} without stopping the rest.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "core/chat/json_value.h"
#include "core/chat/test_util.h"

namespace expertmesh::chat {
namespace {

const std::string kBinary = std::string(EM_BINARY_DIR) + "/cli/expertmesh";

using test_util::Lines;
using test_util::ParseOrDie;
using test_util::ReadFile;

// Runs `expertmesh <args>` with `input` on stdin; returns stdout's lines.
std::vector<std::string> RunCli(const std::string& args, const std::string& input) {
  std::string dir = ::testing::TempDir();
  std::string in = dir + "chat_cli_in_" + std::to_string(::getpid());
  std::string out = in + ".out";
  std::ofstream(in, std::ios::binary) << input;
  int rc = std::system((kBinary + " " + args + " < " + in + " > " + out).c_str());
  EXPECT_EQ(rc, 0) << args;
  std::vector<std::string> lines = Lines(ReadFile(out));
  std::remove(in.c_str());
  std::remove(out.c_str());
  return lines;
}

TEST(ChatCliTest, ChatEncodeWritesPromptsAndIdsLineByLine) {
  std::map<std::string, std::string> reference_ids;  // prompt -> ids, as JSON
  for (const std::string& line :
       Lines(ReadFile(std::string(EM_SHARED_DIR) + "/tokenizer/v4_vectors.jsonl"))) {
    JsonValue v = ParseOrDie(line);
    reference_ids[v.Find("text")->str()] = v.Find("ids")->DumpPython();
  }
  std::vector<JsonValue> cases;
  std::string input;
  for (const std::string& line :
       Lines(ReadFile(std::string(EM_SHARED_DIR) + "/encoding/cases.jsonl"))) {
    JsonValue c = ParseOrDie(line);
    cases.push_back(c);
    input += JsonValue::Object({{"messages", *c.Find("messages")}, {"options", *c.Find("options")}})
                 .DumpPython() +
             "\n";
    if (cases.size() == 2) input += "{not json\n{\"messages\": [{\"role\": \"robot\"}]}\n";
  }
  std::vector<std::string> out = RunCli("chat-encode", input);
  ASSERT_EQ(out.size(), cases.size() + 2);
  size_t k = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    JsonValue o = ParseOrDie(out[i]);
    if (i == 2 || i == 3) {
      ASSERT_NE(o.Find("error"), nullptr) << out[i];
      if (i == 3) {
        EXPECT_EQ(o.Find("error")->str().rfind("messages[0].role", 0), 0u) << out[i];
      }
      continue;
    }
    const JsonValue& c = cases[k++];
    ASSERT_NE(o.Find("prompt"), nullptr) << out[i];
    EXPECT_EQ(o.Find("prompt")->str(), c.Find("prompt")->str()) << c.Find("name")->str();
    auto ref = reference_ids.find(c.Find("prompt")->str());
    ASSERT_NE(ref, reference_ids.end()) << c.Find("name")->str();
    EXPECT_EQ(o.Find("ids")->DumpPython(), ref->second) << c.Find("name")->str();
  }
}

TEST(ChatCliTest, ChatParseWritesParsedMessagesLineByLine) {
  std::vector<JsonValue> cases;
  std::string input;
  for (const std::string& line :
       Lines(ReadFile(std::string(EM_SHARED_DIR) + "/encoding/parse_cases.jsonl"))) {
    JsonValue c = ParseOrDie(line);
    cases.push_back(c);
    input += JsonValue::Object({{"completion", *c.Find("completion")},
                                {"thinking_mode", *c.Find("thinking_mode")}})
                 .DumpPython() +
             "\n";
  }
  input += "[]\n{\"completion\": \"a</think>b\", \"thinking_mode\": \"chat\"}\n";
  std::vector<std::string> out = RunCli("chat-parse", input);
  ASSERT_EQ(out.size(), cases.size() + 2);
  for (size_t i = 0; i < cases.size(); ++i) {
    EXPECT_EQ(out[i], JsonValue::Object({{"parsed", *cases[i].Find("parsed")}}).DumpPython());
  }
  EXPECT_NE(ParseOrDie(out[cases.size()]).Find("error"), nullptr);
  JsonValue malformed = ParseOrDie(out[cases.size() + 1]);
  ASSERT_NE(malformed.Find("malformed"), nullptr);
  EXPECT_EQ(malformed.Find("malformed")->Find("error")->str(), "unexpected_token");
  EXPECT_EQ(malformed.Find("parsed")->Find("content")->str(), "a</think>b");
}

}  // namespace
}  // namespace expertmesh::chat
