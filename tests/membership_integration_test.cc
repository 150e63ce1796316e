// The router's membership with real processes: workers register, heartbeat, and a worker killed
// with SIGKILL is dropped within its lease while the survivor stays; a restarted router gets
// its members back.
#include <signal.h>

#include "core/rpc/channel.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/service_harness.h"
#include "tests/testing/prom_text.h"

namespace expertmesh::testing {
namespace {

constexpr int kLeaseMs = 1500;

absl::StatusOr<std::vector<expertmesh::v1::Member>> ListMembers(const std::string& router) {
  auto stub = expertmesh::v1::Router::NewStub(rpc::MakeChannel(router));
  grpc::ClientContext context;
  rpc::SetTimeout(context, absl::Seconds(2));
  expertmesh::v1::ListMembersRequest request;
  expertmesh::v1::ListMembersResponse response;
  grpc::Status status = stub->ListMembers(&context, request, &response);
  if (!status.ok()) return absl::UnavailableError(status.error_message());
  return std::vector<expertmesh::v1::Member>(response.members().begin(), response.members().end());
}

bool HasMember(const std::vector<expertmesh::v1::Member>& members, const std::string& address) {
  for (const auto& m : members) {
    if (m.address() == address) return true;
  }
  return false;
}

// Polls ListMembers until `pred` holds or `timeout` passes; returns the last list.
template <typename Pred>
std::vector<expertmesh::v1::Member> PollMembers(const std::string& router, absl::Duration timeout,
                                                Pred pred) {
  absl::Time deadline = absl::Now() + timeout;
  std::vector<expertmesh::v1::Member> last;
  while (true) {
    auto members = ListMembers(router);
    if (members.ok()) {
      last = *members;
      if (pred(last)) return last;
    }
    if (absl::Now() > deadline) return last;
    absl::SleepFor(absl::Milliseconds(25));
  }
}

class MembershipIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = MakeTempDir("em-membership-"); }
  std::string dir_;
};

