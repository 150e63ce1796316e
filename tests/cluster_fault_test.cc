// Fault tolerance of the cluster data path (issue 8, Must show), with real binaries on loopback
// and the golden tiny-a checkpoint. While streams run: an expert worker joins (the placement
// version grows and it receives tokens) and one leaves with SIGTERM; with two replicas an expert
// worker is SIGKILLed; without replicas and with a pinned placement a SIGKILL ends only the
// requests that need the lost expert, each with UNAVAILABLE naming it; the router is killed and
// restarted. In every case each stream that completes gives exactly the tokens the single-process
// engine gives that request alone (the undisturbed run), so a fault can end a request but never
// change its answer.
//
// Timing: the experts answer with --inject-delay-ms so that steps are slow enough for the events
// to land while streams run. Nothing asserts a duration; waits poll with generous timeouts.
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "cli/local_cluster.h"
#include "core/engine/engine.h"
#include "core/model/model.h"
#include "core/model/moe.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/testing/child_process.h"
#include "tests/testing/cluster_requests.h"
#include "tests/testing/prom_text.h"

namespace expertmesh {
namespace {

namespace v1 = expertmesh::v1;

const std::string kModel = std::string(EM_SHARED_DIR) + "/golden/tiny-a";
const std::string kExpertWorker =
    std::string(EM_BINARY_DIR) + "/expert-worker/expertmesh-expert-worker";

// Every stream's RPC deadline: far above what a stream needs on a loaded machine, so that only
// a hang reaches it.
constexpr absl::Duration kStreamDeadline = absl::Seconds(90);
// Upper bound of every wait for a cluster event (join, drain, re-placement, restart).
constexpr absl::Duration kEventTimeout = absl::Seconds(40);

using testing::WaitUntil;

double MetricSum(int metrics_port, const std::string& name) {
  auto r = testing::HttpRequest(metrics_port, "GET", "/metrics");
  if (!r.ok()) return -1;
  auto parsed = testing::ParsePromText(r->body);
  if (!parsed.ok()) return -1;
  double v = 0;
  for (const auto& s : parsed->Find(name)) v += s.value;
  return v;
}

// Dispatches of an attention worker that did not end `ok` (errors, timeouts, broken streams).
double FailedDispatches(int metrics_port) {
  const std::string name = "expertmesh_attention_expert_dispatches_total";
  auto r = testing::HttpRequest(metrics_port, "GET", "/metrics");
  if (!r.ok()) return -1;
  auto parsed = testing::ParsePromText(r->body);
  if (!parsed.ok()) return -1;
  double v = 0;
  for (const auto& s : parsed->Find(name)) {
    auto it = s.labels.find("result");
    if (it == s.labels.end() || it->second != "ok") v += s.value;
  }
  return v;
}

using testing::GetPlacement;

// Worker id of `address` in `table`, 0 if it is not listed.
uint64_t WorkerIdOf(const v1::PlacementTable& table, const std::string& address) {
  for (const auto& [id, addr] : table.worker_addresses()) {
    if (addr == address) return id;
  }
  return 0;
}

// How many (layer, expert) pairs `worker_id` hosts in `table`.
int ExpertsOn(const v1::PlacementTable& table, uint64_t worker_id) {
  int n = 0;
  for (const auto& e : table.experts()) {
    for (uint64_t w : e.worker_ids()) n += w == worker_id ? 1 : 0;
  }
  return n;
}

using Req = testing::GenRequest;

std::vector<Req> MakeRequests(int count, uint64_t seed, int min_prompt, int max_prompt,
                              int min_new, int max_new) {
  testing::GenRequestSpec spec;
  spec.min_prompt = min_prompt;
  spec.max_prompt = max_prompt;
  spec.min_new = min_new;
  spec.max_new = max_new;
  spec.salt = seed;
  return testing::MakeGenRequests(count, spec);
}

// The undisturbed run of each request: the single-process engine, one request at a time.
std::vector<std::vector<int32_t>> Reference(model::Model& m, const std::vector<Req>& reqs) {
  std::vector<std::vector<int32_t>> want;
  for (const Req& r : reqs) {
    auto g = testing::EngineTokens(m, r);
    EXPECT_TRUE(g.ok()) << g.status();
    want.push_back(g.ok() ? *g : std::vector<int32_t>{});
  }
  return want;
}

struct StreamResult {
  std::vector<int32_t> tokens;
  grpc::StatusCode code = grpc::StatusCode::OK;
  std::string error;
  absl::Duration elapsed;
};

// Runs one Generate stream per request, each in its own thread.
class Streams {
 public:
  Streams(const std::string& attention_worker, const std::vector<Req>& reqs,
          const std::string& id_prefix)
      : stub_(v1::AttentionWorker::NewStub(
            grpc::CreateChannel(attention_worker, grpc::InsecureChannelCredentials()))),
        results_(reqs.size()),
        started_(reqs.size()) {
    for (size_t i = 0; i < reqs.size(); ++i) {
      threads_.emplace_back([this, &reqs, i, id_prefix] { Run(reqs[i], id_prefix, i); });
    }
  }
  ~Streams() { Join(); }

