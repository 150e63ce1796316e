// The expert worker's gRPC service: hosts a shard of routed experts (only their tensors are
// mapped from the checkpoint) and computes them for attention workers over long-lived Dispatch
// streams, one model::RunExpert call per expert over all of its rows, so that the outputs are
// bit-identical to the single-process engine. A drain (Drain RPC or SIGTERM) tells the router,
// keeps serving until the router says no attention worker routes here any more (or the drain
// timeout passes), then unloads everything.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/model/checkpoint.h"
#include "core/model/weights.h"
#include "core/rpc/router_registration.h"
#include "expertmesh/v1/expert_worker.grpc.pb.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace expertmesh::expert_worker {

struct ExpertWorkerOptions {
  // Checkpoint directory; empty = no model (LoadExperts then fails with FAILED_PRECONDITION).
  std::string model_dir;
  // Current router id (0 when not registered); thread-safe. Null = always 0.
  std::function<uint64_t()> worker_id;
  // Most experts held at once (0 = no limit): --max-experts.
  int64_t max_experts = 0;
  // A reply is not sent before this long after its request arrived (--inject-delay-ms; tests
  // emulate slow experts with it). Counted from arrival, so pipelined requests wait in parallel.
  absl::Duration inject_delay = absl::ZeroDuration();
  // Longest drain when the Drain request gives no grace (and on SIGTERM).
  absl::Duration drain_timeout = absl::Seconds(30);
  // Drain plumbing, each may be null (standalone, tests):
  // tells the router this worker is draining (heartbeats carry it);
  std::function<void(bool)> announce_draining;
  // whether the router has answered drained=true. Null = nobody to wait for: the drain ends at
  // once;
  std::function<bool()> router_drained;
  // called once the drain is over and everything is unloaded (the binary exits then).
  std::function<void()> on_drained;
};

class ExpertWorkerService final : public expertmesh::v1::ExpertWorker::Service {
 public:
  // Opens the checkpoint (config and tensor directory only) when options.model_dir is set and
  // registers the metrics in `registry` (which must outlive the service).
  // Errors: the checkpoint's (NotFound, InvalidArgument), annotated with the directory.
  static absl::StatusOr<std::unique_ptr<ExpertWorkerService>> Create(
      ExpertWorkerOptions options, prometheus::Registry& registry);
  ~ExpertWorkerService() override;

  grpc::Status Dispatch(grpc::ServerContext* context,
                        grpc::ServerReaderWriter<expertmesh::v1::DispatchResponse,
                                                 expertmesh::v1::DispatchRequest>* stream) override;
  grpc::Status LoadExperts(grpc::ServerContext* context,
                           const expertmesh::v1::LoadExpertsRequest* request,
                           expertmesh::v1::LoadExpertsResponse* response) override;
  grpc::Status UnloadExperts(grpc::ServerContext* context,
                             const expertmesh::v1::UnloadExpertsRequest* request,
                             expertmesh::v1::UnloadExpertsResponse* response) override;
  grpc::Status Drain(grpc::ServerContext* context,
                     const expertmesh::v1::ExpertDrainRequest* request,
                     expertmesh::v1::ExpertDrainResponse* response) override;
  grpc::Status GetStatus(grpc::ServerContext* context,
                         const expertmesh::v1::ExpertStatusRequest* request,
                         expertmesh::v1::ExpertStatusResponse* response) override;

  // One DispatchRequest's answer (what the stream writes back; never fails the stream).
  // `received` is when the request arrived (for --inject-delay-ms); `cancelled`, if set, cuts
  // the injected wait short.
  expertmesh::v1::DispatchResponse Serve(const expertmesh::v1::DispatchRequest& request,
                                         absl::Time received,
                                         const std::function<bool()>& cancelled = nullptr);

  // What is loaded now, sorted, with the placement version (sent on every registration).
  rpc::HostedExperts Hosted() const;
  uint64_t resident_bytes() const;

  // Starts the drain (idempotent): `grace` bounds the wait for the router (zero = the option's
  // drain_timeout). Returns the number of experts loaded when it started.
  int StartDrain(absl::Duration grace = absl::ZeroDuration());
  // The SIGTERM path: StartDrain() and wait until the drain is over (experts unloaded).
  void DrainAndWait();
  bool draining() const;
  bool drained() const;

 private:
  struct Loaded {
    model::ExpertWeights weights;
    uint64_t bytes = 0;
    prometheus::Counter* tokens = nullptr;  // expertmesh_expert_tokens_total{layer,expert}
  };
  using Key = std::pair<int, int>;  // (layer, expert)

  ExpertWorkerService(ExpertWorkerOptions options, prometheus::Registry& registry);
  // Validation of a request's (layer, expert) against the model. Errors: InvalidArgument
  // naming `field`; FailedPrecondition without a model.
  absl::Status CheckExpertId(const std::string& field, int64_t layer, int64_t expert) const;
  absl::StatusOr<expertmesh::v1::DispatchResponse> Compute(
      const expertmesh::v1::DispatchRequest& request);
  void UpdateGauges() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DrainLoop(absl::Duration grace);
  uint64_t worker_id() const { return options_.worker_id ? options_.worker_id() : 0; }

  const ExpertWorkerOptions options_;
  std::unique_ptr<model::Checkpoint> checkpoint_;  // null without a model

  // Serializes LoadExperts calls (they read the checkpoint outside mu_).
  absl::Mutex load_mu_;
  mutable absl::Mutex mu_;
  // Shared so that a dispatch computing with an expert keeps it alive past an unload.
  absl::flat_hash_map<Key, std::shared_ptr<const Loaded>> experts_ ABSL_GUARDED_BY(mu_);
  uint64_t resident_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t placement_version_ ABSL_GUARDED_BY(mu_) = 0;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool drained_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread drain_thread_;

  prometheus::Family<prometheus::Counter>& dispatches_;
  prometheus::Counter& dispatches_ok_;
  prometheus::Counter& dispatches_error_;
  prometheus::Family<prometheus::Counter>& tokens_;
  prometheus::Histogram& dispatch_seconds_;
  prometheus::Histogram& dispatch_rows_;
  prometheus::Gauge& resident_gauge_;
  prometheus::Gauge& loaded_gauge_;
  prometheus::Gauge& draining_gauge_;
};

}  // namespace expertmesh::expert_worker
