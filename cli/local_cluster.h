// A local cluster as child processes on loopback: the router, optionally a kv-store, A attention
// workers, E expert workers and optionally the gateway. `expertmesh up` runs it under
// supervision; other commands (`score --cluster N`) start a smaller one in-process and stop it
// when done.
//
// Each child runs in its own process group with PR_SET_PDEATHSIG, so that it dies if the
// process that started it is killed. PR_SET_PDEATHSIG fires when the *thread* that forked exits,
// so call Start (and Supervise, which may fork restarts) from a thread that outlives the cluster.
// Starting waits until every service answers its gRPC health check and the router lists every
// other member; stopping is ordered (gateway and attention workers, then expert workers, then
// kv-store and router) and ends with SIGKILL after a deadline, leaving no process behind.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cli/netns.h"

namespace expertmesh::cli {

struct LocalClusterOptions {
  // Build tree holding router/expertmesh-router, ...; empty = the tree of the running
  // executable (<build>/cli/expertmesh, resolved through /proc/self/exe).
  std::string bin_dir;
  std::string host = "127.0.0.1";
  // hosts > 1: the services run in that many network namespaces (cli/netns.h) with addresses from
  // hosts_subnet instead of on `host`: router, kv-store and gateway on host 0, the workers
  // round-robin from host 1 on. Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN).
  int hosts = 1;
  std::string hosts_subnet = "198.18.0.0/15";
  std::string model_dir;  // passed to the workers and the gateway (must hold config.json)

  int attention_workers = 1;
  int expert_workers = 2;
  int expert_replicas = 1;  // router --expert-replicas (passed when the router has the flag)
  bool with_kv_store = true;
  bool with_gateway = true;

  int http_port = 8000;  // gateway HTTP API; 0 = pick a free port
  int admin_port = 0;    // gateway admin listener (cluster page); 0 = pick a free port
  // Deterministic ports from `base_port` (see PortLayout below); 0 = every port picked freely.
  int base_port = 50050;

  // <name>.log and <name>.ready per service; empty = a fresh directory under $TMPDIR (or /tmp)
  // that Stop() removes.
  std::string log_dir;
  // If set, <run_dir>/cluster.json describes the cluster (written atomically once every service
  // is healthy and after each restart; removed by Stop()), and <run_dir>/prometheus-targets.json
  // lists the metrics addresses for Prometheus file_sd, written alongside it.
  std::string run_dir;
  std::string log_level = "info";
  int64_t lease_ms = 10000;  // router lease TTL
  // Expert workers' --drain-timeout-ms (passed when their binary has the flag), kept short so
  // that stopping the cluster stays fast.
  int64_t expert_drain_timeout_ms = 2000;
  // Appended to the command line of every service of that kind (e.g. --inject-delay-ms=5).
  std::vector<std::string> extra_router_args;
  std::vector<std::string> extra_attention_worker_args;
  std::vector<std::string> extra_expert_worker_args;
  std::vector<std::string> extra_gateway_args;  // e.g. --api-key=..., --model-alias=...

  absl::Duration ready_timeout = absl::Seconds(60);
  absl::Duration stop_timeout = absl::Seconds(10);  // then SIGKILL
  // Polled while waiting; returning true aborts the start (e.g. Ctrl-C during start-up).
  std::function<bool()> should_abort;
  bool quiet = false;  // no progress lines ("up: started ...") on stderr

  // Supervision (see LocalCluster::Supervise). Off: any exit is a failure.
  bool restart_on_failure = false;
  int max_restarts_per_minute = 5;  // per service; one more death within a minute is fatal
  absl::Duration restart_backoff = absl::Milliseconds(500);  // doubles per recent restart
  absl::Duration max_restart_backoff = absl::Seconds(8);
};

// Options for a small throwaway cluster on `model_dir` (tests, `--cluster N`, benchmarks):
// A attention workers and E expert workers with a router, no kv-store, no gateway, every port
// picked freely, quiet, logging warnings only.
LocalClusterOptions SmallClusterOptions(const std::string& model_dir, int attention_workers,
                                        int expert_workers);

// The port scheme for a base port B and N services in start order (router, kv-store,
// attention-worker-0.., expert-worker-0.., gateway; absent services take no slot): service i
// listens on B+i for gRPC and B+i+max(10, N) for metrics, so that the default cluster keeps
// 50050..50055 / 50060..50065 and a large one never overlaps its two ranges.
struct PortLayout {
  int grpc = 0;
  int metrics = 0;
};
PortLayout PortsFor(int base_port, int index, int service_count);
// Whether base..(highest metrics port) fits in 1..65535.
bool PortRangeFits(int base_port, int service_count);

// One child process of the cluster.
struct ClusterMember {
  std::string name;  // "router", "kv-store", "attention-worker-0", "expert-worker-1", "gateway"
  std::string kind;  // "router", "kv-store", "attention-worker", "expert-worker", "gateway"
  int index = 0;     // i in <kind>-<i> (0 for singletons)
  std::string binary;
  std::vector<std::string> args;  // without the port flags, which Spawn adds
  pid_t pid = 0;
  int grpc_port = 0;
  int metrics_port = 0;
  int http_port = 0;  // gateway only
  int admin_port = 0;  // gateway only: the cluster page (read from <log_dir>/gateway.admin-port)
  std::string log_path;
  bool exited = false;
  int wait_status = 0;
  int restarts = 0;  // successful respawns so far
  // Supervision state.
  enum class State { kRunning, kWaitingToRestart, kRestarting };
  State state = State::kRunning;
  absl::Time restart_at;
  std::deque<absl::Time> recent_deaths;  // within the last minute
  // The router's id for the dead process, so that its stale entry (same address, lease not yet
  // run out) is not taken for the restarted one; 0 if unknown.
  uint64_t stale_worker_id = 0;

