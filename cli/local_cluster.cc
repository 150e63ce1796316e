#include "cli/local_cluster.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <set>
#include <sstream>

#include "core/rpc/channel.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace expertmesh::cli {
namespace {

// Poll period of readiness and exit checks (polling a state, not sleeping for one).
constexpr absl::Duration kPoll = absl::Milliseconds(20);

std::string Describe(int wait_status) {
  if (WIFEXITED(wait_status))
    return "exited with status " + std::to_string(WEXITSTATUS(wait_status));
  if (WIFSIGNALED(wait_status)) {
    return std::string("killed by signal ") + std::to_string(WTERMSIG(wait_status)) + " (" +
           strsignal(WTERMSIG(wait_status)) + ")";
  }
  return "stopped";
}

bool Reap(ClusterMember& m) {
  if (m.exited) return true;
  int status = 0;
  pid_t r = waitpid(m.pid, &status, WNOHANG);
  if (r == m.pid || (r < 0 && errno == ECHILD)) {
    m.exited = true;
    m.wait_status = status;
  }
  return m.exited;
}

}  // namespace

std::string TailFile(const std::string& path, int lines) {
  std::ifstream in(path);
  if (!in) return "";
  std::deque<std::string> tail;
  std::string line;
  while (std::getline(in, line)) {
    tail.push_back(line);
    if (static_cast<int>(tail.size()) > lines) tail.pop_front();
  }
  std::string out;
  for (const std::string& l : tail) out += "    " + l + "\n";
  return out;
}

absl::Status LocalCluster::Failure(const ClusterMember& m, const std::string& what) const {
  return absl::UnavailableError(m.name + " " + what + "; last lines of " + m.log_path + ":\n" +
                                TailFile(m.log_path, 20));
}

absl::Status LocalCluster::Spawn(ClusterMember& m, const std::vector<std::string>& args) {
  if (access(m.binary.c_str(), X_OK) != 0) {
    return absl::FailedPreconditionError(
        "cannot start " + m.name + ": " + m.binary + " is missing (build it: cmake --build " +
        options_.bin_dir + " --target " + m.binary.substr(m.binary.rfind('/') + 1) + ")");
  }
  m.log_path = options_.log_dir + "/" + m.name + ".log";
  int log_fd = open(m.log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    return absl::FailedPreconditionError("cannot write " + m.log_path + ": " +
                                         std::strerror(errno));
  }
  int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  std::vector<std::string> argv_strings = {m.binary};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  // Everything the child needs is prepared before fork: no allocation between fork and exec.
  std::vector<char*> argv;
  for (std::string& a : argv_strings) argv.push_back(a.data());
  argv.push_back(nullptr);
  sigset_t none;
  sigemptyset(&none);
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    close(log_fd);
    if (null_fd >= 0) close(null_fd);
    return absl::InternalError("fork for " + m.name + ": " + std::strerror(errno));
  }
  if (pid == 0) {
    // Own process group: a terminal's Ctrl-C reaches only `up`, which stops the children in
    // order. PDEATHSIG: if `up` dies without stopping them (SIGKILL), they get SIGTERM.
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);
    // `up` blocks SIGTERM/SIGINT for sigwait; a signal mask survives exec.
    sigprocmask(SIG_SETMASK, &none, nullptr);
    if (null_fd >= 0) dup2(null_fd, 0);
    dup2(log_fd, 1);
    dup2(log_fd, 2);
    execv(argv[0], argv.data());
    _exit(127);
  }
  setpgid(pid, pid);  // also from the parent, so that it holds before we might signal the group
  close(log_fd);
  if (null_fd >= 0) close(null_fd);
  m.pid = pid;
  std::fprintf(stderr, "up: started %s pid=%d log=%s\n", m.name.c_str(), static_cast<int>(pid),
               m.log_path.c_str());
  return absl::OkStatus();
}

