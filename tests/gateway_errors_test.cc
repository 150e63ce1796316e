// The gateway's refusals end to end (issue 9): the real expertmesh-gateway binary with API keys
// (--api-key, --api-keys-file, --max-concurrent-per-key 1) in front of the scripted attention
// worker (tests/testing/scripted_attention_worker.h, real gRPC), over raw HTTP. A table of bad
// fields over both APIs (400 naming the field), unknown model, bad key (401 in both shapes),
// over the key's limit (429 with Retry-After), oversized body, malformed JSON, wrong method,
// unknown route, a client that hangs up mid-stream (its sequence is freed on the worker and its
// key slot comes back), the keys file reloaded on SIGHUP, and the tenant reaching the worker.
// Then the limit and the hang-up once more on a real local cluster (real attention worker), with
// the key flags passed the way `expertmesh up` passes them.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "cli/local_cluster.h"
#include "core/rpc/channel.h"
#include "core/tokenizer/tokenizer.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"
#include "tests/testing/model_config_json.h"
#include "tests/testing/scripted_attention_worker.h"
#include "tests/testing/tiny_cluster.h"

namespace expertmesh {
namespace {

using nlohmann::json;

const std::string kGateway = std::string(EM_BINARY_DIR) + "/gateway/expertmesh-gateway";

struct Reply {
  int status = 0;
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased
  std::string body;
  json Json() const {
    json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
    EXPECT_FALSE(j.is_discarded()) << body;
    return j;
  }
  std::string Header(const std::string& name) const {
    for (const auto& [k, v] : headers) {
      if (k == name) return v;
    }
    return "";
  }
};

int Connect(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  timeval tv{30, 0};  // a hung gateway fails the test instead of hanging it
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

std::string RawRequest(const std::string& method, const std::string& target,
                       const std::vector<std::string>& headers, const std::string& body) {
  std::string req = method + " " + target + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n";
  for (const std::string& h : headers) req += h + "\r\n";
  if (!body.empty() || method == "POST") {
    req += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
           "\r\n";
  }
  return req + "\r\n" + body;
}

bool WriteAll(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    // MSG_NOSIGNAL: a server that refuses a body and closes must not kill the test (SIGPIPE).
    ssize_t n = send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// Status line, headers and the (de-chunked) body of a whole response read until EOF.
Reply Parse(const std::string& raw) {
  Reply r;
  const size_t head_end = raw.find("\r\n\r\n");
  if (head_end == std::string::npos || raw.compare(0, 9, "HTTP/1.1 ") != 0) return r;
  r.status = std::atoi(raw.c_str() + 9);
  size_t pos = raw.find("\r\n") + 2;
  while (pos < head_end) {
    size_t eol = raw.find("\r\n", pos);
    std::string line = raw.substr(pos, eol - pos);
    size_t colon = line.find(':');
    std::string name = line.substr(0, colon);
    for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    size_t v = colon + 1;
    while (v < line.size() && line[v] == ' ') ++v;
    r.headers.emplace_back(name, line.substr(v));
    pos = eol + 2;
  }
  std::string body = raw.substr(head_end + 4);
  if (r.Header("transfer-encoding") == "chunked") {
    std::string out;
    size_t p = 0;
    while (p < body.size()) {
      size_t eol = body.find("\r\n", p);
      if (eol == std::string::npos) break;
      size_t len = std::stoul(body.substr(p, eol - p), nullptr, 16);
      if (len == 0) break;
      out += body.substr(eol + 2, len);
      p = eol + 2 + len + 2;
    }
    body = out;
  }
  r.body = body;
  return r;
}

Reply Send(int port, const std::string& method, const std::string& target,
           const std::vector<std::string>& headers, const std::string& body) {
  int fd = Connect(port);
  EXPECT_GE(fd, 0);
  if (fd < 0) return {};
  // A refused oversized body may close the socket before all of it is written; the answer is
  // still there to read.
  WriteAll(fd, RawRequest(method, target, headers, body));
  std::string raw;
  char buf[16384];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) raw.append(buf, static_cast<size_t>(n));
  close(fd);
  return Parse(raw);
}

class GatewayErrorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("em-gateway-errors");
    const std::string model = dir_ + "/tiny";
    ASSERT_EQ(std::system(("mkdir -p '" + model + "'").c_str()), 0);
    std::ofstream(model + "/config.json") << testing::SmallModelConfigJson(2, 0, 4);
    keys_file_ = dir_ + "/keys";
    std::ofstream(keys_file_) << "# test keys\nsk-file team-file\n\nsk-other\n";

    auto tok = tokenizer::LoadDefaultTokenizer();
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = std::move(*tok);
    // Plain text ids (no control tokens): what the worker answers, one id per message.
    const std::vector<int32_t> hello = tokenizer_->Encode(" and so on");
    ASSERT_FALSE(hello.empty());
    testing::ScriptedWorkerOptions o;
    o.script = [hello](const v1::SequenceRequest&) {
      testing::ScriptedReply r;
      for (int i = 0; i < 50; ++i) {
        for (int32_t id : hello) r.token_ids.push_back(static_cast<uint32_t>(id));
      }
      r.finish = v1::FINISH_REASON_LENGTH;
      return r;
    };
    // After its first id a sequence waits until the test opens the gate (a stream held open).
    o.gate = [this](const testing::GatePoint&) { return open_.load(); };
    o.gate_timeout = absl::Seconds(60);
    auto w = testing::ScriptedAttentionWorker::Start(std::move(o));
    ASSERT_TRUE(w.ok()) << w.status();
    worker_ = std::move(*w);

    auto child = testing::ChildProcess::Start(
        {kGateway, "--model=" + model, "--attention-worker=" + worker_->address(),
         "--register=false", "--http-port=0", "--listen=127.0.0.1:0",
         "--metrics-listen=127.0.0.1:0", "--ready-file=" + dir_ + "/gateway.ready",
         "--log-level=info", "--api-key=sk-fixed:team-fixed", "--api-keys-file=" + keys_file_,
         "--max-concurrent-per-key=1"},
        dir_ + "/gateway.log");
    ASSERT_TRUE(child.ok()) << child.status();
    gateway_ = std::move(*child);
    auto ports = testing::WaitForReadyFile(dir_ + "/gateway.ready", gateway_.get(),
                                           absl::Seconds(60));
    ASSERT_TRUE(ports.ok()) << ports.status();
    port_ = ports->http;
  }

