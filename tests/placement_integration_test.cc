// The router's placement table with the real router binary and in-test expert workers (a small
// ExpertWorker gRPC service on loopback that records LoadExperts/UnloadExperts and holds a
// membership through RegisterWorker/Heartbeat like a real worker): workers join and get every
// expert, each after loading it; a third worker takes a share; a silent worker is removed
// within its lease and its experts re-placed; a restarted router rebuilds the table from the
// workers without loading anything and its version goes on above the old one.
#include <signal.h>

#include <atomic>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "core/rpc/channel.h"
#include "expertmesh/v1/expert_worker.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "tests/service_harness.h"
#include "tests/testing/model_config_json.h"
#include "tests/testing/prom_text.h"

namespace expertmesh::testing {
namespace {

using expertmesh::v1::PlacementTable;

constexpr int kLeaseMs = 1500;
constexpr int kLayers = 2, kMtpLayers = 1, kExperts = 8;
constexpr int kKeys = (kLayers + kMtpLayers) * kExperts;

using Key = std::pair<uint32_t, uint32_t>;

absl::StatusOr<PlacementTable> GetPlacement(const std::string& router) {
  auto stub = expertmesh::v1::Router::NewStub(rpc::MakeChannel(router));
  grpc::ClientContext context;
  rpc::SetTimeout(context, absl::Seconds(2));
  PlacementTable table;
  grpc::Status status = stub->GetPlacement(&context, {}, &table);
  if (!status.ok()) return absl::UnavailableError(status.error_message());
  return table;
}

std::set<Key> ListedOn(const PlacementTable& t, uint64_t worker) {
  std::set<Key> out;
  for (const auto& p : t.experts()) {
    for (uint64_t id : p.worker_ids()) {
      if (id == worker) out.insert({p.layer(), p.expert()});
    }
  }
  return out;
}

template <typename Pred>
PlacementTable PollPlacement(const std::string& router, absl::Duration timeout, Pred pred) {
  const absl::Time deadline = absl::Now() + timeout;
  PlacementTable last;
  while (true) {
    auto t = GetPlacement(router);
    if (t.ok()) {
      last = *t;
      if (pred(last)) return last;
    }
    if (absl::Now() > deadline) return last;
    absl::SleepFor(absl::Milliseconds(25));
  }
}

// An expert worker in the test process.
class FakeExpertWorker final : public expertmesh::v1::ExpertWorker::CallbackService {
 public:
  explicit FakeExpertWorker(std::string router) : router_(std::move(router)) {}
  ~FakeExpertWorker() override { Shutdown(); }

  void Start() {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(this);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port_, 0);
    address_ = "127.0.0.1:" + std::to_string(port_);
    router_stub_ = expertmesh::v1::Router::NewStub(rpc::MakeChannel(router_));
    thread_ = std::thread([this] { HeartbeatLoop(); });
  }
  // As if the process hung: no more heartbeats (its server still answers).
  void StopHeartbeats() {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    if (thread_.joinable()) thread_.join();
  }
  void Shutdown() {
    StopHeartbeats();
    if (server_) {
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
      server_.reset();
    }
  }

  grpc::ServerUnaryReactor* LoadExperts(grpc::CallbackServerContext* context,
                                        const expertmesh::v1::LoadExpertsRequest* request,
                                        expertmesh::v1::LoadExpertsResponse* response) override {
    // What the router publishes while this load runs must not list these experts here yet.
    auto during = GetPlacement(router_);
    absl::MutexLock lock(&mu_);
    ++loads_;
    if (!during.ok()) {
      violations_.push_back("GetPlacement during LoadExperts failed: " +
                            std::string(during.status().message()));
    }
    const std::set<Key> listed = during.ok() ? ListedOn(*during, worker_id_) : std::set<Key>{};
    for (const auto& e : request->experts()) {
      if (listed.count({e.layer(), e.expert()})) {
        violations_.push_back("version " + std::to_string(during->version()) + " lists (" +
                              std::to_string(e.layer()) + "," + std::to_string(e.expert()) +
                              ") on this worker before its load finished");
      }
      loaded_.insert({e.layer(), e.expert()});
      *response->add_loaded() = e;
    }
    seen_version_ = std::max(seen_version_, request->placement_version());
    return Finish(context);
  }

