#include "attention-worker/expert_dispatcher.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/channel.h"
#include "core/rpc/status.h"
#include "expertmesh/v1/expert_worker.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/support/client_callback.h"
#include "prometheus/counter.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace expertmesh::attention_worker {

namespace v1 = expertmesh::v1;
using model::ExpertResults;
using model::ExpertWorkItem;

namespace {

// How a dispatch ended, for the result label and the stats.
enum class Outcome { kOk, kError, kTimeout, kBroken };

struct Metrics {
  std::atomic<int64_t> sent{0}, ok{0}, error{0}, timeout{0}, broken{0}, retries{0}, items_failed{0},
      bytes_sent{0}, bytes_received{0}, streams_opened{0};
  prometheus::Counter* ok_total = nullptr;
  prometheus::Counter* error_total = nullptr;
  prometheus::Counter* timeout_total = nullptr;
  prometheus::Counter* unavailable_total = nullptr;
  prometheus::Counter* retries_total = nullptr;
  prometheus::Counter* bytes_sent_total = nullptr;
  prometheus::Counter* bytes_received_total = nullptr;
  prometheus::Histogram* seconds = nullptr;

  void Register(prometheus::Registry& registry) {
    auto& dispatches = prometheus::BuildCounter()
                           .Name("expertmesh_attention_expert_dispatches_total")
                           .Help(
                               "Expert dispatches (one layer's rows for one expert worker) by "
                               "how they ended: ok, error (error reply or malformed outputs), "
                               "timeout (no reply within the deadline), unavailable (stream "
                               "or connection failed)")
                           .Register(registry);
    ok_total = &dispatches.Add({{"result", "ok"}});
    error_total = &dispatches.Add({{"result", "error"}});
    timeout_total = &dispatches.Add({{"result", "timeout"}});
    unavailable_total = &dispatches.Add({{"result", "unavailable"}});
    retries_total = &prometheus::BuildCounter()
                         .Name("expertmesh_attention_expert_dispatch_retries_total")
                         .Help("Dispatches re-sending a failed dispatch's experts to a replica")
                         .Register(registry)
                         .Add({});
    auto& bytes = prometheus::BuildCounter()
                      .Name("expertmesh_attention_expert_wire_bytes_total")
                      .Help("Serialized Dispatch message bytes, by direction (sent|received)")
                      .Register(registry);
    bytes_sent_total = &bytes.Add({{"direction", "sent"}});
    bytes_received_total = &bytes.Add({{"direction", "received"}});
    seconds = &prometheus::BuildHistogram()
                   .Name("expertmesh_attention_expert_dispatch_seconds")
                   .Help("Time from sending a dispatch to its successful reply")
                   .Register(registry)
                   .Add({}, prometheus::Histogram::BucketBoundaries{0.0005, 0.001, 0.0025, 0.005,
                                                                    0.01, 0.025, 0.05, 0.1, 0.25,
                                                                    0.5, 1, 2.5, 5, 10});
  }

  void CountOutcome(Outcome outcome) {
    switch (outcome) {
      case Outcome::kOk:
        ++ok;
        if (ok_total) ok_total->Increment();
        break;
      case Outcome::kError:
        ++error;
        if (error_total) error_total->Increment();
        break;
      case Outcome::kTimeout:
        ++timeout;
        if (timeout_total) timeout_total->Increment();
        break;
      case Outcome::kBroken:
        ++broken;
        if (unavailable_total) unavailable_total->Increment();
        break;
    }
  }
  void CountSent(int64_t bytes) {
    ++sent;
    bytes_sent += bytes;
    if (bytes_sent_total) bytes_sent_total->Increment(static_cast<double>(bytes));
  }
  void CountReceived(int64_t bytes) {
    bytes_received += bytes;
    if (bytes_received_total) bytes_received_total->Increment(static_cast<double>(bytes));
  }
  void CountRetry() {
    ++retries;
    if (retries_total) retries_total->Increment();
  }
};

// A reply (or the failure standing in for it) for one attempt of one call.
struct Completion {
  size_t attempt = 0;
  absl::Status status;
  v1::DispatchResponse response;
};

// Where the streams deliver the replies of one call; shared so that a stream may outlive the
// call's PendingExperts.
class CallState {
 public:
  void Deliver(size_t attempt, absl::Status status, v1::DispatchResponse response) {
    absl::MutexLock lock(&mu_);
    done_.push_back(Completion{attempt, std::move(status), std::move(response)});
  }
  // Waits until something was delivered or `deadline` passes; returns what was delivered.
  std::vector<Completion> Take(absl::Time deadline) {
    absl::MutexLock lock(&mu_);
    mu_.AwaitWithDeadline(absl::Condition(this, &CallState::HasDone), deadline);
    std::vector<Completion> out;
    out.swap(done_);
    return out;
  }

