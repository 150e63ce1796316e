#include "core/rpc/channel.h"

#include "core/rpc/status.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace expertmesh::rpc {

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

void SetTimeout(grpc::ClientContext& context, absl::Duration timeout) {
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
}

absl::Status CheckHealth(grpc::Channel& channel, absl::Duration timeout,
                         const std::string& service) {
  // The stub needs a shared_ptr; the caller keeps the channel alive for the call.
  std::shared_ptr<grpc::Channel> borrowed(&channel, [](grpc::Channel*) {});
  auto stub = grpc::health::v1::Health::NewStub(borrowed);
  grpc::ClientContext context;
  SetTimeout(context, timeout);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  if (response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
    return absl::FailedPreconditionError(
        "health status is " +
        grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()));
  }
  return absl::OkStatus();
}

absl::Status CheckHealth(const std::string& address, absl::Duration timeout,
                         const std::string& service) {
  return CheckHealth(*MakeChannel(address), timeout, service);
}

}  // namespace expertmesh::rpc
