// Starts the real service binaries of this build for integration tests: port 0 everywhere, a
// ready file per process, logs under a temporary directory, and an RAII handle that reaps.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tests/testing/child_process.h"

namespace expertmesh::testing {

inline std::string BinaryPath(const std::string& relative) {
  return std::string(EM_BINARY_DIR) + "/" + relative;
}

inline const char* kRouterBinary = "router/expertmesh-router";
inline const char* kGatewayBinary = "gateway/expertmesh-gateway";
inline const char* kAttentionBinary = "attention-worker/expertmesh-attention-worker";
inline const char* kExpertBinary = "expert-worker/expertmesh-expert-worker";
inline const char* kKvStoreBinary = "kv-store/expertmesh-kv-store";

struct RunningService {
  std::string name;
  std::unique_ptr<ChildProcess> process;
  ReadyPorts ports;
  std::string grpc_address() const { return "127.0.0.1:" + std::to_string(ports.grpc); }
};

// Starts `binary` (relative to the build dir) with --listen/--metrics-listen on port 0 and a
// ready file in `dir`, plus `args`; waits (bounded) until it is serving.
inline absl::StatusOr<RunningService> StartService(const std::string& name,
                                                   const std::string& binary,
                                                   const std::vector<std::string>& args,
                                                   const std::string& dir,
                                                   absl::Duration timeout = absl::Seconds(30)) {
  const std::string ready = dir + "/" + name + ".ready";
  std::vector<std::string> argv = {BinaryPath(binary), "--listen=127.0.0.1:0",
                                   "--metrics-listen=127.0.0.1:0", "--ready-file=" + ready};
  argv.insert(argv.end(), args.begin(), args.end());
  auto process = ChildProcess::Start(argv, dir + "/" + name + ".log");
  if (!process.ok()) return process.status();
  auto ports = WaitForReadyFile(ready, process->get(), timeout);
  if (!ports.ok()) return ports.status();
  RunningService s;
  s.name = name;
  s.process = std::move(*process);
  s.ports = *ports;
  return s;
}

}  // namespace expertmesh::testing
