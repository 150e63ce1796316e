#include "core/rpc/router_registration.h"

#include <atomic>

#include "core/rpc/reactors.h"
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
    response->set_worker_id(++next_id_);
    response->set_lease_ttl_ms(300);
    response->set_heartbeat_interval_ms(50);
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
    response->set_lease_ttl_ms(300);
    response->set_heartbeat_interval_ms(50);
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
  std::string last_address_;
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

}  // namespace
}  // namespace expertmesh::rpc
