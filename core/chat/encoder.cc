#include "core/chat/encoder.h"

#include <algorithm>
#include <map>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/chat/json_value.h"

namespace expertmesh::chat {
namespace {

// Every control string the template itself writes. Template text is split on these so that
// each becomes one control segment (and one id), as tokenizing the whole prompt would make it.
constexpr std::string_view kTemplateControls[] = {kBos,
                                                  kEos,
                                                  kUser,
                                                  kAssistant,
                                                  kLatestReminder,
                                                  kThinkStart,
                                                  kThinkEnd,
                                                  kDsml,
                                                  "<｜action｜>",
                                                  "<｜query｜>",
                                                  "<｜authority｜>",
                                                  "<｜domain｜>",
                                                  "<｜title｜>",
                                                  "<｜read_url｜>"};

std::string_view TaskToken(const std::string& task) {
  if (task == "action") return "<｜action｜>";
  if (task == "query") return "<｜query｜>";
  if (task == "authority") return "<｜authority｜>";
  if (task == "domain") return "<｜domain｜>";
  if (task == "title") return "<｜title｜>";
  return "<｜read_url｜>";  // tasks were validated when the messages were parsed
}

constexpr std::string_view kReasoningEffortMax =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n";

constexpr std::string_view kToolsHead =
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools "
    "by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n"
    "<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" "
    "string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types "
    "(numbers, booleans, arrays, objects), pass the value in JSON format and set "
    "`string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning "
    "inside <think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n";
constexpr std::string_view kToolsTail =
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke "
    "tool calls.\n";
constexpr std::string_view kResponseFormatHead =
    "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

class PromptBuilder {
 public:
  // Template text: its control strings become control segments.
  void Template(std::string_view s) {
    while (!s.empty()) {
      size_t best = std::string_view::npos;
      std::string_view control;
      for (std::string_view c : kTemplateControls) {
        size_t p = s.find(c);
        if (p < best) best = p, control = c;
      }
      if (best == std::string_view::npos) {
        AddText(s, false);
        return;
      }
      AddText(s.substr(0, best), false);
      Control(control);
      s.remove_prefix(best + control.size());
    }
  }
  // Client text: always ordinary text, whatever it contains.
  void Client(std::string_view s) { AddText(s, true); }
  void Control(std::string_view s) {
    out_.prompt.append(s);
    out_.segments.push_back(Segment{Segment::Kind::kControl, std::string(s), false});
  }
  EncodedChat Take() { return std::move(out_); }

 private:
  void AddText(std::string_view s, bool client) {
    if (s.empty()) return;
    out_.prompt.append(s);
    if (!out_.segments.empty() && out_.segments.back().kind == Segment::Kind::kText &&
        out_.segments.back().client == client) {
      out_.segments.back().text.append(s);
      return;
    }
    out_.segments.push_back(Segment{Segment::Kind::kText, std::string(s), client});
  }

