#include "tests/testing/scripted_attention_worker.h"

#include <algorithm>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"

namespace expertmesh::testing {

namespace v1 = expertmesh::v1;

// Wakes calls that wait (for their gate or their next interval slot) at a time, or at once on
// Notify. One thread for all calls; a call is held weakly, so a call that ended is skipped.
class ScriptedAttentionWorker::Timer {
 public:
  Timer() : thread_([this] { Loop(); }) {}
  ~Timer() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void At(absl::Time when, std::weak_ptr<Call> call) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.emplace(when, std::move(call));
    }
    cv_.notify_all();
  }
  void WakeAll() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      wake_all_ = true;
    }
    cv_.notify_all();
  }

 private:
  void Loop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::multimap<absl::Time, std::weak_ptr<Call>> queue_;
  bool wake_all_ = false;
  bool stop_ = false;
  std::thread thread_;  // last: starts after the state above exists
};

// One Generate call: the messages planned from the script, sent one write at a time. The
// decision what to do next is taken under `mu`; the gRPC call (StartWrite / Finish) is made
// after releasing it, as a reaction may run on another thread at once.
struct ScriptedAttentionWorker::Call final : public grpc::ServerWriteReactor<v1::SequenceTokens> {
  Call(ScriptedAttentionWorker* owner, const v1::SequenceRequest& request, ScriptedReply reply)
      : owner(owner), id(request.sequence_id()), prompt_tokens(request.prompt_ids_size()) {
    Plan(request, std::move(reply));
  }

  void Plan(const v1::SequenceRequest& request, ScriptedReply reply) {
    const auto& stops = request.sampling().stop_token_ids();
    const uint32_t max_new = request.sampling().max_new_tokens();
    auto new_message = [&] {
      v1::SequenceTokens m;
      m.set_sequence_id(id);
      if (messages.empty()) {
        m.set_prompt_tokens(static_cast<uint32_t>(request.prompt_ids_size()));
        m.set_cached_prompt_tokens(reply.cached_prompt_tokens);
        m.set_seed(reply.seed != 0 ? reply.seed : request.sampling().seed());
      }
      return m;
    };
    bool ended = false;
    for (size_t i = 0; i < reply.token_ids.size() && !ended; ++i) {
      const uint32_t t = reply.token_ids[i];
      v1::SequenceTokens m = new_message();
      if (std::find(stops.begin(), stops.end(), t) != stops.end()) {
        if (owner->options_.stop_id_mode == StopIdMode::kSendStopId) m.add_token_ids(t);
        m.set_finish_reason(v1::FINISH_REASON_STOP);
        ended = true;
      } else {
        m.add_token_ids(t);
        if (max_new > 0 && i + 1 >= max_new) {
          m.set_finish_reason(v1::FINISH_REASON_LENGTH);
          ended = true;
        }
      }
      messages.push_back(std::move(m));
    }
    if (!ended) {
      if (messages.empty()) messages.push_back(new_message());
      messages.back().set_finish_reason(reply.finish);
    }
    if (reply.fail) {
      if (reply.fail_after < messages.size()) messages.resize(reply.fail_after);
      end_status = *reply.fail;
    }
  }

