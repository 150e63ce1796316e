#include "attention-worker/placement_client.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/rpc/status.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"

namespace expertmesh::attention_worker {

namespace v1 = expertmesh::v1;

std::string ExpertName(const ExpertKey& key) {
  return absl::StrCat("(layer ", key.layer, ", expert ", key.expert, ")");
}

PlacementSnapshot::PlacementSnapshot(const v1::PlacementTable& table)
    : version_(table.version()), kernel_target_(table.kernel_target()) {
  for (const auto& [id, address] : table.worker_addresses()) {
    if (!address.empty()) addresses_[id] = address;
  }
  absl::flat_hash_map<ExpertKey, bool> unplaced;
  for (const auto& e : table.unplaced()) {
    unplaced[ExpertKey{static_cast<int>(e.layer()), static_cast<int>(e.expert())}] = true;
  }
  for (const auto& p : table.experts()) {
    const ExpertKey key{static_cast<int>(p.layer()), static_cast<int>(p.expert())};
    if (unplaced.contains(key)) continue;
    std::vector<Replica>& replicas = experts_[key];
    for (uint64_t id : p.worker_ids()) {
      auto it = addresses_.find(id);
      if (it == addresses_.end()) continue;
      const bool seen = std::any_of(replicas.begin(), replicas.end(),
                                    [&](const Replica& r) { return r.address == it->second; });
      if (!seen) replicas.push_back(Replica{id, it->second});
    }
    if (replicas.empty()) experts_.erase(key);
  }
}

const std::vector<Replica>& PlacementSnapshot::Replicas(int layer, int expert) const {
  static const std::vector<Replica>* const kNone = new std::vector<Replica>();
  auto it = experts_.find(ExpertKey{layer, expert});
  return it == experts_.end() ? *kNone : it->second;
}

const std::string* PlacementSnapshot::AddressOf(uint64_t worker_id) const {
  auto it = addresses_.find(worker_id);
  return it == addresses_.end() ? nullptr : &it->second;
}

std::vector<ExpertKey> PlacementSnapshot::Missing(absl::Span<const ExpertKey> needed) const {
  std::vector<ExpertKey> missing;
  for (const ExpertKey& key : needed) {
    if (!experts_.contains(key)) missing.push_back(key);
  }
  return missing;
}

PlacementClient::PlacementClient(std::string router_address)
    : PlacementClient(std::move(router_address), PlacementClientOptions()) {}

PlacementClient::PlacementClient(std::string router_address, PlacementClientOptions options)
    : router_address_(std::move(router_address)),
      options_(std::move(options)),
      stub_(v1::Router::NewStub(rpc::MakeChannel(router_address_))),
      current_(std::make_shared<const PlacementSnapshot>()) {
  if (options_.registry != nullptr) {
    version_gauge_ = &prometheus::BuildGauge()
                          .Name("expertmesh_attention_placement_version")
                          .Help(
                              "Newest expert placement table version this attention worker "
                              "holds (dispatches use it from their next start)")
                          .Register(*options_.registry)
                          .Add({});
  }
  thread_ = std::thread([this] { Loop(); });
}

PlacementClient::~PlacementClient() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    if (inflight_ != nullptr) inflight_->TryCancel();
  }
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<const PlacementSnapshot> PlacementClient::Current() const {
  absl::MutexLock lock(&mu_);
  return current_;
}

uint64_t PlacementClient::version() const {
  absl::MutexLock lock(&mu_);
  return current_->version();
}

PlacementClient::Stats PlacementClient::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

