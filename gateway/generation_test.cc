// The asynchronous generation core against the scripted attention worker (a real gRPC server):
// streaming through HTTP without a thread per request, a hang-up that frees the sequence, the
// SIGTERM drain (running streams finish, late ones end with an error chunk, new requests 503),
// the generation.h contract (assistant_prefix, logprobs/thinking-budget fields, Idle), and the
// gateway metrics moving.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <future>
#include <mutex>
#include <thread>

#include "core/chat/encoder.h"
#include "core/tokenizer/tokenizer.h"
#include "gateway/generation.h"
#include "gateway/http_server.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "prometheus/text_serializer.h"
#include "tests/testing/child_process.h"
#include "tests/testing/in_process_gateway.h"
#include "tests/testing/prom_text.h"
#include "tests/testing/scripted_attention_worker.h"

namespace expertmesh::gateway {
namespace {

using nlohmann::json;

// Every test's SetUp checks that it loaded.
const tokenizer::Tokenizer& Tok() { return **testing::SharedDefaultTokenizer(); }

std::vector<uint32_t> Ids(const std::string& text, bool with_eos = true) {
  std::vector<uint32_t> out;
  for (int32_t id : Tok().Encode(text, false)) out.push_back(static_cast<uint32_t>(id));
  if (with_eos) out.push_back(static_cast<uint32_t>(*Tok().TokenToId(chat::kEos)));
  return out;
}

// The gateway in process: scripted worker, Generator (with metrics), HttpApi, one HTTP thread.
class GatewayCoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto& tok = testing::SharedDefaultTokenizer();
    ASSERT_TRUE(tok.ok()) << tok.status();
  }
  void StartGateway(testing::ScriptedWorkerOptions worker_options) {
    testing::InProcessGatewayOptions o;
    o.worker = std::move(worker_options);
    o.model.id = "m";
    o.model.context_length = 4096;
    o.metrics = true;
    auto g = testing::InProcessGateway::Start(std::move(o), &Tok());
    ASSERT_TRUE(g.ok()) << g.status();
    gateway_ = std::move(*g);
  }
  void TearDown() override { gateway_.reset(); }

  // A worker that answers " word" `words` times (no end of sentence), one id every 20 ms.
  static testing::ScriptedWorkerOptions PacedWords(int words) {
    testing::ScriptedWorkerOptions o;
    o.inter_token_interval = absl::Milliseconds(20);
    o.script = [words](const v1::SequenceRequest&) {
      testing::ScriptedReply r;
      for (int i = 0; i < words; ++i) {
        for (uint32_t id : Ids(" word", false)) r.token_ids.push_back(id);
      }
      return r;
    };
    return o;
  }

  static std::string ChatBody(bool stream) {
    return json{{"model", "m"},
                {"stream", stream},
                {"messages", json::array({{{"role", "user"}, {"content", "hi"}}})}}
        .dump();
  }

  double Metric(const std::string& name, const std::map<std::string, std::string>& labels = {}) {
    prometheus::TextSerializer serializer;
    auto scrape = testing::ParsePromText(serializer.Serialize(gateway_->registry().Collect()));
    EXPECT_TRUE(scrape.ok()) << scrape.status();
    if (!scrape.ok()) return -1;
    auto found = scrape->Find(name, labels);
    return found.empty() ? 0 : found[0].value;
  }
  // Waits (bounded) for a metric that settles just after the client saw the end of the answer.
  double MetricWhen(const std::string& name, const std::map<std::string, std::string>& labels,
                    double want) {
    const absl::Time end = absl::Now() + absl::Seconds(10);
    double v = Metric(name, labels);
    while (v != want && absl::Now() < end) {
      absl::SleepFor(absl::Milliseconds(5));
      v = Metric(name, labels);
    }
    return v;
  }

  // The concatenated `content` deltas of an OpenAI SSE body; `last` gets the last data line.
  static std::string Content(const std::string& body, std::string* last = nullptr) {
    std::string text;
    size_t pos = 0;
    while ((pos = body.find("data: ", pos)) != std::string::npos) {
      const size_t end = body.find("\n\n", pos);
      const std::string data = body.substr(pos + 6, end - pos - 6);
      if (last != nullptr) *last = data;
      pos = end;
      json j = json::parse(data, nullptr, false);
      if (j.is_discarded() || !j.contains("choices") || j["choices"].empty()) continue;
      const json& d = j["choices"][0]["delta"];
      if (d.contains("content")) text += d["content"].get<std::string>();
    }
    return text;
  }

  std::unique_ptr<testing::InProcessGateway> gateway_;
};

