#include "core/rpc/router_registration.h"

#include "core/base/log.h"
#include "core/rpc/channel.h"

namespace expertmesh::rpc {
namespace {
// Retry period while the router cannot be reached and no lease is known.
constexpr absl::Duration kRetryPeriod = absl::Milliseconds(500);
}  // namespace

RouterRegistration::RouterRegistration(std::string router_address,
                                       expertmesh::v1::RegisterWorkerRequest request)
    : router_address_(std::move(router_address)),
      request_(std::move(request)),
      stub_(expertmesh::v1::Router::NewStub(MakeChannel(router_address_))) {
  state_.last_success = absl::InfinitePast();
}

RouterRegistration::~RouterRegistration() { Stop(true); }

void RouterRegistration::SetHostedExperts(std::function<HostedExperts()> hosted) {
  absl::MutexLock lock(&mu_);
  hosted_ = std::move(hosted);
}

void RouterRegistration::set_draining(bool draining) {
  absl::MutexLock lock(&mu_);
  if (draining_ == draining) return;
  draining_ = draining;
  wake_ = true;
}

void RouterRegistration::set_placement_version(uint64_t version) {
  absl::MutexLock lock(&mu_);
  used_placement_version_ = version;
}

void RouterRegistration::Start() {
  absl::MutexLock lock(&mu_);
  if (thread_.joinable() || stopping_) return;
  thread_ = std::thread([this] { Loop(); });
}

void RouterRegistration::Stop(bool deregister) {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
    if (inflight_ != nullptr) inflight_->TryCancel();
  }
  if (thread_.joinable()) thread_.join();
  State s = state();
  if (!deregister || !s.registered) return;
  grpc::ClientContext context;
  SetTimeout(context, absl::Milliseconds(500));
  expertmesh::v1::DeregisterRequest request;
  request.set_worker_id(s.worker_id);
  request.set_address(request_.address());
  expertmesh::v1::DeregisterResponse response;
  grpc::Status status = stub_->Deregister(&context, request, &response);
  base::LogInfo("deregistered from router", {{"router", router_address_},
                                             {"worker_id", s.worker_id},
                                             {"ok", status.ok()},
                                             {"error", status.error_message()}});
  absl::MutexLock lock(&mu_);
  state_.registered = false;
}

RouterRegistration::State RouterRegistration::state() const {
  absl::MutexLock lock(&mu_);
  return state_;
}

bool RouterRegistration::BeginCall(grpc::ClientContext* context) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return false;
  inflight_ = context;
  return true;
}

void RouterRegistration::EndCall() {
  absl::MutexLock lock(&mu_);
  inflight_ = nullptr;
}

void RouterRegistration::Loop() {
  while (true) {
    absl::Duration wait = Step();
    absl::MutexLock lock(&mu_);
    auto woken = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stopping_ || wake_; };
    mu_.AwaitWithTimeout(absl::Condition(&woken), wait);
    if (stopping_) return;
    wake_ = false;
  }
}

absl::Duration RouterRegistration::Step() {
  State s = state();
  if (!s.registered) {
    expertmesh::v1::RegisterWorkerRequest request = request_;
    std::function<HostedExperts()> hosted;
    {
      absl::MutexLock lock(&mu_);
      hosted = hosted_;
    }
    // Asked at each registration, never cached: a router that restarts must learn what is
    // loaded now.
    if (hosted) {
      HostedExperts h = hosted();
      for (auto& e : h.experts) *request.add_hosted_experts() = std::move(e);
      request.set_hosted_placement_version(h.placement_version);
    }
    grpc::ClientContext context;
    SetTimeout(context, kControlRpcTimeout);
    expertmesh::v1::RegisterWorkerResponse response;
    if (!BeginCall(&context)) return absl::ZeroDuration();
    grpc::Status status = stub_->RegisterWorker(&context, request, &response);
    EndCall();
    absl::MutexLock lock(&mu_);
    if (!status.ok()) {
      if (state_.last_error != status.error_message()) {
        base::LogWarning("cannot register with router",
                         {{"router", router_address_},
                          {"code", static_cast<int>(status.error_code())},
                          {"error", status.error_message()}});
      }
      state_.last_error = status.error_message();
      return kRetryPeriod;
    }
    state_.registered = true;
    state_.worker_id = response.worker_id();
    state_.lease_ttl_ms = response.lease_ttl_ms();
    state_.placement_version = response.placement_version();
    state_.drained = false;
    state_.registrations++;
    state_.last_error.clear();
    state_.last_success = absl::Now();
    interval_ = absl::Milliseconds(std::max<uint32_t>(50, response.heartbeat_interval_ms()));
    base::LogInfo("registered with router", {{"router", router_address_},
                                             {"worker_id", response.worker_id()},
                                             {"lease_ttl_ms", response.lease_ttl_ms()}});
    return interval_;
  }
  grpc::ClientContext context;
  absl::Duration interval;
  expertmesh::v1::HeartbeatRequest request;
  {
    absl::MutexLock lock(&mu_);
    interval = interval_;
    request.set_draining(draining_);
    request.set_placement_version(used_placement_version_);
  }
  // A heartbeat must not take longer than the period it protects.
  SetTimeout(context, std::min(kControlRpcTimeout, interval));
  request.set_worker_id(s.worker_id);
  request.set_address(request_.address());
  expertmesh::v1::HeartbeatResponse response;
  if (!BeginCall(&context)) return absl::ZeroDuration();
  grpc::Status status = stub_->Heartbeat(&context, request, &response);
  EndCall();
  absl::MutexLock lock(&mu_);
  if (status.error_code() == grpc::StatusCode::NOT_FOUND) {
    base::LogWarning("router forgot this worker; registering again",
                     {{"router", router_address_}, {"worker_id", s.worker_id}});
    state_.registered = false;
    state_.last_error = status.error_message();
    return absl::ZeroDuration();
  }
  if (!status.ok()) {
    state_.last_error = status.error_message();
    // Retry sooner than the period: the lease is running out.
    return std::min(interval_, kRetryPeriod);
  }
  state_.last_error.clear();
  state_.last_success = absl::Now();
  state_.lease_ttl_ms = response.lease_ttl_ms();
  state_.placement_version = response.placement_version();
  state_.drained = request.draining() && response.drained();
  interval_ = absl::Milliseconds(std::max<uint32_t>(50, response.heartbeat_interval_ms()));
  return interval_;
}

}  // namespace expertmesh::rpc
