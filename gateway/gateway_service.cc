#include "gateway/gateway_service.h"

#include "core/rpc/reactors.h"

namespace expertmesh::gateway {
grpc::ServerUnaryReactor* GatewayService::Models(grpc::CallbackServerContext* context,
                                                 const expertmesh::v1::ModelsRequest*,
                                                 expertmesh::v1::ModelsResponse* response) {
  if (model_) {
    expertmesh::v1::ModelInfo* m = response->add_models();
    m->set_id(model_->id);
    m->set_context_length(model_->context_length);
    m->set_vocab_size(model_->vocab_size);
  }
  return rpc::FinishUnary(context, grpc::Status::OK);
}

}  // namespace expertmesh::gateway
