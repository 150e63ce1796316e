// The remote expert data path against in-process fakes on loopback: expert workers that compute
// with model::RunExpert on a generated model (and can be told to fail, stall or die), and a
// router serving a placement table the test controls.
#include "attention-worker/expert_dispatcher.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "attention-worker/placement_client.h"
#include "core/model/checkpoint.h"
#include "core/model/model_maker.h"
#include "core/model/moe.h"
#include "core/model/weights.h"
#include "core/rpc/channel.h"
#include "expert-worker/expert_worker_service.h"
#include "expertmesh/v1/expert_worker.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"

namespace expertmesh::attention_worker {
namespace {

namespace v1 = expertmesh::v1;
using model::ExpertWorkItem;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr int kBlock = 1;

// The tiny-a-shaped model (D = 256, 16 experts), written once per test process.
struct TestModel {
  std::string dir;
  std::unique_ptr<model::Checkpoint> checkpoint;
  int64_t D = 0;
  int experts = 0;
  double swiglu_limit = 0;

  ~TestModel() {
    checkpoint.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

const TestModel* GetModel() {
  static const TestModel* model = []() -> const TestModel* {
    auto m = std::make_unique<TestModel>();
    m->dir = absl::StrCat(::testing::TempDir(), "/em_dispatch_model_", ::getpid());
    std::filesystem::remove_all(m->dir);
    absl::Status written = model::WriteModelPreset("tiny-a-shape", 3, m->dir);
    if (!written.ok()) {
      ADD_FAILURE() << "writing the test model: " << written;
      return nullptr;
    }
    auto checkpoint = model::Checkpoint::Open(m->dir);
    if (!checkpoint.ok()) {
      ADD_FAILURE() << "opening the test model: " << checkpoint.status();
      return nullptr;
    }
    m->checkpoint = std::move(*checkpoint);
    m->D = m->checkpoint->config().hidden_size;
    m->experts = m->checkpoint->config().n_routed_experts;
    m->swiglu_limit = m->checkpoint->config().swiglu_limit;
    static TestModel* kept = m.release();  // destroyed at exit: removes the directory
    static struct Cleanup {
      ~Cleanup() { delete kept; }
    } cleanup;
    return kept;
  }();
  return model;
}

// RunExpert of (block, expert) over rows x[rows][D] with weights, as a local engine would.
absl::StatusOr<std::vector<float>> Compute(const TestModel& m, int block, int expert,
                                           const float* x, int64_t rows, const float* weights) {
  auto w = model::LoadExpertWeights(*m.checkpoint, block, expert);
  if (!w.ok()) return w.status();
  std::vector<float> out(static_cast<size_t>(rows * m.D));
  model::RunExpert(*w, m.swiglu_limit, x, rows, weights, out.data());
  return out;
}

// An expert worker that computes every expert of the model, with injectable faults.
class FakeExpertWorker final : public v1::ExpertWorker::Service {
 public:
  explicit FakeExpertWorker(const TestModel* model) : model_(model) {}

  grpc::Status Dispatch(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<v1::DispatchResponse, v1::DispatchRequest>* stream) override {
    v1::DispatchRequest request;
    while (stream->Read(&request)) {
      {
        absl::MutexLock lock(&mu_);
        requests_.push_back(request);
      }
      if (silent_) continue;  // reads on, never answers
      const absl::Time until = absl::Now() + absl::Milliseconds(delay_ms_.load());
      while (absl::Now() < until && !context->IsCancelled()) {
        absl::SleepFor(absl::Milliseconds(2));
      }
      if (!stream->Write(Answer(request))) break;
    }
    return grpc::Status::OK;
  }

  std::vector<v1::DispatchRequest> requests() {
    absl::MutexLock lock(&mu_);
    return requests_;
  }

  std::atomic<bool> silent_{false};
  std::atomic<int> error_code_{0};
  std::atomic<int> delay_ms_{0};

 private:
  v1::DispatchResponse Answer(const v1::DispatchRequest& request) {
    v1::DispatchResponse response;
    response.set_batch_id(request.batch_id());
    response.set_layer(request.layer());
    if (error_code_ != 0) {
      response.set_code(error_code_);
      response.set_message("injected failure");
      return response;
    }
    const int64_t D = model_->D;
    const v1::Tensor& tokens = request.tokens();
    const int64_t m = tokens.shape_size() == 2 ? tokens.shape(0) : -1;
    if (tokens.dtype() != v1::DTYPE_F32 || m < 0 || tokens.shape(1) != D ||
        tokens.data().size() != static_cast<size_t>(m * D) * sizeof(float)) {
      response.set_code(grpc::StatusCode::INVALID_ARGUMENT);
      response.set_message("tokens are not F32 [m, D]");
      return response;
    }
    const float* x = reinterpret_cast<const float*>(tokens.data().data());
    for (const v1::ExpertBatch& batch : request.experts()) {
      std::vector<float> gathered;
      for (uint32_t r : batch.rows()) {
        if (r >= m) {
          response.clear_outputs();
          response.set_code(grpc::StatusCode::INVALID_ARGUMENT);
          response.set_message(absl::StrCat("row ", r, " out of range"));
          return response;
        }
        gathered.insert(gathered.end(), x + r * D, x + (r + 1) * D);
      }
      const int64_t rows = batch.rows_size();
      auto out =
          Compute(*model_, static_cast<int>(request.layer()), static_cast<int>(batch.expert()),
                  gathered.data(), rows, batch.weights().data());
      if (!out.ok()) {
        response.clear_outputs();
        response.set_code(static_cast<int>(out.status().code()));
        response.set_message(std::string(out.status().message()));
        return response;
      }
      v1::ExpertOutput* output = response.add_outputs();
      output->set_expert(batch.expert());
      output->mutable_outputs()->set_dtype(v1::DTYPE_F32);
      output->mutable_outputs()->add_shape(rows);
      output->mutable_outputs()->add_shape(D);
      output->mutable_outputs()->set_data(out->data(), out->size() * sizeof(float));
    }
    return response;
  }

  const TestModel* model_;
  absl::Mutex mu_;
  std::vector<v1::DispatchRequest> requests_ ABSL_GUARDED_BY(mu_);
};

// A router whose placement table the test sets. The watch sends the current table on every
// change, even an older version (as a router that lost its state might), so that the client's
// refusal to go backwards is tested.
class FakeRouter final : public v1::Router::Service {
 public:
  void SetTable(const v1::PlacementTable& table) {
    absl::MutexLock lock(&mu_);
    table_ = table;
    ++generation_;
  }
  void Stop() {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  std::vector<uint64_t> known_versions() {
    absl::MutexLock lock(&mu_);
    return known_versions_;
  }

  grpc::Status WatchPlacement(grpc::ServerContext* context,
                              const v1::WatchPlacementRequest* request,
                              grpc::ServerWriter<v1::PlacementTable>* writer) override {
    int64_t sent = -1;
    {
      absl::MutexLock lock(&mu_);
      known_versions_.push_back(request->known_version());
    }
    while (!context->IsCancelled()) {
      v1::PlacementTable table;
      {
        absl::MutexLock lock(&mu_);
        auto changed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return stopping_ || generation_ != sent;
        };
        mu_.AwaitWithTimeout(absl::Condition(&changed), absl::Milliseconds(20));
        if (stopping_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "router stopping");
        if (generation_ == sent) continue;
        sent = generation_;
        table = table_;
      }
      if (table.version() > 0 && !writer->Write(table)) break;
    }
    return grpc::Status::OK;
  }
  grpc::Status GetPlacement(grpc::ServerContext*, const v1::GetPlacementRequest*,
                            v1::PlacementTable* response) override {
    absl::MutexLock lock(&mu_);
    *response = table_;
    return grpc::Status::OK;
  }

 private:
  absl::Mutex mu_;
  v1::PlacementTable table_ ABSL_GUARDED_BY(mu_);
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<uint64_t> known_versions_ ABSL_GUARDED_BY(mu_);
};

// A gRPC server on loopback for one service; `port` 0 lets the OS pick.
struct Server {
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  std::string address() const { return absl::StrCat("127.0.0.1:", port); }
  void Stop() {
    if (server == nullptr) return;
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
    server->Wait();
    server.reset();
  }
  ~Server() { Stop(); }
};

std::unique_ptr<Server> Serve(grpc::Service* service, int port = 0) {
  auto s = std::make_unique<Server>();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(absl::StrCat("127.0.0.1:", port), grpc::InsecureServerCredentials(),
                           &s->port);
  builder.RegisterService(service);
  s->server = builder.BuildAndStart();
  if (s->server == nullptr) return nullptr;
  return s;
}

// A table of `version` placing expert e of kBlock on worker ids placement(e) (ids are 1-based
// indexes into `addresses`); experts with no ids are left out.
v1::PlacementTable Table(uint64_t version, const std::vector<std::string>& addresses,
                         const std::function<std::vector<uint64_t>(int)>& placement, int experts) {
  v1::PlacementTable table;
  table.set_version(version);
  for (size_t i = 0; i < addresses.size(); ++i) {
    (*table.mutable_worker_addresses())[i + 1] = addresses[i];
  }
  for (int e = 0; e < experts; ++e) {
    std::vector<uint64_t> ids = placement(e);
    if (ids.empty()) continue;
    v1::ExpertPlacement* p = table.add_experts();
    p->set_layer(kBlock);
    p->set_expert(e);
    for (uint64_t id : ids) p->add_worker_ids(id);
  }
  return table;
}

std::vector<ExpertKey> AllExperts(int experts) {
  std::vector<ExpertKey> keys;
  for (int e = 0; e < experts; ++e) keys.push_back(ExpertKey{kBlock, e});
  return keys;
}

// Deterministic activations x[n][D] and items over them (rows overlap between experts).
struct Inputs {
  int64_t n = 0;
  std::vector<float> x;
  std::vector<ExpertWorkItem> items;
};

Inputs MakeInputs(int64_t n, int64_t D, const std::vector<int>& experts, uint32_t seed) {
  Inputs in;
  in.n = n;
  in.x.resize(static_cast<size_t>(n * D));
  uint32_t s = seed * 2654435761u + 12345u;
  auto next = [&] {
    s = s * 1664525u + 1013904223u;
    return static_cast<float>((s >> 8) & 0xffff) / 65536.0f - 0.5f;
  };
  for (float& v : in.x) v = next();
  for (size_t k = 0; k < experts.size(); ++k) {
    ExpertWorkItem item;
    item.expert = experts[k];
    for (int64_t r = 0; r < n; ++r) {
      if ((r + k + seed) % 3 != 0 || r == static_cast<int64_t>(k) % n) {
        item.rows.push_back(r);
        item.weights.push_back(0.25f + 0.5f * (next() + 0.5f));
      }
    }
    in.items.push_back(std::move(item));
  }
  return in;
}

// What the single process computes for `item`: RunExpert over its rows of x.
std::vector<float> Expected(const TestModel& m, int block, const Inputs& in,
                            const ExpertWorkItem& item) {
  std::vector<float> gathered;
  for (int64_t r : item.rows) {
    gathered.insert(gathered.end(), in.x.begin() + r * m.D, in.x.begin() + (r + 1) * m.D);
  }
  auto out = Compute(m, block, item.expert, gathered.data(), static_cast<int64_t>(item.rows.size()),
                     item.weights.data());
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : std::vector<float>();
}

// Byte equality of item i's output with the local computation.
void ExpectExact(const TestModel& m, const Inputs& in, const model::ExpertResults& results,
                 size_t i) {
  ASSERT_LT(i, results.outputs.size());
  const std::vector<float> expected = Expected(m, kBlock, in, in.items[i]);
  ASSERT_EQ(results.outputs[i].size(), expected.size()) << "item " << i;
  // An all-zero expert would make the comparison vacuous.
  ASSERT_TRUE(std::any_of(expected.begin(), expected.end(), [](float v) { return v != 0; }));
  EXPECT_EQ(
      std::memcmp(results.outputs[i].data(), expected.data(), expected.size() * sizeof(float)), 0)
      << "item " << i << " (expert " << in.items[i].expert << ") differs from RunExpert";
}

absl::StatusOr<model::ExpertResults> Dispatch(RemoteExpertDispatcher& dispatcher, const Inputs& in,
                                              int64_t D) {
  auto pending = dispatcher.Start(kBlock, in.x.data(), in.n, D, in.items);
  if (!pending.ok()) return pending.status();
  return (*pending)->Wait();
}

// The value of a counter or gauge (or a histogram's count) in `registry`, selected by one label
// if given; -1 when absent.
double MetricValue(prometheus::Registry& registry, const std::string& name,
                   const std::string& label = "", const std::string& value = "") {
  for (const prometheus::MetricFamily& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const prometheus::ClientMetric& metric : family.metric) {
      bool match = label.empty();
      for (const auto& l : metric.label) match = match || (l.name == label && l.value == value);
      if (!match) continue;
      switch (family.type) {
        case prometheus::MetricType::Counter:
          return metric.counter.value;
        case prometheus::MetricType::Gauge:
          return metric.gauge.value;
        case prometheus::MetricType::Histogram:
          return static_cast<double>(metric.histogram.sample_count);
        default:
          return -1;
      }
    }
  }
  return -1;
}

// Two fake expert workers and a router, with a placement client watching it.
class DispatchFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = GetModel();
    ASSERT_NE(model_, nullptr);
    for (int i = 0; i < 2; ++i) {
      workers_.push_back(std::make_unique<FakeExpertWorker>(model_));
      servers_.push_back(Serve(workers_.back().get()));
      ASSERT_NE(servers_.back(), nullptr);
      addresses_.push_back(servers_.back()->address());
    }
    router_server_ = Serve(&router_);
    ASSERT_NE(router_server_, nullptr);
  }
  void TearDown() override {
    router_.Stop();
    if (router_server_) router_server_->Stop();
  }