absl::Status LocalCluster::WaitReady(ClusterMember& m, absl::Time deadline) {
  const std::string ready = options_.log_dir + "/" + m.name + ".ready";
  while (true) {
    if (Reap(m)) return Failure(m, "stopped during start-up (" + Describe(m.wait_status) + ")");
    if (options_.should_abort && options_.should_abort()) {
      return absl::CancelledError("start-up interrupted");
    }
    if (m.grpc_port == 0 || (m.name == "gateway" && m.http_port == 0)) {
      std::ifstream in(ready);
      std::stringstream text;
      text << in.rdbuf();
      nlohmann::json j = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
      if (j.is_object()) {
        m.grpc_port = j.value("grpc", 0);
        m.metrics_port = j.value("metrics", 0);
        m.http_port = j.value("http", 0);
      }
    }
    if (m.grpc_port != 0 &&
        rpc::CheckHealth(options_.host + ":" + std::to_string(m.grpc_port), absl::Seconds(1))
            .ok()) {
      return absl::OkStatus();
    }
    if (absl::Now() > deadline) {
      return Failure(m, m.grpc_port == 0 ? "did not report its ports in time"
                                         : "did not pass its gRPC health check in time");
    }
    absl::SleepFor(kPoll);
  }
}

absl::Status LocalCluster::WaitForMembership(absl::Time deadline) {
  const ClusterMember& router = members_[0];
  auto stub = expertmesh::v1::Router::NewStub(
      rpc::MakeChannel(options_.host + ":" + std::to_string(router.grpc_port)));
  std::set<std::string> missing;
  while (true) {
    missing.clear();
    for (size_t i = 1; i < members_.size(); ++i) {
      missing.insert(options_.host + ":" + std::to_string(members_[i].grpc_port));
    }
    grpc::ClientContext context;
    rpc::SetTimeout(context, absl::Seconds(1));
    expertmesh::v1::ListMembersResponse response;
    if (stub->ListMembers(&context, {}, &response).ok()) {
      for (const auto& member : response.members()) missing.erase(member.address());
    }
    if (missing.empty()) return absl::OkStatus();
    if (options_.should_abort && options_.should_abort()) {
      return absl::CancelledError("start-up interrupted");
    }
    if (absl::Now() > deadline) break;
    absl::SleepFor(kPoll);
  }
  for (size_t i = 1; i < members_.size(); ++i) {
    if (missing.count(options_.host + ":" + std::to_string(members_[i].grpc_port))) {
      return Failure(members_[i], "did not register with the router in time");
    }
  }
  return absl::DeadlineExceededError("workers did not register with the router in time");
}

absl::StatusOr<std::unique_ptr<LocalCluster>> LocalCluster::Start(
    const LocalClusterOptions& options) {
  std::unique_ptr<LocalCluster> cluster(new LocalCluster(options));
  const std::string& bin = options.bin_dir;
  const int base = options.base_port;
  auto port = [&](int offset) { return base == 0 ? 0 : base + offset; };
  auto addr = [&](int p) { return options.host + ":" + std::to_string(p); };
  struct Plan {
    const char* name;
    std::string binary;
  };
  const std::vector<Plan> plan = {
      {"router", bin + "/router/expertmesh-router"},
      {"kv-store", bin + "/kv-store/expertmesh-kv-store"},
      {"attention-worker", bin + "/attention-worker/expertmesh-attention-worker"},
      {"expert-worker-0", bin + "/expert-worker/expertmesh-expert-worker"},
      {"expert-worker-1", bin + "/expert-worker/expertmesh-expert-worker"},
      {"gateway", bin + "/gateway/expertmesh-gateway"},
  };
  for (const Plan& p : plan) {
    ClusterMember m;
    m.name = p.name;
    m.binary = p.binary;
    cluster->members_.push_back(m);
    unlink((options.log_dir + "/" + p.name + ".ready").c_str());
  }
  const absl::Time deadline = absl::Now() + options.ready_timeout;
  auto common = [&](size_t i) {
    return std::vector<std::string>{
        "--listen=" + addr(port(static_cast<int>(i))),
        "--metrics-listen=" + addr(port(10 + static_cast<int>(i))),
        "--ready-file=" + options.log_dir + "/" + cluster->members_[i].name + ".ready",
        "--log-level=" + options.log_level};
  };
  // The router first: the others register with it as they come up.
  std::vector<std::string> args = common(0);
  args.push_back("--lease-ms=" + std::to_string(options.lease_ms));
  absl::Status status = cluster->Spawn(cluster->members_[0], args);
  if (status.ok()) status = cluster->WaitReady(cluster->members_[0], deadline);
  if (!status.ok()) return status;  // the destructor stops what was started
  const std::string router = "--router=" + addr(cluster->members_[0].grpc_port);
  const std::string model = "--model=" + options.model_dir;
  for (size_t i = 1; i < cluster->members_.size() && status.ok(); ++i) {
    args = common(i);
    args.push_back(router);
    const std::string& name = cluster->members_[i].name;
    if (name != "kv-store") args.push_back(model);
    if (name == "gateway") args.push_back("--http-port=" + std::to_string(options.http_port));
    status = cluster->Spawn(cluster->members_[i], args);
  }
  for (size_t i = 1; i < cluster->members_.size() && status.ok(); ++i) {
    status = cluster->WaitReady(cluster->members_[i], deadline);
  }
  if (status.ok()) status = cluster->WaitForMembership(deadline);
  if (!status.ok()) return status;
  return cluster;
}

