#include "gateway/chat_request.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <mutex>
#include <thread>

#include "core/tokenizer/tokenizer.h"
#include "gateway/generation.h"
#include "gateway/http_api.h"
#include "gateway/http_server.h"
#include "gateway/stop_matcher.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"
#include "tests/testing/in_process_gateway.h"

namespace expertmesh::gateway {
namespace {

using nlohmann::json;

TEST(ChatRequestTest, BadInputsNameTheirField) {
  struct Case {
    std::string body;
    std::string param;  // expected "param"
    int status = 400;
  };
  const std::string msgs = R"("model":"m","messages":[{"role":"user","content":"hi"}])";
  const std::string tools =
      R"(,"tools":[{"type":"function","function":{"name":"f","parameters":{}}}])";
  const std::vector<Case> cases = {
      {R"({"messages":[{"role":"user","content":"hi"}]})", "model"},
      {R"({"model":"other","messages":[{"role":"user","content":"hi"}]})", "model", 404},
      {R"({"model":"m"})", "messages"},
      {R"({"model":"m","messages":[]})", "messages"},
      {R"({"model":"m","messages":[{"role":"wizard","content":"hi"}]})", "messages[0].role"},
      {"{" + msgs + R"(,"temperature":3})", "temperature"},
      {"{" + msgs + R"(,"temperature":"hot"})", "temperature"},
      {"{" + msgs + R"(,"top_p":0})", "top_p"},
      {"{" + msgs + R"(,"top_k":-1})", "top_k"},
      {"{" + msgs + R"(,"seed":1.5})", "seed"},
      {"{" + msgs + R"(,"max_tokens":0})", "max_tokens"},
      {"{" + msgs + R"(,"max_completion_tokens":"many"})", "max_completion_tokens"},
      {"{" + msgs + R"(,"stop":5})", "stop"},
      {"{" + msgs + R"(,"stop":["a",""]})", "stop[1]"},
      {"{" + msgs + R"(,"stop":["a","b","c","d","e"]})", "stop"},
      {"{" + msgs + R"(,"stream":"yes"})", "stream"},
      {"{" + msgs + R"(,"stream_options":{"include_usage":true}})", "stream_options"},
      {"{" + msgs + R"(,"stream":true,"stream_options":{"include_usage":1}})",
       "stream_options.include_usage"},
      {"{" + msgs + R"(,"stream":true,"n":2})", "n"},
      {"{" + msgs + R"(,"n":0})", "n"},
      {"{" + msgs + R"(,"n":17})", "n"},
      {"{" + msgs + R"(,"n":1.5})", "n"},
      {"{" + msgs + R"(,"reasoning_effort":"extreme"})", "reasoning_effort"},
      {"{" + msgs + R"(,"chat_template_kwargs":{"thinking":"yes"}})",
       "chat_template_kwargs.thinking"},
      {"{" + msgs + R"(,"response_format":{"type":"json_schema","json_schema":{}}})",
       "response_format"},
      {"{" + msgs + R"(,"tool_choice":"required"})", "tool_choice"},
      {"{" + msgs + R"(,"logprobs":1})", "logprobs"},
      {"{" + msgs + R"(,"top_logprobs":2})", "top_logprobs"},
      {"{" + msgs + R"(,"logprobs":true,"top_logprobs":21})", "top_logprobs"},
      {"{" + msgs + R"(,"tool_choice":"sometimes"})", "tool_choice"},
      {"{" + msgs + R"(,"tool_choice":7})", "tool_choice"},
      {"{" + msgs + tools + R"(,"tool_choice":{"type":"tool","function":{"name":"f"}}})",
       "tool_choice.type"},
      {"{" + msgs + tools + R"(,"tool_choice":{"type":"function"}})", "tool_choice.function"},
      {"{" + msgs + tools + R"(,"tool_choice":{"type":"function","function":{"name":""}}})",
       "tool_choice.function.name"},
      {"{" + msgs + tools + R"(,"tool_choice":{"type":"function","function":{"name":"g"}}})",
       "tool_choice.function.name"},
      {"{" + msgs + R"(,"tool_choice":{"type":"function","function":{"name":"f"}}})",
       "tool_choice"},
      {"{" + msgs + R"(,"response_format":{"type":"json_object"}})", "response_format"},
      {"{" + msgs + R"(,"response_format":"json"})", "response_format"},
      {"{" + msgs + R"(,"parallel_tool_calls":"no"})", "parallel_tool_calls"},
      {"{" + msgs + R"(,"modalities":["audio"]})", "modalities"},
      {"{" + msgs + R"(,"audio":{}})", "audio"},
      {"{" + msgs + R"(,"presence_penalty":0.5})", "presence_penalty"},
      {"{" + msgs + R"(,"logit_bias":{"1":5}})", "logit_bias"},
      {"{" + msgs + R"(,"user":7})", "user"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.body);
    ChatRequest req;
    std::optional<ApiError> e = ParseChatRequest(c.body, "m", &req);
    ASSERT_TRUE(e.has_value());
    EXPECT_EQ(e->status, c.status);
    json j = json::parse(e->ToJson());
    EXPECT_EQ(j["error"]["param"], c.param) << j.dump();
    EXPECT_EQ(j["error"]["type"], "invalid_request_error");
    EXPECT_NE(j["error"]["message"].get<std::string>().find(c.param), std::string::npos);
  }
  ChatRequest req;
  std::optional<ApiError> e = ParseChatRequest("{not json", "m", &req);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->status, 400);
}

TEST(ChatRequestTest, GoodRequestIsParsed) {
  ChatRequest r;
  std::optional<ApiError> e = ParseChatRequest(
      R"({"model":"m","messages":[{"role":"system","content":"be brief"},
          {"role":"user","content":"hi"}],"max_tokens":5,"max_completion_tokens":7,
          "temperature":0,"top_p":0.5,"top_k":3,"seed":42,"stop":"END","stream":true,
          "stream_options":{"include_usage":true},"n":1,"reasoning_effort":"high",
          "response_format":{"type":"text"},"user":"u1"})",
      "m", &r);
  ASSERT_FALSE(e.has_value()) << e->ToJson();
  EXPECT_EQ(r.messages.size(), 2u);
  EXPECT_EQ(r.max_tokens, 7u);
  EXPECT_EQ(r.temperature, 0.0);
  EXPECT_EQ(r.top_p, 0.5);
  EXPECT_EQ(r.top_k, 3u);
  EXPECT_EQ(r.seed, std::optional<uint64_t>(42));
  EXPECT_EQ(r.stop, std::vector<std::string>{"END"});
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
  EXPECT_EQ(r.encode.thinking_mode, chat::ThinkingMode::kThinking);
  EXPECT_EQ(r.user, "u1");
  ChatRequest plain;
  ASSERT_FALSE(
      ParseChatRequest(R"({"model":"m","messages":[{"role":"user","content":"x"}]})", "m", &plain));
  EXPECT_EQ(plain.encode.thinking_mode, chat::ThinkingMode::kChat);
  EXPECT_FALSE(plain.stream);
}

