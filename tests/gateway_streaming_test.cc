// The gateway's streaming, end to end in one process: a real HttpServer + HttpApi + Generator
// talk over loopback gRPC to a ScriptedAttentionWorker that emits a chosen V4 thinking-mode
// completion (reasoning, `</think>`, content, three DSML tool calls, end of sentence) one token
// per message, and over loopback HTTP to a client in the test that reads the SSE stream as it
// arrives. Both APIs (OpenAI chat completions, Anthropic messages) must stream exactly the
// expected events; the worker sends token i+1 only once the client holds everything of tokens
// 0..i that can no longer be the start of a marker (so a buffered stream fails here); the
// non-streamed answer equals the concatenated stream; a client that hangs up frees the sequence;
// a worker failure mid-stream ends the stream with an error event, never a silent cut.
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/chat/encoder.h"
#include "core/tokenizer/tokenizer.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"
#include "tests/testing/in_process_gateway.h"
#include "tests/testing/scripted_attention_worker.h"

namespace expertmesh::gateway {
namespace {

using nlohmann::json;
namespace v1 = expertmesh::v1;
using testing::GatePoint;
using testing::ScriptedAttentionWorker;
using testing::ScriptedReply;
using testing::ScriptedWorkerOptions;
using testing::StopIdMode;

const std::string kEosText = "<｜end▁of▁sentence｜>";

// ---------------------------------------------------------------------------------------------
// The scripted completion and what each prefix of it must already have produced.

struct ExpectedParam {
  std::string key;
  bool is_string = true;
  std::string value;  // raw as in the DSML (a string's text, or compact JSON)
  size_t header_end = 0, value_begin = 0, close_end = 0;  // byte offsets in the raw text
};

struct ExpectedCall {
  std::string name;
  std::vector<ExpectedParam> params;
  size_t invoke_end = 0;
  std::string ArgumentsText() const {  // CHAT_FORMAT.md: `{` + `"K": V` joined by `, ` + `}`
    std::string a = "{";
    for (size_t i = 0; i < params.size(); ++i) {
      if (i > 0) a += ", ";
      a += json(params[i].key).dump() + ": " +
           (params[i].is_string ? json(params[i].value).dump() : params[i].value);
    }
    return a + "}";
  }
  json Arguments() const { return json::parse(ArgumentsText()); }
};

// What the client holds (or must hold): reasoning, content, tool calls (name, arguments text).
struct Progress {
  std::string reasoning, content;
  struct Call {
    std::string id, name, arguments;
  };
  std::vector<Call> calls;
};

struct Completion {
  std::string raw;  // the completion text, EOS included
  size_t reasoning_begin = 0, reasoning_end = 0, content_begin = 0, content_end = 0;
  size_t tools_end = 0;
  std::string reasoning, content;
  std::vector<ExpectedCall> calls;
};

Completion BuildCompletion() {
  Completion c;
  c.reasoning =
      "The user asks two things: the weather in Paris and the files under /tmp. I have tools "
      "for both, so I will call get_weather, list_files and, to be thorough, search_notes. "
      "Note: 3 < 4 && x > y must stay as written.";
  c.content = "I'll look both up now.\nOne moment, please.";
  c.calls = {
      {"get_weather", {{"city", true, "Paris"}, {"unit", true, "celsius"}}},
      {"list_files",
       {{"path", true, "/tmp"}, {"recursive", false, "true"}, {"max_depth", false, "2"}}},
      {"search_notes",
       {{"query", true, "say \"hi\" <b>now</b>\nthen wait"},
        {"filters", false, "{\"tags\":[\"a\",\"b\"],\"limit\":5}"}}},
  };
  std::string& r = c.raw;
  c.reasoning_begin = r.size();
  r += c.reasoning;
  c.reasoning_end = r.size();
  r += "</think>";
  c.content_begin = r.size();
  r += c.content;
  c.content_end = r.size();
  r += "\n\n<｜DSML｜tool_calls>\n";
  for (size_t i = 0; i < c.calls.size(); ++i) {
    ExpectedCall& call = c.calls[i];
    if (i > 0) r += "\n";
    r += "<｜DSML｜invoke name=\"" + call.name + "\">\n";
    for (size_t j = 0; j < call.params.size(); ++j) {
      ExpectedParam& p = call.params[j];
      if (j > 0) r += "\n";
      r += "<｜DSML｜parameter name=\"" + p.key + "\" string=\"" +
           (p.is_string ? "true" : "false") + "\">";
      p.header_end = p.value_begin = r.size();
      r += p.value;
      r += "</｜DSML｜parameter>";
      p.close_end = r.size();
    }
    r += "\n</｜DSML｜invoke>";
    call.invoke_end = r.size();
  }
  r += "\n</｜DSML｜tool_calls>";
  c.tools_end = r.size();
  r += kEosText;
  return c;
}

// Strings the gateway may hold back while the text could still become them.
const std::vector<std::string>& Markers() {
  static const std::vector<std::string> m = {
      "</think>", "<think>", kEosText, "<｜begin▁of▁sentence｜>", "\n\n<｜DSML｜tool_calls",
      "<｜DSML｜", "｜DSML｜", "</｜DSML｜parameter>", "</｜DSML｜invoke>", "</｜DSML｜tool_calls>",
      // A parameter value ends at `/｜DSML｜parameter` less the `<` (or `<\n`) before it, as the
      // official parser's regex reads it.
      "/｜DSML｜parameter", "<\n/｜DSML｜parameter"};
  return m;
}

// Length of the longest suffix of `s` that is a proper prefix of a marker, plus any unfinished
// UTF-8 character at the end.
size_t HeldBack(std::string_view s) {
  size_t held = 0;
  for (const std::string& m : Markers()) {
    for (size_t n = std::min(m.size() - 1, s.size()); n > held; --n) {
      if (s.substr(s.size() - n) == std::string_view(m).substr(0, n)) {
        held = n;
        break;
      }
    }
  }
  // An unfinished UTF-8 character (lead byte without all its continuation bytes).
  size_t i = s.size();
  size_t cont = 0;
  while (i > 0 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80 && cont < 3) {
    --i;
    ++cont;
  }
  if (i > 0) {
    const unsigned char lead = static_cast<unsigned char>(s[i - 1]);
    size_t need = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
    if (need > cont) held = std::max(held, cont + 1);
  }
  return held;
}

// What the client must hold once the gateway has the first `len` bytes of the completion: all
// reasoning / content / tool-call output those bytes decide, i.e. everything but a trailing part
// that may still begin a marker. Tool calls: a call's name once its first parameter header is
// complete; `"key": ` (and a string's opening quote) once the parameter's header is; a string
// value as far as it came; a non-string value and a string's closing quote once the parameter
// is closed; a call's `}` once the next call's first parameter (or the block's end) is complete.
Progress Required(const Completion& c, size_t len) {
  const size_t certain = len - HeldBack(std::string_view(c.raw).substr(0, len));
  auto part = [&](size_t begin, size_t end) -> std::string {
    if (certain <= begin) return "";
    return c.raw.substr(begin, std::min(certain, end) - begin);
  };
  Progress p;
  p.reasoning = part(c.reasoning_begin, c.reasoning_end);
  p.content = part(c.content_begin, c.content_end);
  for (size_t i = 0; i < c.calls.size(); ++i) {
    const ExpectedCall& call = c.calls[i];
    if (certain < call.params.front().header_end) break;
    Progress::Call got;
    got.name = call.name;
    for (size_t j = 0; j < call.params.size(); ++j) {
      const ExpectedParam& prm = call.params[j];
      if (certain < prm.header_end) break;
      got.arguments += (j == 0 ? "{" : ", ") + json(prm.key).dump() + ": ";
      if (prm.is_string) {
        // The escaped form of the certain part of the value (escaping is per character).
        const std::string partial = json(part(prm.value_begin, prm.value_begin + prm.value.size()))
                                        .dump();
        got.arguments += partial.substr(0, partial.size() - 1);
        if (certain >= prm.close_end) got.arguments += "\"";
      } else if (certain >= prm.close_end) {
        got.arguments += prm.value;
      }
    }
    const size_t next_event =
        i + 1 < c.calls.size() ? c.calls[i + 1].params.front().header_end : c.tools_end;
    if (certain >= next_event) got.arguments += "}";
    p.calls.push_back(std::move(got));
  }
  return p;
}

bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

// Whether `have` covers `need` (the same text so far, at least as far).
bool Covers(const Progress& have, const Progress& need, std::string* why) {
  if (!StartsWith(have.reasoning, need.reasoning)) {
    *why = "reasoning: have '" + have.reasoning + "', need '" + need.reasoning + "'";
    return false;
  }
  if (!StartsWith(have.content, need.content)) {
    *why = "content: have '" + have.content + "', need '" + need.content + "'";
    return false;
  }
  for (size_t i = 0; i < need.calls.size(); ++i) {
    if (i >= have.calls.size()) {
      *why = absl::StrCat("tool call ", i, " (", need.calls[i].name, ") not started");
      return false;
    }
    if (have.calls[i].name != need.calls[i].name ||
        !StartsWith(have.calls[i].arguments, need.calls[i].arguments)) {
      *why = absl::StrCat("tool call ", i, ": have ", have.calls[i].name, " '",
                          have.calls[i].arguments, "', need ", need.calls[i].name, " '",
                          need.calls[i].arguments, "'");
      return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// A small HTTP/1.1 client that hands over the body as it arrives (chunked or not).

struct SseEvent {
  std::string event;  // empty for OpenAI's data-only events
  std::string data;
};

class StreamingClient {
 public:
  ~StreamingClient() { Close(); }
  bool Send(int port, const std::string& target, const std::string& body) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    if (fd_ < 0) return false;
    timeval tv{30, 0};  // a read stalled this long fails the test instead of hanging it
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return false;
    const std::string req = "POST " + target +
                            " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            "Connection: close\r\nContent-Length: " +
                            std::to_string(body.size()) + "\r\n\r\n" + body;
    return write(fd_, req.data(), req.size()) == static_cast<ssize_t>(req.size());
  }
  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

  // Reads until the response ends, calling `on_event` for each SSE event as soon as it is
  // complete; `on_event` returns false to stop reading (the connection stays open). False: the
  // connection failed or stalled before the end.
  bool ReadEvents(const std::function<bool(const SseEvent&)>& on_event) {
    std::string pending;  // body bytes not yet split into events
    auto body = [&](std::string_view data) {
      pending.append(data);
      size_t end;
      while ((end = pending.find("\n\n")) != std::string::npos) {
        SseEvent e;
        for (absl::string_view line : absl::StrSplit(pending.substr(0, end), '\n')) {
          if (line.substr(0, 7) == "event: ") e.event = std::string(line.substr(7));
          if (line.substr(0, 6) == "data: ") e.data = std::string(line.substr(6));
        }
        pending.erase(0, end + 2);
        events.push_back(e);
        if (!on_event(e)) return false;
      }
      return true;
    };
    return ReadBody(body);
  }

  int status = 0;
  std::string headers;
  std::vector<SseEvent> events;
  bool ended = false;  // the response ended properly (last chunk / full length)

 private:
  bool Fill() {
    char buf[4096];
    ssize_t n = read(fd_, buf, sizeof buf);
    if (n <= 0) return false;
    in_.append(buf, static_cast<size_t>(n));
    return true;
  }
  bool ReadBody(const std::function<bool(std::string_view)>& body) {
    size_t end;
    while ((end = in_.find("\r\n\r\n")) == std::string::npos) {
      if (!Fill()) return false;
    }
    headers = in_.substr(0, end);
    in_.erase(0, end + 4);
    status = std::atoi(headers.substr(9, 3).c_str());
    std::string lower = headers;
    std::transform(lower.begin(), lower.end(), lower.begin(), ::tolower);
    if (lower.find("transfer-encoding: chunked") == std::string::npos) {
      const size_t cl = lower.find("content-length: ");
      const size_t want = cl == std::string::npos ? 0 : std::stoul(lower.substr(cl + 16));
      while (in_.size() < want) {
        if (!Fill()) return false;
      }
      ended = true;
      return body(in_.substr(0, want));
    }
    while (true) {
      size_t line_end;
      while ((line_end = in_.find("\r\n")) == std::string::npos) {
        if (!Fill()) return false;
      }
      const size_t size = std::stoul(in_.substr(0, line_end), nullptr, 16);
      while (in_.size() < line_end + 2 + size + 2) {
        if (!Fill()) return false;
      }
      if (size == 0) {
        ended = true;
        return true;
      }
      std::string chunk = in_.substr(line_end + 2, size);
      in_.erase(0, line_end + 2 + size + 2);
      if (!body(chunk)) return true;
    }
  }

  int fd_ = -1;
  std::string in_;
};

// ---------------------------------------------------------------------------------------------

const char kUserText[] = "What's the weather in Paris, and what is in /tmp?";

json OpenAiTools() {
  auto fn = [](const std::string& name, json props) {
    return json{{"type", "function"},
                {"function",
                 {{"name", name},
                  {"description", "tool " + name},
                  {"parameters", {{"type", "object"}, {"properties", props}}}}}};
  };
  return json::array(
      {fn("get_weather", {{"city", {{"type", "string"}}}, {"unit", {{"type", "string"}}}}),
       fn("list_files", {{"path", {{"type", "string"}}},
                         {"recursive", {{"type", "boolean"}}},
                         {"max_depth", {{"type", "integer"}}}}),
       fn("search_notes", {{"query", {{"type", "string"}}}, {"filters", {{"type", "object"}}}})});
}

json AnthropicTools() {
  json tools = json::array();
  for (const json& t : OpenAiTools()) {
    tools.push_back({{"name", t["function"]["name"]},
                     {"description", t["function"]["description"]},
                     {"input_schema", t["function"]["parameters"]}});
  }
  return tools;
}

json OpenAiRequest(bool stream) {
  json r = {{"model", "m"},
            {"messages", json::array({{{"role", "user"}, {"content", kUserText}}})},
            {"tools", OpenAiTools()},
            {"reasoning_effort", "high"},
            {"temperature", 0.5},
            {"top_p", 0.9},
            {"seed", 7},
            {"max_tokens", 2000},
            {"stream", stream}};
  if (stream) r["stream_options"] = {{"include_usage", true}};
  return r;
}

json AnthropicRequest(bool stream) {
  return {{"model", "m"},
          {"max_tokens", 2000},
          {"messages", json::array({{{"role", "user"}, {"content", kUserText}}})},
          {"tools", AnthropicTools()},
          {"thinking", {{"type", "enabled"}, {"budget_tokens", 1024}}},
          {"stream", stream}};
}

bool HasMarkup(const std::string& s) {
  for (const char* m : {"｜DSML｜", "</think>", "<think>", "<｜end▁of▁sentence｜>"}) {
    if (s.find(m) != std::string::npos) return true;
  }
  return false;
}

class GatewayStreamingTest : public ::testing::TestWithParam<StopIdMode> {
 protected:
  void SetUp() override {
    // Loaded once, on the first test; every test fails with the reason if it cannot be.
    const auto& loaded = testing::SharedDefaultTokenizer();
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    tokenizer_ = loaded->get();
    completion_ = BuildCompletion();
    for (int32_t id : tokenizer_->Encode(completion_.raw, /*match_added_tokens=*/true)) {
      ids_.push_back(static_cast<uint32_t>(id));
    }
    std::optional<int32_t> eos = tokenizer_->TokenToId(kEosText);
    ASSERT_TRUE(eos.has_value());
    eos_ = static_cast<uint32_t>(*eos);
    ASSERT_EQ(ids_.back(), eos_);
    // Raw length after each token: prefix_len_[n] = bytes of ids 0..n-1.
    prefix_len_.push_back(0);
    for (uint32_t id : ids_) {
      prefix_len_.push_back(prefix_len_.back() +
                            tokenizer_->TokenBytes(static_cast<int32_t>(id)).size());
    }
    ASSERT_EQ(prefix_len_.back(), completion_.raw.size()) << "ids do not decode to the text";

    testing::InProcessGatewayOptions o;
    o.worker.stop_id_mode = GetParam();
    o.worker.script = [this](const v1::SequenceRequest&) {
      std::lock_guard<std::mutex> lock(mu_);
      return reply_;
    };
    o.worker.gate = [this](const GatePoint& at) { return GateOpen(at); };
    o.worker.gate_timeout = absl::Seconds(15);
    o.model.id = "m";
    o.model.created = 1700000000;
    o.model.context_length = 65536;
    o.generation.generate_timeout = absl::Seconds(60);
    o.generation.idle_interval = absl::Milliseconds(200);
    o.http_threads = 2;
    auto g = testing::InProcessGateway::Start(std::move(o), tokenizer_);
    ASSERT_TRUE(g.ok()) << g.status();
    gateway_ = std::move(*g);

    ScriptedReply reply;
    reply.token_ids = ids_;
    reply.seed = 99;
    SetReply(reply);
  }

  void TearDown() override { gateway_.reset(); }

  void SetReply(ScriptedReply r) {
    std::lock_guard<std::mutex> lock(mu_);
    reply_ = std::move(r);
  }

  // The worker's gate: token `at.sent` goes out once the client holds what tokens 0..sent-1
  // decide.
  bool GateOpen(const GatePoint& at) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!gated_) return true;
    const size_t sent = std::min(at.sent, ids_.size());
    std::string why;
    if (Covers(progress_, Required(completion_, prefix_len_[sent]), &why)) return true;
    last_gate_wait_ = absl::StrCat("before token ", sent, ": ", why);
    return false;
  }

  // Streams `body` to `target`, applying each event to the progress the gate reads.
  void Stream(const std::string& target, const json& body, StreamingClient* client,
              const std::function<void(const SseEvent&, Progress*)>& apply) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      progress_ = Progress{};
      gated_ = true;
    }
    ASSERT_TRUE(client->Send(gateway_->port(), target, body.dump()));
    const bool ok = client->ReadEvents([&](const SseEvent& e) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        apply(e, &progress_);
      }
      gateway_->worker().Notify();
      return true;
    });
    {
      std::lock_guard<std::mutex> lock(mu_);
      gated_ = false;
    }
    EXPECT_TRUE(ok && client->ended) << "the stream broke off; last gate wait: " << last_gate_wait_;
    EXPECT_EQ(client->status, 200) << client->headers;
    EXPECT_NE(client->headers.find("text/event-stream"), std::string::npos) << client->headers;
    EXPECT_TRUE(gateway_->worker().gate_failures().empty())
        << gateway_->worker().gate_failures().front() << "; last gate wait: " << last_gate_wait_;
  }

  // completion_tokens / output_tokens: the generated ids, the end-of-sentence id not counted
  // whether or not the worker sends it (docs/gateway.md).
  size_t GeneratedIds() const { return ids_.size() - 1; }

  // The answer to `body` on `target`, not streamed: 200 and JSON.
  void PostWhole(const std::string& target, const json& body, json* answer) {
    auto whole = testing::HttpRequest(gateway_->port(), "POST", target, body.dump(),
                                      absl::Seconds(60));
    ASSERT_TRUE(whole.ok()) << whole.status();
    ASSERT_EQ(whole->status, 200) << whole->body;
    *answer = json::parse(whole->body);
  }

  // What the client put together from the stream (progress_) is the completion: the same
  // reasoning, text, and calls with the same names and JSON arguments.
  void ExpectStreamedTheCompletion() {
    EXPECT_EQ(progress_.reasoning, completion_.reasoning);
    EXPECT_EQ(progress_.content, completion_.content);
    ASSERT_EQ(progress_.calls.size(), completion_.calls.size());
    for (size_t i = 0; i < completion_.calls.size(); ++i) {
      EXPECT_EQ(progress_.calls[i].name, completion_.calls[i].name);
      json args = json::parse(progress_.calls[i].arguments, nullptr, false);
      ASSERT_FALSE(args.is_discarded()) << "not JSON: " << progress_.calls[i].arguments;
      EXPECT_EQ(args, completion_.calls[i].Arguments());
    }
  }

  void CheckRecordedRequest(const v1::SequenceRequest& r) {
    EXPECT_FALSE(r.sequence_id().empty());
    ASSERT_GT(r.prompt_ids_size(), 3);
    // Thinking mode: the prompt ends with `<｜Assistant｜><think>`.
    EXPECT_EQ(static_cast<int32_t>(r.prompt_ids(r.prompt_ids_size() - 1)),
              tokenizer_->TokenToId("<think>").value_or(-1));
    ASSERT_EQ(r.sampling().stop_token_ids_size(), 1);
    EXPECT_EQ(r.sampling().stop_token_ids(0), eos_);
  }

  const tokenizer::Tokenizer* tokenizer_ = nullptr;
  Completion completion_;
  std::vector<uint32_t> ids_;
  std::vector<size_t> prefix_len_;
  uint32_t eos_ = 0;

  std::mutex mu_;
  ScriptedReply reply_;
  bool gated_ = false;
  Progress progress_;
  std::string last_gate_wait_;

  std::unique_ptr<testing::InProcessGateway> gateway_;
};

