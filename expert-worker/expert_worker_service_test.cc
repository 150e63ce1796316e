// The expert worker's service in-process on loopback, on a small synthetic checkpoint: outputs
// are byte-identical to model::RunExpert on the same rows, every unservable batch gets an error
// reply without ending the stream, loads and unloads move the resident bytes, and a drain waits
// for the router before unloading.
#include "expert-worker/expert_worker_service.h"

#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <random>

#include "core/model/model_maker.h"
#include "core/model/moe.h"
#include "core/rpc/channel.h"
#include "gmock/gmock.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"

namespace expertmesh::expert_worker {
namespace {

using expertmesh::v1::DispatchRequest;
using expertmesh::v1::DispatchResponse;
using ::testing::HasSubstr;

// A small DeepSeek-V4-shaped checkpoint (FP4 experts with E8M0 scales), written once per test
// process and removed at exit. A failure to write it fails every test that asks for it.
class TestModel {
 public:
  TestModel() {
    dir_ = ::testing::TempDir() + "/em_expert_worker_model_" + std::to_string(getpid());
    std::filesystem::remove_all(dir_);
    status_ = model::WriteModelPreset("tiny-a-shape", 5, dir_);
  }
  ~TestModel() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  const std::string& dir() const { return dir_; }
  const absl::Status& status() const { return status_; }

