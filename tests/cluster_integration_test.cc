// The cluster computes the model, bit for bit (issue 8, Must show): `expertmesh score` gives
// byte-identical logits whatever the prefill split, chunking, batching, thread count or number
// of expert worker processes; and an attention worker serving 32 concurrent Generate streams
// with 2 expert workers gives each request exactly what the single-process engine gives it
// alone. Real binaries on loopback, the golden tiny-a checkpoint (small and fast).
#include <sys/wait.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_join.h"
#include "cli/local_cluster.h"
#include "core/engine/engine.h"
#include "core/model/model.h"
#include "core/model/safetensors.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/testing/child_process.h"
#include "tests/testing/cluster_requests.h"
#include "tests/testing/prom_text.h"

namespace expertmesh {
namespace {

const std::string kModel = std::string(EM_SHARED_DIR) + "/golden/tiny-a";
const std::string kInput = kModel + "/golden.safetensors";
const std::string kCli = std::string(EM_BINARY_DIR) + "/cli/expertmesh";

// Runs the CLI; returns its exit code, with its output in *out.
int RunCli(const std::vector<std::string>& args, std::string* out) {
  std::string cmd = kCli;
  for (const std::string& a : args) cmd += " '" + a + "'";
  cmd += " 2>&1";
  FILE* f = popen(cmd.c_str(), "r");
  if (f == nullptr) return -1;
  char buf[4096];
  out->clear();
  while (size_t n = fread(buf, 1, sizeof buf, f)) out->append(buf, n);
  const int st = pclose(f);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

std::string TensorBytes(const std::string& path, const std::string& name) {
  auto file = model::SafetensorsFile::Open(path);
  EXPECT_TRUE(file.ok()) << file.status();
  if (!file.ok()) return "";
  auto t = (*file)->Get(name);
  EXPECT_TRUE(t.ok()) << path << ": " << t.status();
  if (!t.ok()) return "";
  return std::string(reinterpret_cast<const char*>(t->data), t->nbytes);
}

class ScoreInvarianceTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::MakeTempDir("em-score"); }
  void TearDown() override { std::system(("rm -rf '" + dir_ + "'").c_str()); }

  // Scores the golden input with `extra` flags; returns the output path.
  std::string Score(const std::string& name, std::vector<std::string> extra) {
    const std::string out = dir_ + "/" + name + ".safetensors";
    std::vector<std::string> args = {"score", "--model", kModel, "--input", kInput, "--out", out};
    args.insert(args.end(), extra.begin(), extra.end());
    std::string log;
    const int rc = RunCli(args, &log);
    EXPECT_EQ(rc, 0) << absl::StrJoin(args, " ") << "\n" << log;
    return out;
  }