TEST_F(GatewayCoreTest, StreamsAnswersAndCountsThem) {
  const std::string text = "Hello there, this is a scripted answer.";
  testing::ScriptedWorkerOptions o;
  o.script = [&](const v1::SequenceRequest&) {
    testing::ScriptedReply r;
    r.token_ids = Ids(text);
    return r;
  };
  StartGateway(std::move(o));
  for (bool stream : {true, false}) {
    auto r = testing::HttpRequest(gateway_->port(), "POST", "/v1/chat/completions",
                                  ChatBody(stream));
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->status, 200) << r->body;
    if (stream) {
      std::string last;
      EXPECT_EQ(Content(r->body, &last), text);
      EXPECT_EQ(last, "[DONE]");
    } else {
      EXPECT_EQ(json::parse(r->body)["choices"][0]["message"]["content"], text);
    }
  }
  ASSERT_EQ(gateway_->worker().requests().size(), 2u);
  const double prompt = gateway_->worker().requests()[0].prompt_ids_size();
  EXPECT_EQ(MetricWhen("expertmesh_gateway_active_streams", {}, 0), 0);
  EXPECT_EQ(Metric("expertmesh_gateway_prompt_tokens_total"), 2 * prompt);
  // The end-of-sentence id each answer ended on is not generated output.
  EXPECT_EQ(Metric("expertmesh_gateway_generation_tokens_total"),
            static_cast<double>(gateway_->worker().tokens_sent() - 2));
  EXPECT_EQ(Metric("expertmesh_gateway_time_to_first_token_seconds_count"), 2);
  EXPECT_EQ(Metric("expertmesh_gateway_time_per_output_token_seconds_count"), 2);
  EXPECT_EQ(Metric("expertmesh_gateway_request_duration_seconds_count"), 2);
  EXPECT_EQ(Metric("expertmesh_gateway_queue_seconds_count"), 2);
  EXPECT_EQ(MetricWhen("expertmesh_gateway_http_requests_total",
                       {{"route", "/v1/chat/completions"}, {"code", "200"}}, 2),
            2);
  EXPECT_EQ(Metric("expertmesh_gateway_client_disconnects_total"), 0);
}

// A worker that refuses admission: the deferred answer is counted under its real status (503).
TEST_F(GatewayCoreTest, RefusalIsCountedWithItsFinalStatus) {
  testing::ScriptedWorkerOptions o;
  o.script = [](const v1::SequenceRequest&) {
    testing::ScriptedReply r;
    r.fail = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "full");
    return r;
  };
  StartGateway(std::move(o));
  auto r = testing::HttpRequest(gateway_->port(), "POST", "/v1/chat/completions", ChatBody(true));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, 503) << r->body;
  EXPECT_EQ(MetricWhen("expertmesh_gateway_http_requests_total",
                       {{"route", "/v1/chat/completions"}, {"code", "503"}}, 1),
            1);
  EXPECT_EQ(Metric("expertmesh_gateway_http_requests_total",
                   {{"route", "/v1/chat/completions"}, {"code", "200"}}),
            0);
}

// Opens a streamed request on a raw socket, reads until some SSE data came, then hangs up.
void StreamThenHangUp(int port, const std::string& body) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  const std::string req = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          "application/json\r\nContent-Length: " +
                          std::to_string(body.size()) + "\r\n\r\n" + body;
  ASSERT_EQ(::send(fd, req.data(), req.size(), 0), static_cast<ssize_t>(req.size()));
  std::string got;
  char buf[4096];
  while (got.find("\"content\":\"") == std::string::npos ||
         got.find("data: ", got.find("\"content\":\"")) == std::string::npos) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    ASSERT_GT(n, 0) << got;
    got.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
}

TEST_F(GatewayCoreTest, HangUpCancelsTheSequence) {
  StartGateway(PacedWords(40));
  StreamThenHangUp(gateway_->port(), ChatBody(true));
  EXPECT_EQ(gateway_->worker().WaitForActive(0, absl::Seconds(10)), 0);
  EXPECT_EQ(gateway_->worker().cancelled_calls(), 1u);
  EXPECT_LT(gateway_->worker().tokens_sent(), 40u);
  EXPECT_EQ(MetricWhen("expertmesh_gateway_client_disconnects_total", {}, 1), 1);
  EXPECT_EQ(MetricWhen("expertmesh_gateway_active_streams", {}, 0), 0);
  gateway_->core().WaitIdle();
}

