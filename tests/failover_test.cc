// Lossless failover (issue 10) end to end: a local cluster with two attention workers, an expert
// worker, the kv-store, the router and the gateway on the tiny model. A sequence resumed with
// SequenceRequest.resumed_tokens continues with the tokens it would have produced; streams whose
// attention worker is SIGKILLed or drained mid-request complete through the gateway, each equal
// byte for byte (text, finish reason, token count) to its undisturbed run; a resumed sequence
// loads the blocks its dead worker stored and recomputes only the tail; every resubmit counts in
// expertmesh_gateway_resubmits_total.
#include <signal.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cli/local_cluster.h"
#include "core/rpc/channel.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"
#include "tests/testing/prom_text.h"
#include "tests/testing/tiny_cluster.h"

namespace expertmesh {
namespace {

using nlohmann::json;

// What a client sees of one streamed chat completion, minus ids and timestamps.
struct StreamResult {
  int status = 0;
  std::string content;
  std::string reasoning;
  std::string finish_reason;
  int completion_tokens = -1;
  bool done = false;
  std::vector<std::string> errors;
  std::string body;
};

StreamResult ParseStream(const testing::HttpResponse& r) {
  StreamResult s;
  s.status = r.status;
  s.body = r.body;
  size_t pos = 0;
  while ((pos = r.body.find("data: ", pos)) != std::string::npos) {
    const size_t end = r.body.find("\n\n", pos);
    const std::string e = r.body.substr(pos + 6, end - pos - 6);
    pos = end;
    if (e == "[DONE]") {
      s.done = true;
      continue;
    }
    json j = json::parse(e, nullptr, false);
    if (j.is_discarded() || j.contains("error")) {
      s.errors.push_back(e);
      continue;
    }
    if (j.contains("usage") && j["usage"].is_object()) {
      s.completion_tokens = j["usage"]["completion_tokens"].get<int>();
    }
    if (!j.contains("choices") || j["choices"].empty()) continue;
    const json& c = j["choices"][0];
    if (c["delta"].contains("content")) s.content += c["delta"]["content"].get<std::string>();
    if (c["delta"].contains("reasoning_content")) {
      s.reasoning += c["delta"]["reasoning_content"].get<std::string>();
    }
    if (!c["finish_reason"].is_null()) s.finish_reason = c["finish_reason"];
  }
  return s;
}

// Eight requests, greedy and seeded sampling alternating, each long enough to be cut mid-way.
std::vector<json> Requests(int max_tokens) {
  std::vector<json> out;
  for (int i = 0; i < 8; ++i) {
    json r = {{"model", "tiny"},
              {"messages",
               {{{"role", "user"},
                 {"content", absl::StrCat("Tell story number ", i, " about a lighthouse.")}}}},
              {"max_tokens", max_tokens},
              {"stream", true},
              {"stream_options", {{"include_usage", true}}}};
    if (i % 2 == 0) {
      r["temperature"] = 0;
    } else {
      r["temperature"] = 0.9;
      r["top_p"] = 0.95;
      r["seed"] = 1000 + i;
    }
    out.push_back(std::move(r));
  }
  return out;
}

class FailoverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("em-failover");
    absl::StatusOr<std::string> model = testing::MakeTinyModel(dir_);
    ASSERT_TRUE(model.ok()) << model.status();
    cli::LocalClusterOptions o = testing::TinyGatewayClusterOptions(*model);
    o.attention_workers = 2;
    o.log_dir = dir_ + "/logs";
    // The kv-store's disk tier lives under run_dir: a fresh one per test, or blocks stored by an
    // earlier run would be hits here.
    o.run_dir = dir_ + "/run";
    auto c = cli::LocalCluster::Start(o);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = std::move(*c);
    for (const std::string& a : cluster_->attention_worker_addresses()) {
      stubs_.push_back(std::make_unique<v1::AttentionWorker::Stub>(rpc::MakeChannel(a)));
    }
    ASSERT_EQ(stubs_.size(), 2u);
  }
  void TearDown() override {
    stubs_.clear();
    cluster_.reset();
    std::system(("rm -rf '" + dir_ + "'").c_str());
  }

