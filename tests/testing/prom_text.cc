#include "tests/testing/prom_text.h"

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <string>

namespace expertmesh::testing {
namespace {

bool IsNameStart(char c) {
  return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == ':';
}
bool IsNameChar(char c) { return IsNameStart(c) || std::isdigit(static_cast<unsigned char>(c)); }

bool ValidName(std::string_view s, bool allow_colon) {
  if (s.empty() || !IsNameStart(s[0]) || (!allow_colon && s[0] == ':')) return false;
  for (char c : s) {
    if (!IsNameChar(c) || (!allow_colon && c == ':')) return false;
  }
  return true;
}

bool ParseValue(std::string_view text, double* out) {
  if (text == "+Inf") {
    *out = INFINITY;
    return true;
  }
  if (text == "-Inf") {
    *out = -INFINITY;
    return true;
  }
  if (text == "NaN") {
    *out = NAN;
    return true;
  }
  std::string s(text);
  char* end = nullptr;
  *out = std::strtod(s.c_str(), &end);
  return !s.empty() && end == s.c_str() + s.size();
}

// The family a sample name belongs to (histogram/summary suffixes stripped when declared so).
std::string FamilyOf(const std::string& name, const std::map<std::string, PromFamily>& families) {
  if (families.count(name)) return name;
  for (std::string_view suffix : {"_bucket", "_sum", "_count"}) {
    if (name.size() > suffix.size() &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      std::string base = name.substr(0, name.size() - suffix.size());
      auto it = families.find(base);
      if (it != families.end() &&
          (it->second.type == "histogram" || it->second.type == "summary")) {
        return base;
      }
    }
  }
  return "";
}

}  // namespace

std::vector<PromSample> PromScrape::Find(std::string_view name,
                                         const std::map<std::string, std::string>& labels) const {
  std::vector<PromSample> out;
  for (const PromSample& s : samples) {
    if (s.name != name) continue;
    bool match = true;
    for (const auto& [k, v] : labels) {
      auto it = s.labels.find(k);
      if (it == s.labels.end() || it->second != v) {
        match = false;
        break;
      }
    }
    if (match) out.push_back(s);
  }
  return out;
}

absl::StatusOr<PromScrape> ParsePromText(std::string_view text) {
  PromScrape scrape;
  size_t line_no = 0;
  size_t pos = 0;
  auto error = [&](const std::string& what) {
    return absl::InvalidArgumentError("line " + std::to_string(line_no) + ": " + what);
  };
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos)
      return absl::InvalidArgumentError("text does not end with a newline");
    std::string_view line = text.substr(pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    if (line.empty()) continue;
    if (line[0] == '#') {
      // "# HELP name text" or "# TYPE name type"; other comments are allowed.
      if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) {
        bool help = line[2] == 'H';
        std::string_view rest = line.substr(7);
        size_t sp = rest.find(' ');
        std::string name(rest.substr(0, sp));
        if (!ValidName(name, true)) return error("bad metric name '" + name + "'");
        std::string arg = sp == std::string_view::npos ? "" : std::string(rest.substr(sp + 1));
        PromFamily& family = scrape.families[name];
        family.name = name;
        if (help) {
          family.help = arg;
        } else {
          if (arg != "counter" && arg != "gauge" && arg != "histogram" && arg != "summary" &&
              arg != "untyped") {
            return error("bad type '" + arg + "'");
          }
          if (!family.type.empty()) return error("second TYPE for " + name);
          family.type = arg;
        }
      }
      continue;
    }
    PromSample sample;
    size_t i = 0;
    while (i < line.size() && IsNameChar(line[i])) ++i;
    sample.name = std::string(line.substr(0, i));
    if (!ValidName(sample.name, true))
      return error("bad sample name in '" + std::string(line) + "'");
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (true) {
        if (i < line.size() && line[i] == '}') {
          ++i;
          break;
        }
        size_t start = i;
        while (i < line.size() && IsNameChar(line[i])) ++i;
        std::string label(line.substr(start, i - start));
        if (!ValidName(label, false)) return error("bad label name '" + label + "'");
        if (i + 1 >= line.size() || line[i] != '=' || line[i + 1] != '"') {
          return error("expected =\" after label " + label);
        }
        i += 2;
        std::string value;
        bool closed = false;
        while (i < line.size()) {
          char c = line[i++];
          if (c == '"') {
            closed = true;
            break;
          }
          if (c == '\\') {
            if (i >= line.size()) break;
            char e = line[i++];
            if (e == 'n')
              value += '\n';
            else if (e == '\\' || e == '"')
              value += e;
            else
              return error("bad escape in label " + label);
          } else {
            value += c;
          }
        }
        if (!closed) return error("unterminated value of label " + label);
        if (sample.labels.count(label)) return error("duplicate label " + label);
        sample.labels[label] = value;
        if (i < line.size() && line[i] == ',') ++i;
      }
    }
    if (i >= line.size() || line[i] != ' ') return error("expected a space before the value");
    ++i;
    std::string_view rest = line.substr(i);
    size_t sp = rest.find(' ');
    std::string_view value = rest.substr(0, sp);
    if (!ParseValue(value, &sample.value)) return error("bad value '" + std::string(value) + "'");
    if (sp != std::string_view::npos) {
      double ts;
      if (!ParseValue(rest.substr(sp + 1), &ts)) return error("bad timestamp");
    }
    if (FamilyOf(sample.name, scrape.families).empty()) {
      return error("sample " + sample.name + " has no TYPE line before it");
    }
    scrape.samples.push_back(std::move(sample));
  }
  return scrape;
}

}  // namespace expertmesh::testing