TEST_F(GatewayCoreTest, DrainLetsRunningStreamsFinish) {
  const std::string text = "A short answer that ends before the drain deadline.";
  testing::ScriptedWorkerOptions o;
  o.inter_token_interval = absl::Milliseconds(10);
  o.script = [&](const v1::SequenceRequest&) {
    testing::ScriptedReply r;
    r.token_ids = Ids(text);
    return r;
  };
  StartGateway(std::move(o));
  auto client = std::async(std::launch::async, [&] {
    return testing::HttpRequest(gateway_->port(), "POST", "/v1/chat/completions", ChatBody(true));
  });
  ASSERT_EQ(gateway_->worker().WaitForActive(1, absl::Seconds(10)), 1);
  gateway_->server().StopAccepting();
  gateway_->core().Drain(absl::Seconds(20));
  EXPECT_EQ(gateway_->core().running(), 0u);
  auto r = client.get();
  ASSERT_TRUE(r.ok()) << r.status();
  std::string last;
  EXPECT_EQ(Content(r->body, &last), text);
  EXPECT_EQ(last, "[DONE]");
  EXPECT_EQ(r->body.find("\"error\""), std::string::npos) << r->body;
  // The listener is closed: a new connection is refused.
  auto refused = testing::HttpRequest(gateway_->port(), "GET", "/health", "", absl::Seconds(2));
  EXPECT_FALSE(refused.ok());
}

TEST_F(GatewayCoreTest, DrainDeadlineEndsLateStreamsWithAnErrorAndRefusesNewOnes) {
  StartGateway(PacedWords(2000));
  auto client = std::async(std::launch::async, [&] {
    return testing::HttpRequest(gateway_->port(), "POST", "/v1/chat/completions", ChatBody(true),
                                absl::Seconds(30));
  });
  ASSERT_EQ(gateway_->worker().WaitForActive(1, absl::Seconds(10)), 1);
  auto drain = std::async(std::launch::async, [&] { gateway_->core().Drain(absl::Seconds(1)); });
  while (!gateway_->core().draining()) absl::SleepFor(absl::Milliseconds(1));
  // While draining, a new request on the still-open listener is refused with 503.
  auto late = testing::HttpRequest(gateway_->port(), "POST", "/v1/chat/completions",
                                   ChatBody(false));
  ASSERT_TRUE(late.ok()) << late.status();
  EXPECT_EQ(late->status, 503) << late->body;
  drain.get();
  EXPECT_EQ(gateway_->core().running(), 0u);
  auto r = client.get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, 200);
  std::string last;
  Content(r->body, &last);
  EXPECT_EQ(last, "[DONE]");
  EXPECT_NE(r->body.find("shutting down"), std::string::npos) << r->body;
  EXPECT_EQ(gateway_->worker().WaitForActive(0, absl::Seconds(10)), 0);
}

// A writer that keeps everything; never over its limit.
class RecordingWriter final : public ResponseWriter {
 public:
  bool Respond(HttpResponse) override { return true; }
  bool BeginStream(int, const std::string&) override { return true; }
  bool Write(std::string) override { return true; }
  void End() override {}
  size_t queued_bytes() const override { return 0; }
  bool OnDrained(std::function<void()>) override { return false; }
  bool client_gone() const override { return false; }
  void OnClientGone(std::function<void()>) override {}
};

// Records the sink calls, checking that they never overlap.
class RecordingSink final : public GenerationSink {
 public:
  struct Log {
    std::mutex mu;
    std::vector<std::string> calls;
    std::string reasoning, content;
    int idles = 0;
    int overlaps = 0;
    std::atomic<int> inside{0};
    std::promise<void> done;
  };
  explicit RecordingSink(std::shared_ptr<Log> log) : log_(std::move(log)) {}
  bool Begin(uint32_t, uint32_t) override { return Note("begin"); }
  bool Delta(const chat::StreamDelta& d) override {
    std::lock_guard<std::mutex> lock(log_->mu);
    log_->reasoning += d.reasoning_content;
    log_->content += d.content;
    return true;
  }
  bool Idle(uint32_t) override {
    std::lock_guard<std::mutex> lock(log_->mu);
    ++log_->idles;
    return true;
  }
  void Fail(const ApiError& e) override {
    Note("fail " + e.message);
    log_->done.set_value();
  }
  void Finish(const GenerationOutcome& o) override {
    Note("finish " + std::to_string(o.completion_tokens));
    log_->done.set_value();
  }

 private:
  bool Note(const std::string& what) {
    if (log_->inside.fetch_add(1) != 0) ++log_->overlaps;
    {
      std::lock_guard<std::mutex> lock(log_->mu);
      log_->calls.push_back(what);
    }
    log_->inside.fetch_sub(1);
    return true;
  }
  std::shared_ptr<Log> log_;
};

