#include "core/rpc/status.h"

#include "gtest/gtest.h"

namespace expertmesh::rpc {
namespace {

TEST(StatusConversionTest, RoundTripsEveryCodeAndMessage) {
  for (int code = 0; code <= 16; ++code) {
    absl::Status in(static_cast<absl::StatusCode>(code), code == 0 ? "" : "msg");
    grpc::Status g = ToGrpcStatus(in);
    EXPECT_EQ(static_cast<int>(g.error_code()), code);
    absl::Status out = FromGrpcStatus(g);
    EXPECT_EQ(out, in);
  }
}

}  // namespace
}  // namespace expertmesh::rpc
