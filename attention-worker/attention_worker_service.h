// The attention worker's gRPC service. Sequences cannot run yet (the cluster data path comes
// with the model engine), so Generate and Cancel answer UNIMPLEMENTED; Drain and
// GetSequenceStatus report the worker's real (empty) sequence table and draining flag.
#pragma once

#include <atomic>
#include <string>

#include "expertmesh/v1/attention_worker.grpc.pb.h"

namespace expertmesh::attention_worker {

class AttentionWorkerService final : public expertmesh::v1::AttentionWorker::CallbackService {
 public:
  explicit AttentionWorkerService(std::string model_dir) : model_dir_(std::move(model_dir)) {}

  bool draining() const { return draining_.load(); }

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
  const std::string model_dir_;
  std::atomic<bool> draining_{false};
};

}  // namespace expertmesh::attention_worker
