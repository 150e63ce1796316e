// The router's expert placement: which expert workers host each routed (layer, expert), and the
// protocol that changes it without ever pointing an attention worker at a worker that does not
// hold the expert (docs/placement.md). Plain logic, no gRPC: the RPCs to expert workers go
// through the ExpertLoader interface and time through base::Clock (core/base/clock.h), so unit tests drive every
// step with fakes.
#pragma once

#include <compare>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/base/clock.h"
#include "core/model/config.h"
#include "expertmesh/v1/router.pb.h"

namespace expertmesh::router {

struct ExpertKey {
  uint32_t layer = 0;
  uint32_t expert = 0;
  auto operator<=>(const ExpertKey&) const = default;
};
std::string KeyName(const ExpertKey& key);  // "(layer 3, expert 7)"

// What placement needs from config.json.
struct ModelShape {
  int trunk_layers = 0;  // num_hidden_layers
  int mtp_layers = 0;    // num_nextn_predict_layers; MTP block i has layer id trunk_layers + i
  int experts = 0;       // n_routed_experts
  // Estimated resident bytes of one routed expert, to turn Capacity.memory_bytes into a cap.
  uint64_t expert_bytes = 0;

  int total_layers() const { return trunk_layers + mtp_layers; }
  // Every (layer, expert) with a routed expert, layer-major.
  std::vector<ExpertKey> Keys() const;
};

// The shape from a parsed config.json. The router parses it with the model's own parser
// (em_config, no kernels), so a config the workers would reject never places experts.
ModelShape ShapeFromConfig(const model::ModelConfig& config);
// Reads and parses `model_dir`/config.json. Errors: NotFound (file), InvalidArgument naming the
// key (those of model::LoadModelConfig).
absl::StatusOr<ModelShape> ReadModelShape(const std::string& model_dir);
absl::StatusOr<ModelShape> ParseModelShape(std::string_view config_json);

// A --placement-file: experts pinned to given workers. A worker is named by its gRPC address
// ("127.0.0.1:50053") or by an integer, the ordinal of the expert worker in the order expert
// workers first registered with this router (0 = first).
struct WorkerRef {
  std::string address;  // empty when `ordinal` is used
  int ordinal = -1;
  bool Matches(std::string_view worker_address, int worker_ordinal) const;
};
using PinnedPlacement = std::map<ExpertKey, std::vector<WorkerRef>>;
// Format: {"placement": [{"layer": 0 | "*", "expert": 3 | "experts": [3, 4], "workers": [...]}]}
// Errors: InvalidArgument naming the entry and field (out of range, duplicate, empty workers).
absl::StatusOr<PinnedPlacement> ParsePinnedPlacement(std::string_view text,
                                                     const ModelShape& shape);
absl::StatusOr<PinnedPlacement> ReadPinnedPlacement(const std::string& path,
                                                    const ModelShape& shape);

// (layer, expert) -> worker ids hosting it, preferred first; an empty list = unplaced.
using Assignment = std::map<ExpertKey, std::vector<uint64_t>>;

struct PlacementInput {
  std::vector<ExpertKey> keys;
  int replicas = 1;
  // Eligible workers (live, not draining, of the cluster's kernel target) -> most experts each
  // may hold.
  std::map<uint64_t, size_t> caps;
  // The published assignment (may name workers that are no longer eligible).
  Assignment current;
  // Experts each worker holds already without being listed (restart, or not unloaded yet):
  // preferred when a new replica is needed, since they cost no load.
  std::map<uint64_t, std::set<ExpertKey>> held;
  // Pinned experts, resolved to eligible worker ids; an expert whose pinned workers are all gone
  // is absent here and placed like any other.
  Assignment pinned;
};

// The next assignment: keeps every current (eligible) holder it can, gives each expert
// min(replicas, eligible workers) holders, then moves as few experts as it takes to bring every
// worker within one expert of the others (caps permitting), spreading each layer over workers.
// Deterministic.
Assignment ComputePlacement(const PlacementInput& input);

// The RPCs the placement protocol makes to expert workers. Implementations set deadlines.
class ExpertLoader {
 public:
  virtual ~ExpertLoader() = default;
  virtual absl::Status Load(uint64_t worker_id, const std::string& address,
                            const std::vector<ExpertKey>& experts, uint64_t version) = 0;
  virtual absl::Status Unload(uint64_t worker_id, const std::string& address,
                              const std::vector<ExpertKey>& experts) = 0;
};

struct PlacementOptions {
  ModelShape shape;
  int replicas = 1;
  PinnedPlacement pinned;
  // A router that finds signs of an earlier table (state file, hosted experts) waits this long
  // after it starts before publishing, so that every live worker re-registers first (one lease
  // TTL is enough: a live worker renews within it).
  absl::Duration settle = absl::ZeroDuration();
  // Before its first table, the router waits until no expert worker has registered for this
  // long, so that workers starting together are placed together instead of the first one
  // loading every expert and handing half of them on.
  absl::Duration gather = absl::ZeroDuration();
  // Version published before a restart (from --state-dir); 0 = none.
  uint64_t restored_version = 0;
  // A worker whose load failed is left out of placement for this long (doubling per failure,
  // capped at 32x).
  absl::Duration load_failure_backoff = absl::Seconds(1);
};

// The placement table and its publication protocol. Thread-safe. Membership events come in
// through AddWorker / RemoveWorker / Heartbeat; Reconcile() does the slow part (loads, unloads)
// and is run by one thread (the router's placement thread, or a test).
class PlacementManager {
 public:
  using Listener = std::function<void(std::shared_ptr<const expertmesh::v1::PlacementTable>)>;

