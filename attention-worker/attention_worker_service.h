// The attention worker's gRPC service over its Scheduler: Generate streams a sequence's tokens
// as they are sampled (a cancelled call frees the sequence at the next step boundary), Cancel
// ends one by id, Drain stops admission, GetSequenceStatus reports the sequence table.
#pragma once

#include <atomic>
#include <string>

#include "attention-worker/scheduler.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"

namespace expertmesh::attention_worker {

class AttentionWorkerService final : public expertmesh::v1::AttentionWorker::CallbackService {
 public:
  // `scheduler` is not owned; it must outlive the server. Null until the model is loaded:
  // Generate then answers UNAVAILABLE (or FAILED_PRECONDITION with no model at all).
  explicit AttentionWorkerService(Scheduler* scheduler) : scheduler_(scheduler) {}
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
  std::atomic<Scheduler*> scheduler_;
  std::atomic<bool> draining_{false};
};

}  // namespace expertmesh::attention_worker
