// The gateway in process, for tests: a scripted attention worker, the Generator on it, HttpApi's
// routes and an HTTP server on 127.0.0.1 (a free port). No child processes, so the tests that use
// it also run in the sanitizer pass.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "core/tokenizer/tokenizer.h"
#include "gateway/gateway_metrics.h"
#include "gateway/generation.h"
#include "gateway/http_api.h"
#include "gateway/http_server.h"
#include "gateway/model_info.h"
#include "prometheus/registry.h"
#include "tests/testing/scripted_attention_worker.h"

namespace expertmesh::testing {

// The default tokenizer, loaded on the first call and kept for the whole process (tests share
// it; loading it again per test is slow), or why it could not be loaded.
const absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>>& SharedDefaultTokenizer();

struct InProcessGatewayOptions {
  // false: no scripted worker (worker() is not there), `generation` is used as given.
  bool start_worker = true;
  ScriptedWorkerOptions worker;
  gateway::ModelInfo model;
  // Its attention_worker is set to the scripted worker's address.
  gateway::GenerationOptions generation;
  // The generator reports to GatewayMetrics on registry() (which always carries the routes').
  bool metrics = false;
  int http_threads = 1;
};

// No worker: model "m", a router address where nothing listens and a short pick timeout, so a
// generation that gets as far as picking a worker answers 503 at once.
InProcessGatewayOptions NoWorkerGatewayOptions();

class InProcessGateway {
 public:
  // `tokenizer` must outlive the gateway.
  static absl::StatusOr<std::unique_ptr<InProcessGateway>> Start(
      InProcessGatewayOptions options, const tokenizer::Tokenizer* tokenizer);
  // Stops the server first, then drops the routes, the generator and the worker, so no request
  // runs into a part already gone.
  ~InProcessGateway();
  InProcessGateway(const InProcessGateway&) = delete;
  InProcessGateway& operator=(const InProcessGateway&) = delete;

  ScriptedAttentionWorker& worker() { return *worker_; }
  gateway::Generator& core() { return *core_; }
  gateway::HttpServer& server() { return *server_; }
  prometheus::Registry& registry() { return registry_; }
  int port() const { return server_->port(); }

 private:
  InProcessGateway() = default;

  prometheus::Registry registry_;
  std::unique_ptr<gateway::GatewayMetrics> metrics_;
  std::unique_ptr<ScriptedAttentionWorker> worker_;
  std::shared_ptr<gateway::Generator> core_;
  std::unique_ptr<gateway::HttpApi> api_;
  std::unique_ptr<gateway::HttpServer> server_;
};

}  // namespace expertmesh::testing