 private:
  std::string dir_;
  absl::Status status_;
};

const TestModel& Model() {
  static TestModel model;
  return model;
}

const std::string& ModelDir() { return Model().dir(); }

double MetricValue(prometheus::Registry& registry, const std::string& name,
                   const std::map<std::string, std::string>& labels = {}) {
  for (const auto& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const auto& m : family.metric) {
      bool match = true;
      for (const auto& [k, v] : labels) {
        bool found = false;
        for (const auto& l : m.label) found |= (l.name == k && l.value == v);
        match &= found;
      }
      if (!match) continue;
      switch (family.type) {
        case prometheus::MetricType::Counter: return m.counter.value;
        case prometheus::MetricType::Gauge: return m.gauge.value;
        case prometheus::MetricType::Histogram: return static_cast<double>(m.histogram.sample_count);
        default: return -1;
      }
    }
  }
  return -1;  // absent
}

expertmesh::v1::ExpertId Id(int layer, int expert) {
  expertmesh::v1::ExpertId id;
  id.set_layer(layer);
  id.set_expert(expert);
  return id;
}

class ExpertWorkerServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(Model().status().ok()) << "cannot write the test model: " << Model().status();
    auto ckpt = model::Checkpoint::Open(ModelDir());
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    ckpt_ = std::move(*ckpt);
  }
  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now());
  }

  void Start(ExpertWorkerOptions options) {
    options.model_dir = ModelDir();
    auto s = ExpertWorkerService::Create(std::move(options), registry_);
    ASSERT_TRUE(s.ok()) << s.status();
    service_ = std::move(*s);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = expertmesh::v1::ExpertWorker::NewStub(
        rpc::MakeChannel("127.0.0.1:" + std::to_string(port)));
  }

  grpc::Status Load(const std::vector<expertmesh::v1::ExpertId>& ids, uint64_t version,
                    expertmesh::v1::LoadExpertsResponse* response) {
    grpc::ClientContext context;
    rpc::SetTimeout(context, absl::Seconds(30));
    expertmesh::v1::LoadExpertsRequest request;
    for (const auto& id : ids) *request.add_experts() = id;
    request.set_placement_version(version);
    return stub_->LoadExperts(&context, request, response);
  }

  grpc::Status Unload(const std::vector<expertmesh::v1::ExpertId>& ids,
                      expertmesh::v1::UnloadExpertsResponse* response) {
    grpc::ClientContext context;
    rpc::SetTimeout(context, absl::Seconds(10));
    expertmesh::v1::UnloadExpertsRequest request;
    for (const auto& id : ids) *request.add_experts() = id;
    return stub_->UnloadExperts(&context, request, response);
  }

  expertmesh::v1::ExpertStatusResponse Status() {
    grpc::ClientContext context;
    rpc::SetTimeout(context, absl::Seconds(10));
    expertmesh::v1::ExpertStatusResponse response;
    grpc::Status s = stub_->GetStatus(&context, {}, &response);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return response;
  }

  int64_t hidden() const { return ckpt_->config().hidden_size; }

  // n random activation rows [n, D].
  std::vector<float> Tokens(int64_t n, uint32_t seed) const {
    std::mt19937 gen(seed);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    std::vector<float> x(static_cast<size_t>(n * hidden()));
    for (float& v : x) v = dist(gen);
    return x;
  }

  static void SetTokens(DispatchRequest* r, const std::vector<float>& x, int64_t rows,
                        int64_t cols) {
    auto* t = r->mutable_tokens();
    t->set_dtype(expertmesh::v1::DTYPE_F32);
    t->add_shape(rows);
    t->add_shape(cols);
    t->set_data(std::string(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float)));
  }

  static void AddBatch(DispatchRequest* r, int expert, const std::vector<uint32_t>& rows,
                       const std::vector<float>& weights) {
    auto* b = r->add_experts();
    b->set_expert(expert);
    for (uint32_t row : rows) b->add_rows(row);
    for (float w : weights) b->add_weights(w);
  }

  // RunExpert computed here on the rows the batch names, the single process's way.
  std::vector<float> Expected(int layer, const expertmesh::v1::ExpertBatch& b,
                              const std::vector<float>& x) const {
    auto w = model::LoadExpertWeights(*ckpt_, layer, static_cast<int>(b.expert()));
    EXPECT_TRUE(w.ok()) << w.status();
    const int64_t m = b.rows_size(), d = hidden();
    std::vector<float> in(static_cast<size_t>(m * d)), out(static_cast<size_t>(m * d));
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(in.data() + i * d, x.data() + b.rows(i) * d, d * sizeof(float));
    }
    model::RunExpert(*w, ckpt_->config().swiglu_limit, in.data(), m, b.weights().data(),
                     out.data());
    return out;
  }

  // The bytes one routed expert's three matrices span, from the config (FP4 codes, two a byte,
  // plus one E8M0 scale byte per 32 values): the model maker's expert format.
  uint64_t ExpertBytes() const {
    const uint64_t d = hidden(), i = ckpt_->config().moe_intermediate_size;
    return 3 * (i * d / 2 + i * d / 32);
  }

  prometheus::Registry registry_;
  std::unique_ptr<model::Checkpoint> ckpt_;
  std::unique_ptr<ExpertWorkerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<expertmesh::v1::ExpertWorker::Stub> stub_;
};

using Stream = grpc::ClientReaderWriter<DispatchRequest, DispatchResponse>;

