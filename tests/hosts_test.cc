// `expertmesh up --hosts 3` as LocalCluster runs it (issue 11, Must show): the services sit in
// three network namespaces made for the cluster, bind and advertise their namespace's address
// (198.18.x, never loopback), a chat request from this machine reaches the gateway over the
// bridge, an expert worker SIGKILLed in its namespace is handled as on loopback (requests keep
// succeeding on the other replica, supervision restarts it in the same namespace, the router
// re-places its experts), and after Stop the namespaces and the bridge are gone.
//
// Needs root (it makes namespaces); without the privilege it fails, naming it.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <functional>
#include <map>
#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "cli/local_cluster.h"
#include "cli/netns.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"
#include "tests/testing/cluster_fixture.h"
#include "tests/testing/cluster_requests.h"
#include "tests/testing/tiny_cluster.h"

namespace expertmesh {
namespace {

using nlohmann::json;

constexpr absl::Duration kEventTimeout = absl::Seconds(60);

using testing::WaitUntil;

// Inode of a network namespace file (/proc/<pid>/ns/net or /run/netns/<name>); 0 if absent.
ino_t NetnsInode(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 ? st.st_ino : 0;
}

bool PathExists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

// One HTTP/1.1 POST to `ip`:`port` (the shared test client only speaks to 127.0.0.1); the whole
// response, or "" when the connection fails.
std::string HttpPost(const std::string& ip, int port, const std::string& target,
                     const std::string& body) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return "";
  timeval tv = {120, 0};  // bounds a hung gateway; a request takes seconds
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, ip.c_str(), &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  const std::string request = "POST " + target + " HTTP/1.1\r\nHost: " + ip +
                              "\r\nContent-Type: application/json\r\nContent-Length: " +
                              std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
  for (size_t sent = 0; sent < request.size();) {
    const ssize_t n = write(fd, request.data() + sent, request.size() - sent);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
  std::string response;
  char buf[4096];
  while (true) {
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    response.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return response;
}

using testing::GetPlacement;
using testing::ListMembers;

class HostsTest : public testing::LocalClusterTest {
 protected:
  void SetUp() override {
    ASSERT_TRUE(cli::HasNetnsPrivilege())
        << "this test makes network namespaces: run it as root (CAP_SYS_ADMIN, CAP_NET_ADMIN)";
    dir_ = testing::MakeTempDir("em-hosts");
    absl::StatusOr<std::string> model = testing::MakeTinyModel(dir_);
    ASSERT_TRUE(model.ok()) << model.status();
    cli::LocalClusterOptions o = testing::TinyGatewayClusterOptions(*model);
    o.hosts = 3;
    o.attention_workers = 1;
    o.expert_workers = 3;
    o.expert_replicas = 2;  // a killed expert worker costs no request
    o.restart_on_failure = true;
    o.restart_backoff = absl::Milliseconds(200);
    o.lease_ms = 2000;  // the router notices the dead worker soon
    o.log_dir = dir_ + "/logs";
    o.run_dir = dir_ + "/run";
    StartCluster(o);
  }

  // A non-streamed chat request from this machine to the gateway's namespace address.
  json Chat() {
    const cli::ClusterMember* gw = cluster_->Find("gateway");
    json body = {{"model", "tiny"},
                 {"messages", json::array({{{"role", "user"}, {"content", "Hello"}}})},
                 {"max_tokens", 8}};
    const std::string response = HttpPost(gw->ip, gw->http_port, "/v1/chat/completions",
                                          body.dump());
    const size_t split = response.find("\r\n\r\n");
    EXPECT_EQ(response.rfind("HTTP/1.1 200", 0), 0u) << response;
    if (split == std::string::npos) return json();
    return json::parse(response.substr(split + 4), nullptr, /*allow_exceptions=*/false);
  }

  // Runs supervision steps until `done` holds (or the timeout).
  bool SuperviseUntil(const std::function<bool()>& done) {
    return WaitUntil(
        [&] {
          absl::Status s = cluster_->Supervise();
          EXPECT_TRUE(s.ok()) << s;
          return !s.ok() || done();
        },
        kEventTimeout);
  }
};

TEST_F(HostsTest, ServesAcrossThreeNamespacesSurvivesAKillAndCleansUp) {
  // Three namespaces, each member in the one it was placed in, and none in ours.
  std::map<std::string, ino_t> hosts;  // netns name -> inode
  const ino_t own = NetnsInode("/proc/self/ns/net");
  for (const cli::ClusterMember& m : cluster_->members()) {
    ASSERT_FALSE(m.netns.empty()) << m.name;
    ASSERT_EQ(m.ip.rfind("198.18.", 0), 0u) << m.name << " has address " << m.ip;
    const ino_t ns = NetnsInode("/run/netns/" + m.netns);
    ASSERT_NE(ns, 0u) << m.netns;
    EXPECT_EQ(NetnsInode("/proc/" + std::to_string(m.pid) + "/ns/net"), ns) << m.name;
    EXPECT_NE(ns, own) << m.name;
    hosts[m.netns] = ns;
  }
  ASSERT_EQ(hosts.size(), 3u);
  std::set<ino_t> distinct;
  for (const auto& [name, ino] : hosts) distinct.insert(ino);
  EXPECT_EQ(distinct.size(), 3u);
  EXPECT_EQ(cluster_->Find("router")->netns, cluster_->Find("gateway")->netns);
  EXPECT_NE(cluster_->Find("expert-worker-0")->netns, cluster_->Find("router")->netns);

  // The router knows every worker by its namespace address: they talk over the links.
  auto members = ListMembers(cluster_->router_address());
  ASSERT_TRUE(members.ok()) << members.status();
  ASSERT_EQ(members->members_size(), static_cast<int>(cluster_->members().size()) - 1);
  for (const auto& m : members->members()) {
    EXPECT_EQ(m.address().rfind("198.18.", 0), 0u) << m.address();
    EXPECT_EQ(m.address().find("127.0.0.1"), std::string::npos) << m.address();
  }
  // cluster.json names each member's namespace and address.
  {
    json cj = json::parse(cluster_->ClusterJson());
    for (const json& s : cj["services"]) {
      EXPECT_EQ(s.value("netns", "").rfind("em-", 0), 0u) << s.dump();
      EXPECT_EQ(s.value("address", "").rfind("198.18.", 0), 0u) << s.dump();
    }
    EXPECT_EQ(cj.value("http_url", "").rfind("http://198.18.", 0), 0u) << cj.dump();
  }

  json reply = Chat();
  ASSERT_TRUE(reply.is_object());
  ASSERT_EQ(reply["choices"].size(), 1u) << reply.dump();
  EXPECT_GT(reply["usage"].value("completion_tokens", 0), 0) << reply.dump();

  // SIGKILL an expert worker in its namespace (not host 0's).
  const cli::ClusterMember* victim = cluster_->Find("expert-worker-0");
  const std::string victim_netns = victim->netns;
  const std::string victim_address = victim->grpc_address(cluster_->options().host);
  const pid_t victim_pid = victim->pid;
  auto before = GetPlacement(cluster_->router_address());
  ASSERT_TRUE(before.ok()) << before.status();
  ASSERT_EQ(kill(victim_pid, SIGKILL), 0);
  // The other replica serves while it is down.
  reply = Chat();
  ASSERT_TRUE(reply.is_object());
  EXPECT_EQ(reply["choices"].size(), 1u) << reply.dump();
  // Supervision restarts it in the same namespace on the same address, and it registers again.
  ASSERT_TRUE(SuperviseUntil([&] { return cluster_->Find("expert-worker-0")->restarts == 1; }))
      << "expert-worker-0 was not restarted";
  victim = cluster_->Find("expert-worker-0");
  EXPECT_NE(victim->pid, victim_pid);
  EXPECT_EQ(victim->netns, victim_netns);
  EXPECT_EQ(victim->grpc_address(cluster_->options().host), victim_address);
  EXPECT_EQ(NetnsInode("/proc/" + std::to_string(victim->pid) + "/ns/net"),
            hosts[victim_netns]);
  // The router re-placed the experts: a newer version with every expert on a live worker.
  EXPECT_TRUE(SuperviseUntil([&] {
    auto t = GetPlacement(cluster_->router_address());
    return t.ok() && t->version() > before->version() && t->unplaced_size() == 0;
  })) << "no newer complete placement after the kill";
  reply = Chat();
  ASSERT_TRUE(reply.is_object());
  EXPECT_EQ(reply["choices"].size(), 1u) << reply.dump();

  // Stop removes the namespaces and the bridge.
  std::string bridge = "em-" + std::to_string(getpid()) + "-br";
  EXPECT_TRUE(PathExists("/sys/class/net/" + bridge));
  cluster_->Stop();
  for (const auto& [name, ino] : hosts) {
    EXPECT_FALSE(PathExists("/run/netns/" + name)) << name << " is left behind";
  }
  EXPECT_FALSE(PathExists("/sys/class/net/" + bridge)) << bridge << " is left behind";
}

// Names of a dead owner are removed at the next start; a live owner's are left alone.
TEST(HostNetworkTest, RemovesWhatAKilledUpLeft) {
  ASSERT_TRUE(cli::HasNetnsPrivilege()) << "this test makes network namespaces: run it as root";
  // A pid that is certainly dead: a child we reaped.
  pid_t dead = fork();
  if (dead == 0) _exit(0);
  ASSERT_GT(dead, 0);
  int status = 0;
  waitpid(dead, &status, 0);
  const std::string stale_ns = "em-" + std::to_string(dead) + "-h0";
  const std::string stale_br = "em-" + std::to_string(dead) + "-br";
  ASSERT_TRUE(cli::RunIp({"netns", "add", stale_ns}).ok());
  ASSERT_TRUE(cli::RunIp({"link", "add", stale_br, "type", "bridge"}).ok());
  const std::string live_ns = "em-" + std::to_string(getpid()) + "-h99";
  ASSERT_TRUE(cli::RunIp({"netns", "add", live_ns}).ok());
  // No count asserted: a concurrent start (another test case) may remove them first.
  cli::HostNetwork::RemoveStale();
  EXPECT_FALSE(PathExists("/run/netns/" + stale_ns));
  EXPECT_FALSE(PathExists("/sys/class/net/" + stale_br));
  EXPECT_TRUE(PathExists("/run/netns/" + live_ns));
  (void)cli::RunIp({"netns", "delete", live_ns});
}

}  // namespace
}  // namespace expertmesh
