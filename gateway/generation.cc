#include "gateway/generation.h"

#include <atomic>
#include <random>

#include "absl/strings/str_format.h"
#include "core/chat/encoder.h"
#include "core/chat/parser.h"
#include "core/rpc/channel.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "gateway/stop_matcher.h"
#include "grpcpp/grpcpp.h"
#include "nlohmann/json.hpp"

namespace expertmesh::gateway {
std::string Dump(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string NewId(std::string_view prefix) {
  static std::atomic<uint64_t> counter{0};
  thread_local std::mt19937_64 rng(std::random_device{}());
  return absl::StrFormat("%s%016x%04x", prefix, rng(), counter.fetch_add(1) & 0xffff);
}

HttpResponse ErrorResponse(const ApiError& e, bool anthropic) {
  HttpResponse r;
  r.status = e.status;
  r.body = anthropic ? e.ToAnthropicJson() : e.ToJson();
  r.headers = e.headers;
  return r;
}

ApiError Unavailable(const std::string& message) {
  ApiError e;
  e.status = 503;
  e.type = "server_error";
  e.code = "overloaded";
  e.message = message;
  e.headers = {{"Retry-After", "1"}};
  return e;
}

namespace {

using nlohmann::json;

// The answer for a Generate call that failed before any token.
ApiError FromGrpc(const grpc::Status& s, const std::string& address) {
  const std::string what = "attention worker " + address + ": " + s.error_message();
  switch (s.error_code()) {
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::UNAVAILABLE:
      return Unavailable("no attention worker can take the request now (" + what + ")");
    case grpc::StatusCode::INVALID_ARGUMENT:
      return InvalidField("", what);
    case grpc::StatusCode::DEADLINE_EXCEEDED: {
      ApiError e;
      e.status = 504;
      e.type = "server_error";
      e.code = "timeout";
      e.message = "generation timed out (" + what + ")";
      return e;
    }
    default: {
      ApiError e;
      e.status = 502;
      e.type = "server_error";
      e.message = "generation failed (" + what + ")";
      return e;
    }
  }
}

// Cancels the Generate call when the client hangs up; the context pointer is cleared before
// the context dies.
struct CancelHook {
  std::mutex mu;
  grpc::ClientContext* context = nullptr;
  bool cancelled = false;
  void Cancel() {
    std::lock_guard<std::mutex> lock(mu);
    cancelled = true;
    if (context != nullptr) context->TryCancel();
  }
};

}  // namespace

Generator::Generator(ModelInfo model, const tokenizer::Tokenizer* tokenizer,
                                 GenerationOptions options)
    : model_(std::move(model)), tokenizer_(tokenizer), options_(std::move(options)) {
  if (tokenizer_ != nullptr) eos_id_ = tokenizer_->TokenToId(chat::kEos);
}

std::shared_ptr<grpc::Channel> Generator::Channel(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& c = channels_[address];
  if (c == nullptr) c = rpc::MakeChannel(address);
  return c;
}

std::optional<ApiError> Generator::PickWorker(const std::string& tenant,
                                                    std::string* address) {
  if (!options_.attention_worker.empty()) {
    *address = options_.attention_worker;
    return std::nullopt;
  }
  if (options_.router.empty()) {
    return Unavailable("the gateway has neither --router nor --attention-worker");
  }
  v1::Router::Stub stub(Channel(options_.router));
  grpc::ClientContext ctx;
  rpc::SetTimeout(ctx, options_.pick_timeout);
  v1::PickAttentionWorkerRequest req;
  req.set_tenant(tenant);
  v1::PickAttentionWorkerResponse resp;
  grpc::Status s = stub.PickAttentionWorker(&ctx, req, &resp);
  if (!s.ok() || resp.address().empty()) {
    return Unavailable("no attention worker is available (router " + options_.router + ": " +
                       (s.ok() ? std::string("empty answer") : s.error_message()) + ")");
  }
  *address = resp.address();
  return std::nullopt;
}

std::optional<ApiError> Generator::PromptIds(const GenerationInput& input,
                                                   std::vector<int32_t>* ids) const {
  if (tokenizer_ == nullptr) return Unavailable("the gateway has no tokenizer loaded");
  absl::StatusOr<chat::EncodedChat> encoded = chat::EncodeChat(input.messages, input.encode);
  if (!encoded.ok()) return InvalidField("messages", std::string(encoded.status().message()));
  absl::StatusOr<std::vector<int32_t>> tokens = chat::ChatIds(*encoded, *tokenizer_);
  if (!tokens.ok()) {
    ApiError e = Unavailable("the tokenizer cannot encode the chat: " +
                             std::string(tokens.status().message()));
    e.status = 500;
    e.headers.clear();
    return e;
  }
  *ids = std::move(*tokens);
  return std::nullopt;
}

void Generator::Generate(const GenerationInput& input, const std::string& id,
                               ResponseWriter& writer, GenerationSink& sink) {
  std::vector<int32_t> ids;
  if (std::optional<ApiError> e = PromptIds(input, &ids)) {
    sink.Fail(*e);
    return;
  }
  const uint32_t prompt_tokens = static_cast<uint32_t>(ids.size());
  uint32_t max_new = input.max_tokens;
  if (model_.context_length > 0) {
    if (prompt_tokens >= model_.context_length) {
      sink.Fail(InvalidField("messages", "the prompt is " + std::to_string(prompt_tokens) +
                                             " tokens; the model's context is " +
                                             std::to_string(model_.context_length)));
      return;
    }
    // More than the context leaves is clamped rather than refused (agents send large values).
    const uint32_t left = model_.context_length - prompt_tokens;
    if (max_new == 0 || max_new > left) max_new = left;
  }

  std::string address;
  if (std::optional<ApiError> e = PickWorker(input.tenant, &address)) {
    sink.Fail(*e);
    return;
  }

  v1::SequenceRequest seq;
  seq.set_sequence_id(id);
  seq.set_tenant(input.tenant);
  for (int32_t t : ids) seq.add_prompt_ids(static_cast<uint32_t>(t));
  v1::SamplingParams* sp = seq.mutable_sampling();
  sp->set_temperature(static_cast<float>(input.temperature));
  sp->set_top_p(static_cast<float>(input.top_p));
  sp->set_top_k(input.top_k);
  if (input.seed) sp->set_seed(*input.seed);
  sp->set_max_new_tokens(max_new);
  if (eos_id_) sp->add_stop_token_ids(static_cast<uint32_t>(*eos_id_));

  v1::AttentionWorker::Stub stub(Channel(address));
  grpc::ClientContext ctx;
  rpc::SetTimeout(ctx, options_.generate_timeout);
  auto hook = std::make_shared<CancelHook>();
  {
    std::lock_guard<std::mutex> lock(hook->mu);
    hook->context = &ctx;
  }
  writer.OnClientGone([hook] { hook->Cancel(); });
  std::unique_ptr<grpc::ClientReader<v1::SequenceTokens>> reader = stub.Generate(&ctx, seq);

  tokenizer::StreamDecoder decoder(*tokenizer_);
  StopMatcher stop(input.stop);
  chat::ParseOptions popts;
  popts.thinking_mode = input.encode.thinking_mode;
  popts.id_seed = std::hash<std::string>()(id);
  chat::StreamParser parser(popts);

  bool client_ok = true;
  auto emit = [&](const chat::StreamDelta& d) {
    if (d.empty() || !client_ok) return;
    client_ok = sink.Delta(d);
  };

  uint32_t completion_tokens = 0;
  v1::FinishReason worker_finish = v1::FINISH_REASON_UNSPECIFIED;
  v1::SequenceTokens msg;
  bool got_any = false;
  while (reader->Read(&msg)) {
    if (!got_any) {
      got_any = true;
      client_ok = sink.Begin(prompt_tokens);
    }
    for (uint32_t t : msg.token_ids()) {
      ++completion_tokens;
      std::string text = decoder.Add(static_cast<int32_t>(t));
      std::string safe = stop.Feed(text);
      emit(parser.Feed(safe));
      if (stop.stopped()) break;
    }
    if (msg.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) worker_finish = msg.finish_reason();
    if (stop.stopped() || !client_ok) {
      hook->Cancel();
      break;
    }
  }
  if (stop.stopped() || !client_ok) {
    while (reader->Read(&msg)) {
    }
  }
  grpc::Status status = reader->Finish();
  {
    std::lock_guard<std::mutex> lock(hook->mu);
    hook->context = nullptr;
  }
  if (writer.client_gone() || !client_ok) return;  // nobody to answer; the sequence is freed

  if (!stop.stopped() && !status.ok()) {
    sink.Fail(FromGrpc(status, address));
    return;
  }

  // The end of the text: held bytes, then (on the model's own end) EOS, so the parser settles.
  std::string tail;
  if (!stop.stopped()) {
    tail = stop.Feed(decoder.Flush());
    tail += stop.Flush();
  }
  emit(parser.Feed(tail));
  if (!stop.stopped() && worker_finish == v1::FINISH_REASON_STOP) emit(parser.Feed(chat::kEos));
  emit(parser.Finish());
  if (!client_ok) return;

  GenerationOutcome outcome;
  outcome.prompt_tokens = prompt_tokens;
  outcome.completion_tokens = completion_tokens;
  outcome.stopped_by_string = stop.stopped();
  outcome.stop_sequence = stop.matched();
  outcome.length = !stop.stopped() && worker_finish == v1::FINISH_REASON_LENGTH;
  outcome.message = &parser.message();
  sink.Finish(outcome);
}

}  // namespace expertmesh::gateway
