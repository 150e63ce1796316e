#include "router/router_service.h"

#include <cstdio>
#include <deque>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/base/log.h"
#include "core/rpc/channel.h"
#include "core/rpc/reactors.h"
#include "core/rpc/status.h"
#include "expertmesh/v1/expert_worker.grpc.pb.h"

namespace expertmesh::router {
namespace {

const WorkerKind kAllKinds[] = {
    expertmesh::v1::WORKER_KIND_GATEWAY, expertmesh::v1::WORKER_KIND_ATTENTION,
    expertmesh::v1::WORKER_KIND_EXPERT, expertmesh::v1::WORKER_KIND_KV_STORE};
const MemberState kAllStates[] = {expertmesh::v1::MEMBER_STATE_ALIVE,
                                  expertmesh::v1::MEMBER_STATE_SUSPECT};

constexpr char kNoModel[] =
    "the router was started without --model, so it keeps no expert placement table";
constexpr char kStateFile[] = "placement_version";

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

absl::StatusOr<uint64_t> ReadPlacementState(const std::string& state_dir) {
  const std::string path = state_dir + "/" + kStateFile;
  std::ifstream in(path);
  if (!in) return 0;  // first start
  std::ostringstream text;
  text << in.rdbuf();
  uint64_t version = 0;
  std::string body = text.str();
  while (!body.empty() && (body.back() == '\n' || body.back() == ' ')) body.pop_back();
  if (!absl::SimpleAtoi(body, &version)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": expected a placement version (an integer), got '", body, "'"));
  }
  return version;
}

absl::Status WritePlacementState(const std::string& state_dir, uint64_t version) {
  // Write then rename, so that a crash never leaves a truncated file that would read as 0.
  const std::string path = state_dir + "/" + kStateFile;
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << version << "\n";
    out.flush();
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

// The placement protocol's RPCs to expert workers. Calls in flight are cancelled by Stop so
// that a hung worker cannot hold the router's shutdown for a whole load deadline.
class RouterService::GrpcExpertLoader final : public ExpertLoader {
 public:
  GrpcExpertLoader(absl::Duration load_timeout, absl::Duration unload_timeout,
                   prometheus::Family<prometheus::Counter>& loads)
      : load_timeout_(load_timeout), unload_timeout_(unload_timeout), loads_(loads) {}

  absl::Status Load(uint64_t worker_id, const std::string& address,
                    const std::vector<ExpertKey>& experts, uint64_t version) override {
    expertmesh::v1::LoadExpertsRequest request;
    for (const ExpertKey& key : experts) {
      expertmesh::v1::ExpertId* id = request.add_experts();
      id->set_layer(key.layer);
      id->set_expert(key.expert);
    }
    request.set_placement_version(version);
    expertmesh::v1::LoadExpertsResponse response;
    grpc::ClientContext context;
    rpc::SetTimeout(context, load_timeout_);
    absl::Status status = Call(address, &context, [&](auto& stub) {
      return stub.LoadExperts(&context, request, &response);
    });
    loads_.Add({{"result", status.ok() ? "ok" : "error"}}).Increment();
    if (!status.ok()) {
      return absl::Status(status.code(), absl::StrCat("LoadExperts of ", experts.size(),
                                                      " experts (first ", KeyName(experts.front()),
                                                      ") on worker ", worker_id, " at ", address,
                                                      ": ", status.message()));
    }
    base::LogInfo("experts loaded", {{"worker_id", worker_id},
                                     {"address", address},
                                     {"experts", static_cast<int64_t>(experts.size())},
                                     {"placement_version", version},
                                     {"resident_bytes", response.resident_bytes()}});
    return absl::OkStatus();
  }

  absl::Status Unload(uint64_t worker_id, const std::string& address,
                      const std::vector<ExpertKey>& experts) override {
    expertmesh::v1::UnloadExpertsRequest request;
    for (const ExpertKey& key : experts) {
      expertmesh::v1::ExpertId* id = request.add_experts();
      id->set_layer(key.layer);
      id->set_expert(key.expert);
    }
    expertmesh::v1::UnloadExpertsResponse response;
    grpc::ClientContext context;
    rpc::SetTimeout(context, unload_timeout_);
    absl::Status status = Call(address, &context, [&](auto& stub) {
      return stub.UnloadExperts(&context, request, &response);
    });
    if (!status.ok()) {
      return absl::Status(status.code(), absl::StrCat("UnloadExperts on worker ", worker_id,
                                                      " at ", address, ": ", status.message()));
    }
    base::LogInfo("experts unloaded", {{"worker_id", worker_id},
                                       {"address", address},
                                       {"experts", static_cast<int64_t>(experts.size())}});
    return absl::OkStatus();
  }

  void Stop() {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (grpc::ClientContext* c : inflight_) c->TryCancel();
  }

 private:
  template <typename Fn>
  absl::Status Call(const std::string& address, grpc::ClientContext* context, Fn fn) {
    expertmesh::v1::ExpertWorker::Stub* stub = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return absl::CancelledError("the router is shutting down");
      auto& slot = stubs_[address];
      if (!slot) slot = expertmesh::v1::ExpertWorker::NewStub(rpc::MakeChannel(address));
      stub = slot.get();
      inflight_.insert(context);
    }
    grpc::Status status = fn(*stub);
    absl::MutexLock lock(&mu_);
    inflight_.erase(context);
    return rpc::FromGrpcStatus(status);
  }

  const absl::Duration load_timeout_;
  const absl::Duration unload_timeout_;
  prometheus::Family<prometheus::Counter>& loads_;
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::map<std::string, std::unique_ptr<expertmesh::v1::ExpertWorker::Stub>> stubs_
      ABSL_GUARDED_BY(mu_);
  std::set<grpc::ClientContext*> inflight_ ABSL_GUARDED_BY(mu_);
};

