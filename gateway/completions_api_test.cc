// OpenAI's legacy /v1/completions, n > 1, tool_choice, logprobs requests and GET /v1/models/{id}:
// parsing tables, then the real HttpServer + HttpApi + Generator in process against the
// scripted attention worker (what the gateway sends to the worker, and the answers' shapes).
#include "gateway/completions_api.h"

#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "core/chat/encoder.h"
#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"
#include "tests/testing/in_process_gateway.h"

namespace expertmesh::gateway {
namespace {

using nlohmann::json;
namespace v1 = expertmesh::v1;

void ExpectRefusal(const std::optional<ApiError>& e, const std::string& param, int status) {
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->status, status);
  json j = json::parse(e->ToJson());
  EXPECT_EQ(j["error"]["param"], param) << j.dump();
  EXPECT_EQ(j["error"]["type"], "invalid_request_error");
  EXPECT_NE(j["error"]["message"].get<std::string>().find(param), std::string::npos) << j.dump();
}

TEST(CompletionRequestTest, BadInputsNameTheirField) {
  struct Case {
    std::string body;
    std::string param;
    int status = 400;
  };
  const std::string p = R"("model":"m","prompt":"hi")";
  const std::vector<Case> cases = {
      {R"({"prompt":"hi"})", "model"},
      {R"({"model":"x","prompt":"hi"})", "model", 404},
      {R"({"model":"m"})", "prompt"},
      {R"({"model":"m","prompt":5})", "prompt"},
      {R"({"model":"m","prompt":[]})", "prompt"},
      {R"({"model":"m","prompt":["a","b"]})", "prompt"},
      {R"({"model":"m","prompt":[[1],[2]]})", "prompt"},
      {R"({"model":"m","prompt":[1,-2]})", "prompt[1]"},
      {R"({"model":"m","prompt":[1,1000]})", "prompt[1]"},
      {R"({"model":"m","prompt":[1,"a"]})", "prompt[1]"},
      {R"({"model":"m","prompt":[[3,1.5]]})", "prompt[0][1]"},
      {R"({"model":"m","prompt":[[]]})", "prompt[0]"},
      {R"({"model":"m","prompt":[{"a":1}]})", "prompt[0]"},
      {"{" + p + R"(,"max_tokens":0})", "max_tokens"},
      {"{" + p + R"(,"max_tokens":"x"})", "max_tokens"},
      {"{" + p + R"(,"temperature":-1})", "temperature"},
      {"{" + p + R"(,"top_p":2})", "top_p"},
      {"{" + p + R"(,"top_k":1.5})", "top_k"},
      {"{" + p + R"(,"seed":"s"})", "seed"},
      {"{" + p + R"(,"stop":[""]})", "stop[0]"},
      {"{" + p + R"(,"stream":1})", "stream"},
      {"{" + p + R"(,"stream_options":{"include_usage":true}})", "stream_options"},
      {"{" + p + R"(,"logprobs":6})", "logprobs"},
      {"{" + p + R"(,"logprobs":true})", "logprobs"},
      {"{" + p + R"(,"echo":"yes"})", "echo"},
      {"{" + p + R"(,"echo":true,"logprobs":1})", "echo"},
      {"{" + p + R"(,"suffix":"tail"})", "suffix"},
      {"{" + p + R"(,"suffix":3})", "suffix"},
      {"{" + p + R"(,"n":0})", "n"},
      {"{" + p + R"(,"n":2,"stream":true})", "n"},
      {"{" + p + R"(,"best_of":3})", "best_of"},
      {"{" + p + R"(,"presence_penalty":1})", "presence_penalty"},
      {"{" + p + R"(,"logit_bias":{"5":1}})", "logit_bias"},
      {"{" + p + R"(,"user":1})", "user"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.body);
    CompletionRequest req;
    ExpectRefusal(ParseCompletionRequest(c.body, "m", 1000, &req), c.param, c.status);
  }
}

TEST(CompletionRequestTest, PromptFormsAndDefaults) {
  CompletionRequest a;
  ASSERT_FALSE(ParseCompletionRequest(R"({"model":"m","prompt":"x y"})", "m", 1000, &a));
  EXPECT_EQ(a.prompt_text, std::optional<std::string>("x y"));
  EXPECT_TRUE(a.prompt_ids.empty());
  EXPECT_EQ(a.max_tokens, 16u);  // OpenAI's default for this API
  EXPECT_EQ(a.n, 1u);
  EXPECT_FALSE(a.logprobs.has_value());

  CompletionRequest b;
  ASSERT_FALSE(ParseCompletionRequest(
      R"({"model":"m","prompt":[[5,6,999]],"max_tokens":3,"logprobs":0,"n":2,"best_of":2,
          "seed":9,"stop":["\n"],"suffix":"","temperature":0})",
      "m", 1000, &b));
  EXPECT_FALSE(b.prompt_text.has_value());
  EXPECT_EQ(b.prompt_ids, (std::vector<int32_t>{5, 6, 999}));
  EXPECT_EQ(b.max_tokens, 3u);
  EXPECT_EQ(b.logprobs, std::optional<uint32_t>(0));
  EXPECT_EQ(b.n, 2u);
  EXPECT_EQ(b.seed, std::optional<uint64_t>(9));
  EXPECT_EQ(b.stop, std::vector<std::string>{"\n"});

  CompletionRequest c;
  ASSERT_FALSE(
      ParseCompletionRequest(R"({"model":"m","prompt":["only"],"echo":true})", "m", 1000, &c));
  EXPECT_EQ(c.prompt_text, std::optional<std::string>("only"));
  EXPECT_TRUE(c.echo);
  CompletionRequest d;
  ASSERT_FALSE(ParseCompletionRequest(R"({"model":"m","prompt":[7]})", "m", 1000, &d));
  EXPECT_EQ(d.prompt_ids, std::vector<int32_t>{7});
}