  EncodedChat out_;
};

// A content block of a merged user turn.
struct Block {
  bool tool_result = false;
  std::string text;         // text block, or tool result content given as a string
  std::string tool_use_id;  // tool result
  const std::vector<ContentPart>* parts = nullptr;  // tool result content given as a list
};

// A message after the official preprocessing (tool messages merged into user turns).
struct Turn {
  Role role = Role::kUser;
  const Message* msg = nullptr;  // the source message (the first one for a merged user turn)
  std::vector<Block> blocks;     // user turns only
  std::optional<std::string> task;
};

std::vector<Turn> MergeToolMessages(const std::vector<Message>& messages) {
  std::vector<Turn> turns;
  for (const Message& m : messages) {
    if (m.role == Role::kTool) {
      Block b;
      b.tool_result = true;
      b.tool_use_id = m.tool_call_id;
      if (m.parts.has_value()) {
        b.parts = &*m.parts;
      } else {
        b.text = m.content;
      }
      if (!turns.empty() && turns.back().role == Role::kUser) {
        turns.back().blocks.push_back(std::move(b));
      } else {
        Turn t;
        t.role = Role::kUser;
        t.msg = &m;
        t.blocks.push_back(std::move(b));
        turns.push_back(std::move(t));
      }
    } else if (m.role == Role::kUser) {
      Block b;
      b.text = m.content;
      // A user message continues the previous user turn (tool results or text) unless that
      // turn carries a task; its own task is then dropped, as the official encoder does.
      if (!turns.empty() && turns.back().role == Role::kUser && !turns.back().task.has_value()) {
        turns.back().blocks.push_back(std::move(b));
      } else {
        Turn t;
        t.role = Role::kUser;
        t.msg = &m;
        t.task = m.task;
        t.blocks.push_back(std::move(b));
        turns.push_back(std::move(t));
      }
    } else {
      Turn t;
      t.role = m.role;
      t.msg = &m;
      t.task = m.task;
      turns.push_back(std::move(t));
    }
  }
  return turns;
}

// Tool results follow the order of the calls of the latest assistant message with tool calls;
// text blocks keep their slots; unknown ids sort as position 0 (stable).
void SortToolResults(std::vector<Turn>* turns) {
  std::map<std::string, size_t> order;
  for (Turn& t : *turns) {
    if (t.role == Role::kAssistant && !t.msg->tool_calls.empty()) {
      order.clear();
      for (size_t k = 0; k < t.msg->tool_calls.size(); ++k) {
        const std::string& id = t.msg->tool_calls[k].id;
        if (!id.empty()) order[id] = k;
      }
    } else if (t.role == Role::kUser) {
      std::vector<Block> results;
      for (const Block& b : t.blocks) {
        if (b.tool_result) results.push_back(b);
      }
      if (results.size() <= 1 || order.empty()) continue;
      std::stable_sort(results.begin(), results.end(), [&](const Block& a, const Block& b) {
        auto ia = order.find(a.tool_use_id);
        auto ib = order.find(b.tool_use_id);
        return (ia == order.end() ? 0 : ia->second) < (ib == order.end() ? 0 : ib->second);
      });
      size_t next = 0;
      for (Block& b : t.blocks) {
        if (b.tool_result) b = results[next++];
      }
    }
  }
}

int LastUserIndex(const std::vector<Turn>& turns) {
  for (int i = static_cast<int>(turns.size()) - 1; i >= 0; --i) {
    if (turns[i].role == Role::kUser || turns[i].role == Role::kDeveloper) return i;
  }
  return -1;
}

void RenderTools(const std::vector<JsonValue>& tools, PromptBuilder* b) {
  std::string schemas;
  for (size_t k = 0; k < tools.size(); ++k) {
    if (k > 0) schemas.push_back('\n');
    schemas.append(tools[k].Find("function")->DumpPython());
  }
  b->Template("\n\n");
  b->Template(kToolsHead);
  b->Client(schemas);
  b->Template(kToolsTail);
}

void RenderToolsAndFormat(const Message& m, PromptBuilder* b) {
  if (!m.tools.empty()) RenderTools(m.tools, b);
  if (m.response_format.has_value()) {
    b->Template(kResponseFormatHead);
    b->Client(m.response_format->DumpPython());
  }
}

void RenderToolCall(const ToolCall& call, PromptBuilder* b) {
  b->Template("<｜DSML｜invoke name=\"");
  b->Client(call.name);
  b->Template("\">\n");
  absl::StatusOr<JsonValue> parsed = ParseJson(call.arguments);
  std::vector<JsonValue::Member> params;
  if (parsed.ok() && parsed->is_object()) {
    params = parsed->members();
  } else {
    // Not a JSON object: one string parameter holding the text as given.
    params.emplace_back("arguments", JsonValue::String(call.arguments));
  }
  for (size_t k = 0; k < params.size(); ++k) {
    if (k > 0) b->Template("\n");
    const auto& [key, value] = params[k];
    b->Template("<｜DSML｜parameter name=\"");
    b->Client(key);
    if (value.is_string()) {
      b->Template("\" string=\"true\">");
      b->Client(value.str());
    } else {
      b->Template("\" string=\"false\">");
      b->Client(value.DumpPython());
    }
    b->Template("</｜DSML｜parameter>");
  }
  b->Template("\n</｜DSML｜invoke>");
}

void RenderUserBlocks(const Turn& t, PromptBuilder* b) {
  for (size_t k = 0; k < t.blocks.size(); ++k) {
    if (k > 0) b->Template("\n\n");
    const Block& block = t.blocks[k];
    if (!block.tool_result) {
      b->Client(block.text);
      continue;
    }
    b->Template("<tool_result>");
    if (block.parts == nullptr) {
      b->Client(block.text);
    } else {
      for (size_t p = 0; p < block.parts->size(); ++p) {
        if (p > 0) b->Template("\n\n");
        const ContentPart& part = (*block.parts)[p];
        if (part.type == "text") {
          b->Client(part.text);
        } else {
          b->Template("[Unsupported ");
          b->Client(part.type);
          b->Template("]");
        }
      }
    }
    b->Template("</tool_result>");
  }
}

}  // namespace

absl::StatusOr<EncodedChat> EncodeChat(const std::vector<Message>& messages,
                                       const EncodeOptions& options) {
  const bool thinking = options.thinking_mode == ThinkingMode::kThinking;
  std::vector<Turn> turns = MergeToolMessages(messages);
  SortToolResults(&turns);

  bool drop_thinking = options.drop_thinking;
  for (const Message& m : messages) {
    // Merging rebuilds user turns without their tools, so only other roles' tools count.
    if (!m.tools.empty() && m.role != Role::kUser && m.role != Role::kTool) drop_thinking = false;
  }
  if (thinking && drop_thinking) {
    // Developer turns before the last user turn are dropped; the reasoning of earlier assistant
    // turns is not rendered (see the reasoning part below).
    const int last_user = LastUserIndex(turns);
    std::vector<Turn> kept;
    for (int i = 0; i < static_cast<int>(turns.size()); ++i) {
      if (turns[i].role == Role::kDeveloper && i < last_user) continue;
      kept.push_back(std::move(turns[i]));
    }
    turns = std::move(kept);
  }

  const int last_user = LastUserIndex(turns);
  const int n = static_cast<int>(turns.size());
  PromptBuilder b;
  b.Control(kBos);
  for (int i = 0; i < n; ++i) {
    const Turn& t = turns[i];
    const Message& m = *t.msg;
    if (i == 0 && thinking && options.reasoning_effort == ReasoningEffort::kMax) {
      b.Template(kReasoningEffortMax);
    }
    switch (t.role) {
      case Role::kSystem:
        b.Client(m.content);
        RenderToolsAndFormat(m, &b);
        break;
      case Role::kDeveloper:
        b.Control(kUser);
        b.Client(m.content);
        RenderToolsAndFormat(m, &b);
        break;
      case Role::kUser:
        b.Control(kUser);
        RenderUserBlocks(t, &b);
        break;
      case Role::kLatestReminder:
        b.Control(kLatestReminder);
        b.Client(m.content);
        break;
      case Role::kAssistant: {
        const bool prev_has_task = i > 0 && turns[i - 1].task.has_value();
        if (thinking && !prev_has_task && (!drop_thinking || i > last_user)) {
          b.Client(m.reasoning_content);
          b.Control(kThinkEnd);
        }
        b.Client(m.content);
        if (!m.tool_calls.empty()) {
          b.Template("\n\n<｜DSML｜tool_calls>\n");
          for (size_t k = 0; k < m.tool_calls.size(); ++k) {
            if (k > 0) b.Template("\n");
            RenderToolCall(m.tool_calls[k], &b);
          }
          b.Template("\n</｜DSML｜tool_calls>");
        }
        if (!m.wo_eos) b.Control(kEos);
        break;
      }
      case Role::kTool:
        return absl::InternalError("tool messages must have been merged into user turns");
    }

    if (i + 1 < n && turns[i + 1].role != Role::kAssistant &&
        turns[i + 1].role != Role::kLatestReminder) {
      continue;
    }
    if (t.task.has_value()) {
      if (*t.task == "action") {
        b.Control(kAssistant);
        b.Control(thinking ? kThinkStart : kThinkEnd);
      }
      b.Control(TaskToken(*t.task));
    } else if (t.role == Role::kUser || t.role == Role::kDeveloper) {
      b.Control(kAssistant);
      const bool open_thinking = thinking && (!drop_thinking || i >= last_user);
      b.Control(open_thinking ? kThinkStart : kThinkEnd);
    }
  }
  return b.Take();
}

absl::StatusOr<std::vector<int32_t>> ChatIds(const EncodedChat& chat,
                                             const tokenizer::Tokenizer& tokenizer) {
  std::vector<int32_t> ids;
  std::string run;
  const auto flush = [&] {
    if (run.empty()) return;
    tokenizer.EncodeAppend(run, /*match_added_tokens=*/false, &ids);
    run.clear();
  };
  for (const Segment& s : chat.segments) {
    if (s.kind == Segment::Kind::kText) {
      run.append(s.text);
      continue;
    }
    flush();
    std::optional<int32_t> id = tokenizer.TokenToId(s.text);
    if (!id.has_value()) {
      return absl::NotFoundError(
          absl::StrCat("the tokenizer has no token for the control string '", s.text, "'"));
    }
    ids.push_back(*id);
  }
  flush();
  return ids;
}

}  // namespace expertmesh::chat