  int HttpPort() const { return cluster_->Find("gateway")->http_port; }

  // Resubmits the gateway logged (one line each), so that a test shows the failover happened.
  int GatewayResubmits() const {
    std::ifstream in(cluster_->Find("gateway")->log_path);
    int n = 0;
    for (std::string line; std::getline(in, line);) {
      if (line.find("resubmitting") != std::string::npos) ++n;
    }
    return n;
  }

  // Sum of a metric's samples on cluster member `member` (-1 when it cannot be scraped).
  double Metric(const std::string& member, const std::string& name,
                const std::map<std::string, std::string>& labels = {}) const {
    const cli::ClusterMember* m = cluster_->Find(member);
    if (m == nullptr) return -1;
    auto r = testing::HttpRequest(m->metrics_port, "GET", "/metrics");
    if (!r.ok() || r->status != 200) return -1;
    auto scrape = testing::ParsePromText(r->body);
    if (!scrape.ok()) return -1;
    double sum = 0;
    for (const auto& sample : scrape->Find(name, labels)) sum += sample.value;
    return sum;
  }
  double GatewayResubmitsMetric() const {
    return Metric("gateway", "expertmesh_gateway_resubmits_total");
  }

  StreamResult Post(const json& body) {
    auto r = testing::HttpRequest(HttpPort(), "POST", "/v1/chat/completions", body.dump(),
                                  absl::Seconds(240));
    if (!r.ok()) {
      StreamResult s;
      s.errors.push_back(r.status().ToString());
      return s;
    }
    return ParseStream(*r);
  }

  // All requests at once, one thread each.
  std::vector<StreamResult> RunConcurrently(const std::vector<json>& reqs) {
    std::vector<StreamResult> out(reqs.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < reqs.size(); ++i) {
      threads.emplace_back([&, i] { out[i] = Post(reqs[i]); });
    }
    for (auto& t : threads) t.join();
    return out;
  }

