// The generation path of `POST /v1/chat/completions`: V4 chat encoding, tokenizing, picking an
// attention worker (router, by load; or a fixed one), the Generate stream, incremental
// detokenizing, stop strings, the streaming chat parser, and the answer in OpenAI's shape
// (one JSON response, or SSE chunks written as tokens arrive).
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "absl/time/time.h"
#include "core/tokenizer/tokenizer.h"
#include "gateway/chat_request.h"
#include "gateway/http_server.h"
#include "gateway/model_info.h"
#include "grpcpp/channel.h"

namespace expertmesh::gateway {

struct GenerationOptions {
  std::string router;            // "host:port"; PickAttentionWorker chooses the worker
  std::string attention_worker;  // fixed worker, used when set (or when there is no router)
  absl::Duration generate_timeout = absl::Minutes(30);  // deadline of one Generate call
  absl::Duration pick_timeout = absl::Seconds(2);
};

class ChatCompletions {
 public:
  // `tokenizer` must outlive this.
  ChatCompletions(ModelInfo model, const tokenizer::Tokenizer* tokenizer,
                  GenerationOptions options);

  // Runs `request` to its end and answers through `writer` (blocking: call it on a thread of
  // its own). A client that hangs up cancels the Generate call at once. Thread-safe.
  void Run(const ChatRequest& request, ResponseWriter& writer);

  const ModelInfo& model() const { return model_; }

 private:
  std::shared_ptr<grpc::Channel> Channel(const std::string& address);
  // The attention worker for a request, or the error to answer (503 with Retry-After).
  std::optional<ApiError> PickWorker(const std::string& tenant, std::string* address);

  const ModelInfo model_;
  const tokenizer::Tokenizer* const tokenizer_;
  const GenerationOptions options_;
  std::optional<int32_t> eos_id_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_;
};

}  // namespace expertmesh::gateway
