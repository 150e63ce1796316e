// OpenAI's `POST /v1/chat/completions` answer: one chat.completion object, or SSE chunks
// (`chat.completion.chunk`, then `data: [DONE]`) written as tokens arrive. Parsing lives in
// gateway/chat_request.h.
#pragma once

#include "gateway/chat_request.h"
#include "gateway/generation.h"
#include "gateway/http_server.h"

namespace expertmesh::gateway {

// Runs `request` through `core` and answers through `writer` (blocking). Thread-safe.
void RunChatCompletion(Generator& core, const ChatRequest& request, ResponseWriter& writer);

}  // namespace expertmesh::gateway
