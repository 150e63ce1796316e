#include "gateway/http_api.h"

#include <thread>

#include "gateway/chat_request.h"
#include "gateway/messages_api.h"
#include "gateway/openai_api.h"
#include "nlohmann/json.hpp"

namespace expertmesh::gateway {
namespace {

using nlohmann::json;

HttpResponse Json(int status, const json& body) {
  HttpResponse r;
  r.status = status;
  r.body = body.dump();
  return r;
}

// OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.
HttpResponse OpenAiError(int status, const std::string& message, const std::string& type,
                         const std::string& code) {
  return Json(
      status,
      {{"error", {{"message", message}, {"type", type}, {"param", nullptr}, {"code", code}}}});
}

// Anthropic's error shape: {"type": "error", "error": {"type", "message"}}.
HttpResponse AnthropicError(int status, const std::string& message, const std::string& type) {
  return Json(status, {{"type", "error"}, {"error", {{"type", type}, {"message", message}}}});
}

constexpr char kNotWired[] =
    "generation is not wired yet: the gateway does not yet tokenize, pick an attention worker "
    "and stream tokens (the cluster data path comes in a later release)";

}  // namespace

HttpApi::HttpApi(std::optional<ModelInfo> model, std::function<RouterHealth()> router_health,
                 prometheus::Registry& registry, std::shared_ptr<Generator> chat)
    : model_(std::move(model)),
      router_health_(std::move(router_health)),
      requests_(prometheus::BuildCounter()
                    .Name("expertmesh_gateway_http_requests_total")
                    .Help("HTTP requests answered, by route and status code.")
                    .Register(registry)),
      chat_(std::move(chat)) {}

HttpApi::~HttpApi() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_.wait(lock, [this] { return running_ == 0; });
}

ServedModel HttpApi::Served() const {
  return ServedModel(chat_->model().id, chat_->model().aliases);
}

HttpResponse HttpApi::ChatCompletion(const HttpRequest& http) {
  auto request = std::make_shared<ChatRequest>();
  if (std::optional<ApiError> e = ParseChatRequest(http.body, Served(), request.get())) {
    HttpResponse r;
    r.status = e->status;
    r.body = e->ToJson();
    r.headers = e->headers;
    return r;
  }
  HttpResponse r;
  r.deferred = [this, request](std::shared_ptr<ResponseWriter> writer) {
    Spawn([this, request, writer = std::move(writer)]() mutable {
      RunChatCompletion(*chat_, *request, *writer);
      writer.reset();
    });
  };
  return r;
}

void HttpApi::Spawn(std::function<void()> work) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++running_;
  }
  std::thread([this, work = std::move(work)]() mutable {
    work();
    work = nullptr;  // the writer it holds goes before the destructor may proceed
    std::lock_guard<std::mutex> lock(mu_);
    if (--running_ == 0) idle_.notify_all();
  }).detach();
}

HttpResponse HttpApi::Messages(const HttpRequest& http) {
  auto request = std::make_shared<MessagesRequest>();
  if (std::optional<ApiError> e =
          ParseMessagesRequest(http.body, Served(), false, request.get())) {
    HttpResponse r;
    r.status = e->status;
    r.body = e->ToAnthropicJson();
    r.headers = e->headers;
    return r;
  }
  HttpResponse r;
  r.deferred = [this, request](std::shared_ptr<ResponseWriter> writer) {
    Spawn([this, request, writer = std::move(writer)]() mutable {
      RunMessages(*chat_, *request, *writer);
      writer.reset();
    });
  };
  return r;
}

HttpResponse HttpApi::CountTokens(const HttpRequest& http) {
  MessagesRequest request;
  if (std::optional<ApiError> e =
          ParseMessagesRequest(http.body, Served(), true, &request)) {
    HttpResponse r;
    r.status = e->status;
    r.body = e->ToAnthropicJson();
    return r;
  }
  return CountMessageTokens(*chat_, request);
}

HttpResponse HttpApi::Handle(const HttpRequest& request) {
  std::string route;
  HttpResponse response = Route(request, &route);
  requests_.Add({{"route", route}, {"code", std::to_string(response.status)}}).Increment();
  return response;
}

HttpResponse HttpApi::Route(const HttpRequest& request, std::string* route) {
  std::string path = request.target.substr(0, request.target.find('?'));
  const bool get = request.method == "GET";
  const bool post = request.method == "POST";
  *route = path;
  if (path == "/health") {
    if (!get)
      return OpenAiError(405, "use GET " + path, "invalid_request_error", "method_not_allowed");
    RouterHealth router = router_health_();
    json body = {{"status", "ok"},
                 {"model", model_ ? json(model_->id) : json(nullptr)},
                 {"router",
                  {{"configured", router.configured},
                   {"address", router.address},
                   {"registered", router.registered},
                   {"reachable", router.reachable},
                   {"worker_id", router.worker_id},
                   {"last_error", router.last_error}}}};
    return Json(200, body);
  }
  if (path == "/v1/models") {
    if (!get)
      return OpenAiError(405, "use GET " + path, "invalid_request_error", "method_not_allowed");
    json data = json::array();
    if (model_) {
      data.push_back({{"id", model_->id},
                      {"object", "model"},
                      {"created", model_->created},
                      {"owned_by", "expertmesh"}});
    }
    return Json(200, {{"object", "list"}, {"data", data}});
  }
  if (path == "/v1/chat/completions" && post && chat_ != nullptr) return ChatCompletion(request);
  if (path == "/v1/chat/completions" || path == "/v1/completions") {
    if (!post)
      return OpenAiError(405, "use POST " + path, "invalid_request_error", "method_not_allowed");
    return OpenAiError(501, kNotWired, "not_implemented", "not_implemented");
  }
  if (path == "/v1/messages" && post && chat_ != nullptr) return Messages(request);
  if (path == "/v1/messages/count_tokens" && post && chat_ != nullptr) {
    return CountTokens(request);
  }
  if (path == "/v1/messages" || path == "/v1/messages/count_tokens") {
    if (!post) return AnthropicError(405, "use POST " + path, "invalid_request_error");
    return AnthropicError(501, kNotWired, "api_error");
  }
  *route = "other";  // unbounded label values would grow the series without limit
  return OpenAiError(404, "no route " + request.method + " " + path, "invalid_request_error",
                     "not_found");
}

}  // namespace expertmesh::gateway