  void TearDown() override {
    open_ = true;
    if (worker_ != nullptr) worker_->Notify();
    gateway_.reset();
    worker_.reset();
    std::system(("rm -rf '" + dir_ + "'").c_str());
  }

  Reply Post(const std::string& path, const json& body, const std::string& key = "sk-fixed",
             bool bearer = true) {
    std::vector<std::string> headers;
    if (!key.empty()) {
      headers.push_back(bearer ? "Authorization: Bearer " + key : "x-api-key: " + key);
    }
    return Send(port_, "POST", path, headers, body.dump());
  }

  static json Chat(int max_tokens = 4, bool stream = false) {
    return {{"model", "tiny"},
            {"messages", {{{"role", "user"}, {"content", "Hi"}}}},
            {"max_tokens", max_tokens},
            {"stream", stream}};
  }
  static json Message(int max_tokens = 4, bool stream = false) {
    return {{"model", "tiny"},
            {"messages", {{{"role", "user"}, {"content", "Hi"}}}},
            {"max_tokens", max_tokens},
            {"stream", stream}};
  }

  // A streamed chat request on its own connection, read until the chunk of its first token
  // (after the role chunk) arrives; the sequence is then running on the worker, held at the
  // gate. Returns the socket.
  int OpenStream(const json& body, const std::string& key) {
    int fd = Connect(port_);
    EXPECT_GE(fd, 0);
    EXPECT_TRUE(WriteAll(
        fd, RawRequest("POST", "/v1/chat/completions", {"x-api-key: " + key}, body.dump())));
    std::string got;
    char buf[4096];
    auto chunks = [&got] {
      size_t n = 0;
      for (size_t p = got.find("chat.completion.chunk"); p != std::string::npos;
           p = got.find("chat.completion.chunk", p + 1)) {
        ++n;
      }
      return n;
    };
    while (chunks() < 2) {
      ssize_t n = read(fd, buf, sizeof buf);
      if (n <= 0) {
        ADD_FAILURE() << "stream ended early: " << got;
        break;
      }
      got.append(buf, static_cast<size_t>(n));
    }
    return fd;
  }

