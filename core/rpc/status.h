// Conversion between absl::Status (the project's error type) and grpc::Status at service
// boundaries. Both use the same canonical codes, so the mapping is by number and lossless for
// code and message.
#pragma once

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace expertmesh::rpc {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace expertmesh::rpc
