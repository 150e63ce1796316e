// The attention worker's view of the router's expert placement table: a background watch
// (Router.WatchPlacement) keeps the newest version as an immutable snapshot that dispatchers
// pin per call, so that a table change never alters a dispatch half-way (issue 8: "switches
// placement versions between steps").
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "core/rpc/channel.h"
#include "expertmesh/v1/router.grpc.pb.h"

namespace prometheus {
class Registry;
template <typename T>
class Family;
class Gauge;
}  // namespace prometheus

namespace expertmesh::attention_worker {

// A routed expert of one layer (block index, as in the checkpoint and the protos).
struct ExpertKey {
  int layer = 0;
  int expert = 0;

  bool operator==(const ExpertKey& o) const { return layer == o.layer && expert == o.expert; }
  template <typename H>
  friend H AbslHashValue(H h, const ExpertKey& k) {
    return H::combine(std::move(h), k.layer, k.expert);
  }
};

// "(layer L, expert E)", the form every error naming an expert uses.
std::string ExpertName(const ExpertKey& key);

// One expert worker holding a replica.
struct Replica {
  uint64_t worker_id = 0;
  std::string address;
};

// One version of the placement table, indexed for dispatch. Immutable, so it is shared between
// threads without locking.
class PlacementSnapshot {
 public:
  // Version 0: nothing placed.
  PlacementSnapshot() = default;
  // Indexes `table`. Replicas whose worker id has no address in the table are dropped (they
  // cannot be reached), as are duplicates; a pair listed in `unplaced` has no replica even if
  // it also appears in `experts`.
  explicit PlacementSnapshot(const expertmesh::v1::PlacementTable& table);

  uint64_t version() const { return version_; }
  const std::string& kernel_target() const { return kernel_target_; }
  // Replicas of (layer, expert), the router's preferred first; empty when not placed.
  const std::vector<Replica>& Replicas(int layer, int expert) const;
  // The address of `worker_id`, or null.
  const std::string* AddressOf(uint64_t worker_id) const;
  // The pairs of `needed` that have no replica, in the order given.
  std::vector<ExpertKey> Missing(absl::Span<const ExpertKey> needed) const;
  // Number of (layer, expert) pairs with at least one replica.
  size_t num_placed() const { return experts_.size(); }

 private:
  uint64_t version_ = 0;
  std::string kernel_target_;
  absl::flat_hash_map<ExpertKey, std::vector<Replica>> experts_;
  absl::flat_hash_map<uint64_t, std::string> addresses_;
};

struct PlacementClientOptions {
  // Wait before re-opening a broken watch (router restart, network), doubling up to max.
  absl::Duration initial_backoff = absl::Milliseconds(100);
  absl::Duration max_backoff = absl::Seconds(2);
  // Deadline of each watch stream: like every call it carries one; when it expires the watch is
  // re-opened at once from the version held, so no table is missed.
  absl::Duration watch_lifetime = absl::Minutes(10);
  // Deadline of GetPlacement, used when the router does not implement WatchPlacement.
  absl::Duration rpc_timeout = rpc::kControlRpcTimeout;
  // Called on the watch thread after each newer version is installed (e.g. to report the version
  // in heartbeats). Must not block for long and must not destroy the client.
  std::function<void(uint64_t version)> on_version;
  // If set, registers expertmesh_attention_placement_version (gauge) there. Not owned; must
  // outlive the client.
  prometheus::Registry* registry = nullptr;
};

// Thread-safe. Watches from construction to destruction.
class PlacementClient {
 public:
  struct Stats {
    int64_t watches_opened = 0;    // WatchPlacement streams started (1 + reconnects)
    int64_t versions_applied = 0;  // tables installed (newer than the one held)
    int64_t stale_ignored = 0;     // tables received with a version <= the one held
    std::string last_error;        // why the latest watch ended, empty if none ended badly
  };

  // Starts the watch thread at once (the router need not be up yet).
  PlacementClient(std::string router_address, PlacementClientOptions options);
  explicit PlacementClient(std::string router_address);
  // Cancels the watch in flight and joins the thread (promptly, whatever the router does).
  ~PlacementClient();
  PlacementClient(const PlacementClient&) = delete;
  PlacementClient& operator=(const PlacementClient&) = delete;

  // The newest table received (version 0 and empty before the first). Never null.
  std::shared_ptr<const PlacementSnapshot> Current() const;
  uint64_t version() const;

  // Blocks until a table with version > 0 in which every pair of `needed` has a replica is held
  // (startup). DeadlineExceeded after `timeout`: "no placement table from the router at A" or
  // "placement version V has no worker for (layer L, expert E), ..." (the first few missing).
  absl::Status WaitForPlacement(absl::Duration timeout, std::vector<ExpertKey> needed = {}) const;
  // Blocks until version() >= `version`; false after `timeout`.
  bool WaitForVersion(uint64_t version, absl::Duration timeout) const;

  Stats stats() const;
  const std::string& router_address() const { return router_address_; }

 private:
  void Loop();
  // One watch stream, until it ends. Returns its status.
  absl::Status WatchOnce();
  // Falls back to GetPlacement (a router without WatchPlacement).
  absl::Status PollOnce();
  // Installs `table` if it is newer than the one held.
  void Apply(const expertmesh::v1::PlacementTable& table);
  // Publishes `context` as the call in flight so the destructor can cancel it; false if stopping.
  bool BeginCall(grpc::ClientContext* context);
  void EndCall();

  const std::string router_address_;
  const PlacementClientOptions options_;
  std::unique_ptr<expertmesh::v1::Router::Stub> stub_;
  prometheus::Gauge* version_gauge_ = nullptr;

  mutable absl::Mutex mu_;
  std::shared_ptr<const PlacementSnapshot> current_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ClientContext* inflight_ ABSL_GUARDED_BY(mu_) = nullptr;
  Stats stats_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;  // last: starts after every member above is ready
};

}  // namespace expertmesh::attention_worker