TEST(ChoiceSeedTest, FirstChoiceKeepsTheSeedOthersDiffer) {
  EXPECT_EQ(ChoiceSeed(42, 0), 42u);
  std::set<uint64_t> seen;
  for (uint32_t i = 0; i < 16; ++i) seen.insert(ChoiceSeed(42, i));
  EXPECT_EQ(seen.size(), 16u);
  EXPECT_EQ(ChoiceSeed(42, 3), ChoiceSeed(42, 3));
  EXPECT_NE(ChoiceSeed(42, 3), ChoiceSeed(43, 3));
}

// ---------------------------------------------------------------------------------------------
// In process, against the scripted worker.

const char kWeatherTool[] =
    R"({"type":"function","function":{"name":"get_weather","description":"Weather now",)"
    R"("parameters":{"type":"object","properties":{"city":{"type":"string"}}}}})";

class OpenAiRoutesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto& loaded = testing::SharedDefaultTokenizer();
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    tok_ = loaded->get();
    eos_ = tok_->TokenToId(chat::kEos).value_or(-1);
    bos_ = tok_->TokenToId(chat::kBos).value_or(-1);
    ASSERT_GE(eos_, 0);
    ASSERT_GE(bos_, 0);
    SetCompletion(kPlain);

    testing::InProcessGatewayOptions o;
    o.worker.script = [this](const v1::SequenceRequest& req) {
      std::lock_guard<std::mutex> lock(mu_);
      testing::ScriptedReply r = reply_;
      if (cached_) r.cached_prompt_tokens = cached_(req);
      return r;
    };
    o.model.id = "m";
    o.model.created = 1700000000;
    o.model.context_length = 65536;
    o.model.aliases = {"gpt-alias"};
    o.generation.generate_timeout = absl::Seconds(60);
    o.http_threads = 2;
    auto g = testing::InProcessGateway::Start(std::move(o), tok_);
    ASSERT_TRUE(g.ok()) << g.status();
    gateway_ = std::move(*g);
  }

  void TearDown() override { gateway_.reset(); }

  // The worker answers `text` (tokenized with control strings as their ids) then EOS.
  void SetCompletion(const std::string& text) {
    testing::ScriptedReply r;
    for (int32_t id : tok_->Encode(text, /*match_added_tokens=*/true)) {
      r.token_ids.push_back(static_cast<uint32_t>(id));
    }
    r.token_ids.push_back(static_cast<uint32_t>(eos_));
    std::lock_guard<std::mutex> lock(mu_);
    reply_ = std::move(r);
  }

  json Post(const std::string& target, const json& body, int want_status = 200) {
    auto r = testing::HttpRequest(gateway_->port(), "POST", target, body.dump());
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return json();
    EXPECT_EQ(r->status, want_status) << r->body;
    return json::parse(r->body, nullptr, /*allow_exceptions=*/false);
  }

  // The data payloads of an SSE body, [DONE] included.
  std::vector<std::string> Events(const std::string& target, const json& body) {
    auto r = testing::HttpRequest(gateway_->port(), "POST", target, body.dump());
    EXPECT_TRUE(r.ok()) << r.status();
    std::vector<std::string> out;
    if (!r.ok()) return out;
    EXPECT_EQ(r->status, 200) << r->body;
    for (absl::string_view line : absl::StrSplit(r->body, '\n')) {
      if (line.substr(0, 6) == "data: ") out.emplace_back(line.substr(6));
    }
    return out;
  }

  std::vector<int32_t> PromptOf(const v1::SequenceRequest& r) const {
    return std::vector<int32_t>(r.prompt_ids().begin(), r.prompt_ids().end());
  }

  static constexpr char kPlain[] = "Plain words, then <think> stays text.";

  const tokenizer::Tokenizer* tok_ = nullptr;
  int32_t eos_ = -1, bos_ = -1;
  std::mutex mu_;
  testing::ScriptedReply reply_;
  // Set: the kv-store hit the worker reports for a request (ScriptedReply.cached_prompt_tokens).
  std::function<uint32_t(const v1::SequenceRequest&)> cached_;
  std::unique_ptr<testing::InProcessGateway> gateway_;
};

