// A read-only memory map of a whole file (RAII). Checkpoints are mapped, not read, so that a
// process touches only the pages of the tensors it uses (an expert worker loads a few experts of
// a multi-hundred-GB checkpoint).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace expertmesh::base {

class MappedFile {
 public:
  // Maps `path` read-only. Errors: NotFound (missing), PermissionDenied, Internal (mmap failure).
  // An empty file maps to size() == 0 and data() == nullptr.
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);

  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  std::string_view view() const {
    return std::string_view(reinterpret_cast<const char*>(data_), size_);
  }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}

  std::string path_;
  const uint8_t* data_;
  size_t size_;
};

// Reads a whole file into a string. Errors as for MappedFile::Open.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);
// Writes `contents` to `path` atomically (temp file + rename).
absl::Status WriteFileAtomically(const std::string& path, std::string_view contents);

}  // namespace expertmesh::base