  void Join() {
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }
  int finished() const { return finished_.load(); }
  bool all_finished() const { return finished_.load() == static_cast<int>(results_.size()); }
  // Streams that have received at least one token.
  int streaming() const {
    int n = 0;
    for (const auto& s : started_) n += s.load() ? 1 : 0;
    return n;
  }
  // Valid after Join.
  const std::vector<StreamResult>& results() const { return results_; }

 private:
  void Run(const Req& r, const std::string& prefix, size_t i) {
    v1::SequenceRequest req;
    req.set_sequence_id(prefix + "-" + std::to_string(i));
    for (int32_t t : r.prompt) req.add_prompt_ids(static_cast<uint32_t>(t));
    auto* sp = req.mutable_sampling();
    sp->set_temperature(static_cast<float>(r.sampling.temperature));
    sp->set_top_p(static_cast<float>(r.sampling.top_p));
    sp->set_top_k(static_cast<uint32_t>(r.sampling.top_k));
    sp->set_seed(r.sampling.seed);
    sp->set_max_new_tokens(static_cast<uint32_t>(r.max_new));
    const absl::Time start = absl::Now();
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(start + kStreamDeadline));
    auto reader = stub_->Generate(&ctx, req);
    v1::SequenceTokens msg;
    StreamResult& out = results_[i];
    while (reader->Read(&msg)) {
      for (uint32_t t : msg.token_ids()) out.tokens.push_back(static_cast<int32_t>(t));
      if (!out.tokens.empty()) started_[i] = true;
    }
    grpc::Status st = reader->Finish();
    out.code = st.error_code();
    out.error = st.error_message();
    out.elapsed = absl::Now() - start;
    ++finished_;
  }

  std::unique_ptr<v1::AttentionWorker::Stub> stub_;
  std::vector<StreamResult> results_;
  std::vector<std::atomic<bool>> started_;
  std::atomic<int> finished_{0};
  std::vector<std::thread> threads_;
};

// Every stream completed and equals its undisturbed run.
void ExpectAllExact(const std::vector<StreamResult>& got,
                    const std::vector<std::vector<int32_t>>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].code, grpc::StatusCode::OK) << what << " request " << i << ": " << got[i].error;
    EXPECT_EQ(got[i].tokens, want[i]) << what << " request " << i;
  }
}

std::string Describe(const std::vector<StreamResult>& got) {
  std::string s;
  for (size_t i = 0; i < got.size(); ++i) {
    absl::StrAppend(&s, "  ", i, ": code ", static_cast<int>(got[i].code), " tokens ",
                    got[i].tokens.size(), " in ", absl::FormatDuration(got[i].elapsed), " ",
                    got[i].error, "\n");
  }
  return s;
}

class ClusterFaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = model::Model::Load(kModel);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    dir_ = testing::MakeTempDir("em-fault");
  }
  void TearDown() override {
    if (cluster_) cluster_->Stop();
    extra_.clear();
    std::system(("rm -rf '" + dir_ + "'").c_str());
  }

  cli::LocalClusterOptions BaseOptions() const {
    cli::LocalClusterOptions o = cli::SmallClusterOptions(kModel, 1, 2);
    o.bin_dir = EM_BINARY_DIR;
    // Short enough that a lost worker is re-placed within a test, long enough (heartbeats every
    // second) that a loaded machine does not expire a healthy one.
    o.lease_ms = 3000;
    // A drain must be able to wait for the attention worker to move on, even when slow.
    o.expert_drain_timeout_ms = 30000;
    o.extra_attention_worker_args = {"--expert-deadline-ms=5000", "--expert-retries=3"};
    o.extra_expert_worker_args = {"--inject-delay-ms=15"};
    return o;
  }

  void Start(const cli::LocalClusterOptions& o) {
    auto c = cli::LocalCluster::Start(o);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = std::move(*c);
    // Streams only make sense once the first table covers every expert.
    ASSERT_TRUE(WaitUntil(
        [&] {
          auto t = GetPlacement(cluster_->router_address());
          return t.ok() && t->version() > 0 && t->unplaced_size() == 0 && t->experts_size() > 0;
        },
        kEventTimeout))
        << "no complete placement table";
  }

  std::string attention() const { return cluster_->attention_worker_addresses().at(0); }
  uint64_t Version() const {
    auto t = GetPlacement(cluster_->router_address());
    return t.ok() ? t->version() : 0;
  }

  // Waits until at least `n` of the streams have produced a token (so that the next event lands
  // mid-stream); fails if they all end first.
  void WaitStreaming(const Streams& s, int n) {
    ASSERT_TRUE(WaitUntil([&] { return s.streaming() >= n || s.all_finished(); }, kEventTimeout));
    ASSERT_FALSE(s.all_finished()) << "streams ended before the event; make them longer";
  }

  // Starts one more expert worker outside the LocalCluster, registered with its router.
  std::unique_ptr<testing::ChildProcess> SpawnExpertWorker(const std::string& name,
                                                           testing::ReadyPorts* ports) {
    const std::string ready = dir_ + "/" + name + ".ready";
    std::vector<std::string> argv = {kExpertWorker,
                                     "--log-level=warning",
                                     "--model=" + kModel,
                                     "--router=" + cluster_->router_address(),
                                     "--drain-timeout-ms=30000",
                                     "--inject-delay-ms=15",
                                     "--listen=127.0.0.1:0",
                                     "--metrics-listen=127.0.0.1:0",
                                     "--ready-file=" + ready};
    auto child = testing::ChildProcess::Start(argv, dir_ + "/" + name + ".log");
    EXPECT_TRUE(child.ok()) << child.status();
    if (!child.ok()) return nullptr;
    auto p = testing::WaitForReadyFile(ready, child->get(), absl::Seconds(60));
    EXPECT_TRUE(p.ok()) << p.status();
    if (!p.ok()) return nullptr;
    *ports = *p;
    return std::move(*child);
  }

  std::unique_ptr<model::Model> model_;
  std::unique_ptr<cli::LocalCluster> cluster_;
  std::vector<std::unique_ptr<testing::ChildProcess>> extra_;
  std::string dir_;
};

