// expertmesh-attention-worker: runs sequences (continuous batching, attention, gate, shared
// expert, sampling) and dispatches the routed experts to the expert workers the router places
// them on; registers with the router.
#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <thread>
#include <string>

#include "attention-worker/attention_worker_service.h"
#include "attention-worker/expert_dispatcher.h"
#include "attention-worker/kv_client.h"
#include "attention-worker/placement_client.h"
#include "attention-worker/scheduler.h"
#include "core/base/log.h"
#include "core/kernels/matmul.h"
#include "core/model/model.h"
#include "core/model/weights.h"
#include "core/state/block_codec.h"
#include "prometheus/gauge.h"
#include "core/rpc/service_process.h"
#include "core/rpc/termination.h"
#include "core/rpc/worker_capacity.h"

int main(int argc, char** argv) {
  using namespace expertmesh;
  rpc::BlockTerminationSignals();
  rpc::CommonFlags common;
  rpc::CapacityFlags capacity;
  std::string model_dir;
  bool local_experts = false;
  int64_t max_batch_tokens = 256, max_running = 64, state_mb = 8192, micro_batches = 0;
  int64_t default_max_new = 256, expert_deadline_ms = 10000, expert_retries = 2;
  int64_t placement_wait_ms = 60000, threads = 0, inject_attention_delay_us = 0;
  std::string kv_store, weights_id;
  int64_t kv_lookup_deadline_ms = 200, kv_get_deadline_ms = 1000, kv_put_queue_mb = 256;
  rpc::FlagSet flags("expertmesh-attention-worker",
                     "Runs sequences: attention, gate, shared expert, sampling; routed experts "
                     "on the expert workers.");
  common.Register(flags, /*with_router=*/true);
  capacity.Register(flags, /*with_max_experts=*/false);
  flags.AddString("model", &model_dir, "model directory (config.json + safetensors); required "
                                       "to run sequences");
  flags.AddBool("local-experts", &local_experts,
                "load the routed experts in this process too (no expert workers needed)");
  flags.AddInt("max-batch-tokens", &max_batch_tokens,
               "tokens per scheduler step (decode tokens + prefill chunks)");
  flags.AddInt("max-running-sequences", &max_running, "sequences admitted at once");
  flags.AddInt("state-memory-mb", &state_mb, "memory budget for sequence state, MiB");
  flags.AddInt("micro-batches", &micro_batches,
               "micro-batches per step that ping-pong at each MoE: 1 = off, 2+ = always, 0 = "
               "auto (two while one-batch steps spend over 20% waiting on the experts)");
  flags.AddInt("default-max-new-tokens", &default_max_new,
               "max_new_tokens for requests that leave it 0");
  flags.AddInt("expert-deadline-ms", &expert_deadline_ms, "deadline of each expert dispatch");
  flags.AddInt("expert-retries", &expert_retries,
               "retries of a failed expert dispatch on other replicas");
  flags.AddInt("placement-wait-ms", &placement_wait_ms,
               "warn this often while no placement table covers every expert");
  flags.AddInt("threads", &threads, "kernel threads (0 = EM_THREADS or all cores)");
  flags.AddInt("inject-attention-delay-us", &inject_attention_delay_us,
               "tests and benchmarks: extra attention time per token row and layer");
  flags.AddString("kv-store", &kv_store,
                  "kv-store host:port for prefix reuse (completed 128-token blocks are stored, "
                  "admission loads the longest stored prefix); empty = off");
  flags.AddString("weights-id", &weights_id,
                  "names the weights in the kv-store's block keys (default: a digest of the "
                  "model directory's config, safetensors headers and data samples)");
  flags.AddInt("kv-lookup-deadline-ms", &kv_lookup_deadline_ms,
               "deadline of the admission LookupPrefix (past it the prompt is computed)");
  flags.AddInt("kv-get-deadline-ms", &kv_get_deadline_ms, "deadline of each GetBlock");
  flags.AddInt("kv-put-queue-mb", &kv_put_queue_mb,
               "blocks waiting for the kv-store beyond this many MiB are dropped (counted)");
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv); rc >= 0) return rc;
  auto process = rpc::ServiceProcess::Create("attention-worker", common);
  absl::Status status = process.ok() ? rpc::CheckModelDir(model_dir) : process.status();
  if (!status.ok()) return rpc::ReportSetupError("expertmesh-attention-worker", status);
  rpc::ServiceProcess* p = process->get();
  kernels::SetKernelThreads(static_cast<int>(threads));

  std::unique_ptr<model::Model> model;
  std::unique_ptr<attention_worker::PlacementClient> placement;
  std::unique_ptr<attention_worker::RemoteExpertDispatcher> dispatcher;
  std::unique_ptr<attention_worker::Scheduler> scheduler;
  if (!model_dir.empty()) {
    model::LoadOptions lo;
    if (!local_experts) lo.load_expert = [](int, int) { return false; };
    auto loaded = model::Model::Load(model_dir, lo);
    if (!loaded.ok()) return rpc::ReportSetupError("expertmesh-attention-worker", loaded.status());
    model = std::move(*loaded);
    prometheus::BuildGauge()
        .Name("expertmesh_attention_resident_weight_bytes")
        .Help("Bytes of the weights this attention worker holds (everything but the routed "
              "experts, unless --local-experts)")
        .Register(p->registry())
        .Add({})
        .Set(static_cast<double>(model::ResidentWeightBytes(model->weights())));
  }
  attention_worker::AttentionWorkerService service(nullptr);
  p->AddService(&service);
  status = p->StartGrpc();
  if (!status.ok()) return rpc::ServiceProcess::ReportStartError(status);
  p->StartRegistration(rpc::Membership{expertmesh::v1::WORKER_KIND_ATTENTION,
                                       capacity.ToProto(),
                                       std::string(kernels::ActiveKernelTargetName()),
                                       nullptr});
  attention_worker::SchedulerOptions so;
  so.max_batch_tokens = max_batch_tokens;
  so.max_running_sequences = static_cast<int>(max_running);
  so.state_memory_bytes = state_mb << 20;
  so.micro_batches = static_cast<int>(micro_batches);
  so.default_max_new_tokens = default_max_new;
  so.inject_attention_delay_us = inject_attention_delay_us;
  std::unique_ptr<attention_worker::KvClient> kv_client;
  if (model != nullptr && !kv_store.empty()) {
    if (weights_id.empty()) {
      auto id = attention_worker::WeightsIdentity(model_dir);
      if (!id.ok()) return rpc::ReportSetupError("expertmesh-attention-worker", id.status());
      weights_id = *id;
    }
    attention_worker::KvClientOptions ko;
    ko.lookup_deadline = absl::Milliseconds(kv_lookup_deadline_ms);
    ko.get_deadline = absl::Milliseconds(kv_get_deadline_ms);
    ko.max_queued_bytes = static_cast<size_t>(kv_put_queue_mb) << 20;
    ko.registry = &p->registry();
    kv_client = std::make_unique<attention_worker::KvClient>(kv_store, ko);
    so.prefix_store = kv_client.get();
    so.model_fingerprint = state::ModelFingerprint(model->config(), weights_id);
    base::LogInfo("prefix reuse on: kv-store " + kv_store + ", weights id " + weights_id);
  }
  // Overall health is liveness; the AttentionWorker service's health is readiness: SERVING
  // only once sequences can run.
  constexpr char kServiceName[] = "expertmesh.v1.AttentionWorker";
  p->server()->GetHealthCheckService()->SetServingStatus(kServiceName, false);
  auto start_scheduler = [&] {
    scheduler = std::make_unique<attention_worker::Scheduler>(model.get(), so, &p->registry());
    service.set_scheduler(scheduler.get());
    p->server()->GetHealthCheckService()->SetServingStatus(kServiceName, true);
    base::LogInfo("ready to run sequences");
  };
  // The worker serves (health, status) at once; Generate answers UNAVAILABLE until a placement
  // covering every routed expert has arrived from the router, which may take as long as the
  // expert workers need to load.
  std::atomic<bool> stopping{false};
  std::thread setup;
  // The placement version reported to the router is one no dispatch of an older version can
  // still be in flight behind: the version a step pinned (reported as it begins), or, between
  // steps, the newest one installed. The router unloads experts on the strength of it.
  struct VersionReporter {
    rpc::ServiceProcess* process;
    attention_worker::RemoteExpertDispatcher* dispatcher = nullptr;
    std::mutex mu;
    bool in_step = false;
    uint64_t newest = 0;
    void Report(uint64_t v) {
      if (rpc::RouterRegistration* r = process->registration()) r->set_placement_version(v);
    }
    void Installed(uint64_t v) {
      std::lock_guard<std::mutex> l(mu);
      newest = std::max(newest, v);
      if (!in_step) Report(newest);
    }
    void BeginStep() {
      std::lock_guard<std::mutex> l(mu);
      in_step = true;
      if (dispatcher != nullptr) Report(dispatcher->BeginStep());
    }
    void EndStep() {
      std::lock_guard<std::mutex> l(mu);
      in_step = false;
      Report(newest);
    }
  } versions{p};
  so.on_step_begin = [&versions] { versions.BeginStep(); };
  so.on_step_end = [&versions] { versions.EndStep(); };
  if (model != nullptr && local_experts) start_scheduler();
  if (model != nullptr && !local_experts) {
    if (common.router.empty()) {
      return rpc::ServiceProcess::ReportStartError(absl::InvalidArgumentError(
          "--router is required to reach the expert workers (or pass --local-experts)"));
    }
    attention_worker::PlacementClientOptions po;
    po.registry = &p->registry();
    po.on_version = [&versions](uint64_t version) { versions.Installed(version); };
    placement = std::make_unique<attention_worker::PlacementClient>(common.router, po);
    setup = std::thread([&] {
      std::vector<attention_worker::ExpertKey> needed;
      const model::ModelConfig& c = model->config();
      for (const model::BlockWeights& b : model->weights().layers) {
        for (int e = 0; e < c.n_routed_experts; ++e) needed.push_back({b.block, e});
      }
      absl::Time warn_at = absl::Now() + absl::Milliseconds(placement_wait_ms);
      while (!stopping.load()) {
        absl::Status st = placement->WaitForPlacement(absl::Milliseconds(200), needed);
        if (st.ok()) break;
        if (absl::Now() > warn_at) {
          base::LogWarning("no placement covers every routed expert yet; Generate answers "
                           "UNAVAILABLE until one does: " + st.ToString());
          warn_at = absl::Now() + absl::Milliseconds(placement_wait_ms);
        }
      }
      if (stopping.load()) return;
      attention_worker::ExpertDispatcherOptions dopts;
      dopts.deadline = absl::Milliseconds(expert_deadline_ms);
      dopts.retry_budget = static_cast<int>(expert_retries);
      dopts.registry = &p->registry();
      dispatcher =
          std::make_unique<attention_worker::RemoteExpertDispatcher>(placement.get(), dopts);
      model->set_expert_dispatcher(dispatcher.get());
      {
        std::lock_guard<std::mutex> l(versions.mu);
        versions.dispatcher = dispatcher.get();
      }
      start_scheduler();
    });
  }
  status = p->AnnounceReady();
  if (!status.ok()) return rpc::ServiceProcess::ReportStartError(status);
  const int rc = p->WaitForTerminationAndShutdown([&] {
    stopping.store(true);
    if (setup.joinable()) setup.join();
    if (scheduler) scheduler->Drain();
  });
  stopping.store(true);
  if (setup.joinable()) setup.join();
  if (scheduler) scheduler->Stop();
  // The scheduler's last DeleteSequence calls go into the client's queue.
  scheduler.reset();
  kv_client.reset();
  return rc;
}
