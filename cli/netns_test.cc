#include "cli/netns.h"

#include <unistd.h>

#include "gtest/gtest.h"

namespace expertmesh::cli {
namespace {

TEST(NetnsTest, ParsesTheDefaultSubnet) {
  auto s = ParseIpv4Subnet("198.18.0.0/15");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->prefix, 15);
  EXPECT_EQ(FormatIpv4(s->base), "198.18.0.0");
  EXPECT_EQ(*SubnetAddress(*s, 0), "198.18.0.1");  // the bridge
  EXPECT_EQ(*SubnetAddress(*s, 1), "198.18.0.2");  // host 0
  EXPECT_EQ(*SubnetAddress(*s, 300), "198.18.1.45");
}

TEST(NetnsTest, HostBitsOfTheBaseAreDropped) {
  auto s = ParseIpv4Subnet("10.1.2.3/24");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(FormatIpv4(s->base), "10.1.2.0");
}

TEST(NetnsTest, RejectsBadSubnetsNamingTheFlag) {
  for (const char* bad : {"198.18.0.0", "198.18.0/15", "198.18.0.0/31", "198.18.0.0/x",
                          "198.18.0.0/", "hello/16"}) {
    auto s = ParseIpv4Subnet(bad);
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_NE(s.status().message().find("--hosts-subnet"), std::string::npos) << s.status();
  }
}

TEST(NetnsTest, SmallSubnetRunsOutOfAddresses) {
  auto s = ParseIpv4Subnet("192.168.7.0/30");  // 4 addresses: network, 2 usable, broadcast
  ASSERT_TRUE(s.ok());
  EXPECT_TRUE(SubnetAddress(*s, 0).ok());
  EXPECT_TRUE(SubnetAddress(*s, 1).ok());
  EXPECT_FALSE(SubnetAddress(*s, 2).ok());
  EXPECT_FALSE(SubnetAddress(*s, -1).ok());
}

TEST(NetnsTest, OwnerPidComesFromTheName) {
  EXPECT_EQ(OwnerPidOfName("em-1234-h0"), 1234);
  EXPECT_EQ(OwnerPidOfName("em-77-br"), 77);
  EXPECT_EQ(OwnerPidOfName("em-4194304-v12"), 4194304);
  EXPECT_FALSE(OwnerPidOfName("eth0").has_value());
  EXPECT_FALSE(OwnerPidOfName("em-abc-h0").has_value());
  EXPECT_FALSE(OwnerPidOfName("em-12").has_value());
  EXPECT_FALSE(OwnerPidOfName("em--h0").has_value());
}

TEST(NetnsTest, TooManyHostsIsRejectedBeforeAnythingIsMade) {
  auto net = HostNetwork::Create(5, "192.168.7.0/30");
  ASSERT_FALSE(net.ok());
  EXPECT_EQ(net.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(net.status().message().find("--hosts-subnet"), std::string::npos);
}

}  // namespace
}  // namespace expertmesh::cli