  std::string dir_;
};

TEST_F(ScoreInvarianceTest, LogitsAreByteIdenticalAcrossEveryAxis) {
  // The golden's settings: prefill 220, one piece, sequences one after another, all threads,
  // experts in this process.
  const std::string base = Score("base", {"--prefill", "220", "--mtp"});
  const std::string logits = TensorBytes(base, "logits");
  const std::string mtp = TensorBytes(base, "mtp_logits");
  ASSERT_EQ(logits.size(), size_t{2} * 300 * 1024 * 4);
  ASSERT_EQ(mtp.size(), size_t{2} * 219 * 1024 * 4);

  struct Variant {
    std::string name;
    std::vector<std::string> flags;
    bool same_prefill;  // mtp_logits are defined by the prefill: compare them too
  };
  const std::vector<Variant> variants = {
      {"prefill2", {"--prefill", "2"}, false},
      {"prefill7", {"--prefill", "7"}, false},
      {"prefill64", {"--prefill", "64"}, false},
      {"chunk1", {"--prefill", "220", "--chunk", "1", "--mtp"}, true},
      {"chunk7", {"--prefill", "220", "--chunk", "7", "--mtp"}, true},
      {"chunk64", {"--prefill", "220", "--chunk", "64", "--mtp"}, true},
      {"batch", {"--prefill", "220", "--batch-sequences", "--mtp"}, true},
      {"threads1", {"--prefill", "220", "--threads", "1", "--mtp"}, true},
      {"threads2", {"--prefill", "220", "--threads", "2", "--mtp"}, true},
      {"cluster1", {"--prefill", "220", "--cluster", "1", "--mtp"}, true},
      {"cluster3", {"--prefill", "220", "--cluster", "3", "--mtp"}, true},
      {"cluster3chunk1", {"--prefill", "220", "--cluster", "3", "--chunk", "1"}, false},
      {"cluster3chunk64", {"--prefill", "220", "--cluster", "3", "--chunk", "64", "--mtp"}, true},
  };
  for (const Variant& v : variants) {
    SCOPED_TRACE(v.name);
    const std::string out = Score(v.name, v.flags);
    EXPECT_TRUE(TensorBytes(out, "logits") == logits) << v.name << ": logits differ";
    if (v.same_prefill) {
      EXPECT_TRUE(TensorBytes(out, "mtp_logits") == mtp) << v.name << ": mtp_logits differ";
    }
  }
}

// The /metrics of one cluster member, summed over label sets.
struct ClusterMemberMetrics {
  testing::PromScrape scrape;
  double Sum(const std::string& name) const {
    double v = 0;
    for (const auto& s : scrape.Find(name)) v += s.value;
    return v;
  }
};

ClusterMemberMetrics Scrape(const cli::ClusterMember& m) {
  ClusterMemberMetrics out;
  auto r = testing::HttpRequest(m.metrics_port, "GET", "/metrics");
  EXPECT_TRUE(r.ok()) << m.name << ": " << r.status();
  if (!r.ok()) return out;
  auto parsed = testing::ParsePromText(r->body);
  EXPECT_TRUE(parsed.ok()) << m.name << ": " << parsed.status();
  if (parsed.ok()) out.scrape = std::move(*parsed);
  return out;
}

// A local cluster of a router, one attention worker and two expert workers on tiny-a.
class GenerateClusterTest : public ::testing::Test {
 protected:
  void StartCluster(std::vector<std::string> attention_args = {},
                    std::vector<std::string> expert_args = {}) {
    cli::LocalClusterOptions o = cli::SmallClusterOptions(kModel, 1, 2);
    o.bin_dir = EM_BINARY_DIR;
    o.lease_ms = 3000;
    o.extra_attention_worker_args = std::move(attention_args);
    o.extra_expert_worker_args = std::move(expert_args);
    auto c = cli::LocalCluster::Start(o);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = std::move(*c);
    auto channel = grpc::CreateChannel(cluster_->attention_worker_addresses().at(0),
                                       grpc::InsecureChannelCredentials());
    stub_ = expertmesh::v1::AttentionWorker::NewStub(channel);
  }

  std::unique_ptr<cli::LocalCluster> cluster_;
  std::unique_ptr<expertmesh::v1::AttentionWorker::Stub> stub_;
};

TEST_F(GenerateClusterTest, ConcurrentStreamsEqualTheSingleProcessEngineAlone) {
  ASSERT_NO_FATAL_FAILURE(StartCluster({"--micro-batches", "2"}));
  const std::vector<testing::GenRequest> reqs = testing::MakeGenRequests(32, 1024);

  // The reference: the single-process engine, one request at a time.
  auto m = model::Model::Load(kModel);
  ASSERT_TRUE(m.ok()) << m.status();
  std::vector<std::vector<int32_t>> want;
  for (const testing::GenRequest& r : reqs) {
    auto t = testing::EngineTokens(**m, r);
    ASSERT_TRUE(t.ok()) << t.status();
    want.push_back(*t);
  }

  std::vector<testing::GenResult> got(reqs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < reqs.size(); ++i) {
    threads.emplace_back(
        [&, i] { got[i] = testing::RunGenerate(*stub_, "req-" + std::to_string(i), reqs[i]); });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_TRUE(got[i].status.ok()) << "request " << i << ": " << got[i].status;
    EXPECT_EQ(got[i].tokens, want[i]) << "request " << i;
  }

  // One dispatch per expert worker per layer per forward pass: each expert worker's
  // dispatches never exceed passes x MoE layers, and together they cover every layer.
  const ClusterMemberMetrics attn = Scrape(*cluster_->Find("attention-worker-0"));
  const double steps = attn.Sum("expertmesh_attention_steps_total");
  EXPECT_GT(steps, 0);
  double total = 0;
  for (const char* name : {"expert-worker-0", "expert-worker-1"}) {
    const ClusterMemberMetrics em = Scrape(*cluster_->Find(name));
    const double d = em.Sum("expertmesh_expert_dispatches_total");
    // Two micro-batches per step at most, four MoE layers.
    EXPECT_LE(d, steps * 2 * 4) << name;
    total += d;
  }
  EXPECT_GE(total, steps * 4);
}

}  // namespace
}  // namespace expertmesh

