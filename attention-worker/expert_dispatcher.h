// The attention worker's remote experts: a model::ExpertDispatcher that sends each layer's
// routed rows to the expert workers over one long-lived ExpertWorker.Dispatch stream per worker,
// ONE DispatchRequest per worker per call (each needed row once), with a deadline per dispatch
// and a retry budget on replicas; experts nobody can compute come back as failed items with
// UNAVAILABLE naming them, never as a hang (issue 8, Attention worker).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "attention-worker/placement_client.h"
#include "core/model/moe.h"

namespace prometheus {
class Registry;
}

namespace expertmesh::attention_worker {

struct ExpertDispatcherOptions {
  // Longest wait for one worker's reply to one dispatch; past it the stream to that worker is
  // cancelled (it is presumed stuck) and its items go to a replica.
  absl::Duration deadline = absl::Seconds(10);
  // How many times one item may be re-sent to another replica after its worker failed.
  int retry_budget = 2;
  // After a failure, a worker is avoided (while another replica exists) for this long.
  absl::Duration suspect_period = absl::Seconds(5);
  // Each Dispatch stream is replaced by a fresh one after this long (so that it can carry a
  // deadline like every call, with no dispatch ever running into it).
  absl::Duration stream_lifetime = absl::Minutes(30);
  // Pick, for an expert with replicas, a worker this call already uses over the router's
  // preferred one (fewer, bigger dispatches). Off by default: the router's order spreads the
  // load, and each worker still gets at most one dispatch per call either way.
  bool prefer_fewer_workers = false;
  // If set, registers there: expertmesh_attention_expert_dispatches_total{result},
  // expertmesh_attention_expert_dispatch_retries_total,
  // expertmesh_attention_expert_dispatch_seconds, expertmesh_attention_expert_wire_bytes_total
  // {direction}. Not owned; must outlive the dispatcher. One dispatcher per registry.
  prometheus::Registry* registry = nullptr;
};

// Totals since construction (a consistent-enough copy of atomic counters).
struct ExpertDispatcherStats {
  int64_t dispatches_sent = 0;      // DispatchRequests handed to a stream
  int64_t dispatches_ok = 0;        // answered with code 0 and well-formed outputs
  int64_t dispatches_error = 0;     // answered with code != 0 or malformed outputs
  int64_t dispatches_timeout = 0;   // no answer within the deadline
  int64_t dispatches_broken = 0;    // stream or connection failed before the answer
  int64_t retries = 0;              // DispatchRequests re-sending failed items to a replica
  int64_t items_failed = 0;         // items reported in failed_items
  int64_t wire_bytes_sent = 0;      // serialized DispatchRequest bytes
  int64_t wire_bytes_received = 0;  // serialized DispatchResponse bytes
  int64_t streams_opened = 0;       // Dispatch streams started
};

class RemoteExpertDispatcher final : public model::ExpertDispatcher {
 public:
  // `placement` must outlive the dispatcher.
  RemoteExpertDispatcher(PlacementClient* placement, ExpertDispatcherOptions options);
  explicit RemoteExpertDispatcher(PlacementClient* placement);
  // Cancels every stream and waits for them to end (promptly: cancellation does not wait for
  // the workers). A PendingExperts still alive then returns CANCELLED from Wait.
  ~RemoteExpertDispatcher() override;
  RemoteExpertDispatcher(const RemoteExpertDispatcher&) = delete;
  RemoteExpertDispatcher& operator=(const RemoteExpertDispatcher&) = delete;

  // model::ExpertDispatcher. Uses the newest placement snapshot for the call (a retry uses the
  // newest one at its time). Copies the rows it needs from x, so x may change after the call.
  // Errors: InvalidArgument naming the item's (layer, expert) for a row out of [0, n), rows and
  // weights of different lengths, no rows, or experts not ascending; InvalidArgument for n or
  // D < 1 or a null x; Cancelled once the dispatcher is shutting down. Experts that are not
  // placed are not an error here: they come back from Wait in failed_items.
  // Thread-safe.
  absl::StatusOr<std::unique_ptr<model::PendingExperts>> Start(
      int block, const float* x, int64_t n, int64_t D,
      std::vector<model::ExpertWorkItem> items) override;

  ExpertDispatcherStats stats() const;
  // DispatchRequests sent to the worker at `address` so far (0 for an unknown one).
  int64_t dispatches_sent(const std::string& worker_address) const;
  // Pins the newest placement snapshot for the first sends of every Start until the next
  // BeginStep (retries still take the newest) and returns its version. The attention worker
  // calls it at each step boundary and reports that version to the router only then, so no
  // dispatch of an older version is in flight once the router acts on the report (unloads).
  // Without it every Start takes the newest snapshot.
  uint64_t BeginStep();
  // Placement version of the latest Start (0 before any).
  uint64_t placement_version_in_use() const;

  class Core;  // shared with the calls in flight and the streams

 private:
  std::shared_ptr<Core> core_;
};

}  // namespace expertmesh::attention_worker
