#include "gateway/admin_api.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "gtest/gtest.h"

namespace expertmesh::gateway {
namespace {

TEST(ParsePrometheusText, LabelsValuesAndComments) {
  auto samples = ParsePrometheusText(
      "# HELP x y\n# TYPE expertmesh_expert_tokens_total counter\n"
      "expertmesh_expert_tokens_total{expert=\"3\",layer=\"1\"} 42\n"
      "plain 1.5e3\n"
      "with_ts{a=\"q\\\"uote\"} 7 1700000000000\n"
      "h_bucket{le=\"+Inf\"} 9\n"
      "broken{a=\"x\" 1\n"
      "nonnumber abc\n");
  ASSERT_EQ(samples.size(), 4u);
  EXPECT_EQ(samples[0].name, "expertmesh_expert_tokens_total");
  EXPECT_EQ(samples[0].labels.at("layer"), "1");
  EXPECT_EQ(samples[0].labels.at("expert"), "3");
  EXPECT_EQ(samples[0].value, 42);
  EXPECT_EQ(samples[1].value, 1500);
  EXPECT_EQ(samples[2].labels.at("a"), "q\"uote");
  EXPECT_EQ(samples[2].value, 7);
  EXPECT_EQ(samples[3].labels.at("le"), "+Inf");
}

TEST(HttpGet, ReadsBodyAndReportsErrors) {
  auto server = HttpServer::Start("127.0.0.1", 0, [](const HttpRequest& r) {
    HttpResponse resp;
    if (r.target == "/metrics") {
      resp.content_type = "text/plain";
      resp.body = "a 1\n";
    } else {
      resp.status = 404;
    }
    return resp;
  });
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string addr = "127.0.0.1:" + std::to_string((*server)->port());
  auto body = HttpGet(addr, "/metrics", absl::Seconds(2));
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_EQ(*body, "a 1\n");
  EXPECT_EQ(HttpGet(addr, "/nope", absl::Seconds(2)).status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(HttpGet("localhost:1", "/", absl::Seconds(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HttpGet("nocolon", "/", absl::Seconds(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(HttpGet, SilentPeerTimesOut) {
  // A listener that accepts (the kernel completes the handshake) but never answers: the deadline
  // must end the call.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(listen(fd, 4), 0);
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  auto r = HttpGet("127.0.0.1:" + std::to_string(ntohs(a.sin_port)), "/metrics",
                   absl::Milliseconds(200));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded);
  close(fd);
}

TEST(AdminApi, ServesPageAndRejectsOthers) {
  AdminApi api(AdminOptions{});
  HttpResponse index = api.Handle({"GET", "/", "", {}});
  EXPECT_EQ(index.status, 200);
  EXPECT_NE(index.content_type.find("text/html"), std::string::npos);
  EXPECT_NE(index.body.find("/cluster_page.js"), std::string::npos);
  HttpResponse js = api.Handle({"GET", "/cluster_page.js", "", {}});
  EXPECT_EQ(js.status, 200);
  EXPECT_NE(js.content_type.find("javascript"), std::string::npos);
  EXPECT_NE(js.body.find("/api/cluster"), std::string::npos);
  EXPECT_EQ(api.Handle({"GET", "/cluster_page.css", "", {}}).status, 200);
  EXPECT_EQ(api.Handle({"GET", "/missing", "", {}}).status, 404);
  EXPECT_EQ(api.Handle({"POST", "/api/cluster", "", {}}).status, 405);
}

TEST(AdminApi, NoRouterAndDeadRouterAreReportedNotFatal) {
  AdminOptions o;
  o.layers = 2;
  o.experts = 4;
  nlohmann::json none = AdminApi(o).ClusterSnapshot();
  EXPECT_EQ(none["router"]["ok"], false);
  EXPECT_EQ(none["model"]["layers"], 2);
  EXPECT_EQ(none["model"]["experts"], 4);

  // Port 1 on loopback: nothing listens, so the RPCs fail (within their deadline).
  o.router = "127.0.0.1:1";
  o.rpc_timeout = absl::Milliseconds(300);
  const absl::Time start = absl::Now();
  AdminApi api(o);
  HttpResponse r = api.Handle({"GET", "/api/cluster?x=1", "", {}});
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  ASSERT_EQ(r.status, 200);
  nlohmann::json j = nlohmann::json::parse(r.body);
  EXPECT_EQ(j["router"]["ok"], false);
  EXPECT_NE(j["router"]["error"].get<std::string>().find("ListMembers"), std::string::npos);
  EXPECT_TRUE(j["members"].empty());
  EXPECT_TRUE(j["placement"].is_null());
}

}  // namespace
}  // namespace expertmesh::gateway
