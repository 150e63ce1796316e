// Bootstrap shared by every service binary: common flags, logging, the Prometheus endpoint, the
// gRPC server with grpc.health.v1 and reflection, membership with the router, the ready file
// that tests and `expertmesh up` poll for ports, and an orderly shutdown within a deadline.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/metrics/metrics_server.h"
#include "core/rpc/router_registration.h"
#include "core/rpc/service_flags.h"
#include "expertmesh/v1/common.pb.h"
#include "grpcpp/server.h"

namespace expertmesh::rpc {

// Flags every service has.
struct CommonFlags {
  std::string listen = "127.0.0.1:0";          // gRPC host:port; port 0 picks a free port
  std::string metrics_listen = "127.0.0.1:0";  // Prometheus host:port
  std::string router;                          // router host:port; empty = standalone
  std::string advertise;                       // address others use; default = listen host + port
  std::string ready_file;                      // JSON with the bound ports, written once serving
  std::string log_level = "info";

  // Adds --listen, --metrics-listen, --advertise, --ready-file, --log-level and, if
  // `with_router`, --router.
  void Register(FlagSet& flags, bool with_router);
};

// Parses flags for a main() or a CLI command: prints usage and returns 0 for --help, prints
// the error (after `error_prefix`, e.g. "expertmesh score: ") and returns 2 for bad flags,
// returns -1 to go on.
int ParseFlagsOrExit(FlagSet& flags, int argc, char** argv, std::string_view error_prefix = "");

// Reports a failure to set a service binary up (before it serves) on stderr as
// "<binary>: <status>"; returns 1, the exit code for main.
int ReportSetupError(std::string_view binary, const absl::Status& status);

// What a member registers with the router as (see ServiceProcess::StartRegistration).
struct Membership {
  expertmesh::v1::WorkerKind kind;
  expertmesh::v1::Capacity capacity;
  // RegisterWorkerRequest.kernel_target (kernels::ActiveKernelTargetName(); passed in because
  // em_rpc does not link the kernels). Empty = not reported.
  std::string kernel_target;
  // Expert workers: what they hold, asked at every (re)registration (see RouterRegistration::
  // SetHostedExperts). Null = none.
  std::function<HostedExperts()> hosted_experts;
};

class ServiceProcess {
 public:
  // Sets the log component and level, starts the metrics endpoint.
  // Errors: InvalidArgument (log level, addresses), Unavailable (cannot bind metrics).
  static absl::StatusOr<std::unique_ptr<ServiceProcess>> Create(std::string component,
                                                                CommonFlags flags);
  ~ServiceProcess();

  prometheus::Registry& registry() { return metrics_->registry(); }
  // Services to serve; must outlive the process object's server. Call before StartGrpc.
  void AddService(grpc::Service* service);
  // Builds and starts the gRPC server (health: SERVING; reflection on).
  // Errors: Unavailable if it cannot bind --listen.
  absl::Status StartGrpc();
  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_->port(); }
  // The address registered with the router ("host:port").
  const std::string& advertised_address() const { return advertised_; }

  // Starts membership with the router as `kind` (no-op without --router).
  void StartRegistration(expertmesh::v1::WorkerKind kind, const expertmesh::v1::Capacity& capacity);
  void StartRegistration(const Membership& membership);
  // Null without --router.
  RouterRegistration* registration() { return registration_.get(); }

  // Writes the ready file (if --ready-file) and logs "serving" with the ports.
  absl::Status AnnounceReady(int http_port = 0);

  // Health NOT_SERVING, deregister, then Server::Shutdown with `deadline` (in-flight calls are
  // cancelled after it). Idempotent.
  void Shutdown(absl::Duration deadline = absl::Seconds(2));

  grpc::Server* server() { return server_.get(); }

  // Logs "cannot start" with `status` (a failure after setup, once the log is configured);
  // returns 1, the exit code for main.
  static int ReportStartError(const absl::Status& status);

  // Waits for a termination signal (requires BlockTerminationSignals) or RequestExit, logs it,
  // runs `before_shutdown` (if any; e.g. stops an HTTP server, drains an expert worker) and then
  // Shutdown(). Returns 0, the exit code for main.
  int WaitForTerminationAndShutdown(const std::function<void()>& before_shutdown = nullptr);

  // Makes SIGHUP run `reload` (on the thread in WaitForTerminationAndShutdown) instead of ending
  // the process, e.g. the gateway re-reading its keys file. Without it SIGHUP terminates, as
  // SIGTERM does. Call before WaitForTerminationAndShutdown.
  void OnHangup(std::function<void()> reload) { on_hangup_ = std::move(reload); }

  // Makes WaitForTerminationAndShutdown go on as if a termination signal had come (a service
  // that decides to leave by itself, e.g. an expert worker at the end of a Drain). Thread-safe.
  void RequestExit() { exit_requested_.store(true); }

  // The rest of a service's life once its services are added: StartGrpc, StartRegistration
  // (with `membership`, if any), AnnounceReady, then WaitForTerminationAndShutdown with
  // `on_terminate` as its before_shutdown. Returns the exit code for main: 1 (via
  // ReportStartError) when it cannot start, 0 after a shutdown.
  int ServeUntilTerminated(const std::optional<Membership>& membership,
                           const std::function<void()>& on_terminate = nullptr);

 private:
  ServiceProcess() = default;

  std::string component_;
  CommonFlags flags_;
  std::unique_ptr<metrics::MetricsServer> metrics_;
  std::vector<grpc::Service*> services_;
  std::unique_ptr<grpc::Server> server_;
  int grpc_port_ = 0;
  std::string advertised_;
  std::unique_ptr<RouterRegistration> registration_;
  bool shut_down_ = false;
  std::atomic<bool> exit_requested_{false};
  std::function<void()> on_hangup_;
};

}  // namespace expertmesh::rpc