  // Publishes `table` and waits until the client holds it.
  void Publish(const v1::PlacementTable& table, PlacementClient& client) {
    router_.SetTable(table);
    ASSERT_TRUE(client.WaitForVersion(table.version(), absl::Seconds(20)))
        << "the placement client did not receive version " << table.version();
  }

  const TestModel* model_ = nullptr;
  std::vector<std::unique_ptr<FakeExpertWorker>> workers_;
  std::vector<std::unique_ptr<Server>> servers_;
  std::vector<std::string> addresses_;
  FakeRouter router_;
  std::unique_ptr<Server> router_server_;
};

TEST_F(DispatchFixture, OutputsAreTheWorkersBytesAndEachWorkerGetsOneDispatchPerCall) {
  const int E = model_->experts;
  PlacementClient placement(router_server_->address());
  router_.SetTable(Table(
      5, addresses_, [](int e) { return std::vector<uint64_t>{e % 2 == 0 ? 1u : 2u}; }, E));
  ASSERT_TRUE(placement.WaitForPlacement(absl::Seconds(20), AllExperts(E)).ok());
  RemoteExpertDispatcher dispatcher(&placement);

  const Inputs in = MakeInputs(7, model_->D, {0, 1, 2, 3, 6, 9, 15}, 1);
  auto results = Dispatch(dispatcher, in, model_->D);
  ASSERT_TRUE(results.ok()) << results.status();
  EXPECT_TRUE(results->failed_items.empty());
  EXPECT_TRUE(results->error.ok()) << results->error;
  for (size_t i = 0; i < in.items.size(); ++i) ExpectExact(*model_, in, *results, i);

  // One DispatchRequest per worker, each needed row once, experts in item order.
  for (int w = 0; w < 2; ++w) {
    EXPECT_EQ(dispatcher.dispatches_sent(addresses_[w]), 1) << addresses_[w];
    const auto requests = workers_[w]->requests();
    ASSERT_EQ(requests.size(), 1u) << "worker " << w;
    const v1::DispatchRequest& r = requests[0];
    EXPECT_EQ(r.layer(), static_cast<uint32_t>(kBlock));
    EXPECT_EQ(r.placement_version(), 5u);
    std::set<int64_t> needed;
    std::vector<int> experts;
    for (const auto& item : in.items) {
      if (item.expert % 2 != w) continue;
      experts.push_back(item.expert);
      needed.insert(item.rows.begin(), item.rows.end());
    }
    EXPECT_EQ(r.tokens().shape(0), static_cast<int64_t>(needed.size()));
    ASSERT_EQ(r.experts_size(), static_cast<int>(experts.size()));
    for (size_t k = 0; k < experts.size(); ++k) {
      EXPECT_EQ(r.experts(static_cast<int>(k)).expert(), static_cast<uint32_t>(experts[k]));
    }
  }
  EXPECT_EQ(dispatcher.placement_version_in_use(), 5u);

  // The next step reuses the streams: again one dispatch per worker.
  auto again = Dispatch(dispatcher, MakeInputs(3, model_->D, {4, 5}, 2), model_->D);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(dispatcher.dispatches_sent(addresses_[0]), 2);
  EXPECT_EQ(dispatcher.dispatches_sent(addresses_[1]), 2);
  const ExpertDispatcherStats stats = dispatcher.stats();
  EXPECT_EQ(stats.dispatches_sent, 4);
  EXPECT_EQ(stats.dispatches_ok, 4);
  EXPECT_EQ(stats.streams_opened, 2);
  EXPECT_EQ(stats.retries, 0);
  EXPECT_GT(stats.wire_bytes_sent, static_cast<int64_t>(7 * model_->D * sizeof(float)));
  EXPECT_GT(stats.wire_bytes_received, 0);
}

TEST_F(DispatchFixture, AWorkerAnsweringErrorsIsRetriedOnTheReplica) {
  const int E = model_->experts;
  prometheus::Registry registry;
  PlacementClientOptions popts;
  popts.registry = &registry;
  PlacementClient placement(router_server_->address(), popts);
  Publish(Table(
              1, addresses_,
              [](int) {
                return std::vector<uint64_t>{1, 2};
              },
              E),
          placement);
  ExpertDispatcherOptions options;
  options.registry = &registry;
  RemoteExpertDispatcher dispatcher(&placement, options);
  workers_[0]->error_code_ = grpc::StatusCode::FAILED_PRECONDITION;

  const Inputs in = MakeInputs(5, model_->D, {1, 4, 7}, 3);
  auto results = Dispatch(dispatcher, in, model_->D);
  ASSERT_TRUE(results.ok()) << results.status();
  EXPECT_TRUE(results->failed_items.empty()) << results->error;
  for (size_t i = 0; i < in.items.size(); ++i) ExpectExact(*model_, in, *results, i);
  EXPECT_EQ(workers_[0]->requests().size(), 1u);
  EXPECT_EQ(workers_[1]->requests().size(), 1u);
  EXPECT_EQ(dispatcher.stats().retries, 1);
  EXPECT_EQ(dispatcher.stats().dispatches_error, 1);

  // The failed worker is now avoided while its replica answers.
  auto again = Dispatch(dispatcher, in, model_->D);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->failed_items.empty());
  EXPECT_EQ(workers_[0]->requests().size(), 1u);
  EXPECT_EQ(workers_[1]->requests().size(), 2u);