TEST_F(ExpertWorkerServiceTest, DispatchIsByteIdenticalToRunExpertOnTheSameRows) {
  ASSERT_NO_FATAL_FAILURE(Start({}));
  const int mtp_layer = ckpt_->config().num_hidden_layers;  // MTP block 0
  expertmesh::v1::LoadExpertsResponse loaded;
  grpc::Status s = Load({Id(1, 2), Id(1, 5), Id(mtp_layer, 3)}, 3, &loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(loaded.loaded_size(), 3);
  EXPECT_EQ(loaded.resident_bytes(), 3 * ExpertBytes());

  grpc::ClientContext context;
  rpc::SetTimeout(context, absl::Seconds(60));
  std::unique_ptr<Stream> stream = stub_->Dispatch(&context);
  const std::vector<float> x = Tokens(6, 1);
  // Two experts sharing rows 2 and 4; the MTP expert in a second batch.
  DispatchRequest r;
  r.set_batch_id(10);
  r.set_layer(1);
  r.set_placement_version(3);
  SetTokens(&r, x, 6, hidden());
  AddBatch(&r, 5, {4, 1, 2}, {0.25f, 1.5f, -0.75f});
  AddBatch(&r, 2, {0, 2, 4, 5}, {0.5f, 0.125f, 2.0f, 1.0f});
  DispatchRequest mtp;
  mtp.set_batch_id(11);
  mtp.set_layer(mtp_layer);
  SetTokens(&mtp, x, 6, hidden());
  AddBatch(&mtp, 3, {3}, {0.9f});
  ASSERT_TRUE(stream->Write(r));
  ASSERT_TRUE(stream->Write(mtp));
  for (const DispatchRequest* req : {&r, &mtp}) {
    DispatchResponse reply;
    ASSERT_TRUE(stream->Read(&reply));
    ASSERT_EQ(reply.code(), 0) << reply.message();
    EXPECT_EQ(reply.batch_id(), req->batch_id());
    EXPECT_EQ(reply.layer(), req->layer());
    ASSERT_EQ(reply.outputs_size(), req->experts_size());
    for (int b = 0; b < req->experts_size(); ++b) {
      const auto& out = reply.outputs(b);
      EXPECT_EQ(out.expert(), req->experts(b).expert());
      EXPECT_EQ(out.outputs().dtype(), expertmesh::v1::DTYPE_F32);
      ASSERT_EQ(out.outputs().shape_size(), 2);
      EXPECT_EQ(out.outputs().shape(0), req->experts(b).rows_size());
      EXPECT_EQ(out.outputs().shape(1), hidden());
      std::vector<float> want = Expected(req->layer(), req->experts(b), x);
      ASSERT_EQ(out.outputs().data().size(), want.size() * sizeof(float));
      EXPECT_EQ(std::memcmp(out.outputs().data().data(), want.data(), out.outputs().data().size()),
                0)
          << "batch " << req->batch_id() << " expert " << out.expert();
      // Not trivially zero: the comparison would then prove nothing.
      bool nonzero = false;
      for (float v : want) nonzero |= v != 0.0f;
      EXPECT_TRUE(nonzero);
    }
  }
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());

  EXPECT_EQ(MetricValue(registry_, "expertmesh_expert_dispatches_total", {{"result", "ok"}}), 2);
  EXPECT_EQ(MetricValue(registry_, "expertmesh_expert_tokens_total",
                        {{"layer", "1"}, {"expert", "2"}}),
            4);
  EXPECT_EQ(MetricValue(registry_, "expertmesh_expert_tokens_total",
                        {{"layer", "1"}, {"expert", "5"}}),
            3);
  EXPECT_EQ(MetricValue(registry_, "expertmesh_expert_tokens_total",
                        {{"layer", std::to_string(mtp_layer)}, {"expert", "3"}}),
            1);
  EXPECT_EQ(MetricValue(registry_, "expertmesh_expert_dispatch_seconds"), 2);
  EXPECT_EQ(MetricValue(registry_, "expertmesh_expert_dispatch_rows"), 2);
  EXPECT_EQ(MetricValue(registry_, "expertmesh_expert_loaded_experts"), 3);
  EXPECT_EQ(MetricValue(registry_, "expertmesh_expert_resident_weight_bytes"),
            static_cast<double>(3 * ExpertBytes()));
}

