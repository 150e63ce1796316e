#include "gateway/messages_api.h"

#include <fstream>
#include <sstream>

#include "core/chat/encoder.h"
#include "core/tokenizer/tokenizer.h"
#include "gateway/stop_matcher.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"
#include "tests/testing/in_process_gateway.h"

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
      {"{" + base + R"(,"messages":[{"role":"system","content":"hi"}]})", "messages"},
      {"{" + base + R"(,"messages":[{"role":"user"}]})", "messages[0].content"},
      {"{" + base + R"(,"messages":[{"role":"user","content":[{"type":"image","source":{}}]}]})",
       "messages[0].content[0].type"},
      {"{" + base + R"(,"messages":[{"role":"user","content":[{"type":"tool_result"}]}]})",
       "messages[0].content[0].tool_use_id"},
      {"{" + base + R"(,"messages":[{"role":"developer","content":"hi"}]})", "messages[0].role"},
      {"{" + base + R"(,"messages":[{"role":"user","content":[{"type":"text","text":"a"},
          {"type":"tool_result","tool_use_id":"t"}]}]})",
       "messages[0].content[1].type"},
      {"{" + base + R"(,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t",
          "content":[{"type":"image","source":{}}]}]}]})",
       "messages[0].content[0].content[0].type"},
      {"{" + base + R"(,"messages":[{"role":"user","content":"a"},{"role":"assistant","content":[
          {"type":"tool_use","id":"t","name":"f"}]}]})",
       "messages[1].content[0].input"},
      {"{" + base + R"(,"messages":[{"role":"user","content":[{"type":"thinking","thinking":"x"}]}]})",
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
      {"{" + msgs + R"(,"tools":{}})", "tools"},
      {"{" + msgs + R"(,"tools":[{"type":"web_search_20250305","name":"web_search"}]})",
       "tools[0].type"},
      {"{" + msgs + R"(,"tools":[{"name":"f","input_schema":{}},{"type":"bash_20250124","name":"bash"}]})",
       "tools[1].type"},
      {"{" + msgs + R"(,"tools":[{"name":"f"}]})", "tools[0].input_schema"},
      {"{" + msgs + R"(,"tools":[{"name":"a b","input_schema":{}}]})", "tools[0].name"},
      {"{" + msgs + R"(,"tools":[{"name":"f","input_schema":{}},{"name":"f","input_schema":{}}]})",
       "tools[1].name"},
      {"{" + msgs + R"(,"tools":[{"name":"f","description":1,"input_schema":{}}]})",
       "tools[0].description"},
      {"{" + msgs + R"(,"tool_choice":"auto"})", "tool_choice.type"},
      {"{" + msgs + R"(,"tool_choice":{"type":"required"}})", "tool_choice.type"},
      {"{" + msgs + R"(,"tool_choice":{"type":"any"}})", "tool_choice"},
      {"{" + msgs + R"(,"tools":[{"name":"f","input_schema":{}}],"tool_choice":{"type":"tool","name":"g"}})",
       "tool_choice.name"},
      {"{" + msgs + R"(,"tools":[{"name":"f","input_schema":{}}],
          "tool_choice":{"type":"auto","disable_parallel_tool_use":"yes"}})",
       "tool_choice.disable_parallel_tool_use"},
      {"{" + msgs + R"(,"tools":[{"name":"f","input_schema":{}}],"tool_choice":{"type":"any"},
          "thinking":{"type":"adaptive"}})",
       "tool_choice"},
      {"{" + msgs + R"(,"thinking":{"type":"enabled"}})", "thinking.budget_tokens"},
      {"{" + msgs + R"(,"thinking":{"type":"enabled","budget_tokens":1023}})",
       "thinking.budget_tokens"},
      {R"({"model":"m","max_tokens":2048,"messages":[{"role":"user","content":"hi"}],
          "thinking":{"type":"enabled","budget_tokens":2048}})",
       "thinking.budget_tokens"},
      {"{" + msgs + R"(,"thinking":{"type":"adaptive","display":"hidden"}})", "thinking.display"},
      {"{" + msgs + R"(,"output_config":{"effort":"extreme"}})", "output_config.effort"},
      {"{" + msgs + R"(,"output_config":{"format":{"type":"json_schema","schema":{}}}})",
       "output_config.format"},
      {"{" + msgs + R"(,"context_management":{"edits":[{"type":"compact_20990101"}]}})",
       "context_management.edits[0].type"},
      {"{" + msgs + R"(,"context_management":{"edits":[{"type":"clear_thinking_20251015",
          "keep":{"type":"tool_uses","value":1}}]}})",
       "context_management.edits[0].keep"},
      {"{" + msgs + R"(,"context_management":{"edits":"all"}})", "context_management.edits"},
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
      R"({"model":"m","max_tokens":4096,"system":[{"type":"text","text":"Be terse.",
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
  EXPECT_EQ(req.input.max_tokens, 4096u);
  EXPECT_EQ(req.input.max_thinking_tokens, 2048u);
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
  testing::InProcessGatewayOptions o = testing::NoWorkerGatewayOptions();
  o.model.context_length = 4096;
  auto gateway = testing::InProcessGateway::Start(std::move(o), tok->get());
  ASSERT_TRUE(gateway.ok()) << gateway.status();
  const int port = (*gateway)->port();

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
  ASSERT_FALSE((*gateway)->core().PromptIds(in, &ids).has_value());
  EXPECT_EQ(json::parse(r->body)["input_tokens"], ids.size());
  EXPECT_GT(ids.size(), 1u);
}

