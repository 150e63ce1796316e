#include "core/base/flags.h"

#include <cerrno>
#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace expertmesh::base {

FlagSet::FlagSet(std::string program, std::string summary)
    : program_(std::move(program)), summary_(std::move(summary)) {}

void FlagSet::AddString(std::string name, std::string* value, std::string help) {
  flags_[std::move(name)] = Flag{Type::kString, value, std::move(help), "\"" + *value + "\""};
}
void FlagSet::AddInt(std::string name, int64_t* value, std::string help) {
  flags_[std::move(name)] = Flag{Type::kInt, value, std::move(help), std::to_string(*value)};
}
void FlagSet::AddBool(std::string name, bool* value, std::string help) {
  flags_[std::move(name)] = Flag{Type::kBool, value, std::move(help), *value ? "true" : "false"};
}

void FlagSet::AddStringList(std::string name, std::vector<std::string>* values,
                            std::string help) {
  flags_[std::move(name)] =
      Flag{Type::kStringList, values, std::move(help) + "; repeatable", "none"};
}

std::string FlagSet::Usage() const {
  std::string out = "usage: " + program_ + " [flags]\n" + summary_ + "\n\nflags:\n";
  out +=
      "  --config FILE\n      key=value lines or a JSON object with the flags below; flags "
      "given on the command line override it\n";
  for (const auto& [name, flag] : flags_) {
    out += "  --" + name + "\n      " + flag.help + " (default " + flag.default_text + ")\n";
  }
  return out;
}

absl::Status FlagSet::Set(std::string_view name, std::string_view value, std::string_view source) {
  auto it = flags_.find(std::string(name));
  if (it == flags_.end()) {
    return absl::InvalidArgumentError("unknown flag --" + std::string(name) + " (" +
                                      std::string(source) + "); see --help");
  }
  Flag& flag = it->second;
  switch (flag.type) {
    case Type::kString:
      *static_cast<std::string*>(flag.value) = std::string(value);
      return absl::OkStatus();
    case Type::kStringList:
      static_cast<std::vector<std::string>*>(flag.value)->emplace_back(value);
      return absl::OkStatus();
    case Type::kInt: {
      int64_t v;
      if (!absl::SimpleAtoi(std::string(value), &v)) {
        return absl::InvalidArgumentError("--" + std::string(name) + " wants an integer, got '" +
                                          std::string(value) + "' (" + std::string(source) + ")");
      }
      *static_cast<int64_t*>(flag.value) = v;
      return absl::OkStatus();
    }
    case Type::kBool: {
      std::string v = absl::AsciiStrToLower(std::string(value));
      if (v == "true" || v == "1" || v == "yes") {
        *static_cast<bool*>(flag.value) = true;
      } else if (v == "false" || v == "0" || v == "no") {
        *static_cast<bool*>(flag.value) = false;
      } else {
        return absl::InvalidArgumentError("--" + std::string(name) + " wants true/false, got '" +
                                          std::string(value) + "' (" + std::string(source) + ")");
      }
      return absl::OkStatus();
    }
  }
  return absl::InternalError("unreachable");
}

absl::Status ParseConfigText(std::string_view text, std::map<std::string, std::string>* out) {
  size_t first = text.find_first_not_of(" \t\r\n");
  if (first != std::string_view::npos && text[first] == '{') {
    nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      return absl::InvalidArgumentError("not a valid JSON object");
    }
    for (auto it = j.begin(); it != j.end(); ++it) {
      const nlohmann::json& v = it.value();
      if (v.is_string()) {
        (*out)[it.key()] = v.get<std::string>();
      } else if (v.is_boolean() || v.is_number()) {
        (*out)[it.key()] = v.dump();
      } else {
        return absl::InvalidArgumentError("key '" + it.key() +
                                          "' must be a string, number or bool");
      }
    }
    return absl::OkStatus();
  }
  size_t line_no = 0;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t nl = text.find('\n', pos);
    std::string_view line = text.substr(pos, nl == std::string_view::npos ? text.npos : nl - pos);
    pos = nl == std::string_view::npos ? text.size() + 1 : nl + 1;
    ++line_no;
    std::string stripped(absl::StripAsciiWhitespace(std::string(line)));
    if (stripped.empty() || stripped[0] == '#') continue;
    size_t eq = stripped.find('=');
    if (eq == std::string::npos) {
      return absl::InvalidArgumentError("line " + std::to_string(line_no) +
                                        ": expected key = value");
    }
    std::string key(absl::StripAsciiWhitespace(stripped.substr(0, eq)));
    std::string value(absl::StripAsciiWhitespace(stripped.substr(eq + 1)));
    if (key.rfind("--", 0) == 0) key = key.substr(2);
    if (value.size() >= 2 && value.front() == '"' && value.back() == '"') {
      value = value.substr(1, value.size() - 2);
    }
    (*out)[key] = value;
  }
  return absl::OkStatus();
}

absl::Status FlagSet::LoadConfig(const std::string& path) {
  EM_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  std::map<std::string, std::string> values;
  EM_RETURN_IF_ERROR(Annotate(ParseConfigText(text, &values), "config file " + path));
  for (const auto& [k, v] : values) EM_RETURN_IF_ERROR(Set(k, v, "config file " + path));
  return absl::OkStatus();
}

absl::Status FlagSet::Parse(int argc, char** argv) {
  // Two passes: the config file first, so that command-line flags override it.
  std::vector<std::pair<std::string, std::string>> given;
  std::string config;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      help_requested_ = true;
      return absl::OkStatus();
    }
    if (arg.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError("unexpected argument '" + arg + "'; see --help");
    }
    std::string name = arg.substr(2);
    std::string value;
    size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else {
      auto it = flags_.find(name);
      bool is_bool = it != flags_.end() && it->second.type == Type::kBool;
      if (is_bool) {
        value = "true";
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        return absl::InvalidArgumentError("--" + name + " needs a value");
      }
    }
    if (name == "config") {
      config = value;
    } else {
      given.emplace_back(name, value);
    }
  }
  if (!config.empty()) EM_RETURN_IF_ERROR(LoadConfig(config));
  for (const auto& [name, value] : given) EM_RETURN_IF_ERROR(Set(name, value, "command line"));
  return absl::OkStatus();
}

}  // namespace expertmesh::base
