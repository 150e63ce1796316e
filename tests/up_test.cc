// `expertmesh up` as a user and as tools run it: it starts the services (any number of workers),
// describes them in <run-dir>/cluster.json, restarts one that dies (or, with --exit-on-failure,
// stops everything), and on SIGTERM (or when it is itself SIGKILLed) every process it started is
// gone within 15 s.
#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "core/rpc/channel.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/child_process.h"

namespace expertmesh::testing {
namespace {

// Pids printed by `up` ("up: started <name> pid=<pid> ...").
std::set<pid_t> StartedPids(const std::string& log) {
  std::set<pid_t> pids;
  size_t pos = 0;
  while ((pos = log.find("up: started ", pos)) != std::string::npos) {
    size_t eol = log.find('\n', pos);
    size_t p = log.find(" pid=", pos);
    pos += 12;
    if (p == std::string::npos || (eol != std::string::npos && p > eol)) continue;
    pids.insert(static_cast<pid_t>(std::atoi(log.c_str() + p + 5)));
  }
  return pids;
}

// Pids of live processes whose parent is `parent` (scanning /proc/*/stat).
std::set<pid_t> ChildrenOf(pid_t parent) {
  std::set<pid_t> out;
  DIR* proc = opendir("/proc");
  if (proc == nullptr) return out;
  while (struct dirent* e = readdir(proc)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::ifstream in(std::string("/proc/") + e->d_name + "/stat");
    std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    char state = 0;
    int ppid = 0;
    if (std::sscanf(stat.c_str() + close + 1, " %c %d", &state, &ppid) == 2 && ppid == parent &&
        state != 'Z') {
      out.insert(static_cast<pid_t>(std::atoi(e->d_name)));
    }
  }
  closedir(proc);
  return out;
}

// The port of "http://127.0.0.1:PORT[/...]" (0 if malformed).
int UrlPort(const std::string& url) {
  size_t colon = url.rfind(':');
  return colon == std::string::npos ? 0 : std::atoi(url.c_str() + colon + 1);
}

// Router membership: address -> worker id.
std::map<std::string, uint64_t> RouterMembers(const std::string& router) {
  auto stub = expertmesh::v1::Router::NewStub(rpc::MakeChannel(router));
  grpc::ClientContext context;
  rpc::SetTimeout(context, absl::Seconds(2));
  expertmesh::v1::ListMembersResponse response;
  std::map<std::string, uint64_t> out;
  if (!stub->ListMembers(&context, {}, &response).ok()) return out;
  for (const auto& m : response.members()) out[m.address()] = m.worker_id();
  return out;
}

class UpTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = MakeTempDir("em-up-"); }

  // Starts `up` with `extra` flags and waits (bounded) for its summary and cluster.json.
  void StartUp(const std::vector<std::string>& extra = {}) {
    std::vector<std::string> argv = {std::string(EM_BINARY_DIR) + "/cli/expertmesh",
                                     "up",
                                     "--http-port=0",
                                     "--base-port=0",
                                     "--lease-ms=2000",
                                     "--model=" + std::string(EM_SHARED_DIR) + "/golden/tiny-a",
                                     "--log-dir=" + dir_ + "/logs",
                                     "--run-dir=" + dir_ + "/run"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto up = ChildProcess::Start(argv, dir_ + "/up.log");
    ASSERT_TRUE(up.ok()) << up.status();
    up_ = std::move(*up);
    const absl::Time deadline = absl::Now() + absl::Seconds(90);
    while (up_->Log().find("Press Ctrl-C to stop") == std::string::npos) {
      ASSERT_FALSE(up_->WaitForExit(absl::ZeroDuration()).has_value()) << up_->Log();
      ASSERT_LT(absl::Now(), deadline) << "up not ready in time:\n" << up_->Log();
      absl::SleepFor(absl::Milliseconds(50));
    }
    pids_ = StartedPids(up_->Log());
    auto cluster = ClusterJson();
    ASSERT_TRUE(cluster.has_value()) << "no cluster.json once up is ready:\n" << up_->Log();
  }

  std::string ClusterJsonPath() const { return dir_ + "/run/cluster.json"; }

  std::optional<nlohmann::json> ClusterJson() const {
    std::ifstream in(ClusterJsonPath());
    if (!in) return std::nullopt;
    std::stringstream text;
    text << in.rdbuf();
    nlohmann::json j = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) {
      ADD_FAILURE() << "cluster.json is not JSON (not written atomically?):\n" << text.str();
      return std::nullopt;
    }
    return j;
  }

