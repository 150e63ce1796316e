// The real expert worker binary leaving the cluster on SIGTERM: it tells the router it is
// draining, keeps answering dispatches until the router says nobody routes to it any more, then
// unloads and exits 0; without that answer (router that does not say so, or gone) it still exits
// after --drain-timeout-ms. It also re-registers with what it hosts, so that a restarted router
// can rebuild its placement table.
#include <signal.h>
#include <sys/wait.h>

#include <atomic>

#include "absl/synchronization/mutex.h"
#include "core/model/checkpoint.h"
#include "core/rpc/channel.h"
#include "core/rpc/reactors.h"
#include "expertmesh/v1/expert_worker.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "tests/service_harness.h"
#include "tests/testing/prom_text.h"

namespace expertmesh::testing {
namespace {

std::string ModelDir() { return std::string(EM_SHARED_DIR) + "/golden/tiny-a"; }

// A router that records what workers tell it and answers drained only when the test says so.
class FakeRouter final : public expertmesh::v1::Router::CallbackService {
 public:
  grpc::ServerUnaryReactor* RegisterWorker(
      grpc::CallbackServerContext* context, const expertmesh::v1::RegisterWorkerRequest* request,
      expertmesh::v1::RegisterWorkerResponse* response) override {
    absl::MutexLock lock(&mu_);
    registrations_.push_back(*request);
    response->set_worker_id(++next_id_);
    response->set_lease_ttl_ms(3000);
    response->set_heartbeat_interval_ms(100);
    return rpc::FinishUnary(context, grpc::Status::OK);
  }
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* context,
                                      const expertmesh::v1::HeartbeatRequest* request,
                                      expertmesh::v1::HeartbeatResponse* response) override {
    absl::MutexLock lock(&mu_);
    if (forget_ || request->worker_id() != next_id_) {
      forget_ = false;
      return rpc::FinishUnary(context, grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown"));
    }
    saw_draining_ |= request->draining();
    response->set_lease_ttl_ms(3000);
    response->set_heartbeat_interval_ms(100);
    response->set_drained(request->draining() && answer_drained_);
    return rpc::FinishUnary(context, grpc::Status::OK);
  }
  grpc::ServerUnaryReactor* Deregister(grpc::CallbackServerContext* context,
                                       const expertmesh::v1::DeregisterRequest*,
                                       expertmesh::v1::DeregisterResponse*) override {
    absl::MutexLock lock(&mu_);
    deregistered_ = true;
    return rpc::FinishUnary(context, grpc::Status::OK);
  }

  absl::Mutex mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;
  bool forget_ ABSL_GUARDED_BY(mu_) = false;
  bool saw_draining_ ABSL_GUARDED_BY(mu_) = false;
  bool answer_drained_ ABSL_GUARDED_BY(mu_) = false;
  bool deregistered_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<expertmesh::v1::RegisterWorkerRequest> registrations_ ABSL_GUARDED_BY(mu_);
};

template <typename Pred>
bool WaitFor(Pred pred, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!pred()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return true;
}

class ExpertWorkerIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = MakeTempDir("em-expert-worker-"); }

  static std::unique_ptr<expertmesh::v1::ExpertWorker::Stub> Stub(const RunningService& s) {
    return expertmesh::v1::ExpertWorker::NewStub(rpc::MakeChannel(s.grpc_address()));
  }

  static grpc::Status Load(const RunningService& s, std::vector<std::pair<int, int>> ids,
                           uint64_t version) {
    grpc::ClientContext context;
    rpc::SetTimeout(context, absl::Seconds(30));
    expertmesh::v1::LoadExpertsRequest request;
    for (auto [l, e] : ids) {
      auto* id = request.add_experts();
      id->set_layer(l);
      id->set_expert(e);
    }
    request.set_placement_version(version);
    expertmesh::v1::LoadExpertsResponse response;
    return Stub(s)->LoadExperts(&context, request, &response);
  }

  static absl::StatusOr<expertmesh::v1::ExpertStatusResponse> Status(const RunningService& s) {
    grpc::ClientContext context;
    rpc::SetTimeout(context, absl::Seconds(5));
    expertmesh::v1::ExpertStatusResponse response;
    grpc::Status st = Stub(s)->GetStatus(&context, {}, &response);
    if (!st.ok()) return absl::UnavailableError(st.error_message());
    return response;
  }