LocalCluster::~LocalCluster() { Stop(); }

std::optional<ClusterMember> LocalCluster::ReapExited() {
  for (ClusterMember& m : members_) {
    if (m.pid != 0 && !m.exited && Reap(m)) return m;
  }
  return std::nullopt;
}

void LocalCluster::SignalAndWait(const std::vector<ClusterMember*>& targets, int sig,
                                 absl::Time deadline) {
  for (ClusterMember* m : targets) {
    if (m->pid == 0 || m->exited) continue;
    if (kill(-m->pid, sig) != 0) kill(m->pid, sig);
  }
  while (true) {
    bool all = true;
    for (ClusterMember* m : targets) all = (m->pid == 0 || Reap(*m)) && all;
    if (all || absl::Now() >= deadline) return;
    absl::SleepFor(kPoll);
  }
}

void LocalCluster::Stop() {
  if (stopped_) return;
  stopped_ = true;
  const absl::Time start = absl::Now();
  std::vector<ClusterMember*> workers;
  std::vector<ClusterMember*> all;
  for (ClusterMember& m : members_) {
    all.push_back(&m);
    if (m.name != "router") workers.push_back(&m);
  }
  // Workers first, so that they can deregister from a router that is still there.
  SignalAndWait(workers, SIGTERM, start + options_.stop_timeout * 0.8);
  SignalAndWait(all, SIGTERM, start + options_.stop_timeout);
  for (ClusterMember* m : all) {
    if (m->pid == 0 || m->exited) continue;
    std::fprintf(stderr, "up: %s (pid %d) did not stop in time; killing it\n", m->name.c_str(),
                 static_cast<int>(m->pid));
    if (kill(-m->pid, SIGKILL) != 0) kill(m->pid, SIGKILL);
    waitpid(m->pid, &m->wait_status, 0);
    m->exited = true;
  }
}

std::string LocalCluster::Summary() const {
  std::string out;
  const std::string& h = options_.host;
  for (const ClusterMember& m : members_) {
    if (m.name == "gateway") {
      out += "API:  http://" + h + ":" + std::to_string(m.http_port) +
             "  (POST /v1/chat/completions, /v1/completions, /v1/messages; GET /v1/models, "
             "/health)\n";
    }
  }
  char line[512];
  std::snprintf(line, sizeof(line), "%-18s %-8s %-22s %s\n", "service", "pid", "gRPC", "metrics");
  out += line;
  for (const ClusterMember& m : members_) {
    std::snprintf(line, sizeof(line), "%-18s %-8d %-22s http://%s:%d/metrics\n", m.name.c_str(),
                  static_cast<int>(m.pid), (h + ":" + std::to_string(m.grpc_port)).c_str(),
                  h.c_str(), m.metrics_port);
    out += line;
  }
  out += "model: " + options_.model_dir + "\nlogs:  " + options_.log_dir + "/<service>.log\n";
  return out;
}

}  // namespace expertmesh::cli
