#include "core/rpc/router_registration.h"

#include <atomic>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "core/rpc/reactors.h"
#include "core/rpc/service_process.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"

namespace expertmesh::rpc {
namespace {

// A router that hands out ids and can be told to forget its members.
class FakeRouter final : public expertmesh::v1::Router::CallbackService {
 public:
  grpc::ServerUnaryReactor* RegisterWorker(
      grpc::CallbackServerContext* context, const expertmesh::v1::RegisterWorkerRequest* request,
      expertmesh::v1::RegisterWorkerResponse* response) override {
    last_address_ = request->address();
    {
      absl::MutexLock lock(&mu_);
      last_register_ = *request;
    }
    response->set_worker_id(++next_id_);
    response->set_lease_ttl_ms(300);
    response->set_heartbeat_interval_ms(heartbeat_interval_ms_);
    registrations_++;
    return FinishUnary(context, grpc::Status::OK);
  }
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* context,
                                      const expertmesh::v1::HeartbeatRequest* request,
                                      expertmesh::v1::HeartbeatResponse* response) override {
    heartbeats_++;
    if (forget_.exchange(false) || request->worker_id() != next_id_.load()) {
      return FinishUnary(context, grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown worker"));
    }
    {
      absl::MutexLock lock(&mu_);
      last_heartbeat_ = *request;
    }
    response->set_lease_ttl_ms(300);
    response->set_heartbeat_interval_ms(heartbeat_interval_ms_);
    response->set_drained(drained_.load());
    return FinishUnary(context, grpc::Status::OK);
  }
  grpc::ServerUnaryReactor* Deregister(grpc::CallbackServerContext* context,
                                       const expertmesh::v1::DeregisterRequest* request,
                                       expertmesh::v1::DeregisterResponse*) override {
    deregistered_id_ = request->worker_id();
    return FinishUnary(context, grpc::Status::OK);
  }

  std::atomic<uint64_t> next_id_{0};
  std::atomic<int> registrations_{0};
  std::atomic<int> heartbeats_{0};
  std::atomic<bool> forget_{false};
  std::atomic<uint64_t> deregistered_id_{0};
  std::atomic<bool> drained_{false};
  std::atomic<uint32_t> heartbeat_interval_ms_{50};
  std::string last_address_;
  expertmesh::v1::RegisterWorkerRequest last_register() {
    absl::MutexLock lock(&mu_);
    return last_register_;
  }
  expertmesh::v1::HeartbeatRequest last_heartbeat() {
    absl::MutexLock lock(&mu_);
    return last_heartbeat_;
  }

 private:
  absl::Mutex mu_;
  expertmesh::v1::RegisterWorkerRequest last_register_;
  expertmesh::v1::HeartbeatRequest last_heartbeat_;
};

// The fake router served on loopback.
struct FakeRouterServer {
  FakeRouterServer() {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&router);
    server = builder.BuildAndStart();
  }
  ~FakeRouterServer() {
    if (server != nullptr) server->Shutdown(std::chrono::system_clock::now());
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port); }
  FakeRouter router;
  int port = 0;
  std::unique_ptr<grpc::Server> server;
};

template <typename Pred>
bool WaitFor(Pred pred, absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!pred()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

TEST(RouterRegistrationTest, RegistersHeartbeatsReRegistersWhenForgottenAndDeregisters) {
  FakeRouter router;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&router);
  auto server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);

  expertmesh::v1::RegisterWorkerRequest request;
  request.set_kind(expertmesh::v1::WORKER_KIND_EXPERT);
  request.set_address("127.0.0.1:7777");
  RouterRegistration registration("127.0.0.1:" + std::to_string(port), request);
  registration.Start();
  ASSERT_TRUE(WaitFor([&] { return registration.state().registered; }));
  EXPECT_EQ(registration.state().worker_id, 1u);
  ASSERT_TRUE(WaitFor([&] { return router.heartbeats_.load() >= 3; }));

  router.forget_ = true;
  ASSERT_TRUE(WaitFor([&] { return registration.state().worker_id == 2; }));
  EXPECT_EQ(router.registrations_.load(), 2);
  EXPECT_EQ(registration.state().registrations, 2);

  registration.Stop();
  EXPECT_EQ(router.deregistered_id_.load(), 2u);
  EXPECT_FALSE(registration.state().registered);
  server->Shutdown();
}

TEST(RouterRegistrationTest, StopIsQuickWhenTheRouterIsUnreachable) {
  expertmesh::v1::RegisterWorkerRequest request;
  request.set_kind(expertmesh::v1::WORKER_KIND_KV_STORE);
  request.set_address("127.0.0.1:7778");
  // A blackholed address: connection attempts hang until the deadline.
  RouterRegistration registration("10.255.255.1:9", request);
  registration.Start();
  // Let the first RegisterWorker (2 s deadline) get under way; Stop must cancel it rather than
  // wait for the deadline.
  absl::SleepFor(absl::Milliseconds(300));
  const absl::Time start = absl::Now();
  registration.Stop();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  EXPECT_FALSE(registration.state().registered);
}

