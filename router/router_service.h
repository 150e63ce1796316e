// The router's gRPC service: translates the Router RPCs to Membership calls and back, keeps the
// membership metrics, and runs the reaper thread that drops expired leases.
#pragma once

#include <memory>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "router/membership.h"

namespace expertmesh::router {

class RouterService final : public expertmesh::v1::Router::CallbackService {
 public:
  // Registers its metrics in `registry`; `clock` must outlive the service. Starts the reaper.
  RouterService(const Clock& clock, absl::Duration lease_ttl, prometheus::Registry& registry);
  ~RouterService() override;  // stops the reaper

  Membership& membership() { return membership_; }

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
  void ReaperLoop();
  // Recomputes expertmesh_router_members{kind,state} from the table.
  void UpdateMemberGauges();

  Membership membership_;

  prometheus::Family<prometheus::Gauge>& members_;
  prometheus::Family<prometheus::Counter>& registrations_;
  prometheus::Family<prometheus::Counter>& deregistrations_;
  prometheus::Family<prometheus::Counter>& expirations_;
  prometheus::Family<prometheus::Counter>& heartbeats_;
  prometheus::Gauge& placement_version_;

  absl::Mutex reaper_mu_;
  bool stopping_ ABSL_GUARDED_BY(reaper_mu_) = false;
  std::thread reaper_;
};

}  // namespace expertmesh::router
