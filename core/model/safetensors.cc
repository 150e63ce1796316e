#include "core/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace expertmesh::model {
namespace {

using nlohmann::json;

// The reference implementation refuses headers above 100 MB; a bigger one is a corrupt length.
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::kF32, "F32", 4},        {DType::kBF16, "BF16", 2},      {DType::kF16, "F16", 2},
    {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kF8E8M0, "F8_E8M0", 1}, {DType::kI8, "I8", 1},
    {DType::kI32, "I32", 4},        {DType::kI64, "I64", 8},        {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1},
};

// elements(shape) * size without overflow; false if it would exceed `limit`.
bool ByteSize(const std::vector<int64_t>& shape, size_t elem, uint64_t limit, uint64_t* out) {
  uint64_t n = elem;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (d != 0 && n > limit / static_cast<uint64_t>(d)) return false;
    n *= static_cast<uint64_t>(d);
  }
  *out = n;
  return n <= limit;
}

std::string ErrnoText(int err) { return std::string(std::strerror(err)); }

// A file written through a temp name and renamed into place on Commit.
class AtomicFile {
 public:
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_ && !tmp_.empty()) ::unlink(tmp_.c_str());
  }
  absl::Status Open(const std::string& path) {
    path_ = path;
    tmp_ = absl::StrCat(path, ".tmp.", ::getpid());
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) {
      int err = errno;
      tmp_.clear();
      return absl::InternalError(absl::StrCat("creating ", path, ".tmp: ", ErrnoText(err)));
    }
    return absl::OkStatus();
  }
  absl::Status Write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        return absl::InternalError(absl::StrCat("writing ", tmp_, ": ", ErrnoText(errno)));
      }
      p += w;
      n -= static_cast<size_t>(w);
    }
    return absl::OkStatus();
  }
  absl::Status Commit() {
    if (::close(fd_) != 0) {
      fd_ = -1;
      return absl::InternalError(absl::StrCat("closing ", tmp_, ": ", ErrnoText(errno)));
    }
    fd_ = -1;
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
      return absl::InternalError(absl::StrCat("renaming to ", path_, ": ", ErrnoText(errno)));
    }
    committed_ = true;
    return absl::OkStatus();
  }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