// One WatchPlacement stream: queued tables are written one at a time in version order.
class WatchPlacementReactor final : public grpc::ServerWriteReactor<expertmesh::v1::PlacementTable> {
 public:
  WatchPlacementReactor(RouterService* service, uint64_t known_version)
      : service_(service), sent_version_(known_version) {}

  // Queues `table` if it is newer than anything queued or sent.
  void Push(std::shared_ptr<const expertmesh::v1::PlacementTable> table) {
    {
      absl::MutexLock lock(&mu_);
      if (finishing_ || table->version() <= sent_version_) return;
      sent_version_ = table->version();
      queue_.push_back(std::move(table));
    }
    Advance();
  }

  // Ends the stream with `status` once the write in flight (if any) is done.
  void Close(const grpc::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      if (finishing_) return;
      finishing_ = true;
      final_status_ = status;
      queue_.clear();
    }
    Advance();
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      in_flight_.reset();
      if (!ok && !finishing_) {
        // The client is gone; nothing more can be written.
        finishing_ = true;
        final_status_ = grpc::Status(grpc::StatusCode::CANCELLED, "the watcher went away");
        queue_.clear();
      }
    }
    Advance();
  }

  void OnCancel() override {
    Close(grpc::Status(grpc::StatusCode::CANCELLED, "WatchPlacement cancelled by the client"));
  }

  void OnDone() override {
    service_->RemoveWatch(this);
    delete this;
  }

 private:
  // Starts the next write or the finish; the grpc calls are made outside the lock.
  void Advance() {
    std::shared_ptr<const expertmesh::v1::PlacementTable> next;
    bool finish = false;
    grpc::Status status;
    {
      absl::MutexLock lock(&mu_);
      if (writing_ || finished_) return;
      if (!queue_.empty()) {
        next = std::move(queue_.front());
        queue_.pop_front();
        writing_ = true;
        in_flight_ = next;  // the message must live until OnWriteDone
      } else if (finishing_) {
        finished_ = true;
        finish = true;
        status = final_status_;
      } else {
        return;
      }
    }
    if (next) {
      StartWrite(next.get());
    } else if (finish) {
      Finish(status);
    }
  }

  RouterService* const service_;
  absl::Mutex mu_;
  uint64_t sent_version_ ABSL_GUARDED_BY(mu_);
  std::deque<std::shared_ptr<const expertmesh::v1::PlacementTable>> queue_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const expertmesh::v1::PlacementTable> in_flight_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_status_ ABSL_GUARDED_BY(mu_);
};

RouterService::RouterService(const base::Clock& clock, absl::Duration lease_ttl,
                             prometheus::Registry& registry,
                             std::optional<PlacementConfig> placement)
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
                             .Add({})),
      placed_experts_(GaugeFamily(registry, "expertmesh_router_placed_experts",
                                  "(layer, expert) pairs of the published table with at least "
                                  "one worker.")
                          .Add({})),
      unplaced_experts_(GaugeFamily(registry, "expertmesh_router_unplaced_experts",
                                    "(layer, expert) pairs of the model with no worker in the "
                                    "published table.")
                            .Add({})),
      expert_loads_(CounterFamily(registry, "expertmesh_router_expert_loads_total",
                                  "LoadExperts calls the router made to expert workers, by "
                                  "result (ok, error).")),
      placement_config_(std::move(placement)) {
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
  expert_loads_.Add({{"result", "ok"}});
  expert_loads_.Add({{"result", "error"}});
  if (placement_config_) {
    const ModelShape& shape = placement_config_->options.shape;
    unplaced_experts_.Set(static_cast<double>(shape.total_layers()) * shape.experts);
    if (placement_config_->options.settle == absl::ZeroDuration()) {
      placement_config_->options.settle = lease_ttl;
    }
    if (placement_config_->options.gather == absl::ZeroDuration()) {
      placement_config_->options.gather =
          std::clamp(lease_ttl / 10, absl::Milliseconds(50), absl::Milliseconds(500));
    }
    loader_ = std::make_unique<GrpcExpertLoader>(placement_config_->load_timeout,
                                                 placement_config_->unload_timeout, expert_loads_);
    placement_ = std::make_unique<PlacementManager>(placement_config_->options, clock, *loader_);
    placement_->SetListener([this](std::shared_ptr<const expertmesh::v1::PlacementTable> t) {
      OnPublished(std::move(t));
    });
    placement_thread_ = std::thread([this] { PlacementLoop(); });
  }
  reaper_ = std::thread([this] { ReaperLoop(); });
}

