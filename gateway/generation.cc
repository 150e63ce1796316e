#include "gateway/generation.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "core/base/log.h"
#include "core/chat/encoder.h"
#include "core/chat/parser.h"
#include "core/rpc/channel.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "gateway/gateway_metrics.h"
#include "gateway/stop_matcher.h"
#include "grpcpp/grpcpp.h"
#include "nlohmann/json.hpp"

namespace expertmesh::gateway {
std::string Dump(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string NewId(std::string_view prefix) {
  static std::atomic<uint64_t> counter{0};
  thread_local std::mt19937_64 rng(std::random_device{}());
  return absl::StrFormat("%s%016x%04x", prefix, rng(), counter.fetch_add(1) & 0xffff);
}

HttpResponse ErrorResponse(const ApiError& e, bool anthropic) {
  HttpResponse r;
  r.status = e.status;
  r.body = anthropic ? e.ToAnthropicJson() : e.ToJson();
  r.headers = e.headers;
  return r;
}

ApiError Unavailable(const std::string& message) {
  ApiError e;
  e.status = 503;
  e.type = "server_error";
  e.code = "overloaded";
  e.message = message;
  e.headers = {{"Retry-After", "1"}};
  return e;
}

namespace {

using nlohmann::json;

// The answer for a Generate call that failed before any token.
ApiError FromGrpc(const grpc::Status& s, const std::string& address) {
  const std::string what = "attention worker " + address + ": " + s.error_message();
  switch (s.error_code()) {
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::UNAVAILABLE:
      return Unavailable("no attention worker can take the request now (" + what + ")");
    case grpc::StatusCode::INVALID_ARGUMENT:
      return InvalidField("", what);
    case grpc::StatusCode::DEADLINE_EXCEEDED: {
      ApiError e;
      e.status = 504;
      e.type = "server_error";
      e.code = "timeout";
      e.message = "generation timed out (" + what + ")";
      return e;
    }
    default: {
      ApiError e;
      e.status = 502;
      e.type = "server_error";
      e.message = "generation failed (" + what + ")";
      return e;
    }
  }
}

}  // namespace

// Why a callback call for the router pick rather than a blocking one: the pick is one loopback
// round trip (~70 us) when the router is healthy, but up to pick_timeout (2 s) when it is slow
// or gone. Start runs on an HTTP thread (one serves every connection with --http-threads 1) and
// later steps on gRPC's few callback threads; blocking either for that long would stall every
// other stream on it, so no step of a generation waits on the network.
//
// One generation: the router pick, the Generate stream (a ClientReadReactor) and the answer.
// Lives from Start until its last reaction (OnDone, or the pick's callback on an early end) and
// until the ticker/drain callers that hold a reference let go. `mu_` serializes everything that
// touches the sink, the decoder/parser and the read state: gRPC reactions, the writer's
// OnDrained/OnClientGone callbacks (HTTP threads), the idle ticker and Drain.
class Generation;

// One Generate call of a generation. A client reactor serves a single call and a failover makes
// another, so the calls are these small reactors that hand every reaction to their Generation
// (which owns the read buffer and the hold bookkeeping); each deletes itself when its call is
// done.
class Attempt final : public grpc::ClientReadReactor<v1::SequenceTokens> {
 public:
  explicit Attempt(std::shared_ptr<Generation> g) : g_(std::move(g)) {}
  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

 private:
  std::shared_ptr<Generation> g_;
};

// Failover (GenerationOptions.max_resubmits): a call that ended this way is resumed elsewhere.
// CANCELLED counts only when the gateway did not cancel it itself (callers check that first).
bool Retriable(const grpc::Status& s) {
  switch (s.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::CANCELLED:
      return true;
    case grpc::StatusCode::ABORTED:
      // The draining worker's hand-over (attention_worker.proto, DrainRequest).
      return absl::StartsWith(s.error_message(), "resubmit:");
    default:
      return false;
  }
}

class Generation final : public std::enable_shared_from_this<Generation> {
 public:
  Generation(Generator* core, GenerationInput input, std::string id,
             std::shared_ptr<ResponseWriter> writer, std::unique_ptr<GenerationSink> sink)
      : core_(core),
        input_(std::move(input)),
        id_(std::move(id)),
        writer_(std::move(writer)),
        sink_(std::move(sink)),
        stop_(input_.stop),
        parser_(ParserOptions(input_, id_)),
        start_(absl::Now()),
        last_activity_(start_) {}

  ~Generation() {
    if (GatewayMetrics* m = core_->options_.metrics) m->active_streams.Decrement();
    // What the answer holds (the sink, the writer — whose wrappers report the final status to
    // the HTTP API's metrics — and the key's lease) goes before the Generator and its owners are
    // told that this generation is over: they may be destroyed right after.
    sink_.reset();
    writer_.reset();
    input_.lease.reset();
    core_->Unregister(this);
  }

  // On Start's thread.
  void Run() {
    if (GatewayMetrics* m = core_->options_.metrics) m->active_streams.Increment();
    if (!core_->Register(this)) {
      FailEarly(Unavailable("the gateway is shutting down"));
      return;
    }
    std::vector<int32_t> ids;
    if (std::optional<ApiError> e = core_->PromptIds(input_, &ids)) {
      FailEarly(*e);
      return;
    }
    prompt_tokens_ = static_cast<uint32_t>(ids.size());
    uint32_t max_new = input_.max_tokens;
    const uint32_t context = core_->model_.context_length;
    if (context > 0) {
      if (prompt_tokens_ >= context) {
        FailEarly(InvalidField(input_.prompt_ids.empty() ? "messages" : "prompt",
                               "the prompt is " + std::to_string(prompt_tokens_) +
                                   " tokens; the model's context is " + std::to_string(context)));
        return;
      }
      // More than the context leaves is clamped rather than refused (agents send large values).
      const uint32_t left = context - prompt_tokens_;
      if (max_new == 0 || max_new > left) max_new = left;
    }
    decoder_.emplace(*core_->tokenizer_);
    if (!input_.assistant_prefix.empty() && !input_.raw_text) {
      prefix_delta_ = parser_.Feed(input_.assistant_prefix);
    }
    max_new_ = max_new;
    BuildRequest(ids, max_new);

    std::weak_ptr<Generation> weak = weak_from_this();
    writer_->OnClientGone([weak] {
      if (auto g = weak.lock()) g->OnClientGone();
    });
    self_ = shared_from_this();  // until the generation ends
    const GenerationOptions& o = core_->options_;
    if (!o.attention_worker.empty()) {
      StartGenerate(o.attention_worker);
      return;
    }
    if (o.router.empty()) {
      std::lock_guard<std::mutex> lock(mu_);
      FailLocked(Unavailable("the gateway has neither --router nor --attention-worker"));
      EndAndReleaseLocked();
      return;
    }
    router_stub_ = std::make_unique<v1::Router::Stub>(core_->Channel(o.router));
    pick_req_.set_tenant(input_.tenant);
    Pick();
  }

  // Asks the router for a worker (again after a failover).
  void Pick() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      pick_ctx_ = std::make_unique<grpc::ClientContext>();
      rpc::SetTimeout(*pick_ctx_, core_->options_.pick_timeout);
      pick_resp_.Clear();
      if (gone_ || aborted_) pick_ctx_->TryCancel();  // OnPicked ends it
    }
    router_stub_->async()->PickAttentionWorker(
        pick_ctx_.get(), &pick_req_, &pick_resp_,
        [self = shared_from_this()](grpc::Status s) { self->OnPicked(std::move(s)); });
  }