  EXPECT_EQ(
      MetricValue(registry, "expertmesh_attention_expert_dispatches_total", "result", "error"), 1);
  EXPECT_EQ(MetricValue(registry, "expertmesh_attention_expert_dispatches_total", "result", "ok"),
            2);
  EXPECT_EQ(MetricValue(registry, "expertmesh_attention_expert_dispatch_retries_total"), 1);
  EXPECT_EQ(MetricValue(registry, "expertmesh_attention_expert_dispatch_seconds"), 2);
  EXPECT_EQ(
      MetricValue(registry, "expertmesh_attention_expert_wire_bytes_total", "direction", "sent"),
      static_cast<double>(dispatcher.stats().wire_bytes_sent));
  EXPECT_GT(MetricValue(registry, "expertmesh_attention_expert_wire_bytes_total", "direction",
                        "received"),
            0);
  EXPECT_EQ(MetricValue(registry, "expertmesh_attention_placement_version"), 1);
}

TEST_F(DispatchFixture, AWorkerThatDiesIsRetriedOnTheReplica) {
  const int E = model_->experts;
  PlacementClient placement(router_server_->address());
  Publish(Table(
              1, addresses_,
              [](int) {
                return std::vector<uint64_t>{1, 2};
              },
              E),
          placement);
  RemoteExpertDispatcher dispatcher(&placement);

  const Inputs in = MakeInputs(6, model_->D, {0, 3, 8, 12}, 4);
  auto first = Dispatch(dispatcher, in, model_->D);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(workers_[0]->requests().size(), 1u);  // the preferred replica, stream now open

  servers_[0]->Stop();
  auto results = Dispatch(dispatcher, in, model_->D);
  ASSERT_TRUE(results.ok()) << results.status();
  EXPECT_TRUE(results->failed_items.empty()) << results->error;
  for (size_t i = 0; i < in.items.size(); ++i) ExpectExact(*model_, in, *results, i);
  EXPECT_EQ(workers_[1]->requests().size(), 1u);
  EXPECT_GE(dispatcher.stats().retries, 1);
}

