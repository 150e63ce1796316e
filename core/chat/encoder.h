// DeepSeek-V4 chat encoding (../shared/design/CHAT_FORMAT.md): messages -> prompt string and
// token ids. The prompt is also kept as segments so that control strings written by the
// template become their single control ids while text from the client (contents, tool results,
// tool arguments and names, reasoning, tool schemas) is always tokenized as ordinary text: a
// client cannot forge `<｜Assistant｜>` or `</think>`.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/chat/messages.h"
#include "core/tokenizer/tokenizer.h"

namespace expertmesh::chat {

// The V4 special strings (U+FF5C ｜, U+2581 ▁).
inline constexpr std::string_view kBos = "<｜begin▁of▁sentence｜>";
inline constexpr std::string_view kEos = "<｜end▁of▁sentence｜>";
inline constexpr std::string_view kUser = "<｜User｜>";
inline constexpr std::string_view kAssistant = "<｜Assistant｜>";
inline constexpr std::string_view kLatestReminder = "<｜latest_reminder｜>";
inline constexpr std::string_view kThinkStart = "<think>";
inline constexpr std::string_view kThinkEnd = "</think>";
inline constexpr std::string_view kDsml = "｜DSML｜";

// A piece of the prompt. Control segments hold exactly one control string of the template;
// text segments are ordinary text (template prose or client text, `client` tells which).
struct Segment {
  enum class Kind { kText, kControl };
  Kind kind = Kind::kText;
  std::string text;
  bool client = false;
};

struct EncodedChat {
  std::string prompt;             // BOS included
  std::vector<Segment> segments;  // concatenated texts == prompt
};

// Encodes `messages` (OpenAI shapes; tool messages are merged into user turns as the official
// encoder does). Errors: InvalidArgument naming the message at fault (e.g. a tool message whose
// content list holds a non-object).
absl::StatusOr<EncodedChat> EncodeChat(const std::vector<Message>& messages,
                                       const EncodeOptions& options);

// Token ids of an encoded chat: each maximal run of adjacent text segments is encoded with
// added-token matching off, each control segment becomes its id. Where the client text holds
// no added-token string the result equals tokenizer.Encode(prompt). Errors: NotFound when the
// tokenizer has no token for a control string (e.g. `<think>` with a plain V3 tokenizer).
absl::StatusOr<std::vector<int32_t>> ChatIds(const EncodedChat& chat,
                                             const tokenizer::Tokenizer& tokenizer);

}  // namespace expertmesh::chat