  // Drain's deadline passed: end with `error` (an error chunk/event once streaming).
  void Abort(const ApiError& error) {
    Attempt* release = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (ended_ || gone_ || aborted_) return;
      aborted_ = true;
      abort_error_ = error;
      StopReadingLocked();
      CancelCallsLocked();
      release = TakeHoldLocked();
    }
    if (release) release->RemoveHold();
  }

  // The ticker: GenerationSink::Idle when nothing arrived for idle_interval.
  void MaybeIdle(absl::Time now) {
    Attempt* release = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (ended_ || gone_ || aborted_ || !client_ok_ || finishing_) return;
      if (now - last_activity_ < core_->options_.idle_interval) return;
      last_activity_ = now;
      client_ok_ = sink_->Idle(prompt_tokens_);
      if (client_ok_) return;
      GoneLocked();
      release = TakeHoldLocked();
    }
    if (release) release->RemoveHold();
  }

  void OnReadDone(Attempt* call, bool ok) {
    Attempt* release = nullptr;
    bool read_again = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      reading_ = false;
      if (!ok) stop_reading_ = true;
      if (ok && !stop_reading_) {
        RememberForResume();
        Consume();
        if (stop_.stopped() || !client_ok_) {
          // A stop string (or a client that is gone): the worker frees the sequence.
          StopReadingLocked();
          ctx_->TryCancel();
        }
      }
      if (stop_reading_) {
        release = TakeHoldLocked();
      } else {
        // Backpressure: while the client's queue is over its limit no read is issued (the
        // worker's stream then stalls on gRPC flow control); OnDrained resumes.
        std::weak_ptr<Generation> weak = weak_from_this();
        paused_ = writer_->OnDrained([weak] {
          if (auto g = weak.lock()) g->OnDrained();
        });
        if (!paused_) read_again = reading_ = true;
      }
    }
    if (read_again) call->StartRead(&msg_);
    if (release) release->RemoveHold();
  }

  void OnCallDone(const grpc::Status& status) {
    bool resubmit = false;
    std::shared_ptr<Generation> keep;
    std::unique_ptr<GenerationSink> sink;
    std::shared_ptr<ResponseWriter> writer;
    std::shared_ptr<void> lease;
    {
      std::lock_guard<std::mutex> lock(mu_);
      call_done_ = true;
      call_ = nullptr;
      resubmit = ResubmitLocked(status);
    }
    if (resubmit) {
      Pick();  // the pick's callback holds the generation from here
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      Conclude(status);
      EndLocked();
      keep = std::move(self_);
      sink = std::move(sink_);
      writer = std::move(writer_);
      lease = std::move(input_.lease);
    }
    // The sink, writer and lease go outside mu_ (dropping the writer may answer 500).
  }

 private:
  static chat::ParseOptions ParserOptions(const GenerationInput& input, const std::string& id) {
    chat::ParseOptions popts;
    popts.thinking_mode = input.encode.thinking_mode;
    popts.id_seed = std::hash<std::string>()(id);
    return popts;
  }

  void BuildRequest(const std::vector<int32_t>& ids, uint32_t max_new) {
    seq_.set_sequence_id(id_);
    seq_.set_tenant(input_.tenant);
    seq_.mutable_prompt_ids()->Reserve(static_cast<int>(ids.size()));
    for (int32_t t : ids) seq_.add_prompt_ids(static_cast<uint32_t>(t));
    v1::SamplingParams* sp = seq_.mutable_sampling();
    sp->set_temperature(static_cast<float>(input_.temperature));
    sp->set_top_p(static_cast<float>(input_.top_p));
    sp->set_top_k(input_.top_k);
    if (input_.seed) sp->set_seed(*input_.seed);
    sp->set_max_new_tokens(max_new);
    if (core_->eos_id_) sp->add_stop_token_ids(static_cast<uint32_t>(*core_->eos_id_));
    if (input_.logprobs) {
      sp->set_logprobs(true);
      sp->set_top_logprobs(input_.top_logprobs);
    }
    // The budget means "thinking tokens": only a thinking-mode prompt has any.
    if (input_.max_thinking_tokens > 0 &&
        input_.encode.thinking_mode == chat::ThinkingMode::kThinking && core_->think_end_id_) {
      sp->set_max_thinking_tokens(input_.max_thinking_tokens);
      sp->set_end_thinking_token_id(static_cast<uint32_t>(*core_->think_end_id_));
    }
  }

  // Before any call: answer on the caller's thread.
  void FailEarly(const ApiError& e) {
    std::unique_ptr<GenerationSink> sink;
    std::shared_ptr<ResponseWriter> writer;
    std::shared_ptr<void> lease;
    {
      std::lock_guard<std::mutex> lock(mu_);
      FailLocked(e);
      EndLocked();
      sink = std::move(sink_);
      writer = std::move(writer_);
      lease = std::move(input_.lease);
    }
  }

  void OnPicked(grpc::Status s) {
    std::string address;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (gone_ || aborted_) {
        if (aborted_) FailLocked(abort_error_);
        EndAndReleaseLocked();
        return;
      }
      if (!s.ok() || pick_resp_.address().empty()) {
        if (failed_status_) {
          FailLocked(FromGrpc(*failed_status_, failed_address_));
        } else {
          FailLocked(Unavailable("no attention worker is available (router " +
                                 core_->options_.router + ": " +
                                 (s.ok() ? std::string("empty answer") : s.error_message()) +
                                 ")"));
        }
        EndAndReleaseLocked();
        return;
      }
      address = pick_resp_.address();
      if (failed_.count(address) != 0) {
        // The router may not know yet that the worker is gone (its lease still runs), or it is
        // the least loaded one that is draining: look for another.
        members_ctx_ = std::make_unique<grpc::ClientContext>();
        rpc::SetTimeout(*members_ctx_, core_->options_.pick_timeout);
        members_req_.set_kind(v1::WORKER_KIND_ATTENTION);
        address.clear();
      }
    }
    if (address.empty()) {
      router_stub_->async()->ListMembers(
          members_ctx_.get(), &members_req_, &members_resp_,
          [self = shared_from_this()](grpc::Status s) { self->OnMembers(std::move(s)); });
      return;
    }
    StartGenerate(address);
  }

  // After a failover whose pick named a worker that failed this generation: another live one,
  // or the first failure's answer.
  void OnMembers(grpc::Status s) {
    std::string address;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (gone_ || aborted_) {
        if (aborted_) FailLocked(abort_error_);
        EndAndReleaseLocked();
        return;
      }
      for (v1::MemberState want : {v1::MEMBER_STATE_ALIVE, v1::MEMBER_STATE_SUSPECT}) {
        for (const v1::Member& m : members_resp_.members()) {
          if (!s.ok() || !address.empty()) break;
          if (m.kind() == v1::WORKER_KIND_ATTENTION && m.state() == want &&
              failed_.count(m.address()) == 0) {
            address = m.address();
          }
        }
      }
      if (address.empty()) {
        FailLocked(FromGrpc(*failed_status_, failed_address_));
        EndAndReleaseLocked();
        return;
      }
    }
    StartGenerate(address);
  }

  // With mu_ held, on OnReadDone's message: what a resubmit needs (the ids streamed so far and
  // the seed the worker drew with).
  void RememberForResume() {
    for (uint32_t t : msg_.token_ids()) generated_.push_back(t);
    // A call's first message reports its seed; the first call that got that far drew with it.
    if (first_message_ && !seed_reported_) {
      seed_reported_ = true;
      seed_ = msg_.seed();
    }
    first_message_ = false;
  }

  // With mu_ held, when a call is done: true if the generation goes on on another worker (the
  // request is then ready for it and the caller must Pick).
  bool ResubmitLocked(const grpc::Status& status) {
    const GenerationOptions& o = core_->options_;
    if (status.ok() || !Retriable(status)) return false;
    // The gateway's own cancellations, and ends that are ends.
    if (gone_ || aborted_ || !client_ok_ || stop_.stopped()) return false;
    if (worker_finish_ != v1::FINISH_REASON_UNSPECIFIED) return false;
    if (o.router.empty() || !o.attention_worker.empty()) return false;  // nowhere else to go
    if (resubmits_ >= o.max_resubmits || absl::Now() >= start_ + o.generate_timeout) return false;
    const uint32_t done = static_cast<uint32_t>(generated_.size());
    if (max_new_ > 0 && done >= max_new_) return false;
    ++resubmits_;
    core_->resubmits_.fetch_add(1);
    if (o.metrics != nullptr) o.metrics->resubmits.Increment();
    failed_.insert(address_);
    failed_status_ = status;
    failed_address_ = address_;
    // Prompt + what was generated, the same seed, the budget left: the next worker's tokens are
    // the ones this one would have sent (attention_worker.proto, resumed_tokens).
    seq_.mutable_prompt_ids()->Truncate(static_cast<int>(prompt_tokens_));
    for (uint32_t t : generated_) seq_.add_prompt_ids(t);
    seq_.set_resumed_tokens(done);
    v1::SamplingParams* sp = seq_.mutable_sampling();
    if (max_new_ > 0) sp->set_max_new_tokens(max_new_ - done);
    if (!input_.seed && seed_reported_) sp->set_seed(seed_);
    base::LogInfo(absl::StrFormat(
        "generation %s: attention worker %s ended the stream after %u tokens (status %d: %s); "
        "resubmitting (%d of at most %d)",
        id_, address_, done, static_cast<int>(status.error_code()), status.error_message(),
        resubmits_, o.max_resubmits));
    return true;
  }

  // With mu_ held: cancels the router and worker calls in flight (their callbacks end it).
  void CancelCallsLocked() {
    if (pick_ctx_) pick_ctx_->TryCancel();
    if (members_ctx_) members_ctx_->TryCancel();
    if (ctx_) ctx_->TryCancel();
  }

  void StartGenerate(const std::string& address) {
    Attempt* call = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      address_ = address;
      if (gone_ || aborted_) {
        if (aborted_) FailLocked(abort_error_);
        EndAndReleaseLocked();
        return;
      }
      worker_stub_ = std::make_unique<v1::AttentionWorker::Stub>(core_->Channel(address));
      // One deadline for all the calls: resubmits do not extend it.
      ctx_ = std::make_unique<grpc::ClientContext>();
      ctx_->set_deadline(absl::ToChronoTime(start_ + core_->options_.generate_timeout));
      GatewayMetrics* m = core_->options_.metrics;
      if (m != nullptr && attempts_ == 0) {
        m->queue_time.Observe(absl::ToDoubleSeconds(absl::Now() - start_));
        m->prompt_tokens.Increment(prompt_tokens_);
      }
      ++attempts_;
      call_started_ = true;
      call_done_ = false;
      hold_ = true;
      reading_ = true;
      paused_ = false;
      stop_reading_ = false;
      first_message_ = true;
      call = call_ = new Attempt(shared_from_this());
    }
    worker_stub_->async()->Generate(ctx_.get(), &seq_, call);
    // The hold lets a read be started later from OnDrained (an HTTP thread): without it the call
    // could be done, and this reactor gone, while unread messages wait.
    call->AddHold();
    call->StartRead(&msg_);
    call->StartCall();
  }

  void OnDrained() {
    Attempt* call = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!paused_) return;
      paused_ = false;
      if (stop_reading_) return;  // the hold was released when reading stopped
      reading_ = true;
      call = call_;
    }
    call->StartRead(&msg_);
  }

  void OnClientGone() {
    Attempt* release = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (ended_ || gone_) return;
      GoneLocked();
      release = TakeHoldLocked();
    }
    if (release) release->RemoveHold();
  }

  // With mu_ held: the client is gone; nothing more reaches the sink.
  void GoneLocked() {
    if (gone_) return;
    gone_ = true;
    if (GatewayMetrics* m = core_->options_.metrics) m->client_disconnects.Increment();
    StopReadingLocked();
    CancelCallsLocked();
  }

  void StopReadingLocked() { stop_reading_ = true; }

  // With mu_ held: the call whose hold the caller must remove (after unlocking) when reading has
  // stopped and no read is in flight, else null.
  Attempt* TakeHoldLocked() {
    if (!hold_ || reading_ || !stop_reading_) return nullptr;
    hold_ = false;
    return call_;
  }

  void Emit(const chat::StreamDelta& d) {
    if (d.empty() || !client_ok_ || gone_) return;
    client_ok_ = sink_->Delta(d);
  }

  // With mu_ held: one SequenceTokens message.
  void Consume() {
    const absl::Time now = absl::Now();
    last_activity_ = now;
    GatewayMetrics* m = core_->options_.metrics;
    if (msg_.token_ids_size() > 0) {
      if (completion_tokens_ == 0) {
        first_token_ = now;
        if (m != nullptr) m->time_to_first_token.Observe(absl::ToDoubleSeconds(now - start_));
      }
      last_token_ = now;
    }
    if (!begun_) {
      begun_ = true;
      cached_prompt_tokens_ = std::min(msg_.cached_prompt_tokens(), prompt_tokens_);
      client_ok_ = sink_->Begin(prompt_tokens_, cached_prompt_tokens_);
      Emit(prefix_delta_);
    }
    if (input_.logprobs && msg_.logprobs_size() > 0 && client_ok_) {
      std::vector<GeneratedToken> tokens;
      tokens.reserve(msg_.logprobs_size());
      for (const v1::TokenLogprob& lp : msg_.logprobs()) {
        GeneratedToken t;
        t.id = static_cast<int32_t>(lp.token_id());
        t.bytes = std::string(core_->tokenizer_->TokenBytes(t.id));
        t.logprob = lp.logprob();
        for (const v1::TopLogprob& alt : lp.top()) {
          t.top.emplace_back(
              std::string(core_->tokenizer_->TokenBytes(static_cast<int32_t>(alt.token_id()))),
              alt.logprob());
        }
        tokens.push_back(std::move(t));
      }
      client_ok_ = sink_->Tokens(tokens);
    }
    std::string text;
    uint32_t counted = 0;
    for (uint32_t t : msg_.token_ids()) {
      // The worker may send the stop id it ended on (the scheduler does): it is the end of the
      // turn, not text, and not generated output (the parser gets EOS at the end instead).
      if (core_->eos_id_ && t == static_cast<uint32_t>(*core_->eos_id_)) continue;
      ++counted;
      ++completion_tokens_;
      text.clear();
      decoder_->Add(static_cast<int32_t>(t), &text);
      FeedText(stop_.Feed(text));
      if (stop_.stopped()) break;
    }
    if (m != nullptr && counted > 0) m->generation_tokens.Increment(counted);
    if (msg_.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) worker_finish_ = msg_.finish_reason();
  }

  // Text past the stop matcher: to the parser, or as it is for a plain completion.
  void FeedText(const std::string& safe) {
    if (safe.empty()) return;
    if (input_.raw_text) {
      raw_message_.content += safe;
      chat::StreamDelta d;
      d.content = safe;
      Emit(d);
      return;
    }
    Emit(parser_.Feed(safe));
  }

  // With mu_ held, in OnDone: the one Fail or Finish (or nothing for a client that left).
  void Conclude(const grpc::Status& status) {
    if (gone_ || !client_ok_) return;  // nobody to answer; the sequence is freed
    if (aborted_) {
      FailLocked(abort_error_);
      return;
    }
    if (!stop_.stopped() && !status.ok()) {
      FailLocked(FromGrpc(status, address_));
      return;
    }
    finishing_ = true;
    // The end of the text: held bytes, then (on the model's own end) EOS, so the parser settles.
    if (!stop_.stopped()) {
      std::string tail = stop_.Feed(decoder_->Flush());
      tail += stop_.Flush();
      FeedText(tail);
    }
    if (!input_.raw_text) {
      if (!stop_.stopped() && worker_finish_ == v1::FINISH_REASON_STOP) {
        Emit(parser_.Feed(chat::kEos));
      }
      Emit(parser_.Finish());
    }
    if (!client_ok_ || gone_) return;
    GenerationOutcome outcome;
    outcome.prompt_tokens = prompt_tokens_;
    outcome.cached_prompt_tokens = cached_prompt_tokens_;
    outcome.completion_tokens = completion_tokens_;
    outcome.stopped_by_string = stop_.stopped();
    outcome.stop_sequence = stop_.matched();
    outcome.length = !stop_.stopped() && worker_finish_ == v1::FINISH_REASON_LENGTH;
    outcome.message = input_.raw_text ? &raw_message_ : &parser_.message();
    sink_->Finish(outcome);
  }

  void FailLocked(const ApiError& e) {
    if (gone_ || sink_ == nullptr) return;
    sink_->Fail(e);
  }

  // With mu_ held: the generation is over; latencies are recorded.
  void EndLocked() {
    if (ended_) return;
    ended_ = true;
    if (GatewayMetrics* m = core_->options_.metrics) {
      const absl::Time now = absl::Now();
      m->request_duration.Observe(absl::ToDoubleSeconds(now - start_));
      if (completion_tokens_ > 1) {
        m->time_per_output_token.Observe(absl::ToDoubleSeconds(last_token_ - first_token_) /
                                         (completion_tokens_ - 1));
      }
    }
  }

  // With mu_ held, for an end before the Generate call. The caller's own reference (Start's or
  // the pick callback's) keeps this alive until it returns; the sink, writer and lease go with
  // the destructor, right after.
  void EndAndReleaseLocked() {
    EndLocked();
    self_.reset();
  }

  Generator* const core_;
  GenerationInput input_;
  const std::string id_;
  std::shared_ptr<ResponseWriter> writer_;
  std::unique_ptr<GenerationSink> sink_;

  std::mutex mu_;
  StopMatcher stop_;
  chat::StreamParser parser_;
  std::optional<tokenizer::StreamDecoder> decoder_;
  chat::ParsedMessage raw_message_;  // raw_text: the whole text
  chat::StreamDelta prefix_delta_;   // what assistant_prefix parsed into, sent after Begin
  const absl::Time start_;
  absl::Time last_activity_;
  absl::Time first_token_;
  absl::Time last_token_;
  uint32_t prompt_tokens_ = 0;
  uint32_t cached_prompt_tokens_ = 0;
  uint32_t completion_tokens_ = 0;
  v1::FinishReason worker_finish_ = v1::FINISH_REASON_UNSPECIFIED;
  std::string address_;

  std::shared_ptr<Generation> self_;
  std::unique_ptr<v1::Router::Stub> router_stub_;
  // A context serves one call: each pick and each Generate call (attempt) gets a new one.
  std::unique_ptr<grpc::ClientContext> pick_ctx_;
  v1::PickAttentionWorkerRequest pick_req_;
  v1::PickAttentionWorkerResponse pick_resp_;
  std::unique_ptr<grpc::ClientContext> members_ctx_;
  v1::ListMembersRequest members_req_;
  v1::ListMembersResponse members_resp_;
  std::unique_ptr<v1::AttentionWorker::Stub> worker_stub_;
  std::unique_ptr<grpc::ClientContext> ctx_;
  v1::SequenceRequest seq_;
  v1::SequenceTokens msg_;
  Attempt* call_ = nullptr;  // the Generate call in flight (it deletes itself when done)

  // Failover.
  uint32_t max_new_ = 0;            // the first request's max_new_tokens
  std::vector<uint32_t> generated_;  // every id the workers streamed, in order
  bool seed_reported_ = false;
  bool first_message_ = false;  // the next message is the call's first
  uint64_t seed_ = 0;  // the seed the first worker drew with
  int attempts_ = 0;   // Generate calls started
  int resubmits_ = 0;
  std::set<std::string> failed_;  // workers whose call failed retriably
  std::optional<grpc::Status> failed_status_;
  std::string failed_address_;

  bool call_started_ = false;
  bool call_done_ = false;
  bool hold_ = false;          // our hold on the call (released once reading has stopped)
  bool reading_ = false;       // a StartRead is in flight
  bool paused_ = false;        // waiting for OnDrained
  bool stop_reading_ = false;  // no more reads: the end, a stop string, cancellation
  bool begun_ = false;
  bool client_ok_ = true;
  bool gone_ = false;
  bool aborted_ = false;
  bool finishing_ = false;
  bool ended_ = false;
  ApiError abort_error_;
};

