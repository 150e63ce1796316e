// expertmesh-kv-store: per-sequence state blocks and the prefix index; registers with the router.
#include "core/base/flags.h"
#include "core/rpc/service_process.h"
#include "core/rpc/termination.h"
#include "core/rpc/worker_capacity.h"
#include "kv-store/kv_store_service.h"

int main(int argc, char** argv) {
  using namespace expertmesh;
  rpc::BlockTerminationSignals();
  rpc::CommonFlags common;
  rpc::CapacityFlags capacity;
  base::FlagSet flags("expertmesh-kv-store",
                     "Stores per-sequence model state in 128-token blocks with a prefix index.");
  common.Register(flags, /*with_router=*/true);
  capacity.Register(flags, /*with_max_experts=*/false);
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv); rc >= 0) return rc;
  auto process = rpc::ServiceProcess::Create("kv-store", common);
  if (!process.ok()) return rpc::ReportSetupError("expertmesh-kv-store", process.status());
  kv_store::KvStoreService service;
  (*process)->AddService(&service);
  return (*process)->ServeUntilTerminated(
      rpc::Membership{expertmesh::v1::WORKER_KIND_KV_STORE, capacity.ToProto()});
}
