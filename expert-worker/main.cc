// expertmesh-expert-worker: hosts a shard of routed experts; registers with the router.
#include <string>

#include "core/base/flags.h"
#include "core/kernels/matmul.h"
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
  int64_t inject_delay_ms = 0;
  int64_t drain_timeout_ms = 30000;
  int64_t threads = 0;
  base::FlagSet flags("expertmesh-expert-worker",
                     "Hosts a shard of routed experts and computes batched expert FFNs.");
  common.Register(flags, /*with_router=*/true);
  capacity.Register(flags, /*with_max_experts=*/true);
  flags.AddString("model", &model, "model directory (config.json + safetensors); may be empty");
  flags.AddInt("inject-delay-ms", &inject_delay_ms,
                 "answer each Dispatch batch no sooner than this many ms after it arrived "
                 "(tests emulate slow experts with it; 0 = off)");
  flags.AddInt("drain-timeout-ms", &drain_timeout_ms,
                 "longest a drain (Drain RPC without grace, SIGTERM) waits for the router to "
                 "report that no attention worker routes here before unloading and exiting");
  flags.AddInt("threads", &threads, "kernel threads (0 = EM_THREADS or all cores)");
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv); rc >= 0) return rc;
  if (inject_delay_ms < 0 || drain_timeout_ms < 0 || threads < 0) {
    return rpc::ReportSetupError(
        "expertmesh-expert-worker",
        absl::InvalidArgumentError("--inject-delay-ms, --drain-timeout-ms and --threads must be >= 0"));
  }
  auto process = rpc::ServiceProcess::Create("expert-worker", common);
  absl::Status status = process.ok() ? rpc::CheckModelDir(model) : process.status();
  if (!status.ok()) return rpc::ReportSetupError("expertmesh-expert-worker", status);
  rpc::ServiceProcess* p = process->get();
  kernels::SetKernelThreads(static_cast<int>(threads));

  expert_worker::ExpertWorkerOptions options;
  options.model_dir = model;
  options.max_experts = capacity.max_experts;
  options.inject_delay = absl::Milliseconds(inject_delay_ms);
  options.drain_timeout = absl::Milliseconds(drain_timeout_ms);
  // The registration exists only once serving starts (and never without --router), so each
  // hook looks it up when called.
  options.worker_id = [p]() -> uint64_t {
    rpc::RouterRegistration* r = p->registration();
    return r == nullptr ? 0 : r->state().worker_id;
  };
  if (!common.router.empty()) {
    options.announce_draining = [p](bool draining) {
      if (rpc::RouterRegistration* r = p->registration()) r->set_draining(draining);
    };
    options.router_drained = [p] {
      rpc::RouterRegistration* r = p->registration();
      return r != nullptr && r->state().drained;
    };
  }
  options.on_drained = [p] { p->RequestExit(); };
  auto service = expert_worker::ExpertWorkerService::Create(options, p->registry());
  if (!service.ok()) return rpc::ReportSetupError("expertmesh-expert-worker", service.status());
  expert_worker::ExpertWorkerService* s = service->get();
  p->AddService(s);

  rpc::Membership membership{expertmesh::v1::WORKER_KIND_EXPERT, capacity.ToProto()};
  membership.kernel_target = std::string(kernels::ActiveKernelTargetName());
  membership.hosted_experts = [s] { return s->Hosted(); };
  // SIGTERM leaves like a Drain: the router re-places the experts while they still answer.
  int rc = p->ServeUntilTerminated(membership, [s] { s->DrainAndWait(); });
  p->Shutdown();
  return rc;
}
