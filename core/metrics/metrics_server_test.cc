#include "core/metrics/metrics_server.h"

#include "gtest/gtest.h"
#include "prometheus/counter.h"
#include "tests/testing/child_process.h"
#include "tests/testing/prom_text.h"

namespace expertmesh::metrics {
namespace {

TEST(MetricsServerTest, ServesBuildInfoProcessMetricsAndOwnFamilies) {
  BuildInfo info;
  info.component = "unit";
  info.extra["kernel_target"] = "none";
  auto server = MetricsServer::Start("127.0.0.1:0", info);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT((*server)->port(), 0);
  prometheus::BuildCounter()
      .Name("expertmesh_unit_events_total")
      .Help("test")
      .Register((*server)->registry())
      .Add({{"kind", "a"}})
      .Increment(3);

  auto response = testing::HttpRequest((*server)->port(), "GET", "/metrics");
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200);
  auto scrape = testing::ParsePromText(response->body);
  ASSERT_TRUE(scrape.ok()) << scrape.status() << "\n" << response->body;

  auto build =
      scrape->Find("expertmesh_build_info", {{"component", "unit"}, {"kernel_target", "none"}});
  ASSERT_EQ(build.size(), 1u);
  EXPECT_EQ(build[0].value, 1);
  EXPECT_EQ(build[0].labels["version"], BuildVersion());
  EXPECT_FALSE(build[0].labels["git_commit"].empty());

  auto rss = scrape->Find("process_resident_memory_bytes");
  ASSERT_EQ(rss.size(), 1u);
  EXPECT_GT(rss[0].value, 1e6);  // a live process with gRPC/civetweb linked holds megabytes
  ASSERT_EQ(scrape->Find("process_cpu_seconds_total").size(), 1u);
  EXPECT_EQ(scrape->families.at("process_cpu_seconds_total").type, "counter");
  auto start = scrape->Find("process_start_time_seconds");
  ASSERT_EQ(start.size(), 1u);
  const double now = absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch());
  EXPECT_LE(start[0].value, now + 1);
  EXPECT_GT(start[0].value, now - 3600);
  auto fds = scrape->Find("process_open_fds");
  ASSERT_EQ(fds.size(), 1u);
  EXPECT_GE(fds[0].value, 3);
  auto events = scrape->Find("expertmesh_unit_events_total", {{"kind", "a"}});
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].value, 3);
}

TEST(MetricsServerTest, BadAddressesFail) {
  EXPECT_EQ(MetricsServer::Start("nocolon", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto first = MetricsServer::Start("127.0.0.1:0", {});
  ASSERT_TRUE(first.ok());
  auto second = MetricsServer::Start("127.0.0.1:" + std::to_string((*first)->port()), {});
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace expertmesh::metrics