// The tokens really are split everywhere: markers and the stop id span several messages.
TEST_P(GatewayStreamingTest, ScriptSplitsMarkersAcrossTokens) {
  EXPECT_GT(ids_.size(), 100u);
  const size_t dsml = completion_.raw.find("<｜DSML｜invoke");
  bool split = false;
  for (size_t n = 0; n < prefix_len_.size(); ++n) {
    if (prefix_len_[n] > dsml && prefix_len_[n] < dsml + std::string("<｜DSML｜invoke").size()) {
      split = true;
    }
  }
  EXPECT_TRUE(split) << "the DSML marker is a single token: the test would not split it";
  // The gate demands more after most tokens (so a stream buffered even one token fails).
  size_t grows = 0;
  std::string why;
  for (size_t n = 1; n < prefix_len_.size(); ++n) {
    const Progress before = Required(completion_, prefix_len_[n - 1]);
    const Progress after = Required(completion_, prefix_len_[n]);
    EXPECT_TRUE(Covers(after, before, &why)) << "token " << n << ": " << why;
    if (!Covers(before, after, &why)) ++grows;
  }
  // About half the tokens are DSML markup, which gives no output of its own.
  EXPECT_GT(grows, ids_.size() / 3);
  // At the end everything is demanded.
  const Progress all = Required(completion_, completion_.raw.size());
  EXPECT_EQ(all.reasoning, completion_.reasoning);
  EXPECT_EQ(all.content, completion_.content);
  ASSERT_EQ(all.calls.size(), completion_.calls.size());
  for (size_t i = 0; i < all.calls.size(); ++i) {
    EXPECT_EQ(all.calls[i].arguments, completion_.calls[i].ArgumentsText());
  }
}