  // The entry of service `name` in cluster.json (null if absent).
  nlohmann::json Service(const std::string& name) const {
    auto j = ClusterJson();
    if (!j) return nullptr;
    for (const auto& s : (*j)["services"]) {
      if (s.value("name", "") == name) return s;
    }
    return nullptr;
  }

  // Waits until cluster.json gives `name` a pid other than `old_pid`; returns it (0 on timeout).
  pid_t WaitForNewPid(const std::string& name, pid_t old_pid, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      nlohmann::json s = Service(name);
      if (s.is_object() && s.value("pid", 0) != 0 && s.value("pid", 0) != old_pid) {
        return s.value("pid", 0);
      }
      if (up_->WaitForExit(absl::ZeroDuration()).has_value()) return 0;
      absl::SleepFor(absl::Milliseconds(50));
    }
    return 0;
  }

  void TearDown() override {
    // Whatever happened, no service may outlive the test.
    if (up_ != nullptr) {
      for (pid_t pid : StartedPids(up_->Log())) {
        if (ProcessAlive(pid)) kill(pid, SIGKILL);
      }
    }
  }

  void ExpectAllGoneWithin(absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    std::set<pid_t> alive = StartedPids(up_->Log());
    while (!alive.empty() && absl::Now() < deadline) {
      for (auto it = alive.begin(); it != alive.end();) {
        it = ProcessAlive(*it) ? std::next(it) : alive.erase(it);
      }
      if (!alive.empty()) absl::SleepFor(absl::Milliseconds(50));
    }
    EXPECT_TRUE(alive.empty()) << alive.size() << " service(s) still running; up log:\n"
                               << up_->Log();
  }

  std::string dir_;
  std::unique_ptr<ChildProcess> up_;
  std::set<pid_t> pids_;
};

TEST_F(UpTest, PrintsTheApiAndStopsEveryServiceOnSigterm) {
  ASSERT_NO_FATAL_FAILURE(StartUp());
  ASSERT_EQ(pids_.size(), 6u) << up_->Log();
  EXPECT_EQ(ChildrenOf(up_->pid()), pids_);
  const std::string log = up_->Log();
  const size_t api = log.find("API:  http://127.0.0.1:");
  ASSERT_NE(api, std::string::npos) << log;
  const int http = std::atoi(log.c_str() + api + 23);
  ASSERT_GT(http, 0) << log;
  EXPECT_EQ(ClusterJson()->value("http_url", ""), "http://127.0.0.1:" + std::to_string(http));
  auto health = HttpRequest(http, "GET", "/health");
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(health->status, 200);
  EXPECT_EQ(nlohmann::json::parse(health->body)["router"]["configured"], true);
  for (const char* name : {"router", "kv-store", "attention-worker-0", "expert-worker-0",
                           "expert-worker-1", "gateway"}) {
    EXPECT_NE(log.find(name), std::string::npos) << name;
  }
  EXPECT_NE(log.find("/metrics"), std::string::npos);

  const absl::Time start = absl::Now();
  up_->Signal(SIGTERM);
  auto status = up_->WaitForExit(absl::Seconds(15));
  ASSERT_TRUE(status.has_value()) << "up still running 15 s after SIGTERM:\n" << up_->Log();
  EXPECT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 0) << up_->Log();
  ExpectAllGoneWithin(absl::Seconds(15) - (absl::Now() - start));
  EXPECT_EQ(up_->Log().find("did not stop in time"), std::string::npos) << up_->Log();
  EXPECT_FALSE(ClusterJson().has_value()) << "cluster.json outlives the cluster";
}

