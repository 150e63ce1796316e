#include "gateway/messages_api.h"

#include "core/tokenizer/tokenizer.h"
#include "gateway/http_api.h"
#include "gateway/http_server.h"
#include "gateway/stop_matcher.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"

namespace expertmesh::gateway {
namespace {

using nlohmann::json;

TEST(MessagesRequestTest, BadInputsNameTheirFieldInAnthropicShape) {
  struct Case {
    std::string body;
    std::string field;  // the message starts with "<field>: "
    int status = 400;
    std::string type = "invalid_request_error";
  };
  const std::string base = R"("model":"m","max_tokens":8)";
  const std::string msgs = base + R"(,"messages":[{"role":"user","content":"hi"}])";
  const std::vector<Case> cases = {
      {R"({"max_tokens":8,"messages":[{"role":"user","content":"hi"}]})", "model"},
      {R"({"model":"x","max_tokens":8,"messages":[{"role":"user","content":"hi"}]})", "model", 404,
       "not_found_error"},
      {R"({"model":"m","messages":[{"role":"user","content":"hi"}]})", "max_tokens"},
      {"{" + msgs + R"(,"max_tokens":0})", "max_tokens"},
      {"{" + base + "}", "messages"},
      {"{" + base + R"(,"messages":[{"role":"system","content":"hi"}]})", "messages[0].role"},
      {"{" + base + R"(,"messages":[{"role":"user"}]})", "messages[0].content"},
      {"{" + base + R"(,"messages":[{"role":"user","content":[{"type":"image","source":{}}]}]})",
       "messages[0].content[0].type"},
      {"{" + base + R"(,"messages":[{"role":"user","content":[{"type":"tool_result"}]}]})",
       "messages[0].content[0].type"},
      {"{" + base + R"(,"messages":[{"role":"user","content":[{"type":"text","text":3}]}]})",
       "messages[0].content[0].text"},
      {"{" + msgs + R"(,"system":[{"type":"text"}]})", "system[0].text"},
      {"{" + msgs + R"(,"temperature":1.5})", "temperature"},
      {"{" + msgs + R"(,"top_p":0})", "top_p"},
      {"{" + msgs + R"(,"top_k":-1})", "top_k"},
      {"{" + msgs + R"(,"stop_sequences":"x"})", "stop_sequences"},
      {"{" + msgs + R"(,"stop_sequences":["ok",""]})", "stop_sequences[1]"},
      {"{" + msgs + R"(,"stream":"yes"})", "stream"},
      {"{" + msgs + R"(,"metadata":{"user_id":7}})", "metadata.user_id"},
      {"{" + msgs + R"(,"thinking":{"type":"sometimes"}})", "thinking.type"},
      {"{" + msgs + R"(,"tools":[{"name":"f","input_schema":{}}]})", "tools"},
  };
  for (const Case& c : cases) {
    MessagesRequest req;
    std::optional<ApiError> e = ParseMessagesRequest(c.body, "m", false, &req);
    ASSERT_TRUE(e.has_value()) << c.body;
    EXPECT_EQ(e->status, c.status) << c.body;
    json j = json::parse(e->ToAnthropicJson());
    EXPECT_EQ(j["type"], "error");
    EXPECT_EQ(j["error"]["type"], c.type) << c.body;
    EXPECT_EQ(j["error"]["message"].get<std::string>().rfind(c.field + ": ", 0), 0u)
        << c.body << " -> " << j;
  }
}

TEST(MessagesRequestTest, GoodRequestMapsToTheGenerationInput) {
  MessagesRequest req;
  std::optional<ApiError> e = ParseMessagesRequest(
      R"({"model":"m","max_tokens":5,"system":[{"type":"text","text":"Be terse.",
          "cache_control":{"type":"ephemeral"}}],
          "messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
                      {"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"s"},
                                                      {"type":"text","text":"c"}]},
                      {"role":"user","content":"d"}],
          "stop_sequences":["END"],"temperature":0,"top_k":3,"metadata":{"user_id":"u1"},
          "thinking":{"type":"enabled","budget_tokens":2048},"stream":true})",
      "m", false, &req);
  ASSERT_FALSE(e.has_value()) << e->message;
  ASSERT_EQ(req.input.messages.size(), 4u);
  EXPECT_EQ(req.input.messages[0].role, chat::Role::kSystem);
  EXPECT_EQ(req.input.messages[0].content, "Be terse.");
  EXPECT_EQ(req.input.messages[1].content, "a\n\nb");
  EXPECT_EQ(req.input.messages[2].role, chat::Role::kAssistant);
  EXPECT_EQ(req.input.messages[2].reasoning_content, "hm");
  EXPECT_EQ(req.input.messages[2].content, "c");
  EXPECT_EQ(req.input.max_tokens, 5u);
  EXPECT_EQ(req.input.stop, std::vector<std::string>{"END"});
  EXPECT_EQ(req.input.temperature, 0.0);
  EXPECT_EQ(req.input.top_k, 3u);
  EXPECT_EQ(req.input.user, "u1");
  EXPECT_TRUE(req.stream);
  EXPECT_TRUE(req.thinking);
  EXPECT_EQ(req.input.encode.thinking_mode, chat::ThinkingMode::kThinking);

  // count_tokens takes the same body without max_tokens.
  MessagesRequest count;
  EXPECT_FALSE(ParseMessagesRequest(R"({"model":"m","messages":[{"role":"user","content":"x"}]})",
                                    "m", true, &count)
                   .has_value());
}

