// The gateway's HTTP API routes: GET /health, GET /v1/models, GET /v1/models/{id}, and the
// generation routes (POST /v1/chat/completions, /v1/completions, /v1/messages,
// /v1/messages/count_tokens; without a generation core they answer 501 with an OpenAI- or
// Anthropic-shaped error). No Beast, no gRPC: it maps an HttpRequest to an HttpResponse and
// counts requests.
#pragma once

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "gateway/api_keys.h"
#include "gateway/generation.h"
#include "gateway/http_server.h"
#include "gateway/model_info.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/registry.h"

namespace expertmesh::gateway {

// What /health says about the router.
struct RouterHealth {
  bool configured = false;  // --router given
  std::string address;
  bool registered = false;  // holds a lease
  bool reachable = false;   // a call succeeded within the lease TTL
  uint64_t worker_id = 0;
  std::string last_error;
};

class HttpApi {
 public:
  // `model` empty = none configured. `router_health` is called per /health request
  // (thread-safe). Registers expertmesh_gateway_http_requests_total in `registry`. `chat` runs
  // POST /v1/chat/completions (null: 501, as without a tokenizer or workers).
  HttpApi(std::optional<ModelInfo> model, std::function<RouterHealth()> router_health,
          prometheus::Registry& registry, std::shared_ptr<Generator> chat = nullptr);
  // Waits for the generations still running (stop the HTTP server first: that cancels them).
  ~HttpApi();

  // API keys (null or open: no key needed). Call before serving.
  void SetApiKeys(std::shared_ptr<ApiKeys> keys) { keys_ = std::move(keys); }

  // Thread-safe.
  HttpResponse Handle(const HttpRequest& request);

 private:
  HttpResponse Route(const HttpRequest& request, std::string* route_label);
  ServedModel Served() const;  // the model names requests may use
  HttpResponse ChatCompletion(const HttpRequest& request, Admission admission);
  HttpResponse Completion(const HttpRequest& request, Admission admission);
  HttpResponse Messages(const HttpRequest& request, Admission admission);
  HttpResponse CountTokens(const HttpRequest& request);

  const std::optional<ModelInfo> model_;
  const std::function<RouterHealth()> router_health_;
  prometheus::Family<prometheus::Counter>& requests_;
  const std::shared_ptr<Generator> chat_;
  std::shared_ptr<ApiKeys> keys_;
};

}  // namespace expertmesh::gateway
