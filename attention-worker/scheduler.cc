#include "attention-worker/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <thread>

#include "core/base/log.h"
#include "core/state/block_codec.h"

namespace expertmesh::attention_worker {

namespace v1 = expertmesh::v1;
using state::kBlockTokens;

// A queued sequence's prefix lookup, shared by the sequence and the lookup thread (a cancelled
// sequence may leave while its lookup runs). `done` and what follows are guarded by mu_.
struct Scheduler::PrefixLoad {
  std::string tenant;
  std::vector<int32_t> tokens;   // the prompt's usable full blocks
  std::vector<uint64_t> hashes;  // their chain hashes
  bool done = false;
  model::SequenceState state;  // after `blocks` applied blocks
  int64_t blocks = 0;
};

struct Scheduler::Seq {
  std::string id;
  std::shared_ptr<SequenceSink> sink;
  std::vector<int32_t> prompt;
  engine::SamplingParams sampling;
  std::set<int32_t> stop_ids;
  int64_t max_new = 0;
  bool logprobs = false;
  int top_logprobs = 0;
  // Thinking budget: after max_thinking generated tokens without end_thinking, that id is
  // forced (once). 0 = no budget.
  int64_t max_thinking = 0;
  int32_t end_thinking = -1;
  bool thinking_closed = false;
  // Failover resume: the prompt's last `resumed` ids were generated on another worker
  // (SequenceRequest.resumed_tokens); they count as generated for the thinking budget.
  int64_t resumed = 0;
  model::SequenceState state;
  int64_t fed = 0;                  // tokens of prompt + generated already fed to the model
  std::vector<int32_t> generated;   // sampled tokens
  int64_t reserved_bytes = 0;
  bool started = false;             // first message sent
  std::atomic<bool> cancelled{false};
  bool finished = false;  // only the scheduler thread touches it
  // Read by Status() from other threads.
  std::atomic<v1::SequencePhase> phase{v1::SEQUENCE_PHASE_QUEUED};
  std::atomic<uint32_t> generated_count{0};
  // Prefix reuse: the tenant scopes the chain; `load` is the admission lookup (null: none);
  // `cached` prompt tokens came from the store. `chain` is the chain hash of the last block
  // whose key is known (loaded or written), `writing` false once a block could not be encoded
  // (later blocks would have no parent), `wrote` whether a put was issued (DeleteSequence then).
  std::string tenant;
  bool reuse = false;
  std::shared_ptr<PrefixLoad> load;
  int64_t cached = 0;
  uint64_t chain = 0;
  bool writing = true;
  bool wrote = false;
  int32_t token_at(int64_t i) const {
    const int64_t p = static_cast<int64_t>(prompt.size());
    return i < p ? prompt[i] : generated[i - p];
  }
};

namespace {

prometheus::Histogram::BucketBoundaries TokenBuckets() {
  return {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096};
}

prometheus::Histogram::BucketBoundaries SecondsBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
}

void FillLogprob(absl::Span<const float> logits, int32_t token, int top,
                 v1::TokenLogprob* out) {
  out->set_token_id(static_cast<uint32_t>(token));
  out->set_logprob(engine::TokenLogprob(logits, token));
  if (top <= 0) return;
  for (const auto& [id, lp] : engine::TopLogprobs(logits, top)) {
    v1::TopLogprob* t = out->add_top();
    t->set_token_id(static_cast<uint32_t>(id));
    t->set_logprob(lp);
  }
}

uint64_t SystemSeed() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

}  // namespace

