// A test double of the attention worker: serves expertmesh.v1.AttentionWorker on 127.0.0.1 (a
// free port) and answers each Generate with token ids a test chose, instead of running a model.
// It lets gateway tests and benchmarks drive the real gateway over real gRPC with exact,
// repeatable completions (reasoning, content, DSML tool calls, split at any token), observe what
// the gateway sent, hold many streams open cheaply, and fail a stream at a chosen point.
//
// Message conventions follow the real worker (attention-worker/scheduler.cc):
//  - one SequenceTokens per generated id (token_ids has exactly one id), sequence_id set;
//  - the first message also carries prompt_tokens (= prompt_ids size), seed and
//    cached_prompt_tokens;
//  - the last message carries finish_reason; a scripted id that is in the request's
//    sampling.stop_token_ids ends the sequence with FINISH_REASON_STOP, and ids after it are not
//    sent. Whether that stop id itself is in the last message is `StopIdMode` (the scheduler
//    today sends it; the proto's comment says it is not emitted);
//  - a script that runs out of ids ends with its `finish` reason on the last message;
//    sampling.max_new_tokens > 0 cuts the script there with FINISH_REASON_LENGTH;
//  - then the call finishes OK. A cancelled call (client TryCancel or deadline, or the Cancel
//    RPC) finishes CANCELLED and frees the sequence.
//
// No thread per stream: Generate is a callback reactor, and every wait (the gate, the
// inter-token interval) is an entry in one timer thread's queue. Everything here is thread-safe.
// Also served: Cancel (by sequence id), Drain (new calls then get UNAVAILABLE) and
// GetSequenceStatus (the running calls, phase DECODE).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"
#include "grpcpp/server.h"

namespace expertmesh::testing {

// What one sequence answers.
struct ScriptedReply {
  // Generated ids, sent one per message in this order (see the conventions above).
  std::vector<uint32_t> token_ids;
  // The finish reason when the ids run out without a stop id (or max_new_tokens) ending them.
  expertmesh::v1::FinishReason finish = expertmesh::v1::FINISH_REASON_STOP;
  // Set: after `fail_after` ids were sent (0 = before any), the call fails with this status
  // instead of going on (e.g. UNAVAILABLE mid-stream, or RESOURCE_EXHAUSTED as a refusal).
  std::optional<grpc::Status> fail;
  size_t fail_after = 0;
  // Reported on the first message.
  uint32_t cached_prompt_tokens = 0;
  uint64_t seed = 0;  // 0 = the request's sampling.seed if it has one
};

// Chooses the reply for each Generate request (called on a gRPC thread, once per call).
using Script = std::function<ScriptedReply(const expertmesh::v1::SequenceRequest&)>;

// Where a sequence is when its gate is asked.
struct GatePoint {
  std::string sequence_id;
  size_t sent = 0;  // ids already sent (and written to the transport) on this call
};
// Before each id after the first, the gate is polled until it returns true (the id is then
// sent) or the gate timeout passes (the call then fails with DEADLINE_EXCEEDED and the failure
// is recorded in gate_failures(), so that a broken test fails instead of hanging). Called on
// gRPC threads, possibly concurrently for different sequences; must not block.
using Gate = std::function<bool(const GatePoint&)>;

enum class StopIdMode {
  kSendStopId,  // the stop id is the last message's token (the scheduler's behaviour)
  kOmitStopId,  // the last message has no token ids, only finish_reason
};

struct ScriptedWorkerOptions {
  Script script;  // required
  Gate gate;      // optional; polled every `gate_poll` and on Notify()
  absl::Duration gate_poll = absl::Milliseconds(1);
  absl::Duration gate_timeout = absl::Seconds(20);
  // > 0: at least this long between two ids of a sequence (a fixed decode rate; benchmarks).
  // The first id is sent at once.
  absl::Duration inter_token_interval = absl::ZeroDuration();
  StopIdMode stop_id_mode = StopIdMode::kSendStopId;
  // Refuse a Generate while this many sequences are running (RESOURCE_EXHAUSTED, as a full
  // worker); 0 = no limit.
  int max_active = 0;
  // Keep this many requests in requests() (the oldest are dropped); benchmarks set it low.
  size_t max_recorded_requests = 4096;
};

class ScriptedAttentionWorker {
 public:
  // Starts serving on 127.0.0.1:<free port>. Errors: InvalidArgument (no script), Unavailable
  // (cannot bind).
  static absl::StatusOr<std::unique_ptr<ScriptedAttentionWorker>> Start(
      ScriptedWorkerOptions options);
  // Shuts the server down (running calls are cancelled) and waits for every call to end.
  ~ScriptedAttentionWorker();
  ScriptedAttentionWorker(const ScriptedAttentionWorker&) = delete;
  ScriptedAttentionWorker& operator=(const ScriptedAttentionWorker&) = delete;

  // "127.0.0.1:<port>", for the gateway's --attention-worker / GenerationOptions.
  std::string address() const;
  int port() const;

  // Every Generate request received (prompt ids, sampling, tenant, sequence id), oldest first.
  std::vector<expertmesh::v1::SequenceRequest> requests() const;
  size_t generate_calls() const;
  // Sequences running now: Generate calls not yet done (a sequence is freed when its call ends,
  // whether it finished, failed or was cancelled). The server ends a call a moment after the
  // client has read its status: wait with WaitForActive rather than reading this at once.
  int active() const;
  // Waits until active() == `n` or `timeout` passes; returns active() at the end.
  int WaitForActive(int n, absl::Duration timeout) const;
  // Calls that ended because the client cancelled them (hang-up, TryCancel, deadline) or the
  // Cancel RPC did.
  size_t cancelled_calls() const;
  // One line per gate that timed out ("seq <id>: gate closed for <t> after <n> messages").
  std::vector<std::string> gate_failures() const;
  // Ids sent so far on all calls (a benchmark's throughput).
  uint64_t tokens_sent() const { return tokens_sent_.load(); }

  // Re-polls every waiting gate now (instead of at the next poll tick): a test calls this when
  // the state its gate reads changed.
  void Notify();

  class Service;  // the gRPC service; opaque here
  struct Call;    // one Generate call's state

 private:
  explicit ScriptedAttentionWorker(ScriptedWorkerOptions options);
  friend class Service;

  class Timer;  // the one thread that wakes waiting calls

  const ScriptedWorkerOptions options_;
  std::unique_ptr<Timer> timer_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;

  mutable std::mutex mu_;
  mutable std::condition_variable changed_;
  std::map<const Call*, std::weak_ptr<Call>> calls_;  // running Generate calls
  std::vector<expertmesh::v1::SequenceRequest> requests_;
  size_t dropped_requests_ = 0;
  size_t generate_calls_ = 0;
  size_t cancelled_calls_ = 0;
  std::vector<std::string> gate_failures_;
  bool draining_ = false;
  std::atomic<uint64_t> tokens_sent_{0};
};

}  // namespace expertmesh::testing
