// A JSON document model that keeps what the official DeepSeek-V4 encoder's Python round trip
// (json.loads then json.dumps(ensure_ascii=False)) keeps: object key order, numbers as written
// (integers exactly, floats re-printed like Python's repr), duplicate keys resolved as Python's
// dict does (the last value wins, at the first key's position). nlohmann::json cannot do this:
// it turns big integers into doubles and prints floats its own way, and one wrong byte in a
// prompt silently degrades the model.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh::chat {

class JsonValue {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
  using Member = std::pair<std::string, JsonValue>;

  JsonValue() = default;
  static JsonValue Null() { return JsonValue(); }
  static JsonValue Bool(bool b);
  // `lexeme` is a JSON number token as written (or NaN / Infinity / -Infinity, which Python's
  // json module reads and writes).
  static JsonValue Number(std::string lexeme);
  static JsonValue String(std::string s);
  static JsonValue Array(std::vector<JsonValue> items = {});
  static JsonValue Object(std::vector<Member> members = {});

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }

  bool bool_value() const { return bool_; }
  // The number's lexeme, or the string's UTF-8 bytes.
  const std::string& str() const { return str_; }
  const std::vector<JsonValue>& items() const { return items_; }
  std::vector<JsonValue>& items() { return items_; }
  const std::vector<Member>& members() const { return members_; }

  // Object lookup; nullptr when absent or when this is not an object.
  const JsonValue* Find(std::string_view key) const;
  // Sets key (replacing the value in place when present, appending otherwise).
  void Set(std::string key, JsonValue value);

  // Python's json.dumps(value, ensure_ascii=False): ", " and ": " separators, non-ASCII kept,
  // integers as written, floats as Python's repr.
  std::string DumpPython() const;

  // Python truthiness (empty containers/strings, 0, false and null are false). Used where the
  // official encoder writes `if value:`.
  bool Truthy() const;

 private:
  Type type_ = Type::kNull;
  bool bool_ = false;
  std::string str_;
  std::vector<JsonValue> items_;
  std::vector<Member> members_;
};

// Parses one JSON document (RFC 8259 plus Python's NaN/Infinity/-Infinity). Surrounding
// whitespace is allowed, anything else after the value is an error. Strings must be valid
// UTF-8; \u escapes decode to UTF-8 (a lone surrogate is kept as its 3-byte form, as Python
// keeps it). Errors (InvalidArgument) give the byte offset. Nesting deeper than 512 fails.
absl::StatusOr<JsonValue> ParseJson(std::string_view text);

// Appends `s` as a JSON string literal the way Python's json.dumps(ensure_ascii=False) writes
// it: `"` `\\` \n \r \t \b \f escaped, other C0 controls as \u00xx, everything else raw.
// Invalid UTF-8 bytes are written as U+FFFD so the output is always valid UTF-8.
void AppendPythonJsonString(std::string_view s, std::string* out);
std::string PythonJsonString(std::string_view s);

// The body of such a literal (no quotes), escaped byte by byte: bytes >= 0x80 pass through
// unchecked, so escaping a text in pieces gives the same bytes as escaping it whole.
void AppendJsonEscaped(std::string_view s, std::string* out);

// Python's repr() of the double written by `lexeme` ("1e5" -> "100000.0", "1e16" -> "1e+16").
std::string PythonFloatRepr(double value);

}  // namespace expertmesh::chat