// The generation core alone against the scripted worker (model "m"), its sink recorded.
class GenerationContractTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto& tok = testing::SharedDefaultTokenizer();
    ASSERT_TRUE(tok.ok()) << tok.status();
  }
  // The scripted worker and a Generator on it.
  void StartCore(testing::ScriptedWorkerOptions o, ModelInfo model, GenerationOptions gen) {
    auto worker = testing::ScriptedAttentionWorker::Start(std::move(o));
    ASSERT_TRUE(worker.ok()) << worker.status();
    worker_ = std::move(*worker);
    model.id = "m";
    gen.attention_worker = worker_->address();
    core_ = std::make_unique<Generator>(model, &Tok(), gen);
  }
  static GenerationInput UserInput(const std::string& content) {
    GenerationInput in;
    chat::Message m;
    m.content = content;
    in.messages.push_back(m);
    return in;
  }
  // Starts `in` as sequence `seq`, writing through `writer`.
  std::shared_ptr<RecordingSink::Log> Start(GenerationInput in, const std::string& seq,
                                            std::shared_ptr<ResponseWriter> writer) {
    auto log = std::make_shared<RecordingSink::Log>();
    done_ = log->done.get_future();
    core_->Start(std::move(in), seq, std::move(writer), std::make_unique<RecordingSink>(log));
    return log;
  }
  // Waits for the generation Start began to end, and for the core to let go of it.
  void WaitDone() {
    ASSERT_EQ(done_.wait_for(std::chrono::seconds(20)), std::future_status::ready);
    core_->WaitIdle();
  }

  std::unique_ptr<testing::ScriptedAttentionWorker> worker_;
  std::unique_ptr<Generator> core_;
  std::future<void> done_;
};

TEST_F(GenerationContractTest, PrefixSamplingFieldsAndIdle) {
  const std::string answer = " and so on.</think>The answer.";
  testing::ScriptedWorkerOptions o;
  o.inter_token_interval = absl::Milliseconds(150);
  o.script = [&](const v1::SequenceRequest&) {
    testing::ScriptedReply r;
    for (int32_t id : Tok().Encode(answer, true)) r.token_ids.push_back(id);
    r.token_ids.push_back(static_cast<uint32_t>(*Tok().TokenToId(chat::kEos)));
    return r;
  };
  ModelInfo model;
  model.context_length = 4096;
  GenerationOptions gen;
  gen.idle_interval = absl::Milliseconds(20);
  ASSERT_NO_FATAL_FAILURE(StartCore(std::move(o), model, gen));

  GenerationInput in = UserInput("why?");
  in.encode.thinking_mode = chat::ThinkingMode::kThinking;
  in.assistant_prefix = "Let me think";
  in.logprobs = true;
  in.top_logprobs = 2;
  in.max_thinking_tokens = 7;
  auto lease = std::make_shared<int>(1);
  in.lease = lease;
  std::vector<int32_t> expect_ids;
  ASSERT_FALSE(core_->PromptIds(in, &expect_ids).has_value());
  auto log = Start(std::move(in), "seq-1", std::make_shared<RecordingWriter>());
  WaitDone();
  EXPECT_EQ(lease.use_count(), 1) << "the generation still holds its lease";

  ASSERT_EQ(worker_->requests().size(), 1u);
  const v1::SequenceRequest req = worker_->requests()[0];
  ASSERT_EQ(static_cast<size_t>(req.prompt_ids_size()), expect_ids.size());
  const std::vector<int32_t> prefix = Tok().Encode("Let me think", true);
  for (size_t i = 0; i < prefix.size(); ++i) {
    EXPECT_EQ(req.prompt_ids(req.prompt_ids_size() - prefix.size() + i),
              static_cast<uint32_t>(prefix[i]));
  }
  EXPECT_TRUE(req.sampling().logprobs());
  EXPECT_EQ(req.sampling().top_logprobs(), 2u);
  EXPECT_EQ(req.sampling().max_thinking_tokens(), 7u);
  EXPECT_EQ(req.sampling().end_thinking_token_id(),
            static_cast<uint32_t>(*Tok().TokenToId(chat::kThinkEnd)));

  std::lock_guard<std::mutex> lock(log->mu);
  EXPECT_EQ(log->reasoning, "Let me think and so on.");
  EXPECT_EQ(log->content, "The answer.");
  ASSERT_EQ(log->calls.size(), 2u);
  EXPECT_EQ(log->calls[0], "begin");
  // The prefix is not generated output: only the worker's ids count.
  EXPECT_EQ(log->calls[1], "finish " + std::to_string(worker_->tokens_sent() - 1));
  EXPECT_GT(log->idles, 0);
  EXPECT_EQ(log->overlaps, 0);
}

