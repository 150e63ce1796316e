#include "router/membership.h"

#include <tuple>

namespace expertmesh::router {

std::string KindName(WorkerKind kind) {
  switch (kind) {
    case expertmesh::v1::WORKER_KIND_GATEWAY:
      return "gateway";
    case expertmesh::v1::WORKER_KIND_ATTENTION:
      return "attention";
    case expertmesh::v1::WORKER_KIND_EXPERT:
      return "expert";
    case expertmesh::v1::WORKER_KIND_KV_STORE:
      return "kv_store";
    default:
      return "unspecified";
  }
}

std::string StateName(MemberState state) {
  switch (state) {
    case expertmesh::v1::MEMBER_STATE_ALIVE:
      return "alive";
    case expertmesh::v1::MEMBER_STATE_SUSPECT:
      return "suspect";
    default:
      return "unspecified";
  }
}

Membership::Membership(const base::Clock& clock, absl::Duration lease_ttl)
    : clock_(clock), lease_ttl_(lease_ttl) {}

MemberView Membership::ViewLocked(uint64_t id, const Entry& e, absl::Time now) const {
  MemberView v;
  v.worker_id = id;
  v.spec = e.spec;
  v.since_heartbeat = now - e.last_renewal;
  v.lease_remaining = std::max(absl::ZeroDuration(), lease_ttl_ - v.since_heartbeat);
  // Suspect after half the lease without renewal: at a third-of-TTL heartbeat period, at least
  // one heartbeat has been missed.
  v.state = v.since_heartbeat > lease_ttl_ / 2 ? expertmesh::v1::MEMBER_STATE_SUSPECT
                                               : expertmesh::v1::MEMBER_STATE_ALIVE;
  v.load = e.load;
  return v;
}

Membership::Entry* Membership::FindLocked(uint64_t worker_id, std::string_view address) {
  auto it = members_.find(worker_id);
  if (it == members_.end() || it->second.spec.address != address ||
      ExpiredLocked(it->second, clock_.Now())) {
    return nullptr;
  }
  return &it->second;
}

absl::StatusOr<Membership::Registration> Membership::Register(const MemberSpec& spec) {
  if (spec.kind == expertmesh::v1::WORKER_KIND_UNSPECIFIED || !WorkerKind_IsValid(spec.kind)) {
    return absl::InvalidArgumentError("RegisterWorker: kind must be set");
  }
  if (spec.address.empty()) return absl::InvalidArgumentError("RegisterWorker: address is empty");
  absl::MutexLock lock(&mu_);
  const absl::Time now = clock_.Now();
  Registration result;
  for (auto it = members_.begin(); it != members_.end(); ++it) {
    if (it->second.spec.address != spec.address || ExpiredLocked(it->second, now)) continue;
    if (it->second.spec.kind != spec.kind) {
      return absl::AlreadyExistsError("RegisterWorker: address " + spec.address + " is held by a " +
                                      KindName(it->second.spec.kind) + " member (worker " +
                                      std::to_string(it->first) + ")");
    }
    // Same kind at the same address: the process restarted, its old entry is stale.
    result.replaced_worker_id = it->first;
    members_.erase(it);
    break;
  }
  result.worker_id = next_id_++;
  members_[result.worker_id] = Entry{spec, now, {}, 0};
  return result;
}

absl::Status Membership::Renew(uint64_t worker_id, std::string_view address) {
  absl::MutexLock lock(&mu_);
  Entry* e = FindLocked(worker_id, address);
  if (e == nullptr) {
    return absl::NotFoundError("worker " + std::to_string(worker_id) + " at " +
                               std::string(address) + " is not a member; register again");
  }
  e->last_renewal = clock_.Now();
  return absl::OkStatus();
}

absl::StatusOr<WorkerKind> Membership::Deregister(uint64_t worker_id, std::string_view address) {
  absl::MutexLock lock(&mu_);
  Entry* e = FindLocked(worker_id, address);
  if (e == nullptr) {
    return absl::NotFoundError("worker " + std::to_string(worker_id) + " at " +
                               std::string(address) + " is not a member");
  }
  WorkerKind kind = e->spec.kind;
  members_.erase(worker_id);
  return kind;
}

absl::Status Membership::ReportLoad(uint64_t worker_id, std::string_view address,
                                    const expertmesh::v1::LoadReport& load) {
  absl::MutexLock lock(&mu_);
  Entry* e = FindLocked(worker_id, address);
  if (e == nullptr) {
    return absl::NotFoundError("worker " + std::to_string(worker_id) + " at " +
                               std::string(address) + " is not a member; register again");
  }
  e->load = load;
  return absl::OkStatus();
}

std::vector<MemberView> Membership::ExpireLeases() {
  absl::MutexLock lock(&mu_);
  const absl::Time now = clock_.Now();
  std::vector<MemberView> expired;
  for (auto it = members_.begin(); it != members_.end();) {
    if (ExpiredLocked(it->second, now)) {
      expired.push_back(ViewLocked(it->first, it->second, now));
      it = members_.erase(it);
    } else {
      ++it;
    }
  }
  return expired;
}

std::vector<MemberView> Membership::List(WorkerKind kind) const {
  absl::MutexLock lock(&mu_);
  const absl::Time now = clock_.Now();
  std::vector<MemberView> out;
  for (const auto& [id, e] : members_) {
    if (ExpiredLocked(e, now)) continue;
    if (kind != expertmesh::v1::WORKER_KIND_UNSPECIFIED && e.spec.kind != kind) continue;
    out.push_back(ViewLocked(id, e, now));
  }
  return out;
}

std::map<std::pair<WorkerKind, MemberState>, int> Membership::Counts() const {
  std::map<std::pair<WorkerKind, MemberState>, int> counts;
  for (const MemberView& v : List()) counts[{v.spec.kind, v.state}]++;
  return counts;
}

absl::StatusOr<MemberView> Membership::PickAttentionWorker() {
  absl::MutexLock lock(&mu_);
  const absl::Time now = clock_.Now();
  Entry* best = nullptr;
  uint64_t best_id = 0;
  std::tuple<int, uint64_t, uint64_t> best_key;
  for (auto& [id, e] : members_) {
    if (e.spec.kind != expertmesh::v1::WORKER_KIND_ATTENTION || ExpiredLocked(e, now)) continue;
    const bool suspect = ViewLocked(id, e, now).state == expertmesh::v1::MEMBER_STATE_SUSPECT;
    const uint64_t load = uint64_t{e.load.active_sequences()} + uint64_t{e.load.queued_sequences()};
    auto key = std::make_tuple(suspect ? 1 : 0, load, e.last_picked);
    if (best == nullptr || key < best_key) {
      best = &e;
      best_id = id;
      best_key = key;
    }
  }
  if (best == nullptr) return absl::UnavailableError("no attention worker is registered");
  best->last_picked = ++pick_counter_;
  return ViewLocked(best_id, *best, now);
}

}  // namespace expertmesh::router