  grpc::ServerUnaryReactor* UnloadExperts(grpc::CallbackServerContext* context,
                                          const expertmesh::v1::UnloadExpertsRequest* request,
                                          expertmesh::v1::UnloadExpertsResponse*) override {
    absl::MutexLock lock(&mu_);
    ++unloads_;
    for (const auto& e : request->experts()) loaded_.erase({e.layer(), e.expert()});
    return Finish(context);
  }

  const std::string& address() const { return address_; }
  uint64_t worker_id() const {
    absl::MutexLock lock(&mu_);
    return worker_id_;
  }
  int loads() const {
    absl::MutexLock lock(&mu_);
    return loads_;
  }
  int unloads() const {
    absl::MutexLock lock(&mu_);
    return unloads_;
  }
  std::set<Key> loaded() const {
    absl::MutexLock lock(&mu_);
    return loaded_;
  }
  uint64_t seen_version() const {
    absl::MutexLock lock(&mu_);
    return seen_version_;
  }
  int registrations() const {
    absl::MutexLock lock(&mu_);
    return registrations_;
  }
  std::vector<std::string> violations() const {
    absl::MutexLock lock(&mu_);
    return violations_;
  }

 private:
  static grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* context) {
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  void HeartbeatLoop() {
    while (true) {
      {
        absl::MutexLock lock(&mu_);
        auto stopping = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stopping_; };
        mu_.AwaitWithTimeout(absl::Condition(&stopping), absl::Milliseconds(kLeaseMs / 5));
        if (stopping_) return;
      }
      uint64_t id = worker_id();
      if (id == 0) {
        Register();
      } else {
        expertmesh::v1::HeartbeatRequest request;
        request.set_worker_id(id);
        request.set_address(address_);
        expertmesh::v1::HeartbeatResponse response;
        grpc::ClientContext context;
        rpc::SetTimeout(context, absl::Seconds(1));
        grpc::Status status = router_stub_->Heartbeat(&context, request, &response);
        absl::MutexLock lock(&mu_);
        if (status.error_code() == grpc::StatusCode::NOT_FOUND) worker_id_ = 0;
        if (status.ok()) seen_version_ = std::max(seen_version_, response.placement_version());
      }
    }
  }

  void Register() {
    expertmesh::v1::RegisterWorkerRequest request;
    request.set_kind(expertmesh::v1::WORKER_KIND_EXPERT);
    request.set_address(address_);
    request.set_kernel_target("generic");
    {
      absl::MutexLock lock(&mu_);
      for (const Key& k : loaded_) {
        auto* e = request.add_hosted_experts();
        e->set_layer(k.first);
        e->set_expert(k.second);
      }
      request.set_hosted_placement_version(seen_version_);
    }
    expertmesh::v1::RegisterWorkerResponse response;
    grpc::ClientContext context;
    rpc::SetTimeout(context, absl::Seconds(1));
    if (!router_stub_->RegisterWorker(&context, request, &response).ok()) return;
    absl::MutexLock lock(&mu_);
    worker_id_ = response.worker_id();
    ++registrations_;
  }

  const std::string router_;
  std::unique_ptr<expertmesh::v1::Router::Stub> router_stub_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::string address_;
  std::thread thread_;
  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t worker_id_ ABSL_GUARDED_BY(mu_) = 0;
  int registrations_ ABSL_GUARDED_BY(mu_) = 0;
  int loads_ ABSL_GUARDED_BY(mu_) = 0;
  int unloads_ ABSL_GUARDED_BY(mu_) = 0;
  std::set<Key> loaded_ ABSL_GUARDED_BY(mu_);
  uint64_t seen_version_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::string> violations_ ABSL_GUARDED_BY(mu_);
};

