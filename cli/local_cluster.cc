#include "cli/local_cluster.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>

#include "core/rpc/channel.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace expertmesh::cli {
namespace {

// Poll period of readiness and exit checks (polling a state, not sleeping for one).
constexpr absl::Duration kPoll = absl::Milliseconds(20);
// Bound on the RPCs a supervision step makes, so that Ctrl-C is still taken promptly.
constexpr absl::Duration kSuperviseRpcTimeout = absl::Milliseconds(300);
constexpr absl::Duration kRestartWindow = absl::Minutes(1);

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
  if (m.pid == 0) return false;
  int status = 0;
  pid_t r = waitpid(m.pid, &status, WNOHANG);
  if (r == m.pid || (r < 0 && errno == ECHILD)) {
    m.exited = true;
    m.wait_status = status;
  }
  return m.exited;
}

std::string Dirname(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos || slash == 0 ? std::string("/") : path.substr(0, slash);
}

absl::Status MakeDirs(const std::string& path) {
  std::error_code error;
  std::filesystem::create_directories(path, error);
  if (error) return absl::FailedPreconditionError("cannot create " + path + ": " + error.message());
  return absl::OkStatus();
}

std::string FormatSeconds(absl::Duration d) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f s", absl::ToDoubleSeconds(d));
  return text;
}

// `binary --help` output, cached: every service's flag list is fixed for the life of a build.
std::string HelpText(const std::string& binary) {
  static std::mutex mu;
  static std::map<std::string, std::string> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(binary);
    if (it != cache.end()) return it->second;
  }
  std::string text;
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return text;
  int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
  std::string arg0 = binary, arg1 = "--help";
  char* argv[] = {arg0.data(), arg1.data(), nullptr};
  sigset_t none;
  sigemptyset(&none);
  pid_t pid = fork();
  if (pid == 0) {
    sigprocmask(SIG_SETMASK, &none, nullptr);
    if (null_fd >= 0) {
      dup2(null_fd, 0);
      dup2(null_fd, 2);
    }
    dup2(fds[1], 1);
    execv(argv[0], argv);
    _exit(127);
  }
  close(fds[1]);
  if (null_fd >= 0) close(null_fd);
  if (pid < 0) {
    close(fds[0]);
    return text;
  }
  // A --help that hangs must not hang the cluster start: read for at most a few seconds.
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  char buf[4096];
  while (true) {
    int left_ms = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
    if (left_ms <= 0) break;
    struct pollfd p = {fds[0], POLLIN, 0};
    if (poll(&p, 1, left_ms) <= 0) break;
    ssize_t n = read(fds[0], buf, sizeof(buf));
    if (n <= 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  close(fds[0]);
  kill(pid, SIGKILL);  // no-op when it already exited; it is our child, so the pid is still ours
  int status = 0;
  waitpid(pid, &status, 0);
  std::lock_guard<std::mutex> lock(mu);
  cache[binary] = text;
  return text;
}

}  // namespace

LocalClusterOptions SmallClusterOptions(const std::string& model_dir, int attention_workers,
                                        int expert_workers) {
  LocalClusterOptions o;
  o.model_dir = model_dir;
  o.attention_workers = attention_workers;
  o.expert_workers = expert_workers;
  o.with_kv_store = false;
  o.with_gateway = false;
  o.base_port = 0;
  o.http_port = 0;
  o.quiet = true;
  o.log_level = "warning";
  return o;
}

PortLayout PortsFor(int base_port, int index, int service_count) {
  if (base_port == 0) return {};
  return {base_port + index, base_port + index + std::max(10, service_count)};
}

bool PortRangeFits(int base_port, int service_count) {
  if (base_port == 0) return true;
  PortLayout last = PortsFor(base_port, service_count - 1, service_count);
  return base_port > 0 && last.metrics <= 65535;
}

bool BinaryHasFlag(const std::string& binary, const std::string& flag) {
  const std::string help = HelpText(binary);
  const std::string needle = "  --" + flag;
  for (size_t pos = help.find(needle); pos != std::string::npos; pos = help.find(needle, pos + 1)) {
    if (pos != 0 && help[pos - 1] != '\n') continue;
    size_t end = pos + needle.size();
    if (end == help.size() || help[end] == '\n' || help[end] == ' ' || help[end] == '=') {
      return true;
    }
  }
  return false;
}

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