// One SSE event: its name and its data.
struct Sse {
  std::string event;
  json data;
};

std::vector<Sse> ParseEvents(const std::string& text) {
  std::vector<Sse> out;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t end = text.find("\n\n", pos);
    EXPECT_NE(end, std::string::npos) << "unterminated event: " << text.substr(pos);
    if (end == std::string::npos) break;
    const std::string ev = text.substr(pos, end - pos);
    pos = end + 2;
    const size_t nl = ev.find('\n');
    EXPECT_EQ(ev.rfind("event: ", 0), 0u) << ev;
    EXPECT_EQ(ev.compare(nl + 1, 6, "data: "), 0) << ev;
    out.push_back({ev.substr(7, nl - 7), json::parse(ev.substr(nl + 7))});
    EXPECT_EQ(out.back().data["type"], out.back().event) << ev;
  }
  return out;
}

std::string ReadFixture(const std::string& name) {
  std::ifstream in(std::string(EM_SOURCE_DIR) + "/tests/fixtures/" + name);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string Prompt(const MessagesRequest& req) {
  absl::StatusOr<chat::EncodedChat> e = chat::EncodeChat(req.input.messages, req.input.encode);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? e->prompt : "";
}

chat::StreamDelta Reasoning(std::string s) {
  chat::StreamDelta d;
  d.reasoning_content = std::move(s);
  return d;
}
chat::StreamDelta Content(std::string s) {
  chat::StreamDelta d;
  d.content = std::move(s);
  return d;
}
chat::StreamDelta Call(int index, std::string id, std::string name, std::string args) {
  chat::StreamDelta d;
  d.tool_calls.push_back({index, std::move(id), std::move(name), std::move(args)});
  return d;
}

// The message a client builds from the events (what the SDKs' stream accumulators do).
json Accumulate(const std::vector<Sse>& events) {
  json msg;
  std::vector<std::string> partial;
  for (const Sse& e : events) {
    if (e.event == "message_start") {
      msg = e.data["message"];
    } else if (e.event == "content_block_start") {
      EXPECT_EQ(e.data["index"], msg["content"].size());
      msg["content"].push_back(e.data["content_block"]);
      partial.emplace_back();
    } else if (e.event == "content_block_delta") {
      json& b = msg["content"][e.data["index"].get<size_t>()];
      const json& d = e.data["delta"];
      if (d["type"] == "text_delta") {
        EXPECT_EQ(b["type"], "text");
        b["text"] = b["text"].get<std::string>() + d["text"].get<std::string>();
      } else if (d["type"] == "thinking_delta") {
        EXPECT_EQ(b["type"], "thinking");
        b["thinking"] = b["thinking"].get<std::string>() + d["thinking"].get<std::string>();
      } else if (d["type"] == "signature_delta") {
        EXPECT_EQ(b["type"], "thinking");
        b["signature"] = d["signature"];
      } else if (d["type"] == "input_json_delta") {
        EXPECT_EQ(b["type"], "tool_use");
        partial[e.data["index"].get<size_t>()] += d["partial_json"].get<std::string>();
      } else {
        ADD_FAILURE() << "unknown delta " << d;
      }
    } else if (e.event == "content_block_stop") {
      const size_t i = e.data["index"].get<size_t>();
      if (msg["content"][i]["type"] == "tool_use" && !partial[i].empty()) {
        msg["content"][i]["input"] = json::parse(partial[i]);  // must be valid JSON
      }
    } else if (e.event == "message_delta") {
      msg["stop_reason"] = e.data["delta"]["stop_reason"];
      msg["stop_sequence"] = e.data["delta"]["stop_sequence"];
      msg["usage"]["output_tokens"] = e.data["usage"]["output_tokens"];
      if (e.data.contains("context_management")) {
        msg["context_management"] = e.data["context_management"];
      }
    }
  }
  return msg;
}

TEST(AnthropicAnswerTest, StreamedEventsHaveTheApiShapeAndEqualTheWholeMessage) {
  MessagesRequest req;
  req.thinking = true;
  const std::vector<chat::StreamDelta> deltas = {
      Reasoning("Look at "), Reasoning("the file."), Content("Reading it."),
      Call(0, "call_00aa", "read_file", ""), Call(0, "", "", "{\"path\": \"/a\", "),
      Call(0, "", "", "\"limit\": 5}"), Call(1, "call_00bb", "run_shell", "{}")};
  GenerationOutcome o;
  o.prompt_tokens = 11;
  o.completion_tokens = 30;

  req.stream = true;
  AnthropicAnswer streamed(req, "msg_1", "m");
  std::string text = streamed.Start(11);
  for (const chat::StreamDelta& d : deltas) text += streamed.Delta(d);
  text += streamed.Finish(o);
  const std::vector<Sse> ev = ParseEvents(text);
  std::vector<std::string> names;
  for (const Sse& e : ev) {
    names.push_back(e.event == "content_block_delta" ? e.data["delta"]["type"].get<std::string>()
                                                     : e.event);
  }
  const std::vector<std::string> want = {
      "message_start",       "content_block_start", "thinking_delta",      "thinking_delta",
      "signature_delta",     "content_block_stop",  "content_block_start", "text_delta",
      "content_block_stop",  "content_block_start", "input_json_delta",    "input_json_delta",
      "content_block_stop",  "content_block_start", "input_json_delta",    "content_block_stop",
      "message_delta",       "message_stop"};
  EXPECT_EQ(names, want) << text;
  EXPECT_EQ(ev[0].data["message"]["usage"]["input_tokens"], 11);
  EXPECT_EQ(ev[0].data["message"]["content"], json::array());
  EXPECT_EQ(ev[0].data["message"]["stop_reason"], nullptr);
  EXPECT_EQ(ev[4].data["delta"]["signature"], ThinkingSignature("Look at the file."));
  EXPECT_EQ(ev[9].data["content_block"],
            json::parse(R"({"type":"tool_use","id":"toolu_00aa","name":"read_file","input":{}})"));
  EXPECT_EQ(ev[9].data["index"], 2);
  EXPECT_EQ(ev[13].data["content_block"]["id"], "toolu_00bb");
  EXPECT_EQ(ev[16].data["delta"]["stop_reason"], "tool_use");
  EXPECT_EQ(ev[16].data["delta"]["stop_sequence"], nullptr);
  EXPECT_EQ(ev[16].data["usage"]["output_tokens"], 30);
  EXPECT_FALSE(ev[16].data.contains("context_management"));

  req.stream = false;
  AnthropicAnswer whole(req, "msg_1", "m");
  for (const chat::StreamDelta& d : deltas) EXPECT_EQ(whole.Delta(d), "");
  const json body = json::parse(whole.Message(o));
  EXPECT_EQ(body["content"][2],
            json::parse(R"({"type":"tool_use","id":"toolu_00aa","name":"read_file",
                            "input":{"path":"/a","limit":5}})"));
  EXPECT_EQ(body["content"][3]["input"], json::object());
  EXPECT_EQ(body["content"][0]["thinking"], "Look at the file.");
  EXPECT_EQ(body["stop_reason"], "tool_use");
  EXPECT_EQ(body["usage"]["input_tokens"], 11);
  EXPECT_EQ(body["usage"]["output_tokens"], 30);
  // What a client accumulates from the stream is the whole message.
  EXPECT_EQ(Accumulate(ev), body);
}

// The kv-store hit: message_start splits the prompt when it knows the hit (Begin); one sent
// before the first token (a long wait) counts it all as input, and message_delta, which the SDKs
// take the final usage from, has the split either way.
TEST(AnthropicAnswerTest, CachedPromptTokensSplitTheInput) {
  MessagesRequest req;
  req.stream = true;
  GenerationOutcome o;
  o.prompt_tokens = 300;
  o.cached_prompt_tokens = 256;
  o.completion_tokens = 2;
  for (uint32_t known : {256u, 0u}) {
    AnthropicAnswer a(req, "msg_1", "m");
    std::string text = a.Start(300, known);
    text += a.Delta(Content("ok"));
    text += a.Finish(o);
    const std::vector<Sse> ev = ParseEvents(text);
    ASSERT_GE(ev.size(), 3u) << text;
    const json& start = ev.front().data["message"]["usage"];
    EXPECT_EQ(start["input_tokens"], 300 - known) << text;
    EXPECT_EQ(start["cache_read_input_tokens"], known) << text;
    const json& delta = ev[ev.size() - 2].data;
    ASSERT_EQ(delta["type"], "message_delta") << text;
    EXPECT_EQ(delta["usage"]["input_tokens"], 44) << text;
    EXPECT_EQ(delta["usage"]["cache_read_input_tokens"], 256) << text;
  }
  req.stream = false;
  AnthropicAnswer whole(req, "msg_1", "m");
  whole.Delta(Content("ok"));
  const json body = json::parse(whole.Message(o));
  EXPECT_EQ(body["usage"]["input_tokens"], 44);
  EXPECT_EQ(body["usage"]["cache_read_input_tokens"], 256);
}

TEST(AnthropicAnswerTest, OmittedThinkingSendsOnlyTheSignatureWhichCarriesTheReasoning) {
  MessagesRequest req;
  req.thinking = true;
  req.omit_thinking = true;
  req.stream = true;
  req.context_edits = std::vector<AppliedContextEdit>{{"clear_thinking_20251015", 2, 40}};
  AnthropicAnswer streamed(req, "msg_2", "m");
  std::string text = streamed.Start(3);
  text += streamed.Delta(Reasoning("secret plan"));
  text += streamed.Delta(Content("Done."));
  GenerationOutcome o;
  o.prompt_tokens = 3;
  const std::vector<Sse> ev = ParseEvents(text + streamed.Finish(o));
  for (const Sse& e : ev) {
    if (e.event == "content_block_delta") {
      EXPECT_NE(e.data["delta"]["type"], "thinking_delta") << e.data;
    }
  }
  req.stream = false;
  AnthropicAnswer whole(req, "msg_2", "m");
  whole.Delta(Reasoning("secret plan"));
  whole.Delta(Content("Done."));
  const json body = json::parse(whole.Message(o));
  EXPECT_EQ(body["content"][0]["thinking"], "");
  const std::string sig = body["content"][0]["signature"];
  EXPECT_EQ(ThinkingFromSignature(sig), "secret plan");
  EXPECT_EQ(body["context_management"],
            json::parse(R"({"applied_edits":[{"type":"clear_thinking_20251015",
                "cleared_thinking_turns":2,"cleared_input_tokens":40}]})"));
  EXPECT_EQ(Accumulate(ev), body);
  EXPECT_FALSE(ThinkingFromSignature("EqoBCkgIARAB").has_value());

  // Sent back with empty thinking, the signature restores the reasoning in the prompt.
  MessagesRequest back;
  ASSERT_FALSE(ParseMessagesRequest(
                   R"({"model":"m","max_tokens":8,"messages":[{"role":"user","content":"a"},
                       {"role":"assistant","content":[{"type":"thinking","thinking":"",
                        "signature":")" + sig + R"("},{"type":"text","text":"Done."}]},
                       {"role":"user","content":"b"}]})",
                   "m", false, &back)
                   .has_value());
  EXPECT_EQ(back.input.messages[1].reasoning_content, "secret plan");
}

