// Typed chat requests: OpenAI-shaped messages (system, developer, user, assistant, tool,
// latest_reminder) and the DeepSeek-V4 encoding options, parsed from JSON with errors that name
// the field at fault ("messages[3].tool_calls[0].function.arguments: must be a string").
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/chat/json_value.h"

namespace expertmesh::chat {

enum class Role { kSystem, kDeveloper, kUser, kAssistant, kTool, kLatestReminder };
std::string_view RoleName(Role role);

// One part of a list-valued `content` ({"type": "text", "text": ...} or another type, kept only
// for tool results, which render it as "[Unsupported TYPE]").
struct ContentPart {
  std::string type;
  std::string text;
};

struct ToolCall {
  std::string id;
  std::string type = "function";
  std::string name;
  std::string arguments;  // JSON text, as the OpenAI API carries it
};

struct Message {
  Role role = Role::kUser;
  // `content` as a string; a list of text parts is joined with "\n\n" (tool results keep their
  // parts in `parts`, see below).
  std::string content;
  // Tool messages whose content was a list: the parts as given.
  std::optional<std::vector<ContentPart>> parts;
  std::string reasoning_content;
  std::vector<ToolCall> tool_calls;
  std::string tool_call_id;
  // DeepSeek task ("action", "query", "authority", "domain", "title", "read_url").
  std::optional<std::string> task;
  // Tool definitions (each the OpenAI {"type": "function", "function": {...}} object).
  std::vector<JsonValue> tools;
  std::optional<JsonValue> response_format;
  bool wo_eos = false;
};

enum class ThinkingMode { kChat, kThinking };
enum class ReasoningEffort { kNone, kHigh, kMax };

struct EncodeOptions {
  ThinkingMode thinking_mode = ThinkingMode::kChat;
  bool drop_thinking = true;  // forced off when any message has tools
  ReasoningEffort reasoning_effort = ReasoningEffort::kNone;
};

// Parses a `messages` array. Unknown fields are ignored (clients send e.g. `name`); wrong types,
// unknown roles, invalid tasks and tool calls without a function name are InvalidArgument errors
// naming the field.
absl::StatusOr<std::vector<Message>> ParseMessages(const JsonValue& messages);
// Parses an `options` object ({thinking_mode, drop_thinking, reasoning_effort}); null/absent
// fields keep their defaults.
absl::StatusOr<EncodeOptions> ParseEncodeOptions(const JsonValue& options);
absl::StatusOr<ThinkingMode> ParseThinkingMode(const JsonValue& value, std::string_view field);

// Request-level tools (the OpenAI `tools` array) go on the first message when it is a system
// message, as the official encoder expects; otherwise an empty system message carrying them is
// put first.
void AttachRequestTools(std::vector<JsonValue> tools, std::vector<Message>* messages);
absl::StatusOr<std::vector<JsonValue>> ParseTools(const JsonValue& tools, std::string_view field);

}  // namespace expertmesh::chat