// Collects every table a WatchPlacement stream delivers.
class Watcher {
 public:
  Watcher(const std::string& router, uint64_t known) {
    stub_ = expertmesh::v1::Router::NewStub(rpc::MakeChannel(router));
    // A long deadline: the stream is ended by the test (cancel) or by the router's shutdown.
    rpc::SetTimeout(context_, absl::Seconds(120));
    expertmesh::v1::WatchPlacementRequest request;
    request.set_known_version(known);
    reader_ = stub_->WatchPlacement(&context_, request);
    thread_ = std::thread([this] {
      PlacementTable t;
      while (reader_->Read(&t)) {
        absl::MutexLock lock(&mu_);
        tables_.push_back(t);
      }
      grpc::Status status = reader_->Finish();
      absl::MutexLock lock(&mu_);
      status_ = status;
      done_ = true;
    });
  }
  ~Watcher() {
    context_.TryCancel();
    thread_.join();
  }
  std::vector<PlacementTable> tables() const {
    absl::MutexLock lock(&mu_);
    return tables_;
  }
  // The stream's final status once it ended within `timeout`.
  std::optional<grpc::Status> WaitDone(absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto done = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return done_; };
    if (!mu_.AwaitWithTimeout(absl::Condition(&done), timeout)) return std::nullopt;
    return status_;
  }

 private:
  std::unique_ptr<expertmesh::v1::Router::Stub> stub_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReader<PlacementTable>> reader_;
  std::thread thread_;
  mutable absl::Mutex mu_;
  std::vector<PlacementTable> tables_ ABSL_GUARDED_BY(mu_);
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;
};

bool CoversEveryExpert(const PlacementTable& t) {
  std::set<Key> keys;
  for (const auto& p : t.experts()) {
    if (p.worker_ids_size() > 0) keys.insert({p.layer(), p.expert()});
  }
  return static_cast<int>(keys.size()) == kKeys && t.unplaced_size() == 0;
}

class PlacementIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("em-placement-");
    model_ = dir_ + "/model";
    ASSERT_EQ(::mkdir(model_.c_str(), 0755), 0);
    std::ofstream(model_ + "/config.json")
        << SmallModelConfigJson(kLayers, kMtpLayers, kExperts);
  }
  std::vector<std::string> RouterArgs() const {
    return {"--lease-ms=" + std::to_string(kLeaseMs), "--model=" + model_};
  }
  std::string dir_, model_;
};