Scheduler::Scheduler(model::Model* model, SchedulerOptions options,
                     prometheus::Registry* registry)
    : model_(model), options_(options) {
  if (registry != nullptr) {
    running_gauge_ = &prometheus::BuildGauge()
                          .Name("expertmesh_attention_running_sequences")
                          .Help("Sequences prefilling or generating")
                          .Register(*registry)
                          .Add({});
    queued_gauge_ = &prometheus::BuildGauge()
                         .Name("expertmesh_attention_queued_sequences")
                         .Help("Sequences waiting for admission (scheduler queue)")
                         .Register(*registry)
                         .Add({});
    steps_total_ = &prometheus::BuildCounter()
                        .Name("expertmesh_attention_steps_total")
                        .Help("Scheduler steps (batched forward passes) run")
                        .Register(*registry)
                        .Add({});
    prompt_tokens_ = &prometheus::BuildCounter()
                          .Name("expertmesh_attention_prompt_tokens_total")
                          .Help("Prompt tokens of admitted sequences")
                          .Register(*registry)
                          .Add({});
    prefill_tokens_ = &prometheus::BuildCounter()
                           .Name("expertmesh_attention_prefill_tokens_total")
                           .Help("Prompt tokens actually computed by prefill")
                           .Register(*registry)
                           .Add({});
    generated_tokens_ = &prometheus::BuildCounter()
                             .Name("expertmesh_attention_generated_tokens_total")
                             .Help("Tokens sampled and streamed")
                             .Register(*registry)
                             .Add({});
    batch_tokens_ = &prometheus::BuildHistogram()
                         .Name("expertmesh_attention_batch_tokens")
                         .Help("Tokens per scheduler step (decode + prefill)")
                         .Register(*registry)
                         .Add({}, TokenBuckets());
    step_seconds_ = &prometheus::BuildHistogram()
                         .Name("expertmesh_attention_step_seconds")
                         .Help("Wall time of one scheduler step")
                         .Register(*registry)
                         .Add({}, SecondsBuckets());
    finished_ = &prometheus::BuildCounter()
                     .Name("expertmesh_attention_sequences_finished_total")
                     .Help("Sequences ended, by reason (stop, length, cancelled, error)")
                     .Register(*registry);
    if (options_.prefix_store != nullptr) {
      query_tokens_ = &prometheus::BuildCounter()
                           .Name("expertmesh_attention_prefix_cache_query_tokens_total")
                           .Help("Prompt tokens of sequences admitted with prefix reuse on")
                           .Register(*registry)
                           .Add({});
      hit_tokens_ = &prometheus::BuildCounter()
                         .Name("expertmesh_attention_prefix_cache_hit_tokens_total")
                         .Help("Prompt tokens loaded from the kv-store instead of prefilled")
                         .Register(*registry)
                         .Add({});
      fallback_tokens_ = &prometheus::BuildCounter()
                              .Name("expertmesh_attention_prefix_cache_fallback_tokens_total")
                              .Help("Prompt tokens the kv-store had but that were recomputed "
                                    "(a block failed to arrive or to apply)")
                              .Register(*registry)
                              .Add({});
      prefix_errors_ = &prometheus::BuildCounter()
                            .Name("expertmesh_attention_prefix_cache_errors_total")
                            .Help("Prefix reuse failures, by stage: lookup (LookupPrefix "
                                  "failed), get (a GetBlock failed), apply (a block did not "
                                  "apply), encode (a block could not be encoded)")
                            .Register(*registry);
      for (const char* stage : {"lookup", "get", "apply", "encode"}) {
        prefix_errors_->Add({{"stage", stage}});
      }
      lookup_seconds_ = &prometheus::BuildHistogram()
                             .Name("expertmesh_attention_prefix_lookup_seconds")
                             .Help("Admission prefix load: lookup, fetch and apply")
                             .Register(*registry)
                             .Add({}, SecondsBuckets());
    }
  }
  if (options_.prefix_store != nullptr) {
    fingerprint_ = options_.model_fingerprint != 0 ? options_.model_fingerprint
                                                   : state::ModelFingerprint(model_->config());
    for (int i = 0; i < std::max(1, options_.prefix_lookup_threads); ++i) {
      lookup_threads_.emplace_back([this] { LookupLoop(); });
    }
  }
  thread_ = std::thread([this] { Loop(); });
}

Scheduler::~Scheduler() { Stop(); }