 private:
  bool HasDone() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !done_.empty(); }

  absl::Mutex mu_;
  std::vector<Completion> done_ ABSL_GUARDED_BY(mu_);
};

struct Target {
  std::shared_ptr<CallState> call;
  size_t attempt = 0;
};

}  // namespace

class DispatchStream;

class RemoteExpertDispatcher::Core {
 public:
  Core(PlacementClient* placement, ExpertDispatcherOptions options)
      : options_(std::move(options)), placement_(placement) {
    if (options_.registry != nullptr) metrics_.Register(*options_.registry);
  }

  // Cancels every stream and waits until gRPC is done with each of them. Idempotent.
  void Shutdown();
  // The snapshot a first send uses: the one pinned by BeginStep, else the newest; retries
  // always take the newest. Null once shutting down.
  std::shared_ptr<const PlacementSnapshot> Snapshot(bool retry) {
    absl::MutexLock lock(&mu_);
    if (shutting_down_) return nullptr;
    std::shared_ptr<const PlacementSnapshot> snapshot =
        !retry && pinned_ != nullptr ? pinned_ : placement_->Current();
    version_in_use_ = snapshot->version();
    return snapshot;
  }
  uint64_t Pin() {
    absl::MutexLock lock(&mu_);
    pinned_ = placement_->Current();
    return pinned_->version();
  }
  // Sends `request` to `address` on its stream (created or replaced as needed); the reply, or
  // the failure standing in for it, goes to `target`. *used is the stream it went on (null if
  // none).
  void Send(const std::string& address, v1::DispatchRequest request, const Target& target,
            std::shared_ptr<DispatchStream>* used);
  void MarkSuspect(const std::string& address) {
    absl::MutexLock lock(&mu_);
    suspect_until_[address] = absl::Now() + options_.suspect_period;
  }
  void ClearSuspect(const std::string& address) {
    absl::MutexLock lock(&mu_);
    suspect_until_.erase(address);
  }
  absl::flat_hash_set<std::string> Suspects() {
    absl::MutexLock lock(&mu_);
    absl::flat_hash_set<std::string> out;
    const absl::Time now = absl::Now();
    for (const auto& [address, until] : suspect_until_) {
      if (until > now) out.insert(address);
    }
    return out;
  }
  // Called by a stream as the very last thing it does (after releasing itself).
  void StreamEnded() {
    absl::MutexLock lock(&mu_);
    --live_streams_;
  }
  uint64_t NextBatchId() { return next_batch_id_.fetch_add(1) + 1; }
  int64_t DispatchesSent(const std::string& address) {
    absl::MutexLock lock(&mu_);
    auto it = connections_.find(address);
    return it == connections_.end() ? 0 : it->second->sent;
  }
  uint64_t version_in_use() {
    absl::MutexLock lock(&mu_);
    return version_in_use_;
  }

  const ExpertDispatcherOptions& options() const { return options_; }
  Metrics& metrics() { return metrics_; }

 private:
  struct Connection {
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<v1::ExpertWorker::Stub> stub;
    std::shared_ptr<DispatchStream> stream;
    int64_t sent = 0;
  };

  const ExpertDispatcherOptions options_;
  PlacementClient* const placement_;
  Metrics metrics_;
  std::atomic<uint64_t> next_batch_id_{0};

  absl::Mutex mu_;
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t version_in_use_ ABSL_GUARDED_BY(mu_) = 0;
  std::shared_ptr<const PlacementSnapshot> pinned_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::unique_ptr<Connection>> connections_ ABSL_GUARDED_BY(mu_);
  // Every stream not yet ended, current or retired (for Shutdown).
  std::vector<std::weak_ptr<DispatchStream>> streams_ ABSL_GUARDED_BY(mu_);
  int live_streams_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<std::string, absl::Time> suspect_until_ ABSL_GUARDED_BY(mu_);
};