// OpenAI streaming: role chunk, reasoning deltas, content deltas, tool-call deltas (id and name
// first, then argument fragments), finish_reason tool_calls, one usage chunk, [DONE].
TEST_P(GatewayStreamingTest, OpenAiStreamsEveryPartAsItArrives) {
  StreamingClient client;
  std::vector<json> chunks;
  bool done = false;
  Stream("/v1/chat/completions", OpenAiRequest(true), &client,
         [&](const SseEvent& e, Progress* p) {
           if (e.data == "[DONE]") {
             done = true;
             return;
           }
           json c = json::parse(e.data, nullptr, false);
           chunks.push_back(c);
           if (!c.contains("choices") || c["choices"].empty()) return;
           const json& d = c["choices"][0]["delta"];
           if (d.contains("reasoning_content") && d["reasoning_content"].is_string()) {
             p->reasoning += d["reasoning_content"].get<std::string>();
           }
           if (d.contains("content") && d["content"].is_string()) {
             p->content += d["content"].get<std::string>();
           }
           if (d.contains("tool_calls")) {
             for (const json& t : d["tool_calls"]) {
               const size_t i = t.value("index", 0);
               if (p->calls.size() <= i) p->calls.resize(i + 1);
               if (t.contains("id")) p->calls[i].id += t["id"].get<std::string>();
               if (t.contains("function") && t["function"].contains("name")) {
                 p->calls[i].name += t["function"]["name"].get<std::string>();
               }
               if (t.contains("function") && t["function"].contains("arguments")) {
                 p->calls[i].arguments += t["function"]["arguments"].get<std::string>();
               }
             }
           }
         });
  EXPECT_TRUE(done) << "no data: [DONE]";
  ASSERT_FALSE(chunks.empty());
  for (const json& c : chunks) ASSERT_FALSE(c.is_discarded()) << "a chunk is not JSON";

  // The first chunk opens the assistant turn.
  EXPECT_EQ(chunks[0]["choices"][0]["delta"]["role"], "assistant") << chunks[0].dump();
  // Order and shape of the deltas.
  enum Phase { kReasoning, kContent, kTools } phase = kReasoning;
  std::vector<bool> call_seen;
  int finish_chunks = 0, usage_chunks = 0;
  std::string finish;
  for (size_t k = 0; k < chunks.size(); ++k) {
    const json& c = chunks[k];
    EXPECT_EQ(c["object"], "chat.completion.chunk");
    EXPECT_EQ(c["id"], chunks[0]["id"]);
    EXPECT_EQ(c["model"], "m");
    ASSERT_TRUE(c.contains("usage")) << "include_usage: every chunk carries usage";
    if (c["choices"].empty()) {
      ++usage_chunks;
      EXPECT_EQ(k, chunks.size() - 1) << "the usage chunk is the last";
      const json& u = c["usage"];
      ASSERT_EQ(gateway_->worker().requests().size(), 1u);
      EXPECT_EQ(u["prompt_tokens"], gateway_->worker().requests()[0].prompt_ids_size());
      EXPECT_EQ(u["completion_tokens"], GeneratedIds());
      EXPECT_EQ(u["total_tokens"], u["prompt_tokens"].get<int>() + u["completion_tokens"].get<int>());
      continue;
    }
    EXPECT_TRUE(c["usage"].is_null()) << c.dump();
    const json& choice = c["choices"][0];
    if (!choice["finish_reason"].is_null()) {
      ++finish_chunks;
      finish = choice["finish_reason"];
    }
    const json& d = choice["delta"];
    if (d.contains("reasoning_content") && d["reasoning_content"].is_string()) {
      const std::string s = d["reasoning_content"];
      EXPECT_FALSE(HasMarkup(s)) << s;
      if (!s.empty()) {
        EXPECT_EQ(phase, kReasoning) << "reasoning after content: " << c.dump();
      }
    }
    if (d.contains("content") && d["content"].is_string()) {
      const std::string s = d["content"];
      EXPECT_FALSE(HasMarkup(s)) << s;
      if (!s.empty()) {
        EXPECT_NE(phase, kTools) << "content after a tool call: " << c.dump();
        if (phase == kReasoning) phase = kContent;
      }
    }
    if (d.contains("tool_calls")) {
      phase = kTools;
      for (const json& t : d["tool_calls"]) {
        const size_t i = t["index"];
        if (call_seen.size() <= i) call_seen.resize(i + 1, false);
        if (!call_seen[i]) {
          // The first delta of a call names it.
          EXPECT_TRUE(t.contains("id") && !t["id"].get<std::string>().empty()) << t.dump();
          EXPECT_EQ(t["type"], "function") << t.dump();
          EXPECT_TRUE(t["function"].contains("name")) << t.dump();
          for (size_t j = 0; j < i; ++j) EXPECT_TRUE(call_seen[j]) << "calls out of order";
          call_seen[i] = true;
        } else {
          EXPECT_FALSE(t.contains("id")) << "id repeated: " << t.dump();
          EXPECT_FALSE(t["function"].contains("name")) << "name repeated: " << t.dump();
        }
      }
    }
  }
  EXPECT_EQ(finish_chunks, 1);
  EXPECT_EQ(finish, "tool_calls");
  EXPECT_EQ(usage_chunks, 1);

  // The concatenated stream is the completion.
  ASSERT_NO_FATAL_FAILURE(ExpectStreamedTheCompletion());
  ASSERT_EQ(gateway_->worker().requests().size(), 1u);
  const v1::SequenceRequest r = gateway_->worker().requests()[0];
  CheckRecordedRequest(r);
  EXPECT_FLOAT_EQ(r.sampling().temperature(), 0.5f);
  EXPECT_FLOAT_EQ(r.sampling().top_p(), 0.9f);
  EXPECT_EQ(r.sampling().seed(), 7u);

  // The same request not streamed: the same message.
  const Progress streamed = progress_;
  json w;
  ASSERT_NO_FATAL_FAILURE(PostWhole("/v1/chat/completions", OpenAiRequest(false), &w));
  const json& m = w["choices"][0]["message"];
  EXPECT_EQ(w["choices"][0]["finish_reason"], "tool_calls");
  EXPECT_EQ(m["reasoning_content"], streamed.reasoning);
  EXPECT_EQ(m["content"], streamed.content);
  ASSERT_EQ(m["tool_calls"].size(), streamed.calls.size()) << m.dump();
  for (size_t i = 0; i < streamed.calls.size(); ++i) {
    EXPECT_EQ(m["tool_calls"][i]["type"], "function");
    EXPECT_EQ(m["tool_calls"][i]["function"]["name"], streamed.calls[i].name);
    EXPECT_EQ(m["tool_calls"][i]["function"]["arguments"], streamed.calls[i].arguments);
  }
  EXPECT_EQ(w["usage"]["completion_tokens"], GeneratedIds());
}