  std::string dir_, keys_file_;
  std::unique_ptr<tokenizer::Tokenizer> tokenizer_;
  std::atomic<bool> open_{false};
  std::unique_ptr<testing::ScriptedAttentionWorker> worker_;
  std::unique_ptr<testing::ChildProcess> gateway_;
  int port_ = 0;
};

TEST_F(GatewayErrorsTest, EachInvalidFieldIs400NamingIt) {
  struct Case {
    std::string path;  // /v1/chat/completions or /v1/messages
    std::string field;
    json value;  // null = remove the field
  };
  const std::string kChat = "/v1/chat/completions", kMsg = "/v1/messages";
  const std::vector<Case> cases = {
      {kChat, "messages", nullptr},
      {kChat, "messages", json::array()},
      {kChat, "messages[0].role", json::array({{{"role", "wizard"}, {"content", "x"}}})},
      {kChat, "max_tokens", 0},
      {kChat, "temperature", 5},
      {kChat, "top_p", 0},
      {kChat, "top_k", -1},
      {kChat, "stop", json::array({"a", "b", "c", "d", "e"})},
      {kChat, "tools", "not a list"},
      {kChat, "stream_options", {{"include_usage", true}}},  // without stream
      {kChat, "seed", "seven"},
      {kChat, "n", 0},
      {kMsg, "max_tokens", nullptr},
      {kMsg, "messages[0].role", json::array({{{"role", "wizard"}, {"content", "x"}}})},
      {kMsg, "temperature", 1.5},
      {kMsg, "top_p", 2},
      {kMsg, "stop_sequences", "not a list"},
      {kMsg, "messages[0].content[0]",
       json::array({{{"role", "user"},
                     {"content", {{{"type", "image"}, {"source", {{"type", "base64"}}}}}}}})},
      {kMsg, "system", 42},
  };
  for (const Case& c : cases) {
    const bool anthropic = c.path == kMsg;
    json body = anthropic ? Message() : Chat();
    // The field's top-level name (messages[0].role is set through `messages`).
    std::string top = c.field.substr(0, c.field.find_first_of(".["));
    if (c.value.is_null()) {
      body.erase(top);
    } else {
      body[top] = c.value;
    }
    Reply r = Post(c.path, body);
    SCOPED_TRACE(c.path + " " + c.field + " = " + c.value.dump());
    EXPECT_EQ(r.status, 400) << r.body;
    json j = r.Json();
    if (anthropic) {
      EXPECT_EQ(j["type"], "error");
      EXPECT_EQ(j["error"]["type"], "invalid_request_error");
      EXPECT_EQ(j["error"]["message"].get<std::string>().rfind(c.field, 0), 0u) << r.body;
    } else {
      EXPECT_EQ(j["error"]["type"], "invalid_request_error");
      ASSERT_TRUE(j["error"]["param"].is_string()) << r.body;
      EXPECT_EQ(j["error"]["param"].get<std::string>().rfind(c.field, 0), 0u) << r.body;
    }
  }
  EXPECT_EQ(worker_->generate_calls(), 0u) << "a refused request reached the worker";
}

TEST_F(GatewayErrorsTest, ModelRouteMethodBodyAndJsonErrors) {
  json body = Chat();
  body["model"] = "no-such-model";
  Reply r = Post("/v1/chat/completions", body);
  EXPECT_EQ(r.status, 404) << r.body;
  EXPECT_EQ(r.Json()["error"]["code"], "model_not_found");
  body = Message();
  body["model"] = "no-such-model";
  r = Post("/v1/messages", body);
  EXPECT_EQ(r.status, 404) << r.body;
  EXPECT_EQ(r.Json()["error"]["type"], "not_found_error");

  r = Send(port_, "POST", "/v1/chat/completions", {"x-api-key: sk-fixed"}, "{\"model\": ");
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_EQ(r.Json()["error"]["type"], "invalid_request_error");
  r = Send(port_, "POST", "/v1/messages", {"x-api-key: sk-fixed"}, "[1, 2");
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_EQ(r.Json()["type"], "error");

  r = Send(port_, "GET", "/v1/chat/completions", {"x-api-key: sk-fixed"}, "");
  EXPECT_EQ(r.status, 405) << r.body;
  r = Send(port_, "GET", "/v1/messages", {"x-api-key: sk-fixed"}, "");
  EXPECT_EQ(r.status, 405) << r.body;
  EXPECT_EQ(r.Json()["type"], "error");
  r = Send(port_, "POST", "/health", {}, "{}");
  EXPECT_EQ(r.status, 405) << r.body;
  r = Send(port_, "GET", "/v1/no/such/route", {"x-api-key: sk-fixed"}, "");
  EXPECT_EQ(r.status, 404) << r.body;
  r = Send(port_, "GET", "/nothing-here", {}, "");
  EXPECT_EQ(r.status, 404) << r.body;

  // 9 MiB: over the 8 MiB body limit.
  std::string big = "{\"model\": \"tiny\", \"pad\": \"" + std::string(9 << 20, 'x') + "\"}";
  r = Send(port_, "POST", "/v1/chat/completions", {"x-api-key: sk-fixed"}, big);
  EXPECT_EQ(r.status, 413) << r.body.substr(0, 200);
  EXPECT_EQ(worker_->generate_calls(), 0u);
}

TEST_F(GatewayErrorsTest, MissingOrWrongKeyIs401InEachApisShape) {
  for (const std::string& key : {std::string(), std::string("sk-wrong")}) {
    SCOPED_TRACE("key '" + key + "'");
    Reply r = Post("/v1/chat/completions", Chat(), key);
    EXPECT_EQ(r.status, 401) << r.body;
    json j = r.Json();
    EXPECT_EQ(j["error"]["code"], "invalid_api_key");
    EXPECT_TRUE(j["error"]["type"] == "invalid_request_error" ||
                j["error"]["type"] == "authentication_error")
        << r.body;
    r = Post("/v1/messages", Message(), key, /*bearer=*/false);
    EXPECT_EQ(r.status, 401) << r.body;
    j = r.Json();
    EXPECT_EQ(j["type"], "error");
    EXPECT_EQ(j["error"]["type"], "authentication_error");
    std::vector<std::string> headers;
    if (!key.empty()) headers.push_back("x-api-key: " + key);
    r = Send(port_, "GET", "/v1/models", headers, "");
    EXPECT_EQ(r.status, 401) << r.body;
    if (!key.empty()) {
      EXPECT_EQ(r.body.find(key), std::string::npos) << "the key is echoed";
    }
  }
  // Health stays open; a good key passes either header.
  EXPECT_EQ(Send(port_, "GET", "/health", {}, "").status, 200);
  EXPECT_EQ(Send(port_, "GET", "/v1/models", {"Authorization: Bearer sk-file"}, "").status, 200);
  EXPECT_EQ(Send(port_, "GET", "/v1/models", {"x-api-key: sk-other"}, "").status, 200);
  EXPECT_EQ(worker_->generate_calls(), 0u);
  EXPECT_EQ(gateway_->Log().find("sk-wrong"), std::string::npos) << "the key reached the log";
}

TEST_F(GatewayErrorsTest, OverTheKeysLimitIs429AndAHangUpFreesSequenceAndSlot) {
  int held = OpenStream(Chat(2000, true), "sk-fixed");
  ASSERT_EQ(worker_->WaitForActive(1, absl::Seconds(10)), 1);
  Reply r = Post("/v1/chat/completions", Chat(), "sk-fixed");
  EXPECT_EQ(r.status, 429) << r.body;
  EXPECT_EQ(r.Header("retry-after"), "1");
  EXPECT_EQ(r.Json()["error"]["code"], "rate_limit_exceeded");
  r = Post("/v1/messages", Message(), "sk-fixed", /*bearer=*/false);
  EXPECT_EQ(r.status, 429) << r.body;
  EXPECT_EQ(r.Header("retry-after"), "1");
  EXPECT_EQ(r.Json()["error"]["type"], "rate_limit_error");
  // Another key has its own slot; a request that takes no slot is not limited.
  open_ = true;
  worker_->Notify();
  r = Post("/v1/messages", Message(), "sk-file", /*bearer=*/false);
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(Send(port_, "GET", "/v1/models", {"x-api-key: sk-fixed"}, "").status, 200);
  open_ = false;

  // The held client hangs up: its sequence ends on the worker and the key's slot comes back.
  close(held);
  EXPECT_EQ(worker_->WaitForActive(0, absl::Seconds(30)), 0) << "the sequence outlived its client";
  open_ = true;
  worker_->Notify();
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  int status = Post("/v1/chat/completions", Chat(), "sk-fixed").status;
  while (status == 429 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(50));
    status = Post("/v1/chat/completions", Chat(), "sk-fixed").status;
  }
  EXPECT_EQ(status, 200) << "the slot was not given back";
}

