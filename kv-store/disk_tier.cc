#include "kv-store/disk_tier.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <memory>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/base/log.h"
#include "core/state/crc32c.h"

namespace expertmesh::kv_store {
using state::Crc32c;
using state::Crc32cExtend;
namespace {

static_assert(std::endian::native == std::endian::little,
              "block files are little-endian and written with memcpy");

constexpr char kMagic[8] = {'E', 'M', 'K', 'V', 'B', 'L', 'K', '1'};
constexpr size_t kFixedHeader = 56;  // up to the tenant bytes
constexpr size_t kMaxHeader = kFixedHeader + 256 + 4;
constexpr char kBlockSuffix[] = ".blk";
constexpr char kTempSuffix[] = ".tmp";

absl::Status Errno(std::string_view what, const std::string& path) {
  const int e = errno;
  std::string message = absl::StrCat(std::string(what), " ", path, ": ", std::strerror(e));
  if (e == ENOSPC || e == EDQUOT) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

template <typename T>
void Put(std::string& out, size_t offset, T v) {
  std::memcpy(out.data() + offset, &v, sizeof v);
}
template <typename T>
T Get(std::string_view in, size_t offset) {
  T v;
  std::memcpy(&v, in.data() + offset, sizeof v);
  return v;
}

// Parses a header from the start of `bytes`; sets *header_bytes. DataLoss if it is not one.
absl::StatusOr<BlockFileHeader> DecodeHeader(std::string_view bytes, size_t* header_bytes) {
  if (bytes.size() < kFixedHeader + 4 || std::memcmp(bytes.data(), kMagic, 8) != 0) {
    return absl::DataLossError("not a block file (bad magic or too short)");
  }
  const uint32_t total = Get<uint32_t>(bytes, 8);
  const uint32_t tenant_len = Get<uint32_t>(bytes, 12);
  if (total != kFixedHeader + tenant_len + 4 || total > bytes.size()) {
    return absl::DataLossError("block file header length is inconsistent");
  }
  if (Crc32c(bytes.substr(0, total - 4)) != Get<uint32_t>(bytes, total - 4)) {
    return absl::DataLossError("block file header CRC32C mismatch");
  }
  BlockFileHeader h;
  h.chain_hash = Get<uint64_t>(bytes, 16);
  h.end_position = Get<uint32_t>(bytes, 24);
  h.has_parent = (Get<uint32_t>(bytes, 28) & 1) != 0;
  h.parent_hash = Get<uint64_t>(bytes, 32);
  h.parent_end = Get<uint32_t>(bytes, 40);
  h.data_crc32c = Get<uint32_t>(bytes, 44);
  h.data_bytes = Get<uint64_t>(bytes, 48);
  h.tenant = std::string(bytes.substr(kFixedHeader, tenant_len));
  *header_bytes = total;
  return h;
}

bool SameHeader(const BlockFileHeader& a, const BlockFileHeader& b) {
  return a.tenant == b.tenant && a.chain_hash == b.chain_hash &&
         a.end_position == b.end_position && a.has_parent == b.has_parent &&
         a.parent_hash == b.parent_hash && a.parent_end == b.parent_end &&
         a.data_bytes == b.data_bytes && a.data_crc32c == b.data_crc32c;
}

// Reads exactly n bytes at `offset` (a short file is DataLoss: it was torn or truncated).
absl::Status ReadAt(int fd, char* out, size_t n, uint64_t offset, const std::string& path) {
  while (n > 0) {
    const ssize_t got = ::pread(fd, out, n, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      return Errno("cannot read", path);
    }
    if (got == 0) return absl::DataLossError(absl::StrCat("block file ", path, " is truncated"));
    out += got;
    n -= static_cast<size_t>(got);
    offset += static_cast<uint64_t>(got);
  }
  return absl::OkStatus();
}

}  // namespace

uint64_t DiskTier::FileBytes(std::string_view tenant, uint64_t data_bytes) {
  return kFixedHeader + tenant.size() + 4 + data_bytes;
}

std::string DiskTier::EncodeHeader(const BlockFileHeader& h) {
  std::string out(kFixedHeader + h.tenant.size() + 4, '\0');
  std::memcpy(out.data(), kMagic, 8);
  Put<uint32_t>(out, 8, static_cast<uint32_t>(out.size()));
  Put<uint32_t>(out, 12, static_cast<uint32_t>(h.tenant.size()));
  Put<uint64_t>(out, 16, h.chain_hash);
  Put<uint32_t>(out, 24, h.end_position);
  Put<uint32_t>(out, 28, h.has_parent ? 1u : 0u);
  Put<uint64_t>(out, 32, h.parent_hash);
  Put<uint32_t>(out, 40, h.parent_end);
  Put<uint32_t>(out, 44, h.data_crc32c);
  Put<uint64_t>(out, 48, h.data_bytes);
  std::memcpy(out.data() + kFixedHeader, h.tenant.data(), h.tenant.size());
  Put<uint32_t>(out, out.size() - 4, Crc32c(std::string_view(out).substr(0, out.size() - 4)));
  return out;
}

std::string DiskTier::TenantDir(std::string_view tenant) const {
  // Hex keeps any tenant string a valid, collision-free directory name.
  return absl::StrCat(dir_, "/t", absl::BytesToHexString(absl::string_view(tenant.data(), tenant.size())));
}

std::string DiskTier::BlockPath(std::string_view tenant, uint64_t chain_hash) const {
  return absl::StrCat(TenantDir(tenant), "/", absl::StrFormat("%016x", chain_hash), kBlockSuffix);
}

absl::Status DiskTier::Init() {
  if (::mkdir(dir_.c_str(), 0755) != 0 && errno != EEXIST) return Errno("cannot create", dir_);
  struct stat st;
  if (::stat(dir_.c_str(), &st) != 0) return Errno("cannot stat", dir_);
  if (!S_ISDIR(st.st_mode)) return absl::InvalidArgumentError(dir_ + " is not a directory");
  return absl::OkStatus();
}

absl::StatusOr<ScanResult> DiskTier::Scan() {
  ScanResult result;
  std::unique_ptr<DIR, int (*)(DIR*)> top(::opendir(dir_.c_str()), ::closedir);
  if (!top) return Errno("cannot list", dir_);
  while (dirent* t = ::readdir(top.get())) {
    const std::string tname = t->d_name;
    if (tname.empty() || tname[0] != 't') continue;  // not ours ("." and ".." included)
    const std::string tdir = dir_ + "/" + tname;
    const std::string hex = tname.substr(1);
    if (hex.size() % 2 != 0 ||
        hex.find_first_not_of("0123456789abcdef") != std::string::npos) {
      continue;
    }
    const std::string tenant = absl::HexStringToBytes(hex);
    std::unique_ptr<DIR, int (*)(DIR*)> sub(::opendir(tdir.c_str()), ::closedir);
    if (!sub) continue;
    while (dirent* f = ::readdir(sub.get())) {
      const std::string name = f->d_name;
      if (name == "." || name == "..") continue;
      const std::string path = tdir + "/" + name;
      if (absl::EndsWith(name, kTempSuffix)) {
        RemovePath(path);
        ++result.dropped_files;
        continue;
      }
      if (!absl::EndsWith(name, kBlockSuffix)) continue;
      auto drop = [&](absl::string_view why) {
        base::LogWarning("dropping block file", {{"path", path}, {"reason", std::string(why)}});
        RemovePath(path);
        ++result.dropped_files;
      };
      uint64_t name_hash = 0;
      const std::string stem = name.substr(0, name.size() - (sizeof kBlockSuffix - 1));
      if (stem.size() != 16 || !absl::SimpleHexAtoi(stem, &name_hash)) {
        drop("bad file name");
        continue;
      }
      Fd fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
      struct stat st;
      if (fd.fd < 0 || ::fstat(fd.fd, &st) != 0) {
        drop("cannot open");
        continue;
      }
      std::string head(std::min<uint64_t>(kMaxHeader, static_cast<uint64_t>(st.st_size)), '\0');
      const ssize_t got = ::pread(fd.fd, head.data(), head.size(), 0);
      if (got != static_cast<ssize_t>(head.size())) {
        drop("cannot read header");
        continue;
      }
      size_t header_bytes = 0;
      auto header = DecodeHeader(head, &header_bytes);
      if (!header.ok()) {
        drop(header.status().message());
        continue;
      }
      if (header->tenant != tenant || header->chain_hash != name_hash) {
        drop("header key differs from the file name");
        continue;
      }
      if (static_cast<uint64_t>(st.st_size) != header_bytes + header->data_bytes) {
        drop("file size differs from the header (torn write)");
        continue;
      }
      ScannedBlock b;
      b.header = std::move(*header);
      b.file_bytes = static_cast<uint64_t>(st.st_size);
      b.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
      result.blocks.push_back(std::move(b));
    }
  }
  return result;
}

absl::StatusOr<std::string> DiskTier::WriteTemp(const BlockFileHeader& header,
                                                std::string_view data, uint64_t serial) {
  const std::string tdir = TenantDir(header.tenant);
  if (::mkdir(tdir.c_str(), 0755) != 0 && errno != EEXIST) return Errno("cannot create", tdir);
  const std::string path = absl::StrCat(tdir, "/", absl::StrFormat("%016x", header.chain_hash),
                                        ".", serial, kTempSuffix);
  Fd fd{::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)};
  if (fd.fd < 0) return Errno("cannot create", path);
  const std::string head = EncodeHeader(header);
  iovec iov[2] = {{const_cast<char*>(head.data()), head.size()},
                  {const_cast<char*>(data.data()), data.size()}};
  size_t left = head.size() + data.size();
  int first = 0;
  while (left > 0) {
    const ssize_t wrote = ::writev(fd.fd, iov + first, 2 - first);
    if (wrote < 0) {
      if (errno == EINTR) continue;
      absl::Status s = Errno("cannot write", path);
      RemovePath(path);
      return s;
    }
    left -= static_cast<size_t>(wrote);
    size_t w = static_cast<size_t>(wrote);
    while (first < 2 && w >= iov[first].iov_len) w -= iov[first++].iov_len;
    if (first < 2) {
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + w;
      iov[first].iov_len -= w;
    }
  }
  if (fsync_ && ::fdatasync(fd.fd) != 0) {
    absl::Status s = Errno("cannot sync", path);
    RemovePath(path);
    return s;
  }
  return path;
}

absl::Status DiskTier::Publish(const std::string& temp_path, std::string_view tenant,
                               uint64_t chain_hash) {
  const std::string path = BlockPath(tenant, chain_hash);
  if (::rename(temp_path.c_str(), path.c_str()) != 0) {
    absl::Status s = Errno("cannot rename to", path);
    RemovePath(temp_path);
    return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> DiskTier::Read(const BlockFileHeader& expected) {
  const std::string path = BlockPath(expected.tenant, expected.chain_hash);
  Fd fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat("block file ", path, " is gone"));
    return Errno("cannot open", path);
  }
  struct stat st;
  if (::fstat(fd.fd, &st) != 0) return Errno("cannot stat", path);
  const uint64_t header_bytes = FileBytes(expected.tenant, 0);
  if (static_cast<uint64_t>(st.st_size) != header_bytes + expected.data_bytes) {
    return absl::DataLossError(
        absl::StrCat("block file ", path, " has ", st.st_size, " bytes, expected ",
                     header_bytes + expected.data_bytes));
  }
  std::string head(header_bytes, '\0');
  if (absl::Status s = ReadAt(fd.fd, head.data(), head.size(), 0, path); !s.ok()) return s;
  size_t parsed = 0;
  auto header = DecodeHeader(head, &parsed);
  if (!header.ok()) {
    return absl::DataLossError(absl::StrCat(header.status().message(), " in ", path));
  }
  if (!SameHeader(*header, expected)) {
    return absl::DataLossError(absl::StrCat("block file ", path, " holds another block"));
  }
  // Read and checked in chunks: the CRC of one chunk runs while the kernel's readahead fetches
  // the next, instead of a multi-megabyte read followed by a multi-megabyte CRC.
  constexpr uint64_t kChunk = 1 << 20;
  std::string data(expected.data_bytes, '\0');
  uint32_t crc = 0;
  for (uint64_t done = 0; done < data.size();) {
    const uint64_t n = std::min<uint64_t>(kChunk, data.size() - done);
    if (absl::Status s = ReadAt(fd.fd, data.data() + done, n, header_bytes + done, path);
        !s.ok()) {
      return s;
    }
    crc = Crc32cExtend(crc, std::string_view(data).substr(done, n));
    done += n;
  }
  if (crc != expected.data_crc32c) {
    return absl::DataLossError(absl::StrCat("block file ", path, ": data CRC32C mismatch"));
  }
  return data;
}

void DiskTier::Remove(std::string_view tenant, uint64_t chain_hash) {
  RemovePath(BlockPath(tenant, chain_hash));
}

void DiskTier::RemovePath(const std::string& path) { ::unlink(path.c_str()); }

}  // namespace expertmesh::kv_store