TEST(AnthropicAnswerTest, StopReasonsAndTheAlwaysPresentTextBlock) {
  MessagesRequest req;
  req.tool_stop = std::string(ToolCallOpeningStop());
  AnthropicAnswer empty(req, "msg_3", "m");
  GenerationOutcome o;
  o.stopped_by_string = true;
  o.stop_sequence = req.tool_stop;  // tool_choice none stopped a call: the turn just ends
  json body = json::parse(empty.Message(o));
  EXPECT_EQ(body["content"], json::parse(R"([{"type":"text","text":""}])"));
  EXPECT_EQ(body["stop_reason"], "end_turn");
  EXPECT_EQ(body["stop_sequence"], nullptr);
  EXPECT_FALSE(body.contains("context_management"));

  AnthropicAnswer stopped(req, "msg_4", "m");
  stopped.Delta(Content("x"));
  o.stop_sequence = "END";
  body = json::parse(stopped.Message(o));
  EXPECT_EQ(body["stop_reason"], "stop_sequence");
  EXPECT_EQ(body["stop_sequence"], "END");

  AnthropicAnswer cut(req, "msg_5", "m");
  cut.Delta(Call(0, "call_1", "f", "{\"a\": "));
  o = GenerationOutcome();
  o.length = true;
  body = json::parse(cut.Message(o));
  EXPECT_EQ(body["stop_reason"], "max_tokens");
  EXPECT_EQ(body["content"].size(), 1u);  // a tool_use block needs no text block
  EXPECT_EQ(body["content"][0]["input"], json::object());

  EXPECT_EQ(AnthropicAnswer::Ping(), "event: ping\ndata: {\"type\":\"ping\"}\n\n");
}

