// The gateway's public gRPC API: Models lists the configured model (generation is HTTP only).
#pragma once

#include <optional>

#include "expertmesh/v1/gateway.grpc.pb.h"
#include "gateway/model_info.h"

namespace expertmesh::gateway {

class GatewayService final : public expertmesh::v1::Gateway::CallbackService {
 public:
  explicit GatewayService(std::optional<ModelInfo> model) : model_(std::move(model)) {}

  grpc::ServerUnaryReactor* Models(grpc::CallbackServerContext* context,
                                   const expertmesh::v1::ModelsRequest* request,
                                   expertmesh::v1::ModelsResponse* response) override;

 private:
  const std::optional<ModelInfo> model_;
};

}  // namespace expertmesh::gateway
