#include "gateway/http_api.h"

#include "gateway/http_server.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "prometheus/text_serializer.h"
#include "tests/testing/child_process.h"
#include "tests/testing/prom_text.h"

namespace expertmesh::gateway {
namespace {

using nlohmann::json;

class HttpApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ModelInfo model;
    model.id = "tiny";
    model.created = 1700000000;
    api_ = std::make_unique<HttpApi>(
        model,
        [] {
          RouterHealth h;
          h.configured = true;
          h.address = "127.0.0.1:1";
          h.last_error = "connection refused";
          return h;
        },
        registry_);
    auto server = HttpServer::Start(
        "127.0.0.1", 0, [this](const HttpRequest& r) { return api_->Handle(r); }, 2);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }

  json Get(const std::string& target, int expect_status) {
    auto r = testing::HttpRequest(server_->port(), "GET", target);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return nullptr;
    EXPECT_EQ(r->status, expect_status) << r->body;
    EXPECT_EQ(r->content_type, "application/json");
    return json::parse(r->body, nullptr, false);
  }

  prometheus::Registry registry_;
  std::unique_ptr<HttpApi> api_;
  std::unique_ptr<HttpServer> server_;
};

TEST_F(HttpApiTest, HealthReportsRouterReachability) {
  json body = Get("/health", 200);
  EXPECT_EQ(body["status"], "ok");
  EXPECT_EQ(body["router"]["configured"], true);
  EXPECT_EQ(body["router"]["reachable"], false);
  EXPECT_EQ(body["router"]["last_error"], "connection refused");
}

TEST_F(HttpApiTest, ModelsListsTheConfiguredModelInOpenAiShape) {
  json body = Get("/v1/models", 200);
  EXPECT_EQ(body["object"], "list");
  ASSERT_EQ(body["data"].size(), 1u);
  EXPECT_EQ(body["data"][0]["id"], "tiny");
  EXPECT_EQ(body["data"][0]["object"], "model");
  EXPECT_EQ(body["data"][0]["created"], 1700000000);
}

TEST_F(HttpApiTest, GenerationRoutesAnswer501WithApiShapedErrors) {
  for (const char* path : {"/v1/chat/completions", "/v1/completions"}) {
    auto r = testing::HttpRequest(server_->port(), "POST", path, R"({"model":"tiny"})");
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->status, 501);
    json body = json::parse(r->body, nullptr, false);
    ASSERT_TRUE(body.contains("error")) << r->body;
    EXPECT_EQ(body["error"]["type"], "not_implemented");
    EXPECT_NE(body["error"]["message"].get<std::string>().find("without --model or without a tokenizer"), std::string::npos);
  }
  auto r = testing::HttpRequest(server_->port(), "POST", "/v1/messages", "{}");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 501);
  json body = json::parse(r->body, nullptr, false);
  EXPECT_EQ(body["type"], "error");
  EXPECT_EQ(body["error"]["type"], "api_error");
}

TEST_F(HttpApiTest, WrongMethodUnknownRouteAndMalformedRequest) {
  auto r = testing::HttpRequest(server_->port(), "GET", "/v1/chat/completions");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 405);
  Get("/nope", 404);
  // Not HTTP at all: the server answers 400 and closes instead of hanging.
  auto bad = testing::HttpRequest(server_->port(), "GET\x01", "/");
  ASSERT_TRUE(bad.ok()) << bad.status();
  EXPECT_EQ(bad->status, 400);
}

TEST_F(HttpApiTest, CountsRequestsByRouteAndCode) {
  Get("/health", 200);
  Get("/health", 200);
  Get("/x/y/z", 404);
  prometheus::TextSerializer serializer;
  std::string text = serializer.Serialize(registry_.Collect());
  auto scrape = testing::ParsePromText(text);
  ASSERT_TRUE(scrape.ok()) << scrape.status();
  auto health = scrape->Find("expertmesh_gateway_http_requests_total",
                             {{"route", "/health"}, {"code", "200"}});
  ASSERT_EQ(health.size(), 1u);
  EXPECT_EQ(health[0].value, 2);
  EXPECT_EQ(scrape->Find("expertmesh_gateway_http_requests_total", {{"route", "other"}}).size(),
            1u);
}

}  // namespace
}  // namespace expertmesh::gateway