TEST_F(OpenAiRoutesTest, TextPromptIsPlainTextAfterBosAndTheTextIsRaw) {
  const std::string prompt = "Say <｜User｜> and </think> literally:";
  json j = Post("/v1/completions", {{"model", "m"}, {"prompt", prompt}, {"temperature", 0}});
  ASSERT_EQ(gateway_->worker().requests().size(), 1u);
  const v1::SequenceRequest req = gateway_->worker().requests()[0];
  std::vector<int32_t> want = {bos_};
  tok_->EncodeAppend(prompt, /*match_added_tokens=*/false, &want);
  EXPECT_EQ(PromptOf(req), want);
  EXPECT_EQ(req.sampling().max_new_tokens(), 16u);
  EXPECT_EQ(req.sampling().temperature(), 0.0f);
  EXPECT_FALSE(req.sampling().logprobs());

  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["model"], "m");
  EXPECT_EQ(j["id"].get<std::string>().rfind("cmpl-", 0), 0u) << j.dump();
  ASSERT_EQ(j["choices"].size(), 1u);
  // No chat parsing: `<think>` in the completion is text like any other.
  EXPECT_EQ(j["choices"][0]["text"], kPlain);
  EXPECT_EQ(j["choices"][0]["index"], 0);
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(j["usage"]["prompt_tokens"], want.size());
  EXPECT_GT(j["usage"]["completion_tokens"].get<int>(), 0);
  EXPECT_EQ(j["usage"]["total_tokens"].get<int>(),
            j["usage"]["prompt_tokens"].get<int>() + j["usage"]["completion_tokens"].get<int>());
}

TEST_F(OpenAiRoutesTest, IdPromptIsSentAsIsAndEchoed) {
  const std::vector<int32_t> ids = tok_->Encode("Echo me", true);
  json j = Post("/v1/completions",
                {{"model", "gpt-alias"}, {"prompt", ids}, {"echo", true}, {"max_tokens", 40}});
  ASSERT_EQ(gateway_->worker().requests().size(), 1u);
  EXPECT_EQ(PromptOf(gateway_->worker().requests()[0]), ids);
  EXPECT_EQ(gateway_->worker().requests()[0].sampling().max_new_tokens(), 40u);
  EXPECT_EQ(j["choices"][0]["text"], "Echo me" + std::string(kPlain));
}