// (a) A worker joins mid-stream: a new version places experts on it and it computes tokens.
// (b) A worker leaves with SIGTERM: it keeps serving until the attention worker moved to a
// version without it, then exits by itself. No stream notices either.
TEST_F(ClusterFaultTest, ExpertWorkerJoinsAndLeavesDuringStreams) {
  ASSERT_NO_FATAL_FAILURE(Start(BaseOptions()));
  const std::vector<Req> reqs = MakeRequests(16, 777, 3, 20, 60, 90);
  const auto want = Reference(*model_, reqs);
  const uint64_t v0 = Version();
  ASSERT_GT(v0, 0u);

  Streams streams(attention(), reqs, "join-leave");
  ASSERT_NO_FATAL_FAILURE(WaitStreaming(streams, 8));

  // (a) Join.
  testing::ReadyPorts ports;
  auto joined = SpawnExpertWorker("expert-worker-joined", &ports);
  ASSERT_NE(joined, nullptr);
  const std::string joined_address = "127.0.0.1:" + std::to_string(ports.grpc);
  uint64_t v_join = 0;
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto t = GetPlacement(cluster_->router_address());
        if (!t.ok()) return false;
        const uint64_t id = WorkerIdOf(*t, joined_address);
        if (id == 0 || ExpertsOn(*t, id) == 0) return false;
        v_join = t->version();
        return true;
      },
      kEventTimeout))
      << "the joining worker got no experts";
  EXPECT_GT(v_join, v0);
  // It computes tokens for the running streams (or, if they all ended first, for new ones).
  auto joined_tokens = [&] {
    return MetricSum(ports.metrics, "expertmesh_expert_tokens_total");
  };
  WaitUntil([&] { return joined_tokens() > 0 || streams.all_finished(); }, kEventTimeout);
  const bool joined_mid_stream = joined_tokens() > 0;

  // (b) Leave: SIGTERM expert-worker-0 while streams still run.
  const cli::ClusterMember* leaver = cluster_->Find("expert-worker-0");
  ASSERT_NE(leaver, nullptr);
  const std::string leaver_address = leaver->grpc_address(cluster_->options().host);
  const bool leave_mid_stream = !streams.all_finished();
  ASSERT_EQ(kill(leaver->pid, SIGTERM), 0);
  uint64_t v_leave = 0;
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto t = GetPlacement(cluster_->router_address());
        if (!t.ok() || t->unplaced_size() > 0) return false;
        const uint64_t id = WorkerIdOf(*t, leaver_address);
        if (id != 0 && ExpertsOn(*t, id) > 0) return false;
        v_leave = t->version();
        return true;
      },
      kEventTimeout))
      << "no version without the leaving worker";
  EXPECT_GT(v_leave, v_join);
  // It drains and exits by itself (not killed by a timeout: the drain timeout is 30 s).
  std::optional<cli::ClusterMember> exited;
  ASSERT_TRUE(WaitUntil(
      [&] {
        if (!exited) exited = cluster_->ReapExited();
        return exited.has_value();
      },
      kEventTimeout))
      << "the SIGTERMed expert worker did not exit";
  EXPECT_EQ(exited->name, "expert-worker-0");
  EXPECT_TRUE(WIFEXITED(exited->wait_status) && WEXITSTATUS(exited->wait_status) == 0)
      << "wait status " << exited->wait_status;

  streams.Join();
  SCOPED_TRACE(Describe(streams.results()));
  ExpectAllExact(streams.results(), want, "join/leave");
  // Not one dispatch failed: the joining worker answered as soon as it was published, and the
  // leaving one until the attention worker no longer used it.
  EXPECT_EQ(FailedDispatches(cluster_->Find("attention-worker-0")->metrics_port), 0);
  EXPECT_TRUE(leave_mid_stream) << "the streams ended before the leave; make them longer";

  // New requests after both events still equal their undisturbed runs, and the joined worker
  // computes (if it had not yet during the first streams).
  const std::vector<Req> after = MakeRequests(6, 4242, 3, 12, 6, 12);
  const auto want_after = Reference(*model_, after);
  Streams streams_after(attention(), after, "after-leave");
  streams_after.Join();
  ExpectAllExact(streams_after.results(), want_after, "after leave");
  EXPECT_GT(joined_tokens(), 0) << "the joined worker never computed a token";
  EXPECT_GT(MetricSum(ports.metrics, "expertmesh_expert_dispatches_total"), 0);
  std::printf("join/leave: versions %llu -> %llu (join) -> %llu (leave); joined worker computed "
              "mid-stream: %s\n",
              static_cast<unsigned long long>(v0), static_cast<unsigned long long>(v_join),
              static_cast<unsigned long long>(v_leave), joined_mid_stream ? "yes" : "no");
  joined->Signal(SIGTERM);
  joined->WaitForExit(absl::Seconds(30));
}