void Attempt::OnReadDone(bool ok) { g_->OnReadDone(this, ok); }

void Attempt::OnDone(const grpc::Status& status) {
  std::shared_ptr<Generation> g = std::move(g_);
  g->OnCallDone(status);
  delete this;
}

Generator::Generator(ModelInfo model, const tokenizer::Tokenizer* tokenizer,
                     GenerationOptions options)
    : model_(std::move(model)), tokenizer_(tokenizer), options_(std::move(options)) {
  if (tokenizer_ != nullptr) {
    eos_id_ = tokenizer_->TokenToId(chat::kEos);
    think_end_id_ = tokenizer_->TokenToId(chat::kThinkEnd);
  }
  ticker_ = std::thread([this] { Tick(); });
}

Generator::~Generator() {
  WaitIdle();
  std::unique_lock<std::mutex> lock(mu_);
  stopping_ = true;
  lock.unlock();
  tick_.notify_all();
  ticker_.join();
}

std::shared_ptr<grpc::Channel> Generator::Channel(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& c = channels_[address];
  if (c == nullptr) c = rpc::MakeChannel(address);
  return c;
}

bool Generator::Register(Generation* g) {
  std::lock_guard<std::mutex> lock(mu_);
  live_.insert(g);  // counted even when refused: its destructor unregisters
  return !draining_;
}