TEST_F(OpenAiRoutesTest, StreamedTextEqualsTheWholeAnswer) {
  const json body = {{"model", "m"},
                     {"prompt", "Once"},
                     {"stream", true},
                     {"stream_options", {{"include_usage", true}}}};
  std::vector<std::string> events = Events("/v1/completions", body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  int finishes = 0;
  for (size_t i = 0; i + 2 < events.size(); ++i) {
    json c = json::parse(events[i]);
    EXPECT_EQ(c["object"], "text_completion");
    EXPECT_TRUE(c.contains("usage") && c["usage"].is_null()) << events[i];
    ASSERT_EQ(c["choices"].size(), 1u) << events[i];
    text += c["choices"][0]["text"].get<std::string>();
    if (!c["choices"][0]["finish_reason"].is_null()) {
      ++finishes;
      EXPECT_EQ(c["choices"][0]["finish_reason"], "stop");
      EXPECT_EQ(i + 3, events.size()) << "the finish chunk is the last choice chunk";
    }
  }
  EXPECT_EQ(finishes, 1);
  EXPECT_EQ(text, kPlain);
  json usage = json::parse(events[events.size() - 2]);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_GT(usage["usage"]["completion_tokens"].get<int>(), 0);

  json whole = Post("/v1/completions", {{"model", "m"}, {"prompt", "Once"}});
  EXPECT_EQ(whole["choices"][0]["text"], text);
}

TEST_F(OpenAiRoutesTest, NChoicesAreSeparateGenerationsWithDerivedSeeds) {
  json one = Post("/v1/completions", {{"model", "m"}, {"prompt", "Count"}, {"seed", 7}});
  json j = Post("/v1/completions", {{"model", "m"}, {"prompt", "Count"}, {"seed", 7}, {"n", 3}});
  const std::vector<v1::SequenceRequest> reqs = gateway_->worker().requests();
  ASSERT_EQ(reqs.size(), 4u);
  std::set<std::string> ids;
  std::set<uint64_t> seeds;
  for (size_t i = 1; i < 4; ++i) {
    ids.insert(reqs[i].sequence_id());
    ASSERT_TRUE(reqs[i].sampling().has_seed());
    seeds.insert(reqs[i].sampling().seed());
    EXPECT_EQ(PromptOf(reqs[i]), PromptOf(reqs[0]));
  }
  EXPECT_EQ(ids.size(), 3u);
  EXPECT_EQ(seeds, (std::set<uint64_t>{ChoiceSeed(7, 0), ChoiceSeed(7, 1), ChoiceSeed(7, 2)}));
  EXPECT_EQ(reqs[0].sampling().seed(), 7u);
  ASSERT_EQ(j["choices"].size(), 3u) << j.dump();
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(j["choices"][i]["index"], i);
    EXPECT_EQ(j["choices"][i]["text"], kPlain);
  }
  // One prompt, three completions.
  EXPECT_EQ(j["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);
  EXPECT_EQ(j["usage"]["completion_tokens"].get<int>(),
            3 * one["usage"]["completion_tokens"].get<int>());

  // Chat: the same.
  json c = Post("/v1/chat/completions", {{"model", "m"},
                                         {"messages", {{{"role", "user"}, {"content", "hi"}}}},
                                         {"n", 2},
                                         {"seed", 11}});
  ASSERT_EQ(c["choices"].size(), 2u) << c.dump();
  EXPECT_EQ(c["object"], "chat.completion");
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(c["choices"][i]["index"], i);
    EXPECT_EQ(c["choices"][i]["message"]["content"], kPlain);
    EXPECT_EQ(c["choices"][i]["finish_reason"], "stop");
  }
  const std::vector<v1::SequenceRequest> all = gateway_->worker().requests();
  ASSERT_EQ(all.size(), 6u);
  EXPECT_EQ((std::set<uint64_t>{all[4].sampling().seed(), all[5].sampling().seed()}),
            (std::set<uint64_t>{ChoiceSeed(11, 0), ChoiceSeed(11, 1)}));
}

TEST_F(OpenAiRoutesTest, ToolChoiceRequiredAndNamedForceACall) {
  const std::string rest =
      "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
  const json tools = json::array({json::parse(kWeatherTool)});
  const json messages = {{{"role", "user"}, {"content", "Weather in Paris?"}}};
  struct Case {
    json choice;
    std::string completion;  // what the worker writes after the forced opening
    std::string prefix;
  };
  const std::vector<Case> cases = {
      {"required", "<｜DSML｜invoke name=\"get_weather\">\n" + rest,
       ForcedToolCallPrefix(chat::ThinkingMode::kChat, "")},
      {{{"type", "function"}, {"function", {{"name", "get_weather"}}}},
       rest,
       ForcedToolCallPrefix(chat::ThinkingMode::kChat, "get_weather")},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.choice.dump());
    SetCompletion(c.completion);
    const size_t before = gateway_->worker().requests().size();
    json j =
        Post("/v1/chat/completions",
             {{"model", "m"}, {"messages", messages}, {"tools", tools}, {"tool_choice", c.choice}});
    ASSERT_EQ(gateway_->worker().requests().size(), before + 1);
    // The prompt ends with the forced opening, control strings as their ids.
    const std::vector<int32_t> prompt = PromptOf(gateway_->worker().requests().back());
    const std::vector<int32_t> prefix = tok_->Encode(c.prefix, /*match_added_tokens=*/true);
    ASSERT_GE(prompt.size(), prefix.size());
    EXPECT_EQ(std::vector<int32_t>(prompt.end() - prefix.size(), prompt.end()), prefix);
    const json& choice = j["choices"][0];
    EXPECT_EQ(choice["finish_reason"], "tool_calls") << j.dump();
    ASSERT_EQ(choice["message"]["tool_calls"].size(), 1u) << j.dump();
    EXPECT_EQ(choice["message"]["tool_calls"][0]["function"]["name"], "get_weather");
    EXPECT_EQ(
        json::parse(choice["message"]["tool_calls"][0]["function"]["arguments"].get<std::string>()),
        json({{"city", "Paris"}}));
    EXPECT_EQ(choice["message"]["content"], "");
  }
}

