// The gateway's public gRPC API. Models lists the configured model; Generate and
// GenerateStream answer UNIMPLEMENTED until the data path to the attention workers exists.
#pragma once

#include <optional>

#include "expertmesh/v1/gateway.grpc.pb.h"
#include "gateway/model_info.h"

namespace expertmesh::gateway {

class GatewayService final : public expertmesh::v1::Gateway::CallbackService {
 public:
  explicit GatewayService(std::optional<ModelInfo> model) : model_(std::move(model)) {}

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context,
                                     const expertmesh::v1::GenerateRequest* request,
                                     expertmesh::v1::GenerateResponse* response) override;
  grpc::ServerWriteReactor<expertmesh::v1::GenerateChunk>* GenerateStream(
      grpc::CallbackServerContext* context,
      const expertmesh::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Models(grpc::CallbackServerContext* context,
                                   const expertmesh::v1::ModelsRequest* request,
                                   expertmesh::v1::ModelsResponse* response) override;

 private:
  const std::optional<ModelInfo> model_;
};

}  // namespace expertmesh::gateway