// Anthropic streaming: message_start with the real input_tokens, a thinking block, a text block,
// one tool_use block per call (input_json_delta only), message_delta tool_use, message_stop.
TEST_P(GatewayStreamingTest, AnthropicStreamsEveryBlockAsItArrives) {
  StreamingClient client;
  std::vector<std::pair<std::string, json>> events;  // pings dropped
  std::map<int, std::string> block_type;
  Stream("/v1/messages", AnthropicRequest(true), &client, [&](const SseEvent& e, Progress* p) {
    json d = json::parse(e.data, nullptr, false);
    if (e.event == "ping") return;
    events.emplace_back(e.event, d);
    if (e.event == "content_block_start") {
      const int i = d["index"];
      block_type[i] = d["content_block"]["type"];
      if (block_type[i] == "tool_use") {
        Progress::Call call;
        call.id = d["content_block"]["id"].get<std::string>();
        call.name = d["content_block"]["name"].get<std::string>();
        p->calls.push_back(std::move(call));
      }
    } else if (e.event == "content_block_delta") {
      const json& delta = d["delta"];
      if (delta["type"] == "thinking_delta") p->reasoning += delta["thinking"].get<std::string>();
      if (delta["type"] == "text_delta") p->content += delta["text"].get<std::string>();
      if (delta["type"] == "input_json_delta" && !p->calls.empty()) {
        p->calls.back().arguments += delta["partial_json"].get<std::string>();
      }
    }
  });
  ASSERT_GE(events.size(), 2u);
  for (const auto& [type, d] : events) ASSERT_FALSE(d.is_discarded()) << type << " not JSON";
  ASSERT_EQ(gateway_->worker().requests().size(), 1u);
  const v1::SequenceRequest r = gateway_->worker().requests()[0];
  CheckRecordedRequest(r);

  // message_start first, with the real prompt length.
  EXPECT_EQ(events.front().first, "message_start");
  const json& msg = events.front().second["message"];
  EXPECT_EQ(msg["role"], "assistant");
  EXPECT_TRUE(msg["content"].empty());
  EXPECT_EQ(msg["usage"]["input_tokens"], r.prompt_ids_size());
  EXPECT_EQ(events.back().first, "message_stop");
  ASSERT_GE(events.size(), 3u);
  const auto& [md_type, md] = events[events.size() - 2];
  EXPECT_EQ(md_type, "message_delta");
  EXPECT_EQ(md["delta"]["stop_reason"], "tool_use") << md.dump();
  EXPECT_EQ(md["usage"]["output_tokens"], GeneratedIds());

  // Blocks: thinking, text, then the tool_use blocks, each start / deltas / stop, in order.
  std::vector<std::string> expected_types = {"thinking", "text"};
  for (size_t i = 0; i < completion_.calls.size(); ++i) expected_types.push_back("tool_use");
  int open = -1;
  int next_index = 0;
  std::map<int, bool> signature;
  for (size_t k = 1; k + 2 < events.size(); ++k) {
    const auto& [type, d] = events[k];
    if (type == "content_block_start") {
      EXPECT_EQ(open, -1) << "a block started inside another";
      open = d["index"];
      EXPECT_EQ(open, next_index++);
      const json& b = d["content_block"];
      if (b["type"] == "tool_use") {
        EXPECT_FALSE(b["id"].get<std::string>().empty());
        EXPECT_EQ(b["input"], json::object()) << b.dump();
      }
      if (b["type"] == "thinking") {
        EXPECT_EQ(b["thinking"], "");
      }
      if (b["type"] == "text") {
        EXPECT_EQ(b["text"], "");
      }
    } else if (type == "content_block_delta") {
      ASSERT_EQ(d["index"], open) << "a delta outside its block";
      const std::string dt = d["delta"]["type"];
      const std::string bt = block_type[open];
      if (bt == "thinking") {
        EXPECT_TRUE(dt == "thinking_delta" || dt == "signature_delta") << dt;
        if (dt == "thinking_delta") {
          EXPECT_FALSE(HasMarkup(d["delta"]["thinking"])) << d.dump();
          EXPECT_FALSE(signature[open]) << "thinking after the signature";
        }
        if (dt == "signature_delta") signature[open] = true;
      } else if (bt == "text") {
        EXPECT_EQ(dt, "text_delta");
        if (dt == "text_delta") {
          EXPECT_FALSE(HasMarkup(d["delta"]["text"])) << d.dump();
        }
      } else {
        EXPECT_EQ(dt, "input_json_delta") << "a tool_use block got " << dt;
      }
    } else if (type == "content_block_stop") {
      EXPECT_EQ(d["index"], open);
      open = -1;
    } else {
      ADD_FAILURE() << "unexpected event " << type << " " << d.dump();
    }
  }
  EXPECT_EQ(open, -1) << "a block was not stopped";
  std::vector<std::string> types;
  for (const auto& [i, t] : block_type) types.push_back(t);
  EXPECT_EQ(types, expected_types);
  EXPECT_TRUE(signature[0]) << "the thinking block has no signature_delta";

  ASSERT_NO_FATAL_FAILURE(ExpectStreamedTheCompletion());

  // Not streamed: the same blocks.
  const Progress streamed = progress_;
  json w;
  ASSERT_NO_FATAL_FAILURE(PostWhole("/v1/messages", AnthropicRequest(false), &w));
  EXPECT_EQ(w["stop_reason"], "tool_use");
  EXPECT_EQ(w["usage"]["output_tokens"], GeneratedIds());
  ASSERT_EQ(w["content"].size(), 2 + streamed.calls.size()) << w.dump();
  EXPECT_EQ(w["content"][0]["type"], "thinking");
  EXPECT_EQ(w["content"][0]["thinking"], streamed.reasoning);
  EXPECT_EQ(w["content"][1]["type"], "text");
  EXPECT_EQ(w["content"][1]["text"], streamed.content);
  for (size_t i = 0; i < streamed.calls.size(); ++i) {
    const json& b = w["content"][2 + i];
    EXPECT_EQ(b["type"], "tool_use");
    EXPECT_EQ(b["name"], streamed.calls[i].name);
    EXPECT_EQ(b["input"], json::parse(streamed.calls[i].arguments, nullptr, false));
  }
}

