// `expertmesh up` as a user runs it: it starts six services, prints where they are, and on
// SIGTERM (or when it is itself SIGKILLed) every process it started is gone within 15 s.
#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <set>

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

class UpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("em-up-");
    std::vector<std::string> argv = {std::string(EM_BINARY_DIR) + "/cli/expertmesh",
                                     "up",
                                     "--http-port=0",
                                     "--base-port=0",
                                     "--lease-ms=2000",
                                     "--model=" + std::string(EM_SHARED_DIR) + "/golden/tiny-a",
                                     "--log-dir=" + dir_ + "/logs"};
    auto up = ChildProcess::Start(argv, dir_ + "/up.log");
    ASSERT_TRUE(up.ok()) << up.status();
    up_ = std::move(*up);
    // Wait (bounded) for the summary; fail early if `up` gives up.
    const absl::Time deadline = absl::Now() + absl::Seconds(90);
    while (up_->Log().find("Press Ctrl-C to stop") == std::string::npos) {
      ASSERT_FALSE(up_->WaitForExit(absl::ZeroDuration()).has_value()) << up_->Log();
      ASSERT_LT(absl::Now(), deadline) << "up not ready in time:\n" << up_->Log();
      absl::SleepFor(absl::Milliseconds(50));
    }
    pids_ = StartedPids(up_->Log());
  }

  void TearDown() override {
    // Whatever happened, no service may outlive the test.
    for (pid_t pid : pids_) {
      if (ProcessAlive(pid)) kill(pid, SIGKILL);
    }
  }

  void ExpectAllGoneWithin(absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    std::set<pid_t> alive = pids_;
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
  ASSERT_EQ(pids_.size(), 6u) << up_->Log();
  EXPECT_EQ(ChildrenOf(up_->pid()), pids_);
  const std::string log = up_->Log();
  const size_t api = log.find("API:  http://127.0.0.1:");
  ASSERT_NE(api, std::string::npos) << log;
  const int http = std::atoi(log.c_str() + api + 23);
  ASSERT_GT(http, 0) << log;
  auto health = HttpRequest(http, "GET", "/health");
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(health->status, 200);
  EXPECT_EQ(nlohmann::json::parse(health->body)["router"]["configured"], true);
  for (const char* name : {"router", "kv-store", "attention-worker", "expert-worker-0",
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
}

TEST_F(UpTest, ServicesDieWhenUpIsKilled) {
  ASSERT_EQ(pids_.size(), 6u) << up_->Log();
  up_->Signal(SIGKILL);
  ASSERT_TRUE(up_->WaitForExit(absl::Seconds(5)).has_value());
  ExpectAllGoneWithin(absl::Seconds(15));
}

TEST_F(UpTest, ReportsAServiceThatDiesAndStopsTheRest) {
  ASSERT_EQ(pids_.size(), 6u) << up_->Log();
  const pid_t victim = *pids_.rbegin();
  kill(victim, SIGKILL);
  auto status = up_->WaitForExit(absl::Seconds(15));
  ASSERT_TRUE(status.has_value()) << up_->Log();
  EXPECT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 1);
  EXPECT_NE(up_->Log().find("stopped unexpectedly"), std::string::npos) << up_->Log();
  ExpectAllGoneWithin(absl::Seconds(15));
}

}  // namespace
}  // namespace expertmesh::testing
