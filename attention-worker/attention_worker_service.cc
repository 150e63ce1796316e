#include "attention-worker/attention_worker_service.h"

#include <chrono>
#include <deque>
#include <memory>
#include <mutex>

#include "core/base/log.h"
#include "core/rpc/reactors.h"
#include "core/rpc/status.h"

namespace expertmesh::attention_worker {
namespace {

namespace v1 = expertmesh::v1;

// The write side of one Generate call. The scheduler pushes messages from its thread; the
// reactor writes them one at a time. Lives until both the RPC is done and the scheduler has
// ended the sequence (shared ownership between the reactor and the scheduler's sink).
class GenerateStream final : public SequenceSink {
 public:
  class Reactor;

  void Send(v1::SequenceTokens message) override {
    std::unique_lock<std::mutex> lock(mu_);
    // After a hand-over's End nothing more may be streamed: the gateway resumes after the last
    // token it received, and the next worker produces the rest again.
    if (reactor_ == nullptr || end_requested_) return;
    queue_.push_back(std::move(message));
    StartNextLocked(lock);
  }

  void End(absl::Status status) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (reactor_ == nullptr || end_requested_) return;
    end_requested_ = true;
    end_status_ = rpc::ToGrpcStatus(status);
    StartNextLocked(lock);
  }

  // Called with the lock held; releases it around the gRPC call.
  void StartNextLocked(std::unique_lock<std::mutex>& lock);
  void OnWriteDone(bool ok);
  void Detach() {
    std::lock_guard<std::mutex> lock(mu_);
    reactor_ = nullptr;
  }

  std::mutex mu_;
  Reactor* reactor_ = nullptr;
  std::deque<v1::SequenceTokens> queue_;
  v1::SequenceTokens current_;
  bool writing_ = false;
  bool end_requested_ = false;
  bool finished_ = false;
  grpc::Status end_status_;
};

class GenerateStream::Reactor final : public grpc::ServerWriteReactor<v1::SequenceTokens> {
 public:
  Reactor(Scheduler* scheduler, std::string id, std::shared_ptr<GenerateStream> stream)
      : scheduler_(scheduler), id_(std::move(id)), stream_(std::move(stream)) {}
  void OnWriteDone(bool ok) override { stream_->OnWriteDone(ok); }
  void OnCancel() override {
    if (submitted_.load()) scheduler_->Cancel(id_);
  }
  void OnDone() override {
    stream_->Detach();
    if (submitted_.load()) scheduler_->Cancel(id_);
    delete this;
  }
  // Only a sequence this call submitted may be cancelled by it (not another call's with the
  // same id).
  std::atomic<bool> submitted_{false};

 private:
  Scheduler* scheduler_;
  std::string id_;
  std::shared_ptr<GenerateStream> stream_;
};

void GenerateStream::StartNextLocked(std::unique_lock<std::mutex>& lock) {
  if (writing_ || finished_ || reactor_ == nullptr) return;
  Reactor* r = reactor_;
  if (!queue_.empty()) {
    current_ = std::move(queue_.front());
    queue_.pop_front();
    writing_ = true;
    lock.unlock();
    r->StartWrite(&current_);
    lock.lock();
    return;
  }
  if (end_requested_) {
    finished_ = true;
    const grpc::Status st = end_status_;
    lock.unlock();
    r->Finish(st);
    lock.lock();
  }
}

void GenerateStream::OnWriteDone(bool ok) {
  std::unique_lock<std::mutex> lock(mu_);
  writing_ = false;
  if (!ok) {
    // The client is gone: finish the call; OnDone cancels the sequence.
    if (!finished_ && reactor_ != nullptr) {
      finished_ = true;
      Reactor* r = reactor_;
      lock.unlock();
      r->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
    }
    return;
  }
  StartNextLocked(lock);
}

}  // namespace

