// LocalCluster as a library: the port scheme, flag probing, and a router + attention worker +
// expert workers cluster (what `score --cluster N` starts) that starts, reports its addresses,
// reports a dead worker, and leaves no process or temporary directory behind.
#include "cli/local_cluster.h"

#include <signal.h>
#include <sys/stat.h>

#include <set>

#include "core/rpc/channel.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "gtest/gtest.h"

namespace expertmesh::cli {
namespace {

bool Alive(pid_t pid) {
  // Reaped children are gone; kill(0) on a pid we no longer own would only find a reuse.
  return kill(pid, 0) == 0;
}

TEST(PortLayoutTest, DefaultClusterKeepsItsPorts) {
  for (int i = 0; i < 6; ++i) {
    PortLayout p = PortsFor(50050, i, 6);
    EXPECT_EQ(p.grpc, 50050 + i);
    EXPECT_EQ(p.metrics, 50060 + i);
  }
  EXPECT_EQ(PortsFor(0, 3, 6).grpc, 0);
  EXPECT_EQ(PortsFor(0, 3, 6).metrics, 0);
}

TEST(PortLayoutTest, LargeClusterNeverReusesAPort) {
  const int n = 3 + 16 + 40;
  std::set<int> ports;
  for (int i = 0; i < n; ++i) {
    PortLayout p = PortsFor(40000, i, n);
    EXPECT_TRUE(ports.insert(p.grpc).second) << "gRPC port of service " << i;
    EXPECT_TRUE(ports.insert(p.metrics).second) << "metrics port of service " << i;
  }
  EXPECT_TRUE(PortRangeFits(40000, n));
  EXPECT_FALSE(PortRangeFits(65535 - n, n));
  EXPECT_TRUE(PortRangeFits(0, n));
}

TEST(BinaryHasFlagTest, ReadsTheHelpText) {
  const std::string router = std::string(EM_BINARY_DIR) + "/router/expertmesh-router";
  EXPECT_TRUE(BinaryHasFlag(router, "lease-ms"));
  EXPECT_FALSE(BinaryHasFlag(router, "lease"));  // a prefix of a flag is not the flag
  EXPECT_FALSE(BinaryHasFlag(router, "no-such-flag"));
  EXPECT_FALSE(BinaryHasFlag("/nonexistent/binary", "lease-ms"));
}

LocalClusterOptions SmallCluster(int experts) {
  LocalClusterOptions o;
  o.bin_dir = EM_BINARY_DIR;
  o.model_dir = std::string(EM_SHARED_DIR) + "/golden/tiny-a";
  o.attention_workers = 1;
  o.expert_workers = experts;
  o.with_gateway = false;
  o.with_kv_store = false;
  o.base_port = 0;
  o.lease_ms = 2000;
  o.quiet = true;
  return o;
}

TEST(LocalClusterTest, StartsRouterAttentionAndExpertWorkersAndStopsThem) {
  auto cluster = StartLocalCluster(SmallCluster(2));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  LocalCluster& c = **cluster;
  std::vector<std::string> names;
  std::vector<pid_t> pids;
  for (const ClusterMember& m : c.members()) {
    names.push_back(m.name);
    pids.push_back(m.pid);
  }
  EXPECT_EQ(names, (std::vector<std::string>{"router", "attention-worker-0", "expert-worker-0",
                                             "expert-worker-1"}));
  EXPECT_EQ(c.kv_store_address(), "");
  EXPECT_EQ(c.http_url(), "");
  ASSERT_EQ(c.attention_worker_addresses().size(), 1u);
  ASSERT_EQ(c.expert_worker_addresses().size(), 2u);
  std::vector<std::string> workers = c.attention_worker_addresses();
  for (const std::string& a : c.expert_worker_addresses()) workers.push_back(a);
  for (const std::string& a : workers) EXPECT_TRUE(rpc::CheckHealth(a).ok()) << a;

  auto stub = expertmesh::v1::Router::NewStub(rpc::MakeChannel(c.router_address()));
  grpc::ClientContext context;
  rpc::SetTimeout(context, absl::Seconds(2));
  expertmesh::v1::ListMembersResponse members;
  ASSERT_TRUE(stub->ListMembers(&context, {}, &members).ok());
  std::set<std::string> listed;
  for (const auto& m : members.members()) listed.insert(m.address());
  for (const std::string& a : workers) EXPECT_TRUE(listed.count(a)) << a << " not registered";

  const std::string log_dir = c.options().log_dir;
  struct stat st;
  EXPECT_EQ(stat(log_dir.c_str(), &st), 0) << "no temporary log directory";
  EXPECT_TRUE(c.Supervise().ok());
  c.Stop();
  for (pid_t pid : pids) EXPECT_FALSE(Alive(pid)) << pid;
  EXPECT_NE(stat(log_dir.c_str(), &st), 0) << log_dir << " left behind";
}

TEST(LocalClusterTest, WithoutRestartsADeadWorkerIsAnError) {
  auto cluster = StartLocalCluster(SmallCluster(1));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const ClusterMember* victim = (*cluster)->Find("expert-worker-0");
  ASSERT_NE(victim, nullptr);
  ASSERT_EQ(kill(victim->pid, SIGKILL), 0);
  absl::Status status;
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (status.ok() && absl::Now() < deadline) {
    status = (*cluster)->Supervise();
    if (status.ok()) absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_NE(status.message().find("expert-worker-0"), std::string::npos) << status;
  EXPECT_NE(status.message().find("killed by signal 9"), std::string::npos) << status;
}

}  // namespace
}  // namespace expertmesh::cli