void Generator::Unregister(Generation* g) {
  std::lock_guard<std::mutex> lock(mu_);
  live_.erase(g);
  if (live_.empty()) idle_.notify_all();
}

bool Generator::draining() const {
  std::lock_guard<std::mutex> lock(mu_);
  return draining_;
}

void Generator::WaitIdle() const {
  std::unique_lock<std::mutex> lock(mu_);
  idle_.wait(lock, [this] { return live_.empty(); });
}

size_t Generator::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return live_.size();
}

// The live generations that can still be reached (one being destroyed cannot).
static std::vector<std::shared_ptr<Generation>> Reachable(const std::set<Generation*>& live) {
  std::vector<std::shared_ptr<Generation>> out;
  out.reserve(live.size());
  for (Generation* g : live) {
    if (auto p = g->weak_from_this().lock()) out.push_back(std::move(p));
  }
  return out;
}

void Generator::Tick() {
  // A quarter of the interval: an Idle comes between 1 and 1.25 intervals after the last token.
  const absl::Duration period = std::max(options_.idle_interval / 4, absl::Milliseconds(5));
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    tick_.wait_for(lock, absl::ToChronoNanoseconds(period), [this] { return stopping_; });
    if (stopping_) break;
    std::vector<std::shared_ptr<Generation>> live = Reachable(live_);
    lock.unlock();
    const absl::Time now = absl::Now();
    for (auto& g : live) g->MaybeIdle(now);
    live.clear();  // a generation may end here: its destructor takes mu_
    lock.lock();
  }
}

