// A worker's membership in the cluster, client side: registers with the router, renews the lease
// with heartbeats (each with a deadline), registers again when the router has forgotten it (lease
// expired, router restarted) and deregisters on Stop. Runs on its own thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "expertmesh/v1/router.grpc.pb.h"

namespace expertmesh::rpc {

// What an expert worker holds, sent on every (re)registration so that a restarted router can
// rebuild its placement table from the workers.
struct HostedExperts {
  std::vector<expertmesh::v1::ExpertId> experts;
  uint64_t placement_version = 0;
};

class RouterRegistration {
 public:
  struct State {
    bool registered = false;
    uint64_t worker_id = 0;
    uint64_t placement_version = 0;  // the router's current version (its latest answer)
    uint32_t lease_ttl_ms = 0;
    // The router's latest HeartbeatResponse.drained: true once this draining expert worker is
    // no longer routed to. Reset by a new registration.
    bool drained = false;
    int registrations = 0;    // successful RegisterWorker calls so far
    std::string last_error;   // of the latest failed call; empty after a success
    absl::Time last_success;  // of any call; InfinitePast if none
  };

  // `request` describes this worker (kind, address, capacity, ...). Nothing runs until Start.
  RouterRegistration(std::string router_address, expertmesh::v1::RegisterWorkerRequest request);
  ~RouterRegistration();  // Stop(/*deregister=*/true)
  RouterRegistration(const RouterRegistration&) = delete;
  RouterRegistration& operator=(const RouterRegistration&) = delete;

  // Called on every RegisterWorker (first and after the router forgot this worker) to fill in
  // hosted_experts and hosted_placement_version. Call before Start; thread-safe after.
  void SetHostedExperts(std::function<HostedExperts()> hosted);
  // Expert workers: heartbeats carry draining=`draining` from now on. Setting it sends a
  // heartbeat at once rather than at the next period. Thread-safe.
  void set_draining(bool draining);
  // Attention workers: the placement version they route with now, sent in every heartbeat
  // (HeartbeatRequest.placement_version). Thread-safe.
  void set_placement_version(uint64_t version);

  void Start();
  // Stops the heartbeat thread and, if registered and `deregister`, deregisters (one call with a
  // short deadline: a router that is gone must not delay shutdown). Idempotent.
  void Stop(bool deregister = true);
  // Thread-safe snapshot.
  State state() const;
  const std::string& router_address() const { return router_address_; }

 private:
  void Loop();
  // One step; returns how long to wait before the next.
  absl::Duration Step();
  // Publishes `context` as the call in flight so that Stop can cancel it; false if stopping.
  bool BeginCall(grpc::ClientContext* context);
  void EndCall();

  const std::string router_address_;
  const expertmesh::v1::RegisterWorkerRequest request_;
  std::function<HostedExperts()> hosted_;  // set before Start
  std::unique_ptr<expertmesh::v1::Router::Stub> stub_;
  std::thread thread_;

  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Set to cut the loop's wait short (a new draining state must reach the router quickly).
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t used_placement_version_ ABSL_GUARDED_BY(mu_) = 0;
  State state_ ABSL_GUARDED_BY(mu_);
  absl::Duration interval_ ABSL_GUARDED_BY(mu_) = absl::Milliseconds(500);
  // The call in flight (owned by Step's stack), cancelled by Stop so that a slow or absent
  // router cannot delay shutdown by a whole RPC deadline.
  grpc::ClientContext* inflight_ ABSL_GUARDED_BY(mu_) = nullptr;
};

}  // namespace expertmesh::rpc