RouterService::~RouterService() {
  StopWatches();
  {
    absl::MutexLock lock(&reaper_mu_);
    stopping_ = true;
  }
  if (loader_) loader_->Stop();
  if (placement_) placement_->Wake();
  if (placement_thread_.joinable()) placement_thread_.join();
  reaper_.join();
}

void RouterService::PlacementLoop() {
  // Besides events, a periodic round notices a settle period or a load backoff running out.
  const absl::Duration period =
      std::clamp(membership_.lease_ttl() / 10, absl::Milliseconds(20), absl::Milliseconds(500));
  while (true) {
    placement_->WaitForWork(period);
    {
      absl::MutexLock lock(&reaper_mu_);
      if (stopping_) return;
    }
    placement_->Reconcile();
  }
}

void RouterService::OnPublished(std::shared_ptr<const expertmesh::v1::PlacementTable> table) {
  placement_version_.Set(static_cast<double>(table->version()));
  placed_experts_.Set(table->experts_size());
  unplaced_experts_.Set(table->unplaced_size());
  if (!placement_config_->state_dir.empty()) {
    absl::Status written = WritePlacementState(placement_config_->state_dir, table->version());
    if (!written.ok()) {
      base::LogError("cannot keep the placement version", {{"error", written.ToString()}});
    }
  }
  absl::MutexLock lock(&watch_mu_);
  latest_ = table;
  for (WatchPlacementReactor* w : watches_) w->Push(table);
}

void RouterService::RemoveWatch(WatchPlacementReactor* reactor) {
  absl::MutexLock lock(&watch_mu_);
  watches_.erase(reactor);
}

void RouterService::StopWatches() {
  absl::MutexLock lock(&watch_mu_);
  watches_stopped_ = true;
  for (WatchPlacementReactor* w : watches_) w->Close(grpc::Status::OK);
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
      if (placement_) placement_->RemoveWorker(v.worker_id);
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
  if (placement_) {
    if (registered->replaced_worker_id != 0) placement_->RemoveWorker(registered->replaced_worker_id);
    PlacementManager::WorkerSpec worker;
    worker.id = registered->worker_id;
    worker.kind = spec.kind;
    worker.address = spec.address;
    worker.capacity = spec.capacity;
    worker.kernel_target = request->kernel_target();
    for (const expertmesh::v1::ExpertId& e : request->hosted_experts()) {
      worker.hosted.push_back({e.layer(), e.expert()});
    }
    worker.hosted_version = request->hosted_placement_version();
    placement_->AddWorker(worker);
  }
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
  response->set_placement_version(placement_ ? placement_->version() : 0);
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
  if (placement_) {
    auto beat = placement_->Heartbeat(request->worker_id(), request->placement_version(),
                                      request->draining());
    response->set_placement_version(beat.placement_version);
    response->set_drained(beat.drained);
  }
  return rpc::FinishUnary(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* RouterService::Deregister(
    grpc::CallbackServerContext* context, const expertmesh::v1::DeregisterRequest* request,
    expertmesh::v1::DeregisterResponse*) {
  auto kind = membership_.Deregister(request->worker_id(), request->address());
  if (!kind.ok()) return rpc::FinishUnary(context, rpc::ToGrpcStatus(kind.status()));
  if (placement_) placement_->RemoveWorker(request->worker_id());
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
    grpc::CallbackServerContext*, const expertmesh::v1::WatchPlacementRequest* request) {
  if (!placement_) {
    return new rpc::FinishedWriteReactor<expertmesh::v1::PlacementTable>(
        grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, kNoModel));
  }
  absl::MutexLock lock(&watch_mu_);
  if (watches_stopped_) {
    return new rpc::FinishedWriteReactor<expertmesh::v1::PlacementTable>(
        grpc::Status(grpc::StatusCode::UNAVAILABLE, "the router is shutting down"));
  }
  auto* reactor = new WatchPlacementReactor(this, request->known_version());
  watches_.insert(reactor);
  // Under watch_mu_, so that no table published meanwhile is missed or sent twice.
  if (latest_) reactor->Push(latest_);
  return reactor;
}

grpc::ServerUnaryReactor* RouterService::GetPlacement(grpc::CallbackServerContext* context,
                                                      const expertmesh::v1::GetPlacementRequest*,
                                                      expertmesh::v1::PlacementTable* response) {
  if (!placement_) {
    return rpc::FinishUnary(context,
                            grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, kNoModel));
  }
  *response = *placement_->table();
  return rpc::FinishUnary(context, grpc::Status::OK);
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
