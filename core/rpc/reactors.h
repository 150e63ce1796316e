// Small callback-API helpers for services: finishing a unary call, and reactors that end a
// streaming call at once with a status (used for RPCs that are not implemented yet, which must
// say so with UNIMPLEMENTED and never answer with made-up data).
#pragma once

#include <string>
#include <string_view>

#include "grpcpp/server_context.h"
#include "grpcpp/support/server_callback.h"
#include "grpcpp/support/status.h"

namespace expertmesh::rpc {

// UNIMPLEMENTED with a message naming the RPC and what is missing.
inline grpc::Status Unimplemented(std::string_view rpc, std::string_view missing) {
  return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                      std::string(rpc) + " is not implemented yet: " + std::string(missing));
}

// Finishes a unary callback call with `status`.
inline grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                             const grpc::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

// A server-streaming reactor that finishes immediately; owns itself.
template <typename Response>
class FinishedWriteReactor final : public grpc::ServerWriteReactor<Response> {
 public:
  explicit FinishedWriteReactor(const grpc::Status& status) { this->Finish(status); }
  void OnDone() override { delete this; }
};

// A bidi-streaming reactor that finishes immediately; owns itself.
template <typename Request, typename Response>
class FinishedBidiReactor final : public grpc::ServerBidiReactor<Request, Response> {
 public:
  explicit FinishedBidiReactor(const grpc::Status& status) { this->Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace expertmesh::rpc