TEST(MessagesRequestTest, ToolsAndToolHistoryMapToTheV4Encoding) {
  const std::string tools =
      R"("tools":[{"name":"get_weather","description":"Weather now","input_schema":{"type":"object",
          "properties":{"city":{"type":"string"}},"required":["city"]},"cache_control":{"type":"ephemeral"}},
          {"type":"custom","name":"noop","input_schema":{"type":"object"}}])";
  const std::string history =
      R"("messages":[{"role":"user","content":"Weather in Oslo and Rome?"},
          {"role":"assistant","content":[{"type":"text","text":"Checking."},
            {"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Oslo"}},
            {"type":"tool_use","id":"toolu_2","name":"get_weather","input":{"city":"Rome","days":2}}]},
          {"role":"user","content":[
            {"type":"tool_result","tool_use_id":"toolu_1","content":"rain"},
            {"type":"tool_result","tool_use_id":"toolu_2","is_error":true,
             "content":[{"type":"text","text":"no data"},{"type":"text","text":"retry later"}]},
            {"type":"text","text":"Summarize."}]}])";
  MessagesRequest req;
  std::optional<ApiError> e = ParseMessagesRequest(
      R"({"model":"m","max_tokens":64,"system":"Be brief.",)" + tools + "," + history + "}", "m",
      false, &req);
  ASSERT_FALSE(e.has_value()) << e->message;
  const auto& m = req.input.messages;
  ASSERT_EQ(m.size(), 6u);
  EXPECT_EQ(m[0].role, chat::Role::kSystem);
  ASSERT_EQ(m[0].tools.size(), 2u);
  EXPECT_EQ(m[0].tools[0].Find("function")->DumpPython(),
            R"({"name": "get_weather", "description": "Weather now", "parameters": {"type": "object", )"
            R"("properties": {"city": {"type": "string"}}, "required": ["city"]}})");
  EXPECT_EQ(m[0].tools[1].Find("function")->DumpPython(),
            R"({"name": "noop", "parameters": {"type": "object"}})");
  EXPECT_TRUE(req.has_tools);
  EXPECT_EQ(m[2].role, chat::Role::kAssistant);
  EXPECT_EQ(m[2].content, "Checking.");
  ASSERT_EQ(m[2].tool_calls.size(), 2u);
  EXPECT_EQ(m[2].tool_calls[1].id, "toolu_2");
  EXPECT_EQ(m[2].tool_calls[1].arguments, R"({"city": "Rome", "days": 2})");
  EXPECT_EQ(m[3].role, chat::Role::kTool);
  EXPECT_EQ(m[3].tool_call_id, "toolu_1");
  EXPECT_EQ(m[3].content, "rain");
  EXPECT_EQ(m[4].role, chat::Role::kTool);
  ASSERT_TRUE(m[4].parts.has_value());
  EXPECT_EQ(m[4].parts->size(), 2u);
  EXPECT_EQ(m[5].role, chat::Role::kUser);
  EXPECT_EQ(m[5].content, "Summarize.");
  EXPECT_TRUE(req.input.assistant_prefix.empty());

  // The turn as V4 renders it: the calls in DSML, the results merged into one user turn.
  const std::string prompt = Prompt(req);
  EXPECT_NE(prompt.find("Checking.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
                        "<｜DSML｜parameter name=\"city\" string=\"true\">Oslo</｜DSML｜parameter>\n"
                        "</｜DSML｜invoke>"),
            std::string::npos)
      << prompt;
  EXPECT_NE(prompt.find("<｜User｜><tool_result>rain</tool_result>\n\n<tool_result>no data\n\n"
                        "retry later</tool_result>\n\nSummarize.<｜Assistant｜></think>"),
            std::string::npos)
      << prompt;

  // tool_choice: any / tool force the DSML opening; none keeps tools out and stops a call.
  const std::string base = R"({"model":"m","max_tokens":64,)" + tools +
                           R"(,"messages":[{"role":"user","content":"hi"}],"tool_choice":)";
  MessagesRequest any;
  ASSERT_FALSE(ParseMessagesRequest(base + R"({"type":"any"}})", "m", false, &any).has_value());
  EXPECT_EQ(any.input.assistant_prefix, "\n\n<｜DSML｜tool_calls>\n");
  MessagesRequest one;
  ASSERT_FALSE(
      ParseMessagesRequest(base + R"({"type":"tool","name":"noop","disable_parallel_tool_use":true}})",
                           "m", false, &one)
          .has_value());
  EXPECT_EQ(one.input.assistant_prefix,
            "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"noop\">\n");
  MessagesRequest none;
  ASSERT_FALSE(ParseMessagesRequest(base + R"({"type":"none"}})", "m", false, &none).has_value());
  EXPECT_TRUE(none.input.assistant_prefix.empty());
  EXPECT_FALSE(none.has_tools);
  EXPECT_EQ(Prompt(none).find("get_weather"), std::string::npos);
  EXPECT_EQ(none.input.stop, std::vector<std::string>{std::string(ToolCallOpeningStop())});
  EXPECT_EQ(none.tool_stop, ToolCallOpeningStop());
}