// One Dispatch call to one expert worker, with the callback API (no thread per worker). Writes
// are queued (one in flight at a time, as the API requires); replies are matched to their calls
// by batch_id; when the stream ends, every dispatch still waiting on it fails with UNAVAILABLE.
//
// No gRPC operation is started while this object's mutex (or the Core's) is held: gRPC may run
// reactions inline in the starting thread, and they take that mutex.
class DispatchStream final
    : public grpc::ClientBidiReactor<v1::DispatchRequest, v1::DispatchResponse>,
      public std::enable_shared_from_this<DispatchStream> {
 public:
  DispatchStream(RemoteExpertDispatcher::Core* core, std::string address,
                 std::shared_ptr<grpc::Channel> channel)
      : core_(core),
        address_(std::move(address)),
        channel_(std::move(channel)),
        created_(absl::Now()) {}

  // Binds the call and queues the first read; nothing runs until Activate. The hold keeps the
  // call open for writes started from outside reactions until the stream is closing.
  void Prepare(v1::ExpertWorker::Stub* stub, absl::Time deadline) {
    context_.set_deadline(absl::ToChronoTime(deadline));
    stub->async()->Dispatch(&context_, this);
    StartRead(&response_);
    AddHold();
    self_ = shared_from_this();
  }
  void Activate() { StartCall(); }

  // Queues `request` (moved from only when accepted). False when the stream is closing or
  // retired: the caller must use another stream.
  bool Send(v1::DispatchRequest& request, const Target& target) {
    v1::DispatchRequest* to_write = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (closing_ || retiring_) return false;
      pending_[request.batch_id()] = target;
      queue_.push_back(std::move(request));
      if (!writing_) {
        writing_ = true;
        to_write = &queue_.front();
      }
    }
    if (to_write != nullptr) StartWrite(to_write);
    return true;
  }

  // Ends the stream at once; every dispatch on it fails, naming `reason`.
  void Cancel(const std::string& reason) {
    {
      absl::MutexLock lock(&mu_);
      if (cancel_reason_.empty()) cancel_reason_ = reason;
    }
    context_.TryCancel();
  }

  // No more dispatches on this stream: half-closes after the queued writes, so the worker
  // answers what it has and ends the call.
  void Retire() {
    bool start = false;
    {
      absl::MutexLock lock(&mu_);
      if (closing_ || retiring_) return;
      retiring_ = true;
      if (!writing_) {
        writing_ = true;
        writes_done_started_ = true;
        start = true;
      }
    }
    if (start) StartWritesDone();
  }

  bool closing() {
    absl::MutexLock lock(&mu_);
    return closing_ || retiring_;
  }
  absl::Time created() const { return created_; }

  void OnWriteDone(bool ok) override {
    v1::DispatchRequest* next = nullptr;
    bool writes_done = false;
    bool release = false;
    {
      absl::MutexLock lock(&mu_);
      queue_.pop_front();
      if (!ok) closing_ = true;
      if (!closing_ && !queue_.empty()) {
        next = &queue_.front();
      } else if (!closing_ && retiring_ && !writes_done_started_) {
        writes_done_started_ = true;
        writes_done = true;
      } else {
        writing_ = false;
        release = closing_ && TakeHold();
      }
    }
    if (next != nullptr) {
      StartWrite(next);
    } else if (writes_done) {
      StartWritesDone();
    } else if (release) {
      RemoveHold();
    }
  }

  void OnWritesDoneDone(bool ok) override {
    bool release = false;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      release = closing_ && TakeHold();
    }
    if (release) RemoveHold();
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      bool release = false;
      {
        absl::MutexLock lock(&mu_);
        closing_ = true;
        release = !writing_ && TakeHold();
      }
      if (release) RemoveHold();
      return;
    }
    core_->metrics().CountReceived(static_cast<int64_t>(response_.ByteSizeLong()));
    v1::DispatchResponse response = std::move(response_);
    response_.Clear();
    Target target;
    bool found = false;
    {
      absl::MutexLock lock(&mu_);
      auto it = pending_.find(response.batch_id());
      if (it != pending_.end()) {
        target = std::move(it->second);
        pending_.erase(it);
        found = true;
      }
    }
    StartRead(&response_);
    // A reply nobody waits for (its call gave up on it) is dropped.
    if (found) target.call->Deliver(target.attempt, absl::OkStatus(), std::move(response));
  }

  void OnDone(const grpc::Status& status) override {
    absl::flat_hash_map<uint64_t, Target> orphans;
    std::string reason;
    {
      absl::MutexLock lock(&mu_);
      closing_ = true;
      orphans.swap(pending_);
      queue_.clear();
      reason = cancel_reason_;
    }
    if (reason.empty()) {
      reason = status.ok() ? "the worker closed it" : rpc::FromGrpcStatus(status).ToString();
    }
    const absl::Status failure = absl::UnavailableError(
        absl::StrCat("Dispatch stream to expert worker ", address_, " ended: ", reason));
    for (auto& [id, target] : orphans) {
      target.call->Deliver(target.attempt, failure, v1::DispatchResponse());
    }
    // Dropping the self reference may delete this stream (not its channel: the Core's
    // connection holds that until Shutdown has seen every stream end, because destroying the
    // last reference to a channel on a gRPC callback thread aborts in gRPC 1.51).
    RemoteExpertDispatcher::Core* const core = core_;
    { std::shared_ptr<DispatchStream> self = std::move(self_); }
    core->StreamEnded();  // the Core may be gone after this
  }

 private:
  bool TakeHold() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (hold_released_) return false;
    hold_released_ = true;
    return true;
  }

  RemoteExpertDispatcher::Core* const core_;
  const std::string address_;
  const std::shared_ptr<grpc::Channel> channel_;  // outlives the call
  const absl::Time created_;
  grpc::ClientContext context_;
  v1::DispatchResponse response_;         // owned by the read in flight
  std::shared_ptr<DispatchStream> self_;  // alive until OnDone

  absl::Mutex mu_;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;   // read or write side failed, or done
  bool retiring_ ABSL_GUARDED_BY(mu_) = false;  // no new dispatches; half-close pending
  bool writing_ ABSL_GUARDED_BY(mu_) = false;   // a write or writes-done is in flight
  bool writes_done_started_ ABSL_GUARDED_BY(mu_) = false;
  bool hold_released_ ABSL_GUARDED_BY(mu_) = false;
  std::string cancel_reason_ ABSL_GUARDED_BY(mu_);
  std::deque<v1::DispatchRequest> queue_ ABSL_GUARDED_BY(mu_);  // front = the write in flight
  absl::flat_hash_map<uint64_t, Target> pending_ ABSL_GUARDED_BY(mu_);
};