int64_t Scheduler::EstimateStateBytes(int64_t tokens) const {
  const model::ModelConfig& c = model_->config();
  const int64_t d = c.head_dim;
  int64_t bytes = 0;
  for (int l = 0; l < c.NumBlocks(); ++l) {
    const int ratio = l < static_cast<int>(c.compress_ratios.size()) ? c.compress_ratios[l] : 0;
    bytes += std::min<int64_t>(tokens, c.sliding_window) * d * 4;
    if (ratio > 0) {
      bytes += tokens / ratio * d * 4 + 2 * ratio * 2 * d * 4;
      if (ratio == 4) bytes += tokens / 4 * c.index_head_dim * 4;
    }
  }
  return bytes;
}

absl::Status Scheduler::Submit(const v1::SequenceRequest& request,
                               std::shared_ptr<SequenceSink> sink) {
  const model::ModelConfig& c = model_->config();
  if (request.sequence_id().empty()) {
    return absl::InvalidArgumentError("sequence_id: must not be empty");
  }
  if (request.prompt_ids().empty()) {
    return absl::InvalidArgumentError("prompt_ids: must hold at least one token");
  }
  if (request.resumed_tokens() >= static_cast<uint32_t>(request.prompt_ids_size())) {
    return absl::InvalidArgumentError("resumed_tokens: must be less than the prompt_ids size");
  }
  for (int i = 0; i < request.prompt_ids_size(); ++i) {
    if (request.prompt_ids(i) >= static_cast<uint32_t>(c.vocab_size)) {
      return absl::InvalidArgumentError("prompt_ids[" + std::to_string(i) + "]: token id " +
                                        std::to_string(request.prompt_ids(i)) +
                                        " is out of range [0, " + std::to_string(c.vocab_size) +
                                        ")");
    }
  }
  const v1::SamplingParams& sp = request.sampling();
  if (!(sp.temperature() >= 0.0f) || !std::isfinite(sp.temperature())) {
    return absl::InvalidArgumentError("sampling.temperature: must be a finite number >= 0");
  }
  if (sp.top_p() < 0.0f || sp.top_p() > 1.0f || !std::isfinite(sp.top_p())) {
    return absl::InvalidArgumentError("sampling.top_p: must be in [0, 1] (0 means 1)");
  }
  if (static_cast<int>(sp.top_logprobs()) > options_.max_top_logprobs) {
    return absl::InvalidArgumentError("sampling.top_logprobs: at most " +
                                      std::to_string(options_.max_top_logprobs));
  }
  for (uint32_t id : sp.stop_token_ids()) {
    if (id >= static_cast<uint32_t>(c.vocab_size)) {
      return absl::InvalidArgumentError("sampling.stop_token_ids: token id " +
                                        std::to_string(id) + " is out of range");
    }
  }
  if (sp.max_thinking_tokens() > 0 &&
      sp.end_thinking_token_id() >= static_cast<uint32_t>(c.vocab_size)) {
    return absl::InvalidArgumentError("sampling.end_thinking_token_id: token id " +
                                      std::to_string(sp.end_thinking_token_id()) +
                                      " is out of range (required with max_thinking_tokens)");
  }
  auto s = std::make_unique<Seq>();
  s->id = request.sequence_id();
  s->sink = std::move(sink);
  s->prompt.assign(request.prompt_ids().begin(), request.prompt_ids().end());
  s->sampling.temperature = sp.temperature();
  s->sampling.top_p = sp.top_p() > 0.0f ? sp.top_p() : 1.0;
  s->sampling.top_k = static_cast<int>(sp.top_k());
  s->sampling.seed = sp.has_seed() ? sp.seed() : SystemSeed();
  s->stop_ids.insert(sp.stop_token_ids().begin(), sp.stop_token_ids().end());
  s->max_new = sp.max_new_tokens() > 0 ? sp.max_new_tokens() : options_.default_max_new_tokens;
  s->logprobs = sp.logprobs() || sp.top_logprobs() > 0;
  s->top_logprobs = static_cast<int>(sp.top_logprobs());
  s->max_thinking = sp.max_thinking_tokens();
  s->end_thinking = static_cast<int32_t>(sp.end_thinking_token_id());
  s->resumed = request.resumed_tokens();
  if (s->max_thinking > 0) {
    s->thinking_closed = std::find(s->prompt.end() - s->resumed, s->prompt.end(),
                                   s->end_thinking) != s->prompt.end();
  }
  s->reserved_bytes = EstimateStateBytes(static_cast<int64_t>(s->prompt.size()) + s->max_new);
  if (s->reserved_bytes > options_.state_memory_bytes) {
    return absl::ResourceExhaustedError(
        "prompt_ids: " + std::to_string(s->prompt.size()) + " prompt tokens + " +
        std::to_string(s->max_new) + " new tokens need about " +
        std::to_string(s->reserved_bytes) + " bytes of state, more than this worker's budget (" +
        std::to_string(options_.state_memory_bytes) + ")");
  }
  s->tenant = request.tenant();
  // The kv-store refuses longer tenants; such a sequence just runs without reuse.
  s->reuse = options_.prefix_store != nullptr && s->tenant.size() <= 120;
  std::shared_ptr<PrefixLoad> load;
  // Only blocks that end before the prompt's last token: that token must be computed for the
  // first logits.
  const int64_t usable = (static_cast<int64_t>(s->prompt.size()) - 1) / kBlockTokens;
  if (s->reuse && usable > 0) {
    load = std::make_shared<PrefixLoad>();
    load->tenant = s->tenant;
    load->tokens.assign(s->prompt.begin(), s->prompt.begin() + usable * kBlockTokens);
    load->hashes = state::BlockChainHashes(load->tenant, fingerprint_, load->tokens);
    s->load = load;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ || draining_.load()) {
      return absl::UnavailableError("attention worker is draining; retry on another worker");
    }
    if (by_id_.count(s->id) != 0) {
      return absl::AlreadyExistsError("sequence_id: " + s->id + " is already running");
    }
    by_id_[s->id] = s.get();
    queue_.push_back(std::move(s));
    if (load != nullptr) {
      lookups_.push_back(std::move(load));
      lookup_cv_.notify_one();
    }
    if (queued_gauge_) queued_gauge_->Set(static_cast<double>(queue_.size()));
  }
  cv_.notify_all();
  return absl::OkStatus();
}