TEST_F(ExpertWorkerServiceTest, UnservableBatchesGetErrorRepliesAndTheStreamGoesOn) {
  ASSERT_NO_FATAL_FAILURE(Start({}));
  expertmesh::v1::LoadExpertsResponse loaded;
  ASSERT_TRUE(Load({Id(2, 0), Id(2, 1)}, 4, &loaded).ok());

  grpc::ClientContext context;
  rpc::SetTimeout(context, absl::Seconds(60));
  std::unique_ptr<Stream> stream = stub_->Dispatch(&context);
  const std::vector<float> x = Tokens(3, 2);
  auto good = [&](uint64_t id) {
    DispatchRequest r;
    r.set_batch_id(id);
    r.set_layer(2);
    r.set_placement_version(4);
    SetTokens(&r, x, 3, hidden());
    AddBatch(&r, 1, {0, 2}, {1.0f, 0.5f});
    return r;
  };
  struct Case {
    DispatchRequest request;
    grpc::StatusCode code;
    std::string message;
  };
  std::vector<Case> cases;
  {
    DispatchRequest r = good(1);
    AddBatch(&r, 7, {1}, {1.0f});  // not hosted here
    r.set_placement_version(3);
    cases.push_back({r, grpc::StatusCode::FAILED_PRECONDITION,
                     "(layer 2, expert 7) is not loaded on this worker (placement version 4)"});
  }
  cases.push_back({good(2), grpc::StatusCode::OK, ""});
  {
    DispatchRequest r = good(3);
    r.clear_tokens();
    SetTokens(&r, std::vector<float>(3 * (hidden() + 1)), 3, hidden() + 1);
    cases.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "tokens.shape"});
  }
  {
    DispatchRequest r = good(4);
    r.mutable_tokens()->set_dtype(expertmesh::v1::DTYPE_BF16);
    cases.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "tokens.dtype"});
  }
  {
    DispatchRequest r = good(5);
    r.mutable_experts(0)->set_rows(1, 3);
    cases.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "rows[1] = 3 but tokens has 3 rows"});
  }
  {
    DispatchRequest r = good(6);
    r.mutable_experts(0)->add_weights(1.0f);
    cases.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "2 rows but 3 weights"});
  }
  {
    DispatchRequest r = good(7);
    r.set_layer(99);
    cases.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "layer 99"});
  }
  cases.push_back({good(8), grpc::StatusCode::OK, ""});
  for (const Case& c : cases) {
    ASSERT_TRUE(stream->Write(c.request)) << c.request.batch_id();
    DispatchResponse reply;
    ASSERT_TRUE(stream->Read(&reply)) << c.request.batch_id();
    EXPECT_EQ(reply.batch_id(), c.request.batch_id());
    EXPECT_EQ(reply.code(), static_cast<int>(c.code))
        << "batch " << c.request.batch_id() << ": " << reply.message();
    if (c.code == grpc::StatusCode::OK) {
      ASSERT_EQ(reply.outputs_size(), 1);
      std::vector<float> want = Expected(2, c.request.experts(0), x);
      EXPECT_EQ(std::memcmp(reply.outputs(0).outputs().data().data(), want.data(),
                            want.size() * sizeof(float)),
                0);
    } else {
      EXPECT_THAT(reply.message(), HasSubstr(c.message));
      EXPECT_EQ(reply.outputs_size(), 0);
    }
  }

  // Unloaded under an open stream: the next batch for it fails, the stream still serves.
  expertmesh::v1::UnloadExpertsResponse unloaded;
  ASSERT_TRUE(Unload({Id(2, 1)}, &unloaded).ok());
  EXPECT_EQ(unloaded.resident_bytes(), ExpertBytes());
  ASSERT_TRUE(stream->Write(good(9)));
  DispatchResponse reply;
  ASSERT_TRUE(stream->Read(&reply));
  EXPECT_EQ(reply.code(), static_cast<int>(grpc::StatusCode::FAILED_PRECONDITION));
  EXPECT_THAT(reply.message(), HasSubstr("(layer 2, expert 1) is not loaded on this worker"));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(MetricValue(registry_, "expertmesh_expert_dispatches_total", {{"result", "ok"}}), 2);
  EXPECT_EQ(MetricValue(registry_, "expertmesh_expert_dispatches_total", {{"result", "error"}}),
            7);
}