TEST_F(GenerationContractTest, ChatModeSendsNoThinkingBudget) {
  testing::ScriptedWorkerOptions o;
  o.script = [](const v1::SequenceRequest&) {
    testing::ScriptedReply r;
    r.token_ids = Ids("ok");
    return r;
  };
  ASSERT_NO_FATAL_FAILURE(StartCore(std::move(o), ModelInfo(), GenerationOptions()));
  GenerationInput in = UserInput("hi");
  in.max_thinking_tokens = 7;
  auto log = Start(std::move(in), "seq-2", std::make_shared<RecordingWriter>());
  WaitDone();
  ASSERT_EQ(worker_->requests().size(), 1u);
  EXPECT_EQ(worker_->requests()[0].sampling().max_thinking_tokens(), 0u);
  EXPECT_FALSE(worker_->requests()[0].sampling().logprobs());
  std::lock_guard<std::mutex> lock(log->mu);
  EXPECT_EQ(log->content, "ok");
}

// A writer that is always over its limit: every OnDrained keeps the callback for the test.
class FullWriter final : public ResponseWriter {
 public:
  bool Respond(HttpResponse) override { return true; }
  bool BeginStream(int, const std::string&) override { return true; }
  bool Write(std::string) override { return true; }
  void End() override {}
  size_t queued_bytes() const override { return kMaxQueuedBytes; }
  bool OnDrained(std::function<void()> callback) override {
    std::lock_guard<std::mutex> lock(mu);
    drained = std::move(callback);
    ++pauses;
    return true;
  }
  bool client_gone() const override { return false; }
  void OnClientGone(std::function<void()>) override {}
  // Runs the kept callback (as the server does once the queue went to the socket).
  bool Drain() {
    std::function<void()> cb;
    {
      std::lock_guard<std::mutex> lock(mu);
      cb = std::move(drained);
      drained = nullptr;
    }
    if (!cb) return false;
    cb();
    return true;
  }
  std::mutex mu;
  std::function<void()> drained;
  int pauses = 0;
};

// Backpressure without blocking: while the writer is over its limit the generation reads
// nothing more from the worker; each drain lets exactly one more message through.
TEST_F(GenerationContractTest, NoReadWhileTheClientQueueIsFull) {
  const std::vector<uint32_t> ids = Ids(" one two three four");
  testing::ScriptedWorkerOptions o;
  o.script = [&](const v1::SequenceRequest&) {
    testing::ScriptedReply r;
    r.token_ids = ids;
    return r;
  };
  ASSERT_NO_FATAL_FAILURE(StartCore(std::move(o), ModelInfo(), GenerationOptions()));
  auto writer = std::make_shared<FullWriter>();
  auto log = Start(UserInput("count"), "seq-bp", writer);
  // One pause after each message: the ids, the last with the finish reason.
  for (size_t step = 0; step < ids.size(); ++step) {
    // Wait for the pause after message `step`.
    const absl::Time end = absl::Now() + absl::Seconds(10);
    while (absl::Now() < end) {
      {
        std::lock_guard<std::mutex> lock(writer->mu);
        if (writer->pauses == static_cast<int>(step) + 1) break;
      }
      absl::SleepFor(absl::Milliseconds(1));
    }
    {
      std::lock_guard<std::mutex> lock(writer->mu);
      ASSERT_EQ(writer->pauses, static_cast<int>(step) + 1);
    }
    std::string before;
    {
      std::lock_guard<std::mutex> lock(log->mu);
      before = log->content;
    }
    // Paused: nothing more is read however long we wait.
    absl::SleepFor(absl::Milliseconds(30));
    {
      std::lock_guard<std::mutex> lock(log->mu);
      std::lock_guard<std::mutex> wlock(writer->mu);
      EXPECT_EQ(writer->pauses, static_cast<int>(step) + 1);
      EXPECT_EQ(log->content, before);
      EXPECT_TRUE(log->calls.empty() || log->calls.back() == "begin") << "ended while paused";
    }
    ASSERT_TRUE(writer->Drain());
  }
  WaitDone();
  std::lock_guard<std::mutex> lock(log->mu);
  EXPECT_EQ(log->content, " one two three four");
}

}  // namespace
}  // namespace expertmesh::gateway
