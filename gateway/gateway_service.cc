#include "gateway/gateway_service.h"

#include "core/rpc/reactors.h"

namespace expertmesh::gateway {
namespace {
constexpr char kNotWired[] =
    "the gateway does not yet tokenize, pick an attention worker and stream tokens";
}  // namespace

grpc::ServerUnaryReactor* GatewayService::Generate(grpc::CallbackServerContext* context,
                                                   const expertmesh::v1::GenerateRequest*,
                                                   expertmesh::v1::GenerateResponse*) {
  return rpc::FinishUnary(context, rpc::Unimplemented("Gateway.Generate", kNotWired));
}

grpc::ServerWriteReactor<expertmesh::v1::GenerateChunk>* GatewayService::GenerateStream(
    grpc::CallbackServerContext*, const expertmesh::v1::GenerateRequest*) {
  return new rpc::FinishedWriteReactor<expertmesh::v1::GenerateChunk>(
      rpc::Unimplemented("Gateway.GenerateStream", kNotWired));
}

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
