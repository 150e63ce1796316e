// Command-line flags of a service binary with an optional config file: `--config FILE` holds
// the same keys as the flags (a JSON object, or `key = value` lines with # comments), and flags
// given on the command line override it. Unknown keys are errors, so a typo never goes unnoticed.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"

namespace expertmesh::base {

class FlagSet {
 public:
  // `program` and `summary` head the --help text.
  FlagSet(std::string program, std::string summary);

  // Registers a flag `--name`; the pointee holds the default and receives the value. Pointers
  // must outlive Parse.
  void AddString(std::string name, std::string* value, std::string help);
  void AddInt(std::string name, int64_t* value, std::string help);
  void AddBool(std::string name, bool* value, std::string help);
  // A repeatable flag: every occurrence (command line or config file) appends one value.
  void AddStringList(std::string name, std::vector<std::string>* values, std::string help);

  // Parses `--name=value`, `--name value`, bare `--flag` for booleans, and `--config FILE`.
  // Errors: InvalidArgument naming the flag/key (and file) at fault. Sets help_requested() on
  // --help/-h (then the values are not touched).
  absl::Status Parse(int argc, char** argv);
  bool help_requested() const { return help_requested_; }
  std::string Usage() const;

  // Applies one key (as from a config file). Exposed for tests.
  absl::Status Set(std::string_view name, std::string_view value, std::string_view source);

 private:
  enum class Type { kString, kInt, kBool, kStringList };
  struct Flag {
    Type type;
    void* value;
    std::string help;
    std::string default_text;
  };
  absl::Status LoadConfig(const std::string& path);

  std::string program_;
  std::string summary_;
  std::map<std::string, Flag> flags_;
  bool help_requested_ = false;
};

// Parses a config file's text: a JSON object of scalars, or `key = value` lines.
// Errors: InvalidArgument with the line or JSON position.
absl::Status ParseConfigText(std::string_view text, std::map<std::string, std::string>* out);

}  // namespace expertmesh::base