grpc::ServerWriteReactor<v1::SequenceTokens>* AttentionWorkerService::Generate(
    grpc::CallbackServerContext*, const v1::SequenceRequest* request) {
  Scheduler* sched = scheduler_.load();
  if (sched == nullptr) {
    return new rpc::FinishedWriteReactor<v1::SequenceTokens>(
        grpc::Status(grpc::StatusCode::UNAVAILABLE,
                     "this attention worker has no model loaded (started without --model, or "
                     "still waiting for the expert placement); retry on another worker"));
  }
  if (draining_.load()) {
    return new rpc::FinishedWriteReactor<v1::SequenceTokens>(grpc::Status(
        grpc::StatusCode::UNAVAILABLE, "attention worker is draining; retry on another worker"));
  }
  auto stream = std::make_shared<GenerateStream>();
  auto* reactor = new GenerateStream::Reactor(sched, request->sequence_id(), stream);
  {
    std::lock_guard<std::mutex> lock(stream->mu_);
    stream->reactor_ = reactor;
  }
  // Marked before Submit: the call may be cancelled as soon as the scheduler has it.
  reactor->submitted_.store(true);
  absl::Status st = sched->Submit(*request, stream);
  if (st.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    std::erase_if(streams_, [](const LiveStream& l) { return l.sink.expired(); });
    streams_.push_back({request->sequence_id(), stream});
  } else {
    reactor->submitted_.store(false);
    {
      std::lock_guard<std::mutex> lock(stream->mu_);
      stream->finished_ = true;
    }
    reactor->Finish(rpc::ToGrpcStatus(st));
  }
  return reactor;
}

grpc::ServerUnaryReactor* AttentionWorkerService::Cancel(grpc::CallbackServerContext* context,
                                                         const v1::CancelRequest* request,
                                                         v1::CancelResponse* response) {
  if (request->sequence_id().empty()) {
    return rpc::FinishUnary(context, grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                                  "sequence_id: must not be empty"));
  }
  Scheduler* sched = scheduler_.load();
  response->set_found(sched != nullptr && sched->Cancel(request->sequence_id()));
  return rpc::FinishUnary(context, grpc::Status::OK);
}

AttentionWorkerService::~AttentionWorkerService() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (handover_.joinable()) handover_.join();
}

void AttentionWorkerService::HandOver() {
  std::vector<LiveStream> live;
  {
    std::lock_guard<std::mutex> lock(mu_);
    live.swap(streams_);
  }
  Scheduler* sched = scheduler_.load();
  int handed = 0;
  for (const LiveStream& l : live) {
    std::shared_ptr<SequenceSink> sink = l.sink.lock();
    if (sink == nullptr) continue;
    // The stream ends first, so that no token the scheduler samples meanwhile reaches the
    // gateway after it has decided where to resume.
    sink->End(absl::AbortedError(std::string(kResubmitPrefix) + " draining"));
    if (sched != nullptr) sched->Cancel(l.sequence_id);
    ++handed;
  }
  if (handed > 0) base::LogInfo("drain: handed " + std::to_string(handed) + " sequences over");
}

grpc::ServerUnaryReactor* AttentionWorkerService::Drain(grpc::CallbackServerContext* context,
                                                        const v1::DrainRequest* request,
                                                        v1::DrainResponse* response) {
  if (!draining_.exchange(true)) base::LogInfo("draining: no new sequences are admitted");
  if (request->grace_ms() > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!handover_.joinable() && !stopping_) {
      const auto grace = std::chrono::milliseconds(request->grace_ms());
      handover_ = std::thread([this, grace] {
        {
          std::unique_lock<std::mutex> lock(mu_);
          if (wake_.wait_for(lock, grace, [this] { return stopping_; })) return;
        }
        HandOver();
      });
    }
  }
  Scheduler* sched = scheduler_.load();
  if (sched != nullptr) {
    sched->Drain();
    response->set_remaining_sequences(
        static_cast<uint32_t>(sched->running() + sched->queued()));
  }
  return rpc::FinishUnary(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* AttentionWorkerService::GetSequenceStatus(
    grpc::CallbackServerContext* context, const v1::SequenceStatusRequest* request,
    v1::SequenceStatusResponse* response) {
  v1::SequenceStatusResponse all;
  Scheduler* sched = scheduler_.load();
  if (sched != nullptr) sched->Status(&all);
  all.set_draining(draining_.load());
  if (request->sequence_ids().empty()) {
    *response = std::move(all);
  } else {
    response->set_draining(all.draining());
    for (const auto& s : all.sequences()) {
      for (const auto& want : request->sequence_ids()) {
        if (s.sequence_id() == want) *response->add_sequences() = s;
      }
    }
  }
  return rpc::FinishUnary(context, grpc::Status::OK);
}

}  // namespace expertmesh::attention_worker
