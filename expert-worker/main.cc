// expertmesh-expert-worker: hosts a shard of routed experts; registers with the router.
#include <cstdio>

#include "core/base/log.h"
#include "core/rpc/service_process.h"
#include "core/rpc/termination.h"
#include "core/rpc/worker_capacity.h"
#include "expert-worker/expert_worker_service.h"

int main(int argc, char** argv) {
  using namespace expertmesh;
  rpc::BlockTerminationSignals();
  rpc::CommonFlags common;
  rpc::CapacityFlags capacity;
  std::string model;
  rpc::FlagSet flags("expertmesh-expert-worker",
                     "Hosts a shard of routed experts and computes batched expert FFNs.");
  common.Register(flags, /*with_router=*/true);
  capacity.Register(flags, /*with_max_experts=*/true);
  flags.AddString("model", &model, "model directory (config.json + safetensors); may be empty");
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv); rc >= 0) return rc;
  auto process = rpc::ServiceProcess::Create("expert-worker", common);
  absl::Status status = process.ok() ? rpc::CheckModelDir(model) : process.status();
  if (!status.ok()) {
    std::fprintf(stderr, "expertmesh-expert-worker: %s\n", status.ToString().c_str());
    return 1;
  }
  rpc::ServiceProcess* p = process->get();
  expert_worker::ExpertWorkerService service(model, [p]() -> uint64_t {
    rpc::RouterRegistration* r = p->registration();
    return r == nullptr ? 0 : r->state().worker_id;
  });
  p->AddService(&service);
  status = p->StartGrpc();
  if (status.ok()) {
    p->StartRegistration(expertmesh::v1::WORKER_KIND_EXPERT, capacity.ToProto());
    status = p->AnnounceReady();
  }
  if (!status.ok()) {
    base::LogError("cannot start", {{"error", status.ToString()}});
    return 1;
  }
  int sig = rpc::WaitForTerminationSignal();
  base::LogInfo("shutting down", {{"signal", sig}});
  p->Shutdown();
  return 0;
}