  // With --hosts N > 1: the network namespace it runs in and its address there (which then
  // replaces the cluster's `host` in every address of the member); empty on loopback.
  std::string netns;
  std::string ip;

  std::string grpc_address(const std::string& host) const {
    return (ip.empty() ? host : ip) + ":" + std::to_string(grpc_port);
  }
  std::string address_host(const std::string& host) const { return ip.empty() ? host : ip; }
};

class LocalCluster {
 public:
  // Starts everything and waits until healthy. On any failure stops what it started and
  // returns an error naming the service at fault with the tail of its log.
  static absl::StatusOr<std::unique_ptr<LocalCluster>> Start(const LocalClusterOptions& options);
  ~LocalCluster();  // Stop()
  LocalCluster(const LocalCluster&) = delete;
  LocalCluster& operator=(const LocalCluster&) = delete;

  const std::vector<ClusterMember>& members() const { return members_; }
  const LocalClusterOptions& options() const { return options_; }
  // "host:port" of the router, and of each worker in index order.
  std::string router_address() const;
  std::string kv_store_address() const;  // "" without a kv-store
  std::vector<std::string> attention_worker_addresses() const;
  std::vector<std::string> expert_worker_addresses() const;
  std::string http_url() const;  // "http://host:port" of the gateway; "" without one
  std::string admin_url() const;  // "http://host:port/": the gateway's cluster page; "" without
  // nullptr if there is no member of that name.
  const ClusterMember* Find(const std::string& name) const;

  // Human-readable summary: API URL, gRPC addresses, metrics URLs, pids, logs.
  std::string Summary() const;
  // cluster.json as written to <run_dir> (also without a run_dir).
  std::string ClusterJson() const;

  // One supervision step; call it every ~100-200 ms. Reaps exited children. Without
  // restart_on_failure, an exit is an error (Unavailable naming the service, its exit status and
  // log tail). With it, a dead service is respawned on the same ports after a backoff
  // (restart_backoff doubling per death in the last minute, capped by max_restart_backoff) and
  // cluster.json is rewritten once it is healthy and registered again; more than
  // max_restarts_per_minute deaths within a minute is an error (ResourceExhausted). The
  // caller stops the cluster after an error.
  absl::Status Supervise();

  // Reaps exited children without blocking; returns the first that exited (a copy), if any.
  std::optional<ClusterMember> ReapExited();
  // SIGTERM in order (gateway + attention workers, expert workers, kv-store + router), SIGKILL
  // after stop_timeout, and waitpid for all; removes cluster.json (and a temporary log dir).
  // Idempotent.
  void Stop();

 private:
  explicit LocalCluster(LocalClusterOptions options) : options_(std::move(options)) {}
  absl::Status Plan();
  // hosts > 1: creates the namespaces and gives each member its host (netns, ip).
  absl::Status PlaceOnHosts();
  absl::Status Spawn(ClusterMember& member, int grpc_port, int metrics_port, int http_port);
  absl::Status WaitReady(ClusterMember& member, absl::Time deadline);
  absl::Status WaitForMembership(absl::Time deadline);
  // The router's worker id for the member at `address`; 0 if none is listed or the router does
  // not answer (a short RPC with a deadline).
  uint64_t RouterWorkerId(const std::string& address);
  absl::Status HandleDeath(ClusterMember& member);
  void WriteClusterJson();  // and prometheus-targets.json
  // Writes <run_dir>/<name> atomically; false (after saying why) on failure.
  bool WriteRunFile(const std::string& name, const std::string& text);
  // Prometheus file_sd target groups: one per member, labels service and instance.
  std::string PrometheusTargetsJson() const;
  // Error for `member` with its log tail.
  absl::Status Failure(const ClusterMember& member, const std::string& what) const;
  void SignalAndWait(const std::vector<ClusterMember*>& targets, int sig, absl::Time deadline);
  void Say(const std::string& line) const;

  LocalClusterOptions options_;
  std::unique_ptr<HostNetwork> network_;  // hosts > 1 only; removed by Stop()
  std::vector<ClusterMember> members_;
  bool temp_log_dir_ = false;
  bool stopped_ = false;
  bool json_written_ = false;
};

// Same as LocalCluster::Start.
inline absl::StatusOr<std::unique_ptr<LocalCluster>> StartLocalCluster(
    const LocalClusterOptions& options) {
  return LocalCluster::Start(options);
}

// Last `lines` lines of the file at `path` ("" if unreadable), each indented by four spaces.
std::string TailFile(const std::string& path, int lines);

// Runs `binary --help` (bounded by a few seconds) and returns whether its flag list names
// `--flag` (lines of the form "  --flag"). False if it cannot be run.
bool BinaryHasFlag(const std::string& binary, const std::string& flag);

}  // namespace expertmesh::cli