absl::Status CheckSpec(const TensorSpec& s) {
  if (s.name.empty()) return absl::InvalidArgumentError("safetensors: empty tensor name");
  if (s.name == "__metadata__") {
    return absl::InvalidArgumentError("safetensors: '__metadata__' is not a tensor name");
  }
  for (int64_t d : s.shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", s.name, "': negative dim in shape ", ShapeString(s.shape)));
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::string_view DTypeName(DType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.name;
  }
  return "?";
}

absl::StatusOr<DType> ParseDType(std::string_view name) {
  for (const auto& d : kDTypes) {
    if (d.name == name) return d.dtype;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype '", std::string(name), "'"));
}

size_t DTypeSize(DType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.size;
  }
  return 1;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void PrefetchBytes(const uint8_t* data, size_t nbytes) {
  if (data == nullptr || nbytes == 0) return;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data) / page * page;
  const uintptr_t end = reinterpret_cast<uintptr_t>(data) + nbytes;
  ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_WILLNEED);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  EM_ASSIGN_OR_RETURN(std::unique_ptr<base::MappedFile> mapped, base::MappedFile::Open(path));
  if (mapped->size() > 0) {
    // Best effort: without it the kernel's readahead (often several MB) would read tensors
    // nobody asked for. mmap returns page-aligned addresses, as madvise requires.
    ::madvise(const_cast<uint8_t*>(mapped->data()), mapped->size(), MADV_RANDOM);
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile(std::move(mapped)));
  const uint8_t* base = file->file_->data();
  const size_t size = file->file_->size();
  auto bad = [&](std::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", std::string(what)));
  };
  if (size < 8) {
    return bad(absl::StrCat("truncated: ", size, " bytes, a safetensors file has at least 8"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];  // little-endian
  if (header_len > size - 8 || header_len > kMaxHeaderBytes) {
    return bad(absl::StrCat("header length ", header_len, " out of range (file has ", size,
                            " bytes; truncated or not safetensors)"));
  }
  const char* hbegin = reinterpret_cast<const char*>(base + 8);
  json header = json::parse(hbegin, hbegin + header_len, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) return bad("malformed JSON header");
  if (!header.is_object()) return bad("JSON header is not an object");
  const size_t data_start = 8 + header_len;
  const uint64_t data_size = size - data_start;

  try {
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      auto tbad = [&](std::string_view what) {
        return bad(absl::StrCat("tensor '", name, "': ", std::string(what)));
      };
      if (name == "__metadata__") {
        if (!v.is_object()) return bad("__metadata__ is not an object");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string()) {
            return bad(absl::StrCat("__metadata__ value of '", m.key(), "' is not a string"));
          }
          file->metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      if (!v.is_object()) return tbad("entry is not an object");
      auto dt = v.find("dtype");
      if (dt == v.end() || !dt->is_string()) return tbad("missing or non-string dtype");
      auto dtype = ParseDType(dt->get<std::string>());
      if (!dtype.ok()) return tbad(std::string(dtype.status().message()));
      auto sh = v.find("shape");
      if (sh == v.end() || !sh->is_array()) return tbad("missing or non-array shape");
      std::vector<int64_t> shape;
      for (const json& d : *sh) {
        if (!d.is_number_integer() || d.get<int64_t>() < 0) {
          return tbad(absl::StrCat("bad shape ", sh->dump()));
        }
        shape.push_back(d.get<int64_t>());
      }
      auto off = v.find("data_offsets");
      if (off == v.end() || !off->is_array() || off->size() != 2 ||
          !(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned()) {
        return tbad("data_offsets must be [begin, end] of non-negative integers");
      }
      const uint64_t begin = (*off)[0].get<uint64_t>();
      const uint64_t end = (*off)[1].get<uint64_t>();
      if (begin > end || end > data_size) {
        return tbad(absl::StrCat("data_offsets [", begin, ", ", end,
                                 "] out of range (data section has ", data_size,
                                 " bytes; truncated file?)"));
      }
      uint64_t expect = 0;
      if (!ByteSize(shape, DTypeSize(*dtype), data_size, &expect) || expect != end - begin) {
        return tbad(absl::StrCat(
            "shape ", ShapeString(shape), " of ", std::string(DTypeName(*dtype)), " needs ",
            ByteSize(shape, DTypeSize(*dtype), UINT64_MAX, &expect) ? absl::StrCat(expect)
                                                                    : std::string("too many"),
            " bytes, data_offsets give ", end - begin));
      }
      file->entries_[name] = Entry{*dtype, std::move(shape), data_start + begin, end - begin};
      file->order_.push_back(name);
    }
  } catch (const json::exception& e) {
    return bad(absl::StrCat("bad JSON header: ", e.what()));
  }
  return file;
}

bool SafetensorsFile::Has(std::string_view name) const {
  return entries_.contains(std::string(name));
}

absl::StatusOr<TensorView> SafetensorsFile::Get(std::string_view name) const {
  auto it = entries_.find(std::string(name));
  if (it == entries_.end()) {
    return absl::NotFoundError(
        absl::StrCat("tensor '", std::string(name), "' not in ", file_->path()));
  }
  const Entry& e = it->second;
  TensorView v;
  v.name = std::string(name);
  v.dtype = e.dtype;
  v.shape = e.shape;
  v.data = file_->data() + e.offset;
  v.nbytes = e.nbytes;
  return v;
}

std::vector<std::string> SafetensorsFile::Names() const { return order_; }

absl::StatusOr<std::string> SafetensorsHeader(std::vector<TensorSpec> specs,
                                              const std::map<std::string, std::string>& metadata) {
  std::sort(specs.begin(), specs.end(),
            [](const TensorSpec& a, const TensorSpec& b) { return a.name < b.name; });
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  uint64_t offset = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& s = specs[i];
    EM_RETURN_IF_ERROR(CheckSpec(s));
    if (i > 0 && specs[i - 1].name == s.name) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", s.name, "' added twice"));
    }
    uint64_t n = static_cast<uint64_t>(NumElements(s.shape)) * DTypeSize(s.dtype);
    nlohmann::ordered_json e;
    e["dtype"] = std::string(DTypeName(s.dtype));
    e["shape"] = s.shape;
    e["data_offsets"] = {offset, offset + n};
    h[s.name] = std::move(e);
    offset += n;
  }
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    h["__metadata__"] = std::move(m);
  }
  std::string text = h.dump();
  // Pad so that the data section (and so every 8-byte-multiple tensor) starts aligned.
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  std::string out(8, '\0');
  uint64_t len = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  return out + text;
}

