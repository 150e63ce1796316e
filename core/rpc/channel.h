// Client side helpers: channels to other services and the deadline every call carries
// (ARCHITECTURE.md, Interfaces: deadlines on every call).
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"

namespace expertmesh::rpc {

// Default deadline of control-plane calls (register, heartbeat, health).
inline constexpr absl::Duration kControlRpcTimeout = absl::Seconds(2);

// An insecure channel (cluster traffic stays on a private network or loopback) to "host:port".
// Reconnect backoff is capped low so that a restarted peer is found again quickly.
// The largest message any of our services sends or accepts: a V4-Flash kv-store block is ~4-5 MB
// and an expert dispatch of a long prefill larger still, both above gRPC's 4 MiB default.
inline constexpr int kMaxMessageBytes = 256 << 20;

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address);

// Sets `context`'s deadline to now + `timeout`.
void SetTimeout(grpc::ClientContext& context, absl::Duration timeout);

// One grpc.health.v1 Check of the whole server at `address` (service ""). OK iff it answers
// SERVING; Unavailable/DeadlineExceeded when it cannot be reached, FailedPrecondition when it
// answers another status.
absl::Status CheckHealth(const std::string& address, absl::Duration timeout = kControlRpcTimeout,
                         const std::string& service = "");
absl::Status CheckHealth(grpc::Channel& channel, absl::Duration timeout = kControlRpcTimeout,
                         const std::string& service = "");

}  // namespace expertmesh::rpc
