// expertmesh-attention-worker: runs sequences (data path to come); registers with the router.
#include "attention-worker/attention_worker_service.h"
#include "core/rpc/service_process.h"
#include "core/rpc/termination.h"
#include "core/rpc/worker_capacity.h"

int main(int argc, char** argv) {
  using namespace expertmesh;
  rpc::BlockTerminationSignals();
  rpc::CommonFlags common;
  rpc::CapacityFlags capacity;
  std::string model;
  rpc::FlagSet flags("expertmesh-attention-worker",
                     "Runs sequences: attention, gate, shared expert, sampling.");
  common.Register(flags, /*with_router=*/true);
  capacity.Register(flags, /*with_max_experts=*/false);
  flags.AddString("model", &model, "model directory (config.json + safetensors); may be empty");
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv); rc >= 0) return rc;
  auto process = rpc::ServiceProcess::Create("attention-worker", common);
  absl::Status status = process.ok() ? rpc::CheckModelDir(model) : process.status();
  if (!status.ok()) return rpc::ReportSetupError("expertmesh-attention-worker", status);
  attention_worker::AttentionWorkerService service(model);
  (*process)->AddService(&service);
  return (*process)->ServeUntilTerminated(
      rpc::Membership{expertmesh::v1::WORKER_KIND_ATTENTION, capacity.ToProto()});
}
