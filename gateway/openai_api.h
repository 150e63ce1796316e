// OpenAI's `POST /v1/chat/completions` answer: one chat.completion object, or SSE chunks
// (`chat.completion.chunk`, then `data: [DONE]`) written as tokens arrive. Parsing lives in
// gateway/chat_request.h.
#pragma once

#include "gateway/chat_request.h"
#include "gateway/generation.h"
#include "gateway/http_server.h"
#include "gateway/model_info.h"

namespace expertmesh::gateway {

// Runs `request` through `core` and answers through `writer`; returns at once (the generation
// owns both until it ends). Thread-safe.
void RunChatCompletion(Generator& core, std::shared_ptr<const ChatRequest> request,
                       std::shared_ptr<ResponseWriter> writer);

// `GET /v1/models/{id}`: the model object when `id` (percent-encoded, as in the path) names the
// served model or one of its aliases (the object then carries the name asked for), else 404
// model_not_found in OpenAI's shape. `model` empty = none served.
HttpResponse ModelObject(const std::optional<ModelInfo>& model, std::string_view id);

}  // namespace expertmesh::gateway
