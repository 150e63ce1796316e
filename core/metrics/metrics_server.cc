#include "core/metrics/metrics_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <exception>
#include <thread>

#include "core/metrics/process_collector.h"
#include "prometheus/exposer.h"
#include "prometheus/gauge.h"

#ifndef EM_GIT_COMMIT
#define EM_GIT_COMMIT "unknown"
#endif

namespace expertmesh::metrics {

std::string BuildVersion() { return EM_VERSION; }
std::string BuildGitCommit() { return EM_GIT_COMMIT; }

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& listen,
                                                                    const BuildInfo& info) {
  size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon + 1 == listen.size()) {
    return absl::InvalidArgumentError("--metrics-listen '" + listen + "' is not host:port");
  }
  std::unique_ptr<MetricsServer> server(new MetricsServer());
  server->registry_ = std::make_shared<prometheus::Registry>();
  std::map<std::string, std::string> labels = info.extra;
  labels["component"] = info.component;
  labels["version"] = info.version.empty() ? BuildVersion() : info.version;
  labels["git_commit"] = info.git_commit.empty() ? BuildGitCommit() : info.git_commit;
  prometheus::BuildGauge()
      .Name("expertmesh_build_info")
      .Help("Build information of this expertmesh process; the value is always 1.")
      .Register(*server->registry_)
      .Add(labels)
      .Set(1);
  server->process_ = std::make_shared<ProcessCollector>();
  try {
    // CivetWeb binds in the constructor and throws on failure; two threads are plenty for scrapes.
    server->exposer_ = std::make_unique<prometheus::Exposer>(listen, 2);
  } catch (const std::exception& e) {
    return absl::UnavailableError("metrics endpoint cannot listen on '" + listen +
                                  "': " + e.what());
  }
  server->exposer_->RegisterCollectable(server->registry_);
  server->exposer_->RegisterCollectable(server->process_);
  std::vector<int> ports = server->exposer_->GetListeningPorts();
  if (ports.empty()) return absl::UnavailableError("metrics endpoint reports no port");
  server->port_ = ports[0];
  std::string host = listen.substr(0, colon);
  server->wake_host_ = (host.empty() || host == "0.0.0.0" || host == "localhost" || host[0] == '[')
                           ? "127.0.0.1"
                           : host;
  return server;
}

namespace {
// Opens and closes one TCP connection to host:port (IPv4 only; best effort).
void Poke(const std::string& host, int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) == 1) {
    connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  }
  close(fd);
}
}  // namespace

MetricsServer::~MetricsServer() {
  if (exposer_ == nullptr) return;
  // CivetWeb's master thread polls its listener with a 2 s timeout and mg_stop waits for it,
  // which would add up to 2 s to every service's shutdown; a connection wakes it at once.
  std::atomic<bool> stopped{false};
  std::thread waker([this, &stopped] {
    while (!stopped.load()) {
      Poke(wake_host_, port_);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  exposer_.reset();
  stopped.store(true);
  waker.join();
}

}  // namespace expertmesh::metrics
