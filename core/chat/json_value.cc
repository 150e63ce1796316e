#include "core/chat/json_value.h"

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <system_error>
#include <unordered_map>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/base/utf8.h"

namespace expertmesh::chat {

JsonValue JsonValue::Bool(bool b) {
  JsonValue v;
  v.type_ = Type::kBool;
  v.bool_ = b;
  return v;
}

JsonValue JsonValue::Number(std::string lexeme) {
  JsonValue v;
  v.type_ = Type::kNumber;
  v.str_ = std::move(lexeme);
  return v;
}

JsonValue JsonValue::String(std::string s) {
  JsonValue v;
  v.type_ = Type::kString;
  v.str_ = std::move(s);
  return v;
}

JsonValue JsonValue::Array(std::vector<JsonValue> items) {
  JsonValue v;
  v.type_ = Type::kArray;
  v.items_ = std::move(items);
  return v;
}

JsonValue JsonValue::Object(std::vector<Member> members) {
  JsonValue v;
  v.type_ = Type::kObject;
  v.members_ = std::move(members);
  return v;
}

const JsonValue* JsonValue::Find(std::string_view key) const {
  if (type_ != Type::kObject) return nullptr;
  for (const Member& m : members_) {
    if (m.first == key) return &m.second;
  }
  return nullptr;
}

void JsonValue::Set(std::string key, JsonValue value) {
  for (Member& m : members_) {
    if (m.first == key) {
      m.second = std::move(value);
      return;
    }
  }
  members_.emplace_back(std::move(key), std::move(value));
}

bool JsonValue::Truthy() const {
  switch (type_) {
    case Type::kNull:
      return false;
    case Type::kBool:
      return bool_;
    case Type::kNumber: {
      if (str_ == "NaN") return true;
      // Zero in any spelling ("0", "-0.0", "0e5") is falsy in Python.
      for (char c : str_) {
        if (c == 'e' || c == 'E') break;
        if (c >= '1' && c <= '9') return true;
        if (c == 'I') return true;  // Infinity
      }
      return false;
    }
    case Type::kString:
      return !str_.empty();
    case Type::kArray:
      return !items_.empty();
    case Type::kObject:
      return !members_.empty();
  }
  return false;
}

namespace {

class Parser {
 public:
  explicit Parser(std::string_view text) : text_(text) {}