  // Waits for the exit and checks it was a clean exit 0.
  static void ExpectCleanExit(RunningService& s, absl::Duration within) {
    std::optional<int> status = s.process->WaitForExit(within);
    ASSERT_TRUE(status.has_value()) << "still running after " << within << "\n"
                                    << s.process->Log();
    EXPECT_TRUE(WIFEXITED(*status)) << s.process->Log();
    EXPECT_EQ(WEXITSTATUS(*status), 0) << s.process->Log();
  }

  std::string dir_;
};

TEST_F(ExpertWorkerIntegrationTest, SigtermDrainsThroughTheRouterWhileStillServing) {
  FakeRouter router;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&router);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);

  // A drain timeout far beyond the test's bounds: only the router's answer can end this drain.
  auto worker = StartService("expert", kExpertBinary,
                             {"--router=127.0.0.1:" + std::to_string(port),
                              "--model=" + ModelDir(), "--drain-timeout-ms=600000"},
                             dir_);
  ASSERT_TRUE(worker.ok()) << worker.status();
  ASSERT_TRUE(WaitFor(
      [&] {
        absl::MutexLock lock(&router.mu_);
        return !router.registrations_.empty();
      },
      absl::Seconds(15)));
  {
    absl::MutexLock lock(&router.mu_);
    EXPECT_FALSE(router.registrations_[0].kernel_target().empty());
    EXPECT_EQ(router.registrations_[0].hosted_experts_size(), 0);
  }
  ASSERT_TRUE(Load(*worker, {{1, 2}, {3, 7}}, 5).ok());

  // The router restarts (forgets the worker): the worker registers again with its experts.
  {
    absl::MutexLock lock(&router.mu_);
    router.forget_ = true;
  }
  ASSERT_TRUE(WaitFor(
      [&] {
        absl::MutexLock lock(&router.mu_);
        return router.registrations_.size() >= 2;
      },
      absl::Seconds(15)));
  {
    absl::MutexLock lock(&router.mu_);
    const auto& again = router.registrations_.back();
    ASSERT_EQ(again.hosted_experts_size(), 2);
    EXPECT_EQ(again.hosted_experts(0).layer(), 1u);
    EXPECT_EQ(again.hosted_experts(0).expert(), 2u);
    EXPECT_EQ(again.hosted_experts(1).layer(), 3u);
    EXPECT_EQ(again.hosted_experts(1).expert(), 7u);
    EXPECT_EQ(again.hosted_placement_version(), 5u);
    EXPECT_EQ(again.kernel_target(), router.registrations_[0].kernel_target());
  }

  worker->process->Signal(SIGTERM);
  ASSERT_TRUE(WaitFor(
      [&] {
        absl::MutexLock lock(&router.mu_);
        return router.saw_draining_;
      },
      absl::Seconds(15)))
      << worker->process->Log();
  // Draining, not gone: it answers, reports draining, and computes.
  auto st = Status(*worker);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(st->draining());
  EXPECT_EQ(st->experts_size(), 2);
  auto metrics = HttpRequest(worker->ports.metrics, "GET", "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  auto scrape = ParsePromText(metrics->body);
  ASSERT_TRUE(scrape.ok()) << scrape.status();
  auto draining = scrape->Find("expertmesh_expert_draining");
  ASSERT_EQ(draining.size(), 1u);
  EXPECT_EQ(draining[0].value, 1);

  auto ckpt = model::Checkpoint::Open(ModelDir());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const int64_t hidden = (*ckpt)->config().hidden_size;
  grpc::ClientContext context;
  rpc::SetTimeout(context, absl::Seconds(30));
  auto stub = Stub(*worker);
  auto stream = stub->Dispatch(&context);
  expertmesh::v1::DispatchRequest request;
  request.set_batch_id(1);
  request.set_layer(3);
  request.set_placement_version(5);
  request.mutable_tokens()->set_dtype(expertmesh::v1::DTYPE_F32);
  request.mutable_tokens()->add_shape(2);
  request.mutable_tokens()->add_shape(hidden);
  std::vector<float> x(2 * hidden, 0.5f);
  request.mutable_tokens()->set_data(
      std::string(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float)));
  auto* batch = request.add_experts();
  batch->set_expert(7);
  batch->add_rows(1);
  batch->add_weights(1.0f);
  ASSERT_TRUE(stream->Write(request));
  expertmesh::v1::DispatchResponse reply;
  ASSERT_TRUE(stream->Read(&reply));
  EXPECT_EQ(reply.code(), 0) << reply.message();
  ASSERT_EQ(reply.outputs_size(), 1);
  EXPECT_EQ(reply.outputs(0).outputs().data().size(), hidden * sizeof(float));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_FALSE(worker->process->WaitForExit(absl::Milliseconds(300)).has_value())
      << "left before the router said drained";

  {
    absl::MutexLock lock(&router.mu_);
    router.answer_drained_ = true;
  }
  ASSERT_NO_FATAL_FAILURE(ExpectCleanExit(*worker, absl::Seconds(20)));
  absl::MutexLock lock(&router.mu_);
  EXPECT_TRUE(router.deregistered_);
  server->Shutdown(std::chrono::system_clock::now());
}

