// Request parsing under hostile input: valid OpenAI chat, legacy completions and Anthropic
// messages bodies are mutated (byte flips and inserts, truncation, a field's value swapped for
// another type, deep nesting, huge numbers, invalid UTF-8) by a seeded generator, and every
// parser must either accept the body or refuse it with a 4xx that carries a message and
// serializes to valid JSON. Bounded (a few thousand bodies per parser) so that it also runs in
// the ASan+UBSan build, where a crash, leak or undefined behaviour fails it.
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "gateway/chat_request.h"
#include "gateway/completions_api.h"
#include "gateway/messages_api.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace expertmesh::gateway {
namespace {

using nlohmann::json;

const char* const kChatSeeds[] = {
    R"({"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user",
        "content":[{"type":"text","text":"hi"}]}],"max_tokens":5,"temperature":0.5,"top_p":0.9,
        "top_k":3,"seed":1,"stop":["a","b"],"stream":true,"stream_options":{"include_usage":true},
        "logprobs":true,"top_logprobs":2,"reasoning_effort":"high","user":"u"})",
    R"({"model":"m","messages":[{"role":"user","content":"q"},{"role":"assistant","content":"",
        "tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},
        {"role":"tool","tool_call_id":"c1","content":"r"}],"tools":[{"type":"function",
        "function":{"name":"f","parameters":{"type":"object"}}}],"tool_choice":{"type":"function",
        "function":{"name":"f"}},"n":2,"chat_template_kwargs":{"thinking":true}})",
};
const char* const kCompletionSeeds[] = {
    R"({"model":"m","prompt":"Once upon","max_tokens":8,"temperature":0,"stop":"\n",
        "logprobs":2,"n":2,"seed":4,"suffix":"","best_of":2})",
    R"({"model":"m","prompt":[[1,2,3,4]],"echo":true,"stream":true,
        "stream_options":{"include_usage":false},"top_k":4})",
};
const char* const kMessagesSeeds[] = {
    R"({"model":"m","max_tokens":2048,"system":[{"type":"text","text":"sys",
        "cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":"hi"},
        {"role":"assistant","content":[{"type":"thinking","thinking":"t","signature":""},
        {"type":"text","text":"a"}]},{"role":"user","content":[{"type":"text","text":"b"}]}],
        "stop_sequences":["x"],"temperature":0.7,"top_k":5,"stream":true,
        "thinking":{"type":"enabled","budget_tokens":1024},"metadata":{"user_id":"{\"a\":1}"}})",
    R"({"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"}],
        "tools":[{"name":"f","input_schema":{"type":"object"}}],"tool_choice":{"type":"auto"}})",
};

class Mutator {
 public:
  explicit Mutator(uint64_t seed) : rng_(seed) {}

  std::string Mutate(const std::string& seed) {
    std::string s = seed;
    const int rounds = 1 + Below(3);
    for (int i = 0; i < rounds; ++i) {
      switch (Below(8)) {
        case 0:  // flip a byte
          if (!s.empty()) s[Below(s.size())] ^= static_cast<char>(1 + Below(255));
          break;
        case 1:  // insert a byte that matters to JSON or UTF-8
          s.insert(s.begin() + Below(s.size() + 1), Pick(kBytes));
          break;
        case 2:  // truncate
          s.resize(Below(s.size() + 1));
          break;
        case 3:  // repeat a slice
          if (!s.empty()) {
            const size_t a = Below(s.size()), n = 1 + Below(std::min<size_t>(s.size() - a, 64));
            s.insert(Below(s.size() + 1), s.substr(a, n));
          }
          break;
        default:  // structural: a node of the document swapped for another value
          s = Structural(s);
          break;
      }
    }
    return s;
  }

 private:
  size_t Below(size_t n) {
    return n == 0 ? 0 : std::uniform_int_distribution<size_t>(0, n - 1)(rng_);
  }
  template <size_t N>
  char Pick(const char (&bytes)[N]) {
    return bytes[Below(N - 1)];
  }

