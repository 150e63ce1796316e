#include "gateway/http_api.h"

#include <algorithm>
#include <cctype>
#include <thread>

#include "gateway/chat_request.h"
#include "gateway/completions_api.h"
#include "gateway/gateway_metrics.h"
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

// The value of header `name` (given in lower case; matched in any case), "" if not sent.
std::string Header(const HttpRequest& request, std::string_view name) {
  for (const auto& [key, value] : request.headers) {
    if (key.size() == name.size() &&
        std::equal(key.begin(), key.end(), name.begin(), [](char a, char b) {
          return std::tolower(static_cast<unsigned char>(a)) == b;
        })) {
      return value;
    }
  }
  return "";
}

// Routes whose path may be a metrics label when refused for want of a key (others are "other").
bool KnownRoute(const std::string& path) {
  return path == "/v1/models" || path == "/v1/chat/completions" || path == "/v1/completions" ||
         path == "/v1/messages" || path == "/v1/messages/count_tokens";
}

// Without a model or a tokenizer the gateway still serves /health and /v1/models.
constexpr char kNotWired[] =
    "this gateway cannot generate: it was started without --model or without a tokenizer "
    "(pass --tokenizer FILE or run scripts/setup.sh)";

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
  if (chat_ != nullptr) chat_->WaitIdle();
}

ServedModel HttpApi::Served() const {
  return ServedModel(chat_->model().id, chat_->model().aliases);
}

HttpResponse HttpApi::ChatCompletion(const HttpRequest& http, Admission admission) {
  auto request = std::make_shared<ChatRequest>();
  if (std::optional<ApiError> e = ParseChatRequest(http.body, Served(), request.get())) {
    HttpResponse r;
    r.status = e->status;
    r.body = e->ToJson();
    r.headers = e->headers;
    return r;
  }
  request->tenant = std::move(admission.tenant);
  request->lease = std::move(admission.lease);
  HttpResponse r;
  r.deferred = [this, request](std::shared_ptr<ResponseWriter> writer) {
    RunChatCompletion(*chat_, request, std::move(writer));  // returns at once
  };
  return r;
}

HttpResponse HttpApi::Completion(const HttpRequest& http, Admission admission) {
  auto request = std::make_shared<CompletionRequest>();
  const int32_t vocab = chat_->tokenizer() != nullptr ? chat_->tokenizer()->vocab_size() : 0;
  if (std::optional<ApiError> e =
          ParseCompletionRequest(http.body, Served(), vocab, request.get())) {
    return ErrorResponse(*e);
  }
  request->tenant = std::move(admission.tenant);
  request->lease = std::move(admission.lease);
  HttpResponse r;
  r.deferred = [this, request](std::shared_ptr<ResponseWriter> writer) {
    RunCompletion(*chat_, request, std::move(writer));  // returns at once
  };
  return r;
}

HttpResponse HttpApi::Messages(const HttpRequest& http, Admission admission) {
  auto request = std::make_shared<MessagesRequest>();
  if (std::optional<ApiError> e =
          ParseMessagesRequest(http.body, Served(), false, request.get(),
                               chat_->tokenizer())) {
    HttpResponse r;
    r.status = e->status;
    r.body = e->ToAnthropicJson();
    r.headers = e->headers;
    return r;
  }
  request->input.tenant = std::move(admission.tenant);
  request->input.lease = std::move(admission.lease);
  HttpResponse r;
  r.deferred = [this, request](std::shared_ptr<ResponseWriter> writer) {
    RunMessages(*chat_, request, std::move(writer));  // returns at once
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
  if (response.deferred) {
    // Counted under the status the answer really ends with, once its writer is dropped.
    auto* family = &requests_;
    response.deferred = [inner = std::move(response.deferred), family,
                         route](std::shared_ptr<ResponseWriter> writer) {
      inner(CountFinalStatus(std::move(writer), [family, route](int status) {
        family->Add({{"route", route}, {"code", std::to_string(status)}}).Increment();
      }));
    };
    return response;
  }
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
  // Every /v1 route needs a key when keys are configured; the generation routes also take one
  // of the key's concurrency slots, held until the generation ends.
  Admission admission;
  if (keys_ != nullptr && path.rfind("/v1/", 0) == 0) {
    const bool generates = post && (path == "/v1/chat/completions" ||
                                    path == "/v1/completions" || path == "/v1/messages");
    if (std::optional<HttpResponse> refused =
            keys_->Admit(Header(request, "authorization"), Header(request, "x-api-key"),
                         generates, path.rfind("/v1/messages", 0) == 0, &admission)) {
      if (!KnownRoute(path)) *route = "other";
      return *refused;
    }
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
  if (path == "/v1/chat/completions" && post && chat_ != nullptr) {
    return ChatCompletion(request, std::move(admission));
  }
  if (path == "/v1/completions" && post && chat_ != nullptr) {
    return Completion(request, std::move(admission));
  }
  if (path.rfind("/v1/models/", 0) == 0) {
    *route = "/v1/models/{id}";
    if (!get) {
      return OpenAiError(405, "use GET /v1/models/{id}", "invalid_request_error",
                         "method_not_allowed");
    }
    return ModelObject(model_, std::string_view(path).substr(sizeof("/v1/models/") - 1));
  }
  if (path == "/v1/chat/completions" || path == "/v1/completions") {
    if (!post)
      return OpenAiError(405, "use POST " + path, "invalid_request_error", "method_not_allowed");
    return OpenAiError(501, kNotWired, "not_implemented", "not_implemented");
  }
  if (path == "/v1/messages" && post && chat_ != nullptr) {
    return Messages(request, std::move(admission));
  }
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