TEST_F(UpTest, ClusterJsonDescribesAClusterOfAnySize) {
  ASSERT_NO_FATAL_FAILURE(StartUp({"--attention-workers=2", "--expert-workers=3"}));
  auto cluster = ClusterJson();
  ASSERT_TRUE(cluster.has_value());
  EXPECT_EQ((*cluster)["model"], std::string(EM_SHARED_DIR) + "/golden/tiny-a");
  const auto& services = (*cluster)["services"];
  ASSERT_TRUE(services.is_array()) << cluster->dump();
  std::map<std::string, std::string> kind_of;
  std::set<pid_t> pids;
  std::set<std::string> addresses;
  for (const auto& s : services) {
    const std::string name = s.value("name", "");
    kind_of[name] = s.value("kind", "");
    const pid_t pid = s.value("pid", 0);
    EXPECT_TRUE(ProcessAlive(pid)) << name << " pid " << pid;
    pids.insert(pid);
    addresses.insert(s.value("grpc_address", ""));
    EXPECT_TRUE(rpc::CheckHealth(s.value("grpc_address", "")).ok()) << name;
    const std::string metrics = s.value("metrics_url", "");
    ASSERT_EQ(metrics.rfind("http://127.0.0.1:", 0), 0u) << name << ": " << metrics;
    auto scrape = HttpRequest(UrlPort(metrics), "GET", "/metrics");
    ASSERT_TRUE(scrape.ok()) << name << " " << metrics << ": " << scrape.status();
    EXPECT_EQ(scrape->status, 200) << name;
    EXPECT_NE(scrape->body.find("expertmesh_build_info"), std::string::npos) << name;
  }
  const std::map<std::string, std::string> expected = {
      {"router", "router"},
      {"kv-store", "kv-store"},
      {"attention-worker-0", "attention-worker"},
      {"attention-worker-1", "attention-worker"},
      {"expert-worker-0", "expert-worker"},
      {"expert-worker-1", "expert-worker"},
      {"expert-worker-2", "expert-worker"},
      {"gateway", "gateway"},
  };
  EXPECT_EQ(kind_of, expected);
  EXPECT_EQ(services.size(), expected.size());
  EXPECT_EQ(pids, pids_) << "cluster.json pids differ from the processes up started";
  EXPECT_EQ(ChildrenOf(up_->pid()), pids_);
  EXPECT_EQ(addresses.size(), expected.size()) << "gRPC addresses are not distinct";
  // Every worker and the gateway are registered under the address cluster.json gives.
  auto members = RouterMembers(Service("router")["grpc_address"]);
  for (const auto& [name, kind] : expected) {
    if (name == "router") continue;
    EXPECT_TRUE(members.count(Service(name)["grpc_address"])) << name << " not listed";
  }
  auto health = HttpRequest(UrlPort((*cluster)["http_url"]), "GET", "/health");
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(health->status, 200);
}

TEST_F(UpTest, ServicesDieWhenUpIsKilled) {
  ASSERT_NO_FATAL_FAILURE(StartUp());
  ASSERT_EQ(pids_.size(), 6u) << up_->Log();
  up_->Signal(SIGKILL);
  ASSERT_TRUE(up_->WaitForExit(absl::Seconds(5)).has_value());
  ExpectAllGoneWithin(absl::Seconds(15));
}

