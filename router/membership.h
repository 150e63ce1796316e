// The router's membership table: workers register with kind, address and capacity, hold a lease
// renewed by heartbeats, and are dropped when it runs out. Also the per-worker load last reported
// and the choice of an attention worker. Plain logic (no gRPC); thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "expertmesh/v1/router.pb.h"
#include "core/base/clock.h"

namespace expertmesh::router {

using expertmesh::v1::MemberState;
using expertmesh::v1::WorkerKind;

// What a worker says about itself when it registers.
struct MemberSpec {
  WorkerKind kind = expertmesh::v1::WORKER_KIND_UNSPECIFIED;
  std::string address;
  expertmesh::v1::Capacity capacity;
  std::string metrics_address;
  std::string version;
};

// A member as listed, with its lease state at the time of the call.
struct MemberView {
  uint64_t worker_id = 0;
  MemberSpec spec;
  MemberState state = expertmesh::v1::MEMBER_STATE_UNSPECIFIED;
  absl::Duration since_heartbeat;
  absl::Duration lease_remaining;
  expertmesh::v1::LoadReport load;
};

// Lower-case name of a kind for labels and logs ("attention", "kv_store", ...).
std::string KindName(WorkerKind kind);
// Lower-case name of a state ("alive", "suspect").
std::string StateName(MemberState state);

class Membership {
 public:
  // `clock` must outlive this object. `lease_ttl` > 0.
  Membership(const base::Clock& clock, absl::Duration lease_ttl);

  struct Registration {
    uint64_t worker_id = 0;
    // Non-zero when this registration replaced an earlier member at the same address (the
    // worker restarted before its old lease ran out).
    uint64_t replaced_worker_id = 0;
  };
  // Adds a member with a fresh lease. Errors: InvalidArgument (kind unspecified, empty
  // address); AlreadyExists if a member of another kind holds the address.
  absl::StatusOr<Registration> Register(const MemberSpec& spec);
  // Renews the lease. NotFound if the id is unknown or belongs to another address (ids are per
  // router incarnation): the worker must register again.
  absl::Status Renew(uint64_t worker_id, std::string_view address);
  // Removes a member that leaves cleanly. NotFound as for Renew. Returns its kind.
  absl::StatusOr<WorkerKind> Deregister(uint64_t worker_id, std::string_view address);
  // Stores a load report. NotFound as for Renew.
  absl::Status ReportLoad(uint64_t worker_id, std::string_view address,
                          const expertmesh::v1::LoadReport& load);
  // Removes every member whose lease has run out (now - last renewal >= TTL); returns them.
  std::vector<MemberView> ExpireLeases();
  // Members with unexpired leases, by id; kind UNSPECIFIED = all kinds.
  std::vector<MemberView> List(WorkerKind kind = expertmesh::v1::WORKER_KIND_UNSPECIFIED) const;
  // Member counts by (kind, state), over unexpired leases.
  std::map<std::pair<WorkerKind, MemberState>, int> Counts() const;
  // The attention worker with the least reported load (active + queued sequences), preferring
  // ALIVE over SUSPECT and, among equals, the one picked least recently.
  // Errors: Unavailable when there is none (retriable).
  absl::StatusOr<MemberView> PickAttentionWorker();

  absl::Duration lease_ttl() const { return lease_ttl_; }
  // How often a worker should renew: a third of the TTL, so two heartbeats may be lost.
  absl::Duration heartbeat_interval() const { return lease_ttl_ / 3; }

 private:
  struct Entry {
    MemberSpec spec;
    absl::Time last_renewal;
    expertmesh::v1::LoadReport load;
    uint64_t last_picked = 0;
  };
  MemberView ViewLocked(uint64_t id, const Entry& e, absl::Time now) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  Entry* FindLocked(uint64_t worker_id, std::string_view address)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool ExpiredLocked(const Entry& e, absl::Time now) const {
    return now - e.last_renewal >= lease_ttl_;
  }

  const base::Clock& clock_;
  const absl::Duration lease_ttl_;
  mutable absl::Mutex mu_;
  std::map<uint64_t, Entry> members_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t pick_counter_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace expertmesh::router