  std::string Structural(const std::string& text) {
    json doc = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (doc.is_discarded()) return text;
    std::vector<json*> nodes;
    std::function<void(json&)> collect = [&](json& j) {
      nodes.push_back(&j);
      if (j.is_structured()) {
        for (auto& child : j) collect(child);
      }
    };
    collect(doc);
    json* target = nodes[Below(nodes.size())];
    std::string raw_value;  // a value nlohmann cannot hold, spliced in as text
    switch (Below(12)) {
      case 0:
        *target = nullptr;
        break;
      case 1:
        *target = Below(2) == 0;
        break;
      case 2:
        *target = -1;
        break;
      case 3:
        *target = 0;
        break;
      case 4:
        *target = "text";
        break;
      case 5:
        *target = json::array();
        break;
      case 6:
        *target = json::object();
        break;
      case 7:
        *target = json::array({*target, *target});
        break;
      case 8:
        raw_value = Below(2) == 0 ? "1e999" : "-123456789012345678901234567890";
        break;
      case 9:
        raw_value = "18446744073709551616";
        break;
      case 10:
        raw_value = std::string(Below(2) == 0 ? 600 : 100, '[') +
                    std::string(Below(2) == 0 ? 600 : 100, ']');
        break;
      default:
        raw_value = "\"bad \xff\xfe utf8 \xc0\xaf\xed\xa0\x80\"";
        break;
    }
    if (raw_value.empty()) return doc.dump();
    *target = "\x01PLACEHOLDER\x01";
    std::string out = doc.dump();
    const std::string marker = json("\x01PLACEHOLDER\x01").dump();
    const size_t at = out.find(marker);
    if (at != std::string::npos) out.replace(at, marker.size(), raw_value);
    return out;
  }

  static constexpr char kBytes[] = "{}[]\",:\\0-e.\x00\xff\xc3\xe2\xf0\x80 ntf";
  std::mt19937_64 rng_;
};

void CheckRefusal(const std::optional<ApiError>& e, const std::string& body) {
  if (!e) return;
  ASSERT_GE(e->status, 400) << body;
  ASSERT_LT(e->status, 500) << body;
  ASSERT_FALSE(e->message.empty()) << body;
  // Both error shapes must be valid JSON whatever bytes the message quotes.
  ASSERT_FALSE(json::parse(e->ToJson(), nullptr, false).is_discarded()) << body;
  ASSERT_FALSE(json::parse(e->ToAnthropicJson(), nullptr, false).is_discarded()) << body;
}

// Runs `parse` on `per_seed` mutations of each seed; returns how many were accepted.
template <size_t N>
int Fuzz(const char* const (&seeds)[N], uint64_t salt, int per_seed,
         const std::function<std::optional<ApiError>(const std::string&)>& parse) {
  int accepted = 0;
  for (size_t i = 0; i < N; ++i) {
    const std::string seed = seeds[i];
    std::optional<ApiError> refused = parse(seed);
    EXPECT_FALSE(refused.has_value()) << "the seed itself must be valid: " << seed << "\n"
                                      << refused->message;
    Mutator m(salt * 1000003 + i);
    for (int k = 0; k < per_seed; ++k) {
      const std::string body = m.Mutate(seed);
      std::optional<ApiError> e = parse(body);
      CheckRefusal(e, body);
      if (::testing::Test::HasFatalFailure()) return accepted;
      if (!e) ++accepted;
    }
  }
  return accepted;
}

constexpr int kPerSeed = 3000;

TEST(RequestFuzzTest, ChatCompletions) {
  const int accepted = Fuzz(kChatSeeds, 1, kPerSeed, [](const std::string& body) {
    ChatRequest r;
    return ParseChatRequest(body, "m", &r);
  });
  // The mutations must not all be refused at the JSON level: some reach the field checks.
  EXPECT_GT(accepted, 0);
}

TEST(RequestFuzzTest, Completions) {
  const int accepted = Fuzz(kCompletionSeeds, 2, kPerSeed, [](const std::string& body) {
    CompletionRequest r;
    return ParseCompletionRequest(body, "m", 1000, &r);
  });
  EXPECT_GT(accepted, 0);
}

TEST(RequestFuzzTest, AnthropicMessages) {
  const int accepted = Fuzz(kMessagesSeeds, 3, kPerSeed, [](const std::string& body) {
    MessagesRequest r;
    std::optional<ApiError> e = ParseMessagesRequest(body, "m", /*count_only=*/false, &r);
    MessagesRequest c;
    std::optional<ApiError> counted = ParseMessagesRequest(body, "m", /*count_only=*/true, &c);
    CheckRefusal(counted, body);
    return e;
  });
  EXPECT_GT(accepted, 0);
}

}  // namespace
}  // namespace expertmesh::gateway