void Generator::Drain(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  draining_ = true;
  idle_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [this] { return live_.empty(); });
  if (live_.empty()) return;
  std::vector<std::shared_ptr<Generation>> live = Reachable(live_);
  lock.unlock();
  ApiError e = Unavailable("the gateway is shutting down: the generation was cancelled after "
                           "the drain deadline");
  for (auto& g : live) g->Abort(e);
  live.clear();
  lock.lock();
  // Cancelled calls end within a round trip; the bound only guards against a stuck peer.
  idle_.wait_for(lock, std::chrono::seconds(10), [this] { return live_.empty(); });
}

void Generator::Start(GenerationInput input, std::string id,
                      std::shared_ptr<ResponseWriter> writer,
                      std::unique_ptr<GenerationSink> sink) {
  auto g = std::make_shared<Generation>(this, std::move(input), std::move(id), std::move(writer),
                                        std::move(sink));
  g->Run();
}


std::optional<ApiError> Generator::PromptIds(const GenerationInput& input,
                                                   std::vector<int32_t>* ids) const {
  if (tokenizer_ == nullptr) return Unavailable("the gateway has no tokenizer loaded");
  if (!input.prompt_ids.empty()) {
    *ids = input.prompt_ids;
  } else {
    absl::StatusOr<chat::EncodedChat> encoded = chat::EncodeChat(input.messages, input.encode);
    if (!encoded.ok()) return InvalidField("messages", std::string(encoded.status().message()));
    absl::StatusOr<std::vector<int32_t>> tokens = chat::ChatIds(*encoded, *tokenizer_);
    if (!tokens.ok()) {
      ApiError e = Unavailable("the tokenizer cannot encode the chat: " +
                               std::string(tokens.status().message()));
      e.status = 500;
      e.headers.clear();
      return e;
    }
    *ids = std::move(*tokens);
  }
  // The prefix is gateway text standing for generated output: added-token strings in it are
  // the tokens the model would have produced.
  if (!input.assistant_prefix.empty()) {
    tokenizer_->EncodeAppend(input.assistant_prefix, /*match_added_tokens=*/true, ids);
  }
  return std::nullopt;
}

}  // namespace expertmesh::gateway
