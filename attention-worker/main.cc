// expertmesh-attention-worker: runs sequences (data path to come); registers with the router.
#include <unistd.h>

#include <cstdio>

#include "attention-worker/attention_worker_service.h"
#include "core/base/log.h"
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
  if (!status.ok()) {
    std::fprintf(stderr, "expertmesh-attention-worker: %s\n", status.ToString().c_str());
    return 1;
  }
  attention_worker::AttentionWorkerService service(model);
  (*process)->AddService(&service);
  status = (*process)->StartGrpc();
  if (status.ok()) {
    (*process)->StartRegistration(expertmesh::v1::WORKER_KIND_ATTENTION, capacity.ToProto());
    status = (*process)->AnnounceReady();
  }
  if (!status.ok()) {
    base::LogError("cannot start", {{"error", status.ToString()}});
    return 1;
  }
  int sig = rpc::WaitForTerminationSignal();
  base::LogInfo("shutting down", {{"signal", sig}});
  (*process)->Shutdown();
  return 0;
}