TEST(StopMatcherTest, ReportsTheMatchedString) {
  StopMatcher m({"xyz", "b"});
  EXPECT_EQ(m.Feed("aa"), "aa");
  EXPECT_EQ(m.Feed("xy"), "");
  EXPECT_EQ(m.Feed("zb"), "");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(m.matched(), "xyz");
}

// Over HTTP: parse errors and a missing worker come back in Anthropic's shape; count_tokens
// counts the encoded prompt.
TEST(MessagesApiTest, RoutesAnswerInAnthropicShape) {
  auto tok = tokenizer::LoadDefaultTokenizer();
  ASSERT_TRUE(tok.ok()) << tok.status();
  ModelInfo model;
  model.id = "m";
  model.context_length = 4096;
  GenerationOptions gen;
  gen.router = "127.0.0.1:1";  // nothing listens there
  gen.pick_timeout = absl::Milliseconds(300);
  prometheus::Registry registry;
  HttpApi api(
      model, [] { return RouterHealth{}; }, registry,
      std::make_shared<Generator>(model, tok->get(), gen));
  auto server =
      HttpServer::Start("127.0.0.1", 0, [&](const HttpRequest& r) { return api.Handle(r); });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();

  auto r = testing::HttpRequest(port, "POST", "/v1/messages?beta=true", R"({"model":"m"})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, 400);
  EXPECT_EQ(json::parse(r->body)["error"]["type"], "invalid_request_error") << r->body;

  const std::string good =
      R"({"model":"m","max_tokens":4,"messages":[{"role":"user","content":"hi"}],"stream":)";
  for (const char* stream : {"false", "true"}) {
    r = testing::HttpRequest(port, "POST", "/v1/messages", good + stream + "}");
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->status, 503) << r->body;
    json j = json::parse(r->body);
    EXPECT_EQ(j["type"], "error");
    EXPECT_EQ(j["error"]["type"], "overloaded_error") << r->body;
  }

  r = testing::HttpRequest(port, "POST", "/v1/messages/count_tokens",
                           R"({"model":"m","messages":[{"role":"user","content":"hi"}]})");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->status, 200) << r->body;
  GenerationInput in;
  chat::Message m;
  m.content = "hi";
  in.messages.push_back(m);
  std::vector<int32_t> ids;
  Generator core(model, tok->get(), gen);
  ASSERT_FALSE(core.PromptIds(in, &ids).has_value());
  EXPECT_EQ(json::parse(r->body)["input_tokens"], ids.size());
  EXPECT_GT(ids.size(), 1u);
  (*server)->Stop();
}

}  // namespace
}  // namespace expertmesh::gateway