void RemoteExpertDispatcher::Core::Send(const std::string& address, v1::DispatchRequest request,
                                        const Target& target,
                                        std::shared_ptr<DispatchStream>* used) {
  used->reset();
  metrics_.CountSent(static_cast<int64_t>(request.ByteSizeLong()));
  // A stream may close between being picked and being written to; a second, fresh one is
  // tried before the dispatch is given up as failed.
  for (int tries = 0; tries < 2; ++tries) {
    std::shared_ptr<DispatchStream> stream, fresh, retired;
    {
      absl::MutexLock lock(&mu_);
      if (shutting_down_) break;
      std::unique_ptr<Connection>& conn = connections_[address];
      if (conn == nullptr) {
        conn = std::make_unique<Connection>();
        conn->channel = rpc::MakeChannel(address);
        conn->stub = v1::ExpertWorker::NewStub(conn->channel);
      }
      if (tries == 0) ++conn->sent;
      const absl::Time now = absl::Now();
      if (conn->stream == nullptr || conn->stream->closing() ||
          now - conn->stream->created() > options_.stream_lifetime) {
        if (conn->stream != nullptr) retired = conn->stream;
        conn->stream = std::make_shared<DispatchStream>(this, address, conn->channel);
        // Every dispatch is sent before created + lifetime and answered within its deadline,
        // so the stream's own deadline never cuts one short.
        conn->stream->Prepare(conn->stub.get(), now + options_.stream_lifetime + options_.deadline +
                                                    absl::Seconds(10));
        fresh = conn->stream;
        ++live_streams_;
        ++metrics_.streams_opened;
        std::erase_if(streams_, [](const std::weak_ptr<DispatchStream>& s) { return s.expired(); });
        streams_.push_back(fresh);
      }
      stream = conn->stream;
    }
    if (retired != nullptr) retired->Retire();
    if (fresh != nullptr) fresh->Activate();
    if (stream->Send(request, target)) {
      *used = std::move(stream);
      return;
    }
  }
  bool shutting_down;
  {
    absl::MutexLock lock(&mu_);
    shutting_down = shutting_down_;
  }
  target.call->Deliver(
      target.attempt,
      shutting_down ? absl::CancelledError("the expert dispatcher is shutting down")
                    : absl::UnavailableError(absl::StrCat("no open Dispatch stream to expert "
                                                          "worker ",
                                                          address)),
      v1::DispatchResponse());
}

