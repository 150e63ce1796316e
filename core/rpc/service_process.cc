#include "core/rpc/service_process.h"

#include <signal.h>
#include <unistd.h>

#include <cstdio>

#include "core/base/log.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "core/rpc/channel.h"
#include "core/rpc/termination.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "nlohmann/json.hpp"

namespace expertmesh::rpc {

void CommonFlags::Register(FlagSet& flags, bool with_router) {
  flags.AddString("listen", &listen, "gRPC listen address host:port (port 0 = pick a free port)");
  flags.AddString("metrics-listen", &metrics_listen,
                  "Prometheus /metrics listen address host:port (port 0 = pick a free port)");
  flags.AddString("advertise", &advertise,
                  "address other members use to reach this gRPC server (default: the listen "
                  "host with the bound port)");
  flags.AddString("ready-file", &ready_file,
                  "once serving, write {\"grpc\":port,\"metrics\":port,\"http\":port} here");
  flags.AddString("log-level", &log_level, "debug, info, warning or error");
  if (with_router) {
    flags.AddString("router", &router, "router address host:port to register with (empty = none)");
  }
}

int ParseFlagsOrExit(FlagSet& flags, int argc, char** argv, std::string_view error_prefix) {
  absl::Status status = flags.Parse(argc, argv);
  if (!status.ok()) {
    std::fprintf(stderr, "%s%s\n", std::string(error_prefix).c_str(),
                 std::string(status.message()).c_str());
    return 2;
  }
  if (flags.help_requested()) {
    std::fputs(flags.Usage().c_str(), stdout);
    return 0;
  }
  return -1;
}

int ReportSetupError(std::string_view binary, const absl::Status& status) {
  std::fprintf(stderr, "%s: %s\n", std::string(binary).c_str(), status.ToString().c_str());
  return 1;
}

absl::StatusOr<std::unique_ptr<ServiceProcess>> ServiceProcess::Create(std::string component,
                                                                       CommonFlags flags) {
  base::LogLevel level;
  if (!base::ParseLogLevel(flags.log_level, &level)) {
    return absl::InvalidArgumentError("--log-level '" + flags.log_level +
                                      "' is not debug, info, warning or error");
  }
  base::SetLogComponent(component);
  base::SetLogLevel(level);
  std::unique_ptr<ServiceProcess> p(new ServiceProcess());
  p->component_ = component;
  p->flags_ = std::move(flags);
  metrics::BuildInfo info;
  info.component = component;
  EM_ASSIGN_OR_RETURN(p->metrics_, metrics::MetricsServer::Start(p->flags_.metrics_listen, info));
  return p;
}

ServiceProcess::~ServiceProcess() { Shutdown(absl::Seconds(1)); }

void ServiceProcess::AddService(grpc::Service* service) { services_.push_back(service); }

absl::Status ServiceProcess::StartGrpc() {
  size_t colon = flags_.listen.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError("--listen '" + flags_.listen + "' is not host:port");
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(flags_.listen, grpc::InsecureServerCredentials(), &grpc_port_);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  for (grpc::Service* s : services_) builder.RegisterService(s);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || grpc_port_ == 0) {
    return absl::UnavailableError("gRPC server cannot listen on '" + flags_.listen + "'");
  }
  server_->GetHealthCheckService()->SetServingStatus(true);
  if (!flags_.advertise.empty()) {
    advertised_ = flags_.advertise;
  } else {
    std::string host = flags_.listen.substr(0, colon);
    if (host.empty() || host == "0.0.0.0" || host == "[::]") host = "127.0.0.1";
    advertised_ = host + ":" + std::to_string(grpc_port_);
  }
  return absl::OkStatus();
}

void ServiceProcess::StartRegistration(expertmesh::v1::WorkerKind kind,
                                       const expertmesh::v1::Capacity& capacity) {
  StartRegistration(Membership{kind, capacity});
}

void ServiceProcess::StartRegistration(const Membership& membership) {
  if (flags_.router.empty()) return;
  expertmesh::v1::RegisterWorkerRequest request;
  request.set_kind(membership.kind);
  request.set_address(advertised_);
  *request.mutable_capacity() = membership.capacity;
  request.set_kernel_target(membership.kernel_target);
  size_t colon = flags_.metrics_listen.rfind(':');
  request.set_metrics_address(flags_.metrics_listen.substr(0, colon) + ":" +
                              std::to_string(metrics_->port()));
  request.set_version(metrics::BuildVersion());
  registration_ = std::make_unique<RouterRegistration>(flags_.router, request);
  if (membership.hosted_experts) registration_->SetHostedExperts(membership.hosted_experts);
  registration_->Start();
}

absl::Status ServiceProcess::AnnounceReady(int http_port) {
  nlohmann::json ports = {{"grpc", grpc_port_}, {"metrics", metrics_->port()}};
  if (http_port != 0) ports["http"] = http_port;
  base::LogInfo("serving", {{"grpc_port", grpc_port_},
                            {"metrics_port", metrics_->port()},
                            {"http_port", http_port},
                            {"address", advertised_},
                            {"pid", static_cast<int64_t>(getpid())}});
  if (flags_.ready_file.empty()) return absl::OkStatus();
  return base::Annotate(base::WriteFileAtomically(flags_.ready_file, ports.dump() + "\n"),
                        "--ready-file");
}

void ServiceProcess::Shutdown(absl::Duration deadline) {
  if (shut_down_) return;
  shut_down_ = true;
  if (server_ != nullptr) server_->GetHealthCheckService()->SetServingStatus(false);
  if (registration_ != nullptr) registration_->Stop(/*deregister=*/true);
  if (server_ != nullptr) {
    server_->Shutdown(absl::ToChronoTime(absl::Now() + deadline));
    server_->Wait();
  }
  base::LogInfo("stopped", {});
}

int ServiceProcess::ReportStartError(const absl::Status& status) {
  base::LogError("cannot start", {{"error", status.ToString()}});
  return 1;
}

int ServiceProcess::WaitForTerminationAndShutdown(const std::function<void()>& before_shutdown) {
  int sig = 0;
  // Polled so that RequestExit (from another thread) is seen; signals still end the wait at once.
  while (sig == 0 && !exit_requested_.load()) {
    sig = WaitForTerminationSignalFor(100);
    if (sig == SIGHUP && on_hangup_) {
      base::LogInfo("SIGHUP: reloading", {});
      on_hangup_();
      sig = 0;
    }
  }
  base::LogInfo("shutting down", {{"signal", sig}});
  if (before_shutdown) before_shutdown();
  Shutdown();
  return 0;
}

int ServiceProcess::ServeUntilTerminated(const std::optional<Membership>& membership,
                                         const std::function<void()>& on_terminate) {
  absl::Status status = StartGrpc();
  if (status.ok()) {
    if (membership.has_value()) StartRegistration(*membership);
    status = AnnounceReady();
  }
  if (!status.ok()) return ReportStartError(status);
  return WaitForTerminationAndShutdown(on_terminate);
}

}  // namespace expertmesh::rpc