TEST(ChatRequestTest, NewFieldsAreParsed) {
  const std::string base = R"({"model":"m","messages":[{"role":"user","content":"hi"}],)"
                           R"("tools":[{"type":"function","function":{"name":"f"}}])";
  ChatRequest a;
  ASSERT_FALSE(ParseChatRequest(base + R"(,"logprobs":true,"top_logprobs":4,"n":3})", "m", &a));
  EXPECT_TRUE(a.logprobs);
  EXPECT_EQ(a.top_logprobs, 4u);
  EXPECT_EQ(a.n, 3u);
  EXPECT_EQ(a.tool_choice, ToolChoice::kAuto);
  EXPECT_TRUE(a.has_tools);
  EXPECT_TRUE(a.assistant_prefix.empty());
  ASSERT_FALSE(a.messages.empty());
  EXPECT_EQ(a.messages[0].tools.size(), 1u);

  ChatRequest none;
  ASSERT_FALSE(ParseChatRequest(base + R"(,"tool_choice":"none","stop":"X"})", "m", &none));
  EXPECT_EQ(none.tool_choice, ToolChoice::kNone);
  EXPECT_FALSE(none.has_tools);
  for (const chat::Message& m : none.messages) EXPECT_TRUE(m.tools.empty());
  EXPECT_EQ(none.stop, (std::vector<std::string>{"X", std::string(ToolCallOpeningStop())}));

  ChatRequest req;
  ASSERT_FALSE(ParseChatRequest(base + R"(,"tool_choice":"required"})", "m", &req));
  EXPECT_EQ(req.tool_choice, ToolChoice::kRequired);
  EXPECT_EQ(req.assistant_prefix, "\n\n<｜DSML｜tool_calls>\n");

  ChatRequest named;
  ASSERT_FALSE(ParseChatRequest(base + R"(,"tool_choice":{"type":"function",)"
                                       R"("function":{"name":"f"}},"reasoning_effort":"high"})",
                                "m", &named));
  EXPECT_EQ(named.tool_choice, ToolChoice::kFunction);
  EXPECT_EQ(named.tool_choice_name, "f");
  // Thinking mode: the reasoning is closed first, then the call of f is opened.
  EXPECT_EQ(named.assistant_prefix,
            "</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n");
}