void RemoteExpertDispatcher::Core::Shutdown() {
  std::vector<std::shared_ptr<DispatchStream>> streams;
  {
    absl::MutexLock lock(&mu_);
    shutting_down_ = true;
    for (const auto& weak : streams_) {
      if (auto s = weak.lock()) streams.push_back(std::move(s));
    }
  }
  for (auto& s : streams) s->Cancel("the expert dispatcher is shutting down");
  streams.clear();
  absl::MutexLock lock(&mu_);
  // gRPC ends a cancelled call promptly, whatever the worker does.
  mu_.Await(absl::Condition(
      +[](int* live) { return *live == 0; }, &live_streams_));
  connections_.clear();
}

namespace {

// One call's dispatches: the first round (Start) and its retries (Wait).
class RemotePending final : public model::PendingExperts {
 public:
  using Core = RemoteExpertDispatcher::Core;

  RemotePending(std::shared_ptr<Core> core, int block, int64_t D, std::vector<ExpertWorkItem> items,
                std::vector<int32_t> compact, std::vector<float> rows)
      : core_(std::move(core)),
        block_(block),
        D_(D),
        items_(std::move(items)),
        compact_(std::move(compact)),
        rows_(std::move(rows)),
        states_(items_.size()),
        outputs_(items_.size()),
        call_(std::make_shared<CallState>()) {}