TEST_F(PlacementIntegrationTest, WorkersJoinGetExpertsAfterLoadingAndALostOneIsReplaced) {
  auto router = StartService("router", kRouterBinary, RouterArgs(), dir_);
  ASSERT_TRUE(router.ok()) << router.status();
  const std::string addr = router->grpc_address();
  Watcher watcher(addr, 0);

  FakeExpertWorker a(addr), b(addr);
  a.Start();
  b.Start();
  PlacementTable t = PollPlacement(addr, absl::Seconds(20), [&](const PlacementTable& t) {
    return CoversEveryExpert(t) && ListedOn(t, a.worker_id()).size() == kKeys / 2 &&
           ListedOn(t, b.worker_id()).size() == kKeys / 2;
  });
  ASSERT_TRUE(CoversEveryExpert(t)) << router->process->Log();
  EXPECT_EQ(ListedOn(t, a.worker_id()).size(), static_cast<size_t>(kKeys / 2));
  EXPECT_EQ(ListedOn(t, b.worker_id()).size(), static_cast<size_t>(kKeys / 2));
  EXPECT_GE(t.version(), 1u);
  EXPECT_EQ(t.kernel_target(), "generic");
  EXPECT_EQ(t.worker_addresses().at(a.worker_id()), a.address());
  EXPECT_GE(a.loads() + b.loads(), 2);
  const uint64_t two_workers = t.version();

  FakeExpertWorker c(addr);
  c.Start();
  t = PollPlacement(addr, absl::Seconds(20), [&](const PlacementTable& t) {
    return ListedOn(t, c.worker_id()).size() == kKeys / 3 && CoversEveryExpert(t);
  });
  EXPECT_EQ(ListedOn(t, c.worker_id()).size(), static_cast<size_t>(kKeys / 3))
      << router->process->Log();
  EXPECT_GT(t.version(), two_workers);
  EXPECT_GE(c.loads(), 1);
  for (FakeExpertWorker* w : {&a, &b, &c}) {
    EXPECT_EQ(ListedOn(t, w->worker_id()).size(), static_cast<size_t>(kKeys / 3));
    for (const Key& k : ListedOn(t, w->worker_id())) EXPECT_TRUE(w->loaded().count(k));
  }
  // No attention worker routes with an older table, so the experts that moved were unloaded.
  const absl::Time unload_deadline = absl::Now() + absl::Seconds(10);
  while (a.loaded().size() + b.loaded().size() > 2u * kKeys / 3 && absl::Now() < unload_deadline) {
    absl::SleepFor(absl::Milliseconds(25));
  }
  EXPECT_EQ(a.loaded().size(), static_cast<size_t>(kKeys / 3));
  EXPECT_EQ(b.loaded().size(), static_cast<size_t>(kKeys / 3));
  EXPECT_GE(a.unloads() + b.unloads(), 1);
  const uint64_t three_workers = t.version();
  const uint64_t lost_id = b.worker_id();
  const std::set<Key> lost = ListedOn(t, lost_id);

  // b goes silent: removed at once when its lease runs out, its experts placed on a and c.
  b.StopHeartbeats();
  const absl::Time silent = absl::Now();
  t = PollPlacement(addr, absl::Milliseconds(kLeaseMs) + absl::Seconds(10),
                    [&](const PlacementTable& t) { return t.worker_addresses().count(lost_id) == 0; });
  const absl::Duration took = absl::Now() - silent;
  ASSERT_EQ(t.worker_addresses().count(lost_id), 0u) << router->process->Log();
  // Its lease counts from its last heartbeat; the margin absorbs a loaded machine.
  EXPECT_LE(took, absl::Milliseconds(kLeaseMs) + absl::Seconds(3)) << "removed after " << took;
  t = PollPlacement(addr, absl::Seconds(20), [&](const PlacementTable& t) {
    return CoversEveryExpert(t) && t.worker_addresses().count(lost_id) == 0;
  });
  ASSERT_TRUE(CoversEveryExpert(t));
  EXPECT_GE(t.version(), three_workers + 2);
  EXPECT_EQ(ListedOn(t, a.worker_id()).size() + ListedOn(t, c.worker_id()).size(),
            static_cast<size_t>(kKeys));
  for (const Key& k : lost) {
    EXPECT_TRUE(a.loaded().count(k) || c.loaded().count(k));
  }

  // The stream delivered every version in order; the first without b listed its experts as
  // unplaced (no replica), a later one had them back.
  absl::SleepFor(absl::Milliseconds(200));
  auto tables = watcher.tables();
  ASSERT_FALSE(tables.empty());
  for (size_t i = 1; i < tables.size(); ++i) {
    EXPECT_EQ(tables[i].version(), tables[i - 1].version() + 1);
  }
  EXPECT_EQ(tables.back().version(), t.version());
  bool saw_unplaced = false;
  for (const auto& table : tables) {
    if (table.version() > three_workers && table.worker_addresses().count(lost_id) == 0 &&
        !saw_unplaced) {
      EXPECT_EQ(static_cast<size_t>(table.unplaced_size()), lost.size());
      saw_unplaced = true;
    }
  }
  EXPECT_TRUE(saw_unplaced);
  for (FakeExpertWorker* w : {&a, &b, &c}) {
    for (const std::string& v : w->violations()) ADD_FAILURE() << v;
  }

  auto text = HttpRequest(router->ports.metrics, "GET", "/metrics");
  ASSERT_TRUE(text.ok()) << text.status();
  auto scrape = ParsePromText(text->body);
  ASSERT_TRUE(scrape.ok()) << scrape.status();
  auto version = scrape->Find("expertmesh_router_placement_version", {});
  ASSERT_EQ(version.size(), 1u);
  EXPECT_GE(version[0].value, static_cast<double>(t.version()));
  auto placed = scrape->Find("expertmesh_router_placed_experts", {});
  ASSERT_EQ(placed.size(), 1u);
  EXPECT_EQ(placed[0].value, kKeys);
  auto ok_loads = scrape->Find("expertmesh_router_expert_loads_total", {{"result", "ok"}});
  ASSERT_EQ(ok_loads.size(), 1u);
  EXPECT_EQ(ok_loads[0].value, a.loads() + b.loads() + c.loads());
}

