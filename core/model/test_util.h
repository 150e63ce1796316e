// Helpers shared by the core/model loader tests: per-test scratch directories and raw files.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace expertmesh::model::testing_util {

inline const std::string& TinyADir() {
  static const std::string* dir = new std::string(std::string(EM_SHARED_DIR) + "/golden/tiny-a");
  return *dir;
}

// A fresh directory for the running test, removed when the object dies. Unique per test,
// process and object, so ctest may run cases in parallel. Not thread-safe.
class ScratchDir {
 public:
  ScratchDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    static int counter = 0;
    path_ = absl::StrCat(::testing::TempDir(), "/em_model_", info->test_suite_name(), "_",
                         info->name(), "_", ::getpid(), "_", counter++);
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(std::string_view name) const { return path_ + "/" + std::string(name); }

 private:
  std::string path_;
};

inline void WriteRaw(const std::string& path, std::string_view bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  ASSERT_EQ(std::fwrite(bytes.data(), 1, bytes.size(), f), bytes.size());
  std::fclose(f);
}

// An 8-byte little-endian length, the header text, then `data`: a hand-made safetensors file.
inline std::string RawSafetensors(std::string_view header, std::string_view data,
                                  uint64_t declared_len = UINT64_MAX) {
  uint64_t len = declared_len == UINT64_MAX ? header.size() : declared_len;
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  out.append(header);
  out.append(data);
  return out;
}

}  // namespace expertmesh::model::testing_util