bool Scheduler::Cancel(const std::string& sequence_id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = by_id_.find(sequence_id);
    if (it == by_id_.end() || it->second->cancelled.exchange(true)) return false;
  }
  cv_.notify_all();
  return true;
}

void Scheduler::Drain() {
  if (!draining_.exchange(true)) base::LogInfo("draining: no new sequences are admitted");
}

void Scheduler::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  lookup_cv_.notify_all();
  for (std::thread& t : lookup_threads_) {
    if (t.joinable()) t.join();
  }
  if (thread_.joinable()) thread_.join();
}

void Scheduler::LookupLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    lookup_cv_.wait(lock, [&] { return stop_ || !lookups_.empty(); });
    if (stop_) return;
    std::shared_ptr<PrefixLoad> load = std::move(lookups_.front());
    lookups_.pop_front();
    lock.unlock();
    LoadPrefix(*load);
    lock.lock();
    load->done = true;
    cv_.notify_all();
  }
}

// Runs on a lookup thread; fills load.state/blocks, which the step loop reads after `done`.
void Scheduler::LoadPrefix(PrefixLoad& load) {
  const auto t0 = std::chrono::steady_clock::now();
  PrefixFetch f = options_.prefix_store->FetchPrefix(load.tenant, load.hashes);
  auto count_error = [&](const char* stage, const absl::Status& st) {
    if (prefix_errors_) prefix_errors_->Add({{"stage", stage}}).Increment();
    base::LogWarning(std::string("prefix reuse: ") + stage + " failed, the tokens are "
                     "computed instead: " + st.ToString());
  };
  if (!f.lookup_status.ok()) count_error("lookup", f.lookup_status);
  if (!f.get_status.ok()) count_error("get", f.get_status);
  int64_t applied = 0;
  if (!f.blocks.empty()) {
    model::SequenceState st = model_->NewState();
    const model::ModelConfig& c = model_->config();
    for (size_t k = 0; k < f.blocks.size(); ++k) {
      std::span<const int32_t> expect(load.tokens.data() + k * kBlockTokens, kBlockTokens);
      absl::Status a = state::ApplyBlock(c, fingerprint_, f.blocks[k], &st, expect);
      if (!a.ok()) {
        count_error("apply", a);
        break;
      }
      ++applied;
    }
    if (applied > 0) load.state = std::move(st);
  }
  load.blocks = applied;
  if (fallback_tokens_ && f.matched_blocks > applied) {
    fallback_tokens_->Increment(static_cast<double>((f.matched_blocks - applied) * kBlockTokens));
  }
  if (lookup_seconds_) {
    lookup_seconds_->Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
}

bool Scheduler::Admissible(const Seq& s) const {
  return s.load == nullptr || s.load->done || s.cancelled.load();
}

void Scheduler::StoreBlock(Seq& s) {
  const int64_t k = s.fed / kBlockTokens - 1;
  std::vector<int32_t> tokens(kBlockTokens);
  for (int i = 0; i < kBlockTokens; ++i) tokens[i] = s.token_at(k * kBlockTokens + i);
  const uint64_t prev = k == 0 ? state::ChainSeed(s.tenant, fingerprint_) : s.chain;
  const uint64_t hash = state::NextChainHash(prev, tokens);
  auto block = state::EncodeBlock(model_->config(), fingerprint_, s.state,
                                  static_cast<uint32_t>(k), tokens);
  if (!block.ok()) {
    s.writing = false;
    if (prefix_errors_) prefix_errors_->Add({{"stage", "encode"}}).Increment();
    base::LogWarning("prefix reuse: block " + std::to_string(k) + " of " + s.id +
                     " not encoded; the sequence's later blocks are not stored: " +
                     block.status().ToString());
    return;
  }
  KvPut put;
  put.key = {s.tenant, hash, static_cast<uint32_t>((k + 1) * kBlockTokens)};
  if (k > 0) put.parent = KvBlockKey{s.tenant, prev, static_cast<uint32_t>(k * kBlockTokens)};
  put.sequence_id = s.id;
  put.data = std::move(*block);
  s.chain = hash;
  s.wrote = true;
  options_.prefix_store->PutAsync(std::move(put));
}

size_t Scheduler::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return running_.size();
}