TEST(RouterRegistrationTest, EveryRegistrationCarriesWhatIsHostedNow) {
  FakeRouterServer fake;
  ASSERT_NE(fake.server, nullptr);
  expertmesh::v1::RegisterWorkerRequest request;
  request.set_kind(expertmesh::v1::WORKER_KIND_EXPERT);
  request.set_address("127.0.0.1:7779");
  request.set_kernel_target("generic");
  std::atomic<int> hosted_calls{0};
  absl::Mutex mu;
  HostedExperts hosted;  // guarded by mu
  auto set_hosted = [&](std::vector<std::pair<int, int>> ids, uint64_t version) {
    absl::MutexLock lock(&mu);
    hosted.experts.clear();
    for (auto [l, e] : ids) {
      expertmesh::v1::ExpertId id;
      id.set_layer(l);
      id.set_expert(e);
      hosted.experts.push_back(id);
    }
    hosted.placement_version = version;
  };
  RouterRegistration registration(fake.address(), request);
  registration.SetHostedExperts([&] {
    hosted_calls++;
    absl::MutexLock lock(&mu);
    return hosted;
  });
  registration.Start();
  ASSERT_TRUE(WaitFor([&] { return registration.state().registered; }));
  expertmesh::v1::RegisterWorkerRequest first = fake.router.last_register();
  EXPECT_EQ(first.kernel_target(), "generic");
  EXPECT_EQ(first.hosted_experts_size(), 0);
  EXPECT_EQ(first.hosted_placement_version(), 0u);

  // The router restarts (forgets the worker) after experts were loaded: it hears about them.
  set_hosted({{1, 2}, {4, 0}}, 7);
  fake.router.forget_ = true;
  ASSERT_TRUE(WaitFor([&] { return registration.state().registrations == 2; }));
  expertmesh::v1::RegisterWorkerRequest second = fake.router.last_register();
  ASSERT_EQ(second.hosted_experts_size(), 2);
  EXPECT_EQ(second.hosted_experts(0).layer(), 1u);
  EXPECT_EQ(second.hosted_experts(0).expert(), 2u);
  EXPECT_EQ(second.hosted_experts(1).layer(), 4u);
  EXPECT_EQ(second.hosted_placement_version(), 7u);
  EXPECT_EQ(second.kernel_target(), "generic");
  // Asked once per registration attempt (a loaded machine may time out the first one), never
  // per heartbeat: several heartbeats later the count has not moved.
  const int asked = hosted_calls.load();
  EXPECT_GE(asked, 2);
  const int beats = fake.router.heartbeats_.load();
  ASSERT_TRUE(WaitFor([&] { return fake.router.heartbeats_.load() >= beats + 3; }));
  EXPECT_EQ(hosted_calls.load(), asked) << "asked per heartbeat";
  registration.Stop();
}

TEST(RouterRegistrationTest, HeartbeatsCarryDrainingAndPlacementVersionAndRecordDrained) {
  FakeRouterServer fake;
  ASSERT_NE(fake.server, nullptr);
  // Slow heartbeats: set_draining must not wait for the next period to be heard.
  fake.router.heartbeat_interval_ms_ = 60000;
  fake.router.drained_ = true;  // a router answers drained only to a draining worker
  expertmesh::v1::RegisterWorkerRequest request;
  request.set_kind(expertmesh::v1::WORKER_KIND_EXPERT);
  request.set_address("127.0.0.1:7780");
  RouterRegistration registration(fake.address(), request);
  registration.set_placement_version(12);
  registration.Start();
  // With a 60 s period, only the heartbeat that set_draining triggers can reach the router.
  ASSERT_TRUE(WaitFor([&] { return registration.state().registered; }));
  EXPECT_FALSE(registration.state().drained);
  const int before = fake.router.heartbeats_.load();
  registration.set_draining(true);
  ASSERT_TRUE(WaitFor([&] { return fake.router.heartbeats_.load() > before; }));
  ASSERT_TRUE(WaitFor([&] { return registration.state().drained; }));
  expertmesh::v1::HeartbeatRequest hb = fake.router.last_heartbeat();
  EXPECT_TRUE(hb.draining());
  EXPECT_EQ(hb.placement_version(), 12u);
  registration.Stop();
}

TEST(ServiceProcessTest, RegistersWithKernelTargetAndHostedExpertsAndExitsOnRequest) {
  FakeRouterServer fake;
  ASSERT_NE(fake.server, nullptr);
  CommonFlags flags;
  flags.router = fake.address();
  auto process = ServiceProcess::Create("test", flags);
  ASSERT_TRUE(process.ok()) << process.status();
  ServiceProcess* p = process->get();
  ASSERT_TRUE(p->StartGrpc().ok());
  Membership membership{expertmesh::v1::WORKER_KIND_EXPERT, {}};
  membership.kernel_target = "avx2";
  membership.hosted_experts = [] {
    HostedExperts h;
    h.experts.emplace_back().set_expert(3);
    h.placement_version = 9;
    return h;
  };
  p->StartRegistration(membership);
  ASSERT_TRUE(WaitFor([&] { return p->registration()->state().registered; }));
  expertmesh::v1::RegisterWorkerRequest got = fake.router.last_register();
  EXPECT_EQ(got.kernel_target(), "avx2");
  ASSERT_EQ(got.hosted_experts_size(), 1);
  EXPECT_EQ(got.hosted_experts(0).expert(), 3u);
  EXPECT_EQ(got.hosted_placement_version(), 9u);
  EXPECT_EQ(got.address(), p->advertised_address());

  // RequestExit from another thread ends the wait, runs the hook, then shuts down (deregisters).
  bool hook_ran = false;
  std::thread exiter([p] {
    absl::SleepFor(absl::Milliseconds(50));
    p->RequestExit();
  });
  EXPECT_EQ(p->WaitForTerminationAndShutdown([&] {
    hook_ran = true;
    // The hook runs while still registered and serving (a drain needs both).
    EXPECT_TRUE(p->registration()->state().registered);
  }),
            0);
  exiter.join();
  EXPECT_TRUE(hook_ran);
  EXPECT_EQ(fake.router.deregistered_id_.load(), fake.router.next_id_.load());
}

}  // namespace
}  // namespace expertmesh::rpc
