// The router's gRPC service: translates the Router RPCs to Membership and PlacementManager calls
// and back, keeps the membership and placement metrics, runs the reaper thread that drops expired
// leases and the placement thread that loads, publishes and unloads (docs/placement.md).
#pragma once

#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/base/clock.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "router/membership.h"
#include "router/placement.h"

namespace expertmesh::router {

// Placement settings of the router (absent: started without --model, no placement table).
struct PlacementConfig {
  PlacementOptions options;
  // Deadline of one LoadExperts call (reading experts from the checkpoint can be slow).
  absl::Duration load_timeout = absl::Seconds(60);
  // Deadline of one UnloadExperts call.
  absl::Duration unload_timeout = absl::Seconds(10);
  // Directory where the last published version is kept, so that it never goes back across
  // restarts even when no worker remembers it; empty = not kept.
  std::string state_dir;
};

// The version kept in `state_dir` (0 if none). Errors: InvalidArgument for a corrupt file.
absl::StatusOr<uint64_t> ReadPlacementState(const std::string& state_dir);
absl::Status WritePlacementState(const std::string& state_dir, uint64_t version);

class WatchPlacementReactor;

class RouterService final : public expertmesh::v1::Router::CallbackService {
 public:
  // Registers its metrics in `registry`; `clock` must outlive the service. Starts the reaper and,
  // with `placement`, the placement thread.
  RouterService(const base::Clock& clock, absl::Duration lease_ttl, prometheus::Registry& registry,
                std::optional<PlacementConfig> placement = std::nullopt);
  ~RouterService() override;  // stops the threads

  Membership& membership() { return membership_; }
  // Null without placement.
  PlacementManager* placement() { return placement_.get(); }

  // Ends every WatchPlacement stream (OK), so that a server shutdown does not wait for them;
  // new ones are refused with UNAVAILABLE. Call before grpc::Server::Shutdown.
  void StopWatches();

  grpc::ServerUnaryReactor* RegisterWorker(
      grpc::CallbackServerContext* context, const expertmesh::v1::RegisterWorkerRequest* request,
      expertmesh::v1::RegisterWorkerResponse* response) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* context,
                                      const expertmesh::v1::HeartbeatRequest* request,
                                      expertmesh::v1::HeartbeatResponse* response) override;
  grpc::ServerUnaryReactor* Deregister(grpc::CallbackServerContext* context,
                                       const expertmesh::v1::DeregisterRequest* request,
                                       expertmesh::v1::DeregisterResponse* response) override;
  grpc::ServerUnaryReactor* ListMembers(grpc::CallbackServerContext* context,
                                        const expertmesh::v1::ListMembersRequest* request,
                                        expertmesh::v1::ListMembersResponse* response) override;
  grpc::ServerWriteReactor<expertmesh::v1::PlacementTable>* WatchPlacement(
      grpc::CallbackServerContext* context,
      const expertmesh::v1::WatchPlacementRequest* request) override;
  grpc::ServerUnaryReactor* GetPlacement(grpc::CallbackServerContext* context,
                                         const expertmesh::v1::GetPlacementRequest* request,
                                         expertmesh::v1::PlacementTable* response) override;
  grpc::ServerUnaryReactor* ReportLoad(grpc::CallbackServerContext* context,
                                       const expertmesh::v1::ReportLoadRequest* request,
                                       expertmesh::v1::ReportLoadResponse* response) override;
  grpc::ServerUnaryReactor* PickAttentionWorker(
      grpc::CallbackServerContext* context,
      const expertmesh::v1::PickAttentionWorkerRequest* request,
      expertmesh::v1::PickAttentionWorkerResponse* response) override;

 private:
  friend class WatchPlacementReactor;
  class GrpcExpertLoader;

  void ReaperLoop();
  void PlacementLoop();
  // Called for each published table (under the manager's lock).
  void OnPublished(std::shared_ptr<const expertmesh::v1::PlacementTable> table);
  void RemoveWatch(WatchPlacementReactor* reactor);
  // Recomputes expertmesh_router_members{kind,state} from the table.
  void UpdateMemberGauges();

  Membership membership_;

  prometheus::Family<prometheus::Gauge>& members_;
  prometheus::Family<prometheus::Counter>& registrations_;
  prometheus::Family<prometheus::Counter>& deregistrations_;
  prometheus::Family<prometheus::Counter>& expirations_;
  prometheus::Family<prometheus::Counter>& heartbeats_;
  prometheus::Gauge& placement_version_;
  prometheus::Gauge& placed_experts_;
  prometheus::Gauge& unplaced_experts_;
  prometheus::Family<prometheus::Counter>& expert_loads_;

  std::optional<PlacementConfig> placement_config_;
  std::unique_ptr<GrpcExpertLoader> loader_;
  std::unique_ptr<PlacementManager> placement_;
  std::thread placement_thread_;

  absl::Mutex watch_mu_;
  std::set<WatchPlacementReactor*> watches_ ABSL_GUARDED_BY(watch_mu_);
  bool watches_stopped_ ABSL_GUARDED_BY(watch_mu_) = false;
  std::shared_ptr<const expertmesh::v1::PlacementTable> latest_ ABSL_GUARDED_BY(watch_mu_);

  absl::Mutex reaper_mu_;
  bool stopping_ ABSL_GUARDED_BY(reaper_mu_) = false;
  std::thread reaper_;
};

}  // namespace expertmesh::router