  void Start() { Advance(); }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(mu);
      writing = false;
      if (!ok) {
        cancelled = true;  // the client is gone: the stream cannot take more
      } else {
        ++next;
        last_write = absl::Now();
        owner->tokens_sent_.fetch_add(1, std::memory_order_relaxed);
      }
    }
    Advance();
  }

  void OnCancel() override {
    {
      std::lock_guard<std::mutex> lock(mu);
      cancelled = true;
    }
    Advance();
  }

  void OnDone() override {
    bool was_cancelled;
    std::shared_ptr<Call> last;  // may free this when it goes: nothing may follow it
    {
      std::lock_guard<std::mutex> lock(mu);
      was_cancelled = cancelled;
      last = std::move(self);
    }
    {
      std::lock_guard<std::mutex> lock(owner->mu_);
      owner->calls_.erase(this);
      if (was_cancelled) ++owner->cancelled_calls_;
    }
    owner->changed_.notify_all();
  }

  // Cancel RPC.
  void CancelFromRpc() {
    {
      std::lock_guard<std::mutex> lock(mu);
      cancelled = true;
    }
    Advance();
  }

  size_t sent() {
    std::lock_guard<std::mutex> lock(mu);
    return next;
  }

  // Takes the next step if it can: a write, a wait, or the end of the call.
  void Advance() {
    enum { kNothing, kWrite, kFinish, kWait } action = kNothing;
    grpc::Status finish_status;
    absl::Time wake;
    std::string gate_failure;
    std::weak_ptr<Call> me;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (writing || finished) return;
      const absl::Time now = absl::Now();
      const bool more = next < messages.size();
      // Whether the next step (a message, or a scripted failure after some) must wait.
      const bool gated_step = next > 0 && (more || !end_status.ok());
      bool ready = true;
      if (cancelled) {
        finish_status = grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled");
        action = kFinish;
      } else if (gated_step && more && owner->options_.inter_token_interval > absl::ZeroDuration() &&
                 now < last_write + owner->options_.inter_token_interval) {
        ready = false;
        wake = last_write + owner->options_.inter_token_interval;
      } else if (gated_step && owner->options_.gate) {
        if (gate_wait_for != next) {
          gate_wait_for = next;
          gate_wait_since = now;
        }
        if (!owner->options_.gate(GatePoint{id, next})) {
          ready = false;
          if (now - gate_wait_since > owner->options_.gate_timeout) {
            gate_failure = absl::StrCat("seq ", id, ": gate closed for ",
                                        absl::FormatDuration(now - gate_wait_since), " after ",
                                        next, " messages");
            finish_status = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                         "scripted attention worker: " + gate_failure);
            action = kFinish;
          } else {
            wake = now + owner->options_.gate_poll;
          }
        }
      }
      if (action == kNothing) {
        if (!ready) {
          action = kWait;
          me = self;
        } else if (more) {
          action = kWrite;
          writing = true;
        } else {
          action = kFinish;
          finish_status = end_status;
        }
      }
      if (action == kFinish) finished = true;
    }
    switch (action) {
      case kWrite:
        StartWrite(&messages[next_unlocked()]);
        break;
      case kFinish:
        if (!gate_failure.empty()) {
          std::lock_guard<std::mutex> lock(owner->mu_);
          owner->gate_failures_.push_back(gate_failure);
        }
        Finish(finish_status);
        break;
      case kWait:
        owner->timer_->At(wake, std::move(me));
        break;
      case kNothing:
        break;
    }
  }

  // `next` is only advanced in OnWriteDone, which cannot run before this write starts.
  size_t next_unlocked() {
    std::lock_guard<std::mutex> lock(mu);
    return next;
  }

  ScriptedAttentionWorker* const owner;
  const std::string id;
  const int prompt_tokens;
  std::vector<v1::SequenceTokens> messages;
  grpc::Status end_status = grpc::Status::OK;
  std::shared_ptr<Call> self;  // the call owns itself until OnDone

  std::mutex mu;
  size_t next = 0;  // messages written
  bool writing = false;
  bool finished = false;
  bool cancelled = false;
  absl::Time last_write = absl::InfinitePast();
  size_t gate_wait_for = static_cast<size_t>(-1);
  absl::Time gate_wait_since;
};

void ScriptedAttentionWorker::Timer::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    const absl::Time now = absl::Now();
    std::vector<std::weak_ptr<Call>> due;
    if (wake_all_) {
      wake_all_ = false;
      for (auto& [when, call] : queue_) due.push_back(std::move(call));
      queue_.clear();
    } else {
      auto end = queue_.upper_bound(now);
      for (auto it = queue_.begin(); it != end; ++it) due.push_back(std::move(it->second));
      queue_.erase(queue_.begin(), end);
    }
    if (due.empty()) {
      if (queue_.empty()) {
        cv_.wait(lock);
      } else {
        cv_.wait_for(lock, absl::ToChronoNanoseconds(queue_.begin()->first - now));
      }
      continue;
    }
    lock.unlock();
    for (auto& weak : due) {
      if (std::shared_ptr<Call> call = weak.lock()) call->Advance();
    }
    lock.lock();
  }
}

class ScriptedAttentionWorker::Service final : public v1::AttentionWorker::CallbackService {
 public:
  explicit Service(ScriptedAttentionWorker* owner) : owner_(owner) {}