absl::Status PlacementClient::WaitForPlacement(absl::Duration timeout,
                                               std::vector<ExpertKey> needed) const {
  const absl::Time deadline = absl::Now() + timeout;
  auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return current_->version() > 0 && current_->Missing(needed).empty();
  };
  struct Arg {
    const PlacementClient* self;
    const PlacementSnapshot* held;
  };
  absl::MutexLock lock(&mu_);
  while (!ready()) {
    // Wakes on every change of current_ (the readiness depends on `needed`, so it is evaluated
    // here). `held` keeps the old snapshot alive, so its address cannot be reused meanwhile.
    const std::shared_ptr<const PlacementSnapshot> held = current_;
    Arg arg{this, held.get()};
    const bool changed = mu_.AwaitWithDeadline(absl::Condition(
                                                   +[](Arg* a) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                                     return a->self->current_.get() != a->held;
                                                   },
                                                   &arg),
                                               deadline);
    if (!changed) break;
  }
  if (ready()) return absl::OkStatus();
  if (current_->version() == 0) {
    return absl::DeadlineExceededError(absl::StrCat("no placement table from the router at ",
                                                    router_address_, " within ",
                                                    absl::FormatDuration(timeout)));
  }
  std::vector<ExpertKey> missing = current_->Missing(needed);
  const size_t shown = std::min<size_t>(missing.size(), 8);
  std::vector<std::string> names;
  for (size_t i = 0; i < shown; ++i) names.push_back(ExpertName(missing[i]));
  return absl::DeadlineExceededError(absl::StrCat(
      "placement version ", current_->version(), " has no worker for ", absl::StrJoin(names, ", "),
      missing.size() > shown ? absl::StrCat(" and ", missing.size() - shown, " more") : "",
      " after ", absl::FormatDuration(timeout)));
}

bool PlacementClient::WaitForVersion(uint64_t version, absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  struct Arg {
    const PlacementClient* self;
    uint64_t version;
  } arg{this, version};
  return mu_.AwaitWithTimeout(absl::Condition(
                                  +[](Arg* a) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                    return a->self->current_->version() >= a->version;
                                  },
                                  &arg),
                              timeout);
}

bool PlacementClient::BeginCall(grpc::ClientContext* context) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return false;
  inflight_ = context;
  return true;
}

void PlacementClient::EndCall() {
  absl::MutexLock lock(&mu_);
  inflight_ = nullptr;
}

void PlacementClient::Apply(const v1::PlacementTable& table) {
  auto snapshot = std::make_shared<const PlacementSnapshot>(table);
  {
    absl::MutexLock lock(&mu_);
    // Versions are monotonic at the router; an older one (e.g. from a router that restarted
    // and has not rebuilt its table yet) must not move dispatch backwards.
    if (table.version() <= current_->version()) {
      ++stats_.stale_ignored;
      return;
    }
    current_ = snapshot;
    ++stats_.versions_applied;
  }
  if (version_gauge_ != nullptr) version_gauge_->Set(static_cast<double>(table.version()));
  if (options_.on_version) options_.on_version(table.version());
}

absl::Status PlacementClient::WatchOnce() {
  grpc::ClientContext context;
  rpc::SetTimeout(context, options_.watch_lifetime);
  if (!BeginCall(&context)) return absl::CancelledError("stopping");
  v1::WatchPlacementRequest request;
  request.set_known_version(version());
  {
    absl::MutexLock lock(&mu_);
    ++stats_.watches_opened;
  }
  auto reader = stub_->WatchPlacement(&context, request);
  v1::PlacementTable table;
  while (reader->Read(&table)) Apply(table);
  grpc::Status status = reader->Finish();
  EndCall();
  return rpc::FromGrpcStatus(status);
}

absl::Status PlacementClient::PollOnce() {
  grpc::ClientContext context;
  rpc::SetTimeout(context, options_.rpc_timeout);
  if (!BeginCall(&context)) return absl::CancelledError("stopping");
  v1::PlacementTable table;
  grpc::Status status = stub_->GetPlacement(&context, v1::GetPlacementRequest(), &table);
  EndCall();
  if (status.ok()) Apply(table);
  return rpc::FromGrpcStatus(status);
}

void PlacementClient::Loop() {
  absl::Duration backoff = options_.initial_backoff;
  while (true) {
    const absl::Time opened = absl::Now();
    absl::Status status = WatchOnce();
    absl::Duration wait = backoff;
    if (status.code() == absl::StatusCode::kUnimplemented) {
      // A router without the watch: poll at the slowest reconnect pace.
      status = PollOnce();
      wait = options_.max_backoff;
    }
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    // A watch that lived its whole lifetime ended normally: re-open at once.
    if (status.code() == absl::StatusCode::kDeadlineExceeded &&
        absl::Now() - opened >= options_.watch_lifetime) {
      backoff = options_.initial_backoff;
      continue;
    }
    if (!status.ok()) stats_.last_error = std::string(status.message());
    // A stream that ran for a while means the router was up: start the backoff again.
    if (absl::Now() - opened > options_.max_backoff) {
      backoff = options_.initial_backoff;
      wait = std::min(wait, backoff);
    }
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), wait);
    if (stopping_) return;
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
}

}  // namespace expertmesh::attention_worker
