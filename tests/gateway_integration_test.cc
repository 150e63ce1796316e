// The gateway's OpenAI chat route end to end (issue 9, first slice): a real local cluster (router,
// kv-store, attention worker, expert worker, gateway) on the default tiny model with the real
// DeepSeek-V4 tokenizer; requests over HTTP, streamed (SSE) and not.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cli/local_cluster.h"
#include "core/chat/encoder.h"
#include "core/model/model.h"
#include "core/rpc/channel.h"
#include "core/tokenizer/tokenizer.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"
#include "tests/testing/cluster_requests.h"
#include "tests/testing/tiny_cluster.h"

namespace expertmesh {
namespace {

using nlohmann::json;

class GatewayIntegrationTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(testing::MakeTempDir("em-gateway"));
    auto c = testing::StartTinyGatewayCluster(*dir_);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = c->release();
    auto tok = tokenizer::LoadDefaultTokenizer();
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = tok->release();
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
    delete tokenizer_;
    if (dir_ != nullptr) std::system(("rm -rf '" + *dir_ + "'").c_str());
    delete dir_;
  }
  void SetUp() override { ASSERT_NE(cluster_, nullptr) << "the cluster did not start"; }

  int HttpPort() const { return cluster_->Find("gateway")->http_port; }

  testing::HttpResponse Post(const json& body, const std::string& path = "/v1/chat/completions") {
    auto r = testing::HttpRequest(HttpPort(), "POST", path, body.dump(), absl::Seconds(60));
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : testing::HttpResponse{};
  }

  // The SSE events of a streamed answer (the `data:` payloads, [DONE] included).
  static std::vector<std::string> Events(const std::string& body) {
    std::vector<std::string> out;
    size_t pos = 0;
    while ((pos = body.find("data: ", pos)) != std::string::npos) {
      const size_t end = body.find("\n\n", pos);
      out.push_back(body.substr(pos + 6, end - pos - 6));
      pos = end;
    }
    return out;
  }

  struct Streamed {
    std::string content;
    std::string finish_reason;
    std::vector<json> usage_chunks;
    bool done = false;
  };
  static Streamed Collect(const std::string& body) {
    Streamed s;
    for (const std::string& e : Events(body)) {
      if (e == "[DONE]") {
        s.done = true;
        continue;
      }
      json j = json::parse(e);
      EXPECT_FALSE(j.contains("error")) << e;
      EXPECT_EQ(j["object"], "chat.completion.chunk");
      if (j["choices"].empty()) {
        s.usage_chunks.push_back(j["usage"]);
        continue;
      }
      const json& c = j["choices"][0];
      if (c["delta"].contains("content")) s.content += c["delta"]["content"].get<std::string>();
      EXPECT_FALSE(c["delta"].contains("reasoning_content"));
      if (!c["finish_reason"].is_null()) s.finish_reason = c["finish_reason"];
    }
    return s;
  }

  static json Request(int max_tokens, bool stream) {
    return {{"model", "tiny"},
            {"messages",
             {{{"role", "system"}, {"content", "You are terse."}},
              {{"role", "user"}, {"content", "Name three colours."}}}},
            {"temperature", 0},
            {"max_tokens", max_tokens},
            {"stream", stream}};
  }

  static std::string* dir_;
  static cli::LocalCluster* cluster_;
  static tokenizer::Tokenizer* tokenizer_;
};

std::string* GatewayIntegrationTest::dir_ = nullptr;
cli::LocalCluster* GatewayIntegrationTest::cluster_ = nullptr;
tokenizer::Tokenizer* GatewayIntegrationTest::tokenizer_ = nullptr;

