// The Prometheus endpoint of a service: an HTTP server on `--metrics-listen` serving /metrics
// from one registry, with the build-info gauge and the process metrics already in it. Services
// add their own families to registry() at construction (STYLE.md: metrics struct built once).
#pragma once

#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "prometheus/registry.h"

namespace prometheus {
class Exposer;
}

namespace expertmesh::metrics {

// Labels of the `expertmesh_build_info` gauge (value 1).
struct BuildInfo {
  std::string component;   // "router", "gateway", ...
  std::string version;     // project version; empty = this build's
  std::string git_commit;  // empty = the commit this build was configured at, or "unknown"
  // Further labels (e.g. kernel_target once the kernels report it).
  std::map<std::string, std::string> extra;
};

class MetricsServer {
 public:
  // Binds `listen` ("host:port"; port 0 picks a free port) and serves /metrics.
  // Errors: InvalidArgument for a malformed address, Unavailable if it cannot bind.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& listen,
                                                              const BuildInfo& info);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // The registry served on /metrics; families added to it appear on the next scrape.
  // Thread-safe (prometheus-cpp's registry and metrics are).
  prometheus::Registry& registry() { return *registry_; }
  // The bound port.
  int port() const { return port_; }

 private:
  MetricsServer() = default;

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> process_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
  std::string wake_host_;  // where the destructor connects to wake the listener
};

// The version and git commit compiled into this build.
std::string BuildVersion();
std::string BuildGitCommit();

}  // namespace expertmesh::metrics
