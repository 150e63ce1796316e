// expertmesh-expert-worker: hosts a shard of routed experts; registers with the router.
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
  if (!status.ok()) return rpc::ReportSetupError("expertmesh-expert-worker", status);
  rpc::ServiceProcess* p = process->get();
  expert_worker::ExpertWorkerService service(model, [p]() -> uint64_t {
    rpc::RouterRegistration* r = p->registration();
    return r == nullptr ? 0 : r->state().worker_id;
  });
  p->AddService(&service);
  return p->ServeUntilTerminated(
      rpc::Membership{expertmesh::v1::WORKER_KIND_EXPERT, capacity.ToProto()});
}
