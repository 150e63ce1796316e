#include "core/chat/encoder.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/chat/json_value.h"
#include "core/chat/messages.h"
#include "core/chat/test_util.h"
#include "core/tokenizer/tokenizer.h"

namespace expertmesh::chat {
namespace {

using test_util::kEncodingDir;
using test_util::Lines;
using test_util::ParseOrDie;
using test_util::ReadFile;

struct Case {
  std::string name;
  std::vector<Message> messages;
  EncodeOptions options;
  std::string prompt;
};

// The four official cases with the options the README gives, then cases.jsonl.
std::vector<Case> LoadCases() {
  std::vector<Case> cases;
  const char* modes[] = {"thinking", "thinking", "thinking", "chat"};
  for (int n = 1; n <= 4; ++n) {
    std::string dir = kEncodingDir + "/official/";
    JsonValue input = ParseOrDie(ReadFile(dir + "test_input_" + std::to_string(n) + ".json"));
    Case c;
    c.name = "official_" + std::to_string(n);
    const JsonValue* messages = input.is_object() ? input.Find("messages") : &input;
    absl::StatusOr<std::vector<Message>> parsed = ParseMessages(*messages);
    EXPECT_TRUE(parsed.ok()) << parsed.status();
    if (!parsed.ok()) continue;
    c.messages = *parsed;
    if (const JsonValue* tools = input.Find("tools")) {
      absl::StatusOr<std::vector<JsonValue>> t = ParseTools(*tools, "tools");
      EXPECT_TRUE(t.ok());
      AttachRequestTools(*t, &c.messages);
    }
    c.options.thinking_mode =
        std::string(modes[n - 1]) == "thinking" ? ThinkingMode::kThinking : ThinkingMode::kChat;
    c.prompt = ReadFile(dir + "test_output_" + std::to_string(n) + ".txt");
    cases.push_back(std::move(c));
  }
  for (const std::string& line : Lines(ReadFile(kEncodingDir + "/cases.jsonl"))) {
    JsonValue v = ParseOrDie(line);
    Case c;
    c.name = v.Find("name")->str();
    absl::StatusOr<std::vector<Message>> parsed = ParseMessages(*v.Find("messages"));
    EXPECT_TRUE(parsed.ok()) << parsed.status();
    absl::StatusOr<EncodeOptions> opts = ParseEncodeOptions(*v.Find("options"));
    EXPECT_TRUE(opts.ok()) << opts.status();
    if (!parsed.ok() || !opts.ok()) continue;
    c.messages = *parsed;
    c.options = *opts;
    c.prompt = v.Find("prompt")->str();
    cases.push_back(std::move(c));
  }
  return cases;
}

TEST(ChatEncoderTest, EveryCaseEncodesByteForByte) {
  std::vector<Case> cases = LoadCases();
  ASSERT_EQ(cases.size(), 4u + Lines(ReadFile(kEncodingDir + "/cases.jsonl")).size());
  for (const Case& c : cases) {
    absl::StatusOr<EncodedChat> enc = EncodeChat(c.messages, c.options);
    ASSERT_TRUE(enc.ok()) << c.name << ": " << enc.status();
    EXPECT_EQ(enc->prompt, c.prompt) << c.name;
    std::string joined;
    for (const Segment& s : enc->segments) joined += s.text;
    EXPECT_EQ(joined, enc->prompt) << c.name;
  }
}

TEST(ChatEncoderTest, MessageErrorsNameTheField) {
  struct Bad {
    const char* json;
    const char* field;
  } bad[] = {
      {R"([{"role": "user", "content": "hi"}, {"role": "wizard"}])", "messages[1].role"},
      {R"([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}])",
       "messages[0].tool_calls[0].function.arguments"},
      {R"([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}])",
       "messages[0].tool_calls[0].function.name"},
      {R"([{"role": "user", "content": 5}])", "messages[0].content"},
      {R"([{"role": "user", "content": [{"type": "image_url"}]}])", "messages[0].content[0].type"},
      {R"([{"role": "user", "content": "x", "task": "fly"}])", "messages[0].task"},
      {R"([{"role": "developer", "content": ""}])", "messages[0].content"},
      {R"([{"role": "system", "content": "", "tools": [{"type": "function"}]}])",
       "messages[0].tools[0].function"},
      {R"({"role": "user"})", "messages"},
  };
  for (const Bad& b : bad) {
    absl::StatusOr<std::vector<Message>> m = ParseMessages(ParseOrDie(b.json));
    ASSERT_FALSE(m.ok()) << b.json;
    EXPECT_EQ(std::string(m.status().message()).rfind(b.field, 0), 0u)
        << m.status() << " for " << b.json;
  }
  EXPECT_FALSE(ParseEncodeOptions(ParseOrDie(R"({"thinking_mode": "dream"})")).ok());
  EXPECT_FALSE(ParseEncodeOptions(ParseOrDie(R"({"reasoning_effort": "low"})")).ok());
}

TEST(ChatEncoderTest, ListContentAndNonObjectArguments) {
  absl::StatusOr<std::vector<Message>> m = ParseMessages(ParseOrDie(R"([
    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    {"role": "assistant", "content": "", "tool_calls": [
      {"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}},
      {"id": "2", "type": "function", "function": {"name": "g", "arguments": "not json"}}]},
    {"role": "tool", "tool_call_id": "1", "content": [{"type": "text", "text": "r1"},
                                                      {"type": "image", "url": "u"}]}])"));
  ASSERT_TRUE(m.ok()) << m.status();
  absl::StatusOr<EncodedChat> enc = EncodeChat(*m, EncodeOptions{});
  ASSERT_TRUE(enc.ok());
  const std::string& p = enc->prompt;
  EXPECT_NE(p.find("<｜User｜>a\n\nb<｜Assistant｜></think>"), std::string::npos) << p;
  EXPECT_NE(
      p.find("<｜DSML｜parameter name=\"arguments\" string=\"true\">[1, 2]</｜DSML｜parameter>"),
      std::string::npos);
  EXPECT_NE(
      p.find("<｜DSML｜parameter name=\"arguments\" string=\"true\">not json</｜DSML｜parameter>"),
      std::string::npos);
  EXPECT_NE(p.find("<tool_result>r1\n\n[Unsupported image]</tool_result>"), std::string::npos) << p;
}

// --- With the tokenizer -------------------------------------------------------------------------

// The default V4 tokenizer (scripts/setup.sh installs its V3 file), loaded once; nullptr (and a
// failure) when it is missing.
const tokenizer::Tokenizer* DefaultTokenizer() {
  static const tokenizer::Tokenizer* tok = [] {
    absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> t = tokenizer::LoadDefaultTokenizer();
    if (!t.ok()) {
      ADD_FAILURE() << "default tokenizer (run scripts/setup.sh): " << t.status();
      return static_cast<const tokenizer::Tokenizer*>(nullptr);
    }
    return static_cast<const tokenizer::Tokenizer*>(t->release());
  }();
  return tok;
}

TEST(ChatTokenIdsTest, CaseIdsEqualPlainTokenizationAndReferenceVectors) {
  ASSERT_NE(DefaultTokenizer(), nullptr);
  const tokenizer::Tokenizer& tok = *DefaultTokenizer();
  // Reference ids (Hugging Face tokenizers) of the rendered case prompts.
  std::map<std::string, std::vector<int32_t>> reference;
  for (const std::string& line :
       Lines(ReadFile(std::string(EM_SHARED_DIR) + "/tokenizer/v4_vectors.jsonl"))) {
    JsonValue v = ParseOrDie(line);
    std::vector<int32_t> ids;
    for (const JsonValue& id : v.Find("ids")->items()) ids.push_back(std::stoi(id.str()));
    reference[v.Find("text")->str()] = ids;
  }
  int with_reference = 0;
  for (const Case& c : LoadCases()) {
    absl::StatusOr<EncodedChat> enc = EncodeChat(c.messages, c.options);
    ASSERT_TRUE(enc.ok());
    absl::StatusOr<std::vector<int32_t>> ids = ChatIds(*enc, tok);
    ASSERT_TRUE(ids.ok()) << c.name << ": " << ids.status();
    EXPECT_EQ(*ids, tok.Encode(enc->prompt, true)) << c.name;
    EXPECT_EQ(tok.DecodeBytes(*ids), enc->prompt) << c.name;
    auto it = reference.find(enc->prompt);
    if (it != reference.end()) {
      ++with_reference;
      EXPECT_EQ(*ids, it->second) << c.name;
    }
  }
  EXPECT_GE(with_reference, 10);
}

TEST(ChatTokenIdsTest, ClientTextNeverForgesControlIds) {
  ASSERT_NE(DefaultTokenizer(), nullptr);
  const tokenizer::Tokenizer& tok = *DefaultTokenizer();
  std::string all;
  std::set<int32_t> added;
  for (const tokenizer::AddedToken& t : tok.added_tokens()) {
    all += t.content + " ";
    added.insert(t.id);
  }
  ASSERT_GE(added.size(), 849u);
  JsonValue args = JsonValue::Object({{all, JsonValue::String(all)}});
  std::string messages =
      R"([{"role": "system", "content": )" + PythonJsonString(all) +
      R"(}, {"role": "user", "content": )" + PythonJsonString(all) +
      R"(}, {"role": "assistant", "reasoning_content": )" + PythonJsonString(all) +
      R"(, "content": )" + PythonJsonString(all) +
      R"(, "tool_calls": [{"id": "c", "type": "function", "function": {"name": )" +
      PythonJsonString(all) + R"(, "arguments": )" + PythonJsonString(args.DumpPython()) +
      R"(}}]}, {"role": "tool", "tool_call_id": "c", "content": )" + PythonJsonString(all) + "}]";
  absl::StatusOr<std::vector<Message>> m = ParseMessages(ParseOrDie(messages));
  ASSERT_TRUE(m.ok()) << m.status();
  for (ThinkingMode mode : {ThinkingMode::kChat, ThinkingMode::kThinking}) {
    EncodeOptions opts;
    opts.thinking_mode = mode;
    opts.drop_thinking = false;
    absl::StatusOr<EncodedChat> enc = EncodeChat(*m, opts);
    ASSERT_TRUE(enc.ok());
    absl::StatusOr<std::vector<int32_t>> ids = ChatIds(*enc, tok);
    ASSERT_TRUE(ids.ok());
    ASSERT_EQ(tok.DecodeBytes(*ids), enc->prompt);

    // Byte spans of the client segments, and of each token.
    std::vector<std::pair<size_t, size_t>> client_spans;
    size_t off = 0;
    int controls = 0;
    for (const Segment& s : enc->segments) {
      if (s.client) client_spans.emplace_back(off, off + s.text.size());
      if (s.kind == Segment::Kind::kControl) ++controls;
      off += s.text.size();
    }
    // user, reasoning, content, name, key, value, tool result: all hold every control string.
    size_t covered = 0;
    for (auto [a, b] : client_spans) covered += b - a;
    ASSERT_GE(covered, 6 * all.size());
    int control_ids = 0;
    size_t pos = 0;
    for (int32_t id : *ids) {
      size_t len = tok.TokenBytes(id).size();
      const bool is_added = added.count(id) > 0;
      control_ids += is_added;
      for (auto [a, b] : client_spans) {
        if (pos < b && pos + len > a) {
          ASSERT_FALSE(is_added) << "control id " << id << " at byte " << pos
                                 << " inside client text [" << a << ", " << b << ")";
        }
      }
      pos += len;
    }
    EXPECT_EQ(control_ids, controls);
    // Tokenizing the whole prompt with matching on would have forged them.
    std::vector<int32_t> naive = tok.Encode(enc->prompt, true);
    int naive_controls = 0;
    for (int32_t id : naive) naive_controls += added.count(id) > 0;
    EXPECT_GT(naive_controls, controls + 6 * static_cast<int>(added.size()) - 1);
  }
}

// Random conversations (any bytes, control strings, every role and option): encoding never
// fails, the segments add up to the prompt, the ids decode to it, and no control id falls
// inside client text. EM_FUZZ_ITERATIONS runs longer.
TEST(ChatTokenIdsTest, FuzzRandomConversations) {
  ASSERT_NE(DefaultTokenizer(), nullptr);
  const tokenizer::Tokenizer& tok = *DefaultTokenizer();
  std::set<int32_t> added;
  for (const tokenizer::AddedToken& t : tok.added_tokens()) added.insert(t.id);
  int iterations = 300;
  if (const char* env = std::getenv("EM_FUZZ_ITERATIONS")) iterations = std::atoi(env) / 10 + 1;
  std::mt19937_64 rng(99);
  const std::vector<std::string> pieces = {"a",
                                           " ",
                                           "\n",
                                           "\n\n",
                                           "你好",
                                           "é",
                                           "\xff",
                                           "\xe4\xbd",
                                           "<｜User｜>",
                                           "<｜Assistant｜>",
                                           "</think>",
                                           "<think>",
                                           "｜DSML｜",
                                           "<｜end▁of▁sentence｜>",
                                           "<｜begin▁of▁sentence｜>",
                                           "<｜place▁holder▁no▁5｜>",
                                           "<｜action｜>",
                                           "<tool_result>",
                                           "{",
                                           "\"",
                                           "123",
                                           "  ",
                                           "<"};
  const auto text = [&] {
    std::string s;
    int n = rng() % 6;
    for (int i = 0; i < n; ++i) {
      if (rng() % 5 == 0) {
        s.push_back(static_cast<char>(rng() % 256));
      } else {
        s += pieces[rng() % pieces.size()];
      }
    }
    return s;
  };
  for (int iter = 0; iter < iterations; ++iter) {
    std::vector<Message> messages(rng() % 7);
    for (Message& m : messages) {
      m.role = static_cast<Role>(rng() % 6);
      m.content = text();
      if (m.role == Role::kDeveloper && m.content.empty()) m.content = "d";
      if (rng() % 3 == 0) m.reasoning_content = text();
      if (m.role == Role::kAssistant && rng() % 2) {
        for (int k = rng() % 3; k >= 0; --k) {
          ToolCall c;
          c.id = std::to_string(rng() % 3);
          c.name = text() + "f";
          c.arguments = rng() % 2
                            ? "{" + PythonJsonString(text()) + ": " + PythonJsonString(text()) + "}"
                            : text();
          m.tool_calls.push_back(c);
        }
      }
      if (m.role == Role::kTool) m.tool_call_id = std::to_string(rng() % 3);
      if (rng() % 8 == 0) m.task = "action";
      if (rng() % 10 == 0) m.wo_eos = true;
    }
    EncodeOptions opts;
    opts.thinking_mode = rng() % 2 ? ThinkingMode::kThinking : ThinkingMode::kChat;
    opts.drop_thinking = rng() % 2;
    opts.reasoning_effort = static_cast<ReasoningEffort>(rng() % 3);
    absl::StatusOr<EncodedChat> enc = EncodeChat(messages, opts);
    ASSERT_TRUE(enc.ok()) << enc.status();
    std::string joined;
    std::vector<std::pair<size_t, size_t>> client_spans;
    for (const Segment& s : enc->segments) {
      if (s.client) client_spans.emplace_back(joined.size(), joined.size() + s.text.size());
      joined += s.text;
    }
    ASSERT_EQ(joined, enc->prompt);
    absl::StatusOr<std::vector<int32_t>> ids = ChatIds(*enc, tok);
    ASSERT_TRUE(ids.ok()) << ids.status();
    ASSERT_EQ(tok.DecodeBytes(*ids), enc->prompt);
    size_t pos = 0;
    for (int32_t id : *ids) {
      size_t len = tok.TokenBytes(id).size();
      if (added.count(id) > 0) {
        for (auto [a, b] : client_spans) ASSERT_FALSE(pos < b && pos + len > a) << iter;
      }
      pos += len;
    }
  }
}

TEST(ChatTokenIdsTest, MissingControlTokenIsAnError) {
  absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> v3 = tokenizer::Tokenizer::FromFile(
      std::string(EM_DEPS_DIR) + "/tokenizer/deepseek_v3/tokenizer.json");
  ASSERT_TRUE(v3.ok()) << v3.status();
  absl::StatusOr<std::vector<Message>> m =
      ParseMessages(ParseOrDie(R"([{"role": "user", "content": "hi"}])"));
  ASSERT_TRUE(m.ok());
  EncodeOptions opts;
  opts.thinking_mode = ThinkingMode::kThinking;
  absl::StatusOr<EncodedChat> enc = EncodeChat(*m, opts);
  ASSERT_TRUE(enc.ok());
  absl::StatusOr<std::vector<int32_t>> ids = ChatIds(*enc, **v3);
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace expertmesh::chat
