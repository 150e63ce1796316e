// Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`): parsing
// into the shared GenerationInput and the answer in Anthropic's shape (one message object, or
// the SSE events message_start, content_block_start/delta/stop per block, message_delta,
// message_stop). Errors use Anthropic's {"type": "error", "error": {...}} shape.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "gateway/generation.h"
#include "gateway/chat_request.h"
#include "gateway/http_server.h"

namespace expertmesh::gateway {

struct MessagesRequest {
  std::string model;
  GenerationInput input;  // Anthropic defaults: temperature 1, top_p 1
  bool stream = false;
  bool thinking = false;  // reasoning goes into a `thinking` block
};

// Parses and validates the body. `count_only`: the count_tokens form, where max_tokens is not
// required and sampling fields are not read. Errors name the field (answer with
// ToAnthropicJson()).
std::optional<ApiError> ParseMessagesRequest(std::string_view body, const ServedModel& served,
                                             bool count_only, MessagesRequest* out);

// Runs `request` through `core` and answers through `writer` (blocking). Thread-safe.
void RunMessages(Generator& core, const MessagesRequest& request, ResponseWriter& writer);

// {"input_tokens": N}, N being the usage.input_tokens the same request would report; or the
// error (Anthropic's shape).
HttpResponse CountMessageTokens(const Generator& core, const MessagesRequest& request);

}  // namespace expertmesh::gateway