TEST_F(GatewayIntegrationTest, GreedyAnswerEqualsStreamAndDirectGenerate) {
  testing::HttpResponse whole = Post(Request(12, false));
  ASSERT_EQ(whole.status, 200) << whole.body;
  json j = json::parse(whole.body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["model"], "tiny");
  const std::string content = j["choices"][0]["message"]["content"];
  const std::string finish = j["choices"][0]["finish_reason"];
  const json usage = j["usage"];
  EXPECT_EQ(usage["total_tokens"].get<int>(),
            usage["prompt_tokens"].get<int>() + usage["completion_tokens"].get<int>());
  EXPECT_EQ(usage["prompt_tokens_details"]["cached_tokens"], 0);
  EXPECT_FALSE(j["choices"][0]["message"].contains("reasoning_content"));

  json req = Request(12, true);
  req["stream_options"] = {{"include_usage", true}};
  testing::HttpResponse streamed = Post(req);
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  EXPECT_EQ(streamed.content_type, "text/event-stream");
  Streamed s = Collect(streamed.body);
  EXPECT_EQ(s.content, content);
  EXPECT_EQ(s.finish_reason, finish);
  EXPECT_TRUE(s.done);
  ASSERT_EQ(s.usage_chunks.size(), 1u);
  EXPECT_EQ(s.usage_chunks[0], usage);

  // The same prompt straight to the attention worker: as many tokens as the usage says.
  std::vector<chat::Message> msgs(2);
  msgs[0].role = chat::Role::kSystem;
  msgs[0].content = "You are terse.";
  msgs[1].role = chat::Role::kUser;
  msgs[1].content = "Name three colours.";
  auto encoded = chat::EncodeChat(msgs, chat::EncodeOptions{});
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  auto ids = chat::ChatIds(*encoded, *tokenizer_);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(static_cast<int>(ids->size()), usage["prompt_tokens"].get<int>());
  v1::SequenceRequest seq;
  seq.set_sequence_id("direct-1");
  for (int32_t t : *ids) seq.add_prompt_ids(static_cast<uint32_t>(t));
  seq.mutable_sampling()->set_max_new_tokens(12);
  seq.mutable_sampling()->add_stop_token_ids(
      static_cast<uint32_t>(*tokenizer_->TokenToId(chat::kEos)));
  v1::AttentionWorker::Stub stub(rpc::MakeChannel(cluster_->attention_worker_addresses()[0]));
  grpc::ClientContext ctx;
  rpc::SetTimeout(ctx, absl::Seconds(60));
  auto reader = stub.Generate(&ctx, seq);
  v1::SequenceTokens msg;
  std::vector<int32_t> tokens;
  while (reader->Read(&msg)) {
    for (uint32_t t : msg.token_ids()) tokens.push_back(static_cast<int32_t>(t));
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(static_cast<int>(tokens.size()), usage["completion_tokens"].get<int>());
  EXPECT_EQ(tokenizer_->Decode(tokens), content);
}

TEST_F(GatewayIntegrationTest, SeededSamplingStreamsWhatTheWholeAnswerSays) {
  json req = Request(10, false);
  req["temperature"] = 0.9;
  req["top_p"] = 0.95;
  req["top_k"] = 50;
  req["seed"] = 1234;
  testing::HttpResponse whole = Post(req);
  ASSERT_EQ(whole.status, 200) << whole.body;
  const std::string content = json::parse(whole.body)["choices"][0]["message"]["content"];
  req["stream"] = true;
  testing::HttpResponse streamed = Post(req);
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  Streamed s = Collect(streamed.body);
  EXPECT_EQ(s.content, content);
  EXPECT_TRUE(s.usage_chunks.empty());  // not asked for
}

TEST_F(GatewayIntegrationTest, StopStringIsNotEmittedAndFinishesWithStop) {
  testing::HttpResponse whole = Post(Request(16, false));
  ASSERT_EQ(whole.status, 200) << whole.body;
  const std::string content = json::parse(whole.body)["choices"][0]["message"]["content"];
  // Two code points from the middle of the greedy answer.
  std::vector<size_t> starts;
  for (size_t i = 0; i < content.size(); ++i) {
    if ((static_cast<unsigned char>(content[i]) & 0xC0) != 0x80) starts.push_back(i);
  }
  ASSERT_GE(starts.size(), 4u) << content;
  const size_t a = starts[starts.size() / 2];
  const size_t b =
      starts.size() / 2 + 2 < starts.size() ? starts[starts.size() / 2 + 2] : content.size();
  const std::string stop = content.substr(a, b - a);
  const std::string want = content.substr(0, content.find(stop));

  json req = Request(16, false);
  req["stop"] = {stop};
  testing::HttpResponse stopped = Post(req);
  ASSERT_EQ(stopped.status, 200) << stopped.body;
  json j = json::parse(stopped.body);
  EXPECT_EQ(j["choices"][0]["message"]["content"], want) << "stop " << stop;
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");

  req["stream"] = true;
  testing::HttpResponse streamed = Post(req);
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  Streamed s = Collect(streamed.body);
  EXPECT_EQ(s.content, want);
  EXPECT_EQ(s.finish_reason, "stop");
  EXPECT_TRUE(s.done);
}

TEST_F(GatewayIntegrationTest, ClientDisconnectMidStreamFreesTheSequence) {
  v1::AttentionWorker::Stub stub(rpc::MakeChannel(cluster_->attention_worker_addresses()[0]));
  auto active = [&]() {
    grpc::ClientContext ctx;
    rpc::SetTimeout(ctx, absl::Seconds(5));
    v1::SequenceStatusRequest req;
    v1::SequenceStatusResponse resp;
    EXPECT_TRUE(stub.GetSequenceStatus(&ctx, req, &resp).ok());
    return resp.sequences_size();
  };
  auto wait_idle = [&] {
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (active() != 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(50));
    return active();
  };
  // Earlier tests' sequences (a stop string cancels its call) may still be being freed.
  ASSERT_EQ(wait_idle(), 0);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(HttpPort()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const std::string body = Request(20000, true).dump();
  const std::string req =
      "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
      "application/json\r\nContent-Length: " +
      std::to_string(body.size()) + "\r\n\r\n" + body;
  ASSERT_EQ(write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
  std::string got;
  char buf[4096];
  // The role chunk and at least one content chunk: the sequence is decoding.
  while (Events(got).size() < 3) {
    ssize_t n = read(fd, buf, sizeof buf);
    ASSERT_GT(n, 0) << got;
    got.append(buf, n);
  }
  EXPECT_EQ(active(), 1);
  close(fd);
  EXPECT_EQ(wait_idle(), 0) << "the sequence outlived its client";
}

TEST_F(GatewayIntegrationTest, ThinkingPutsReasoningInItsOwnField) {
  json req = Request(12, false);
  req["reasoning_effort"] = "high";
  testing::HttpResponse whole = Post(req);
  ASSERT_EQ(whole.status, 200) << whole.body;
  const json message = json::parse(whole.body)["choices"][0]["message"];
  ASSERT_TRUE(message.contains("reasoning_content")) << message.dump();
  req["stream"] = true;
  testing::HttpResponse streamed = Post(req);
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  std::string reasoning, content;
  for (const std::string& e : Events(streamed.body)) {
    if (e == "[DONE]") continue;
    const json d = json::parse(e)["choices"][0]["delta"];
    if (d.contains("reasoning_content")) reasoning += d["reasoning_content"].get<std::string>();
    if (d.contains("content")) content += d["content"].get<std::string>();
  }
  EXPECT_EQ(reasoning, message["reasoning_content"]);
  EXPECT_EQ(content, message["content"]);
  // Twelve tokens of a random model do not close </think>: everything is reasoning.
  EXPECT_FALSE(reasoning.empty());
}

TEST_F(GatewayIntegrationTest, BadRequestsAreRefusedNamingTheField) {
  json req = Request(4, false);
  req["temperature"] = 5;
  testing::HttpResponse r = Post(req);
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(json::parse(r.body)["error"]["param"], "temperature");
  req = Request(4, false);
  req["model"] = "nope";
  r = Post(req);
  EXPECT_EQ(r.status, 404);
  req = Request(4, false);
  req["response_format"] = {{"type", "json_schema"}};
  r = Post(req);
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(json::parse(r.body)["error"]["param"], "response_format");
}

// Anthropic Messages API (issue 9): the same core, Anthropic's shapes.
struct SseEvent {
  std::string type;
  json data;
};

std::vector<SseEvent> AnthropicEvents(const std::string& body) {
  std::vector<SseEvent> out;
  size_t pos = 0;
  while ((pos = body.find("event: ", pos)) != std::string::npos) {
    const size_t nl = body.find('\n', pos);
    SseEvent e;
    e.type = body.substr(pos + 7, nl - pos - 7);
    EXPECT_EQ(body.compare(nl + 1, 6, "data: "), 0) << body.substr(pos, 80);
    const size_t end = body.find("\n\n", nl);
    e.data = json::parse(body.substr(nl + 7, end - nl - 7));
    EXPECT_EQ(e.data["type"], e.type);
    out.push_back(std::move(e));
    pos = end;
  }
  return out;
}

json MessagesRequestBody(int max_tokens, bool stream) {
  return {{"model", "tiny"},
          {"system", "You are terse."},
          {"messages", {{{"role", "user"}, {"content", "Name three colours."}}}},
          {"temperature", 0},
          {"max_tokens", max_tokens},
          {"stream", stream}};
}

std::string TextOf(const json& message) {
  std::string text;
  for (const json& b : message["content"]) {
    if (b["type"] == "text") text += b["text"].get<std::string>();
  }
  return text;
}

TEST_F(GatewayIntegrationTest, MessagesStreamMatchesWholeAnswerInAnthropicEventOrder) {
  testing::HttpResponse whole = Post(MessagesRequestBody(12, false), "/v1/messages");
  ASSERT_EQ(whole.status, 200) << whole.body;
  json m = json::parse(whole.body);
  EXPECT_EQ(m["type"], "message");
  EXPECT_EQ(m["role"], "assistant");
  EXPECT_EQ(m["model"], "tiny");
  EXPECT_EQ(m["id"].get<std::string>().rfind("msg_", 0), 0u);
  EXPECT_TRUE(m["stop_reason"] == "end_turn" || m["stop_reason"] == "max_tokens") << m;
  EXPECT_TRUE(m["stop_sequence"].is_null());
  EXPECT_EQ(m["usage"]["cache_read_input_tokens"], 0);
  EXPECT_EQ(m["usage"]["cache_creation_input_tokens"], 0);
  EXPECT_GE(m["usage"]["output_tokens"].get<int>(), 1);
  const std::string text = TextOf(m);
  EXPECT_FALSE(text.empty());

  testing::HttpResponse streamed = Post(MessagesRequestBody(12, true), "/v1/messages?beta=true");
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  std::vector<SseEvent> events = AnthropicEvents(streamed.body);
  ASSERT_GE(events.size(), 5u) << streamed.body;
  // Exactly: message_start, content_block_start, deltas, content_block_stop, message_delta,
  // message_stop (one text block in chat mode).
  EXPECT_EQ(events[0].type, "message_start");
  EXPECT_EQ(events[0].data["message"]["usage"]["input_tokens"], m["usage"]["input_tokens"]);
  EXPECT_EQ(events[1].type, "content_block_start");
  EXPECT_EQ(events[1].data["content_block"]["type"], "text");
  const size_t n = events.size();
  EXPECT_EQ(events[n - 3].type, "content_block_stop");
  EXPECT_EQ(events[n - 2].type, "message_delta");
  EXPECT_EQ(events[n - 1].type, "message_stop");
  std::string deltas;
  for (size_t i = 2; i + 3 < n; ++i) {
    EXPECT_EQ(events[i].type, "content_block_delta") << i;
    EXPECT_EQ(events[i].data["index"], 0);
    EXPECT_EQ(events[i].data["delta"]["type"], "text_delta");
    deltas += events[i].data["delta"]["text"].get<std::string>();
  }
  EXPECT_EQ(deltas, text);
  EXPECT_EQ(events[n - 2].data["delta"]["stop_reason"], m["stop_reason"]);
  EXPECT_EQ(events[n - 2].data["usage"]["output_tokens"], m["usage"]["output_tokens"]);
}

TEST_F(GatewayIntegrationTest, CountTokensEqualsUsageInputTokens) {
  testing::HttpResponse whole = Post(MessagesRequestBody(2, false), "/v1/messages");
  ASSERT_EQ(whole.status, 200) << whole.body;
  json count_body = MessagesRequestBody(2, false);
  count_body.erase("max_tokens");
  count_body.erase("temperature");
  count_body.erase("stream");
  testing::HttpResponse count = Post(count_body, "/v1/messages/count_tokens");
  ASSERT_EQ(count.status, 200) << count.body;
  EXPECT_EQ(json::parse(count.body)["input_tokens"],
            json::parse(whole.body)["usage"]["input_tokens"]);
  EXPECT_GT(json::parse(count.body)["input_tokens"].get<int>(), 1);
}

TEST_F(GatewayIntegrationTest, SameGreedyRequestGivesSameTextThroughBothApis) {
  testing::HttpResponse openai = Post(Request(12, false));
  ASSERT_EQ(openai.status, 200) << openai.body;
  testing::HttpResponse anthropic = Post(MessagesRequestBody(12, false), "/v1/messages");
  ASSERT_EQ(anthropic.status, 200) << anthropic.body;
  json o = json::parse(openai.body);
  json a = json::parse(anthropic.body);
  EXPECT_EQ(TextOf(a), o["choices"][0]["message"]["content"]);
  EXPECT_EQ(a["usage"]["input_tokens"], o["usage"]["prompt_tokens"]);
  EXPECT_EQ(a["usage"]["output_tokens"], o["usage"]["completion_tokens"]);
}

TEST_F(GatewayIntegrationTest, StopSequencesEndWithStopReasonStopSequence) {
  testing::HttpResponse whole = Post(MessagesRequestBody(16, false), "/v1/messages");
  ASSERT_EQ(whole.status, 200) << whole.body;
  const std::string text = TextOf(json::parse(whole.body));
  std::vector<size_t> starts;
  for (size_t i = 0; i < text.size(); ++i) {
    if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80) starts.push_back(i);
  }
  ASSERT_GE(starts.size(), 4u) << text;
  const size_t a = starts[starts.size() / 2];
  const size_t b =
      starts.size() / 2 + 2 < starts.size() ? starts[starts.size() / 2 + 2] : text.size();
  const std::string stop = text.substr(a, b - a);
  const std::string want = text.substr(0, text.find(stop));

  json req = MessagesRequestBody(16, false);
  req["stop_sequences"] = {stop};
  testing::HttpResponse stopped = Post(req, "/v1/messages");
  ASSERT_EQ(stopped.status, 200) << stopped.body;
  json j = json::parse(stopped.body);
  EXPECT_EQ(TextOf(j), want) << "stop " << stop;
  EXPECT_EQ(j["stop_reason"], "stop_sequence");
  EXPECT_EQ(j["stop_sequence"], stop);

  req["stream"] = true;
  testing::HttpResponse streamed = Post(req, "/v1/messages");
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  std::vector<SseEvent> events = AnthropicEvents(streamed.body);
  ASSERT_GE(events.size(), 2u);
  std::string deltas;
  for (const SseEvent& e : events) {
    if (e.type == "content_block_delta") deltas += e.data["delta"]["text"].get<std::string>();
  }
  EXPECT_EQ(deltas, want);
  const SseEvent& md = events[events.size() - 2];
  EXPECT_EQ(md.type, "message_delta");
  EXPECT_EQ(md.data["delta"]["stop_reason"], "stop_sequence");
  EXPECT_EQ(md.data["delta"]["stop_sequence"], stop);
}

TEST_F(GatewayIntegrationTest, MessagesThinkingGoesIntoAThinkingBlock) {
  json req = MessagesRequestBody(12, false);
  req["thinking"] = {{"type", "adaptive"}};  // "enabled" needs budget_tokens (>= 1024) < max_tokens
  testing::HttpResponse whole = Post(req, "/v1/messages");
  ASSERT_EQ(whole.status, 200) << whole.body;
  json m = json::parse(whole.body);
  ASSERT_FALSE(m["content"].empty());
  // Twelve tokens of a random model do not close </think>: the first block is the reasoning.
  EXPECT_EQ(m["content"][0]["type"], "thinking") << m;

  req["stream"] = true;
  testing::HttpResponse streamed = Post(req, "/v1/messages");
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  std::string thinking;
  for (const SseEvent& e : AnthropicEvents(streamed.body)) {
    if (e.type == "content_block_delta" && e.data["delta"]["type"] == "thinking_delta") {
      thinking += e.data["delta"]["thinking"].get<std::string>();
    }
  }
  EXPECT_EQ(thinking, m["content"][0]["thinking"]);
}

TEST_F(GatewayIntegrationTest, MessagesBadRequestsAnswerInAnthropicShape) {
  json req = MessagesRequestBody(4, false);
  req.erase("max_tokens");
  testing::HttpResponse r = Post(req, "/v1/messages");
  EXPECT_EQ(r.status, 400);
  json j = json::parse(r.body);
  EXPECT_EQ(j["type"], "error");
  EXPECT_EQ(j["error"]["type"], "invalid_request_error");
  EXPECT_EQ(j["error"]["message"].get<std::string>().rfind("max_tokens: ", 0), 0u) << j;
  req = MessagesRequestBody(4, false);
  req["model"] = "nope";
  r = Post(req, "/v1/messages");
  EXPECT_EQ(r.status, 404);
  EXPECT_EQ(json::parse(r.body)["error"]["type"], "not_found_error");
}

// /v1/completions (prompt as ids, greedy): the text is the single-process engine's tokens for
// the same ids, up to the end of sentence; with logprobs, each greedy token is the best of its
// alternatives.
TEST_F(GatewayIntegrationTest, GreedyCompletionOfIdsEqualsTheEngine) {
  std::vector<int32_t> prompt = {*tokenizer_->TokenToId(chat::kBos)};
  tokenizer_->EncodeAppend("Once upon a time", false, &prompt);
  testing::HttpResponse r = Post({{"model", "tiny"},
                                  {"prompt", prompt},
                                  {"temperature", 0},
                                  {"max_tokens", 10},
                                  {"logprobs", 2}},
                                 "/v1/completions");
  ASSERT_EQ(r.status, 200) << r.body;
  json j = json::parse(r.body);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["usage"]["prompt_tokens"], prompt.size());

  auto model = model::Model::Load(*dir_ + "/tiny");
  ASSERT_TRUE(model.ok()) << model.status();
  testing::GenRequest g;
  g.prompt = prompt;
  g.max_new = 10;
  auto want = testing::EngineTokens(**model, g);
  ASSERT_TRUE(want.ok()) << want.status();
  const int32_t eos = *tokenizer_->TokenToId(chat::kEos);
  std::vector<int32_t> until_eos;
  for (int32_t t : *want) {
    if (t == eos) break;
    until_eos.push_back(t);
  }
  EXPECT_EQ(j["choices"][0]["text"], tokenizer_->Decode(until_eos)) << r.body;
  const bool hit_eos = until_eos.size() < want->size();
  EXPECT_EQ(j["choices"][0]["finish_reason"], hit_eos ? "stop" : "length");
  // The end-of-sentence id may be counted, as in the chat route's usage.
  const size_t counted = j["usage"]["completion_tokens"].get<size_t>();
  EXPECT_TRUE(counted == until_eos.size() || (hit_eos && counted == until_eos.size() + 1))
      << counted;

  const json& lp = j["choices"][0]["logprobs"];
  ASSERT_GE(lp["token_logprobs"].size(), until_eos.size()) << lp.dump();
  for (size_t i = 0; i < until_eos.size(); ++i) {
    ASSERT_EQ(lp["top_logprobs"][i].size(), 2u) << lp.dump();
    for (const auto& [token, logprob] : lp["top_logprobs"][i].items()) {
      EXPECT_GE(lp["token_logprobs"][i].get<double>(), logprob.get<double>() - 1e-6) << token;
    }
  }
}

// Chat logprobs: the streamed entries (each in the chunk of its tokens) are the non-streamed ones.
TEST_F(GatewayIntegrationTest, ChatLogprobsStreamedEqualWhole) {
  json req = Request(8, false);
  req["logprobs"] = true;
  req["top_logprobs"] = 3;
  testing::HttpResponse whole = Post(req);
  ASSERT_EQ(whole.status, 200) << whole.body;
  const json content = json::parse(whole.body)["choices"][0]["logprobs"]["content"];
  ASSERT_FALSE(content.empty()) << whole.body;
  for (const json& t : content) {
    EXPECT_LE(t["logprob"].get<double>(), 0.0);
    EXPECT_EQ(t["top_logprobs"].size(), 3u);
    EXPECT_TRUE(t["bytes"].is_array());
  }
  req["stream"] = true;
  testing::HttpResponse streamed = Post(req);
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  json got = json::array();
  for (const std::string& e : Events(streamed.body)) {
    if (e == "[DONE]") continue;
    json c = json::parse(e);
    if (c["choices"].empty() || c["choices"][0]["logprobs"].is_null()) continue;
    for (const json& t : c["choices"][0]["logprobs"]["content"]) got.push_back(t);
  }
  EXPECT_EQ(got, content);
}

}  // namespace
}  // namespace expertmesh