// With two replicas of every expert, a SIGKILLed expert worker costs no request: dispatches
// to it are retried on the other replica, and every output stays exact.
TEST_F(ClusterFaultTest, ReplicaTakesOverWhenAnExpertWorkerIsKilled) {
  cli::LocalClusterOptions o = BaseOptions();
  o.expert_replicas = 2;
  ASSERT_NO_FATAL_FAILURE(Start(o));
  {
    auto t = GetPlacement(cluster_->router_address());
    ASSERT_TRUE(t.ok()) << t.status();
    for (const auto& e : t->experts()) {
      ASSERT_EQ(e.worker_ids_size(), 2) << "layer " << e.layer() << " expert " << e.expert();
    }
  }
  const std::vector<Req> reqs = MakeRequests(16, 99, 3, 20, 40, 70);
  const auto want = Reference(*model_, reqs);
  const uint64_t v0 = Version();

  Streams streams(attention(), reqs, "replica-kill");
  ASSERT_NO_FATAL_FAILURE(WaitStreaming(streams, 8));
  const cli::ClusterMember* victim = cluster_->Find("expert-worker-1");
  ASSERT_NE(victim, nullptr);
  // The victim serves its share before it dies (the attention worker prefers either replica).
  ASSERT_TRUE(WaitUntil(
      [&] { return MetricSum(victim->metrics_port, "expertmesh_expert_dispatches_total") > 0; },
      kEventTimeout))
      << "the victim never served a dispatch";
  const bool mid_stream = !streams.all_finished();
  ASSERT_EQ(kill(victim->pid, SIGKILL), 0);
  // The lease runs out and the router publishes a version without the victim.
  const std::string victim_address = victim->grpc_address(cluster_->options().host);
  EXPECT_TRUE(WaitUntil(
      [&] {
        auto t = GetPlacement(cluster_->router_address());
        return t.ok() && t->version() > v0 && WorkerIdOf(*t, victim_address) == 0;
      },
      kEventTimeout))
      << "the router kept the killed worker";
  streams.Join();
  SCOPED_TRACE(Describe(streams.results()));
  ExpectAllExact(streams.results(), want, "replica kill");
  EXPECT_TRUE(mid_stream);
  // Its dispatches in flight or next were re-sent to the other replica.
  const double retries = MetricSum(cluster_->Find("attention-worker-0")->metrics_port,
                                   "expertmesh_attention_expert_dispatch_retries_total");
  EXPECT_GT(retries, 0);
  std::printf("replica kill: attention worker retries %g\n", retries);
}

// A hung expert worker (SIGSTOP: the connection stays open, nothing answers) costs no request
// either: its dispatches run into --expert-deadline-ms and are re-sent to the other replica.
TEST_F(ClusterFaultTest, ReplicaTakesOverWhenAnExpertWorkerHangs) {
  cli::LocalClusterOptions o = BaseOptions();
  o.expert_replicas = 2;
  o.extra_attention_worker_args = {"--expert-deadline-ms=1500", "--expert-retries=3"};
  ASSERT_NO_FATAL_FAILURE(Start(o));
  const std::vector<Req> reqs = MakeRequests(16, 4711, 3, 20, 30, 50);
  const auto want = Reference(*model_, reqs);
  Streams streams(attention(), reqs, "replica-hang");
  ASSERT_NO_FATAL_FAILURE(WaitStreaming(streams, 8));
  const cli::ClusterMember* victim = cluster_->Find("expert-worker-0");
  ASSERT_NE(victim, nullptr);
  ASSERT_TRUE(WaitUntil(
      [&] { return MetricSum(victim->metrics_port, "expertmesh_expert_dispatches_total") > 0; },
      kEventTimeout))
      << "the victim never served a dispatch";
  const bool mid_stream = !streams.all_finished();
  ASSERT_EQ(kill(victim->pid, SIGSTOP), 0);
  streams.Join();
  // Wake it only to end it: a stopped process would hold the cluster's orderly stop.
  kill(victim->pid, SIGKILL);
  SCOPED_TRACE(Describe(streams.results()));
  ExpectAllExact(streams.results(), want, "replica hang");
  EXPECT_TRUE(mid_stream);
  const int attn_metrics = cluster_->Find("attention-worker-0")->metrics_port;
  const double retries =
      MetricSum(attn_metrics, "expertmesh_attention_expert_dispatch_retries_total");
  EXPECT_GT(retries, 0);
  std::printf("replica hang: attention worker retries %g\n", retries);
}

// Which routed (layer, expert) pairs a request needs over its whole generation, found by running
// the single-process engine with every routed expert computed through a recording executor.
class RecordingExecutor : public model::ExpertExecutor {
 public:
  explicit RecordingExecutor(const model::Model& full) : full_(full) {}
  absl::Status Run(int block, int expert, const float* x, int64_t n, const float* token_weights,
                   float* out) override {
    const int L = full_.config().num_hidden_layers;
    const model::MoeWeights& moe = block < L ? full_.weights().layers[block].moe
                                             : full_.weights().mtp[block - L].block.moe;
    used_.insert({block, expert});
    model::RunExpert(*moe.experts[expert], full_.config().swiglu_limit, x, n, token_weights, out);
    return absl::OkStatus();
  }
  std::set<std::pair<int, int>> Take() { return std::exchange(used_, {}); }

 private:
  const model::Model& full_;
  std::set<std::pair<int, int>> used_;
};