TEST(MessagesRequestTest, ThinkingBudgetAndEffort) {
  const std::string msgs = R"("messages":[{"role":"user","content":"hi"}])";
  MessagesRequest a;
  ASSERT_FALSE(ParseMessagesRequest(
                   R"({"model":"m","max_tokens":4096,)" + msgs +
                       R"(,"thinking":{"type":"enabled","budget_tokens":1024}})",
                   "m", false, &a)
                   .has_value());
  EXPECT_EQ(a.input.max_thinking_tokens, 1024u);
  EXPECT_EQ(a.input.encode.thinking_mode, chat::ThinkingMode::kThinking);
  EXPECT_EQ(a.input.encode.reasoning_effort, chat::ReasoningEffort::kHigh);
  EXPECT_FALSE(a.omit_thinking);

  MessagesRequest b;
  ASSERT_FALSE(ParseMessagesRequest(R"({"model":"m","max_tokens":16,)" + msgs +
                                        R"(,"thinking":{"type":"adaptive","display":"omitted"},
                                         "output_config":{"effort":"max"}})",
                                    "m", false, &b)
                   .has_value());
  EXPECT_EQ(b.input.max_thinking_tokens, 0u);  // adaptive: no budget
  EXPECT_TRUE(b.omit_thinking);
  EXPECT_EQ(b.input.encode.reasoning_effort, chat::ReasoningEffort::kMax);

  // Effort without thinking leaves V4 chat mode.
  MessagesRequest c;
  ASSERT_FALSE(ParseMessagesRequest(R"({"model":"m","max_tokens":16,)" + msgs +
                                        R"(,"output_config":{"effort":"max"}})",
                                    "m", false, &c)
                   .has_value());
  EXPECT_EQ(c.input.encode.thinking_mode, chat::ThinkingMode::kChat);
  EXPECT_FALSE(c.thinking);

  // count_tokens does not need max_tokens, so the budget is only checked against 1024.
  MessagesRequest d;
  EXPECT_FALSE(ParseMessagesRequest(
                   "{\"model\":\"m\"," + msgs +
                       R"(,"thinking":{"type":"enabled","budget_tokens":50000}})",
                   "m", true, &d)
                   .has_value());
}