TEST_F(ExpertWorkerIntegrationTest, SigtermExitsAfterTheDrainTimeoutWithTheRealRouter) {
  auto router = StartService("router", kRouterBinary, {"--lease-ms=3000"}, dir_);
  ASSERT_TRUE(router.ok()) << router.status();
  auto worker = StartService(
      "expert", kExpertBinary,
      {"--router=" + router->grpc_address(), "--model=" + ModelDir(), "--drain-timeout-ms=1500"},
      dir_);
  ASSERT_TRUE(worker.ok()) << worker.status();
  ASSERT_TRUE(Load(*worker, {{0, 1}}, 1).ok());
  // An attention worker's stream left open must not hold the exit up: shutdown cancels it.
  grpc::ClientContext context;
  rpc::SetTimeout(context, absl::Seconds(120));
  auto stub = Stub(*worker);
  auto stream = stub->Dispatch(&context);
  expertmesh::v1::DispatchRequest request;
  request.set_batch_id(1);
  request.set_layer(0);  // no tokens: an error reply, proving the stream is up
  ASSERT_TRUE(stream->Write(request));
  expertmesh::v1::DispatchResponse reply;
  ASSERT_TRUE(stream->Read(&reply));
  EXPECT_EQ(reply.code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  worker->process->Signal(SIGTERM);
  // The router answers drained (no attention worker routes here) or the timeout ends the drain.
  ASSERT_NO_FATAL_FAILURE(ExpectCleanExit(*worker, absl::Seconds(20)));
  EXPECT_FALSE(stream->Read(&reply));
  EXPECT_FALSE(stream->Finish().ok());
  EXPECT_NE(worker->process->Log().find("drained; experts unloaded"), std::string::npos)
      << worker->process->Log();
}

TEST_F(ExpertWorkerIntegrationTest, SigtermExitsAfterTheDrainTimeoutWhenTheRouterIsGone) {
  auto router = StartService("router", kRouterBinary, {"--lease-ms=3000"}, dir_);
  ASSERT_TRUE(router.ok()) << router.status();
  auto worker = StartService(
      "expert", kExpertBinary,
      {"--router=" + router->grpc_address(), "--model=" + ModelDir(), "--drain-timeout-ms=1500"},
      dir_);
  ASSERT_TRUE(worker.ok()) << worker.status();
  ASSERT_TRUE(Load(*worker, {{0, 1}, {2, 3}}, 1).ok());
  router->process->Signal(SIGKILL);
  ASSERT_TRUE(router->process->WaitForExit(absl::Seconds(5)).has_value());
  const absl::Time start = absl::Now();
  worker->process->Signal(SIGTERM);
  ASSERT_NO_FATAL_FAILURE(ExpectCleanExit(*worker, absl::Seconds(20)));
  // Nobody could say drained: the timeout ended it.
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(1500));
  EXPECT_NE(worker->process->Log().find("\"timeout\""), std::string::npos) << worker->process->Log();
}

TEST_F(ExpertWorkerIntegrationTest, DrainRpcEndsTheProcessByItself) {
  auto router = StartService("router", kRouterBinary, {"--lease-ms=3000"}, dir_);
  ASSERT_TRUE(router.ok()) << router.status();
  auto worker = StartService("expert", kExpertBinary,
                             {"--router=" + router->grpc_address(), "--model=" + ModelDir()},
                             dir_);
  ASSERT_TRUE(worker.ok()) << worker.status();
  ASSERT_TRUE(Load(*worker, {{1, 1}}, 1).ok());
  grpc::ClientContext context;
  rpc::SetTimeout(context, absl::Seconds(10));
  expertmesh::v1::ExpertDrainRequest request;
  request.set_grace_ms(1000);  // bounds the wait whether or not the router answers drained
  expertmesh::v1::ExpertDrainResponse response;
  grpc::Status status = Stub(*worker)->Drain(&context, request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.loaded_experts(), 1u);
  // No signal: the worker leaves once drained.
  ASSERT_NO_FATAL_FAILURE(ExpectCleanExit(*worker, absl::Seconds(20)));
}

}  // namespace
}  // namespace expertmesh::testing