// Without replicas, with a pinned placement that puts one expert alone on one worker: its
// SIGKILL ends exactly the requests that need that expert (UNAVAILABLE naming it, well within
// the stream deadline), the others finish exact, and once the router re-placed the expert new
// requests work again.
class ClusterFaultPinnedTest : public ClusterFaultTest {
 protected:
  // Loses the worker of the pinned victim expert by `sig` (SIGKILL: connections refused;
  // SIGSTOP: a hang that only the dispatch deadline ends) while 16 streams run.
  void LoseTheVictimsWorker(int sig);
};

TEST_F(ClusterFaultPinnedTest, KillWithoutReplicaEndsOnlyTheAffectedRequests) {
  LoseTheVictimsWorker(SIGKILL);
}

// The same with a hung worker (SIGSTOP): the affected requests end at the dispatch deadline,
// and the others wait for it but go on exact.
TEST_F(ClusterFaultPinnedTest, HangWithoutReplicaEndsOnlyTheAffectedRequests) {
  LoseTheVictimsWorker(SIGSTOP);
}

void ClusterFaultPinnedTest::LoseTheVictimsWorker(int sig) {
  const int L = model_->config().num_hidden_layers;
  const int E = model_->config().n_routed_experts;
  // Candidates: short prompts and modest lengths, so that some of them never route to a given
  // expert.
  const std::vector<Req> pool = MakeRequests(48, 31337, 2, 6, 25, 40);
  const auto pool_want = Reference(*model_, pool);
  model::LoadOptions lo;
  lo.load_expert = [](int, int) { return false; };
  auto bare = model::Model::Load(kModel, lo);
  ASSERT_TRUE(bare.ok()) << bare.status();
  RecordingExecutor recorder(*model_);
  (*bare)->set_expert_executor(&recorder);
  std::vector<std::set<std::pair<int, int>>> uses;
  for (size_t i = 0; i < pool.size(); ++i) {
    auto g = engine::Generate(**bare, pool[i].prompt, pool[i].max_new, pool[i].sampling);
    ASSERT_TRUE(g.ok()) << g.status();
    ASSERT_EQ(g->ids, pool_want[i]) << "remote experts changed request " << i;
    uses.push_back(recorder.Take());
  }
  // The victim expert: the one that splits the pool most evenly into requests that need it and
  // requests that never do.
  std::pair<int, int> victim{-1, -1};
  int best = -1;
  for (int l = 0; l < L; ++l) {
    for (int e = 0; e < E; ++e) {
      int users = 0;
      for (const auto& u : uses) users += u.count({l, e}) ? 1 : 0;
      const int score = std::min(users, static_cast<int>(pool.size()) - users);
      if (score > best) best = score, victim = {l, e};
    }
  }
  std::printf("victim: layer %d expert %d; %d of %zu requests on the smaller side\n",
              victim.first, victim.second, best, pool.size());
  ASSERT_GE(best, 4) << "no expert splits the candidate requests";
  std::vector<Req> reqs;
  std::vector<std::vector<int32_t>> want;
  std::vector<bool> affected;
  int n_affected = 0, n_unaffected = 0;
  for (size_t i = 0; i < pool.size() && reqs.size() < 16; ++i) {
    const bool a = uses[i].count(victim) > 0;
    if ((a ? n_affected : n_unaffected) >= 8) continue;
    (a ? n_affected : n_unaffected)++;
    reqs.push_back(pool[i]);
    want.push_back(pool_want[i]);
    affected.push_back(a);
  }

  // Pin every expert to the first expert worker, the victim alone to the second.
  std::string entries;
  for (int l = 0; l <= L; ++l) {  // L: the MTP block
    std::vector<int> es;
    for (int e = 0; e < E; ++e) {
      if (std::make_pair(l, e) != victim) es.push_back(e);
    }
    absl::StrAppend(&entries, entries.empty() ? "" : ",\n", "{\"layer\": ", l,
                    ", \"experts\": [", absl::StrJoin(es, ","), "], \"workers\": [0]}");
  }
  absl::StrAppend(&entries, ",\n{\"layer\": ", victim.first, ", \"expert\": ", victim.second,
                  ", \"workers\": [1]}");
  const std::string pin = dir_ + "/placement.json";
  std::ofstream(pin) << "{\"placement\": [\n" << entries << "\n]}\n";
  cli::LocalClusterOptions o = BaseOptions();
  o.extra_router_args = {"--placement-file=" + pin};
  if (sig == SIGKILL) {
    o.lease_ms = 2000;
    o.extra_attention_worker_args = {"--expert-deadline-ms=3000", "--expert-retries=2"};
  } else {
    // A hang is noticed only by the dispatch deadline; the lease is longer so that the
    // deadline, not the router's re-placement, decides the affected requests.
    o.lease_ms = 8000;
    o.extra_attention_worker_args = {"--expert-deadline-ms=2500", "--expert-retries=2"};
  }
  // Slow steps: the affected requests need the victim again after it died.
  o.extra_expert_worker_args = {"--inject-delay-ms=30"};
  ASSERT_NO_FATAL_FAILURE(Start(o));
  auto t0 = GetPlacement(cluster_->router_address());
  ASSERT_TRUE(t0.ok()) << t0.status();
  // The pinned worker of the victim, found through the table (ordinals follow registration).
  uint64_t victim_worker = 0;
  for (const auto& e : t0->experts()) {
    if (static_cast<int>(e.layer()) == victim.first &&
        static_cast<int>(e.expert()) == victim.second) {
      ASSERT_EQ(e.worker_ids_size(), 1);
      victim_worker = e.worker_ids(0);
    }
  }
  ASSERT_NE(victim_worker, 0u);
  ASSERT_EQ(ExpertsOn(*t0, victim_worker), 1) << "the pin did not isolate the victim";
  const std::string victim_address = t0->worker_addresses().at(victim_worker);
  const cli::ClusterMember* victim_member = nullptr;
  for (const auto& m : cluster_->members()) {
    if (m.grpc_address(cluster_->options().host) == victim_address) victim_member = &m;
  }
  ASSERT_NE(victim_member, nullptr) << victim_address;

  Streams streams(attention(), reqs, "pinned-kill");
  ASSERT_NO_FATAL_FAILURE(WaitStreaming(streams, 12));
  ASSERT_EQ(kill(victim_member->pid, sig), 0);
  const absl::Time killed_at = absl::Now();
  streams.Join();
  // A stopped worker is ended now: it would hold the cluster's orderly stop.
  if (sig != SIGKILL) kill(victim_member->pid, SIGKILL);
  const auto& got = streams.results();
  SCOPED_TRACE(Describe(got));
  const std::string named = absl::StrCat("(layer ", victim.first, ", expert ", victim.second, ")");
  int failed = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    if (!affected[i]) {
      EXPECT_EQ(got[i].code, grpc::StatusCode::OK) << "unaffected request " << i << ": "
                                                   << got[i].error;
      EXPECT_EQ(got[i].tokens, want[i]) << "unaffected request " << i;
      continue;
    }
    // An affected request either ran its uses of the victim before the kill or after the
    // re-placement (then it is exact), or ends with a retriable error naming the expert, with
    // what it streamed before a prefix of its undisturbed run.
    if (got[i].code == grpc::StatusCode::OK) {
      EXPECT_EQ(got[i].tokens, want[i]) << "affected request " << i;
      continue;
    }
    ++failed;
    EXPECT_EQ(got[i].code, grpc::StatusCode::UNAVAILABLE) << "request " << i << ": "
                                                          << got[i].error;
    EXPECT_NE(got[i].error.find(named), std::string::npos)
        << "request " << i << ": the error does not name " << named << ": " << got[i].error;
    ASSERT_LE(got[i].tokens.size(), want[i].size());
    EXPECT_TRUE(std::equal(got[i].tokens.begin(), got[i].tokens.end(), want[i].begin()))
        << "request " << i << " streamed tokens of another run";
    EXPECT_LT(got[i].elapsed, kStreamDeadline);
  }
  // Requests that need the victim before the router re-places it fail: at once after a kill
  // (the connection is refused), at the dispatch deadline after a hang.
  EXPECT_GT(failed, 0) << "no affected request failed: the signal landed after they needed it";
  std::printf("pinned %s: %d of %d affected requests ended UNAVAILABLE; streams done %s after "
              "the signal\n",
              strsignal(sig), failed, n_affected, absl::FormatDuration(absl::Now() - killed_at).c_str());

  // The lease runs out, the router re-places the victim on the surviving worker, and requests
  // that need it work again.
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto t = GetPlacement(cluster_->router_address());
        if (!t.ok() || t->unplaced_size() > 0) return false;
        for (const auto& e : t->experts()) {
          if (static_cast<int>(e.layer()) == victim.first &&
              static_cast<int>(e.expert()) == victim.second) {
            return e.worker_ids_size() > 0 && e.worker_ids(0) != victim_worker;
          }
        }
        return false;
      },
      kEventTimeout))
      << "the victim expert was not re-placed";
  std::vector<Req> again;
  std::vector<std::vector<int32_t>> want_again;
  for (size_t i = 0; i < reqs.size(); ++i) {
    if (affected[i]) again.push_back(reqs[i]), want_again.push_back(want[i]);
  }
  Streams streams_again(attention(), again, "after-replace");
  streams_again.Join();
  SCOPED_TRACE(Describe(streams_again.results()));
  ExpectAllExact(streams_again.results(), want_again, "after re-placement");
}