// A client that hangs up mid-stream frees its sequence on the worker.
TEST_P(GatewayStreamingTest, ClientHangUpFreesTheSequence) {
  for (const bool anthropic : {false, true}) {
    SCOPED_TRACE(anthropic ? "anthropic" : "openai");
    const size_t cancelled_before = gateway_->worker().cancelled_calls();
    StreamingClient client;
    {
      std::lock_guard<std::mutex> lock(mu_);
      progress_ = Progress{};
      gated_ = true;  // nothing beyond the first token is released: the stream stays open
    }
    ASSERT_TRUE(client.Send(gateway_->port(), anthropic ? "/v1/messages" : "/v1/chat/completions",
                            (anthropic ? AnthropicRequest(true) : OpenAiRequest(true)).dump()));
    // The first event shows the stream runs; then the client goes away.
    client.ReadEvents([](const SseEvent&) { return false; });
    ASSERT_FALSE(client.events.empty());
    ASSERT_EQ(gateway_->worker().active(), 1);
    client.Close();
    EXPECT_EQ(gateway_->worker().WaitForActive(0, absl::Seconds(10)), 0)
        << "the sequence still runs after the client hung up";
    EXPECT_EQ(gateway_->worker().cancelled_calls(), cancelled_before + 1);
    std::lock_guard<std::mutex> lock(mu_);
    gated_ = false;
  }
  EXPECT_TRUE(gateway_->worker().gate_failures().empty());
}