TEST_F(GatewayErrorsTest, KeysFileIsReloadedOnSighupAndTheTenantReachesTheWorker) {
  open_ = true;
  Reply r = Post("/v1/messages", Message(), "sk-file", /*bearer=*/false);
  ASSERT_EQ(r.status, 200) << r.body;
  r = Post("/v1/messages", Message(), "sk-fixed");
  ASSERT_EQ(r.status, 200) << r.body;
  r = Post("/v1/chat/completions", Chat(), "sk-other");
  ASSERT_EQ(r.status, 200) << r.body;
  std::vector<v1::SequenceRequest> seen = worker_->requests();
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[0].tenant(), "team-file");
  EXPECT_EQ(seen[1].tenant(), "team-fixed");
  // A key without a tenant gets its fingerprint, never the key itself.
  EXPECT_FALSE(seen[2].tenant().empty());
  EXPECT_EQ(seen[2].tenant().find("sk-other"), std::string::npos);

  {
    std::ofstream f(keys_file_ + ".new");
    f << "sk-new team-new\n";
  }
  ASSERT_EQ(std::rename((keys_file_ + ".new").c_str(), keys_file_.c_str()), 0);
  gateway_->Signal(SIGHUP);
  // The reload happens on the gateway's signal thread: wait for the new key to be taken.
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (Post("/v1/messages", Message(), "sk-new").status == 401 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(Post("/v1/messages", Message(), "sk-new").status, 200);
  EXPECT_EQ(Post("/v1/messages", Message(), "sk-file").status, 401);
  EXPECT_EQ(Post("/v1/messages", Message(), "sk-fixed").status, 200);  // flags stay
  EXPECT_EQ(worker_->requests().back().tenant(), "team-fixed");

  // A broken file on the next SIGHUP keeps the keys in use and says why in the log.
  std::ofstream(keys_file_, std::ios::trunc) << "sk-a b c\n";
  gateway_->Signal(SIGHUP);
  const absl::Time logged = absl::Now() + absl::Seconds(20);
  while (gateway_->Log().find(keys_file_ + ":1:") == std::string::npos && absl::Now() < logged) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_NE(gateway_->Log().find(keys_file_ + ":1:"), std::string::npos) << gateway_->Log();
  EXPECT_EQ(Post("/v1/messages", Message(), "sk-new").status, 200);
  EXPECT_FALSE(gateway_->exited());
  EXPECT_TRUE(testing::ProcessAlive(gateway_->pid()));
}