TEST_F(OpenAiRoutesTest, ToolChoiceNoneHidesTheToolsAndCutsACall) {
  SetCompletion(
      "Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
      "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n</｜DSML｜tool_calls>");
  const json body = {{"model", "m"},
                     {"messages", {{{"role", "user"}, {"content", "Weather?"}}}},
                     {"tools", json::array({json::parse(kWeatherTool)})},
                     {"tool_choice", "none"}};
  json j = Post("/v1/chat/completions", body);
  ASSERT_EQ(gateway_->worker().requests().size(), 1u);
  const std::string prompt = tok_->Decode(PromptOf(gateway_->worker().requests()[0]));
  EXPECT_EQ(prompt.find("get_weather"), std::string::npos) << prompt;
  EXPECT_EQ(j["choices"][0]["message"]["content"], "Sure.") << j.dump();
  EXPECT_FALSE(j["choices"][0]["message"].contains("tool_calls")) << j.dump();
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");

  // auto: the same completion is a call, and the tools are in the prompt.
  json body_auto = body;
  body_auto["tool_choice"] = "auto";
  json a = Post("/v1/chat/completions", body_auto);
  EXPECT_NE(tok_->Decode(PromptOf(gateway_->worker().requests()[1])).find("get_weather"), std::string::npos);
  EXPECT_EQ(a["choices"][0]["finish_reason"], "tool_calls") << a.dump();
}

TEST_F(OpenAiRoutesTest, LogprobsAreRequestedFromTheWorker) {
  json j = Post("/v1/chat/completions", {{"model", "m"},
                                         {"messages", {{{"role", "user"}, {"content", "hi"}}}},
                                         {"logprobs", true},
                                         {"top_logprobs", 3}});
  ASSERT_EQ(gateway_->worker().requests().size(), 1u);
  EXPECT_TRUE(gateway_->worker().requests()[0].sampling().logprobs());
  EXPECT_EQ(gateway_->worker().requests()[0].sampling().top_logprobs(), 3u);
  // The scripted worker reports none: an empty list, in OpenAI's shape.
  EXPECT_TRUE(j["choices"][0]["logprobs"]["content"].is_array()) << j.dump();

  Post("/v1/completions", {{"model", "m"}, {"prompt", "x"}, {"logprobs", 2}});
  ASSERT_EQ(gateway_->worker().requests().size(), 2u);
  EXPECT_TRUE(gateway_->worker().requests()[1].sampling().logprobs());
  EXPECT_EQ(gateway_->worker().requests()[1].sampling().top_logprobs(), 2u);
}

