// expertmesh-router: the control plane: membership with leases and, with --model, the expert
// placement table (docs/placement.md).
#include <cstdio>
#include <optional>
#include <string>

#include "core/base/flags.h"
#include "core/rpc/service_process.h"
#include "core/rpc/termination.h"
#include "router/placement.h"
#include "router/router_service.h"

namespace {

int SetupError(const absl::Status& status) {
  return expertmesh::rpc::ReportSetupError("expertmesh-router", status);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace expertmesh;
  rpc::BlockTerminationSignals();
  rpc::CommonFlags common;
  int64_t lease_ms = 10000;
  std::string model_dir;
  int64_t replicas = 1;
  std::string placement_file;
  std::string state_dir;
  int64_t load_timeout_ms = 60000;
  base::FlagSet flags("expertmesh-router",
                     "The expertmesh control plane: worker membership with heartbeat leases and "
                     "the expert placement table.");
  common.Register(flags, /*with_router=*/false);
  flags.AddInt("lease-ms", &lease_ms,
               "lease TTL granted to members; a member silent this long is dropped");
  flags.AddString("model", &model_dir,
                  "model directory (its config.json gives the layers and experts to place); "
                  "empty = no placement table");
  flags.AddInt("expert-replicas", &replicas,
               "expert workers hosting each routed expert (fewer while fewer workers are up)");
  flags.AddString("placement-file", &placement_file,
                  "JSON file pinning experts to workers (docs/placement.md); requires --model");
  flags.AddString("state-dir", &state_dir,
                  "directory keeping the last published placement version across restarts");
  flags.AddInt("load-timeout-ms", &load_timeout_ms,
               "deadline of one LoadExperts call to an expert worker");
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv); rc >= 0) return rc;
  if (lease_ms < 100) {
    std::fprintf(stderr, "--lease-ms must be at least 100\n");
    return 2;
  }
  if (replicas < 1 || replicas > 64) {
    std::fprintf(stderr, "--expert-replicas must be in [1, 64], got %lld\n",
                 static_cast<long long>(replicas));
    return 2;
  }
  if (load_timeout_ms < 1) {
    std::fprintf(stderr, "--load-timeout-ms must be positive\n");
    return 2;
  }
  if (model_dir.empty() && (!placement_file.empty() || !state_dir.empty())) {
    std::fprintf(stderr, "--placement-file and --state-dir require --model\n");
    return 2;
  }

  std::optional<router::PlacementConfig> placement;
  if (!model_dir.empty()) {
    router::PlacementConfig config;
    auto shape = router::ReadModelShape(model_dir);
    if (!shape.ok()) return SetupError(shape.status());
    config.options.shape = *shape;
    config.options.replicas = static_cast<int>(replicas);
    if (!placement_file.empty()) {
      auto pinned = router::ReadPinnedPlacement(placement_file, *shape);
      if (!pinned.ok()) return SetupError(pinned.status());
      config.options.pinned = std::move(*pinned);
    }
    if (!state_dir.empty()) {
      auto restored = router::ReadPlacementState(state_dir);
      if (!restored.ok()) return SetupError(restored.status());
      config.options.restored_version = *restored;
      // Fail now rather than at the first publication if the directory is not writable.
      if (absl::Status s = router::WritePlacementState(state_dir, *restored); !s.ok()) {
        return SetupError(s);
      }
    }
    config.load_timeout = absl::Milliseconds(load_timeout_ms);
    config.state_dir = state_dir;
    placement = std::move(config);
  }

  auto process = rpc::ServiceProcess::Create("router", common);
  if (!process.ok()) return SetupError(process.status());
  base::RealClock clock;
  router::RouterService service(clock, absl::Milliseconds(lease_ms), (*process)->registry(),
                                std::move(placement));
  (*process)->AddService(&service);
  // Not ServeUntilTerminated: the watch streams must end before the server's shutdown waits
  // for calls in flight. The router itself is no member.
  absl::Status status = (*process)->StartGrpc();
  if (status.ok()) status = (*process)->AnnounceReady();
  if (!status.ok()) return rpc::ServiceProcess::ReportStartError(status);
  return (*process)->WaitForTerminationAndShutdown([&service] { service.StopWatches(); });
}