TEST_F(ExpertWorkerServiceTest, LoadAndUnloadAreIdempotentValidatedAndMoveResidentBytes) {
  ASSERT_NO_FATAL_FAILURE(Start({}));
  const int blocks = ckpt_->config().NumBlocks();
  const int experts = ckpt_->config().n_routed_experts;
  expertmesh::v1::LoadExpertsResponse loaded;
  grpc::Status s = Load({Id(0, 1), Id(blocks, 0)}, 1, &loaded);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("experts[1].layer " + std::to_string(blocks)));
  s = Load({Id(0, experts)}, 1, &loaded);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("experts[0].expert " + std::to_string(experts)));
  EXPECT_EQ(Status().experts_size(), 0) << "a rejected load loads nothing";

  ASSERT_TRUE(Load({Id(0, 1), Id(3, 4)}, 2, &loaded).ok());
  EXPECT_EQ(loaded.resident_bytes(), 2 * ExpertBytes());
  ASSERT_TRUE(Load({Id(0, 1), Id(3, 4)}, 2, &loaded).ok());
  EXPECT_EQ(loaded.resident_bytes(), 2 * ExpertBytes()) << "loading again changes nothing";
  ASSERT_TRUE(Load({Id(3, 4), Id(0, 9)}, 5, &loaded).ok());
  EXPECT_EQ(loaded.resident_bytes(), 3 * ExpertBytes());

  expertmesh::v1::ExpertStatusResponse st = Status();
  ASSERT_EQ(st.experts_size(), 3);
  EXPECT_EQ(st.experts(0).layer(), 0u);
  EXPECT_EQ(st.experts(0).expert(), 1u);
  EXPECT_EQ(st.experts(1).expert(), 9u);
  EXPECT_EQ(st.experts(2).layer(), 3u);
  EXPECT_EQ(st.placement_version(), 5u);
  EXPECT_EQ(st.resident_bytes(), 3 * ExpertBytes());
  EXPECT_FALSE(st.draining());
  EXPECT_FALSE(st.kernel_target().empty());
  EXPECT_EQ(st.model_dir(), ModelDir());

  rpc::HostedExperts hosted = service_->Hosted();
  EXPECT_EQ(hosted.experts.size(), 3u);
  EXPECT_EQ(hosted.placement_version, 5u);

  expertmesh::v1::UnloadExpertsResponse unloaded;
  ASSERT_TRUE(Unload({Id(0, 1), Id(0, 2)}, &unloaded).ok());
  EXPECT_EQ(unloaded.resident_bytes(), 2 * ExpertBytes());
  ASSERT_TRUE(Unload({Id(0, 1)}, &unloaded).ok());
  EXPECT_EQ(unloaded.resident_bytes(), 2 * ExpertBytes());
  EXPECT_EQ(Unload({Id(blocks + 1, 0)}, &unloaded).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(MetricValue(registry_, "expertmesh_expert_loaded_experts"), 2);
}

TEST_F(ExpertWorkerServiceTest, MaxExpertsBoundsLoads) {
  ExpertWorkerOptions options;
  options.max_experts = 2;
  ASSERT_NO_FATAL_FAILURE(Start(options));
  expertmesh::v1::LoadExpertsResponse loaded;
  ASSERT_TRUE(Load({Id(0, 1), Id(0, 2)}, 1, &loaded).ok());
  grpc::Status s = Load({Id(0, 3)}, 1, &loaded);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("--max-experts 2"));
}