size_t Scheduler::queued() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_.size();
}

void Scheduler::Status(v1::SequenceStatusResponse* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto add = [&](const Seq& s) {
    v1::SequenceStatus* st = out->add_sequences();
    st->set_sequence_id(s.id);
    st->set_phase(s.phase.load());
    st->set_prompt_tokens(static_cast<uint32_t>(s.prompt.size()));
    st->set_generated_tokens(s.generated_count.load());
  };
  for (const auto& s : running_) add(*s);
  for (const auto& s : queue_) add(*s);
  out->set_draining(draining_.load());
}

void Scheduler::Finish(Seq& s, absl::Status status, v1::FinishReason reason,
                       v1::SequenceTokens* last) {
  if (s.finished) return;
  s.finished = true;
  if (s.wrote) options_.prefix_store->DeleteSequenceAsync(s.tenant, s.id);
  s.phase = v1::SEQUENCE_PHASE_FINISHED;
  if (finished_ != nullptr) {
    const char* why = !status.ok()                           ? "error"
                      : reason == v1::FINISH_REASON_STOP      ? "stop"
                      : reason == v1::FINISH_REASON_LENGTH    ? "length"
                      : reason == v1::FINISH_REASON_CANCELLED ? "cancelled"
                                                              : "other";
    finished_->Add({{"reason", why}}).Increment();
  }
  if (status.ok()) {
    v1::SequenceTokens msg;
    if (last != nullptr) msg = std::move(*last);
    msg.set_sequence_id(s.id);
    msg.set_finish_reason(reason);
    s.sink->Send(std::move(msg));
  }
  s.sink->End(std::move(status));
}