absl::Status WriteSafetensorsStreaming(
    const std::string& path, std::vector<TensorSpec> specs,
    const std::map<std::string, std::string>& metadata,
    const std::function<absl::Status(const TensorSpec&, std::vector<uint8_t>*)>& produce) {
  EM_ASSIGN_OR_RETURN(std::string header, SafetensorsHeader(specs, metadata));
  std::sort(specs.begin(), specs.end(),
            [](const TensorSpec& a, const TensorSpec& b) { return a.name < b.name; });
  AtomicFile out;
  EM_RETURN_IF_ERROR(out.Open(path));
  EM_RETURN_IF_ERROR(out.Write(header.data(), header.size()));
  std::vector<uint8_t> bytes;
  for (const TensorSpec& s : specs) {
    bytes.clear();
    EM_RETURN_IF_ERROR(produce(s, &bytes));
    const size_t n = static_cast<size_t>(NumElements(s.shape)) * DTypeSize(s.dtype);
    if (bytes.size() != n) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", s.name, "': produced ", bytes.size(), " bytes, shape ", ShapeString(s.shape),
          " of ", std::string(DTypeName(s.dtype)), " needs ", n));
    }
    EM_RETURN_IF_ERROR(out.Write(bytes.data(), bytes.size()));
  }
  return out.Commit();
}

absl::Status SafetensorsWriter::Add(std::string_view name, DType dtype, std::vector<int64_t> shape,
                                    std::string_view bytes) {
  return Add(name, dtype, std::move(shape),
             std::vector<uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()),
                                  reinterpret_cast<const uint8_t*>(bytes.data()) + bytes.size()));
}

absl::Status SafetensorsWriter::Add(std::string_view name, DType dtype, std::vector<int64_t> shape,
                                    std::vector<uint8_t>&& bytes) {
  TensorSpec spec{std::string(name), dtype, shape};
  EM_RETURN_IF_ERROR(CheckSpec(spec));
  if (tensors_.contains(spec.name)) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", spec.name, "' added twice"));
  }
  uint64_t n = 0;
  if (!ByteSize(shape, DTypeSize(dtype), UINT64_MAX / 2, &n) || n != bytes.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", spec.name, "': ", bytes.size(), " bytes given, shape ",
                     ShapeString(shape), " of ", std::string(DTypeName(dtype)), " needs ", n));
  }
  tensors_[spec.name] = Pending{dtype, std::move(shape), std::move(bytes)};
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::AddF32(std::string_view name, std::vector<int64_t> shape,
                                       const std::vector<float>& values) {
  std::vector<uint8_t> bytes(values.size() * sizeof(float));
  if (!bytes.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return Add(name, DType::kF32, std::move(shape), std::move(bytes));
}

absl::Status SafetensorsWriter::AddI32(std::string_view name, std::vector<int64_t> shape,
                                       const std::vector<int32_t>& values) {
  std::vector<uint8_t> bytes(values.size() * sizeof(int32_t));
  if (!bytes.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return Add(name, DType::kI32, std::move(shape), std::move(bytes));
}

std::string SafetensorsWriter::Serialize() const {
  std::vector<TensorSpec> specs;
  for (const auto& [name, t] : tensors_) specs.push_back({name, t.dtype, t.shape});
  // Specs were validated by Add, so the header cannot fail.
  auto header = SafetensorsHeader(std::move(specs), metadata_);
  EM_CHECK(header.ok());
  std::string out = std::move(*header);
  for (const auto& [name, t] : tensors_) {
    out.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  }
  return out;
}

absl::Status SafetensorsWriter::WriteFile(const std::string& path) const {
  std::vector<TensorSpec> specs;
  for (const auto& [name, t] : tensors_) specs.push_back({name, t.dtype, t.shape});
  return WriteSafetensorsStreaming(path, std::move(specs), metadata_,
                                   [this](const TensorSpec& s, std::vector<uint8_t>* bytes) {
                                     *bytes = tensors_.at(s.name).bytes;
                                     return absl::OkStatus();
                                   });
}

}  // namespace expertmesh::model