TEST_F(UpTest, RestartsAKilledExpertWorker) {
  ASSERT_NO_FATAL_FAILURE(StartUp());
  const nlohmann::json victim = Service("expert-worker-1");
  ASSERT_TRUE(victim.is_object()) << ClusterJson()->dump();
  const pid_t old_pid = victim["pid"];
  const std::string address = victim["grpc_address"];
  const std::string router = Service("router")["grpc_address"];
  auto before = RouterMembers(router);
  ASSERT_TRUE(before.count(address)) << "expert-worker-1 not registered before the kill";
  const uint64_t old_id = before[address];

  ASSERT_EQ(kill(old_pid, SIGKILL), 0);
  const pid_t new_pid = WaitForNewPid("expert-worker-1", old_pid, absl::Seconds(30));
  ASSERT_NE(new_pid, 0) << "no restart in cluster.json:\n" << up_->Log();
  EXPECT_TRUE(ProcessAlive(new_pid));
  EXPECT_EQ(Service("expert-worker-1")["grpc_address"], address) << "restarted on another port";
  EXPECT_EQ(Service("expert-worker-1")["restarts"], 1);
  // cluster.json is rewritten only once the new process registered: the router holds a fresh
  // registration (a new id) at the same address.
  auto after = RouterMembers(router);
  ASSERT_TRUE(after.count(address)) << "restarted expert-worker-1 not listed by the router";
  EXPECT_NE(after[address], old_id);
  EXPECT_TRUE(rpc::CheckHealth(address).ok());
  const std::string log = up_->Log();
  EXPECT_NE(log.find("expert-worker-1 (pid " + std::to_string(old_pid) +
                     ") stopped unexpectedly (killed by signal 9"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("Last lines of"), std::string::npos) << log;
  // Everyone else is untouched and `up` keeps running.
  EXPECT_FALSE(up_->WaitForExit(absl::ZeroDuration()).has_value()) << log;
  for (pid_t pid : pids_) {
    if (pid != old_pid) {
      EXPECT_TRUE(ProcessAlive(pid)) << pid;
    }
  }

  up_->Signal(SIGTERM);
  auto status = up_->WaitForExit(absl::Seconds(15));
  ASSERT_TRUE(status.has_value()) << up_->Log();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << up_->Log();
  ExpectAllGoneWithin(absl::Seconds(15));
}

TEST_F(UpTest, GivesUpPastTheRestartLimit) {
  ASSERT_NO_FATAL_FAILURE(StartUp({"--max-restarts-per-minute=1"}));
  const pid_t first = Service("expert-worker-0")["pid"];
  ASSERT_EQ(kill(first, SIGKILL), 0);
  const pid_t second = WaitForNewPid("expert-worker-0", first, absl::Seconds(30));
  ASSERT_NE(second, 0) << up_->Log();
  ASSERT_EQ(kill(second, SIGKILL), 0);
  auto status = up_->WaitForExit(absl::Seconds(20));
  ASSERT_TRUE(status.has_value()) << "up kept running past the restart limit:\n" << up_->Log();
  EXPECT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 1) << up_->Log();
  EXPECT_NE(up_->Log().find("giving up"), std::string::npos) << up_->Log();
  ExpectAllGoneWithin(absl::Seconds(15));
  EXPECT_FALSE(ClusterJson().has_value());
}

TEST_F(UpTest, ExitOnFailureStopsTheRestWhenAServiceDies) {
  ASSERT_NO_FATAL_FAILURE(StartUp({"--exit-on-failure"}));
  ASSERT_EQ(pids_.size(), 6u) << up_->Log();
  const pid_t victim = Service("expert-worker-1")["pid"];
  ASSERT_TRUE(pids_.count(victim));
  kill(victim, SIGKILL);
  auto status = up_->WaitForExit(absl::Seconds(15));
  ASSERT_TRUE(status.has_value()) << up_->Log();
  EXPECT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 1);
  EXPECT_NE(up_->Log().find("stopped unexpectedly"), std::string::npos) << up_->Log();
  EXPECT_EQ(StartedPids(up_->Log()), pids_) << "restarted despite --exit-on-failure";
  ExpectAllGoneWithin(absl::Seconds(15));
  EXPECT_FALSE(ClusterJson().has_value());
}

}  // namespace
}  // namespace expertmesh::testing
