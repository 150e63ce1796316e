#include "tests/testing/in_process_gateway.h"

#include <string>
#include <utility>

namespace expertmesh::testing {

const absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>>& SharedDefaultTokenizer() {
  static const auto* loaded =
      new absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>>(tokenizer::LoadDefaultTokenizer());
  return *loaded;
}

InProcessGatewayOptions NoWorkerGatewayOptions() {
  InProcessGatewayOptions o;
  o.start_worker = false;
  o.model.id = std::string("m");  // GCC 12 warns falsely (-Wrestrict) on assigning the literal
  o.generation.router = "127.0.0.1:1";
  o.generation.pick_timeout = absl::Milliseconds(300);
  return o;
}

absl::StatusOr<std::unique_ptr<InProcessGateway>> InProcessGateway::Start(
    InProcessGatewayOptions options, const tokenizer::Tokenizer* tokenizer) {
  std::unique_ptr<InProcessGateway> g(new InProcessGateway());
  if (options.start_worker) {
    auto w = ScriptedAttentionWorker::Start(std::move(options.worker));
    if (!w.ok()) return w.status();
    g->worker_ = std::move(*w);
    options.generation.attention_worker = g->worker_->address();
  }
  if (options.metrics) {
    g->metrics_ = std::make_unique<gateway::GatewayMetrics>(g->registry_);
    options.generation.metrics = g->metrics_.get();
  }
  g->core_ = std::make_shared<gateway::Generator>(options.model, tokenizer, options.generation);
  g->api_ = std::make_unique<gateway::HttpApi>(
      options.model, [] { return gateway::RouterHealth{}; }, g->registry_, g->core_);
  gateway::HttpApi* api = g->api_.get();
  auto s = gateway::HttpServer::Start(
      "127.0.0.1", 0, [api](const gateway::HttpRequest& r) { return api->Handle(r); },
      options.http_threads);
  if (!s.ok()) return s.status();
  g->server_ = std::move(*s);
  return g;
}

InProcessGateway::~InProcessGateway() {
  if (server_) server_->Stop();
  api_.reset();
  core_.reset();
  server_.reset();
  worker_.reset();
}

}  // namespace expertmesh::testing
