// The local cluster behind `expertmesh up`: router, kv-store, one attention worker, two expert
// workers and the gateway as child processes on loopback. Starts them (each in its own process
// group, with PR_SET_PDEATHSIG so that they die if the supervisor is killed), waits until every
// one answers its gRPC health check and the workers have joined the router, and stops them all
// (SIGTERM, then SIGKILL after a grace period), leaving no process behind.
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace expertmesh::cli {

struct LocalClusterOptions {
  std::string bin_dir;  // build tree holding router/expertmesh-router, ...
  std::string host = "127.0.0.1";
  int http_port = 8000;  // gateway HTTP API; 0 = pick a free port
  // gRPC ports are base..base+5 (router, kv-store, attention, expert-0, expert-1, gateway) and
  // metrics ports base+10..base+15 in the same order; 0 = every port picked freely.
  int base_port = 50050;
  std::string model_dir;  // passed to the gateway and workers (must hold config.json)
  std::string log_dir;    // <name>.log and <name>.ready per service
  std::string log_level = "info";
  int64_t lease_ms = 10000;  // router lease TTL
  absl::Duration ready_timeout = absl::Seconds(60);
  absl::Duration stop_timeout = absl::Seconds(10);
  // Polled while waiting; returning true aborts the start (e.g. Ctrl-C during start-up).
  std::function<bool()> should_abort;
};

// One child process of the cluster.
struct ClusterMember {
  std::string name;  // "router", "kv-store", "attention-worker", "expert-worker-0", ...
  std::string binary;
  pid_t pid = 0;
  int grpc_port = 0;
  int metrics_port = 0;
  int http_port = 0;  // gateway only
  std::string log_path;
  bool exited = false;
  int wait_status = 0;
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
  // Human-readable summary: API URL, gRPC addresses, metrics URLs, pids, logs.
  std::string Summary() const;
  // Reaps exited children without blocking; returns the first that exited (a copy), if any.
  std::optional<ClusterMember> ReapExited();
  // SIGTERM to every process group (workers and gateway first, the router last so that they can
  // deregister), SIGKILL after stop_timeout, and waitpid for all. Idempotent.
  void Stop();

 private:
  explicit LocalCluster(LocalClusterOptions options) : options_(std::move(options)) {}
  absl::Status Spawn(ClusterMember& member, const std::vector<std::string>& args);
  absl::Status WaitReady(ClusterMember& member, absl::Time deadline);
  absl::Status WaitForMembership(absl::Time deadline);
  // Error for `member` with its log tail.
  absl::Status Failure(const ClusterMember& member, const std::string& what) const;
  void SignalAndWait(const std::vector<ClusterMember*>& targets, int sig, absl::Time deadline);

  LocalClusterOptions options_;
  std::vector<ClusterMember> members_;
  bool stopped_ = false;
};

// Last `lines` lines of the file at `path` ("" if unreadable).
std::string TailFile(const std::string& path, int lines);

}  // namespace expertmesh::cli