// A system message inside `messages` joins the user turn before it after a blank line; the
// billing line never reaches the prompt. Exact prompt bytes from the V4 encoder.
TEST(MessagesRequestTest, SystemMessagesMergeAndTheBillingLineIsDropped) {
  MessagesRequest req;
  std::optional<ApiError> e = ParseMessagesRequest(
      R"({"model":"m","max_tokens":8,"system":[
          {"type":"text","text":"x-anthropic-billing-header: cc_version=1.2.3.abc; cc_entrypoint=cli; cch=0f1e2;"},
          {"type":"text","text":"Be brief.","cache_control":{"type":"ephemeral"}}],
          "messages":[{"role":"user","content":"Fix it."},
                      {"role":"system","content":"Reminder: tests first."}]})",
      "m", false, &req);
  ASSERT_FALSE(e.has_value()) << e->message;
  EXPECT_EQ(Prompt(req),
            "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Fix it.\n\nReminder: tests first."
            "<｜Assistant｜></think>");

  // After an assistant turn and tool results: the same blank-line join inside the user turn;
  // before any turn: part of the system prompt (a billing line as a string too).
  MessagesRequest later;
  e = ParseMessagesRequest(
      R"({"model":"m","max_tokens":8,"system":"x-anthropic-billing-header: cc_version=1; cch=2;\nRules.",
          "messages":[{"role":"system","content":[{"type":"text","text":"More rules."}]},
                      {"role":"user","content":"go"},
                      {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"f","input":{}}]},
                      {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"ok"}]},
                      {"role":"system","content":"Note."}]})",
      "m", false, &later);
  ASSERT_FALSE(e.has_value()) << e->message;
  EXPECT_EQ(Prompt(later),
            "<｜begin▁of▁sentence｜>Rules.\n\nMore rules.<｜User｜>go<｜Assistant｜></think>\n\n"
            "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n\n</｜DSML｜invoke>\n"
            "</｜DSML｜tool_calls><｜end▁of▁sentence｜><｜User｜><tool_result>ok</tool_result>\n\n"
            "Note.<｜Assistant｜></think>");
}

