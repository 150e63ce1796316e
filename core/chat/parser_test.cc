#include "core/chat/parser.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/chat/encoder.h"
#include "core/chat/json_value.h"
#include "core/chat/test_util.h"
#include "core/tokenizer/tokenizer.h"

namespace expertmesh::chat {
namespace {

using test_util::kEncodingDir;
using test_util::Lines;
using test_util::ParseOrDie;
using test_util::ReadFile;

ParseOptions Options(ThinkingMode mode) {
  ParseOptions o;
  o.thinking_mode = mode;
  return o;
}

// A completion to parse and what it must parse to (as the JSON of parse_cases.jsonl).
struct Completion {
  std::string name;
  ThinkingMode mode;
  std::string text;
  std::string expected;  // ParsedMessage::ToJson(false).DumpPython()
};

std::vector<Completion> ParseCases() {
  std::vector<Completion> out;
  for (const std::string& line : Lines(ReadFile(kEncodingDir + "/parse_cases.jsonl"))) {
    JsonValue v = ParseOrDie(line);
    out.push_back(Completion{v.Find("name")->str(),
                             v.Find("thinking_mode")->str() == "thinking" ? ThinkingMode::kThinking
                                                                          : ThinkingMode::kChat,
                             v.Find("completion")->str(), v.Find("parsed")->DumpPython()});
  }
  return out;
}

// The assistant turns of an official case: the text after each `<｜Assistant｜><think>` (thinking)
// or `<｜Assistant｜></think>` (reasoning dropped) up to and including EOS, expected to parse back
// to that assistant message of the input (reasoning only where the prompt kept it).
std::vector<Completion> OfficialTurns(int n) {
  std::string dir = kEncodingDir + "/official/";
  std::string prompt = ReadFile(dir + "test_output_" + std::to_string(n) + ".txt");
  JsonValue input = ParseOrDie(ReadFile(dir + "test_input_" + std::to_string(n) + ".json"));
  const JsonValue* messages = input.is_object() ? input.Find("messages") : &input;
  std::vector<const JsonValue*> assistants;
  for (const JsonValue& m : messages->items()) {
    if (m.Find("role")->str() == "assistant") assistants.push_back(&m);
  }
  std::vector<Completion> out;
  size_t pos = 0;
  for (size_t k = 0; k < assistants.size(); ++k) {
    pos = prompt.find(kAssistant, pos);
    EXPECT_NE(pos, std::string::npos);
    pos += kAssistant.size();
    const bool thinking = prompt.compare(pos, kThinkStart.size(), kThinkStart) == 0;
    pos += thinking ? kThinkStart.size() : kThinkEnd.size();
    size_t end = prompt.find(kEos, pos) + kEos.size();
    const JsonValue& a = *assistants[k];
    std::vector<JsonValue> calls;
    if (const JsonValue* tc = a.Find("tool_calls")) {
      for (const JsonValue& c : tc->items()) {
        const JsonValue* fn = c.Find("function");
        calls.push_back(JsonValue::Object(
            {{"type", JsonValue::String("function")},
             {"function", JsonValue::Object({{"name", *fn->Find("name")},
                                             {"arguments", *fn->Find("arguments")}})}}));
      }
    }
    const JsonValue* content = a.Find("content");
    const JsonValue* reasoning = a.Find("reasoning_content");
    JsonValue expected = JsonValue::Object(
        {{"role", JsonValue::String("assistant")},
         {"content", content ? *content : JsonValue::String("")},
         {"reasoning_content", thinking && reasoning ? *reasoning : JsonValue::String("")},
         {"tool_calls", JsonValue::Array(std::move(calls))}});
    out.push_back(Completion{"official_" + std::to_string(n) + "_turn_" + std::to_string(k),
                             thinking ? ThinkingMode::kThinking : ThinkingMode::kChat,
                             prompt.substr(pos, end - pos), expected.DumpPython()});
    pos = end;
  }
  return out;
}

std::vector<Completion> AllCompletions() {
  std::vector<Completion> all = ParseCases();
  for (int n : {1, 2, 3}) {
    for (Completion& c : OfficialTurns(n)) all.push_back(std::move(c));
  }
  return all;
}

TEST(ChatParserTest, ParseCasesAndOfficialTurnsParse) {
  std::vector<Completion> all = AllCompletions();
  ASSERT_GE(all.size(), 3u + 2u + 2u + 2u);
  for (const Completion& c : all) {
    ParsedMessage m = ParseCompletion(c.text, Options(c.mode));
    EXPECT_TRUE(m.ok()) << c.name << ": " << m.error_message;
    EXPECT_EQ(m.ToJson(false).DumpPython(), c.expected) << c.name;
  }
}

// Feeds `chunks` to a StreamParser, checks that the deltas add up to its message (nothing taken
// back, tool-call deltas in the OpenAI shape) and returns the message.
ParsedMessage Stream(const std::vector<std::string>& chunks, ThinkingMode mode,
                     const std::string& label) {
  StreamParser p(Options(mode));
  std::string reasoning, content;
  std::vector<ParsedToolCall> calls;
  const auto apply = [&](const StreamDelta& d) {
    reasoning += d.reasoning_content;
    content += d.content;
    for (const ToolCallDelta& t : d.tool_calls) {
      if (t.index == static_cast<int>(calls.size())) {
        EXPECT_FALSE(t.id.empty()) << label;  // the name may be empty, as the official allows
        calls.push_back(ParsedToolCall{t.id, "function", t.name, t.arguments});
      } else {
        ASSERT_EQ(t.index, static_cast<int>(calls.size()) - 1) << label;
        EXPECT_TRUE(t.id.empty() && t.name.empty()) << label;
        calls.back().arguments += t.arguments;
      }
    }
    // Whatever was emitted is final: the accumulated deltas are the message so far.
    ASSERT_EQ(reasoning, p.message().reasoning_content) << label;
    ASSERT_EQ(content, p.message().content) << label;
    ASSERT_EQ(calls.size(), p.message().tool_calls.size()) << label;
    for (size_t i = 0; i < calls.size(); ++i) {
      ASSERT_EQ(calls[i].arguments, p.message().tool_calls[i].arguments) << label;
      ASSERT_EQ(calls[i].id, p.message().tool_calls[i].id) << label;
    }
  };
  for (const std::string& c : chunks) apply(p.Feed(c));
  apply(p.Finish());
  return p.message();
}

void ExpectSame(const ParsedMessage& a, const ParsedMessage& b, const std::string& label) {
  EXPECT_EQ(a.reasoning_content, b.reasoning_content) << label;
  EXPECT_EQ(a.content, b.content) << label;
  EXPECT_EQ(a.error, b.error) << label;
  ASSERT_EQ(a.tool_calls.size(), b.tool_calls.size()) << label;
  for (size_t i = 0; i < a.tool_calls.size(); ++i) {
    EXPECT_EQ(a.tool_calls[i].id, b.tool_calls[i].id) << label;
    EXPECT_EQ(a.tool_calls[i].name, b.tool_calls[i].name) << label;
    EXPECT_EQ(a.tool_calls[i].arguments, b.tool_calls[i].arguments) << label;
  }
}

std::vector<std::string> RandomChunks(const std::string& text, std::mt19937_64& rng, int max_len) {
  std::vector<std::string> chunks;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t n = 1 + rng() % max_len;
    chunks.push_back(text.substr(pos, n));
    pos += n;
  }
  return chunks;
}

TEST(ChatParserTest, StreamingEqualsWholeAtEverySplit) {
  std::mt19937_64 rng(1);
  for (const Completion& c : AllCompletions()) {
    ParsedMessage whole = ParseCompletion(c.text, Options(c.mode));
    for (size_t cut = 0; cut <= c.text.size(); ++cut) {
      std::string label = c.name + " cut " + std::to_string(cut);
      ParsedMessage m = Stream({c.text.substr(0, cut), c.text.substr(cut)}, c.mode, label);
      ExpectSame(m, whole, label);
      if (HasFatalFailure() || HasFailure()) return;
    }
    for (int r = 0; r < 20; ++r) {
      ExpectSame(Stream(RandomChunks(c.text, rng, 1 + r % 8), c.mode, c.name), whole, c.name);
    }
    // Byte by byte.
    std::vector<std::string> bytes;
    for (char ch : c.text) bytes.emplace_back(1, ch);
    ExpectSame(Stream(bytes, c.mode, c.name + " bytes"), whole, c.name + " bytes");
  }
}

TEST(ChatParserTest, StreamingTokenByTokenEqualsWhole) {
  absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> tok = tokenizer::LoadDefaultTokenizer();
  ASSERT_TRUE(tok.ok()) << "default tokenizer (run scripts/setup.sh): " << tok.status();
  for (const Completion& c : AllCompletions()) {
    std::vector<std::string> tokens;
    for (int32_t id : (*tok)->Encode(c.text, true)) {
      tokens.emplace_back((*tok)->TokenBytes(id));
    }
    ASSERT_GT(tokens.size(), 1u);
    ParsedMessage m = Stream(tokens, c.mode, c.name + " tokens");
    ExpectSame(m, ParseCompletion(c.text, Options(c.mode)), c.name + " tokens");
    EXPECT_TRUE(m.ok()) << c.name;
  }
}

TEST(ChatParserTest, ToolCallDeltasStreamArgumentsAsTheyArrive) {
  const std::string text =
      "</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
      "<｜DSML｜parameter name=\"q\" string=\"true\">a \"b\"</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"n\" string=\"false\">[1, 2]</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"g\">\n</｜DSML｜invoke>\n"
      "</｜DSML｜tool_calls><｜end▁of▁sentence｜>";
  StreamParser p(Options(ThinkingMode::kThinking));
  size_t value_at = text.find("a \"b\"");
  p.Feed(text.substr(0, value_at + 2));
  // The name is out and the value's first bytes too, before the parameter is closed.
  ASSERT_EQ(p.message().tool_calls.size(), 1u);
  EXPECT_EQ(p.message().tool_calls[0].name, "f");
  EXPECT_EQ(p.message().tool_calls[0].arguments, "{\"q\": \"a ");
  p.Feed(text.substr(value_at + 2));
  p.Finish();
  const ParsedMessage& m = p.message();
  EXPECT_TRUE(m.ok()) << m.error_message;
  ASSERT_EQ(m.tool_calls.size(), 2u);
  EXPECT_EQ(m.tool_calls[0].arguments, "{\"q\": \"a \\\"b\\\"\", \"n\": [1, 2]}");
  EXPECT_EQ(m.tool_calls[1].name, "g");
  EXPECT_EQ(m.tool_calls[1].arguments, "{}");
  EXPECT_NE(m.tool_calls[0].id, m.tool_calls[1].id);
  // Deterministic ids: the same seed gives the same ids.
  EXPECT_EQ(ParseCompletion(text, Options(ThinkingMode::kThinking)).tool_calls[1].id,
            m.tool_calls[1].id);
}

TEST(ChatParserTest, MalformedOutputIsFlaggedAndKeptAsContent) {
  struct Bad {
    ThinkingMode mode;
    std::string text;
    ParseError error;
    std::string reasoning;
    std::string content;
    size_t calls;
  } bad[] = {
      {ThinkingMode::kThinking, "no end of thinking<｜end▁of▁sentence｜>",
       ParseError::kMissingThinkEnd, "no end of thinking", "", 0},
      {ThinkingMode::kThinking, "cut off", ParseError::kMissingThinkEnd, "cut off", "", 0},
      {ThinkingMode::kChat, "cut off", ParseError::kMissingEos, "", "cut off", 0},
      {ThinkingMode::kChat, "a</think>b<｜end▁of▁sentence｜>", ParseError::kUnexpectedToken, "",
       "a</think>b", 0},
      {ThinkingMode::kChat, "done<｜end▁of▁sentence｜>more", ParseError::kTextAfterEnd, "",
       "done<｜end▁of▁sentence｜>more", 0},
      {ThinkingMode::kChat,
       "x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nam=\"f\">\n</｜DSML｜invoke>",
       ParseError::kMalformedToolCalls, "",
       "x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nam=\"f\">\n</｜DSML｜invoke>", 0},
      {ThinkingMode::kChat,
       "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" "
       "string=\"maybe\">1</｜DSML｜parameter>",
       ParseError::kMalformedToolCalls, "",
       "<｜DSML｜parameter name=\"a\" string=\"maybe\">1</｜DSML｜parameter>", 1},
      {ThinkingMode::kChat,
       "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke "
       "name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>oops",
       ParseError::kTextAfterEnd, "", "oops", 1},
      {ThinkingMode::kChat, "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n",
       ParseError::kMalformedToolCalls, "",
       "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n", 0},
      {ThinkingMode::kChat,
       "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" "
       "string=\"true\">1</｜DSML｜parameter>\n"
       "<｜DSML｜parameter name=\"a\" "
       "string=\"true\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
       ParseError::kMalformedToolCalls, "",
       ">\n<｜DSML｜parameter name=\"a\" "
       "string=\"true\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
       1},
      {ThinkingMode::kThinking, "r\n\n<｜DSML｜tool_calls>", ParseError::kMissingThinkEnd, "r",
       "\n\n<｜DSML｜tool_calls>", 0},
  };
  for (const Bad& b : bad) {
    ParsedMessage m = ParseCompletion(b.text, Options(b.mode));
    EXPECT_EQ(m.error, b.error) << b.text << ": " << m.error_message;
    EXPECT_FALSE(m.error_message.empty()) << b.text;
    EXPECT_EQ(m.reasoning_content, b.reasoning) << b.text;
    EXPECT_EQ(m.content, b.content) << b.text;
    EXPECT_EQ(m.tool_calls.size(), b.calls) << b.text;
  }
  // Without EOS after a closed tool-call block the official parser accepts the message.
  ParsedMessage m = ParseCompletion(
      "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke "
      "name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
      Options(ThinkingMode::kChat));
  EXPECT_TRUE(m.ok()) << m.error_message;
}

// Random completions from marker fragments and random bytes: no crash, no hang, streaming (in
// random chunks) equals whole. EM_FUZZ_ITERATIONS runs longer.
TEST(ChatParserFuzzTest, RandomCompletionsStreamLikeWhole) {
  int iterations = 3000;
  if (const char* env = std::getenv("EM_FUZZ_ITERATIONS")) iterations = std::atoi(env);
  const std::vector<std::string> pieces = {std::string(kEos),
                                           std::string(kBos),
                                           "<think>",
                                           "</think>",
                                           "｜DSML｜",
                                           "\n\n<｜DSML｜tool_calls",
                                           ">\n",
                                           "<｜DSML｜invoke",
                                           " name=\"f\">\n",
                                           "name=\"",
                                           "\">\n",
                                           "<｜DSML｜parameter",
                                           " name=\"k\" string=\"true\">",
                                           "\" string=\"false\">",
                                           "<",
                                           "/｜DSML｜parameter",
                                           "</｜DSML｜invoke",
                                           "</｜DSML｜tool_calls>",
                                           "\n",
                                           "\n\n",
                                           " ",
                                           "a",
                                           "\"",
                                           "\\",
                                           "é",
                                           "你好",
                                           "\xff",
                                           "\xe4\xbd",
                                           "<｜",
                                           "｜",
                                           "{",
                                           "}",
                                           "1"};
  std::mt19937_64 rng(12345);
  const auto pick = [&](const std::vector<std::string>& v) { return v[rng() % v.size()]; };
  const std::vector<std::string> values = {"v",   "a\"b\\c\n", "[1, 2]", "",
                                           "<x>", "你好",      ">\n<",   "<\n"};
  // A well-formed tool-call block with 0-3 invokes of 0-3 parameters.
  const auto block = [&] {
    std::string b = "\n\n<｜DSML｜tool_calls>\n";
    for (int i = rng() % 4; i > 0; --i) {
      b += "<｜DSML｜invoke name=\"" + pick({"f", "get x", "é\"q", ""}) + "\">\n";
      for (int j = rng() % 4; j > 0; --j) {
        b += "<｜DSML｜parameter name=\"k" + std::to_string(j) + "\" string=\"" +
             pick({"true", "false"}) + "\">" + pick(values) + "</｜DSML｜parameter>\n";
      }
      b += "</｜DSML｜invoke>\n";
    }
    return b + "</｜DSML｜tool_calls>";
  };
  int ok = 0;
  int ok_with_calls = 0;
  for (int iter = 0; iter < iterations; ++iter) {
    ThinkingMode mode = rng() % 2 ? ThinkingMode::kThinking : ThinkingMode::kChat;
    // A plausible completion, then random damage: inserted fragments or bytes, cuts, deletions.
    std::string text;
    if (mode == ThinkingMode::kThinking && rng() % 5 != 0) {
      text += pick({"r", "reason\n", "", "a\n\nb"}) + "</think>";
    }
    text += pick({"", "content", "x\n\ny", "\n"});
    if (rng() % 2) text += block();
    if (rng() % 8 != 0) text += std::string(kEos);
    if (rng() % 4 == 0) {  // or plain garbage made of fragments and bytes
      text.clear();
      for (int i = rng() % 24; i > 0; --i) {
        text += rng() % 6 ? pick(pieces) : std::string(1, static_cast<char>(rng() % 256));
      }
    }
    for (int k = rng() % 3; k > 0 && rng() % 2; --k) {
      size_t at = rng() % (text.size() + 1);
      switch (rng() % 4) {
        case 0:
          text.insert(at, pick(pieces));
          break;
        case 1:
          text.insert(at, 1, static_cast<char>(rng() % 256));
          break;
        case 2:
          text.resize(at);
          break;
        default:
          if (at < text.size()) text.erase(at, 1 + rng() % 4);
          break;
      }
    }
    ParsedMessage whole = ParseCompletion(text, Options(mode));
    ok += whole.ok();
    ok_with_calls += whole.ok() && !whole.tool_calls.empty();
    EXPECT_EQ(whole.ok(), whole.error_message.empty());
    ParsedMessage streamed =
        Stream(RandomChunks(text, rng, 1 + rng() % 6), mode, "fuzz " + std::to_string(iter));
    ExpectSame(streamed, whole, "fuzz " + std::to_string(iter));
    if (HasFailure()) {
      ADD_FAILURE() << "input: " << PythonJsonString(text);
      return;
    }
  }
  // The generator reaches well-formed messages, tool calls included, not only errors.
  EXPECT_GT(ok, iterations / 50);
  EXPECT_GT(ok_with_calls, 0);
}

}  // namespace
}  // namespace expertmesh::chat
