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

// Parses and validates the body. `model_id` is the served model (404 for another name).
// Returns the error to answer with, if any.
std::optional<ApiError> ParseChatRequest(std::string_view body, const std::string& model_id,
                                         ChatRequest* out);

}  // namespace expertmesh::gateway