TEST(StopMatcherTest, HoldsBackPartialMatchesAndDropsTheStop) {
  StopMatcher m({"STOP", "xy"});
  std::string out;
  out += m.Feed("abc S");
  EXPECT_EQ(out, "abc ");  // "S" may start STOP
  out += m.Feed("T");
  EXPECT_EQ(out, "abc ");
  out += m.Feed("ame x");  // "ST" can no longer match; "x" may start "xy"
  EXPECT_EQ(out, "abc STame ");
  out += m.Feed("yz");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(out, "abc STame ");
  EXPECT_EQ(m.Feed("more"), "");
  EXPECT_EQ(m.Flush(), "");

  StopMatcher n({"END"});
  std::string t = n.Feed("the EN");
  t += n.Flush();
  EXPECT_FALSE(n.stopped());
  EXPECT_EQ(t, "the EN");
  StopMatcher none({});
  EXPECT_EQ(none.Feed("abc"), "abc");
}

// The server streams chunks as they are written and notices a client that hangs up.
TEST(HttpServerStreamTest, StreamsChunksAndNoticesHangUp) {
  std::mutex mu;
  std::condition_variable cv;
  std::shared_ptr<ResponseWriter> held;
  bool gone = false;
  auto server = HttpServer::Start("127.0.0.1", 0, [&](const HttpRequest& r) {
    HttpResponse resp;
    if (r.target == "/whole") {
      resp.deferred = [](std::shared_ptr<ResponseWriter> w) {
        std::thread([w] {
          HttpResponse out;
          out.body = "{\"ok\":true}";
          w->Respond(out);
        }).detach();
      };
      return resp;
    }
    resp.deferred = [&](std::shared_ptr<ResponseWriter> w) {
      w->BeginStream(200, "text/event-stream");
      w->Write("data: one\n\n");
      w->OnClientGone([&] {
        std::lock_guard<std::mutex> lock(mu);
        gone = true;
        cv.notify_all();
      });
      std::lock_guard<std::mutex> lock(mu);
      held = w;
      cv.notify_all();
    };
    return resp;
  });
  ASSERT_TRUE(server.ok()) << server.status();
  auto whole = testing::HttpRequest((*server)->port(), "GET", "/whole");
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_NE(whole->body.find("{\"ok\":true}"), std::string::npos);

  // A raw client: read the first chunk while the stream is still open, then hang up.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>((*server)->port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const std::string req = "GET /s HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_EQ(write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
  std::string got;
  char buf[4096];
  while (got.find("data: one") == std::string::npos) {
    ssize_t n = read(fd, buf, sizeof buf);
    ASSERT_GT(n, 0);
    got.append(buf, n);
  }
  EXPECT_NE(got.find("text/event-stream"), std::string::npos);
  EXPECT_NE(got.find("chunked"), std::string::npos);
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return held != nullptr; });
    EXPECT_FALSE(gone);
  }
  close(fd);
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return gone; });
  }
  EXPECT_TRUE(held->client_gone());
  EXPECT_FALSE(held->Write("data: two\n\n"));
  held.reset();
}

// No attention worker reachable: 503 in OpenAI's shape (Retry-After set by Generator).
TEST(GeneratorTest, NoWorkerIs503) {
  auto tok = tokenizer::LoadDefaultTokenizer();
  ASSERT_TRUE(tok.ok()) << tok.status();
  testing::InProcessGatewayOptions o = testing::NoWorkerGatewayOptions();
  o.model.context_length = 4096;
  auto gateway = testing::InProcessGateway::Start(std::move(o), tok->get());
  ASSERT_TRUE(gateway.ok()) << gateway.status();
  for (const char* stream : {"false", "true"}) {
    auto r = testing::HttpRequest(
        (*gateway)->port(), "POST", "/v1/chat/completions",
        std::string(R"({"model":"m","messages":[{"role":"user","content":"hi"}],"stream":)") +
            stream + "}");
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->status, 503) << r->body;
    EXPECT_EQ(json::parse(r->body)["error"]["code"], "overloaded") << r->body;
  }
}

}  // namespace
}  // namespace expertmesh::gateway