void Scheduler::Loop() {
  // Sinks are only called with mu_ released (a sink may call back into Cancel).
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    // A queued sequence whose prefix lookup is still out does not wake the loop (its end
    // does).
    cv_.wait(lock, [&] {
      return stop_ || !running_.empty() ||
             std::any_of(queue_.begin(), queue_.end(),
                         [&](const std::unique_ptr<Seq>& q) { return Admissible(*q); });
    });
    if (stop_) break;
    // Finished and cancelled sequences leave at the step boundary, freeing their state.
    std::vector<std::unique_ptr<Seq>> leaving;
    auto take_ended = [&](auto& list) {
      for (auto it = list.begin(); it != list.end();) {
        if ((*it)->finished || (*it)->cancelled.load()) {
          if ((*it)->phase.load() != v1::SEQUENCE_PHASE_QUEUED) {
            reserved_bytes_ -= (*it)->reserved_bytes;
          }
          by_id_.erase((*it)->id);
          leaving.push_back(std::move(*it));
          it = list.erase(it);
        } else {
          ++it;
        }
      }
    };
    take_ended(running_);
    take_ended(queue_);
    // Admission: first come, first served, under the sequence cap and the memory budget;
    // a sequence whose prefix lookup is still out is passed over until it is back.
    for (auto it = queue_.begin(); it != queue_.end() && static_cast<int>(running_.size()) <
                                                             options_.max_running_sequences;) {
      if (!Admissible(**it)) {
        ++it;
        continue;
      }
      if (reserved_bytes_ + (*it)->reserved_bytes > options_.state_memory_bytes) break;
      std::unique_ptr<Seq> s = std::move(*it);
      it = queue_.erase(it);
      if (s->load != nullptr && s->load->blocks > 0) {
        s->state = std::move(s->load->state);
        s->fed = s->load->blocks * kBlockTokens;
        s->cached = s->fed;
        s->chain = s->load->hashes[s->load->blocks - 1];
      } else {
        s->state = model_->NewState();
      }
      s->load.reset();
      if (s->reuse && query_tokens_) {
        query_tokens_->Increment(static_cast<double>(s->prompt.size()));
        hit_tokens_->Increment(static_cast<double>(s->cached));
      }
      s->phase = v1::SEQUENCE_PHASE_PREFILL;
      reserved_bytes_ += s->reserved_bytes;
      if (prompt_tokens_) {
        prompt_tokens_->Increment(static_cast<double>(s->prompt.size() - s->resumed));
      }
      running_.push_back(std::move(s));
    }
    if (running_gauge_) running_gauge_->Set(static_cast<double>(running_.size()));
    if (queued_gauge_) queued_gauge_->Set(static_cast<double>(queue_.size()));
    std::vector<Seq*> batch;
    for (auto& s : running_) batch.push_back(s.get());
    lock.unlock();
    for (auto& s : leaving) {
      if (!s->finished) {
        v1::SequenceTokens last;
        Finish(*s, absl::OkStatus(), v1::FINISH_REASON_CANCELLED, &last);
      }
    }
    leaving.clear();
    if (!batch.empty()) RunStep(batch);
    lock.lock();
  }
  // Stopping: nothing more will run.
  std::vector<std::unique_ptr<Seq>> left;
  for (auto& s : running_) left.push_back(std::move(s));
  for (auto& s : queue_) left.push_back(std::move(s));
  running_.clear();
  queue_.clear();
  by_id_.clear();
  lock.unlock();
  for (auto& s : left) {
    Finish(*s, absl::UnavailableError("attention worker is stopping; retry the request"),
           v1::FINISH_REASON_UNSPECIFIED, nullptr);
  }
}