// The router is SIGKILLed and restarted (same port, by the cluster's supervision) while
// streams run: the data path does not need it while placement does not change, so every stream
// completes exact; the restarted router rebuilds the table from the workers under a version no
// lower than before.
TEST_F(ClusterFaultTest, RouterRestartUnderLoad) {
  cli::LocalClusterOptions o = BaseOptions();
  o.restart_on_failure = true;
  o.restart_backoff = absl::Milliseconds(200);
  ASSERT_NO_FATAL_FAILURE(Start(o));
  const std::vector<Req> reqs = MakeRequests(16, 2024, 3, 20, 40, 70);
  const auto want = Reference(*model_, reqs);
  auto before = GetPlacement(cluster_->router_address());
  ASSERT_TRUE(before.ok()) << before.status();

  Streams streams(attention(), reqs, "router-restart");
  ASSERT_NO_FATAL_FAILURE(WaitStreaming(streams, 8));
  const pid_t old_pid = cluster_->Find("router")->pid;
  const bool mid_stream = !streams.all_finished();
  ASSERT_EQ(kill(old_pid, SIGKILL), 0);
  // Supervise from this thread: restarted children die with the thread that forked them.
  uint64_t seen_max = 0;
  std::vector<uint64_t> seen;
  const absl::Time deadline = absl::Now() + kEventTimeout;
  bool restarted = false, rebuilt = false;
  while (absl::Now() < deadline && !(restarted && rebuilt && streams.all_finished())) {
    absl::Status st = cluster_->Supervise();
    ASSERT_TRUE(st.ok()) << st;
    const cli::ClusterMember* r = cluster_->Find("router");
    restarted = r->restarts > 0 && r->state == cli::ClusterMember::State::kRunning;
    if (restarted) {
      auto t = GetPlacement(cluster_->router_address());
      if (t.ok() && t->version() > 0) {
        if (seen.empty() || seen.back() != t->version()) seen.push_back(t->version());
        seen_max = std::max(seen_max, t->version());
        rebuilt = t->unplaced_size() == 0 && t->experts_size() == before->experts_size();
      }
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_TRUE(restarted) << "the router was not restarted";
  ASSERT_TRUE(rebuilt) << "the restarted router did not rebuild a complete table";
  for (uint64_t v : seen) EXPECT_GE(v, before->version()) << "version went backwards";
  // The attention worker never routes with an older table than it had.
  EXPECT_GE(MetricSum(cluster_->Find("attention-worker-0")->metrics_port,
                      "expertmesh_attention_placement_version"),
            static_cast<double>(before->version()));
  streams.Join();
  SCOPED_TRACE(Describe(streams.results()));
  ExpectAllExact(streams.results(), want, "router restart");
  EXPECT_TRUE(mid_stream);

  // After the restart, new requests work too.
  const std::vector<Req> after = MakeRequests(6, 55, 3, 12, 6, 12);
  const auto want_after = Reference(*model_, after);
  Streams streams_after(attention(), after, "after-restart");
  streams_after.Join();
  ExpectAllExact(streams_after.results(), want_after, "after restart");
  std::printf("router restart: version %llu before, versions seen after: %s\n",
              static_cast<unsigned long long>(before->version()),
              absl::StrJoin(seen, ", ").c_str());
}

}  // namespace
}  // namespace expertmesh