  absl::StatusOr<JsonValue> ParseDocument() {
    SkipWhitespace();
    JsonValue v;
    if (absl::Status s = ParseValue(0, &v); !s.ok()) return s;
    SkipWhitespace();
    if (pos_ != text_.size()) return Error("unexpected text after the JSON value");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 512;

  absl::Status Error(std::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid JSON at byte ", pos_, ": ", std::string(what)));
  }

  void SkipWhitespace() {
    while (pos_ < text_.size()) {
      char c = text_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }

  bool Consume(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  static absl::Status Set(JsonValue v, JsonValue* out) {
    *out = std::move(v);
    return absl::OkStatus();
  }

  absl::Status ParseValue(int depth, JsonValue* out) {
    if (depth > kMaxDepth) return Error("nesting too deep");
    if (pos_ >= text_.size()) return Error("unexpected end of input");
    char c = text_[pos_];
    switch (c) {
      case '{':
        return ParseObject(depth, out);
      case '[':
        return ParseArray(depth, out);
      case '"': {
        std::string s;
        if (absl::Status st = ParseString(&s); !st.ok()) return st;
        *out = JsonValue::String(std::move(s));
        return absl::OkStatus();
      }
      case 't':
        if (Consume("true")) return Set(JsonValue::Bool(true), out);
        break;
      case 'f':
        if (Consume("false")) return Set(JsonValue::Bool(false), out);
        break;
      case 'n':
        if (Consume("null")) return Set(JsonValue::Null(), out);
        break;
      case 'N':
        if (Consume("NaN")) return Set(JsonValue::Number("NaN"), out);
        break;
      case 'I':
        if (Consume("Infinity")) return Set(JsonValue::Number("Infinity"), out);
        break;
      default:
        if (c == '-' || (c >= '0' && c <= '9')) return ParseNumber(out);
        break;
    }
    return Error("expected a JSON value");
  }

  absl::Status ParseNumber(JsonValue* out) {
    size_t start = pos_;
    if (Consume("-Infinity")) {
      *out = JsonValue::Number("-Infinity");
      return absl::OkStatus();
    }
    const auto digit = [&] {
      return pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9';
    };
    if (text_[pos_] == '-') ++pos_;
    if (!digit()) return Error("bad number");
    if (text_[pos_] == '0') {
      ++pos_;
    } else {
      while (digit()) ++pos_;
    }
    if (pos_ < text_.size() && text_[pos_] == '.') {
      ++pos_;
      if (!digit()) return Error("bad number: digits expected after '.'");
      while (digit()) ++pos_;
    }
    if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
      if (!digit()) return Error("bad number: digits expected in the exponent");
      while (digit()) ++pos_;
    }
    *out = JsonValue::Number(std::string(text_.substr(start, pos_ - start)));
    return absl::OkStatus();
  }

  absl::Status ParseHex4(uint32_t* out) {
    if (pos_ + 4 > text_.size()) return Error("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = text_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') {
        v |= c - '0';
      } else if (c >= 'a' && c <= 'f') {
        v |= c - 'a' + 10;
      } else if (c >= 'A' && c <= 'F') {
        v |= c - 'A' + 10;
      } else {
        return Error("bad \\u escape");
      }
    }
    *out = v;
    return absl::OkStatus();
  }

  absl::Status ParseString(std::string* out) {
    ++pos_;  // opening quote
    while (true) {
      if (pos_ >= text_.size()) return Error("unterminated string");
      unsigned char c = static_cast<unsigned char>(text_[pos_]);
      if (c == '"') {
        ++pos_;
        return absl::OkStatus();
      }
      if (c < 0x20) return Error("control character in string");
      if (c == '\\') {
        ++pos_;
        if (pos_ >= text_.size()) return Error("unterminated string");
        char e = text_[pos_++];
        switch (e) {
          case '"':
            out->push_back('"');
            break;
          case '\\':
            out->push_back('\\');
            break;
          case '/':
            out->push_back('/');
            break;
          case 'b':
            out->push_back('\b');
            break;
          case 'f':
            out->push_back('\f');
            break;
          case 'n':
            out->push_back('\n');
            break;
          case 'r':
            out->push_back('\r');
            break;
          case 't':
            out->push_back('\t');
            break;
          case 'u': {
            uint32_t cp = 0;
            if (absl::Status s = ParseHex4(&cp); !s.ok()) return s;
            if (cp >= 0xD800 && cp <= 0xDBFF && text_.substr(pos_, 2) == "\\u") {
              size_t save = pos_;
              pos_ += 2;
              uint32_t lo = 0;
              if (absl::Status s = ParseHex4(&lo); !s.ok()) return s;
              if (lo >= 0xDC00 && lo <= 0xDFFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
              } else {
                pos_ = save;  // lone high surrogate; the next escape stands alone
              }
            }
            base::AppendCodePoint(cp, out);
            break;
          }
          default:
            return Error("bad escape in string");
        }
        continue;
      }
      const base::Utf8Step step = base::NextUtf8(text_.substr(pos_));
      if (step.kind != base::Utf8Prefix::kComplete) return Error("invalid UTF-8 in string");
      out->append(text_.substr(pos_, step.length));
      pos_ += step.length;
    }
  }

  absl::Status ParseArray(int depth, JsonValue* out) {
    ++pos_;
    std::vector<JsonValue> items;
    SkipWhitespace();
    if (pos_ < text_.size() && text_[pos_] == ']') {
      ++pos_;
      *out = JsonValue::Array(std::move(items));
      return absl::OkStatus();
    }
    while (true) {
      SkipWhitespace();
      JsonValue v;
      if (absl::Status s = ParseValue(depth + 1, &v); !s.ok()) return s;
      items.push_back(std::move(v));
      SkipWhitespace();
      if (pos_ < text_.size() && text_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < text_.size() && text_[pos_] == ']') {
        ++pos_;
        *out = JsonValue::Array(std::move(items));
        return absl::OkStatus();
      }
      return Error("expected ',' or ']'");
    }
  }

  absl::Status ParseObject(int depth, JsonValue* out) {
    ++pos_;
    std::vector<JsonValue::Member> members;
    std::unordered_map<std::string, size_t> index;  // used once the object grows
    SkipWhitespace();
    if (pos_ < text_.size() && text_[pos_] == '}') {
      ++pos_;
      *out = JsonValue::Object(std::move(members));
      return absl::OkStatus();
    }
    while (true) {
      SkipWhitespace();
      if (pos_ >= text_.size() || text_[pos_] != '"') return Error("expected a string key");
      std::string key;
      if (absl::Status s = ParseString(&key); !s.ok()) return s;
      SkipWhitespace();
      if (pos_ >= text_.size() || text_[pos_] != ':') return Error("expected ':'");
      ++pos_;
      SkipWhitespace();
      JsonValue v;
      if (absl::Status s = ParseValue(depth + 1, &v); !s.ok()) return s;
      // Python's dict: a repeated key keeps its first position and takes the last value.
      size_t found = members.size();
      if (members.size() <= 8) {
        for (size_t k = 0; k < members.size(); ++k) {
          if (members[k].first == key) found = k;
        }
      } else {
        if (index.empty()) {
          for (size_t k = 0; k < members.size(); ++k) index.emplace(members[k].first, k);
        }
        auto it = index.find(key);
        if (it != index.end()) found = it->second;
      }
      if (found < members.size()) {
        members[found].second = std::move(v);
      } else {
        if (!index.empty()) index.emplace(key, members.size());
        members.emplace_back(std::move(key), std::move(v));
      }
      SkipWhitespace();
      if (pos_ < text_.size() && text_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < text_.size() && text_[pos_] == '}') {
        ++pos_;
        *out = JsonValue::Object(std::move(members));
        return absl::OkStatus();
      }
      return Error("expected ',' or '}'");
    }
  }

  std::string_view text_;
  size_t pos_ = 0;
};

bool IsFloatLexeme(const std::string& lexeme) {
  return lexeme.find_first_of(".eEIN") != std::string::npos;
}

std::string PythonNumber(const std::string& lexeme) {
  if (lexeme == "NaN" || lexeme == "Infinity" || lexeme == "-Infinity") return lexeme;
  if (!IsFloatLexeme(lexeme)) {
    // Python ints print as written, except that -0 is 0.
    return lexeme == "-0" ? "0" : lexeme;
  }
  return PythonFloatRepr(std::strtod(lexeme.c_str(), nullptr));
}

void Dump(const JsonValue& v, std::string* out) {
  switch (v.type()) {
    case JsonValue::Type::kNull:
      out->append("null");
      return;
    case JsonValue::Type::kBool:
      out->append(v.bool_value() ? "true" : "false");
      return;
    case JsonValue::Type::kNumber:
      out->append(PythonNumber(v.str()));
      return;
    case JsonValue::Type::kString:
      AppendPythonJsonString(v.str(), out);
      return;
    case JsonValue::Type::kArray: {
      out->push_back('[');
      bool first = true;
      for (const JsonValue& item : v.items()) {
        if (!first) out->append(", ");
        first = false;
        Dump(item, out);
      }
      out->push_back(']');
      return;
    }
    case JsonValue::Type::kObject: {
      out->push_back('{');
      bool first = true;
      for (const auto& [key, value] : v.members()) {
        if (!first) out->append(", ");
        first = false;
        AppendPythonJsonString(key, out);
        out->append(": ");
        Dump(value, out);
      }
      out->push_back('}');
      return;
    }
  }
}

}  // namespace

std::string JsonValue::DumpPython() const {
  std::string out;
  Dump(*this, &out);
  return out;
}

absl::StatusOr<JsonValue> ParseJson(std::string_view text) { return Parser(text).ParseDocument(); }

void AppendJsonEscaped(std::string_view s, std::string* out) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\r':
        out->append("\\r");
        break;
      case '\t':
        out->append("\\t");
        break;
      case '\b':
        out->append("\\b");
        break;
      case '\f':
        out->append("\\f");
        break;
      default:
        if (c < 0x20) {
          out->append("\\u00");
          out->push_back(kHex[c >> 4]);
          out->push_back(kHex[c & 15]);
        } else {
          out->push_back(ch);
        }
    }
  }
}