void LocalCluster::Say(const std::string& line) const {
  if (options_.quiet) return;
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
}

absl::Status LocalCluster::Failure(const ClusterMember& m, const std::string& what) const {
  return absl::UnavailableError(m.name + " " + what + "; last lines of " + m.log_path + ":\n" +
                                TailFile(m.log_path, 20));
}

absl::Status LocalCluster::Plan() {
  LocalClusterOptions& o = options_;
  if (o.attention_workers < 0 || o.expert_workers < 0) {
    return absl::InvalidArgumentError("attention_workers and expert_workers must be >= 0");
  }
  if (o.expert_replicas < 1) return absl::InvalidArgumentError("expert_replicas must be >= 1");
  if (o.model_dir.empty() && (o.attention_workers + o.expert_workers > 0 || o.with_gateway)) {
    return absl::InvalidArgumentError("model_dir is empty");
  }
  if (o.bin_dir.empty()) {
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n <= 0) return absl::FailedPreconditionError("cannot resolve /proc/self/exe; set bin_dir");
    exe[n] = '\0';
    o.bin_dir = Dirname(Dirname(exe));  // <build>/cli/expertmesh -> <build>
  }
  if (o.log_dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ =
        std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/expertmesh-cluster-XXXXXX";
    if (mkdtemp(templ.data()) == nullptr) {
      return absl::FailedPreconditionError("cannot create a log directory " + templ + ": " +
                                           std::strerror(errno));
    }
    o.log_dir = templ;
    temp_log_dir_ = true;
  } else if (absl::Status s = MakeDirs(o.log_dir); !s.ok()) {
    return s;
  }
  if (!o.run_dir.empty()) {
    if (absl::Status s = MakeDirs(o.run_dir); !s.ok()) return s;
  }

  const std::string& bin = o.bin_dir;
  auto add = [&](std::string kind, int index, std::string binary) {
    ClusterMember m;
    m.kind = kind;
    m.index = index;
    m.name = kind == "attention-worker" || kind == "expert-worker"
                 ? kind + "-" + std::to_string(index)
                 : kind;
    m.binary = std::move(binary);
    m.log_path = o.log_dir + "/" + m.name + ".log";
    members_.push_back(std::move(m));
  };
  add("router", 0, bin + "/router/expertmesh-router");
  if (o.with_kv_store) add("kv-store", 0, bin + "/kv-store/expertmesh-kv-store");
  for (int i = 0; i < o.attention_workers; ++i) {
    add("attention-worker", i, bin + "/attention-worker/expertmesh-attention-worker");
  }
  for (int i = 0; i < o.expert_workers; ++i) {
    add("expert-worker", i, bin + "/expert-worker/expertmesh-expert-worker");
  }
  if (o.with_gateway) add("gateway", 0, bin + "/gateway/expertmesh-gateway");
  const int count = static_cast<int>(members_.size());
  if (!PortRangeFits(o.base_port, count)) {
    return absl::InvalidArgumentError("base port " + std::to_string(o.base_port) +
                                      " leaves no room for " + std::to_string(count) +
                                      " services (gRPC and metrics ports must stay <= 65535)");
  }
  for (const ClusterMember& m : members_) {
    if (access(m.binary.c_str(), X_OK) != 0) {
      return absl::FailedPreconditionError(
          "cannot start " + m.name + ": " + m.binary + " is missing (build it: cmake --build " +
          bin + " --target " + m.binary.substr(m.binary.rfind('/') + 1) + ")");
    }
  }

  // Flags that newer services gained are passed only where the binary lists them, so that a
  // cluster starts from an older build tree too.
  ClusterMember& router = members_[0];
  const bool router_replicas = BinaryHasFlag(router.binary, "expert-replicas");
  if (o.expert_replicas != 1 && !router_replicas) {
    return absl::FailedPreconditionError(router.binary +
                                         " has no --expert-replicas flag; cannot run with " +
                                         std::to_string(o.expert_replicas) + " replicas");
  }
  const std::string level = "--log-level=" + o.log_level;
  router.args = {level, "--lease-ms=" + std::to_string(o.lease_ms)};
  if (router_replicas) {
    router.args.push_back("--expert-replicas=" + std::to_string(o.expert_replicas));
  }
  if (!o.model_dir.empty() && BinaryHasFlag(router.binary, "model")) {
    router.args.push_back("--model=" + o.model_dir);
  }
  // A restarted router then keeps its placement version even with no worker left to tell it.
  if (!o.run_dir.empty() && !o.model_dir.empty() && BinaryHasFlag(router.binary, "state-dir")) {
    const std::string state = o.run_dir + "/router";
    std::error_code ec;
    std::filesystem::create_directories(state, ec);
    router.args.push_back("--state-dir=" + state);
  }
  router.args.insert(router.args.end(), o.extra_router_args.begin(), o.extra_router_args.end());
  for (size_t i = 1; i < members_.size(); ++i) {
    ClusterMember& m = members_[i];
    m.args = {level};
    if (m.kind != "kv-store") m.args.push_back("--model=" + o.model_dir);
    if (m.kind == "attention-worker") {
      m.args.insert(m.args.end(), o.extra_attention_worker_args.begin(),
                    o.extra_attention_worker_args.end());
    } else if (m.kind == "expert-worker") {
      if (BinaryHasFlag(m.binary, "drain-timeout-ms")) {
        m.args.push_back("--drain-timeout-ms=" + std::to_string(o.expert_drain_timeout_ms));
      }
      m.args.insert(m.args.end(), o.extra_expert_worker_args.begin(),
                    o.extra_expert_worker_args.end());
    } else if (m.kind == "kv-store") {
      // Blocks on disk survive a restart of the store (and of `up` with the same --run-dir).
      // Without a run dir (tests) the blocks go with the logs, never to a shared path.
      if (BinaryHasFlag(m.binary, "disk-dir")) {
        m.args.push_back("--disk-dir=" + (o.run_dir.empty() ? o.log_dir : o.run_dir) +
                         "/kv-store");
      }
    } else if (m.kind == "gateway") {
      // The gateway's drain (finish running streams) must end before Stop's gateway phase does,
      // or the streams are cut by SIGKILL instead of ending with an error event.
      if (BinaryHasFlag(m.binary, "drain-timeout-ms")) {
        m.args.push_back("--drain-timeout-ms=" +
                         std::to_string(absl::ToInt64Milliseconds(o.stop_timeout * 0.3)));
      }
      m.args.insert(m.args.end(), o.extra_gateway_args.begin(), o.extra_gateway_args.end());
    }
  }
  return absl::OkStatus();
}