TEST_F(DispatchFixture, WithoutAReplicaOnlyTheMissingExpertsFailNamingThem) {
  const int E = model_->experts;
  PlacementClient placement(router_server_->address());
  // Even experts on worker 1 (which is down), odd on worker 2; expert 5 is not placed at all.
  Publish(Table(
              1, addresses_,
              [](int e) {
                if (e == 5) return std::vector<uint64_t>{};
                return std::vector<uint64_t>{e % 2 == 0 ? 1u : 2u};
              },
              E),
          placement);
  servers_[0]->Stop();
  ExpertDispatcherOptions options;
  options.deadline = absl::Seconds(5);
  RemoteExpertDispatcher dispatcher(&placement, options);

  const Inputs in = MakeInputs(6, model_->D, {0, 1, 2, 3, 5}, 5);
  const absl::Time start = absl::Now();
  auto results = Dispatch(dispatcher, in, model_->D);
  ASSERT_TRUE(results.ok()) << results.status();
  // Bounded by the deadlines of the attempts (a refused connection fails sooner).
  EXPECT_LT(absl::Now() - start, options.deadline * (1 + options.retry_budget));
  EXPECT_EQ(results->failed_items, (std::vector<size_t>{0, 2, 4}));
  EXPECT_EQ(results->error.code(), absl::StatusCode::kUnavailable) << results->error;
  const std::string message(results->error.message());
  EXPECT_THAT(message, HasSubstr("(layer 1, expert 0)"));
  EXPECT_THAT(message, HasSubstr("(layer 1, expert 2)"));
  EXPECT_THAT(message, HasSubstr("(layer 1, expert 5)"));
  EXPECT_THAT(message, Not(HasSubstr("expert 1)")));
  EXPECT_THAT(message, Not(HasSubstr("expert 3)")));
  ExpectExact(*model_, in, *results, 1);
  ExpectExact(*model_, in, *results, 3);
  EXPECT_EQ(dispatcher.stats().items_failed, 3);
}