namespace expertmesh {
namespace {

TEST_F(GenerateClusterTest, CancelledCallFreesTheSequenceAndErrorsNameTheField) {
  ASSERT_NO_FATAL_FAILURE(StartCluster());
  {
    expertmesh::v1::SequenceRequest req;
    req.set_sequence_id("endless");
    req.add_prompt_ids(1);
    req.add_prompt_ids(2);
    req.mutable_sampling()->set_max_new_tokens(1000000);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = stub_->Generate(&ctx, req);
    expertmesh::v1::SequenceTokens msg;
    ASSERT_TRUE(reader->Read(&msg));
    ASSERT_TRUE(reader->Read(&msg));
    ctx.TryCancel();
    while (reader->Read(&msg)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // The sequence leaves the worker's table promptly (at the next step boundary).
  bool gone = false;
  for (int i = 0; i < 100 && !gone; ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    expertmesh::v1::SequenceStatusResponse st;
    ASSERT_TRUE(stub_->GetSequenceStatus(&ctx, {}, &st).ok());
    gone = st.sequences_size() == 0;
    if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_TRUE(gone) << "the cancelled sequence is still in the table";

  // A bad request is INVALID_ARGUMENT naming the field.
  expertmesh::v1::SequenceRequest bad;
  bad.set_sequence_id("bad");
  bad.add_prompt_ids(5000);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto reader = stub_->Generate(&ctx, bad);
  expertmesh::v1::SequenceTokens msg;
  EXPECT_FALSE(reader->Read(&msg));
  grpc::Status st = reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("prompt_ids[0]"), std::string::npos) << st.error_message();
}

}  // namespace
}  // namespace expertmesh

namespace expertmesh {
namespace {

// Time between successive tokens of sequence A while sequence B decodes in the same steps:
// the step time of a two-sequence batch.
absl::StatusOr<double> TwoSequenceStepSeconds(expertmesh::v1::AttentionWorker::Stub& stub) {
  auto request = [](const std::string& id, uint32_t first) {
    expertmesh::v1::SequenceRequest r;
    r.set_sequence_id(id);
    r.add_prompt_ids(first);
    r.mutable_sampling()->set_max_new_tokens(12);
    return r;
  };
  grpc::ClientContext ca, cb;
  ca.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  cb.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  auto a = stub.Generate(&ca, request("overlap-a", 11));
  expertmesh::v1::SequenceTokens msg;
  if (!a->Read(&msg)) return absl::InternalError("A ended early");
  auto b = stub.Generate(&cb, request("overlap-b", 22));
  if (!b->Read(&msg)) return absl::InternalError("B ended early");
  // Both decode together from here; drop one token of A (it may span B's prefill step).
  if (!a->Read(&msg)) return absl::InternalError("A ended early");
  std::vector<double> gaps;
  auto last = std::chrono::steady_clock::now();
  for (int i = 0; i < 4; ++i) {
    if (!a->Read(&msg)) return absl::InternalError("A ended early");
    const auto now = std::chrono::steady_clock::now();
    gaps.push_back(std::chrono::duration<double>(now - last).count());
    last = now;
  }
  ca.TryCancel();
  cb.TryCancel();
  while (a->Read(&msg)) {
  }
  while (b->Read(&msg)) {
  }
  a->Finish();
  b->Finish();
  std::sort(gaps.begin(), gaps.end());
  return 0.5 * (gaps[1] + gaps[2]);
}

// With the experts delayed (--inject-delay-ms) and attention given a cost of its own, a step of
// two micro-batches in ping-pong costs about the larger of attention and expert time, not their
// sum: one micro-batch's attention runs while the other's experts compute.
TEST_F(GenerateClusterTest, MicroBatchesHideExpertTimeBehindAttention) {
  constexpr int kLayers = 4;      // tiny-a's MoE layers
  constexpr int kAttentionMs = 100;  // per token row and layer
  constexpr int kExpertMs = 100;     // per dispatch
  const std::vector<std::string> attention_args = {
      "--micro-batches", "2", "--inject-attention-delay-us", std::to_string(kAttentionMs * 1000)};
  // Attention time alone (experts undelayed).
  ASSERT_NO_FATAL_FAILURE(StartCluster(attention_args));
  auto attention = TwoSequenceStepSeconds(*stub_);
  ASSERT_TRUE(attention.ok()) << attention.status();
  cluster_.reset();
  ASSERT_NO_FATAL_FAILURE(
      StartCluster(attention_args, {"--inject-delay-ms", std::to_string(kExpertMs)}));
  auto both = TwoSequenceStepSeconds(*stub_);
  ASSERT_TRUE(both.ok()) << both.status();
  const double expert = kLayers * kExpertMs / 1000.0;
  const double sum = *attention + expert, larger = std::max(*attention, expert);
  std::printf("step: attention %.3f s, experts %.3f s, both %.3f s (sum %.3f, max %.3f)\n",
              *attention, expert, *both, sum, larger);
  // The injected attention cost is real: two rows, four layers.
  EXPECT_GE(*attention, 0.9 * 2 * kLayers * kAttentionMs / 1000.0);
  // Closer to the larger than to the sum.
  EXPECT_LT(*both, 0.5 * (sum + larger));
  EXPECT_GE(*both, larger * 0.95);
}

}  // namespace
}  // namespace expertmesh

namespace expertmesh {
namespace {

// --micro-batches 0 (auto, the default): once one-batch steps are seen to wait on slow experts,
// steps split into two micro-batches (two dispatches per expert worker and layer).
TEST_F(GenerateClusterTest, AutoMicroBatchingSplitsWhenExpertsAreSlow) {
  ASSERT_NO_FATAL_FAILURE(StartCluster({}, {"--inject-delay-ms", "30"}));
  const std::vector<testing::GenRequest> reqs = testing::MakeGenRequests(4, 1024, 20, 99);
  std::vector<testing::GenResult> got(reqs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < reqs.size(); ++i) {
    threads.emplace_back(
        [&, i] { got[i] = testing::RunGenerate(*stub_, "auto-" + std::to_string(i), reqs[i]); });
  }
  for (auto& t : threads) t.join();
  auto m = model::Model::Load(kModel);
  ASSERT_TRUE(m.ok()) << m.status();
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(got[i].status.ok()) << got[i].status;
    auto want = testing::EngineTokens(**m, reqs[i]);
    ASSERT_TRUE(want.ok());
    EXPECT_EQ(got[i].tokens, *want) << "request " << i;
  }
  const double steps =
      Scrape(*cluster_->Find("attention-worker-0")).Sum("expertmesh_attention_steps_total");
  double dispatches = 0;
  for (const char* name : {"expert-worker-0", "expert-worker-1"}) {
    dispatches += Scrape(*cluster_->Find(name)).Sum("expertmesh_expert_dispatches_total");
  }
  // One micro-batch: at most steps x 4 layers x 2 workers dispatches; most steps split here.
  EXPECT_GT(dispatches, 1.3 * steps * 4 * 2) << "steps " << steps << ", dispatches " << dispatches;
}

}  // namespace
}  // namespace expertmesh