absl::Status LocalCluster::PlaceOnHosts() {
  auto network = HostNetwork::Create(options_.hosts, options_.hosts_subnet,
                                     [this](const std::string& line) { Say(line); });
  if (!network.ok()) return network.status();
  network_ = std::move(*network);
  const auto& hosts = network_->hosts();
  // The control plane and the entry point share host 0; the workers go round-robin starting on
  // host 1, so that with A=1 and E>=2 every host runs something and expert traffic crosses links.
  int next = 1;
  for (ClusterMember& m : members_) {
    size_t host = 0;
    if (m.kind == "attention-worker" || m.kind == "expert-worker") host = next++ % hosts.size();
    m.netns = hosts[host].netns;
    m.ip = hosts[host].address;
  }
  Say("up: " + std::to_string(hosts.size()) + " hosts in network namespaces " + hosts[0].netns +
      ".. on bridge " + network_->bridge() + " (" + network_->bridge_address() + "/" +
      std::to_string(network_->prefix()) + ")");
  return absl::OkStatus();
}

absl::Status LocalCluster::Spawn(ClusterMember& m, int grpc_port, int metrics_port, int http_port) {
  const std::string ready = options_.log_dir + "/" + m.name + ".ready";
  unlink(ready.c_str());
  // A file left by an earlier run would name a port this gateway does not listen on.
  if (m.kind == "gateway" && m.admin_port == 0) {
    unlink((options_.log_dir + "/" + m.name + ".admin-port").c_str());
  }
  // A restart appends, so that the log of the run that died stays readable.
  const bool restart = m.pid != 0;
  int log_fd = open(m.log_path.c_str(),
                    O_WRONLY | O_CREAT | O_CLOEXEC | (restart ? O_APPEND : O_TRUNC), 0644);
  if (log_fd < 0) {
    return absl::FailedPreconditionError("cannot write " + m.log_path + ": " +
                                         std::strerror(errno));
  }
  if (restart) {
    std::string banner = "==== expertmesh up: restarting " + m.name + " (previous pid " +
                         std::to_string(m.pid) + " " + Describe(m.wait_status) + ") ====\n";
    if (write(log_fd, banner.data(), banner.size()) < 0) {
      // Only a marker in the log; the restart goes on without it.
    }
  }
  int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  const std::string& h = options_.host;
  std::vector<std::string> argv_strings = {m.binary};
  argv_strings.insert(argv_strings.end(), m.args.begin(), m.args.end());
  argv_strings.push_back("--listen=" + m.address_host(h) + ":" + std::to_string(grpc_port));
  argv_strings.push_back("--metrics-listen=" + m.address_host(h) + ":" +
                         std::to_string(metrics_port));
  // In a namespace, the HTTP API binds the namespace's address so that the host reaches it.
  if (m.kind == "gateway" && !m.ip.empty()) argv_strings.push_back("--http-host=" + m.ip);
  int netns_fd = -1;
  if (!m.netns.empty()) {
    netns_fd = OpenNetns(m.netns);
    if (netns_fd < 0) {
      close(log_fd);
      if (null_fd >= 0) close(null_fd);
      return absl::FailedPreconditionError("cannot open network namespace " + m.netns + " for " +
                                           m.name + ": " + std::strerror(errno));
    }
  }
  argv_strings.push_back("--ready-file=" + ready);
  if (m.kind == "gateway") argv_strings.push_back("--http-port=" + std::to_string(http_port));
  if (m.kind == "gateway") {
    // A restart keeps the page's port, so an open browser tab carries on. In a namespace the page
    // binds the namespace's address: loopback there is unreachable from the host.
    const int admin = m.admin_port != 0 ? m.admin_port : options_.admin_port;
    argv_strings.push_back("--admin-port=" + std::to_string(admin));
    argv_strings.push_back("--admin-port-file=" + options_.log_dir + "/" + m.name + ".admin-port");
    if (!m.ip.empty()) argv_strings.push_back("--admin-host=" + m.ip);
  }
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
    if (netns_fd >= 0) close(netns_fd);
    return absl::InternalError("fork for " + m.name + ": " + std::strerror(errno));
  }
  if (pid == 0) {
    // Own process group: a terminal's Ctrl-C reaches only the supervisor, which stops the
    // children in order. PDEATHSIG: if the supervisor dies without stopping them (SIGKILL), they
    // get SIGTERM.
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);
    // Only the network namespace changes (not the mount one, as `ip netns exec` would), so
    // the log dir, the ready file and the model stay where the supervisor sees them.
    if (netns_fd >= 0 && setns(netns_fd, CLONE_NEWNET) != 0) {
      static const char kMsg[] = "expertmesh up: setns into the host's network namespace failed\n";
      if (write(log_fd, kMsg, sizeof(kMsg) - 1) < 0) _exit(126);
      _exit(126);
    }
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
  if (netns_fd >= 0) close(netns_fd);
  if (null_fd >= 0) close(null_fd);
  m.pid = pid;
  m.exited = false;
  m.wait_status = 0;
  Say("up: started " + m.name + " pid=" + std::to_string(pid) + " log=" + m.log_path);
  return absl::OkStatus();
}

