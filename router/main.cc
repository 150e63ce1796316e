// expertmesh-router: the control plane (membership with leases; placement later).
#include <cstdio>
#include <optional>

#include "core/rpc/service_process.h"
#include "core/rpc/termination.h"
#include "router/router_service.h"

int main(int argc, char** argv) {
  using namespace expertmesh;
  rpc::BlockTerminationSignals();
  rpc::CommonFlags common;
  int64_t lease_ms = 10000;
  rpc::FlagSet flags("expertmesh-router",
                     "The expertmesh control plane: worker membership with heartbeat leases.");
  common.Register(flags, /*with_router=*/false);
  flags.AddInt("lease-ms", &lease_ms,
               "lease TTL granted to members; a member silent this long is dropped");
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv); rc >= 0) return rc;
  if (lease_ms < 100) {
    std::fprintf(stderr, "--lease-ms must be at least 100\n");
    return 2;
  }
  auto process = rpc::ServiceProcess::Create("router", common);
  if (!process.ok()) return rpc::ReportSetupError("expertmesh-router", process.status());
  router::RealClock clock;
  router::RouterService service(clock, absl::Milliseconds(lease_ms), (*process)->registry());
  (*process)->AddService(&service);
  return (*process)->ServeUntilTerminated(/*membership=*/std::nullopt);  // the router is none
}