  v1::SequenceStatusResponse Status(int worker) {
    v1::SequenceStatusResponse resp;
    grpc::ClientContext ctx;
    rpc::SetTimeout(ctx, absl::Seconds(5));
    v1::SequenceStatusRequest req;
    grpc::Status s = stubs_[worker]->GetSequenceStatus(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp;
  }

  // Waits until all `n` requests run and one worker has a sequence at least `min_generated`
  // tokens in (and not finished); returns that worker and how many of its sequences are
  // mid-way, or -1 when the wait timed out.
  std::pair<int, int> WaitForMidStream(int n, uint32_t min_generated, uint32_t max_tokens) {
    const absl::Time deadline = absl::Now() + absl::Seconds(120);
    while (absl::Now() < deadline) {
      v1::SequenceStatusResponse st[2] = {Status(0), Status(1)};
      if (st[0].sequences_size() + st[1].sequences_size() == n) {
        for (int w = 0; w < 2; ++w) {
          int mid = 0;
          for (const auto& s : st[w].sequences()) {
            if (s.generated_tokens() >= min_generated && s.generated_tokens() + 8 < max_tokens &&
                s.phase() == v1::SEQUENCE_PHASE_DECODE) {
              ++mid;
            }
          }
          if (mid > 0) return {w, mid};
        }
      }
      absl::SleepFor(absl::Milliseconds(2));
    }
    return {-1, 0};
  }

  static void ExpectSame(const std::vector<StreamResult>& want,
                         const std::vector<StreamResult>& got) {
    ASSERT_EQ(want.size(), got.size());
    for (size_t i = 0; i < want.size(); ++i) {
      SCOPED_TRACE("request " + std::to_string(i));
      EXPECT_EQ(got[i].status, 200) << got[i].body;
      EXPECT_TRUE(got[i].errors.empty()) << got[i].body;
      EXPECT_TRUE(got[i].done);
      EXPECT_EQ(got[i].content, want[i].content);
      EXPECT_EQ(got[i].reasoning, want[i].reasoning);
      EXPECT_EQ(got[i].finish_reason, want[i].finish_reason);
      EXPECT_EQ(got[i].completion_tokens, want[i].completion_tokens);
    }
  }

  // The eight requests undisturbed, then again with `disturb` applied to an attention worker
  // that has streams mid-way once all of them run: every stream must complete equal to its
  // undisturbed run, the interrupted ones resubmitted (in the log and the gateway's metric).
  // Returns the disturbed worker, or -1 (the test has failed then).
  int RunDisturbed(const std::function<void(int worker)>& disturb) {
    constexpr int kMaxTokens = 128;
    const std::vector<json> reqs = Requests(kMaxTokens);
    const std::vector<StreamResult> undisturbed = RunConcurrently(reqs);
    for (const StreamResult& r : undisturbed) {
      EXPECT_EQ(r.status, 200) << r.body;
      EXPECT_TRUE(r.errors.empty()) << r.body;
      EXPECT_GT(r.completion_tokens, 0) << r.body;
    }
    if (HasFailure()) return -1;

    std::vector<StreamResult> got(reqs.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < reqs.size(); ++i) {
      threads.emplace_back([&, i] { got[i] = Post(reqs[i]); });
    }
    const auto [victim, mid] = WaitForMidStream(8, 4, kMaxTokens);
    if (victim >= 0) disturb(victim);
    for (auto& t : threads) t.join();
    EXPECT_GE(victim, 0) << "no attention worker was mid-stream with all requests running";
    if (victim < 0) return -1;
    EXPECT_GT(mid, 0);
    EXPECT_GE(GatewayResubmits(), mid);
    EXPECT_EQ(GatewayResubmitsMetric(), GatewayResubmits());
    ExpectSame(undisturbed, got);
    return victim;
  }

  std::string dir_;
  std::unique_ptr<cli::LocalCluster> cluster_;
  std::vector<std::unique_ptr<v1::AttentionWorker::Stub>> stubs_;
};

struct Direct {
  std::vector<uint32_t> tokens;
  uint64_t seed = 0;
  grpc::Status status;
};

Direct Generate(v1::AttentionWorker::Stub& stub, const v1::SequenceRequest& req) {
  Direct d;
  grpc::ClientContext ctx;
  rpc::SetTimeout(ctx, absl::Seconds(120));
  auto reader = stub.Generate(&ctx, req);
  v1::SequenceTokens msg;
  bool first = true;
  while (reader->Read(&msg)) {
    if (first) d.seed = msg.seed();
    first = false;
    for (uint32_t t : msg.token_ids()) d.tokens.push_back(t);
  }
  d.status = reader->Finish();
  return d;
}

// The claim failover rests on: prompt + the first k generated ids as resumed_tokens, the seed the
// worker reported and the budget left give exactly the remaining ids, on either worker.
TEST_F(FailoverTest, ResumedSequenceContinuesBitIdentically) {
  for (const bool sampled : {false, true}) {
    SCOPED_TRACE(sampled ? "sampled, worker-chosen seed" : "greedy");
    v1::SequenceRequest req;
    req.set_sequence_id(sampled ? "whole-s" : "whole-g");
    for (uint32_t t : {11u, 503u, 77u, 1024u, 9u, 3100u, 42u, 600u, 5u}) req.add_prompt_ids(t);
    v1::SamplingParams* sp = req.mutable_sampling();
    sp->set_max_new_tokens(40);
    if (sampled) {
      sp->set_temperature(1.0f);
      sp->set_top_p(0.9f);
    }
    Direct whole = Generate(*stubs_[0], req);
    ASSERT_TRUE(whole.status.ok()) << whole.status.error_message();
    ASSERT_EQ(whole.tokens.size(), 40u);
    for (const int k : {1, 7, 20, 39}) {
      SCOPED_TRACE("resumed after " + std::to_string(k));
      v1::SequenceRequest resumed = req;
      resumed.set_sequence_id(absl::StrCat(req.sequence_id(), "-", k));
      for (int i = 0; i < k; ++i) resumed.add_prompt_ids(whole.tokens[i]);
      resumed.set_resumed_tokens(static_cast<uint32_t>(k));
      resumed.mutable_sampling()->set_max_new_tokens(40 - k);
      resumed.mutable_sampling()->set_seed(whole.seed);
      Direct rest = Generate(*stubs_[k % 2], resumed);
      ASSERT_TRUE(rest.status.ok()) << rest.status.error_message();
      EXPECT_EQ(rest.seed, whole.seed);
      std::vector<uint32_t> want(whole.tokens.begin() + k, whole.tokens.end());
      EXPECT_EQ(rest.tokens, want);
    }
  }
  // resumed_tokens must leave at least one prompt token.
  v1::SequenceRequest bad;
  bad.set_sequence_id("bad");
  bad.add_prompt_ids(5);
  bad.set_resumed_tokens(1);
  EXPECT_EQ(Generate(*stubs_[1], bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(FailoverTest, KilledAttentionWorkerLosesNoStream) {
  RunDisturbed([&](int worker) {
    const cli::ClusterMember* m = cluster_->Find("attention-worker-" + std::to_string(worker));
    ASSERT_NE(m, nullptr);
    ASSERT_EQ(kill(m->pid, SIGKILL), 0);
  });
}

TEST_F(FailoverTest, DrainedAttentionWorkerHandsItsStreamsOver) {
  const int victim = RunDisturbed([&](int worker) {
    v1::DrainRequest req;
    req.set_grace_ms(1);
    v1::DrainResponse resp;
    grpc::ClientContext ctx;
    rpc::SetTimeout(ctx, absl::Seconds(5));
    EXPECT_TRUE(stubs_[worker]->Drain(&ctx, req, &resp).ok());
  });
  ASSERT_GE(victim, 0);
  // The drained worker handed everything over and took nothing new.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  v1::SequenceStatusResponse st = Status(victim);
  while (st.sequences_size() > 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
    st = Status(victim);
  }
  EXPECT_TRUE(st.draining());
  EXPECT_EQ(st.sequences_size(), 0);
}

// The bound on recomputation: a sequence whose attention worker is SIGKILLed after its
// decode crossed a 128-token boundary resumes on the other worker from the blocks the dead one
// stored, computing fewer than 128 + (tokens since its last stored block) of prefill; the stream
// still equals the undisturbed run.
TEST_F(FailoverTest, ResumedSequenceRecomputesOnlyTheTail) {
  // Greedy, a prompt of ~20 tokens (under one block: admission loads nothing) and a budget that
  // runs well past the first boundary, so the kill lands mid-decode after it. The tiny model's
  // random weights do not end early (its EOS is one id in ~129K).
  constexpr int kMaxTokens = 300;
  const json req = {{"model", "tiny"},
                    {"messages",
                     {{{"role", "user"},
                       {"content",
                        "Write a long poem about the sea, one line after another, and never "
                        "stop."}}}},
                    {"max_tokens", kMaxTokens},
                    {"temperature", 0},
                    {"stream", true},
                    {"stream_options", {{"include_usage", true}}}};
  const std::string names[2] = {"attention-worker-0", "attention-worker-1"};
  const std::map<std::string, std::string> stored = {{"result", "stored"}};
  double prefill0[2], hit0[2], query0[2], puts0[2];
  for (int w = 0; w < 2; ++w) {
    prefill0[w] = Metric(names[w], "expertmesh_attention_prefill_tokens_total");
    hit0[w] = Metric(names[w], "expertmesh_attention_prefix_cache_hit_tokens_total");
    query0[w] = Metric(names[w], "expertmesh_attention_prefix_cache_query_tokens_total");
    puts0[w] = Metric(names[w], "expertmesh_attention_kv_block_puts_total", stored);
    ASSERT_GE(prefill0[w], 0);
    ASSERT_GE(hit0[w], 0);
    ASSERT_GE(query0[w], 0);
    ASSERT_GE(puts0[w], 0);
  }
  const double resubmits0 = GatewayResubmitsMetric();

  StreamResult got;
  std::atomic<bool> client_done{false};
  std::thread client([&] {
    got = Post(req);
    client_done = true;
  });
  // Wait for the sequence to be decoding past its first block boundary with that block in the
  // kv-store (the put is asynchronous), far enough from its end that the kill interrupts it.
  int victim = -1;
  uint32_t prompt_tokens = 0, generated = 0;
  double stored_blocks = 0;
  std::string why = "the sequence never reached the state to kill it in";
  const absl::Time deadline = absl::Now() + absl::Seconds(120);
  while (victim < 0 && !client_done && absl::Now() < deadline) {
    for (int w = 0; w < 2 && victim < 0; ++w) {
      const v1::SequenceStatusResponse status = Status(w);
      for (const auto& st : status.sequences()) {
        if (st.phase() != v1::SEQUENCE_PHASE_DECODE) continue;
        prompt_tokens = st.prompt_tokens();
        generated = st.generated_tokens();
        // The last generated token is not fed yet: fed = prompt + generated - 1.
        if (prompt_tokens + generated < 130) continue;
        if (generated + 16 >= kMaxTokens) {
          why = "the sequence was too close to its end when its block was stored";
          break;
        }
        stored_blocks = Metric(names[w], "expertmesh_attention_kv_block_puts_total", stored) -
                        puts0[w];
        if (stored_blocks < 1 ||
            Metric(names[w], "expertmesh_attention_kv_put_queue_blocks") != 0) {
          continue;
        }
        victim = w;
      }
    }
    if (victim < 0) absl::SleepFor(absl::Milliseconds(2));
  }
  if (victim >= 0) {
    const cli::ClusterMember* m = cluster_->Find(names[victim]);
    ASSERT_NE(m, nullptr);
    ASSERT_EQ(kill(m->pid, SIGKILL), 0);
  }
  client.join();
  ASSERT_GE(victim, 0) << why;
  ASSERT_LT(prompt_tokens, 128u) << "the first block must complete during decode";
  EXPECT_GE(GatewayResubmitsMetric() - resubmits0, 1);
  EXPECT_EQ(GatewayResubmitsMetric(), GatewayResubmits());

  const int survivor = 1 - victim;
  const double prefill =
      Metric(names[survivor], "expertmesh_attention_prefill_tokens_total") - prefill0[survivor];
  const double hit =
      Metric(names[survivor], "expertmesh_attention_prefix_cache_hit_tokens_total") -
      hit0[survivor];
  const double query =
      Metric(names[survivor], "expertmesh_attention_prefix_cache_query_tokens_total") -
      query0[survivor];
  // The resubmitted prompt: the original one plus every token streamed before the kill.
  EXPECT_GE(query, prompt_tokens + generated);
  EXPECT_EQ(prefill + hit, query);
  // Everything the dead worker stored is loaded (later blocks, stored between the metric read and
  // the kill, only add to it).
  EXPECT_GE(hit, 128 * stored_blocks);
  const double since_last_stored = query - 128 * stored_blocks;
  EXPECT_LT(prefill, 128 + since_last_stored)
      << "prompt " << prompt_tokens << ", generated before the kill " << generated
      << ", blocks stored " << stored_blocks << ", resumed prompt " << query << ", hit " << hit;

  // The undisturbed run, afterwards: its ~20-token prompt loads nothing, so it is computed whole.
  const StreamResult undisturbed = Post(req);
  ASSERT_EQ(undisturbed.status, 200) << undisturbed.body;
  EXPECT_GT(undisturbed.completion_tokens, static_cast<int>(generated));
  ExpectSame({undisturbed}, {got});
}

}  // namespace
}  // namespace expertmesh