TEST(MessagesRequestTest, ClearThinkingDropsOlderReasoningAndCountsTheTokens) {
  auto tok = tokenizer::LoadDefaultTokenizer();
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto body = [](const std::string& keep, bool tools) {
    return std::string(R"({"model":"m","max_tokens":64,"thinking":{"type":"adaptive"},)") +
           (tools ? R"("tools":[{"name":"f","input_schema":{"type":"object"}}],)" : "") +
           R"("context_management":{"edits":[{"type":"clear_thinking_20251015")" + keep +
           R"(}]},"messages":[{"role":"user","content":"a"},
           {"role":"assistant","content":[{"type":"thinking","thinking":"first idea","signature":"x"},
             {"type":"text","text":"b"}]},
           {"role":"user","content":"c"},
           {"role":"assistant","content":[{"type":"thinking","thinking":"second idea","signature":"y"},
             {"type":"text","text":"d"}]},
           {"role":"user","content":"e"}]})";
  };
  // With tools V4 keeps every turn's reasoning, so clearing the older one shortens the prompt.
  MessagesRequest req;
  ASSERT_FALSE(
      ParseMessagesRequest(body(R"(,"keep":{"type":"thinking_turns","value":1})", true), "m",
                           false, &req, tok->get())
          .has_value());
  ASSERT_TRUE(req.context_edits.has_value());
  ASSERT_EQ(req.context_edits->size(), 1u);
  EXPECT_EQ((*req.context_edits)[0].cleared_thinking_turns, 1u);
  EXPECT_GT((*req.context_edits)[0].cleared_input_tokens, 0u);
  EXPECT_EQ(req.input.messages[2].reasoning_content, "");
  EXPECT_EQ(req.input.messages[4].reasoning_content, "second idea");
  const std::string prompt = Prompt(req);
  EXPECT_EQ(prompt.find("first idea"), std::string::npos);
  EXPECT_NE(prompt.find("second idea"), std::string::npos);

  // Without tools V4 drops earlier reasoning anyway: cleared, but no prompt token removed.
  MessagesRequest plain;
  ASSERT_FALSE(ParseMessagesRequest(body("", false), "m", false, &plain, tok->get()).has_value());
  ASSERT_EQ(plain.context_edits->size(), 1u);
  EXPECT_EQ((*plain.context_edits)[0].cleared_input_tokens, 0u);

  // keep "all": nothing cleared, an empty report.
  MessagesRequest all;
  ASSERT_FALSE(
      ParseMessagesRequest(body(R"(,"keep":"all")", true), "m", false, &all, tok->get())
          .has_value());
  ASSERT_TRUE(all.context_edits.has_value());
  EXPECT_TRUE(all.context_edits->empty());
  EXPECT_EQ(all.input.messages[2].reasoning_content, "first idea");
}