  grpc::ServerWriteReactor<v1::SequenceTokens>* Generate(
      grpc::CallbackServerContext*, const v1::SequenceRequest* request) override {
    ScriptedReply reply;
    grpc::Status refuse;
    {
      std::lock_guard<std::mutex> lock(owner_->mu_);
      ++owner_->generate_calls_;
      owner_->requests_.push_back(*request);
      if (owner_->requests_.size() > owner_->options_.max_recorded_requests) {
        owner_->requests_.erase(owner_->requests_.begin());
        ++owner_->dropped_requests_;
      }
      if (owner_->draining_) {
        refuse = grpc::Status(grpc::StatusCode::UNAVAILABLE, "scripted attention worker: draining");
      } else if (owner_->options_.max_active > 0 &&
                 static_cast<int>(owner_->calls_.size()) >= owner_->options_.max_active) {
        refuse = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                              "scripted attention worker: max_active sequences running");
      }
    }
    if (refuse.ok()) {
      reply = owner_->options_.script(*request);
    } else {
      reply.fail = refuse;
      reply.fail_after = 0;
    }
    auto call = std::make_shared<Call>(owner_, *request, std::move(reply));
    call->self = call;
    {
      std::lock_guard<std::mutex> lock(owner_->mu_);
      owner_->calls_[call.get()] = call;
    }
    owner_->changed_.notify_all();
    call->Start();
    return call.get();
  }

  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* context,
                                   const v1::CancelRequest* request,
                                   v1::CancelResponse* response) override {
    std::vector<std::shared_ptr<Call>> hits;
    {
      std::lock_guard<std::mutex> lock(owner_->mu_);
      for (auto& [ptr, weak] : owner_->calls_) {
        if (ptr->id != request->sequence_id()) continue;
        if (auto c = weak.lock()) hits.push_back(std::move(c));
      }
    }
    for (auto& c : hits) c->CancelFromRpc();
    response->set_found(!hits.empty());
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* Drain(grpc::CallbackServerContext* context, const v1::DrainRequest*,
                                  v1::DrainResponse* response) override {
    {
      std::lock_guard<std::mutex> lock(owner_->mu_);
      owner_->draining_ = true;
      response->set_remaining_sequences(static_cast<uint32_t>(owner_->calls_.size()));
    }
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* GetSequenceStatus(grpc::CallbackServerContext* context,
                                              const v1::SequenceStatusRequest* request,
                                              v1::SequenceStatusResponse* response) override {
    std::vector<std::shared_ptr<Call>> calls;
    {
      std::lock_guard<std::mutex> lock(owner_->mu_);
      response->set_draining(owner_->draining_);
      for (auto& [ptr, weak] : owner_->calls_) {
        if (auto c = weak.lock()) calls.push_back(std::move(c));
      }
    }
    for (auto& c : calls) {
      const auto& want = request->sequence_ids();
      if (!want.empty() && std::find(want.begin(), want.end(), c->id) == want.end()) continue;
      v1::SequenceStatus* s = response->add_sequences();
      s->set_sequence_id(c->id);
      s->set_phase(v1::SEQUENCE_PHASE_DECODE);
      s->set_prompt_tokens(static_cast<uint32_t>(c->prompt_tokens));
      s->set_generated_tokens(static_cast<uint32_t>(c->sent()));
    }
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  ScriptedAttentionWorker* const owner_;
};

ScriptedAttentionWorker::ScriptedAttentionWorker(ScriptedWorkerOptions options)
    : options_(std::move(options)),
      timer_(std::make_unique<Timer>()),
      service_(std::make_unique<Service>(this)) {}

absl::StatusOr<std::unique_ptr<ScriptedAttentionWorker>> ScriptedAttentionWorker::Start(
    ScriptedWorkerOptions options) {
  if (!options.script) return absl::InvalidArgumentError("options.script: required");
  std::unique_ptr<ScriptedAttentionWorker> w(new ScriptedAttentionWorker(std::move(options)));
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &w->port_);
  builder.RegisterService(w->service_.get());
  w->server_ = builder.BuildAndStart();
  if (w->server_ == nullptr || w->port_ == 0) {
    return absl::UnavailableError("scripted attention worker: cannot serve on 127.0.0.1:0");
  }
  return w;
}

ScriptedAttentionWorker::~ScriptedAttentionWorker() {
  if (server_ != nullptr) {
    // Running calls are cancelled (OnCancel finishes them); the timer still runs meanwhile.
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    server_->Wait();
  }
  WaitForActive(0, absl::Seconds(5));
  timer_.reset();
}

std::string ScriptedAttentionWorker::address() const { return absl::StrCat("127.0.0.1:", port_); }
int ScriptedAttentionWorker::port() const { return port_; }

std::vector<v1::SequenceRequest> ScriptedAttentionWorker::requests() const {
  std::lock_guard<std::mutex> lock(mu_);
  return requests_;
}

size_t ScriptedAttentionWorker::generate_calls() const {
  std::lock_guard<std::mutex> lock(mu_);
  return generate_calls_;
}

int ScriptedAttentionWorker::active() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(calls_.size());
}

int ScriptedAttentionWorker::WaitForActive(int n, absl::Duration timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                    [&] { return static_cast<int>(calls_.size()) == n; });
  return static_cast<int>(calls_.size());
}

size_t ScriptedAttentionWorker::cancelled_calls() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cancelled_calls_;
}

std::vector<std::string> ScriptedAttentionWorker::gate_failures() const {
  std::lock_guard<std::mutex> lock(mu_);
  return gate_failures_;
}

void ScriptedAttentionWorker::Notify() { timer_->WakeAll(); }

}  // namespace expertmesh::testing
