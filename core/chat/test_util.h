// Helpers shared by the core/chat tests (test code only): reading the shared case files and
// parsing their JSON, failing the current test (not aborting) when either goes wrong.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/base/mapped_file.h"
#include "core/chat/json_value.h"

namespace expertmesh::chat::test_util {

// The chat-format cases of ../shared/encoding.
inline const std::string kEncodingDir = std::string(EM_SHARED_DIR) + "/encoding";

// The whole file; "" (and a test failure) when it cannot be read.
inline std::string ReadFile(const std::string& path) {
  absl::StatusOr<std::string> s = base::ReadFileToString(path);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : "";
}

// The parsed document; null (and a test failure) when `text` is not valid JSON.
inline JsonValue ParseOrDie(std::string_view text) {
  absl::StatusOr<JsonValue> v = ParseJson(text);
  EXPECT_TRUE(v.ok()) << v.status() << ": " << text;
  return v.ok() ? *v : JsonValue();
}

// The non-empty lines of `text`, without their '\n'.
inline std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    if (end > start) lines.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return lines;
}

}  // namespace expertmesh::chat::test_util
