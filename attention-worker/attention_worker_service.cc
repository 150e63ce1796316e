#include "attention-worker/attention_worker_service.h"

#include "core/base/log.h"
#include "core/rpc/reactors.h"

namespace expertmesh::attention_worker {
namespace {
constexpr char kNoEngine[] =
    "the attention worker does not run sequences yet (model engine and expert dispatch are not "
    "wired into the cluster)";
}  // namespace

grpc::ServerWriteReactor<expertmesh::v1::SequenceTokens>* AttentionWorkerService::Generate(
    grpc::CallbackServerContext*, const expertmesh::v1::SequenceRequest*) {
  return new rpc::FinishedWriteReactor<expertmesh::v1::SequenceTokens>(
      rpc::Unimplemented("AttentionWorker.Generate", kNoEngine));
}

grpc::ServerUnaryReactor* AttentionWorkerService::Cancel(grpc::CallbackServerContext* context,
                                                         const expertmesh::v1::CancelRequest*,
                                                         expertmesh::v1::CancelResponse*) {
  return rpc::FinishUnary(context, rpc::Unimplemented("AttentionWorker.Cancel", kNoEngine));
}

grpc::ServerUnaryReactor* AttentionWorkerService::Drain(grpc::CallbackServerContext* context,
                                                        const expertmesh::v1::DrainRequest*,
                                                        expertmesh::v1::DrainResponse* response) {
  if (!draining_.exchange(true)) base::LogInfo("draining: no new sequences are admitted");
  // No sequence can be running (Generate is not implemented), so none remain.
  response->set_remaining_sequences(0);
  return rpc::FinishUnary(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* AttentionWorkerService::GetSequenceStatus(
    grpc::CallbackServerContext* context, const expertmesh::v1::SequenceStatusRequest*,
    expertmesh::v1::SequenceStatusResponse* response) {
  response->set_draining(draining_.load());
  return rpc::FinishUnary(context, grpc::Status::OK);
}

}  // namespace expertmesh::attention_worker
