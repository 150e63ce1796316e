#include "core/chat/messages.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"

namespace expertmesh::chat {
namespace {

absl::Status FieldError(std::string_view field, std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(std::string(field), ": ", std::string(what)));
}

constexpr std::string_view kTasks[] = {"action", "query", "authority",
                                       "domain", "title", "read_url"};

// A string field that may be absent or null (-> empty).
absl::Status OptionalString(const JsonValue& obj, std::string_view key, std::string_view field,
                            std::string* out) {
  const JsonValue* v = obj.Find(key);
  if (v == nullptr || v->is_null()) return absl::OkStatus();
  if (!v->is_string())
    return FieldError(absl::StrCat(std::string(field), ".", std::string(key)), "must be a string");
  *out = v->str();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<ContentPart>> ParseParts(const JsonValue& list, std::string_view field) {
  std::vector<ContentPart> parts;
  for (size_t i = 0; i < list.items().size(); ++i) {
    const JsonValue& p = list.items()[i];
    std::string f = absl::StrCat(std::string(field), "[", i, "]");
    if (!p.is_object()) return FieldError(f, "a content part must be an object");
    ContentPart part;
    EM_RETURN_IF_ERROR(OptionalString(p, "type", f, &part.type));
    if (part.type == "text") EM_RETURN_IF_ERROR(OptionalString(p, "text", f, &part.text));
    parts.push_back(std::move(part));
  }
  return parts;
}

absl::Status ParseToolCall(const JsonValue& v, std::string_view field, ToolCall* out) {
  if (!v.is_object()) return FieldError(field, "a tool call must be an object");
  EM_RETURN_IF_ERROR(OptionalString(v, "id", field, &out->id));
  std::string type;
  EM_RETURN_IF_ERROR(OptionalString(v, "type", field, &type));
  if (!type.empty()) out->type = type;
  std::string ffield = absl::StrCat(std::string(field), ".function");
  const JsonValue* fn = v.Find("function");
  if (fn == nullptr || !fn->is_object()) return FieldError(ffield, "missing or not an object");
  EM_RETURN_IF_ERROR(OptionalString(*fn, "name", ffield, &out->name));
  if (out->name.empty()) return FieldError(absl::StrCat(ffield, ".name"), "missing or empty");
  if (out->id.empty()) EM_RETURN_IF_ERROR(OptionalString(*fn, "id", ffield, &out->id));
  const JsonValue* args = fn->Find("arguments");
  if (args == nullptr || args->is_null()) {
    out->arguments = "";
  } else if (args->is_string()) {
    out->arguments = args->str();
  } else {
    return FieldError(absl::StrCat(ffield, ".arguments"), "must be a string (JSON text)");
  }
  return absl::OkStatus();
}

}  // namespace

std::string_view RoleName(Role role) {
  switch (role) {
    case Role::kSystem:
      return "system";
    case Role::kDeveloper:
      return "developer";
    case Role::kUser:
      return "user";
    case Role::kAssistant:
      return "assistant";
    case Role::kTool:
      return "tool";
    case Role::kLatestReminder:
      return "latest_reminder";
  }
  return "?";
}

absl::StatusOr<std::vector<JsonValue>> ParseTools(const JsonValue& tools, std::string_view field) {
  std::vector<JsonValue> out;
  if (tools.is_null()) return out;
  if (!tools.is_array()) return FieldError(field, "must be an array");
  for (size_t i = 0; i < tools.items().size(); ++i) {
    const JsonValue& t = tools.items()[i];
    std::string f = absl::StrCat(std::string(field), "[", i, "]");
    if (!t.is_object()) return FieldError(f, "a tool must be an object");
    const JsonValue* fn = t.Find("function");
    if (fn == nullptr || !fn->is_object()) {
      return FieldError(absl::StrCat(f, ".function"), "missing or not an object");
    }
    out.push_back(t);
  }
  return out;
}

absl::StatusOr<std::vector<Message>> ParseMessages(const JsonValue& messages) {
  if (!messages.is_array()) return FieldError("messages", "must be an array");
  std::vector<Message> out;
  out.reserve(messages.items().size());
  for (size_t i = 0; i < messages.items().size(); ++i) {
    const JsonValue& m = messages.items()[i];
    std::string f = absl::StrCat("messages[", i, "]");
    if (!m.is_object()) return FieldError(f, "a message must be an object");
    Message msg;
    std::string role;
    EM_RETURN_IF_ERROR(OptionalString(m, "role", f, &role));
    if (role == "system") {
      msg.role = Role::kSystem;
    } else if (role == "developer") {
      msg.role = Role::kDeveloper;
    } else if (role == "user") {
      msg.role = Role::kUser;
    } else if (role == "assistant") {
      msg.role = Role::kAssistant;
    } else if (role == "tool") {
      msg.role = Role::kTool;
    } else if (role == "latest_reminder") {
      msg.role = Role::kLatestReminder;
    } else {
      return FieldError(absl::StrCat(f, ".role"),
                        role.empty() ? "missing" : absl::StrCat("unknown role '", role, "'"));
    }

    if (const JsonValue* c = m.Find("content"); c != nullptr && !c->is_null()) {
      std::string cf = absl::StrCat(f, ".content");
      if (c->is_string()) {
        msg.content = c->str();
      } else if (c->is_array()) {
        EM_ASSIGN_OR_RETURN(std::vector<ContentPart> parts, ParseParts(*c, cf));
        if (msg.role == Role::kTool) {
          msg.parts = std::move(parts);
        } else {
          for (size_t k = 0; k < parts.size(); ++k) {
            if (parts[k].type != "text") {
              return FieldError(
                  absl::StrCat(cf, "[", k, "].type"),
                  absl::StrCat("unsupported content part type '", parts[k].type, "'"));
            }
            if (k > 0) msg.content += "\n\n";
            msg.content += parts[k].text;
          }
        }
      } else {
        return FieldError(cf, "must be a string or a list of parts");
      }
    }
    if (msg.role == Role::kDeveloper && msg.content.empty()) {
      return FieldError(absl::StrCat(f, ".content"), "a developer message needs content");
    }
    EM_RETURN_IF_ERROR(OptionalString(m, "reasoning_content", f, &msg.reasoning_content));
    EM_RETURN_IF_ERROR(OptionalString(m, "tool_call_id", f, &msg.tool_call_id));

    if (const JsonValue* tc = m.Find("tool_calls"); tc != nullptr && !tc->is_null()) {
      std::string tf = absl::StrCat(f, ".tool_calls");
      if (!tc->is_array()) return FieldError(tf, "must be an array");
      for (size_t k = 0; k < tc->items().size(); ++k) {
        ToolCall call;
        EM_RETURN_IF_ERROR(ParseToolCall(tc->items()[k], absl::StrCat(tf, "[", k, "]"), &call));
        msg.tool_calls.push_back(std::move(call));
      }
    }
    if (const JsonValue* t = m.Find("task"); t != nullptr && !t->is_null()) {
      std::string tf = absl::StrCat(f, ".task");
      if (!t->is_string()) return FieldError(tf, "must be a string");
      bool valid = false;
      for (std::string_view k : kTasks) valid = valid || t->str() == k;
      if (!valid) {
        return FieldError(tf,
                          absl::StrCat("invalid task '", t->str(),
                                       "' (action, query, authority, domain, title, read_url)"));
      }
      msg.task = t->str();
    }
    if (const JsonValue* t = m.Find("tools"); t != nullptr) {
      EM_ASSIGN_OR_RETURN(msg.tools, ParseTools(*t, absl::StrCat(f, ".tools")));
    }
    if (const JsonValue* r = m.Find("response_format"); r != nullptr && r->Truthy()) {
      msg.response_format = *r;
    }
    if (const JsonValue* w = m.Find("wo_eos"); w != nullptr && !w->is_null()) {
      if (!w->is_bool()) return FieldError(absl::StrCat(f, ".wo_eos"), "must be a boolean");
      msg.wo_eos = w->bool_value();
    }
    out.push_back(std::move(msg));
  }
  return out;
}

absl::StatusOr<ThinkingMode> ParseThinkingMode(const JsonValue& value, std::string_view field) {
  if (value.is_string() && value.str() == "chat") return ThinkingMode::kChat;
  if (value.is_string() && value.str() == "thinking") return ThinkingMode::kThinking;
  return FieldError(field, "must be \"chat\" or \"thinking\"");
}

absl::StatusOr<EncodeOptions> ParseEncodeOptions(const JsonValue& options) {
  EncodeOptions opts;
  if (options.is_null()) return opts;
  if (!options.is_object()) return FieldError("options", "must be an object");
  if (const JsonValue* v = options.Find("thinking_mode"); v != nullptr && !v->is_null()) {
    EM_ASSIGN_OR_RETURN(opts.thinking_mode, ParseThinkingMode(*v, "options.thinking_mode"));
  }
  if (const JsonValue* v = options.Find("drop_thinking"); v != nullptr && !v->is_null()) {
    if (!v->is_bool()) return FieldError("options.drop_thinking", "must be a boolean");
    opts.drop_thinking = v->bool_value();
  }
  if (const JsonValue* v = options.Find("reasoning_effort"); v != nullptr && !v->is_null()) {
    if (v->is_string() && (v->str() == "none" || v->str().empty())) {
      opts.reasoning_effort = ReasoningEffort::kNone;
    } else if (v->is_string() && v->str() == "high") {
      opts.reasoning_effort = ReasoningEffort::kHigh;
    } else if (v->is_string() && v->str() == "max") {
      opts.reasoning_effort = ReasoningEffort::kMax;
    } else {
      return FieldError("options.reasoning_effort", "must be \"none\", \"high\" or \"max\"");
    }
  }
  return opts;
}

void AttachRequestTools(std::vector<JsonValue> tools, std::vector<Message>* messages) {
  if (tools.empty()) return;
  if (!messages->empty() && messages->front().role == Role::kSystem) {
    for (JsonValue& t : tools) messages->front().tools.push_back(std::move(t));
    return;
  }
  Message system;
  system.role = Role::kSystem;
  system.tools = std::move(tools);
  messages->insert(messages->begin(), std::move(system));
}

}  // namespace expertmesh::chat
