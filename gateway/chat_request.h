// OpenAI `POST /v1/chat/completions` requests: parsing and validation into what the gateway
// runs (the V4 chat encoding inputs, sampling, stop strings, streaming options). Every refusal
// names the field at fault in OpenAI's error shape; fields whose meaning this gateway cannot
// honour yet are refused rather than silently ignored.
#pragma once

#include <cstdint>
#include <memory>
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

// The fields chat completions and legacy completions share (OpenAI defaults: temperature 1,
// top_p 1, n 1).
struct OpenAiSampling {
  double temperature = 1.0;
  double top_p = 1.0;
  uint32_t top_k = 0;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;
  uint32_t n = 1;  // choices, each its own generation (only 1 when streaming)
  std::string user;
  // Set by the route from the API key, not parsed: GenerationInput.tenant and .lease.
  std::string tenant;
  std::shared_ptr<void> lease;
};

// `tool_choice`.
enum class ToolChoice {
  kAuto,      // the model decides
  kNone,      // no call: the tools are left out of the prompt and a call opening ends the text
  kRequired,  // a call is forced: the answer begins with the DSML tool-call opening
  kFunction,  // a call of `tool_choice_name` is forced (the opening includes the invoke)
};

struct ChatRequest : OpenAiSampling {
  std::string model;
  std::vector<chat::Message> messages;  // request tools already attached (not for kNone)
  chat::EncodeOptions encode;           // thinking mode and effort
  bool has_tools = false;
  uint32_t max_tokens = 0;  // 0 = until the context is full
  // `logprobs: true` (every generated token, with top_logprobs alternatives each).
  bool logprobs = false;
  uint32_t top_logprobs = 0;
  ToolChoice tool_choice = ToolChoice::kAuto;
  std::string tool_choice_name;  // kFunction
  // What the answer is made to begin with (GenerationInput.assistant_prefix): the DSML opening
  // that forces a tool call, empty otherwise.
  std::string assistant_prefix;
};

// The DSML text that opens a tool-call block (and, with `name`, the invoke of that function),
// as the model writes it after an empty content; in thinking mode it first closes the
// reasoning.
std::string ForcedToolCallPrefix(chat::ThinkingMode mode, std::string_view name);
// The stop string that keeps tool_choice none from calling: the start of a DSML tool-call block.
std::string_view ToolCallOpeningStop();

// Request-field helpers shared by the API parsers: a present, non-null member; a finite number;
// an integer lexeme (or one that still names an integer, e.g. 1.0).
const chat::JsonValue* JsonField(const chat::JsonValue& body, std::string_view key);
std::optional<double> JsonNumber(const chat::JsonValue& v);
std::optional<int64_t> JsonInteger(const chat::JsonValue& v);

// The first steps of every generation route: the body as a JSON object, and its `model` one the
// server serves (else 404, code model_not_found). `body` and `model` are filled on success.
// The sampling fields of `body` shared by chat and legacy completions (temperature, top_p,
// top_k, seed, stop, stream, stream_options, n, user, and the penalties / logit_bias that are
// refused when they would change the distribution).
std::optional<ApiError> ParseOpenAiSampling(const chat::JsonValue& body, OpenAiSampling* out);

std::optional<ApiError> ParseBodyAndModel(std::string_view text, const ServedModel& served,
                                          chat::JsonValue* body, std::string* model);

// Parses and validates the body. `model_id` is the served model (404 for another name).
// Returns the error to answer with, if any.
std::optional<ApiError> ParseChatRequest(std::string_view body, const ServedModel& served,
                                         ChatRequest* out);

}  // namespace expertmesh::gateway
