// The expert worker's gRPC service. Expert loading and the batched expert FFN are not wired yet,
// so Dispatch, LoadExperts and UnloadExperts answer UNIMPLEMENTED; GetStatus reports what the
// worker really holds (its router id, no experts, the model directory).
#pragma once

#include <functional>
#include <string>

#include "expertmesh/v1/expert_worker.grpc.pb.h"

namespace expertmesh::expert_worker {

class ExpertWorkerService final : public expertmesh::v1::ExpertWorker::CallbackService {
 public:
  // `worker_id` returns the current router id (0 when not registered); thread-safe.
  ExpertWorkerService(std::string model_dir, std::function<uint64_t()> worker_id)
      : model_dir_(std::move(model_dir)), worker_id_(std::move(worker_id)) {}

  grpc::ServerBidiReactor<expertmesh::v1::DispatchRequest, expertmesh::v1::DispatchResponse>*
  Dispatch(grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* LoadExperts(grpc::CallbackServerContext* context,
                                        const expertmesh::v1::LoadExpertsRequest* request,
                                        expertmesh::v1::LoadExpertsResponse* response) override;
  grpc::ServerUnaryReactor* UnloadExperts(grpc::CallbackServerContext* context,
                                          const expertmesh::v1::UnloadExpertsRequest* request,
                                          expertmesh::v1::UnloadExpertsResponse* response) override;
  grpc::ServerUnaryReactor* GetStatus(grpc::CallbackServerContext* context,
                                      const expertmesh::v1::ExpertStatusRequest* request,
                                      expertmesh::v1::ExpertStatusResponse* response) override;

 private:
  const std::string model_dir_;
  const std::function<uint64_t()> worker_id_;
};

}  // namespace expertmesh::expert_worker
