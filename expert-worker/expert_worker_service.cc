#include "expert-worker/expert_worker_service.h"

#include "core/rpc/reactors.h"

namespace expertmesh::expert_worker {
namespace {
constexpr char kNoExperts[] =
    "expert loading from the checkpoint and the batched expert FFN are not wired into the "
    "expert worker";
}  // namespace

grpc::ServerBidiReactor<expertmesh::v1::DispatchRequest, expertmesh::v1::DispatchResponse>*
ExpertWorkerService::Dispatch(grpc::CallbackServerContext*) {
  return new rpc::FinishedBidiReactor<expertmesh::v1::DispatchRequest,
                                      expertmesh::v1::DispatchResponse>(
      rpc::Unimplemented("ExpertWorker.Dispatch", kNoExperts));
}

grpc::ServerUnaryReactor* ExpertWorkerService::LoadExperts(
    grpc::CallbackServerContext* context, const expertmesh::v1::LoadExpertsRequest*,
    expertmesh::v1::LoadExpertsResponse*) {
  return rpc::FinishUnary(context, rpc::Unimplemented("ExpertWorker.LoadExperts", kNoExperts));
}

grpc::ServerUnaryReactor* ExpertWorkerService::UnloadExperts(
    grpc::CallbackServerContext* context, const expertmesh::v1::UnloadExpertsRequest*,
    expertmesh::v1::UnloadExpertsResponse*) {
  return rpc::FinishUnary(context, rpc::Unimplemented("ExpertWorker.UnloadExperts", kNoExperts));
}

grpc::ServerUnaryReactor* ExpertWorkerService::GetStatus(
    grpc::CallbackServerContext* context, const expertmesh::v1::ExpertStatusRequest*,
    expertmesh::v1::ExpertStatusResponse* response) {
  response->set_worker_id(worker_id_());
  response->set_model_dir(model_dir_);
  response->set_resident_bytes(0);  // nothing can be loaded yet (LoadExperts is unimplemented)
  return rpc::FinishUnary(context, grpc::Status::OK);
}

}  // namespace expertmesh::expert_worker