// The worker fails after streaming began: an error chunk then [DONE] (OpenAI), an `error` event
// (Anthropic); never a stream that just stops.
TEST_P(GatewayStreamingTest, WorkerFailureMidStreamEndsWithAnError) {
  ScriptedReply reply;
  reply.token_ids = ids_;
  reply.fail = grpc::Status(grpc::StatusCode::UNAVAILABLE, "scripted failure");
  reply.fail_after = 20;  // inside the reasoning
  ASSERT_LT(prefix_len_[20], completion_.reasoning_end);
  SetReply(reply);

  {
    StreamingClient client;
    ASSERT_TRUE(client.Send(gateway_->port(), "/v1/chat/completions", OpenAiRequest(true).dump()));
    EXPECT_TRUE(client.ReadEvents([](const SseEvent&) { return true; }));
    EXPECT_TRUE(client.ended);
    ASSERT_GE(client.events.size(), 3u);
    EXPECT_EQ(client.events.back().data, "[DONE]");
    json err = json::parse(client.events[client.events.size() - 2].data, nullptr, false);
    ASSERT_TRUE(err.contains("error")) << client.events[client.events.size() - 2].data;
    EXPECT_TRUE(err["error"]["message"].is_string());
    std::string reasoning;
    for (const SseEvent& e : client.events) {
      json c = json::parse(e.data, nullptr, false);
      if (c.is_discarded() || !c.contains("choices") || c["choices"].empty()) continue;
      EXPECT_TRUE(c["choices"][0]["finish_reason"].is_null()) << "a failed stream says finished";
      const json& d = c["choices"][0]["delta"];
      if (d.contains("reasoning_content") && d["reasoning_content"].is_string()) {
        reasoning += d["reasoning_content"].get<std::string>();
      }
    }
    EXPECT_TRUE(StartsWith(completion_.reasoning, reasoning));
    EXPECT_GT(reasoning.size(), 0u) << "the failure came after tokens: some were streamed";
  }
  {
    StreamingClient client;
    ASSERT_TRUE(client.Send(gateway_->port(), "/v1/messages", AnthropicRequest(true).dump()));
    EXPECT_TRUE(client.ReadEvents([](const SseEvent&) { return true; }));
    EXPECT_TRUE(client.ended);
    std::vector<SseEvent> events;
    for (const SseEvent& e : client.events) {
      if (e.event != "ping") events.push_back(e);
    }
    ASSERT_GE(events.size(), 2u);
    EXPECT_EQ(events.front().event, "message_start");
    EXPECT_EQ(events.back().event, "error");
    json err = json::parse(events.back().data, nullptr, false);
    EXPECT_EQ(err["type"], "error") << events.back().data;
    EXPECT_TRUE(err["error"]["type"].is_string());
    for (const SseEvent& e : events) EXPECT_NE(e.event, "message_stop");
  }
  EXPECT_EQ(gateway_->worker().WaitForActive(0, absl::Seconds(10)), 0);
}