int Scheduler::MicroBatchesForNextStep() {
  if (options_.micro_batches > 0) return options_.micro_batches;
  // Auto: split while one-batch steps spend a large share waiting on the experts; while split,
  // probe with one batch every 64 steps to see whether that is still so.
  if (split_ && ++steps_since_probe_ >= 64) {
    steps_since_probe_ = 0;
    return 1;
  }
  return split_ ? 2 : 1;
}

void Scheduler::RecordStep(int micro_batches, double seconds, double expert_wait_seconds) {
  if (options_.micro_batches > 0 || micro_batches != 1 || seconds <= 0) return;
  wait_share_ = 0.8 * wait_share_ + 0.2 * (expert_wait_seconds / seconds);
  split_ = wait_share_ > options_.auto_split_wait_share;
}

void Scheduler::RunStep(std::vector<Seq*>& all) {
  const auto t0 = std::chrono::steady_clock::now();
  // Decode tokens first (latency), then prefill chunks in arrival order, within the budget.
  struct Planned {
    Seq* seq;
    std::vector<int32_t> tokens;
  };
  std::vector<Planned> plan;
  int64_t budget = options_.max_batch_tokens;
  for (Seq* s : all) {
    if (s->fed < static_cast<int64_t>(s->prompt.size())) continue;
    plan.push_back({s, {s->generated.back()}});
    --budget;
  }
  for (Seq* s : all) {
    const int64_t left = static_cast<int64_t>(s->prompt.size()) - s->fed;
    if (left <= 0) continue;
    if (budget <= 0 && !plan.empty()) break;
    int64_t take = std::max<int64_t>(1, std::min(left, budget));
    // Every block boundary must be seen: a block can only be encoded while the state is
    // exactly at its end.
    if (s->reuse) take = std::min<int64_t>(take, kBlockTokens - s->fed % kBlockTokens);
    plan.push_back({s, std::vector<int32_t>(s->prompt.begin() + s->fed,
                                            s->prompt.begin() + s->fed + take)});
    budget -= take;
  }
  int64_t batch_tokens = 0;
  for (const Planned& p : plan) batch_tokens += static_cast<int64_t>(p.tokens.size());

  // Micro-batches: contiguous groups of about equal token counts.
  const int groups =
      std::max(1, std::min<int>(MicroBatchesForNextStep(), static_cast<int>(plan.size())));
  const double wait0 = model_->expert_wait_seconds();
  if (options_.on_step_begin) options_.on_step_begin();
  std::vector<std::vector<size_t>> mb(groups);
  {
    int64_t acc = 0;
    for (size_t i = 0; i < plan.size(); ++i) {
      const int g = static_cast<int>(std::min<int64_t>(groups - 1, acc * groups / batch_tokens));
      mb[g].push_back(i);
      acc += static_cast<int64_t>(plan[i].tokens.size());
    }
  }
  struct Pass {
    std::vector<size_t> rows;  // plan indices
    std::unique_ptr<model::ForwardPass> pass;
    absl::Status status;
  };
  std::vector<Pass> passes;
  model::ForwardOptions fo;
  fo.isolate_expert_failures = true;
  if (options_.inject_attention_delay_us > 0) {
    const int64_t us = options_.inject_attention_delay_us;
    fo.before_block = [us](int, int64_t rows) {
      std::this_thread::sleep_for(std::chrono::microseconds(us * rows));
    };
  }
  for (auto& g : mb) {
    if (g.empty()) continue;
    Pass p;
    p.rows = g;
    std::vector<model::Segment> segs;
    for (size_t i : g) segs.push_back({&plan[i].seq->state, plan[i].tokens});
    auto begun = model_->BeginForward(segs, fo);
    if (begun.ok()) {
      p.pass = std::move(*begun);
    } else {
      p.status = begun.status();
    }
    passes.push_back(std::move(p));
  }
  // Ping-pong: each pass runs until it waits on remote experts, then the next one runs.
  bool more = true;
  while (more) {
    more = false;
    for (Pass& p : passes) {
      if (!p.status.ok() || !p.pass || p.pass->done()) continue;
      p.status = p.pass->Advance();
      if (p.status.ok() && !p.pass->done()) more = true;
    }
  }
  if (options_.on_step_end) options_.on_step_end();
  steps_.fetch_add(1);
  RecordStep(groups,
             std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
             model_->expert_wait_seconds() - wait0);
  if (steps_total_) steps_total_->Increment();
  if (batch_tokens_) batch_tokens_->Observe(static_cast<double>(batch_tokens));

  const int64_t V = model_->config().vocab_size;
  for (Pass& p : passes) {
    for (size_t j = 0; j < p.rows.size(); ++j) {
      Planned& pl = plan[p.rows[j]];
      Seq& s = *pl.seq;
      absl::Status st = p.status;
      if (st.ok() && !p.pass->segment_status()[j].ok()) st = p.pass->segment_status()[j];
      if (!st.ok()) {
        Finish(s, st, v1::FINISH_REASON_UNSPECIFIED, nullptr);
        continue;
      }
      const bool was_prefill = s.fed < static_cast<int64_t>(s.prompt.size());
      s.fed += static_cast<int64_t>(pl.tokens.size());
      if (was_prefill && prefill_tokens_) {
        prefill_tokens_->Increment(static_cast<double>(pl.tokens.size()));
      }
      if (s.reuse && s.writing && s.fed % kBlockTokens == 0) StoreBlock(s);
      if (s.fed < static_cast<int64_t>(s.prompt.size())) continue;  // prompt not done yet
      if (s.cancelled.load()) continue;  // freed at the next boundary
      s.phase = v1::SEQUENCE_PHASE_DECODE;
      absl::Span<const float> logits(p.pass->logits().data() + j * V, V);
      // The new token's absolute position keys its random draw.
      const int64_t position = s.fed;
      // At the thinking budget the end id is put in place of a draw. Draws are keyed by
      // position, not by a running stream, so every later token is sampled exactly as it
      // would be after that id had been drawn: the result stays deterministic and
      // independent of the batch.
      const bool force_end =
          s.max_thinking > 0 && !s.thinking_closed &&
          s.resumed + static_cast<int64_t>(s.generated.size()) >= s.max_thinking;
      const int32_t token =
          force_end ? s.end_thinking : engine::SampleToken(logits, s.sampling, 0, position);
      if (token == s.end_thinking) s.thinking_closed = true;
      s.generated.push_back(token);
      s.generated_count.store(static_cast<uint32_t>(s.generated.size()));
      if (generated_tokens_) generated_tokens_->Increment();
      v1::SequenceTokens msg;
      msg.set_sequence_id(s.id);
      msg.add_token_ids(static_cast<uint32_t>(token));
      if (s.logprobs) FillLogprob(logits, token, s.top_logprobs, msg.add_logprobs());
      if (!s.started) {
        s.started = true;
        msg.set_seed(s.sampling.seed);
        // Resumed tokens are not prompt (prompt_tokens above), so they are not cached prompt.
        msg.set_cached_prompt_tokens(static_cast<uint32_t>(
            std::min<int64_t>(s.cached, static_cast<int64_t>(s.prompt.size()) - s.resumed)));
        msg.set_prompt_tokens(static_cast<uint32_t>(s.prompt.size() - s.resumed));
      }
      if (s.stop_ids.count(token) != 0) {
        Finish(s, absl::OkStatus(), v1::FINISH_REASON_STOP, &msg);
      } else if (static_cast<int64_t>(s.generated.size()) >= s.max_new) {
        Finish(s, absl::OkStatus(), v1::FINISH_REASON_LENGTH, &msg);
      } else {
        s.sink->Send(std::move(msg));
      }
    }
  }
  if (step_seconds_) {
    step_seconds_->Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
}

}  // namespace expertmesh::attention_worker