TEST_F(DispatchFixture, AWorkerThatNeverAnswersIsBoundedByTheDeadline) {
  const int E = model_->experts;
  PlacementClient placement(router_server_->address());
  // Expert 0 only on the silent worker; expert 1 on it and a replica.
  Publish(Table(
              1, addresses_,
              [](int e) {
                return e == 0 ? std::vector<uint64_t>{1} : std::vector<uint64_t>{1, 2};
              },
              E),
          placement);
  workers_[0]->silent_ = true;
  ExpertDispatcherOptions options;
  options.deadline = absl::Milliseconds(300);
  RemoteExpertDispatcher dispatcher(&placement, options);

  const Inputs in = MakeInputs(4, model_->D, {0, 1}, 6);
  const absl::Time start = absl::Now();
  auto results = Dispatch(dispatcher, in, model_->D);
  const absl::Duration took = absl::Now() - start;
  ASSERT_TRUE(results.ok()) << results.status();
  EXPECT_GE(took, options.deadline);  // it did wait for the silent worker first
  EXPECT_EQ(results->failed_items, (std::vector<size_t>{0}));
  EXPECT_EQ(results->error.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(results->error.message()), HasSubstr("(layer 1, expert 0)"));
  EXPECT_THAT(std::string(results->error.message()), HasSubstr("did not answer"));
  ExpectExact(*model_, in, *results, 1);
  EXPECT_EQ(dispatcher.stats().dispatches_timeout, 1);
  EXPECT_EQ(workers_[1]->requests().size(), 1u);
}

