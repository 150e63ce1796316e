// The safetensors container: an 8-byte little-endian header length, a JSON header mapping each
// tensor name to {dtype, shape, data_offsets} (offsets relative to the end of the header), then
// the raw bytes. SafetensorsFile reads one file by memory map, so opening it touches only the
// header and a tensor's pages are read only when its bytes are used. SafetensorsWriter builds
// one file (make-model, `expertmesh score` logits, tests).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/base/mapped_file.h"

namespace expertmesh::model {

// The dtypes safetensors defines that we parse. The model accepts only those MODEL.md lists
// (F32, BF16, F8_E4M3, F8_E8M0, I8, I32); the others are parsed so that a checkpoint holding
// them still opens and the error comes when such a tensor is used.
enum class DType { kF32, kBF16, kF16, kF8E4M3, kF8E8M0, kI8, kI32, kI64, kU8, kBool };

// "F32", "BF16", "F16", "F8_E4M3", "F8_E8M0", "I8", "I32", "I64", "U8", "BOOL".
std::string_view DTypeName(DType dtype);
// Inverse of DTypeName. Errors: InvalidArgument for a name we do not know (e.g. "F8_E5M2").
absl::StatusOr<DType> ParseDType(std::string_view name);
// Bytes per element (1 for the 8-bit types and BOOL).
size_t DTypeSize(DType dtype);

// "[4, 256]"
std::string ShapeString(const std::vector<int64_t>& shape);
// Product of dims (1 for a scalar []). REQUIRES: dims >= 0 and no overflow (checked by parsers).
int64_t NumElements(const std::vector<int64_t>& shape);

// Asks the kernel to read [data, data + nbytes) of a mapped file now (madvise WILLNEED, page
// rounded). SafetensorsFile maps with MADV_RANDOM, so no readahead drags neighbouring tensors
// in; callers that are about to use a whole tensor (Checkpoint::GetMatrix) prefetch it with this.
// Best effort: errors are ignored.
void PrefetchBytes(const uint8_t* data, size_t nbytes);

// One tensor inside a mapped file. Does not own its bytes: valid while the file is open.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
};

// A read-only, memory-mapped safetensors file. Thread-safe after Open (immutable). The mapping
// is advised MADV_RANDOM: a page fault reads that page only, not megabytes of readahead, so
// using one expert of a shard does not pull its neighbours from disk (see PrefetchBytes).
class SafetensorsFile {
 public:
  // Maps `path` and parses its header. Validates: the file is long enough for the 8-byte length
  // and the header; the header is a JSON object; each entry has a known dtype, a shape of
  // non-negative ints and data_offsets [begin, end] with begin <= end <= data size and
  // end - begin == elements * dtype size. Errors (InvalidArgument, naming the file and the
  // tensor at fault): truncated file, header length out of range, malformed JSON header,
  // unknown dtype, bad shape, offsets out of range or not matching the shape. NotFound if the
  // file is missing. Overlapping tensors are allowed (the format does not forbid them).
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return file_->path(); }
  bool Has(std::string_view name) const;
  // Errors: NotFound naming the tensor and the file.
  absl::StatusOr<TensorView> Get(std::string_view name) const;
  // Tensor names, sorted.
  std::vector<std::string> Names() const;
  // The "__metadata__" string map (empty if absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The whole mapping (e.g. to test which pages a load touched).
  const base::MappedFile& mapped_file() const { return *file_; }

 private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    size_t offset;  // from the start of the file
    size_t nbytes;
  };
  explicit SafetensorsFile(std::unique_ptr<base::MappedFile> file) : file_(std::move(file)) {}

  std::unique_ptr<base::MappedFile> file_;
  absl::flat_hash_map<std::string, Entry> entries_;
  std::vector<std::string> order_;
  std::map<std::string, std::string> metadata_;
};

// A tensor's name, dtype and shape: what the header records before any byte is written.
struct TensorSpec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
};

// The header JSON of a file with these tensors laid out in name order (sorted, as the golden
// checkpoints are), "__metadata__" last, compact, padded with spaces so the data starts 8-byte
// aligned. Errors: InvalidArgument for an empty or duplicate name or a negative dim.
absl::StatusOr<std::string> SafetensorsHeader(std::vector<TensorSpec> specs,
                                              const std::map<std::string, std::string>& metadata);

// Writes a safetensors file without holding all tensors in memory: the header from `specs`, then
// each tensor's bytes in name order, produced by `produce(spec, &bytes)` one tensor at a time
// (make-model writes hundreds of MB this way). The file appears atomically at `path` (temp file
// + rename) only if everything succeeded. Errors: those of SafetensorsHeader; InvalidArgument if
// `produce` returns a wrong byte count (names the tensor); `produce`'s own error; file-system
// errors.
absl::Status WriteSafetensorsStreaming(
    const std::string& path, std::vector<TensorSpec> specs,
    const std::map<std::string, std::string>& metadata,
    const std::function<absl::Status(const TensorSpec&, std::vector<uint8_t>*)>& produce);

// Builds one safetensors file in memory (score's logits, tests). Tensors are laid out sorted by
// name whatever the order of Add calls. Not thread-safe.
class SafetensorsWriter {
 public:
  // Copies `bytes`. Errors: InvalidArgument if the name is empty or already added, a dim is
  // negative, or bytes.size() != elements(shape) * DTypeSize(dtype) (message names the tensor).
  absl::Status Add(std::string_view name, DType dtype, std::vector<int64_t> shape,
                   std::string_view bytes);
  // Same, taking the buffer without a copy.
  absl::Status Add(std::string_view name, DType dtype, std::vector<int64_t> shape,
                   std::vector<uint8_t>&& bytes);
  // Convenience for float32 / int32 data (little-endian host).
  absl::Status AddF32(std::string_view name, std::vector<int64_t> shape,
                      const std::vector<float>& values);
  absl::Status AddI32(std::string_view name, std::vector<int64_t> shape,
                      const std::vector<int32_t>& values);
  void SetMetadata(std::string key, std::string value) {
    metadata_[std::move(key)] = std::move(value);
  }

  size_t num_tensors() const { return tensors_.size(); }
  // The whole file as bytes.
  std::string Serialize() const;
  // Writes the file atomically (temp file + rename). Errors: those of the file system.
  absl::Status WriteFile(const std::string& path) const;

 private:
  struct Pending {
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::map<std::string, Pending> tensors_;  // sorted by name: the layout order
  std::map<std::string, std::string> metadata_;
};

}  // namespace expertmesh::model
