// OpenAI `POST /v1/chat/completions` requests: parsing and validation into what the gateway
// runs (the V4 chat encoding inputs, sampling, stop strings, streaming options). Every refusal
// names the field at fault in OpenAI's error shape; fields whose meaning this gateway cannot
// honour yet are refused rather than silently ignored.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/chat/json_value.h"
#include "core/chat/messages.h"

namespace expertmesh::gateway {

// An error answer in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;                                         // empty = null
  std::string code;                                          // empty = null
  std::vector<std::pair<std::string, std::string>> headers;  // e.g. Retry-After
  std::string ToJson() const;
  // Anthropic's shape: {"type": "error", "error": {"type", "message"}}, the type following the
  // status (400 invalid_request_error, 404 not_found_error, 413 request_too_large, 503 and 529
  // overloaded_error, other 5xx api_error).
  std::string ToAnthropicJson() const;
};

ApiError InvalidField(std::string param, std::string message);

// The model names a request may use: the served id, plus aliases (`--model-alias NAME=MODEL`, so
// that clients configured with model names of their own work; `*` accepts any name).
struct ServedModel {
  ServedModel(std::string model_id) : id(std::move(model_id)) {}  // NOLINT: implicit on purpose
  ServedModel(const char* model_id) : id(model_id) {}              // NOLINT: implicit on purpose
  ServedModel(std::string model_id, std::vector<std::string> model_aliases)
      : id(std::move(model_id)), aliases(std::move(model_aliases)) {}
  std::string id;
  std::vector<std::string> aliases;  // "*" = any name
  bool Serves(std::string_view name) const;
};

struct ChatRequest {
  std::string model;
  std::vector<chat::Message> messages;  // request tools already attached
  chat::EncodeOptions encode;           // thinking mode and effort
  bool has_tools = false;
  // Sampling (OpenAI defaults: temperature 1, top_p 1).
  double temperature = 1.0;
  double top_p = 1.0;
  uint32_t top_k = 0;
  std::optional<uint64_t> seed;
  uint32_t max_tokens = 0;  // 0 = until the context is full
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;
  std::string user;
};

// Request-field helpers shared by the API parsers: a present, non-null member; a finite number;
// an integer lexeme (or one that still names an integer, e.g. 1.0).
const chat::JsonValue* JsonField(const chat::JsonValue& body, std::string_view key);
std::optional<double> JsonNumber(const chat::JsonValue& v);
std::optional<int64_t> JsonInteger(const chat::JsonValue& v);

// The first steps of every generation route: the body as a JSON object, and its `model` one the
// server serves (else 404, code model_not_found). `body` and `model` are filled on success.
std::optional<ApiError> ParseBodyAndModel(std::string_view text, const ServedModel& served,
                                          chat::JsonValue* body, std::string* model);

// Parses and validates the body. `model_id` is the served model (404 for another name).
// Returns the error to answer with, if any.
std::optional<ApiError> ParseChatRequest(std::string_view body, const ServedModel& served,
                                         ChatRequest* out);

}  // namespace expertmesh::gateway