TEST_F(OpenAiRoutesTest, ModelById) {
  for (const char* id : {"m", "gpt-alias"}) {
    auto r = testing::HttpRequest(gateway_->port(), "GET", std::string("/v1/models/") + id);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->status, 200) << r->body;
    json j = json::parse(r->body);
    EXPECT_EQ(j["id"], id);
    EXPECT_EQ(j["object"], "model");
    EXPECT_EQ(j["created"], 1700000000);
  }
  auto missing = testing::HttpRequest(gateway_->port(), "GET", "/v1/models/other%2Dmodel");
  ASSERT_TRUE(missing.ok()) << missing.status();
  EXPECT_EQ(missing->status, 404);
  json e = json::parse(missing->body);
  EXPECT_EQ(e["error"]["code"], "model_not_found");
  EXPECT_EQ(e["error"]["param"], "model");
  EXPECT_NE(e["error"]["message"].get<std::string>().find("other-model"), std::string::npos);
  auto post = testing::HttpRequest(gateway_->port(), "POST", "/v1/models/m", "{}");
  ASSERT_TRUE(post.ok());
  EXPECT_EQ(post->status, 405);
}

}  // namespace

// The hit the worker reports on its first message reaches every usage shape: streamed and whole,
// one choice and n (the prompt counted once, with the most any choice loaded), OpenAI's and
// Anthropic's (message_start carries it because Begin waits for that first message).
TEST_F(OpenAiRoutesTest, CachedPromptTokensReachEveryUsage) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    cached_ = [](const v1::SequenceRequest& r) -> uint32_t {
      // Choice 1 of an n > 1 answer finds more stored than the others.
      return absl::EndsWith(r.sequence_id(), "-1") ? 3 : 2;
    };
  }
  auto cached = [](const json& usage) {
    return usage["prompt_tokens_details"]["cached_tokens"].get<int>();
  };
  // Longer than the hits (the usage never reports more cached than prompt tokens).
  const std::string text = "Count from one to ten, slowly and clearly.";
  json j = Post("/v1/completions", {{"model", "m"}, {"prompt", text}});
  EXPECT_EQ(cached(j["usage"]), 2) << j.dump();
  EXPECT_EQ(j["usage"]["prompt_tokens"], gateway_->worker().requests().back().prompt_ids_size());
  EXPECT_GT(j["usage"]["prompt_tokens"].get<int>(), 3);

  j = Post("/v1/completions", {{"model", "m"}, {"prompt", text}, {"n", 3}});
  EXPECT_EQ(cached(j["usage"]), 3) << j.dump();

  std::vector<std::string> events =
      Events("/v1/completions", {{"model", "m"},
                                 {"prompt", text},
                                 {"stream", true},
                                 {"stream_options", {{"include_usage", true}}}});
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(cached(json::parse(events[events.size() - 2])["usage"]), 2);

  const json chat = {{"model", "m"}, {"messages", {{{"role", "user"}, {"content", "hi"}}}}};
  json c = Post("/v1/chat/completions", chat);
  EXPECT_EQ(cached(c["usage"]), 2) << c.dump();
  json cn = chat;
  cn["n"] = 2;
  c = Post("/v1/chat/completions", cn);
  EXPECT_EQ(cached(c["usage"]), 3) << c.dump();

  json anth = {{"model", "m"},
               {"max_tokens", 16},
               {"messages", {{{"role", "user"}, {"content", "hi"}}}}};
  json m = Post("/v1/messages", anth);
  const int prompt = gateway_->worker().requests().back().prompt_ids_size();
  EXPECT_EQ(m["usage"]["cache_read_input_tokens"], 2) << m.dump();
  EXPECT_EQ(m["usage"]["input_tokens"], prompt - 2) << m.dump();
  anth["stream"] = true;
  events = Events("/v1/messages", anth);
  ASSERT_FALSE(events.empty());
  const json start = json::parse(events.front());
  ASSERT_EQ(start["type"], "message_start") << events.front();
  EXPECT_EQ(start["message"]["usage"]["cache_read_input_tokens"], 2) << events.front();
  EXPECT_EQ(start["message"]["usage"]["input_tokens"], prompt - 2) << events.front();
  bool delta_seen = false;
  for (const std::string& e : events) {
    const json d = json::parse(e);
    if (d["type"] != "message_delta") continue;
    delta_seen = true;
    EXPECT_EQ(d["usage"]["cache_read_input_tokens"], 2) << e;
    EXPECT_EQ(d["usage"]["input_tokens"], prompt - 2) << e;
  }
  EXPECT_TRUE(delta_seen);
}

}  // namespace expertmesh::gateway