  // `clock` and `loader` must outlive this object.
  PlacementManager(PlacementOptions options, const base::Clock& clock, ExpertLoader& loader);

  // Called for every published table, in version order, under the manager's lock: it must not
  // call back into the manager.
  void SetListener(Listener listener);

  struct WorkerSpec {
    uint64_t id = 0;
    expertmesh::v1::WorkerKind kind = expertmesh::v1::WORKER_KIND_UNSPECIFIED;
    std::string address;
    expertmesh::v1::Capacity capacity;
    std::string kernel_target;
    std::vector<ExpertKey> hosted;  // experts it holds already (after a router restart)
    uint64_t hosted_version = 0;
  };
  // A worker registered (only attention and expert workers matter here).
  void AddWorker(const WorkerSpec& spec);
  // A worker left (lease expired or deregistered). If the table lists it, a version without it
  // is published at once (experts left with no holder are listed as unplaced).
  void RemoveWorker(uint64_t id);

  struct HeartbeatResult {
    uint64_t placement_version = 0;
    bool drained = false;
  };
  // A heartbeat: attention workers report the version they route with, expert workers whether
  // they are draining. `drained` is true once a draining worker is in no table an attention
  // worker may still use.
  HeartbeatResult Heartbeat(uint64_t id, uint64_t reported_version, bool draining);

  // One round of the protocol: publish a changed assignment once its new holders have loaded
  // their experts, then unload what no attention worker can route to any more. Returns true if
  // it published.
  bool Reconcile();

  // Blocks until something may need reconciling or `timeout` passes.
  void WaitForWork(absl::Duration timeout);
  void Wake();

  std::shared_ptr<const expertmesh::v1::PlacementTable> table() const;
  uint64_t version() const;
  const ModelShape& shape() const { return options_.shape; }

 private:
  struct Worker {
    expertmesh::v1::WorkerKind kind;
    std::string address;
    int ordinal = -1;
    size_t cap = 0;
    std::string kernel_target;
    bool target_ok = true;
    bool draining = false;
    uint64_t drain_version = 0;  // first version without it once draining; 0 = not yet
    std::set<ExpertKey> held;    // loaded on it, as far as the router knows
    absl::Time backoff_until = absl::InfinitePast();
    int load_failures = 0;
    std::optional<uint64_t> reported_version;  // attention workers
  };

  PlacementInput InputLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool SettlingLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The lowest version any live attention worker routes with (max uint64 when there are none;
  // 0 while one has not reported yet).
  uint64_t MinAttentionVersionLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PublishLocked(Assignment next) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunUnloads();

  const PlacementOptions options_;
  const std::vector<ExpertKey> keys_;
  const base::Clock& clock_;
  ExpertLoader& loader_;
  const absl::Time started_;

  mutable absl::Mutex mu_;
  Listener listener_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, Worker> workers_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int> ordinals_ ABSL_GUARDED_BY(mu_);  // expert address -> ordinal
  std::optional<std::string> cluster_target_ ABSL_GUARDED_BY(mu_);
  Assignment assignment_ ABSL_GUARDED_BY(mu_);  // published
  std::shared_ptr<const expertmesh::v1::PlacementTable> table_ ABSL_GUARDED_BY(mu_);
  // Highest version seen anywhere (state file, workers' reports); the next one is above it.
  uint64_t version_floor_ ABSL_GUARDED_BY(mu_) = 0;
  int published_ ABSL_GUARDED_BY(mu_) = 0;  // tables published by this incarnation
  absl::Time last_expert_registration_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  bool restarted_ ABSL_GUARDED_BY(mu_) = false;
  // (worker, expert) -> version from which the worker is no longer listed for it.
  std::map<std::pair<uint64_t, ExpertKey>, uint64_t> pending_unloads_ ABSL_GUARDED_BY(mu_);
  bool work_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace expertmesh::router