TEST_F(DispatchFixture, PlacementVersionsArePickedUpAndNeverGoBackwards) {
  const int E = model_->experts;
  absl::Mutex seen_mu;
  std::vector<uint64_t> seen;
  PlacementClientOptions popts;
  popts.on_version = [&](uint64_t v) {
    absl::MutexLock lock(&seen_mu);
    seen.push_back(v);
  };
  popts.initial_backoff = absl::Milliseconds(20);
  popts.max_backoff = absl::Milliseconds(200);
  PlacementClient placement(router_server_->address(), popts);
  Publish(Table(
              2, addresses_, [](int) { return std::vector<uint64_t>{1}; }, E),
          placement);
  RemoteExpertDispatcher dispatcher(&placement);
  const Inputs in = MakeInputs(3, model_->D, {0, 1}, 7);
  ASSERT_TRUE(Dispatch(dispatcher, in, model_->D).ok());
  ASSERT_EQ(workers_[0]->requests().size(), 1u);
  EXPECT_EQ(workers_[0]->requests()[0].placement_version(), 2u);

  // Version 3 moves everything to worker 2: the next call follows it.
  Publish(Table(
              3, addresses_, [](int) { return std::vector<uint64_t>{2}; }, E),
          placement);
  auto moved = Dispatch(dispatcher, in, model_->D);
  ASSERT_TRUE(moved.ok()) << moved.status();
  for (size_t i = 0; i < in.items.size(); ++i) ExpectExact(*model_, in, *moved, i);
  ASSERT_EQ(workers_[1]->requests().size(), 1u);
  EXPECT_EQ(workers_[1]->requests()[0].placement_version(), 3u);
  EXPECT_EQ(workers_[0]->requests().size(), 1u);

  // The router restarts on the same port with an older table: the client reconnects, says
  // which version it has, and ignores the older one.
  const int port = router_server_->port;
  router_.Stop();
  router_server_->Stop();
  FakeRouter restarted;
  restarted.SetTable(Table(
      1, addresses_, [](int) { return std::vector<uint64_t>{1}; }, E));
  auto restarted_server = Serve(&restarted, port);
  ASSERT_NE(restarted_server, nullptr);
  const absl::Time until = absl::Now() + absl::Seconds(20);
  while (placement.stats().stale_ignored < 1 && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_GE(placement.stats().stale_ignored, 1);
  EXPECT_EQ(placement.version(), 3u);
  EXPECT_THAT(restarted.known_versions(), ::testing::Contains(3u));
  EXPECT_GE(placement.stats().watches_opened, 2);

  restarted.SetTable(Table(
      4, addresses_, [](int) { return std::vector<uint64_t>{1}; }, E));
  EXPECT_TRUE(placement.WaitForVersion(4, absl::Seconds(20)));
  {
    // on_version runs just after the version is installed.
    absl::MutexLock lock(&seen_mu);
    seen_mu.AwaitWithTimeout(absl::Condition(
                                 +[](std::vector<uint64_t>* v) { return v->size() >= 3; }, &seen),
                             absl::Seconds(20));
    EXPECT_EQ(seen, (std::vector<uint64_t>{2, 3, 4}));
  }
  restarted.Stop();
}

// BeginStep pins the newest table for the first sends of every call until the next BeginStep,
// so a step never mixes versions, and the version the attention worker reports to the router
// is one no dispatch of an older version can still be behind.
TEST_F(DispatchFixture, BeginStepPinsTheVersionUntilTheNextStep) {
  const int E = model_->experts;
  PlacementClient placement(router_server_->address());
  Publish(Table(
              2, addresses_, [](int) { return std::vector<uint64_t>{1}; }, E),
          placement);
  RemoteExpertDispatcher dispatcher(&placement);
  EXPECT_EQ(dispatcher.BeginStep(), 2u);
  // Version 3 moves everything to worker 2, but this step stays on version 2 (worker 1).
  Publish(Table(
              3, addresses_, [](int) { return std::vector<uint64_t>{2}; }, E),
          placement);
  const Inputs in = MakeInputs(3, model_->D, {0, 1}, 7);
  ASSERT_TRUE(Dispatch(dispatcher, in, model_->D).ok());
  ASSERT_EQ(workers_[0]->requests().size(), 1u);
  EXPECT_EQ(workers_[0]->requests()[0].placement_version(), 2u);
  EXPECT_TRUE(workers_[1]->requests().empty());
  // The next step takes version 3.
  EXPECT_EQ(dispatcher.BeginStep(), 3u);
  ASSERT_TRUE(Dispatch(dispatcher, in, model_->D).ok());
  ASSERT_EQ(workers_[1]->requests().size(), 1u);
  EXPECT_EQ(workers_[1]->requests()[0].placement_version(), 3u);
  EXPECT_EQ(workers_[0]->requests().size(), 1u);
}

TEST_F(DispatchFixture, WaitForPlacementNamesWhatIsMissing) {
  const int E = model_->experts;
  PlacementClient placement(router_server_->address());
  router_.SetTable(Table(
      7, addresses_,
      [](int e) { return e == 3 ? std::vector<uint64_t>{} : std::vector<uint64_t>{1}; }, E));
  absl::Status missing = placement.WaitForPlacement(absl::Milliseconds(500), AllExperts(E));
  EXPECT_EQ(missing.code(), absl::StatusCode::kDeadlineExceeded) << missing;
  EXPECT_THAT(std::string(missing.message()), HasSubstr("(layer 1, expert 3)"));
  EXPECT_THAT(std::string(missing.message()), HasSubstr("version 7"));
  EXPECT_TRUE(placement.WaitForPlacement(absl::Seconds(20), {{kBlock, 2}}).ok());

  // No router at all: a clear timeout, and the destructor does not wait for anything.
  PlacementClient nowhere("127.0.0.1:1");
  absl::Status none = nowhere.WaitForPlacement(absl::Milliseconds(200));
  EXPECT_EQ(none.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(none.message()), HasSubstr("no placement table"));
}

TEST_F(DispatchFixture, DestroyingTheDispatcherWithCallsInFlightDoesNotWaitForThem) {
  const int E = model_->experts;
  auto placement = std::make_unique<PlacementClient>(router_server_->address());
  Publish(Table(
              1, addresses_, [](int) { return std::vector<uint64_t>{1}; }, E),
          *placement);
  workers_[0]->silent_ = true;
  ExpertDispatcherOptions options;
  options.deadline = absl::Minutes(5);
  auto dispatcher = std::make_unique<RemoteExpertDispatcher>(placement.get(), options);

  const Inputs in = MakeInputs(4, model_->D, {0, 1, 2}, 8);
  auto pending = dispatcher->Start(kBlock, in.x.data(), in.n, model_->D, in.items);
  ASSERT_TRUE(pending.ok()) << pending.status();
  // Let the request reach the worker, so a stream and a dispatch are really open.
  const absl::Time until = absl::Now() + absl::Seconds(20);
  while (workers_[0]->requests().empty() && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_EQ(workers_[0]->requests().size(), 1u);

  const absl::Time start = absl::Now();
  dispatcher.reset();
  placement.reset();  // its watch stream is open too
  EXPECT_LT(absl::Now() - start, options.deadline);
  auto results = (*pending)->Wait();
  EXPECT_EQ(results.status().code(), absl::StatusCode::kCancelled) << results.status();
}

TEST_F(DispatchFixture, ConcurrentCallsAreAllExact) {
  const int E = model_->experts;
  PlacementClient placement(router_server_->address());
  Publish(Table(
              1, addresses_,
              [](int e) {
                return std::vector<uint64_t>{e % 2 == 0 ? 1u : 2u, e % 2 == 0 ? 2u : 1u};
              },
              E),
          placement);
  workers_[0]->delay_ms_ = 5;  // replies overlap and come back while others are queued
  RemoteExpertDispatcher dispatcher(&placement);
  constexpr int kThreads = 4;
  constexpr int kCalls = 5;
  std::vector<std::thread> threads;
  std::atomic<int> exact{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int c = 0; c < kCalls; ++c) {
        const Inputs in =
            MakeInputs(2 + (t + c) % 5, model_->D, {t, 4 + c, 10 + t % 3}, 100 + t * 10 + c);
        auto results = Dispatch(dispatcher, in, model_->D);
        if (!results.ok() || !results->failed_items.empty()) continue;
        bool all = true;
        for (size_t i = 0; i < in.items.size(); ++i) {
          const std::vector<float> expected = Expected(*model_, kBlock, in, in.items[i]);
          all = all && results->outputs[i].size() == expected.size() &&
                std::memcmp(results->outputs[i].data(), expected.data(),
                            expected.size() * sizeof(float)) == 0;
        }
        if (all) ++exact;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(exact.load(), kThreads * kCalls);
  EXPECT_EQ(dispatcher.stats().retries, 0);
  EXPECT_EQ(dispatcher.stats().streams_opened, 2);
}

TEST_F(DispatchFixture, RejectsMalformedItemsNamingTheExpert) {
  PlacementClient placement(router_server_->address());
  RemoteExpertDispatcher dispatcher(&placement);
  Inputs in = MakeInputs(4, model_->D, {2, 6}, 9);
  in.items[1].rows.push_back(4);
  in.items[1].weights.push_back(1.0f);
  auto out_of_range = dispatcher.Start(kBlock, in.x.data(), in.n, model_->D, in.items);
  EXPECT_EQ(out_of_range.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(out_of_range.status().message()), HasSubstr("(layer 1, expert 6)"));

  Inputs unordered = MakeInputs(4, model_->D, {6, 2}, 9);
  auto descending =
      dispatcher.Start(kBlock, unordered.x.data(), unordered.n, model_->D, unordered.items);
  EXPECT_EQ(descending.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(descending.status().message()), HasSubstr("ascending"));
}

// The real expert worker service (expert-worker/) answers this client's dispatches with the same
// bytes as RunExpert: the two halves of the protocol agree.
TEST_F(DispatchFixture, TheRealExpertWorkerServiceAnswersExactly) {
  const int E = model_->experts;
  prometheus::Registry worker_registry;
  expert_worker::ExpertWorkerOptions wopts;
  wopts.model_dir = model_->dir;
  auto service = expert_worker::ExpertWorkerService::Create(wopts, worker_registry);
  ASSERT_TRUE(service.ok()) << service.status();
  auto server = Serve(service->get());
  ASSERT_NE(server, nullptr);
  {
    auto stub = v1::ExpertWorker::NewStub(rpc::MakeChannel(server->address()));
    grpc::ClientContext context;
    rpc::SetTimeout(context, absl::Seconds(30));
    v1::LoadExpertsRequest load;
    load.set_placement_version(1);
    for (int e = 0; e < E; ++e) {
      v1::ExpertId* id = load.add_experts();
      id->set_layer(kBlock);
      id->set_expert(e);
    }
    v1::LoadExpertsResponse loaded;
    grpc::Status status = stub->LoadExperts(&context, load, &loaded);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  PlacementClient placement(router_server_->address());
  Publish(Table(
              1, {server->address()}, [](int) { return std::vector<uint64_t>{1}; }, E),
          placement);
  RemoteExpertDispatcher dispatcher(&placement);
  const Inputs in = MakeInputs(9, model_->D, {0, 2, 5, 11, 14}, 10);
  auto results = Dispatch(dispatcher, in, model_->D);
  ASSERT_TRUE(results.ok()) << results.status();
  EXPECT_TRUE(results->failed_items.empty()) << results->error;
  for (size_t i = 0; i < in.items.size(); ++i) ExpectExact(*model_, in, *results, i);
  EXPECT_EQ(dispatcher.dispatches_sent(server->address()), 1);
  server->Stop();
}

}  // namespace
}  // namespace expertmesh::attention_worker