  // Sends every item. False when the dispatcher is shutting down.
  bool Begin() {
    std::vector<size_t> all(items_.size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = i;
    SendRound(all, /*retry=*/false);
    return !shutdown_;
  }

  absl::StatusOr<ExpertResults> Wait() override {
    if (waited_) return absl::FailedPreconditionError("PendingExperts::Wait called twice");
    waited_ = true;
    while (outstanding_ > 0) {
      absl::Time next = absl::InfiniteFuture();
      for (const Attempt& a : attempts_) {
        if (!a.finished) next = std::min(next, a.deadline);
      }
      std::vector<Completion> done = call_->Take(next);
      std::vector<size_t> retry;
      for (Completion& c : done) {
        Attempt& a = attempts_[c.attempt];
        if (a.finished) continue;  // it already timed out
        a.finished = true;
        --outstanding_;
        if (!c.status.ok()) {
          core_->metrics().CountOutcome(Outcome::kBroken);
          Failed(a, c.status, &retry);
          continue;
        }
        absl::Status accepted = Accept(a, c.response);
        if (accepted.ok()) {
          core_->metrics().CountOutcome(Outcome::kOk);
          if (core_->metrics().seconds != nullptr) {
            core_->metrics().seconds->Observe(absl::ToDoubleSeconds(absl::Now() - a.sent));
          }
          core_->ClearSuspect(a.address);
        } else {
          core_->metrics().CountOutcome(Outcome::kError);
          Failed(a, accepted, &retry);
        }
      }
      const absl::Time now = absl::Now();
      for (Attempt& a : attempts_) {
        if (a.finished || a.deadline > now) continue;
        a.finished = true;
        --outstanding_;
        core_->metrics().CountOutcome(Outcome::kTimeout);
        const std::string reason = absl::StrCat(
            "expert worker ", a.address, " did not answer batch ", a.batch_id, " of layer ", block_,
            " within ", absl::FormatDuration(core_->options().deadline));
        // A worker that sits on one dispatch is presumed stuck: its stream is cut so that the
        // other dispatches on it fail over now rather than at their own deadlines.
        if (a.stream != nullptr) a.stream->Cancel(reason);
        Failed(a, absl::DeadlineExceededError(reason), &retry);
      }
      if (!retry.empty()) SendRound(retry, /*retry=*/true);
    }
    if (shutdown_) {
      return absl::CancelledError(absl::StrCat("the expert dispatcher shut down while layer ",
                                               block_, " was being dispatched"));
    }
    ExpertResults results;
    std::vector<std::string> names;
    std::vector<std::string> causes;
    for (size_t i = 0; i < items_.size(); ++i) {
      if (!states_[i].failed) continue;
      results.failed_items.push_back(i);
      names.push_back(ExpertName(ExpertKey{block_, items_[i].expert}));
      const std::string cause(states_[i].cause.message());
      if (causes.size() < 3 && std::find(causes.begin(), causes.end(), cause) == causes.end()) {
        causes.push_back(cause);
      }
      outputs_[i].clear();
    }
    if (!results.failed_items.empty()) {
      core_->metrics().items_failed += static_cast<int64_t>(results.failed_items.size());
      results.error = absl::UnavailableError(
          absl::StrCat("no expert worker could compute ", absl::StrJoin(names, ", "),
                       " (placement version ", version_, "): ", absl::StrJoin(causes, "; ")));
    }
    results.outputs = std::move(outputs_);
    return results;
  }

 private:
  struct Attempt {
    std::string address;
    std::vector<size_t> items;  // indices into items_, in the request's ExpertBatch order
    uint64_t batch_id = 0;
    absl::Time sent;
    absl::Time deadline;
    std::shared_ptr<DispatchStream> stream;
    bool finished = false;
  };
  struct ItemState {
    absl::flat_hash_set<std::string> tried;  // addresses that failed this item
    int retries = 0;
    bool done = false;
    bool failed = false;
    absl::Status cause;  // the latest failure
  };

  void FailItem(size_t i, absl::Status cause) {
    states_[i].failed = true;
    states_[i].cause = std::move(cause);
  }

  // Records a failed attempt and queues its items for a replica while the budget lasts.
  void Failed(const Attempt& a, const absl::Status& status, std::vector<size_t>* retry) {
    core_->MarkSuspect(a.address);
    for (size_t i : a.items) {
      ItemState& st = states_[i];
      st.tried.insert(a.address);
      st.cause = status;
      if (st.retries < core_->options().retry_budget) {
        ++st.retries;
        retry->push_back(i);
      } else {
        FailItem(i, absl::Status(status.code(),
                                 absl::StrCat(status.message(), " (retry budget of ",
                                              core_->options().retry_budget, " used up)")));
      }
    }
  }

  // Picks a worker for each item of `items` and sends one request per worker.
  void SendRound(const std::vector<size_t>& items, bool retry) {
    std::shared_ptr<const PlacementSnapshot> snapshot = core_->Snapshot(retry);
    if (snapshot == nullptr) {
      shutdown_ = true;
      return;
    }
    version_ = snapshot->version();
    const absl::flat_hash_set<std::string> suspects = core_->Suspects();
    // Workers in the order first chosen, so requests go out in a deterministic order.
    std::vector<std::pair<std::string, std::vector<size_t>>> groups;
    auto group_of = [&](const std::string& address) -> int {
      for (size_t g = 0; g < groups.size(); ++g) {
        if (groups[g].first == address) return static_cast<int>(g);
      }
      return -1;
    };
    for (size_t i : items) {
      const std::vector<Replica>& replicas = snapshot->Replicas(block_, items_[i].expert);
      if (replicas.empty()) {
        FailItem(i, absl::UnavailableError(
                        absl::StrCat(ExpertName(ExpertKey{block_, items_[i].expert}),
                                     " has no worker in placement version ", snapshot->version())));
        continue;
      }
      // Lowest rank wins; ties go to the router's preferred order.
      int best = -1;
      int best_rank = 0;
      for (size_t r = 0; r < replicas.size(); ++r) {
        const std::string& address = replicas[r].address;
        if (states_[i].tried.contains(address)) continue;
        int rank = suspects.contains(address) ? 2 : 0;
        if (rank == 0 && core_->options().prefer_fewer_workers && group_of(address) < 0) {
          rank = 1;
        }
        if (best < 0 || rank < best_rank) {
          best = static_cast<int>(r);
          best_rank = rank;
        }
      }
      if (best < 0) {
        const absl::Status& last = states_[i].cause;
        FailItem(i, absl::UnavailableError(absl::StrCat(
                        "every replica of ", ExpertName(ExpertKey{block_, items_[i].expert}),
                        " failed", last.ok() ? "" : ", last: ", last.message())));
        continue;
      }
      const std::string& address = replicas[best].address;
      int g = group_of(address);
      if (g < 0) {
        groups.emplace_back(address, std::vector<size_t>());
        g = static_cast<int>(groups.size()) - 1;
      }
      groups[g].second.push_back(i);
    }
    for (auto& [address, group] : groups) {
      const size_t index = attempts_.size();
      Attempt& a = attempts_.emplace_back();
      a.address = address;
      a.items = std::move(group);
      a.batch_id = core_->NextBatchId();
      v1::DispatchRequest request = BuildRequest(a, snapshot->version());
      a.sent = absl::Now();
      a.deadline = a.sent + core_->options().deadline;
      ++outstanding_;
      if (retry) core_->metrics().CountRetry();
      std::shared_ptr<DispatchStream> stream;
      core_->Send(address, std::move(request), Target{call_, index}, &stream);
      attempts_[index].stream = std::move(stream);
    }
  }

  // Every row that the attempt's experts need, once, in ascending row order.
  v1::DispatchRequest BuildRequest(const Attempt& a, uint64_t version) const {
    v1::DispatchRequest request;
    request.set_batch_id(a.batch_id);
    request.set_layer(static_cast<uint32_t>(block_));
    request.set_placement_version(version);
    request.set_output_dtype(v1::DTYPE_F32);
    std::vector<int64_t> rows;
    for (size_t i : a.items) rows.insert(rows.end(), items_[i].rows.begin(), items_[i].rows.end());
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    absl::flat_hash_map<int64_t, uint32_t> local;
    local.reserve(rows.size());
    v1::Tensor* tokens = request.mutable_tokens();
    tokens->set_dtype(v1::DTYPE_F32);
    tokens->add_shape(static_cast<int64_t>(rows.size()));
    tokens->add_shape(D_);
    std::string* data = tokens->mutable_data();
    data->resize(rows.size() * static_cast<size_t>(D_) * sizeof(float));
    for (size_t k = 0; k < rows.size(); ++k) {
      local[rows[k]] = static_cast<uint32_t>(k);
      std::memcpy(data->data() + k * D_ * sizeof(float),
                  rows_.data() + static_cast<size_t>(compact_[rows[k]]) * D_,
                  static_cast<size_t>(D_) * sizeof(float));
    }
    for (size_t i : a.items) {
      v1::ExpertBatch* batch = request.add_experts();
      batch->set_expert(static_cast<uint32_t>(items_[i].expert));
      for (int64_t r : items_[i].rows) batch->add_rows(local[r]);
      batch->mutable_weights()->Add(items_[i].weights.begin(), items_[i].weights.end());
    }
    return request;
  }

  // Checks a reply against its request and copies the outputs. Nothing is copied unless the
  // whole reply is well formed.
  absl::Status Accept(const Attempt& a, const v1::DispatchResponse& response) {
    const std::string who =
        absl::StrCat("expert worker ", a.address, ", batch ", a.batch_id, " of layer ", block_);
    if (response.code() != 0) {
      const int code = response.code();
      const absl::StatusCode status_code =
          code > 0 && code <= static_cast<int>(absl::StatusCode::kUnauthenticated)
              ? static_cast<absl::StatusCode>(code)
              : absl::StatusCode::kUnknown;
      return absl::Status(status_code, absl::StrCat(who, ": ", response.message()));
    }
    if (response.outputs_size() != static_cast<int>(a.items.size())) {
      return absl::InternalError(absl::StrCat(who, ": ", response.outputs_size(), " outputs for ",
                                              a.items.size(), " experts"));
    }
    for (size_t j = 0; j < a.items.size(); ++j) {
      const ExpertWorkItem& item = items_[a.items[j]];
      const v1::ExpertOutput& out = response.outputs(static_cast<int>(j));
      const int64_t rows = static_cast<int64_t>(item.rows.size());
      const std::string name = ExpertName(ExpertKey{block_, item.expert});
      if (static_cast<int>(out.expert()) != item.expert) {
        return absl::InternalError(
            absl::StrCat(who, ": output ", j, " is expert ", out.expert(), ", expected ", name));
      }
      const v1::Tensor& t = out.outputs();
      if (t.dtype() != v1::DTYPE_F32 || t.shape_size() != 2 || t.shape(0) != rows ||
          t.shape(1) != D_ || t.data().size() != static_cast<size_t>(rows * D_) * sizeof(float)) {
        return absl::InternalError(absl::StrCat(who, ": outputs of ", name, " are not F32 [", rows,
                                                ", ", D_, "] (dtype ", v1::DType_Name(t.dtype()),
                                                ", shape [", absl::StrJoin(t.shape(), ", "), "], ",
                                                t.data().size(), " bytes)"));
      }
    }
    for (size_t j = 0; j < a.items.size(); ++j) {
      const size_t i = a.items[j];
      const std::string& data = response.outputs(static_cast<int>(j)).outputs().data();
      outputs_[i].resize(data.size() / sizeof(float));
      std::memcpy(outputs_[i].data(), data.data(), data.size());
      states_[i].done = true;
    }
    return absl::OkStatus();
  }

  const std::shared_ptr<Core> core_;
  const int block_;
  const int64_t D_;
  const std::vector<ExpertWorkItem> items_;
  const std::vector<int32_t> compact_;  // row of x -> row of rows_ (-1: not needed)
  const std::vector<float> rows_;       // the needed rows of x, [compact rows, D]
  std::vector<ItemState> states_;
  std::vector<std::vector<float>> outputs_;
  const std::shared_ptr<CallState> call_;
  std::vector<Attempt> attempts_;
  size_t outstanding_ = 0;
  uint64_t version_ = 0;
  bool shutdown_ = false;
  bool waited_ = false;
};

}  // namespace

RemoteExpertDispatcher::RemoteExpertDispatcher(PlacementClient* placement)
    : RemoteExpertDispatcher(placement, ExpertDispatcherOptions()) {}

RemoteExpertDispatcher::RemoteExpertDispatcher(PlacementClient* placement,
                                               ExpertDispatcherOptions options)
    : core_(std::make_shared<Core>(placement, std::move(options))) {}

RemoteExpertDispatcher::~RemoteExpertDispatcher() { core_->Shutdown(); }

absl::StatusOr<std::unique_ptr<model::PendingExperts>> RemoteExpertDispatcher::Start(
    int block, const float* x, int64_t n, int64_t D, std::vector<ExpertWorkItem> items) {
  if (x == nullptr || n < 1 || D < 1) {
    return absl::InvalidArgumentError(absl::StrCat("expert dispatch of layer ", block,
                                                   " needs x [n >= 1, D >= 1], got [", n, ", ", D,
                                                   "]", x == nullptr ? " (null)" : ""));
  }
  std::vector<int32_t> compact(static_cast<size_t>(n), -1);
  int32_t used = 0;
  int previous = -1;
  for (const ExpertWorkItem& item : items) {
    const std::string name = ExpertName(ExpertKey{block, item.expert});
    if (item.expert < 0 || item.expert <= previous) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert dispatch items must have ascending expert ids: ", name,
                       " after expert ", previous));
    }
    previous = item.expert;
    if (item.rows.empty()) return absl::InvalidArgumentError(name + " has no rows");
    if (item.weights.size() != item.rows.size()) {
      return absl::InvalidArgumentError(absl::StrCat(name, " has ", item.rows.size(), " rows but ",
                                                     item.weights.size(), " weights"));
    }
    for (int64_t r : item.rows) {
      if (r < 0 || r >= n) {
        return absl::InvalidArgumentError(
            absl::StrCat(name, " has row ", r, " outside [0, ", n, ")"));
      }
      if (compact[r] < 0) compact[r] = used++;
    }
  }
  std::vector<float> rows(static_cast<size_t>(used) * D);
  for (int64_t r = 0; r < n; ++r) {
    if (compact[r] < 0) continue;
    std::memcpy(rows.data() + static_cast<size_t>(compact[r]) * D, x + r * D,
                static_cast<size_t>(D) * sizeof(float));
  }
  auto pending = std::make_unique<RemotePending>(core_, block, D, std::move(items),
                                                 std::move(compact), std::move(rows));
  if (!pending->Begin()) {
    return absl::CancelledError(
        absl::StrCat("the expert dispatcher is shutting down (layer ", block, " not dispatched)"));
  }
  return pending;
}

ExpertDispatcherStats RemoteExpertDispatcher::stats() const {
  Metrics& m = core_->metrics();
  ExpertDispatcherStats s;
  s.dispatches_sent = m.sent;
  s.dispatches_ok = m.ok;
  s.dispatches_error = m.error;
  s.dispatches_timeout = m.timeout;
  s.dispatches_broken = m.broken;
  s.retries = m.retries;
  s.items_failed = m.items_failed;
  s.wire_bytes_sent = m.bytes_sent;
  s.wire_bytes_received = m.bytes_received;
  s.streams_opened = m.streams_opened;
  return s;
}

int64_t RemoteExpertDispatcher::dispatches_sent(const std::string& worker_address) const {
  return core_->DispatchesSent(worker_address);
}

uint64_t RemoteExpertDispatcher::BeginStep() { return core_->Pin(); }

uint64_t RemoteExpertDispatcher::placement_version_in_use() const {
  return core_->version_in_use();
}

}  // namespace expertmesh::attention_worker
