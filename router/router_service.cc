#include "router/router_service.h"

#include <string>

#include "core/base/log.h"
#include "core/rpc/reactors.h"
#include "core/rpc/status.h"

namespace expertmesh::router {
namespace {

const WorkerKind kAllKinds[] = {
    expertmesh::v1::WORKER_KIND_GATEWAY, expertmesh::v1::WORKER_KIND_ATTENTION,
    expertmesh::v1::WORKER_KIND_EXPERT, expertmesh::v1::WORKER_KIND_KV_STORE};
const MemberState kAllStates[] = {expertmesh::v1::MEMBER_STATE_ALIVE,
                                  expertmesh::v1::MEMBER_STATE_SUSPECT};

constexpr char kPlacementMissing[] =
    "the expert placement table is not built yet (no model-aware placement in the router); "
    "heartbeats report placement version 0";

prometheus::Family<prometheus::Gauge>& GaugeFamily(prometheus::Registry& registry,
                                                   const std::string& name,
                                                   const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(registry);
}

prometheus::Family<prometheus::Counter>& CounterFamily(prometheus::Registry& registry,
                                                       const std::string& name,
                                                       const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(registry);
}

}  // namespace

RouterService::RouterService(const Clock& clock, absl::Duration lease_ttl,
                             prometheus::Registry& registry)
    : membership_(clock, lease_ttl),
      members_(GaugeFamily(registry, "expertmesh_router_members",
                           "Cluster members with an unexpired lease, by kind and lease state.")),
      registrations_(CounterFamily(registry, "expertmesh_router_registrations_total",
                                   "Successful RegisterWorker calls, by kind.")),
      deregistrations_(CounterFamily(registry, "expertmesh_router_deregistrations_total",
                                     "Members that left with Deregister, by kind.")),
      expirations_(CounterFamily(registry, "expertmesh_router_lease_expirations_total",
                                 "Members dropped because their lease ran out, by kind.")),
      heartbeats_(CounterFamily(registry, "expertmesh_router_heartbeats_total",
                                "Heartbeats received, by result (ok, unknown_worker).")),
      placement_version_(GaugeFamily(registry, "expertmesh_router_placement_version",
                                     "Version of the published expert placement table (0 = none).")
                             .Add({})) {
  GaugeFamily(registry, "expertmesh_router_lease_ttl_seconds",
              "Lease TTL the router grants to members.")
      .Add({})
      .Set(absl::ToDoubleSeconds(lease_ttl));
  // Create every series up front so that dashboards show zeros rather than gaps.
  for (WorkerKind kind : kAllKinds) {
    const std::string k = KindName(kind);
    for (MemberState state : kAllStates) members_.Add({{"kind", k}, {"state", StateName(state)}});
    registrations_.Add({{"kind", k}});
    deregistrations_.Add({{"kind", k}});
    expirations_.Add({{"kind", k}});
  }
  heartbeats_.Add({{"result", "ok"}});
  heartbeats_.Add({{"result", "unknown_worker"}});
  reaper_ = std::thread([this] { ReaperLoop(); });
}

RouterService::~RouterService() {
  {
    absl::MutexLock lock(&reaper_mu_);
    stopping_ = true;
  }
  reaper_.join();
}

void RouterService::ReaperLoop() {
  // A tenth of the TTL bounds how late past its lease a dead member is dropped.
  const absl::Duration period =
      std::clamp(membership_.lease_ttl() / 10, absl::Milliseconds(20), absl::Seconds(1));
  while (true) {
    {
      absl::MutexLock lock(&reaper_mu_);
      auto stopping = [this]() ABSL_SHARED_LOCKS_REQUIRED(reaper_mu_) { return stopping_; };
      reaper_mu_.AwaitWithTimeout(absl::Condition(&stopping), period);
      if (stopping_) return;
    }
    for (const MemberView& v : membership_.ExpireLeases()) {
      expirations_.Add({{"kind", KindName(v.spec.kind)}}).Increment();
      base::LogWarning("lease expired; member dropped",
                       {{"worker_id", v.worker_id},
                        {"kind", KindName(v.spec.kind)},
                        {"address", v.spec.address},
                        {"ms_since_heartbeat", absl::ToInt64Milliseconds(v.since_heartbeat)}});
    }
    UpdateMemberGauges();
  }
}

void RouterService::UpdateMemberGauges() {
  auto counts = membership_.Counts();
  for (WorkerKind kind : kAllKinds) {
    for (MemberState state : kAllStates) {
      auto it = counts.find({kind, state});
      members_.Add({{"kind", KindName(kind)}, {"state", StateName(state)}})
          .Set(it == counts.end() ? 0 : it->second);
    }
  }
}

grpc::ServerUnaryReactor* RouterService::RegisterWorker(
    grpc::CallbackServerContext* context, const expertmesh::v1::RegisterWorkerRequest* request,
    expertmesh::v1::RegisterWorkerResponse* response) {
  MemberSpec spec;
  spec.kind = request->kind();
  spec.address = request->address();
  spec.capacity = request->capacity();
  spec.metrics_address = request->metrics_address();
  spec.version = request->version();
  auto registered = membership_.Register(spec);
  if (!registered.ok()) return rpc::FinishUnary(context, rpc::ToGrpcStatus(registered.status()));
  registrations_.Add({{"kind", KindName(spec.kind)}}).Increment();
  base::LogInfo("member registered", {{"worker_id", registered->worker_id},
                                      {"kind", KindName(spec.kind)},
                                      {"address", spec.address},
                                      {"replaced_worker_id", registered->replaced_worker_id}});
  UpdateMemberGauges();
  response->set_worker_id(registered->worker_id);
  response->set_lease_ttl_ms(
      static_cast<uint32_t>(absl::ToInt64Milliseconds(membership_.lease_ttl())));
  response->set_heartbeat_interval_ms(
      static_cast<uint32_t>(absl::ToInt64Milliseconds(membership_.heartbeat_interval())));
  response->set_placement_version(0);
  return rpc::FinishUnary(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* RouterService::Heartbeat(grpc::CallbackServerContext* context,
                                                   const expertmesh::v1::HeartbeatRequest* request,
                                                   expertmesh::v1::HeartbeatResponse* response) {
  absl::Status status = membership_.Renew(request->worker_id(), request->address());
  heartbeats_.Add({{"result", status.ok() ? "ok" : "unknown_worker"}}).Increment();
  if (!status.ok()) return rpc::FinishUnary(context, rpc::ToGrpcStatus(status));
  response->set_lease_ttl_ms(
      static_cast<uint32_t>(absl::ToInt64Milliseconds(membership_.lease_ttl())));
  response->set_heartbeat_interval_ms(
      static_cast<uint32_t>(absl::ToInt64Milliseconds(membership_.heartbeat_interval())));
  response->set_placement_version(0);
  return rpc::FinishUnary(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* RouterService::Deregister(
    grpc::CallbackServerContext* context, const expertmesh::v1::DeregisterRequest* request,
    expertmesh::v1::DeregisterResponse*) {
  auto kind = membership_.Deregister(request->worker_id(), request->address());
  if (!kind.ok()) return rpc::FinishUnary(context, rpc::ToGrpcStatus(kind.status()));
  deregistrations_.Add({{"kind", KindName(*kind)}}).Increment();
  base::LogInfo("member deregistered",
                {{"worker_id", request->worker_id()}, {"address", request->address()}});
  UpdateMemberGauges();
  return rpc::FinishUnary(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* RouterService::ListMembers(
    grpc::CallbackServerContext* context, const expertmesh::v1::ListMembersRequest* request,
    expertmesh::v1::ListMembersResponse* response) {
  for (const MemberView& v : membership_.List(request->kind())) {
    expertmesh::v1::Member* m = response->add_members();
    m->set_worker_id(v.worker_id);
    m->set_kind(v.spec.kind);
    m->set_address(v.spec.address);
    *m->mutable_capacity() = v.spec.capacity;
    m->set_state(v.state);
    m->set_ms_since_heartbeat(static_cast<uint64_t>(absl::ToInt64Milliseconds(v.since_heartbeat)));
    m->set_lease_remaining_ms(static_cast<uint64_t>(absl::ToInt64Milliseconds(v.lease_remaining)));
    m->set_metrics_address(v.spec.metrics_address);
    m->set_version(v.spec.version);
    *m->mutable_load() = v.load;
  }
  response->set_lease_ttl_ms(
      static_cast<uint32_t>(absl::ToInt64Milliseconds(membership_.lease_ttl())));
  return rpc::FinishUnary(context, grpc::Status::OK);
}

grpc::ServerWriteReactor<expertmesh::v1::PlacementTable>* RouterService::WatchPlacement(
    grpc::CallbackServerContext*, const expertmesh::v1::WatchPlacementRequest*) {
  return new rpc::FinishedWriteReactor<expertmesh::v1::PlacementTable>(
      rpc::Unimplemented("Router.WatchPlacement", kPlacementMissing));
}

grpc::ServerUnaryReactor* RouterService::GetPlacement(grpc::CallbackServerContext* context,
                                                      const expertmesh::v1::GetPlacementRequest*,
                                                      expertmesh::v1::PlacementTable*) {
  return rpc::FinishUnary(context, rpc::Unimplemented("Router.GetPlacement", kPlacementMissing));
}

grpc::ServerUnaryReactor* RouterService::ReportLoad(
    grpc::CallbackServerContext* context, const expertmesh::v1::ReportLoadRequest* request,
    expertmesh::v1::ReportLoadResponse*) {
  return rpc::FinishUnary(context, rpc::ToGrpcStatus(membership_.ReportLoad(
                                       request->worker_id(), request->address(), request->load())));
}

grpc::ServerUnaryReactor* RouterService::PickAttentionWorker(
    grpc::CallbackServerContext* context, const expertmesh::v1::PickAttentionWorkerRequest*,
    expertmesh::v1::PickAttentionWorkerResponse* response) {
  // Prefix affinity needs the kv-store's prefix index; until then the choice is by load only.
  auto picked = membership_.PickAttentionWorker();
  if (!picked.ok()) return rpc::FinishUnary(context, rpc::ToGrpcStatus(picked.status()));
  response->set_worker_id(picked->worker_id);
  response->set_address(picked->spec.address);
  return rpc::FinishUnary(context, grpc::Status::OK);
}

}  // namespace expertmesh::router