TEST_F(MembershipIntegrationTest, KilledWorkerIsDroppedWithinTheLeaseAndSurvivorStays) {
  auto router =
      StartService("router", kRouterBinary, {"--lease-ms=" + std::to_string(kLeaseMs)}, dir_);
  ASSERT_TRUE(router.ok()) << router.status();
  const std::string router_address = router->grpc_address();
  auto victim = StartService("expert-a", kExpertBinary, {"--router=" + router_address}, dir_);
  ASSERT_TRUE(victim.ok()) << victim.status();
  auto survivor = StartService("kv", kKvStoreBinary, {"--router=" + router_address}, dir_);
  ASSERT_TRUE(survivor.ok()) << survivor.status();

  auto members = PollMembers(router_address, absl::Seconds(15), [&](const auto& m) {
    return HasMember(m, victim->grpc_address()) && HasMember(m, survivor->grpc_address());
  });
  ASSERT_EQ(members.size(), 2u) << router->process->Log();
  for (const auto& m : members) {
    EXPECT_EQ(m.state(), expertmesh::v1::MEMBER_STATE_ALIVE);
    EXPECT_GT(m.capacity().memory_bytes(), 0u);
    EXPECT_EQ(m.kind(), m.address() == victim->grpc_address()
                            ? expertmesh::v1::WORKER_KIND_EXPERT
                            : expertmesh::v1::WORKER_KIND_KV_STORE);
  }

  victim->process->Signal(SIGKILL);
  const absl::Time killed = absl::Now();
  ASSERT_TRUE(victim->process->WaitForExit(absl::Seconds(5)).has_value());
  // The lease counts from the victim's last heartbeat, which came before the kill; the reaper
  // runs every TTL/10. The margin absorbs scheduling on a loaded machine.
  const absl::Duration bound = absl::Milliseconds(kLeaseMs) + absl::Milliseconds(1500);
  members = PollMembers(router_address, bound + absl::Seconds(5),
                        [&](const auto& m) { return !HasMember(m, victim->grpc_address()); });
  const absl::Duration took = absl::Now() - killed;
  EXPECT_FALSE(HasMember(members, victim->grpc_address()));
  EXPECT_LE(took, bound) << "dropped after " << took;
  // It was not dropped early either: its lease was fresh when it died.
  EXPECT_GE(took, absl::Milliseconds(kLeaseMs) / 3 - absl::Milliseconds(100));
  ASSERT_TRUE(HasMember(members, survivor->grpc_address()));
  for (const auto& m : members) EXPECT_EQ(m.state(), expertmesh::v1::MEMBER_STATE_ALIVE);

  // ListMembers hides an expired lease at once; the counter moves when the reaper (every TTL/10)
  // removes it, so poll the scrape briefly.
  absl::StatusOr<PromScrape> scrape;
  std::vector<PromSample> expired;
  const absl::Time scrape_deadline = absl::Now() + absl::Seconds(5);
  do {
    auto text = HttpRequest(router->ports.metrics, "GET", "/metrics");
    ASSERT_TRUE(text.ok()) << text.status();
    scrape = ParsePromText(text->body);
    ASSERT_TRUE(scrape.ok()) << scrape.status();
    expired = scrape->Find("expertmesh_router_lease_expirations_total", {{"kind", "expert"}});
    ASSERT_EQ(expired.size(), 1u);
    if (expired[0].value == 1) break;
    absl::SleepFor(absl::Milliseconds(20));
  } while (absl::Now() < scrape_deadline);
  EXPECT_EQ(expired[0].value, 1);
  auto alive =
      scrape->Find("expertmesh_router_members", {{"kind", "kv_store"}, {"state", "alive"}});
  ASSERT_EQ(alive.size(), 1u);
  EXPECT_EQ(alive[0].value, 1);
  auto gone = scrape->Find("expertmesh_router_members", {{"kind", "expert"}, {"state", "alive"}});
  ASSERT_EQ(gone.size(), 1u);
  EXPECT_EQ(gone[0].value, 0);
}

TEST_F(MembershipIntegrationTest, WorkersRegisterAgainWithARestartedRouter) {
  auto router =
      StartService("router", kRouterBinary, {"--lease-ms=" + std::to_string(kLeaseMs)}, dir_);
  ASSERT_TRUE(router.ok()) << router.status();
  const int port = router->ports.grpc;
  const std::string router_address = router->grpc_address();
  auto worker = StartService("attn", kAttentionBinary, {"--router=" + router_address}, dir_);
  ASSERT_TRUE(worker.ok()) << worker.status();
  auto members =
      PollMembers(router_address, absl::Seconds(15), [&](const auto& m) { return m.size() == 1; });
  ASSERT_EQ(members.size(), 1u);

  router->process->Signal(SIGTERM);
  ASSERT_TRUE(router->process->WaitForExit(absl::Seconds(5)).has_value());
  // A new router on the same port: the worker only knows this address.
  std::vector<std::string> argv = {
      BinaryPath(kRouterBinary), "--listen=127.0.0.1:" + std::to_string(port),
      "--metrics-listen=127.0.0.1:0", "--lease-ms=" + std::to_string(kLeaseMs),
      "--ready-file=" + dir_ + "/router3.ready"};
  auto again = ChildProcess::Start(argv, dir_ + "/router3.log");
  ASSERT_TRUE(again.ok());
  auto ready = WaitForReadyFile(dir_ + "/router3.ready", again->get(), absl::Seconds(30));
  ASSERT_TRUE(ready.ok()) << ready.status();
  members = PollMembers(router_address, absl::Seconds(15),
                        [&](const auto& m) { return HasMember(m, worker->grpc_address()); });
  EXPECT_TRUE(HasMember(members, worker->grpc_address())) << worker->process->Log();
}

}  // namespace
}  // namespace expertmesh::testing
