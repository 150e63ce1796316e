#include "kv-store/disk_tier.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "core/base/log.h"
#include "core/state/crc32c.h"

namespace expertmesh::kv_store {
using state::Crc32c;
using state::Crc32cExtend;

struct DiskTier::Segment {
  uint64_t id = 0;
  std::string path;
  int fd = -1;
  // Appended bytes: changed only under write_mu_ and mu_ together, so either lock reads it.
  uint64_t size = 0;
  uint64_t live_bytes = 0;  // guarded by mu_
  ~Segment() {
    if (fd >= 0) ::close(fd);
  }
};

namespace {

static_assert(std::endian::native == std::endian::little,
              "segment records are little-endian and written with memcpy");

// The first 4 bytes of a record; the only bytes ever rewritten (live -> dead), so they are
// outside the header CRC.
constexpr uint32_t kLive = 0x4556494C;  // "LIVE"
constexpr uint32_t kDead = 0x44414544;  // "DEAD"
constexpr char kMagic[4] = {'E', 'M', 'K', 'R'};
constexpr size_t kFixedHeader = 64;  // up to the tenant bytes
constexpr size_t kMaxTenant = 256;
constexpr size_t kMaxHeader = kFixedHeader + kMaxTenant + 4;
constexpr char kSegmentSuffix[] = ".seg";
// Reads are checked in chunks of this size, so the CRC of one runs while the next is fetched.
constexpr uint64_t kReadChunk = 1 << 20;

DiskTierOptions& DefaultOptionsRef() {
  static DiskTierOptions options;
  return options;
}

absl::Status Errno(std::string_view what, const std::string& path) {
  const int e = errno;
  std::string message = absl::StrCat(std::string(what), " ", path, ": ", std::strerror(e));
  if (e == ENOSPC || e == EDQUOT) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

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

int64_t NowNs() {
  timespec ts;
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

struct ParsedHeader {
  uint32_t state = 0;
  BlockFileHeader header;
  int64_t written_ns = 0;
  size_t header_bytes = 0;
  uint64_t record_bytes() const { return header_bytes + header.data_bytes; }
};

// Parses a record header from the start of `bytes`. DataLoss if it is not one.
absl::StatusOr<ParsedHeader> DecodeHeader(std::string_view bytes) {
  if (bytes.size() < kFixedHeader + 4 || std::memcmp(bytes.data() + 4, kMagic, 4) != 0) {
    return absl::DataLossError("not a record (bad magic or too short)");
  }
  ParsedHeader p;
  p.state = Get<uint32_t>(bytes, 0);
  if (p.state != kLive && p.state != kDead) return absl::DataLossError("bad record state");
  const uint32_t total = Get<uint32_t>(bytes, 8);
  const uint32_t tenant_len = Get<uint32_t>(bytes, 12);
  if (tenant_len > kMaxTenant || total != kFixedHeader + tenant_len + 4 || total > bytes.size()) {
    return absl::DataLossError("record header length is inconsistent");
  }
  if (Crc32c(bytes.substr(4, total - 8)) != Get<uint32_t>(bytes, total - 4)) {
    return absl::DataLossError("record header CRC32C mismatch");
  }
  BlockFileHeader& h = p.header;
  h.chain_hash = Get<uint64_t>(bytes, 16);
  h.end_position = Get<uint32_t>(bytes, 24);
  h.has_parent = (Get<uint32_t>(bytes, 28) & 1) != 0;
  h.parent_hash = Get<uint64_t>(bytes, 32);
  h.parent_end = Get<uint32_t>(bytes, 40);
  h.data_crc32c = Get<uint32_t>(bytes, 44);
  h.data_bytes = Get<uint64_t>(bytes, 48);
  p.written_ns = Get<int64_t>(bytes, 56);
  h.tenant = std::string(bytes.substr(kFixedHeader, tenant_len));
  p.header_bytes = total;
  return p;
}

bool SameHeader(const BlockFileHeader& a, const BlockFileHeader& b) {
  return a.tenant == b.tenant && a.chain_hash == b.chain_hash &&
         a.end_position == b.end_position && a.has_parent == b.has_parent &&
         a.parent_hash == b.parent_hash && a.parent_end == b.parent_end &&
         a.data_bytes == b.data_bytes && a.data_crc32c == b.data_crc32c;
}

// Reads exactly n bytes at `offset` (a short file is DataLoss: the record was cut short).
absl::Status ReadAt(int fd, char* out, size_t n, uint64_t offset, const std::string& path) {
  while (n > 0) {
    const ssize_t got = ::pread(fd, out, n, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      return Errno("cannot read", path);
    }
    if (got == 0) {
      return absl::DataLossError(absl::StrCat("segment ", path, " ends inside a record"));
    }
    out += got;
    n -= static_cast<size_t>(got);
    offset += static_cast<uint64_t>(got);
  }
  return absl::OkStatus();
}

// ReadAt of two consecutive pieces with one preadv.
absl::Status ReadVAt(int fd, char* a, size_t a_len, char* b, size_t b_len, uint64_t offset,
                     const std::string& path) {
  iovec iov[2] = {{a, a_len}, {b, b_len}};
  int first = 0;
  size_t left = a_len + b_len;
  while (left > 0) {
    const ssize_t got = ::preadv(fd, iov + first, 2 - first, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      return Errno("cannot read", path);
    }
    if (got == 0) {
      return absl::DataLossError(absl::StrCat("segment ", path, " ends inside a record"));
    }
    left -= static_cast<size_t>(got);
    offset += static_cast<uint64_t>(got);
    size_t g = static_cast<size_t>(got);
    while (first < 2 && g >= iov[first].iov_len) g -= iov[first++].iov_len;
    if (first < 2) {
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + g;
      iov[first].iov_len -= g;
    }
  }
  return absl::OkStatus();
}

void MarkDead(int fd, uint64_t offset) {
  const uint32_t dead = kDead;
  // Best effort: a record left live is found again by a restart, whose copy is still the
  // block's bytes (a key names one content) and is CRC-checked when read.
  if (::pwrite(fd, &dead, sizeof dead, static_cast<off_t>(offset)) != sizeof dead) {
    base::LogWarning("cannot mark a record dead", {{"error", std::strerror(errno)}});
  }
}

// "<segment id>:<offset>:<path>", what WriteTemp hands to Publish or RemovePath.
std::string Token(uint64_t id, uint64_t offset, const std::string& path) {
  return absl::StrCat(id, ":", offset, ":", path);
}
bool ParseToken(const std::string& token, uint64_t* id, uint64_t* offset, std::string* path) {
  std::vector<std::string> parts = absl::StrSplit(token, absl::MaxSplits(':', 2));
  return parts.size() == 3 && absl::SimpleAtoi(parts[0], id) &&
         absl::SimpleAtoi(parts[1], offset) && (*path = parts[2], true);
}

}  // namespace

DiskTierOptions DiskTier::DefaultOptions() { return DefaultOptionsRef(); }

DiskTier::ScopedDefaultOptionsForTesting::ScopedDefaultOptionsForTesting(DiskTierOptions options)
    : saved_(DefaultOptionsRef()) {
  DefaultOptionsRef() = options;
}
DiskTier::ScopedDefaultOptionsForTesting::~ScopedDefaultOptionsForTesting() {
  DefaultOptionsRef() = saved_;
}

DiskTier::DiskTier(std::string dir, bool fsync) : DiskTier(std::move(dir), fsync, DefaultOptions()) {}

DiskTier::DiskTier(std::string dir, bool fsync, DiskTierOptions options)
    : dir_(std::move(dir)), fsync_(fsync), options_(options) {}

DiskTier::~DiskTier() {
  // Segments emptied since the last append go now rather than at the next start.
  std::vector<std::string> unlink;
  {
    absl::MutexLock lock(&mu_);
    std::vector<std::shared_ptr<Segment>> empty;
    for (const auto& [id, s] : segments_) {
      if (s != current_ && s->live_bytes == 0 && !HasPendingLocked(*s)) empty.push_back(s);
    }
    for (const auto& s : empty) {
      unlink.push_back(s->path);
      DropSegmentLocked(s);
    }
  }
  for (const std::string& path : unlink) ::unlink(path.c_str());
}

uint64_t DiskTier::FileBytes(std::string_view tenant, uint64_t data_bytes) {
  return kFixedHeader + tenant.size() + 4 + data_bytes;
}

std::string DiskTier::EncodeHeader(const BlockFileHeader& h, int64_t written_ns) {
  std::string out(kFixedHeader + h.tenant.size() + 4, '\0');
  Put<uint32_t>(out, 0, kLive);
  std::memcpy(out.data() + 4, kMagic, 4);
  Put<uint32_t>(out, 8, static_cast<uint32_t>(out.size()));
  Put<uint32_t>(out, 12, static_cast<uint32_t>(h.tenant.size()));
  Put<uint64_t>(out, 16, h.chain_hash);
  Put<uint32_t>(out, 24, h.end_position);
  Put<uint32_t>(out, 28, h.has_parent ? 1u : 0u);
  Put<uint64_t>(out, 32, h.parent_hash);
  Put<uint32_t>(out, 40, h.parent_end);
  Put<uint32_t>(out, 44, h.data_crc32c);
  Put<uint64_t>(out, 48, h.data_bytes);
  Put<int64_t>(out, 56, written_ns);
  std::memcpy(out.data() + kFixedHeader, h.tenant.data(), h.tenant.size());
  Put<uint32_t>(out, out.size() - 4, Crc32c(std::string_view(out).substr(4, out.size() - 8)));
  return out;
}

std::string DiskTier::SegmentPath(uint64_t id) const {
  return absl::StrCat(dir_, "/", absl::StrFormat("%016x", id), kSegmentSuffix);
}

absl::Status DiskTier::Init() {
  if (::mkdir(dir_.c_str(), 0755) != 0 && errno != EEXIST) return Errno("cannot create", dir_);
  struct stat st;
  if (::stat(dir_.c_str(), &st) != 0) return Errno("cannot stat", dir_);
  if (!S_ISDIR(st.st_mode)) return absl::InvalidArgumentError(dir_ + " is not a directory");
  return absl::OkStatus();
}

absl::StatusOr<ScanResult> DiskTier::Scan() {
  absl::MutexLock wl(&write_mu_);
  ScanResult result;
  std::vector<uint64_t> ids;
  {
    std::unique_ptr<DIR, int (*)(DIR*)> top(::opendir(dir_.c_str()), ::closedir);
    if (!top) return Errno("cannot list", dir_);
    while (dirent* d = ::readdir(top.get())) {
      const std::string name = d->d_name;
      if (name.size() > 1 && name[0] == 't' && (name.size() - 1) % 2 == 0 &&
          name.find_first_not_of("0123456789abcdef", 1) == std::string::npos) {
        // A tenant directory of the one-file-per-block layout: those blocks are not indexed
        // any more and would only hold disk space. Only its block files go (and then the
        // directory, if that left it empty).
        const std::string tdir = dir_ + "/" + name;
        std::error_code ec;
        if (!std::filesystem::is_directory(tdir, ec)) continue;
        int removed = 0;
        for (const auto& e : std::filesystem::directory_iterator(tdir, ec)) {
          const std::string file = e.path().filename().string();
          if (e.is_regular_file(ec) &&
              (absl::EndsWith(file, ".blk") || absl::EndsWith(file, ".tmp"))) {
            removed += std::filesystem::remove(e.path(), ec) ? 1 : 0;
          }
        }
        std::filesystem::remove(tdir, ec);  // fails, harmlessly, unless empty
        if (removed > 0) {
          base::LogWarning("deleted block files of the old one-file-per-block layout",
                           {{"path", tdir}, {"files", removed}});
        }
        continue;
      }
      uint64_t id = 0;
      if (name.size() == 16 + sizeof kSegmentSuffix - 1 && absl::EndsWith(name, kSegmentSuffix) &&
          absl::SimpleHexAtoi(name.substr(0, 16), &id) && id > 0) {
        ids.push_back(id);
      }
    }
  }
  std::sort(ids.begin(), ids.end());

  struct Found {
    Loc loc;
    BlockFileHeader header;
    int64_t written_ns = 0;
  };
  absl::flat_hash_map<Key, Found> found;
  std::vector<std::shared_ptr<Segment>> segments;
  for (uint64_t id : ids) {
    auto seg = std::make_shared<Segment>();
    seg->id = id;
    seg->path = SegmentPath(id);
    seg->fd = ::open(seg->path.c_str(), O_RDWR | O_CLOEXEC);
    struct stat st;
    if (seg->fd < 0 || ::fstat(seg->fd, &st) != 0) {
      base::LogWarning("cannot open a segment; skipped",
                       {{"path", seg->path}, {"error", std::strerror(errno)}});
      ++result.dropped_files;
      continue;
    }
    const uint64_t size = static_cast<uint64_t>(st.st_size);
    // Only headers are read here: keep the kernel from reading ahead into block data.
    ::posix_fadvise(seg->fd, 0, 0, POSIX_FADV_RANDOM);
    std::string head(kMaxHeader, '\0');
    uint64_t off = 0;
    while (off < size) {
      const size_t want = static_cast<size_t>(std::min<uint64_t>(kMaxHeader, size - off));
      absl::StatusOr<ParsedHeader> p = absl::DataLossError("record header cut short");
      if (ReadAt(seg->fd, head.data(), want, off, seg->path).ok()) {
        p = DecodeHeader(std::string_view(head.data(), want));
      }
      if (p.ok() && off + p->record_bytes() > size) {
        p = absl::DataLossError("record runs past the end of its segment");
      }
      if (!p.ok()) {
        // A torn tail (a crash mid-append) or a damaged header: nothing after it can be found,
        // so the segment ends here.
        base::LogWarning("truncating a segment at a torn or corrupt record",
                         {{"path", seg->path},
                          {"offset", off},
                          {"dropped_bytes", size - off},
                          {"reason", std::string(p.status().message())}});
        if (::ftruncate(seg->fd, static_cast<off_t>(off)) != 0) {
          return Errno("cannot truncate", seg->path);
        }
        ++result.dropped_files;
        break;
      }
      const uint64_t bytes = p->record_bytes();
      if (p->state == kLive) {
        Key key{p->header.tenant, p->header.chain_hash};
        auto [it, inserted] = found.try_emplace(key);
        if (!inserted) {
          // An older copy (copied forward, or re-put, and its dead mark never written): the
          // newer one wins.
          MarkDead(it->second.loc.segment->fd, it->second.loc.offset);
          it->second.loc.segment->live_bytes -= it->second.loc.bytes;
        }
        it->second = Found{Loc{seg, off, bytes}, std::move(p->header), p->written_ns};
        seg->live_bytes += bytes;
      }
      off += bytes;
    }
    // Reads get a descriptor of their own, whose readahead state the header walk never touched.
    const int fresh = ::open(seg->path.c_str(), O_RDWR | O_CLOEXEC);
    if (fresh < 0) return Errno("cannot open", seg->path);
    ::close(seg->fd);
    seg->fd = fresh;
    ::posix_fadvise(seg->fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    seg->size = std::min(off, size);
    segments.push_back(std::move(seg));
  }

  // The newest segment's last record is the one a crash can have left with a complete length
  // but not all its bytes (a power loss without --disk-fsync): check its data too.
  if (!segments.empty()) {
    const std::shared_ptr<Segment>& last = segments.back();
    const Found* tail = nullptr;
    for (const auto& [key, f] : found) {
      if (f.loc.segment == last && f.loc.offset + f.loc.bytes == last->size) tail = &f;
    }
    if (tail != nullptr) {
      std::string data(tail->header.data_bytes, '\0');
      const uint64_t data_at = tail->loc.offset + tail->loc.bytes - tail->header.data_bytes;
      const bool ok = ReadAt(last->fd, data.data(), data.size(), data_at, last->path).ok() &&
                      Crc32c(data) == tail->header.data_crc32c;
      if (!ok) {
        base::LogWarning("truncating a segment's torn last record",
                         {{"path", last->path}, {"offset", tail->loc.offset}});
        const uint64_t cut = tail->loc.offset;
        if (::ftruncate(last->fd, static_cast<off_t>(cut)) != 0) {
          return Errno("cannot truncate", last->path);
        }
        last->live_bytes -= tail->loc.bytes;
        last->size = cut;
        found.erase(Key{tail->header.tenant, tail->header.chain_hash});
        ++result.dropped_files;
      }
    }
  }

  absl::MutexLock lock(&mu_);
  index_.clear();
  segments_.clear();
  pending_.clear();
  current_.reset();
  live_bytes_ = 0;
  for (auto& seg : segments) {
    next_segment_id_ = std::max(next_segment_id_, seg->id + 1);
    if (seg->size == 0) {
      ::unlink(seg->path.c_str());
      continue;
    }
    segments_[seg->id] = seg;
  }
  // Appends continue in the newest segment while it has room.
  if (!segments_.empty() && segments_.rbegin()->second->size < options_.segment_bytes) {
    current_ = segments_.rbegin()->second;
  }
  for (auto& [key, f] : found) {
    live_bytes_ += f.loc.bytes;
    ScannedBlock b;
    b.header = std::move(f.header);
    b.file_bytes = f.loc.bytes;
    b.mtime_ns = f.written_ns;
    result.blocks.push_back(std::move(b));
    index_[key] = std::move(f.loc);
  }
  return result;
}

absl::StatusOr<DiskTier::Appended> DiskTier::AppendLocked(std::string_view head,
                                                          std::string_view data) {
  const uint64_t total = head.size() + data.size();
  std::shared_ptr<Segment> seg;
  {
    absl::MutexLock lock(&mu_);
    seg = current_;
  }
  if (seg == nullptr || (seg->size > 0 && seg->size + total > options_.segment_bytes)) {
    seg = std::make_shared<Segment>();
    {
      absl::MutexLock lock(&mu_);
      seg->id = next_segment_id_++;
    }
    seg->path = SegmentPath(seg->id);
    seg->fd = ::open(seg->path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (seg->fd < 0) return Errno("cannot create", seg->path);
    // A prefix is read in the order it was appended: a doubled readahead window keeps the
    // device busy while each chunk's CRC32C is computed.
    ::posix_fadvise(seg->fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    if (fsync_) {
      // The new name must survive a power loss too.
      const int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (dfd >= 0) {
        ::fsync(dfd);
        ::close(dfd);
      }
    }
    absl::MutexLock lock(&mu_);
    segments_[seg->id] = seg;
    current_ = seg;
  }
  const uint64_t offset = seg->size;
  iovec iov[2] = {{const_cast<char*>(head.data()), head.size()},
                  {const_cast<char*>(data.data()), data.size()}};
  int first = 0;
  uint64_t done = 0;
  while (done < total) {
    const ssize_t wrote =
        ::pwritev(seg->fd, iov + first, 2 - first, static_cast<off_t>(offset + done));
    if (wrote < 0) {
      if (errno == EINTR) continue;
      absl::Status s = Errno("cannot write", seg->path);
      // Nothing half-written stays behind for a later append to follow.
      if (::ftruncate(seg->fd, static_cast<off_t>(offset)) != 0) {
        base::LogWarning("cannot cut a failed append", {{"path", seg->path}});
      }
      return s;
    }
    done += static_cast<uint64_t>(wrote);
    size_t w = static_cast<size_t>(wrote);
    while (first < 2 && w >= iov[first].iov_len) w -= iov[first++].iov_len;
    if (first < 2) {
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + w;
      iov[first].iov_len -= w;
    }
  }
  if (fsync_ && ::fdatasync(seg->fd) != 0) {
    absl::Status s = Errno("cannot sync", seg->path);
    if (::ftruncate(seg->fd, static_cast<off_t>(offset)) != 0) {
      base::LogWarning("cannot cut a failed append", {{"path", seg->path}});
    }
    return s;
  }
  absl::MutexLock lock(&mu_);
  seg->size = offset + total;
  return Appended{seg, offset};
}

bool DiskTier::HasPendingLocked(const Segment& segment) {
  bool pending = false;
  std::vector<std::pair<uint64_t, uint64_t>> discarded;
  for (const auto& [where, bytes] : pending_) {
    if (where.first != segment.id) continue;
    // RemovePath (static, so it cannot reach pending_) marks a discarded record dead.
    uint32_t state = 0;
    if (::pread(segment.fd, &state, sizeof state, static_cast<off_t>(where.second)) ==
            sizeof state &&
        state == kDead) {
      discarded.push_back(where);
    } else {
      pending = true;
    }
  }
  for (const auto& where : discarded) pending_.erase(where);
  return pending;
}

void DiskTier::DropSegmentLocked(const std::shared_ptr<Segment>& segment) {
  segments_.erase(segment->id);
  if (current_ == segment) current_.reset();
  ++stats_.deleted_segments;
}

void DiskTier::MaintainLocked() {
  std::vector<std::string> unlink;
  std::shared_ptr<Segment> victim;
  {
    absl::MutexLock lock(&mu_);
    std::vector<std::shared_ptr<Segment>> empty;
    uint64_t dead = 0;
    for (const auto& [id, s] : segments_) {
      if (s == current_) continue;
      if (s->live_bytes == 0 && !HasPendingLocked(*s)) {
        empty.push_back(s);
        continue;
      }
      dead += s->size - s->live_bytes;
    }
    for (const auto& s : empty) {
      unlink.push_back(s->path);
      DropSegmentLocked(s);
    }
    const double budget = std::max(static_cast<double>(options_.segment_bytes),
                                   options_.dead_fraction * static_cast<double>(live_bytes_));
    if (static_cast<double>(dead) > budget) {
      // The sealed segment that gives back the most space for its copying (oldest on ties).
      for (const auto& [id, s] : segments_) {
        if (s == current_ || HasPendingLocked(*s)) continue;
        if (victim == nullptr ||
            s->size - s->live_bytes > victim->size - victim->live_bytes) {
          victim = s;
        }
      }
    }
  }
  for (const std::string& path : unlink) ::unlink(path.c_str());
  if (victim != nullptr) CompactLocked(victim);
}

bool DiskTier::CompactLocked(const std::shared_ptr<Segment>& victim) {
  struct Live {
    Key key;
    uint64_t offset = 0;
    uint64_t bytes = 0;
  };
  std::vector<Live> live;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, loc] : index_) {
      if (loc.segment == victim) live.push_back(Live{key, loc.offset, loc.bytes});
    }
  }
  std::sort(live.begin(), live.end(),
            [](const Live& a, const Live& b) { return a.offset < b.offset; });
  std::string record;
  for (const Live& r : live) {
    record.resize(r.bytes);
    absl::Status read = ReadAt(victim->fd, record.data(), record.size(), r.offset, victim->path);
    absl::StatusOr<ParsedHeader> p = absl::DataLossError("unread");
    if (read.ok()) p = DecodeHeader(record);
    if (!read.ok() || !p.ok() || p->record_bytes() != r.bytes ||
        p->header.tenant != r.key.first || p->header.chain_hash != r.key.second) {
      // Unreadable: left out of the copy, so a read answers NOT_FOUND and the block store
      // forgets the block (its data would have failed its CRC anyway).
      base::LogWarning("cannot copy a record forward; dropping it",
                       {{"path", victim->path}, {"offset", r.offset}});
      absl::MutexLock lock(&mu_);
      auto it = index_.find(r.key);
      if (it != index_.end() && it->second.segment == victim && it->second.offset == r.offset) {
        victim->live_bytes -= r.bytes;
        live_bytes_ -= r.bytes;
        index_.erase(it);
      }
      continue;
    }
    Put<uint32_t>(record, 0, kLive);
    absl::StatusOr<Appended> a = AppendLocked(record, {});
    if (!a.ok()) {
      base::LogWarning("segment compaction stopped",
                       {{"path", victim->path}, {"error", std::string(a.status().message())}});
      return false;
    }
    absl::MutexLock lock(&mu_);
    auto it = index_.find(r.key);
    if (it != index_.end() && it->second.segment == victim && it->second.offset == r.offset) {
      victim->live_bytes -= r.bytes;
      a->segment->live_bytes += r.bytes;
      it->second = Loc{a->segment, a->offset, r.bytes};
      ++stats_.copied_records;
    } else {
      MarkDead(a->segment->fd, a->offset);  // removed while it was being copied
    }
  }
  {
    absl::MutexLock lock(&mu_);
    if (victim->live_bytes != 0 || HasPendingLocked(*victim)) return false;
    DropSegmentLocked(victim);
    ++stats_.compactions;
  }
  ::unlink(victim->path.c_str());
  return true;
}

absl::StatusOr<std::string> DiskTier::WriteTemp(const BlockFileHeader& header,
                                                std::string_view data, uint64_t /*serial*/) {
  if (header.tenant.size() > kMaxTenant) {
    return absl::InvalidArgumentError("tenant longer than the disk tier's 256 bytes");
  }
  absl::MutexLock wl(&write_mu_);
  MaintainLocked();
  const std::string head = EncodeHeader(header, NowNs());
  absl::StatusOr<Appended> a = AppendLocked(head, data);
  if (!a.ok()) return a.status();
  absl::MutexLock lock(&mu_);
  pending_[{a->segment->id, a->offset}] = head.size() + data.size();
  return Token(a->segment->id, a->offset, a->segment->path);
}

absl::Status DiskTier::Publish(const std::string& token, std::string_view tenant,
                               uint64_t chain_hash) {
  uint64_t id = 0, offset = 0;
  std::string path;
  if (!ParseToken(token, &id, &offset, &path)) {
    return absl::InternalError(absl::StrCat("not a disk tier record: ", token));
  }
  absl::MutexLock lock(&mu_);
  auto p = pending_.find(std::make_pair(id, offset));
  auto seg = segments_.find(id);
  if (p == pending_.end() || seg == segments_.end()) {
    return absl::InternalError(absl::StrCat("no pending disk tier record ", token));
  }
  const uint64_t bytes = p->second;
  pending_.erase(p);
  Key key{std::string(tenant), chain_hash};
  auto it = index_.find(key);
  if (it != index_.end()) {
    MarkDead(it->second.segment->fd, it->second.offset);
    it->second.segment->live_bytes -= it->second.bytes;
    live_bytes_ -= it->second.bytes;
  }
  index_[std::move(key)] = Loc{seg->second, offset, bytes};
  seg->second->live_bytes += bytes;
  live_bytes_ += bytes;
  return absl::OkStatus();
}

absl::StatusOr<std::string> DiskTier::Read(const BlockFileHeader& expected) {
  Loc loc;
  {
    absl::MutexLock lock(&mu_);
    auto it = index_.find(Key{expected.tenant, expected.chain_hash});
    if (it == index_.end()) {
      return absl::NotFoundError(absl::StrFormat("no record of block %016x in %s",
                                                 expected.chain_hash, dir_));
    }
    loc = it->second;  // holds the segment open even if compaction deletes it meanwhile
  }
  // One descriptor per segment, shared by every read: the kernel's readahead sees a prefix
  // loaded in order (its blocks were appended in order) as one sequential stream and keeps the
  // device busy across record boundaries. Explicit POSIX_FADV_WILLNEED per record measured
  // slower (docs/kv_store.md).
  const int fd = loc.segment->fd;
  const std::string& path = loc.segment->path;
  const uint64_t header_bytes = FileBytes(expected.tenant, 0);
  if (loc.bytes != header_bytes + expected.data_bytes) {
    return absl::DataLossError(absl::StrFormat(
        "record of block %016x in %s has %u bytes, expected %u", expected.chain_hash, path,
        loc.bytes, header_bytes + expected.data_bytes));
  }
  // The header comes in the same read as the first chunk of data: a separate small read ahead
  // of each record measured 2-4x slower (it keeps resetting the kernel's readahead window).
  std::string head(header_bytes, '\0');
  std::string data(expected.data_bytes, '\0');
  const uint64_t first = std::min<uint64_t>(kReadChunk, data.size());
  if (absl::Status s = ReadVAt(fd, head.data(), head.size(), data.data(), first, loc.offset, path);
      !s.ok()) {
    return s;
  }
  auto header = DecodeHeader(head);
  if (!header.ok()) {
    return absl::DataLossError(absl::StrFormat("%s at offset %u of %s", header.status().message(),
                                               loc.offset, path));
  }
  if (!SameHeader(header->header, expected)) {
    return absl::DataLossError(
        absl::StrFormat("offset %u of %s holds another block", loc.offset, path));
  }
  uint32_t crc = Crc32cExtend(0, std::string_view(data).substr(0, first));
  const uint64_t data_at = loc.offset + header_bytes;
  for (uint64_t done = first; done < data.size();) {
    const uint64_t n = std::min<uint64_t>(kReadChunk, data.size() - done);
    if (absl::Status s = ReadAt(fd, data.data() + done, n, data_at + done, path); !s.ok()) {
      return s;
    }
    crc = Crc32cExtend(crc, std::string_view(data).substr(done, n));
    done += n;
  }
  if (crc != expected.data_crc32c) {
    return absl::DataLossError(absl::StrFormat(
        "block %016x at offset %u of %s: data CRC32C mismatch", expected.chain_hash,
        loc.offset, path));
  }
  return data;
}

void DiskTier::Remove(std::string_view tenant, uint64_t chain_hash) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(Key{std::string(tenant), chain_hash});
  if (it == index_.end()) return;
  MarkDead(it->second.segment->fd, it->second.offset);
  it->second.segment->live_bytes -= it->second.bytes;
  live_bytes_ -= it->second.bytes;
  index_.erase(it);
}

void DiskTier::RemovePath(const std::string& token) {
  uint64_t id = 0, offset = 0;
  std::string path;
  if (!ParseToken(token, &id, &offset, &path)) return;
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return;
  MarkDead(fd, offset);
  ::close(fd);
}

std::optional<std::pair<std::string, uint64_t>> DiskTier::Locate(std::string_view tenant,
                                                                 uint64_t chain_hash) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(Key{std::string(tenant), chain_hash});
  if (it == index_.end()) return std::nullopt;
  return std::make_pair(it->second.segment->path, it->second.offset);
}

DiskTierStats DiskTier::Stats() {
  absl::MutexLock lock(&mu_);
  DiskTierStats s = stats_;
  s.segments = segments_.size();
  s.file_bytes = 0;
  for (const auto& [id, seg] : segments_) s.file_bytes += seg->size;
  s.live_bytes = live_bytes_;
  return s;
}

}  // namespace expertmesh::kv_store