// The captured shape of a coding agent's request (tests/fixtures/coding_agent_request.json):
// it parses under an alias, its billing line stays out of the prompt, count_tokens counts it,
// and it reaches generation (here: no worker, so 503).
TEST(MessagesApiTest, CodingAgentRequestWorks) {
  const std::string fixture = ReadFixture("coding_agent_request.json");
  ASSERT_GT(fixture.size(), 30000u);
  const json raw = json::parse(fixture);
  ASSERT_EQ(raw["tools"].size(), 12u);
  const std::string agent_model = raw["model"];

  MessagesRequest req;
  std::optional<ApiError> e = ParseMessagesRequest(fixture, "m", false, &req);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->status, 404);
  e = ParseMessagesRequest(fixture, ServedModel("m", {agent_model}), false, &req);
  ASSERT_FALSE(e.has_value()) << e->message;
  EXPECT_TRUE(req.stream);
  EXPECT_TRUE(req.thinking);
  EXPECT_TRUE(req.omit_thinking);
  EXPECT_EQ(req.input.max_tokens, 32000u);
  EXPECT_EQ(req.input.encode.reasoning_effort, chat::ReasoningEffort::kHigh);
  EXPECT_EQ(req.input.user, raw["metadata"]["user_id"]);
  ASSERT_TRUE(req.context_edits.has_value());
  EXPECT_TRUE(req.context_edits->empty());
  ASSERT_FALSE(req.input.messages.empty());
  EXPECT_EQ(req.input.messages[0].tools.size(), 12u);
  // The signature of the omitted thinking block brings its reasoning back.
  EXPECT_EQ(req.input.messages[2].reasoning_content, "Let me read the file first.");
  const std::string prompt = Prompt(req);
  EXPECT_EQ(prompt.find("x-anthropic-billing-header"), std::string::npos);
  EXPECT_EQ(prompt.find("cch="), std::string::npos);
  EXPECT_EQ(prompt.rfind("<｜begin▁of▁sentence｜>You are an interactive coding agent", 0), 0u);
  const std::string user_text = raw["messages"][2]["content"][1]["text"];
  const std::string reminder = raw["messages"][3]["content"];
  EXPECT_NE(prompt.find(user_text + "\n\n" + reminder + "<｜Assistant｜><think>"),
            std::string::npos);

  auto tok = tokenizer::LoadDefaultTokenizer();
  ASSERT_TRUE(tok.ok()) << tok.status();
  testing::InProcessGatewayOptions o = testing::NoWorkerGatewayOptions();
  o.model.context_length = 65536;
  o.model.aliases = {"*"};
  auto gateway = testing::InProcessGateway::Start(std::move(o), tok->get());
  ASSERT_TRUE(gateway.ok()) << gateway.status();
  const int port = (*gateway)->port();

  auto r = testing::HttpRequest(port, "POST", "/v1/messages/count_tokens?beta=true", fixture);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->status, 200) << r->body;
  std::vector<int32_t> ids;
  ASSERT_FALSE((*gateway)->core().PromptIds(req.input, &ids).has_value());
  EXPECT_EQ(json::parse(r->body)["input_tokens"], ids.size());
  EXPECT_GT(ids.size(), 5000u);

  // Parsed, encoded and tokenized, it goes to pick a worker: 503 (no router), not a 4xx.
  r = testing::HttpRequest(port, "POST", "/v1/messages?beta=true", fixture);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, 503) << r->body;
  EXPECT_EQ(json::parse(r->body)["error"]["type"], "overloaded_error") << r->body;
}

}  // namespace
}  // namespace expertmesh::gateway
