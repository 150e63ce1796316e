// Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`): parsing
// into the shared GenerationInput and the answer in Anthropic's shape (one message object, or
// the SSE events message_start, content_block_start/delta/stop per block, message_delta,
// message_stop, ping). Errors use Anthropic's {"type": "error", "error": {...}} shape.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/chat/parser.h"
#include "core/tokenizer/tokenizer.h"
#include "gateway/chat_request.h"
#include "gateway/generation.h"
#include "gateway/http_server.h"

namespace expertmesh::gateway {

// One `context_management` edit as the answer reports it (`applied_edits[]`).
struct AppliedContextEdit {
  std::string type;                     // "clear_thinking_20251015"
  uint32_t cleared_thinking_turns = 0;  // assistant turns whose thinking was dropped
  uint32_t cleared_input_tokens = 0;    // prompt tokens the edit removed (0 without a tokenizer)
};

struct MessagesRequest {
  std::string model;
  GenerationInput input;  // Anthropic defaults: temperature 1, top_p 1
  bool stream = false;
  bool thinking = false;       // reasoning goes into `thinking` blocks
  bool omit_thinking = false;  // thinking.display "omitted": blocks carry no text, only a signature
  bool has_tools = false;
  // tool_choice none: the stop string (in input.stop) that ends the text where a call would
  // begin; a match is reported as end_turn, not as a stop sequence.
  std::string tool_stop;
  // Set when the request has `context_management`: the edits that cleared something.
  std::optional<std::vector<AppliedContextEdit>> context_edits;
};

// Parses and validates the body. `count_only`: the count_tokens form, where max_tokens is not
// required and sampling fields are not read. `tokenizer` (may be null) only serves to count the
// prompt tokens a context-management edit removed. Errors name the field (answer with
// ToAnthropicJson()).
std::optional<ApiError> ParseMessagesRequest(std::string_view body, const ServedModel& served,
                                             bool count_only, MessagesRequest* out,
                                             const tokenizer::Tokenizer* tokenizer = nullptr);

// The signature of a thinking block: the reasoning itself, encoded (`emt1.` + web-safe
// base64), so that a client that sends the block back with display "omitted" (empty thinking)
// still gives the model its earlier reasoning. Not a cryptographic signature: nothing is
// verified, incoming signatures of other origins are accepted and ignored.
std::string ThinkingSignature(std::string_view thinking);
// The reasoning a ThinkingSignature carries; nullopt for a signature of another origin.
std::optional<std::string> ThinkingFromSignature(std::string_view signature);

// The answer in Anthropic's shape, built from the generation's deltas: the SSE events of a
// streamed answer and the message object of a whole one, with equal content. Blocks open as
// their kind of output arrives (thinking, text, one tool_use block per call) and close when the
// next one opens; a tool_use block only ever receives input_json_delta. Not thread-safe.
class AnthropicAnswer {
 public:
  AnthropicAnswer(const MessagesRequest& request, std::string id, std::string model);

  bool stream() const { return stream_; }
  // `event: message_start` (the message with empty content and usage: input_tokens the prompt
  // minus `cached_prompt_tokens`, which go to cache_read_input_tokens).
  std::string Start(uint32_t prompt_tokens, uint32_t cached_prompt_tokens = 0) const;
  // The events for one delta when streaming (empty otherwise); the content is kept either way.
  std::string Delta(const chat::StreamDelta& delta);
  // Streaming: the events that end the answer (the last block's stop, message_delta,
  // message_stop).
  std::string Finish(const GenerationOutcome& outcome);
  // Not streaming: the message object (JSON text).
  std::string Message(const GenerationOutcome& outcome);
  static std::string Ping();
  // `event: error` (an error after streaming began).
  static std::string Error(const ApiError& error);

 private:
  struct Block {
    enum class Kind { kThinking, kText, kToolUse } kind;
    std::string text;  // thinking or text; a tool_use block's input JSON text
    std::string id;    // tool_use
    std::string name;  // tool_use
    int call = -1;     // tool_use: the parser's call index
  };
  std::string OpenBlock(Block block);
  std::string CloseBlock();
  std::string AppendText(Block::Kind kind, const std::string& text);
  // At least one text or tool_use block: an empty text block when there is none.
  std::string EnsureAnswerBlock();
  std::string StopReason(const GenerationOutcome& o, bool* stop_sequence) const;

  const bool stream_;
  const bool omit_thinking_;
  const std::string tool_stop_;
  const std::optional<std::vector<AppliedContextEdit>> context_edits_;
  const std::string id_;
  const std::string model_;
  std::vector<Block> blocks_;
  bool open_ = false;  // the last block's content_block_stop is still due
};

// Runs `request` through `core` and answers through `writer`; returns at once (the generation
// owns both until it ends). Thread-safe.
void RunMessages(Generator& core, std::shared_ptr<const MessagesRequest> request,
                 std::shared_ptr<ResponseWriter> writer);

// {"input_tokens": N}, N being the usage.input_tokens the same request would report; or the
// error (Anthropic's shape).
HttpResponse CountMessageTokens(const Generator& core, const MessagesRequest& request);

}  // namespace expertmesh::gateway
