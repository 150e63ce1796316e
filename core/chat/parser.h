// Parsing a DeepSeek-V4 completion (one assistant turn, as generated after the prompt) into an
// OpenAI-shaped message: reasoning, content, tool calls (arguments a JSON string). Streaming:
// StreamParser is fed the completion's text in arbitrary byte chunks (token texts) and emits
// reasoning, content and tool-call deltas at once, holding back only bytes that may still start
// a marker; it never emits a byte it later takes back. The whole-text parse is the streaming
// parser fed once, so both give the same message.
//
// Malformed output (possible with any weights) never throws or hangs: parsing goes on as plain
// content from the point where the text stopped following the format, and the message carries
// an error code and reason. See docs/chat_format.md for the exact rules.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/chat/json_value.h"
#include "core/chat/messages.h"

namespace expertmesh::chat {

enum class ParseError {
  kNone,
  kMissingEos,          // the text ended without <｜end▁of▁sentence｜> (e.g. a length stop)
  kMissingThinkEnd,     // thinking mode and no </think> before the answer / the end
  kUnexpectedToken,     // BOS, EOS, <think>, </think> or ｜DSML｜ inside reasoning or content
  kMalformedToolCalls,  // the DSML tool-call block does not follow the format, or is unclosed
  kTextAfterEnd,        // text after the tool calls or after EOS
};
std::string_view ParseErrorName(ParseError e);

struct ParsedToolCall {
  std::string id;
  std::string type = "function";
  std::string name;
  std::string arguments;  // JSON object text; may be incomplete when the message is malformed
};

struct ParsedMessage {
  std::string reasoning_content;
  std::string content;
  std::vector<ParsedToolCall> tool_calls;
  ParseError error = ParseError::kNone;
  std::string error_message;  // empty when error == kNone
  bool ok() const { return error == ParseError::kNone; }

  // {"role": "assistant", "content", "reasoning_content", "tool_calls": [{["id",] "type",
  // "function": {"name", "arguments"}}]} (the shape of parse_cases.jsonl without ids).
  JsonValue ToJson(bool with_ids) const;
};

// One tool-call delta in the OpenAI streaming shape: `id` and `name` are set on the first delta
// of a call only; `arguments` is the next fragment of its arguments text.
struct ToolCallDelta {
  int index = 0;
  std::string id;
  std::string name;
  std::string arguments;
};

struct StreamDelta {
  std::string reasoning_content;
  std::string content;
  std::vector<ToolCallDelta> tool_calls;  // in order; fragments of one call are merged
  bool empty() const { return reasoning_content.empty() && content.empty() && tool_calls.empty(); }
};

struct ParseOptions {
  ThinkingMode thinking_mode = ThinkingMode::kChat;
  // Tool call ids are `id_prefix` + 16 hex digits derived from (id_seed, call index): give each
  // request its own seed to make ids unique; the same seed gives the same ids.
  std::string id_prefix = "call_";
  uint64_t id_seed = 0;
};

// Not thread-safe; one per generation stream.
class StreamParser {
 public:
  explicit StreamParser(ParseOptions options);

  // Consumes the next bytes of the completion; returns what became certain.
  StreamDelta Feed(std::string_view bytes);
  // Ends the stream: releases held bytes and settles the error flag. Feed after Finish is a
  // programming error (ignored).
  StreamDelta Finish();
  // Everything emitted so far (after Finish: the parsed message).
  const ParsedMessage& message() const { return message_; }

 private:
  enum class State {
    kReasoning,
    kContent,
    kToolsOpen,     // expects ">\n" then an invoke or the end of the tool-call block
    kInvokeHeader,  // buffers ` name="...">\n` up to a parameter or the end of the invoke
    kParamHeader,   // buffers ` name="..." string="true|false">`
    kParamValue,    // streams the value up to `</｜DSML｜parameter`
    kParamClose,    // expects ">\n" then a parameter or the end of the invoke
    kToolsEnd,      // after the block: only EOS may follow
    kDone,          // after EOS
    kRaw,           // after an error: everything is content
  };

  void Run(StreamDelta* d);
  // Each step returns false when it needs more input.
  bool StepText(StreamDelta* d, bool reasoning);
  bool StepToolsOpen(StreamDelta* d);
  bool StepInvokeHeader(StreamDelta* d);
  bool StepParamHeader(StreamDelta* d);
  bool StepParamValue(StreamDelta* d);
  bool StepParamClose(StreamDelta* d);
  bool StepToolsEnd(StreamDelta* d);
  void StepRaw(StreamDelta* d, bool finishing);

  void Fail(ParseError e, std::string message);
  void EmitText(std::string_view text, bool reasoning, StreamDelta* d);
  void EmitArguments(std::string_view fragment, StreamDelta* d);
  // Marks buf_[0, cur_) as represented by emitted output (dropped from the raw fallback).
  void Represent();
  void Enter(State s);
  std::string MakeId(size_t index) const;

  ParseOptions options_;
  State state_;
  // Input not yet represented by emitted output; on an error it all becomes content.
  std::string buf_;
  size_t cur_ = 0;        // parse position in buf_
  size_t scan_from_ = 0;  // buffering states: where searching for a marker may resume
  bool finished_ = false;
  // The tool call being parsed.
  std::vector<std::string> param_names_;
  bool param_is_string_ = false;
  ParsedMessage message_;
};

// The whole-text parse (a StreamParser fed once).
ParsedMessage ParseCompletion(std::string_view text, const ParseOptions& options);

}  // namespace expertmesh::chat
