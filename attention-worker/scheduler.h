// The attention worker's sequence table and continuous-batching scheduler. One thread runs
// steps: each step admits queued sequences under a running-sequence cap and a state-memory
// budget, fills a token budget with one decode token per generating sequence and prefill chunks
// of the others, runs the batch through the model (split into micro-batches that ping-pong at
// the MoE when the experts are remote), samples, and streams the new tokens to each sequence's
// sink. Because every kernel is batch-invariant and sampling is keyed by (seed, choice,
// position), a sequence's tokens do not depend on what else was in its batches.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "attention-worker/kv_client.h"
#include "core/engine/engine.h"
#include "core/model/model.h"
#include "expertmesh/v1/attention_worker.pb.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace expertmesh::attention_worker {

struct SchedulerOptions {
  // Tokens (decode tokens + prefill chunk tokens) per step.
  int64_t max_batch_tokens = 256;
  // Sequences generating or prefilling at once; more wait in the queue.
  int max_running_sequences = 64;
  // Bytes of sequence state the running sequences may reserve (estimated for prompt +
  // max_new_tokens); a sequence that alone exceeds it is refused.
  int64_t state_memory_bytes = int64_t{8} << 30;
  // Micro-batches per step (ping-pong at each MoE): 1 = off, 2 or more = always, 0 = auto:
  // two while waiting on remote experts takes more than auto_split_wait_share of a one-batch
  // step (experts on other machines), else one (ping-pong splits every product in two and, with
  // the experts on the same cores, only adds work: docs/performance.md).
  int micro_batches = 0;
  double auto_split_wait_share = 0.2;
  // max_new_tokens when a request leaves it 0.
  int64_t default_max_new_tokens = 256;
  // Largest top_logprobs a request may ask for.
  int max_top_logprobs = 20;
  // Tests and benchmarks: extra attention-side time per token row and layer, to show how much
  // of the experts' time the micro-batch ping-pong hides.
  int64_t inject_attention_delay_us = 0;
  // Called on the scheduler thread before and after each step's forward passes (the attention
  // worker switches placement versions there). May be empty.
  std::function<void()> on_step_begin, on_step_end;
  // Prefix reuse (docs/kv_store.md): not owned, may be null (off). With a store, prefill chunks
  // end at 128-token block boundaries, each completed block is handed to the store, and
  // admission loads the longest stored prefix of the prompt instead of computing it.
  PrefixStore* prefix_store = nullptr;
  // state::ModelFingerprint of the served weights (0: computed from the config alone).
  uint64_t model_fingerprint = 0;
  // Threads that run admission lookups (each waits on the store, never the step loop).
  int prefix_lookup_threads = 4;
};

// Receives a sequence's output: messages in order, then exactly one End. Called from the
// scheduler thread; must not block for long.
class SequenceSink {
 public:
  virtual ~SequenceSink() = default;
  virtual void Send(expertmesh::v1::SequenceTokens message) = 0;
  // The sequence is over: OK after the final message (which carries the finish reason), or the
  // error that ended it.
  virtual void End(absl::Status status) = 0;
};

class Scheduler {
 public:
  // `model` is not owned and must outlive the scheduler; its expert dispatcher (if any) is
  // used for the routed experts. `registry` may be null (no metrics).
  Scheduler(model::Model* model, SchedulerOptions options, prometheus::Registry* registry);
  ~Scheduler();  // stops the loop; running sequences end with UNAVAILABLE

  // Queues a sequence. Errors: InvalidArgument naming the field; AlreadyExists for a running
  // id; ResourceExhausted when it can never fit the memory budget; Unavailable when draining
  // or stopped. On error the sink is not used.
  absl::Status Submit(const expertmesh::v1::SequenceRequest& request,
                      std::shared_ptr<SequenceSink> sink);
  // Ends a sequence at the next step boundary with FINISH_REASON_CANCELLED (its state is freed
  // then). Returns false if unknown or already finished.
  bool Cancel(const std::string& sequence_id);
  // Stops admitting new sequences; running ones finish.
  void Drain();
  bool draining() const { return draining_.load(); }
  // Ends every sequence with UNAVAILABLE and joins the loop.
  void Stop();

  size_t running() const;
  size_t queued() const;
  void Status(expertmesh::v1::SequenceStatusResponse* out) const;

  // Forward passes run so far (tests).
  int64_t steps() const { return steps_.load(); }

 private:
  struct Seq;
  struct PrefixLoad;
  void Loop();
  void LookupLoop();
  void LoadPrefix(PrefixLoad& load);
  void StoreBlock(Seq& s);
  bool Admissible(const Seq& s) const;
  void RunStep(std::vector<Seq*>& batch);
  void Finish(Seq& s, absl::Status status, expertmesh::v1::FinishReason reason,
              expertmesh::v1::SequenceTokens* last);
  int64_t EstimateStateBytes(int64_t tokens) const;
  int MicroBatchesForNextStep();
  void RecordStep(int micro_batches, double seconds, double expert_wait_seconds);

  model::Model* model_;
  const SchedulerOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Seq>> queue_;
  std::vector<std::unique_ptr<Seq>> running_;
  std::map<std::string, Seq*> by_id_;
  int64_t reserved_bytes_ = 0;
  bool stop_ = false;
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> steps_{0};
  std::thread thread_;
  uint64_t fingerprint_ = 0;
  std::deque<std::shared_ptr<PrefixLoad>> lookups_;
  std::condition_variable lookup_cv_;
  std::vector<std::thread> lookup_threads_;
  // Auto micro-batching (scheduler thread only): share of one-batch step time spent waiting on
  // remote experts (exponential average), and steps since the last one-batch probe.
  double wait_share_ = 0;
  bool split_ = false;
  int64_t steps_since_probe_ = 0;

  // Metrics (null when there is no registry).
  prometheus::Gauge* running_gauge_ = nullptr;
  prometheus::Gauge* queued_gauge_ = nullptr;
  prometheus::Counter* steps_total_ = nullptr;
  prometheus::Counter* prompt_tokens_ = nullptr;
  prometheus::Counter* generated_tokens_ = nullptr;
  prometheus::Counter* prefill_tokens_ = nullptr;
  prometheus::Histogram* batch_tokens_ = nullptr;
  prometheus::Histogram* step_seconds_ = nullptr;
  prometheus::Family<prometheus::Counter>* finished_ = nullptr;
  prometheus::Counter* query_tokens_ = nullptr;
  prometheus::Counter* hit_tokens_ = nullptr;
  prometheus::Counter* fallback_tokens_ = nullptr;
  prometheus::Family<prometheus::Counter>* prefix_errors_ = nullptr;
  prometheus::Histogram* lookup_seconds_ = nullptr;
};

}  // namespace expertmesh::attention_worker
