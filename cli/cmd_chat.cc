// `expertmesh chat-encode` and `expertmesh chat-parse`: JSON Lines in, one JSON line out per
// input line, in order. A bad line gets {"error": "..."} and the rest go on.
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cli/commands.h"
#include "core/base/status_macros.h"
#include "core/chat/encoder.h"
#include "core/chat/json_value.h"
#include "core/chat/messages.h"
#include "core/chat/parser.h"
#include "core/tokenizer/tokenizer.h"

namespace expertmesh::cli {
namespace {

using chat::JsonValue;

void WriteLine(const JsonValue& v) {
  std::string line = v.DumpPython();
  line.push_back('\n');
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fflush(stdout);
}

void WriteError(const absl::Status& status) {
  WriteLine(JsonValue::Object({{"error", JsonValue::String(std::string(status.message()))}}));
}

absl::StatusOr<JsonValue> EncodeLine(const std::string& line, const tokenizer::Tokenizer& tok) {
  EM_ASSIGN_OR_RETURN(JsonValue request, chat::ParseJson(line));
  if (!request.is_object()) return absl::InvalidArgumentError("a line must be a JSON object");
  const JsonValue* messages = request.Find("messages");
  if (messages == nullptr) return absl::InvalidArgumentError("messages: missing");
  EM_ASSIGN_OR_RETURN(std::vector<chat::Message> parsed, chat::ParseMessages(*messages));
  chat::EncodeOptions options;
  if (const JsonValue* o = request.Find("options")) {
    EM_ASSIGN_OR_RETURN(options, chat::ParseEncodeOptions(*o));
  }
  if (const JsonValue* t = request.Find("tools")) {
    EM_ASSIGN_OR_RETURN(std::vector<JsonValue> tools, chat::ParseTools(*t, "tools"));
    chat::AttachRequestTools(std::move(tools), &parsed);
  }
  EM_ASSIGN_OR_RETURN(chat::EncodedChat encoded, chat::EncodeChat(parsed, options));
  EM_ASSIGN_OR_RETURN(std::vector<int32_t> ids, chat::ChatIds(encoded, tok));
  std::vector<JsonValue> id_values;
  id_values.reserve(ids.size());
  for (int32_t id : ids) id_values.push_back(JsonValue::Number(std::to_string(id)));
  return JsonValue::Object({{"prompt", JsonValue::String(std::move(encoded.prompt))},
                            {"ids", JsonValue::Array(std::move(id_values))}});
}

absl::StatusOr<JsonValue> ParseLine(const std::string& line, bool with_ids) {
  EM_ASSIGN_OR_RETURN(JsonValue request, chat::ParseJson(line));
  if (!request.is_object()) return absl::InvalidArgumentError("a line must be a JSON object");
  const JsonValue* completion = request.Find("completion");
  if (completion == nullptr || !completion->is_string()) {
    return absl::InvalidArgumentError("completion: missing or not a string");
  }
  chat::ParseOptions options;
  if (const JsonValue* m = request.Find("thinking_mode"); m != nullptr && !m->is_null()) {
    EM_ASSIGN_OR_RETURN(options.thinking_mode, chat::ParseThinkingMode(*m, "thinking_mode"));
  }
  chat::ParsedMessage parsed = chat::ParseCompletion(completion->str(), options);
  std::vector<JsonValue::Member> out = {{"parsed", parsed.ToJson(with_ids)}};
  if (!parsed.ok()) {
    out.emplace_back(
        "malformed",
        JsonValue::Object(
            {{"error", JsonValue::String(std::string(chat::ParseErrorName(parsed.error)))},
             {"message", JsonValue::String(parsed.error_message)}}));
  }
  return JsonValue::Object(std::move(out));
}

bool WantsHelp(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) return true;
  }
  return false;
}

}  // namespace

int RunChatEncode(int argc, char** argv) {
  if (WantsHelp(argc, argv)) {
    std::printf(
        "usage: expertmesh chat-encode [--tokenizer FILE] < requests.jsonl\n\n"
        "Reads JSON Lines {\"messages\": [...], \"options\": {\"thinking_mode\": "
        "\"chat|thinking\",\n"
        "\"drop_thinking\": bool, \"reasoning_effort\": \"none|high|max\"}, \"tools\": [...]} and\n"
        "writes {\"prompt\": \"...\", \"ids\": [...]} per line (DeepSeek-V4 chat format; client\n"
        "text never becomes control ids). A bad line writes {\"error\": \"...\"}.\n\n"
        "  --tokenizer FILE  a tokenizer.json used as it is (default: the V4 tokenizer)\n");
    return 0;
  }
  std::string path;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--tokenizer") == 0 && i + 1 < argc) {
      path = argv[++i];
    } else {
      std::fprintf(stderr, "chat-encode: unknown argument '%s' (see --help)\n", argv[i]);
      return 2;
    }
  }
  absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> tok = tokenizer::LoadTokenizer(path);
  if (!tok.ok()) {
    std::fprintf(stderr, "chat-encode: %s\n", std::string(tok.status().message()).c_str());
    return 1;
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    absl::StatusOr<JsonValue> out = EncodeLine(line, **tok);
    if (out.ok()) {
      WriteLine(*out);
    } else {
      WriteError(out.status());
    }
  }
  return 0;
}

int RunChatParse(int argc, char** argv) {
  if (WantsHelp(argc, argv)) {
    std::printf(
        "usage: expertmesh chat-parse [--with-ids] < completions.jsonl\n\n"
        "Reads JSON Lines {\"completion\": \"...\", \"thinking_mode\": \"chat|thinking\"} and "
        "writes\n"
        "{\"parsed\": {\"role\": \"assistant\", \"content\", \"reasoning_content\", "
        "\"tool_calls\"}}\n"
        "per line; a completion that does not follow the format also gets\n"
        "\"malformed\": {\"error\", \"message\"} (its text is then kept as content). A bad line\n"
        "writes {\"error\": \"...\"}.\n\n"
        "  --with-ids  give each tool call a deterministic id (call_<16 hex>)\n");
    return 0;
  }
  bool with_ids = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--with-ids") == 0) {
      with_ids = true;
    } else {
      std::fprintf(stderr, "chat-parse: unknown argument '%s' (see --help)\n", argv[i]);
      return 2;
    }
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    absl::StatusOr<JsonValue> out = ParseLine(line, with_ids);
    if (out.ok()) {
      WriteLine(*out);
    } else {
      WriteError(out.status());
    }
  }
  return 0;
}

}  // namespace expertmesh::cli