// The double itself: message conventions, LENGTH, the paced mode with concurrent streams, the
// Cancel RPC.
TEST(ScriptedAttentionWorkerTest, ConventionsPacingAndCancel) {
  ScriptedWorkerOptions opt;
  opt.script = [](const v1::SequenceRequest& r) {
    ScriptedReply reply;
    for (uint32_t i = 0; i < 8; ++i) reply.token_ids.push_back(100 + i);
    if (r.sequence_id() == "forever") reply.token_ids.resize(100000, 7);
    reply.finish = v1::FINISH_REASON_LENGTH;
    return reply;
  };
  opt.inter_token_interval = absl::Milliseconds(2);
  auto w = ScriptedAttentionWorker::Start(std::move(opt));
  ASSERT_TRUE(w.ok()) << w.status();
  auto channel = grpc::CreateChannel((*w)->address(), grpc::InsecureChannelCredentials());
  auto stub = v1::AttentionWorker::NewStub(channel);

  auto run = [&](const std::string& id, uint32_t stop_id, uint32_t max_new,
                 std::vector<v1::SequenceTokens>* out) {
    v1::SequenceRequest r;
    r.set_sequence_id(id);
    r.add_prompt_ids(1);
    r.add_prompt_ids(2);
    r.mutable_sampling()->set_seed(5);
    if (stop_id != 0) r.mutable_sampling()->add_stop_token_ids(stop_id);
    r.mutable_sampling()->set_max_new_tokens(max_new);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto reader = stub->Generate(&ctx, r);
    v1::SequenceTokens m;
    while (reader->Read(&m)) out->push_back(m);
    return reader->Finish();
  };

  // Many sequences at once, paced; each gets its script exactly.
  std::vector<std::vector<v1::SequenceTokens>> got(32);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < got.size(); ++i) {
    threads.emplace_back([&, i] { EXPECT_TRUE(run(absl::StrCat("s", i), 0, 0, &got[i]).ok()); });
  }
  for (auto& t : threads) t.join();
  for (const auto& msgs : got) {
    ASSERT_EQ(msgs.size(), 8u);
    EXPECT_EQ(msgs[0].prompt_tokens(), 2u);
    EXPECT_EQ(msgs[0].seed(), 5u);
    for (size_t k = 0; k < msgs.size(); ++k) {
      ASSERT_EQ(msgs[k].token_ids_size(), 1);
      EXPECT_EQ(msgs[k].token_ids(0), 100 + k);
      if (k > 0) {
        EXPECT_EQ(msgs[k].prompt_tokens(), 0u);
      }
      EXPECT_EQ(msgs[k].finish_reason(),
                k + 1 == msgs.size() ? v1::FINISH_REASON_LENGTH : v1::FINISH_REASON_UNSPECIFIED);
    }
  }
  // A stop id ends with STOP (the id sent, by default); max_new_tokens with LENGTH.
  std::vector<v1::SequenceTokens> stop, cut;
  ASSERT_TRUE(run("stop", 103, 0, &stop).ok());
  ASSERT_EQ(stop.size(), 4u);
  EXPECT_EQ(stop.back().token_ids(0), 103u);
  EXPECT_EQ(stop.back().finish_reason(), v1::FINISH_REASON_STOP);
  ASSERT_TRUE(run("cut", 0, 3, &cut).ok());
  ASSERT_EQ(cut.size(), 3u);
  EXPECT_EQ(cut.back().finish_reason(), v1::FINISH_REASON_LENGTH);
  // The server frees a call (OnDone) a moment after the client has its status.
  ASSERT_EQ((*w)->WaitForActive(0, absl::Seconds(10)), 0);

  // The Cancel RPC frees a running sequence.
  std::vector<v1::SequenceTokens> forever;
  grpc::Status forever_status;
  std::thread t([&] { forever_status = run("forever", 0, 0, &forever); });
  ASSERT_EQ((*w)->WaitForActive(1, absl::Seconds(10)), 1);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::CancelRequest cancel;
  cancel.set_sequence_id("forever");
  v1::CancelResponse resp;
  ASSERT_TRUE(stub->Cancel(&ctx, cancel, &resp).ok());
  EXPECT_TRUE(resp.found());
  t.join();
  EXPECT_EQ(forever_status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ((*w)->WaitForActive(0, absl::Seconds(10)), 0);
  EXPECT_EQ((*w)->generate_calls(), got.size() + 3);
}

INSTANTIATE_TEST_SUITE_P(StopId, GatewayStreamingTest,
                         ::testing::Values(StopIdMode::kSendStopId, StopIdMode::kOmitStopId),
                         [](const ::testing::TestParamInfo<StopIdMode>& i) {
                           return i.param == StopIdMode::kSendStopId ? "WorkerSendsStopId"
                                                                     : "WorkerOmitsStopId";
                         });

}  // namespace
}  // namespace expertmesh::gateway