TEST_F(PlacementIntegrationTest, RestartedRouterRebuildsFromTheWorkersAndItsVersionGoesOn) {
  auto router = StartService("router", kRouterBinary, RouterArgs(), dir_);
  ASSERT_TRUE(router.ok()) << router.status();
  const int port = router->ports.grpc;
  const std::string addr = router->grpc_address();
  FakeExpertWorker a(addr), b(addr);
  a.Start();
  b.Start();
  PlacementTable t = PollPlacement(addr, absl::Seconds(20), [&](const PlacementTable& t) {
    return CoversEveryExpert(t) && ListedOn(t, b.worker_id()).size() == kKeys / 2;
  });
  ASSERT_TRUE(CoversEveryExpert(t)) << router->process->Log();
  const uint64_t before = t.version();
  // Both have heard of the last version (heartbeat answers carry it) before the router dies.
  const absl::Time heard_deadline = absl::Now() + absl::Seconds(10);
  while ((a.seen_version() < before || b.seen_version() < before) && absl::Now() < heard_deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_EQ(a.seen_version(), before);
  ASSERT_EQ(b.seen_version(), before);
  const std::set<Key> on_a = ListedOn(t, a.worker_id()), on_b = ListedOn(t, b.worker_id());

  {
    // A clean shutdown ends the watch streams with OK, not by cancelling them at the deadline.
    Watcher watcher(addr, 0);
    absl::SleepFor(absl::Milliseconds(200));
    router->process->Signal(SIGTERM);
    auto status = watcher.WaitDone(absl::Seconds(10));
    ASSERT_TRUE(status.has_value());
    EXPECT_TRUE(status->ok()) << status->error_message();
    ASSERT_FALSE(watcher.tables().empty());
    EXPECT_EQ(watcher.tables().back().version(), before);
  }
  ASSERT_TRUE(router->process->WaitForExit(absl::Seconds(10)).has_value());
  const int loads_before = a.loads() + b.loads();
  const int registrations_before = a.registrations() + b.registrations();

  std::vector<std::string> argv = {BinaryPath(kRouterBinary),
                                   "--listen=127.0.0.1:" + std::to_string(port),
                                   "--metrics-listen=127.0.0.1:0",
                                   "--ready-file=" + dir_ + "/router2.ready"};
  for (const std::string& arg : RouterArgs()) argv.push_back(arg);
  auto again = ChildProcess::Start(argv, dir_ + "/router2.log");
  ASSERT_TRUE(again.ok());
  auto ready = WaitForReadyFile(dir_ + "/router2.ready", again->get(), absl::Seconds(30));
  ASSERT_TRUE(ready.ok()) << ready.status();

  t = PollPlacement(addr, absl::Seconds(20), [&](const PlacementTable& t) {
    return t.version() > 0 && CoversEveryExpert(t);
  });
  ASSERT_TRUE(CoversEveryExpert(t)) << (*again)->Log();
  EXPECT_GT(t.version(), before);
  EXPECT_GE(a.registrations() + b.registrations(), registrations_before + 2);
  // Rebuilt from what the workers hold: same experts on the same workers, nothing loaded.
  EXPECT_EQ(ListedOn(t, a.worker_id()), on_a);
  EXPECT_EQ(ListedOn(t, b.worker_id()), on_b);
  EXPECT_EQ(a.loads() + b.loads(), loads_before);
  for (FakeExpertWorker* w : {&a, &b}) {
    for (const std::string& v : w->violations()) ADD_FAILURE() << v;
  }
}

}  // namespace
}  // namespace expertmesh::testing