absl::Status LocalCluster::WaitReady(ClusterMember& m, absl::Time deadline) {
  const std::string ready = options_.log_dir + "/" + m.name + ".ready";
  while (true) {
    if (Reap(m)) return Failure(m, "stopped during start-up (" + Describe(m.wait_status) + ")");
    if (options_.should_abort && options_.should_abort()) {
      return absl::CancelledError("start-up interrupted");
    }
    if (m.grpc_port == 0 || (m.kind == "gateway" && m.http_port == 0)) {
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
    // The gateway writes its admin port before its ready file; with fixed ports the health
    // check could pass first, so wait for the port too.
    if (m.kind == "gateway" && m.admin_port == 0) {
      std::ifstream in(options_.log_dir + "/" + m.name + ".admin-port");
      int port = 0;
      if (in >> port && port > 0) m.admin_port = port;
    }
    if (m.grpc_port != 0 && (m.kind != "gateway" || m.admin_port != 0) &&
        rpc::CheckHealth(m.grpc_address(options_.host), absl::Seconds(1)).ok()) {
      return absl::OkStatus();
    }
    if (absl::Now() > deadline) {
      return Failure(m, m.grpc_port == 0 ? "did not report its ports in time"
                                         : "did not pass its gRPC health check in time");
    }
    absl::SleepFor(kPoll);
  }
}

uint64_t LocalCluster::RouterWorkerId(const std::string& address) {
  auto stub =
      expertmesh::v1::Router::NewStub(rpc::MakeChannel(members_[0].grpc_address(options_.host)));
  grpc::ClientContext context;
  rpc::SetTimeout(context, kSuperviseRpcTimeout);
  expertmesh::v1::ListMembersResponse response;
  if (!stub->ListMembers(&context, {}, &response).ok()) return 0;
  for (const auto& member : response.members()) {
    if (member.address() == address) return member.worker_id();
  }
  return 0;
}

absl::Status LocalCluster::WaitForMembership(absl::Time deadline) {
  auto stub =
      expertmesh::v1::Router::NewStub(rpc::MakeChannel(members_[0].grpc_address(options_.host)));
  std::set<std::string> missing;
  while (true) {
    missing.clear();
    for (size_t i = 1; i < members_.size(); ++i) {
      missing.insert(members_[i].grpc_address(options_.host));
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
    if (missing.count(members_[i].grpc_address(options_.host))) {
      return Failure(members_[i], "did not register with the router in time");
    }
  }
  return absl::DeadlineExceededError("workers did not register with the router in time");
}

absl::StatusOr<std::unique_ptr<LocalCluster>> LocalCluster::Start(
    const LocalClusterOptions& options) {
  std::unique_ptr<LocalCluster> cluster(new LocalCluster(options));
  // On any error below, the destructor stops what was started.
  absl::Status status = cluster->Plan();
  if (!status.ok()) return status;
  if (cluster->options_.hosts > 1) {
    status = cluster->PlaceOnHosts();
    if (!status.ok()) return status;
  }
  std::vector<ClusterMember>& members = cluster->members_;
  const int count = static_cast<int>(members.size());
  const int base = cluster->options_.base_port;
  const absl::Time deadline = absl::Now() + cluster->options_.ready_timeout;
  // The router first: the others register with it as they come up.
  PortLayout ports = PortsFor(base, 0, count);
  status = cluster->Spawn(members[0], ports.grpc, ports.metrics, 0);
  if (status.ok()) status = cluster->WaitReady(members[0], deadline);
  if (!status.ok()) return status;
  const std::string router = "--router=" + members[0].grpc_address(cluster->options_.host);
  for (int i = 1; i < count && status.ok(); ++i) {
    members[i].args.push_back(router);
    if (members[i].kind == "attention-worker" && BinaryHasFlag(members[i].binary, "kv-store")) {
      for (ClusterMember& kv : members) {
        if (kv.kind != "kv-store") continue;
        // Its port is known once it is ready (--base-port 0 lets it pick one).
        status = cluster->WaitReady(kv, deadline);
        if (status.ok()) {
          members[i].args.push_back("--kv-store=" + kv.grpc_address(cluster->options_.host));
        }
      }
      if (!status.ok()) break;
    }
    ports = PortsFor(base, i, count);
    status = cluster->Spawn(members[i], ports.grpc, ports.metrics, cluster->options_.http_port);
  }
  for (int i = 1; i < count && status.ok(); ++i) {
    status = cluster->WaitReady(members[i], deadline);
  }
  if (status.ok()) status = cluster->WaitForMembership(deadline);
  // An attention worker with a model serves sequences only once a placement covers every
  // routed expert (its AttentionWorker health says so); the cluster is ready when it can serve.
  for (int i = 1; i < count && status.ok() && !cluster->options_.model_dir.empty(); ++i) {
    if (members[i].kind != "attention-worker") continue;
    while (!rpc::CheckHealth(members[i].grpc_address(cluster->options_.host), absl::Seconds(1),
                             "expertmesh.v1.AttentionWorker")
                .ok()) {
      if (absl::Now() > deadline) {
        status = cluster->Failure(members[i], "did not get an expert placement in time");
        break;
      }
      absl::SleepFor(kPoll);
    }
  }
  if (!status.ok()) return status;
  cluster->WriteClusterJson();
  return cluster;
}

LocalCluster::~LocalCluster() { Stop(); }

const ClusterMember* LocalCluster::Find(const std::string& name) const {
  for (const ClusterMember& m : members_) {
    if (m.name == name) return &m;
  }
  return nullptr;
}

std::string LocalCluster::router_address() const {
  return members_.empty() ? "" : members_[0].grpc_address(options_.host);
}

std::string LocalCluster::kv_store_address() const {
  const ClusterMember* m = Find("kv-store");
  return m == nullptr ? "" : m->grpc_address(options_.host);
}

std::vector<std::string> LocalCluster::attention_worker_addresses() const {
  std::vector<std::string> out;
  for (const ClusterMember& m : members_) {
    if (m.kind == "attention-worker") out.push_back(m.grpc_address(options_.host));
  }
  return out;
}

std::vector<std::string> LocalCluster::expert_worker_addresses() const {
  std::vector<std::string> out;
  for (const ClusterMember& m : members_) {
    if (m.kind == "expert-worker") out.push_back(m.grpc_address(options_.host));
  }
  return out;
}

std::string LocalCluster::http_url() const {
  const ClusterMember* m = Find("gateway");
  return m == nullptr ? ""
                      : "http://" + m->address_host(options_.host) + ":" +
                            std::to_string(m->http_port);
}

std::string LocalCluster::admin_url() const {
  const ClusterMember* m = Find("gateway");
  return m == nullptr || m->admin_port == 0
             ? ""
             : "http://" + m->address_host(options_.host) + ":" + std::to_string(m->admin_port) +
                   "/";
}

std::optional<ClusterMember> LocalCluster::ReapExited() {
  for (ClusterMember& m : members_) {
    if (m.pid != 0 && !m.exited && Reap(m)) return m;
  }
  return std::nullopt;
}

absl::Status LocalCluster::HandleDeath(ClusterMember& m) {
  const std::string what =
      "(pid " + std::to_string(m.pid) + ") stopped unexpectedly (" + Describe(m.wait_status) + ")";
  if (!options_.restart_on_failure) return Failure(m, what);
  const absl::Time now = absl::Now();
  while (!m.recent_deaths.empty() && now - m.recent_deaths.front() > kRestartWindow) {
    m.recent_deaths.pop_front();
  }
  m.recent_deaths.push_back(now);
  const int deaths = static_cast<int>(m.recent_deaths.size());
  if (deaths > options_.max_restarts_per_minute) {
    return absl::ResourceExhaustedError(m.name + " " + what + ", its " + std::to_string(deaths) +
                                        "th death within a minute (at most " +
                                        std::to_string(options_.max_restarts_per_minute) +
                                        " restarts a minute); giving up. Last lines of " +
                                        m.log_path + ":\n" + TailFile(m.log_path, 20));
  }
  absl::Duration backoff = options_.restart_backoff;
  for (int i = 1; i < deaths && backoff < options_.max_restart_backoff; ++i) backoff *= 2;
  backoff = std::min(backoff, options_.max_restart_backoff);
  Say("up: " + m.name + " " + what + "; restarting it in " + FormatSeconds(backoff) + " (restart " +
      std::to_string(deaths) + " of at most " + std::to_string(options_.max_restarts_per_minute) +
      " a minute). Last lines of " + m.log_path + ":\n" + TailFile(m.log_path, 20));
  m.state = ClusterMember::State::kWaitingToRestart;
  m.restart_at = now + backoff;
  m.stale_worker_id = m.kind == "router" ? 0 : RouterWorkerId(m.grpc_address(options_.host));
  return absl::OkStatus();
}

absl::Status LocalCluster::Supervise() {
  if (stopped_) return absl::FailedPreconditionError("the cluster is stopped");
  for (ClusterMember& m : members_) {
    switch (m.state) {
      case ClusterMember::State::kRunning:
        if (Reap(m)) {
          if (absl::Status s = HandleDeath(m); !s.ok()) return s;
        }
        break;
      case ClusterMember::State::kWaitingToRestart:
        if (absl::Now() < m.restart_at) break;
        // The same ports as before: the router, the workers and cluster.json readers keep the
        // address they know.
        if (absl::Status s = Spawn(m, m.grpc_port, m.metrics_port, m.http_port); !s.ok()) {
          return s;
        }
        m.state = ClusterMember::State::kRestarting;
        m.restart_at = absl::Now();
        break;
      case ClusterMember::State::kRestarting: {
        if (Reap(m)) {
          if (absl::Status s = HandleDeath(m); !s.ok()) return s;
          break;
        }
        const std::string address = m.grpc_address(options_.host);
        bool registered = m.kind == "router";
        if (!registered) {
          const uint64_t id = RouterWorkerId(address);
          registered = id != 0 && id != m.stale_worker_id;
        }
        if (registered && rpc::CheckHealth(address, kSuperviseRpcTimeout).ok()) {
          m.state = ClusterMember::State::kRunning;
          ++m.restarts;
          Say("up: " + m.name + " is back (pid " + std::to_string(m.pid) + ", restart " +
              std::to_string(m.restarts) + ")");
          WriteClusterJson();
        } else if (absl::Now() - m.restart_at > options_.ready_timeout) {
          return Failure(m, "(pid " + std::to_string(m.pid) +
                                ") was restarted but did not become healthy and registered "
                                "within " +
                                FormatSeconds(options_.ready_timeout));
        }
        break;
      }
    }
  }
  return absl::OkStatus();
}

void LocalCluster::SignalAndWait(const std::vector<ClusterMember*>& targets, int sig,
                                 absl::Time deadline) {
  for (ClusterMember* m : targets) {
    if (m->pid == 0 || m->exited || sig == 0) continue;
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
  // The gateway first: it stops accepting and lets running streams finish (its drain timeout is
  // 0.3 of ours) while the workers still serve them. Then the attention workers (nothing new
  // reaches the experts), then the expert workers, which may drain with the router, then
  // kv-store and router, which the others deregister from. Each phase ends early once its
  // processes are gone; the deadlines only bound a hung one.
  std::vector<ClusterMember*> gateways, front, experts, back, all;
  for (ClusterMember& m : members_) {
    all.push_back(&m);
    if (m.kind == "gateway") {
      gateways.push_back(&m);
    } else if (m.kind == "attention-worker") {
      front.push_back(&m);
    } else if (m.kind == "expert-worker") {
      experts.push_back(&m);
    } else {
      back.push_back(&m);
    }
  }
  SignalAndWait(gateways, SIGTERM, start + options_.stop_timeout * 0.4);
  SignalAndWait(front, SIGTERM, start + options_.stop_timeout * 0.55);
  SignalAndWait(experts, SIGTERM, start + options_.stop_timeout * 0.8);
  SignalAndWait(back, SIGTERM, start + options_.stop_timeout);
  SignalAndWait(all, 0, start + options_.stop_timeout);  // 0: only waits for the stragglers
  for (ClusterMember* m : all) {
    if (m->pid == 0 || m->exited) continue;
    Say("up: " + m->name + " (pid " + std::to_string(m->pid) +
        ") did not stop in time; killing it");
    if (kill(-m->pid, SIGKILL) != 0) kill(m->pid, SIGKILL);
    waitpid(m->pid, &m->wait_status, 0);
    m->exited = true;
  }
  if (json_written_) {
    unlink((options_.run_dir + "/cluster.json").c_str());
    unlink((options_.run_dir + "/prometheus-targets.json").c_str());
  }
  // Every process is gone, so deleting the namespaces frees them at once.
  if (network_) network_->Remove();
  if (temp_log_dir_) {
    std::error_code ignored;
    std::filesystem::remove_all(options_.log_dir, ignored);
  }
}

std::string LocalCluster::ClusterJson() const {
  const std::string& h = options_.host;
  nlohmann::json services = nlohmann::json::array();
  for (const ClusterMember& m : members_) {
    nlohmann::json s = {
        {"name", m.name},
        {"kind", m.kind},
        {"pid", static_cast<int64_t>(m.pid)},
        {"grpc_address", m.grpc_address(h)},
        {"metrics_url",
         "http://" + m.address_host(h) + ":" + std::to_string(m.metrics_port) + "/metrics"},
        {"address", m.address_host(h)},
        {"netns", m.netns},
        {"log", m.log_path},
        {"restarts", m.restarts},
    };
    if (m.kind == "gateway") {
      s["http_url"] = "http://" + m.address_host(h) + ":" + std::to_string(m.http_port);
    }
    services.push_back(std::move(s));
  }
  nlohmann::json j = {
      {"model", options_.model_dir},
      {"http_url", http_url()},
      {"admin_url", admin_url()},
      {"supervisor_pid", static_cast<int64_t>(getpid())},
      {"services", std::move(services)},
  };
  return j.dump(2) + "\n";
}

std::string LocalCluster::PrometheusTargetsJson() const {
  // No `kind` label: the router's own series carry one (membership kind), and a target label of
  // the same name would rename theirs to exported_kind.
  nlohmann::json groups = nlohmann::json::array();
  for (const ClusterMember& m : members_) {
    groups.push_back({
        {"targets", {m.address_host(options_.host) + ":" + std::to_string(m.metrics_port)}},
        {"labels", {{"service", m.kind}, {"instance", m.name}}},
    });
  }
  return groups.dump(2) + "\n";
}

void LocalCluster::WriteClusterJson() {
  if (options_.run_dir.empty()) return;
  // Prometheus file-based discovery reads this one (monitoring/prometheus-local.yml); it is
  // rewritten with cluster.json so that a changed member set is scraped without a reload.
  WriteRunFile("prometheus-targets.json", PrometheusTargetsJson());
  if (WriteRunFile("cluster.json", ClusterJson())) json_written_ = true;
}

bool LocalCluster::WriteRunFile(const std::string& name, const std::string& text) {
  const std::string path = options_.run_dir + "/" + name;
  const std::string tmp = path + ".tmp." + std::to_string(getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    out.flush();
    if (!out) {
      Say("up: warning: cannot write " + tmp);
      return false;
    }
  }
  // Readers see the old file or the new one, never half of one.
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    Say("up: warning: cannot rename " + tmp + " to " + path + ": " + std::strerror(errno));
    unlink(tmp.c_str());
    return false;
  }
  return true;
}

std::string LocalCluster::Summary() const {
  std::string out;
  const std::string& h = options_.host;
  if (Find("gateway") != nullptr) {
    out += "API:  " + http_url() +
           "  (POST /v1/chat/completions, /v1/completions, /v1/messages; GET /v1/models, "
           "/health)\n";
    out += "Page: " + admin_url() + "  (live cluster page: members, placement heatmap, KV tiers)\n";
  }
  char line[512];
  std::snprintf(line, sizeof(line), "%-20s %-8s %-22s %s\n", "service", "pid", "gRPC", "metrics");
  out += line;
  for (const ClusterMember& m : members_) {
    std::snprintf(line, sizeof(line), "%-20s %-8d %-22s http://%s:%d/metrics%s%s\n",
                  m.name.c_str(), static_cast<int>(m.pid), m.grpc_address(h).c_str(),
                  m.address_host(h).c_str(), m.metrics_port, m.netns.empty() ? "" : "  netns ",
                  m.netns.c_str());
    out += line;
  }
  if (network_) {
    out += "hosts: " + std::to_string(network_->hosts().size()) + " network namespaces on bridge " +
           network_->bridge() + " (this machine is " + network_->bridge_address() + ")\n";
  }
  out += "model: " + options_.model_dir + "\nlogs:  " + options_.log_dir + "/<service>.log\n";
  if (!options_.run_dir.empty()) out += "state: " + options_.run_dir + "/cluster.json\n";
  return out;
}

}  // namespace expertmesh::cli
