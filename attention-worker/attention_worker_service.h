// The attention worker's gRPC service over its Scheduler: Generate streams a sequence's tokens
// as they are sampled (a cancelled call frees the sequence at the next step boundary), Cancel
// ends one by id, Drain stops admission (and, after its grace period, hands the running
// sequences over: their streams end ABORTED "resubmit: draining" and the gateway resumes them on
// another worker), GetSequenceStatus reports the sequence table.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "attention-worker/scheduler.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"

namespace expertmesh::attention_worker {

// A Generate stream that ends ABORTED with a message starting with this was handed over by a
// draining worker: the gateway resubmits the sequence elsewhere (attention_worker.proto, Drain).
inline constexpr std::string_view kResubmitPrefix = "resubmit:";

class AttentionWorkerService final : public expertmesh::v1::AttentionWorker::CallbackService {
 public:
  // `scheduler` is not owned; it must outlive the server. Null until the model is loaded:
  // Generate then answers UNAVAILABLE (or FAILED_PRECONDITION with no model at all).
  explicit AttentionWorkerService(Scheduler* scheduler) : scheduler_(scheduler) {}
  ~AttentionWorkerService() override;
  void set_scheduler(Scheduler* scheduler) { scheduler_.store(scheduler); }

  grpc::ServerWriteReactor<expertmesh::v1::SequenceTokens>* Generate(
      grpc::CallbackServerContext* context,
      const expertmesh::v1::SequenceRequest* request) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* context,
                                   const expertmesh::v1::CancelRequest* request,
                                   expertmesh::v1::CancelResponse* response) override;
  grpc::ServerUnaryReactor* Drain(grpc::CallbackServerContext* context,
                                  const expertmesh::v1::DrainRequest* request,
                                  expertmesh::v1::DrainResponse* response) override;
  grpc::ServerUnaryReactor* GetSequenceStatus(
      grpc::CallbackServerContext* context, const expertmesh::v1::SequenceStatusRequest* request,
      expertmesh::v1::SequenceStatusResponse* response) override;

 private:
  struct LiveStream {
    std::string sequence_id;
    std::weak_ptr<SequenceSink> sink;
  };
  // Ends every live stream with the resubmit status and frees its sequence.
  void HandOver();

  std::atomic<Scheduler*> scheduler_;
  std::atomic<bool> draining_{false};
  std::mutex mu_;
  std::condition_variable wake_;
  std::vector<LiveStream> streams_;  // Generate calls that submitted a sequence (pruned lazily)
  std::thread handover_;             // waits out Drain's grace period
  bool stopping_ = false;
};

}  // namespace expertmesh::attention_worker