TEST_F(ExpertWorkerServiceTest, DrainKeepsServingUntilTheRouterSaysDrainedThenUnloads) {
  std::atomic<bool> announced{false}, router_drained{false}, exited{false};
  ExpertWorkerOptions options;
  options.announce_draining = [&](bool d) { announced = d; };
  options.router_drained = [&] { return router_drained.load(); };
  options.on_drained = [&] { exited = true; };
  ASSERT_NO_FATAL_FAILURE(Start(options));
  expertmesh::v1::LoadExpertsResponse loaded;
  ASSERT_TRUE(Load({Id(1, 3)}, 1, &loaded).ok());

  grpc::ClientContext context;
  rpc::SetTimeout(context, absl::Seconds(60));
  std::unique_ptr<Stream> stream = stub_->Dispatch(&context);
  const std::vector<float> x = Tokens(2, 3);
  DispatchRequest r;
  r.set_layer(1);
  SetTokens(&r, x, 2, hidden());
  AddBatch(&r, 3, {1, 0}, {1.0f, 1.0f});

  {
    grpc::ClientContext c;
    rpc::SetTimeout(c, absl::Seconds(10));
    expertmesh::v1::ExpertDrainRequest request;
    request.set_grace_ms(600000);  // only the router ends this drain
    expertmesh::v1::ExpertDrainResponse response;
    ASSERT_TRUE(stub_->Drain(&c, request, &response).ok());
    EXPECT_EQ(response.loaded_experts(), 1u);
  }
  EXPECT_TRUE(announced.load());
  EXPECT_TRUE(Status().draining());
  EXPECT_EQ(MetricValue(registry_, "expertmesh_expert_draining"), 1);
  grpc::ClientContext c2;
  rpc::SetTimeout(c2, absl::Seconds(10));
  expertmesh::v1::LoadExpertsResponse more;
  expertmesh::v1::LoadExpertsRequest more_request;
  *more_request.add_experts() = Id(1, 4);
  EXPECT_EQ(stub_->LoadExperts(&c2, more_request, &more).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);

  // Still serving while the router has attention workers on the old placement.
  r.set_batch_id(1);
  ASSERT_TRUE(stream->Write(r));
  DispatchResponse reply;
  ASSERT_TRUE(stream->Read(&reply));
  EXPECT_EQ(reply.code(), 0) << reply.message();
  EXPECT_FALSE(exited.load());
  EXPECT_EQ(service_->resident_bytes(), ExpertBytes());

  router_drained = true;
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (!exited.load() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(10));
  ASSERT_TRUE(exited.load());
  EXPECT_TRUE(service_->drained());
  EXPECT_EQ(service_->resident_bytes(), 0u);
  EXPECT_EQ(Status().experts_size(), 0);
  r.set_batch_id(2);
  ASSERT_TRUE(stream->Write(r));
  ASSERT_TRUE(stream->Read(&reply));
  EXPECT_EQ(reply.code(), static_cast<int>(grpc::StatusCode::UNAVAILABLE));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ExpertWorkerServiceTest, DrainEndsAfterItsGraceWhenTheRouterNeverAnswers) {
  ExpertWorkerOptions options;
  options.router_drained = [] { return false; };
  options.drain_timeout = absl::Milliseconds(300);
  ASSERT_NO_FATAL_FAILURE(Start(options));
  expertmesh::v1::LoadExpertsResponse loaded;
  ASSERT_TRUE(Load({Id(1, 3)}, 1, &loaded).ok());
  const absl::Time start = absl::Now();
  service_->DrainAndWait();
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(300));
  EXPECT_TRUE(service_->drained());
  EXPECT_EQ(service_->resident_bytes(), 0u);
}

TEST_F(ExpertWorkerServiceTest, InjectedDelayHoldsEachReplyBack) {
  ExpertWorkerOptions options;
  options.inject_delay = absl::Milliseconds(200);
  ASSERT_NO_FATAL_FAILURE(Start(options));
  expertmesh::v1::LoadExpertsResponse loaded;
  ASSERT_TRUE(Load({Id(1, 3)}, 1, &loaded).ok());
  grpc::ClientContext context;
  rpc::SetTimeout(context, absl::Seconds(60));
  std::unique_ptr<Stream> stream = stub_->Dispatch(&context);
  DispatchRequest r;
  r.set_layer(1);
  SetTokens(&r, Tokens(1, 4), 1, hidden());
  AddBatch(&r, 3, {0}, {1.0f});
  const absl::Time sent = absl::Now();
  ASSERT_TRUE(stream->Write(r));
  DispatchResponse reply;
  ASSERT_TRUE(stream->Read(&reply));
  EXPECT_EQ(reply.code(), 0) << reply.message();
  EXPECT_GE(absl::Now() - sent, absl::Milliseconds(200));
  EXPECT_GE(reply.compute_us(), 150000u);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

}  // namespace
}  // namespace expertmesh::expert_worker