// The same limit and hang-up against a real cluster started the way `expertmesh up` starts it
// (LocalCluster, key flags passed to its gateway): the real attention worker frees the sequence.
TEST(GatewayKeysOnRealClusterTest, HangUpFreesTheSequenceAndTheKeysSlot) {
  const std::string dir = testing::MakeTempDir("em-gateway-keys");
  auto cluster = testing::StartTinyGatewayCluster(
      dir, {"--api-key=sk-real:team-real", "--max-concurrent-per-key=1"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const int port = (*cluster)->Find("gateway")->http_port;
  v1::AttentionWorker::Stub stub(rpc::MakeChannel((*cluster)->attention_worker_addresses()[0]));
  auto active = [&]() {
    grpc::ClientContext ctx;
    rpc::SetTimeout(ctx, absl::Seconds(5));
    v1::SequenceStatusResponse resp;
    EXPECT_TRUE(stub.GetSequenceStatus(&ctx, v1::SequenceStatusRequest(), &resp).ok());
    return resp.sequences_size();
  };
  const json chat = {{"model", "tiny"},
                     {"messages", {{{"role", "user"}, {"content", "Count to a thousand."}}}},
                     {"temperature", 0}};
  json held_body = chat;
  held_body["max_tokens"] = 20000;
  held_body["stream"] = true;

  EXPECT_EQ(Send(port, "POST", "/v1/chat/completions", {}, chat.dump()).status, 401);
  int fd = Connect(port);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(WriteAll(fd, RawRequest("POST", "/v1/chat/completions",
                                      {"Authorization: Bearer sk-real"}, held_body.dump())));
  std::string got;
  char buf[4096];
  while (got.find("chat.completion.chunk") == got.rfind("chat.completion.chunk")) {
    ssize_t n = read(fd, buf, sizeof buf);
    ASSERT_GT(n, 0) << got;
    got.append(buf, static_cast<size_t>(n));
  }
  EXPECT_EQ(active(), 1);
  json small = chat;
  small["max_tokens"] = 2;
  Reply r = Send(port, "POST", "/v1/chat/completions", {"x-api-key: sk-real"}, small.dump());
  EXPECT_EQ(r.status, 429) << r.body;
  EXPECT_EQ(r.Header("retry-after"), "1");

  close(fd);
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (active() != 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(active(), 0) << "the sequence outlived its client";
  int status = 0;
  while (absl::Now() < deadline) {
    status = Send(port, "POST", "/v1/chat/completions", {"x-api-key: sk-real"}, small.dump())
                 .status;
    if (status != 429) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(status, 200) << "the key's slot was not given back";
  cluster->reset();
  std::system(("rm -rf '" + dir + "'").c_str());
}

TEST(UpKeyFlagsTest, UpHelpListsTheGatewayKeyFlags) {
  const std::string dir = testing::MakeTempDir("em-up-help");
  const std::string out = dir + "/help.txt";
  const std::string cmd =
      std::string(EM_BINARY_DIR) + "/cli/expertmesh up --help > '" + out + "' 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  std::ifstream in(out);
  std::string help((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (const char* flag :
       {"--api-key\n", "--api-keys-file\n", "--max-concurrent-per-key\n", "--model-alias\n"}) {
    EXPECT_NE(help.find(flag), std::string::npos) << flag << " missing from:\n" << help;
  }
  std::system(("rm -rf '" + dir + "'").c_str());
}

}  // namespace
}  // namespace expertmesh