void AppendPythonJsonString(std::string_view s, std::string* out) {
  out->push_back('"');
  size_t i = 0, run = 0;  // [run, i) is well-formed and not yet escaped
  while (i < s.size()) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const base::Utf8Step step = base::NextUtf8(s.substr(i));
    if (step.kind == base::Utf8Prefix::kComplete) {
      i += step.length;
      continue;
    }
    // Each byte of an ill-formed sequence becomes its own U+FFFD.
    AppendJsonEscaped(s.substr(run, i - run), out);
    out->append(base::kReplacementChar);
    ++i;
    run = i;
  }
  AppendJsonEscaped(s.substr(run), out);
  out->push_back('"');
}

std::string PythonJsonString(std::string_view s) {
  std::string out;
  AppendPythonJsonString(s, &out);
  return out;
}

std::string PythonFloatRepr(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "Infinity" : "-Infinity";
  // Shortest round-trip digits, as Python's repr uses; then Python's layout: scientific when the
  // decimal exponent is < -4 or >= 16, else positional with at least one fractional digit.
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), value, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  std::string out;
  size_t i = 0;
  if (sci[0] == '-') {
    out.push_back('-');
    i = 1;
  }
  size_t epos = sci.find('e');
  std::string digits;
  for (size_t k = i; k < epos; ++k) {
    if (sci[k] != '.') digits.push_back(sci[k]);
  }
  int exp10 = std::atoi(sci.c_str() + epos + 1);
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  if (exp10 < -4 || exp10 >= 16) {
    out.push_back(digits[0]);
    if (digits.size() > 1) {
      out.push_back('.');
      out.append(digits.substr(1));
    }
    out.push_back('e');
    out.push_back(exp10 < 0 ? '-' : '+');
    int a = exp10 < 0 ? -exp10 : exp10;
    if (a < 10) out.push_back('0');
    out.append(std::to_string(a));
    return out;
  }
  int decpt = exp10 + 1;  // digits before the decimal point
  const int n = static_cast<int>(digits.size());
  if (decpt <= 0) {
    out.append("0.");
    out.append(static_cast<size_t>(-decpt), '0');
    out.append(digits);
  } else if (decpt < n) {
    out.append(digits.substr(0, decpt));
    out.push_back('.');
    out.append(digits.substr(decpt));
  } else {
    out.append(digits);
    out.append(static_cast<size_t>(decpt - n), '0');
    out.append(".0");
  }
  return out;
}

}  // namespace expertmesh::chat
