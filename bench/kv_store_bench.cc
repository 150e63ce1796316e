// kv-store disk tier against a plain file (docs/performance.md, "kv-store"): the same bytes
// written as blocks through BlockStore::Put (records appended to the disk tier's segment files,
// CRC32C checked at put) and as one sequential file, then read back after their pages were
// dropped from the page cache (fdatasync, then posix_fadvise DONTNEED; the store's again
// after its restart scan read the record headers), as BlockStore::Get (CRC32C checked) and as
// sequential reads. Each round runs both in turn (alternating which goes first); the best
// round of each is reported with the ratio store / plain file, and the CRC32C rate that the
// store's checks add to the plain file's work. Block sizes: the tiny model's 128-token block
// (~200 KB) and a V4-Flash one (~4 MB; docs/kv_store.md has the estimate).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "core/base/flags.h"
#include "core/base/log.h"
#include "kv-store/block_store.h"
#include "core/state/crc32c.h"

namespace expertmesh::bench {
namespace {

constexpr char kProgram[] = "kv_store_bench";

std::string Pattern(size_t n, uint32_t seed) {
  std::string s(n, '\0');
  uint64_t x = 0x9E3779B97F4A7C15ull ^ seed;
  for (size_t i = 0; i + 8 <= n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(s.data() + i, &x, 8);
  }
  return s;
}

// Drops the file's (clean) pages from the page cache.
void Evict(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

void EvictTree(const std::string& dir) {
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (e.is_regular_file()) Evict(e.path().string());
  }
}

// fdatasync of every file under `dir`, as the plain file gets: syncfs would also flush what
// other processes on the machine wrote.
void SyncTree(const std::string& dir) {
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    int fd = ::open(e.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      ::fdatasync(fd);
      ::close(fd);
    }
  }
}

struct Figures {
  double write_gbps = 0;
  double read_gbps = 0;
  double parallel_read_gbps = 0;  // store only: --readers concurrent GetBlock callers
  double flush_share = 0;  // of the write time, the final syncfs/fdatasync
};

absl::StatusOr<Figures> PlainFile(const std::string& dir, const std::vector<std::string>& blocks) {
  const std::string path = dir + "/plain.bin";
  uint64_t total = 0;
  auto start = Clock::now();
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError("cannot create " + path);
  for (const std::string& b : blocks) {
    if (::write(fd, b.data(), b.size()) != static_cast<ssize_t>(b.size())) {
      ::close(fd);
      return absl::InternalError("short write to " + path);
    }
    total += b.size();
  }
  const auto flush = Clock::now();
  ::fdatasync(fd);
  ::close(fd);
  const auto end = Clock::now();
  Figures f;
  f.write_gbps = total / Seconds(start, end) / 1e9;
  f.flush_share = Seconds(flush, end) / Seconds(start, end);
  Evict(path);
  std::string buffer(blocks.front().size(), '\0');
  uint64_t sink = 0;
  start = Clock::now();
  fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::InternalError("cannot open " + path);
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (::read(fd, buffer.data(), buffer.size()) != static_cast<ssize_t>(buffer.size())) {
      ::close(fd);
      return absl::InternalError("short read from " + path);
    }
    sink += static_cast<unsigned char>(buffer[i % buffer.size()]);
  }
  ::close(fd);
  f.read_gbps = total / Seconds(start, Clock::now()) / 1e9;
  std::filesystem::remove(path);
  if (sink == 1) std::fprintf(stderr, " ");  // keeps the reads observable
  return f;
}

absl::StatusOr<Figures> Store(const std::string& dir, const std::vector<std::string>& blocks,
                              int readers, double* scan_seconds) {
  const std::string store_dir = dir + "/store";
  std::filesystem::remove_all(store_dir);
  kv_store::StoreOptions o;
  o.memory_capacity_bytes = 1;  // every block bypasses memory: the disk tier alone is measured
  o.disk_dir = store_dir;
  o.disk_capacity_bytes = uint64_t{1} << 40;
  std::vector<uint32_t> crcs;
  for (const std::string& b : blocks) crcs.push_back(state::Crc32c(b));
  uint64_t total = 0;
  Figures f;
  {
    auto store = kv_store::BlockStore::Open(o, nullptr);
    if (!store.ok()) return store.status();
    auto start = Clock::now();
    for (size_t i = 0; i < blocks.size(); ++i) {
      kv_store::PutArgs a;
      a.key = kv_store::BlockRef{"bench", 1000 + i, static_cast<uint32_t>(128 * (i + 1))};
      if (i > 0) a.parent = kv_store::BlockRef{"bench", 999 + i, static_cast<uint32_t>(128 * i)};
      a.data = blocks[i];
      a.crc32c = crcs[i];  // the client computes it, not the store's write path
      auto stored = (*store)->Put(a);
      if (!stored.ok()) return stored.status();
      total += blocks[i].size();
    }
    const auto flush = Clock::now();
    SyncTree(store_dir);
    const auto end = Clock::now();
    f.write_gbps = total / Seconds(start, end) / 1e9;
    f.flush_share = Seconds(flush, end) / Seconds(start, end);
  }
  EvictTree(store_dir);
  auto open_start = Clock::now();
  auto store = kv_store::BlockStore::Open(o, nullptr);  // a restart: the index from the files
  if (!store.ok()) return store.status();
  *scan_seconds = Seconds(open_start, Clock::now());
  EvictTree(store_dir);  // the scan cached each record's header page
  // Reads blocks i = first, first + step, ... and returns the bytes (or an error).
  auto read_some = [&](size_t first, size_t step) -> absl::StatusOr<uint64_t> {
    uint64_t bytes = 0;
    for (size_t i = first; i < blocks.size(); i += step) {
      auto got = (*store)->Get(
          kv_store::BlockRef{"bench", 1000 + i, static_cast<uint32_t>(128 * (i + 1))});
      if (!got.ok()) return got.status();
      bytes += got->data->size();
    }
    return bytes;
  };
  auto start = Clock::now();
  auto serial = read_some(0, 1);
  if (!serial.ok()) return serial.status();
  f.read_gbps = total / Seconds(start, Clock::now()) / 1e9;
  if (*serial != total) return absl::InternalError("read back a different number of bytes");
  // Again from disk (a fresh store, pages dropped), with concurrent readers as an attention
  // worker loading a prefix would issue them.
  store->reset();
  EvictTree(store_dir);
  store = kv_store::BlockStore::Open(o, nullptr);
  if (!store.ok()) return store.status();
  EvictTree(store_dir);
  std::vector<absl::StatusOr<uint64_t>> results(readers, uint64_t{0});
  start = Clock::now();
  {
    std::vector<std::thread> threads;
    for (int t = 0; t < readers; ++t) {
      threads.emplace_back([&, t] { results[t] = read_some(t, readers); });
    }
    for (std::thread& t : threads) t.join();
  }
  f.parallel_read_gbps = total / Seconds(start, Clock::now()) / 1e9;
  for (const auto& r : results) {
    if (!r.ok()) return r.status();
  }
  std::filesystem::remove_all(store_dir);
  return f;
}

int Run(int argc, char** argv) {
  std::string dir = "/var/tmp/kv_store_bench";
  std::string sizes_text = "212992,4194304";
  int64_t total_mib = 1024;
  int64_t rounds = 3;
  int64_t readers = 4;
  base::FlagSet flags(kProgram, "kv-store disk tier vs a plain sequential file (GB/s).");
  flags.AddString("dir", &dir, "Scratch directory on the disk to measure (emptied)");
  flags.AddString("block-bytes", &sizes_text, "Comma-separated block sizes in bytes");
  flags.AddInt("total-mib", &total_mib, "MiB written and read per block size and round");
  flags.AddInt("rounds", &rounds, "Rounds per block size (best reported)");
  flags.AddInt("readers", &readers, "Concurrent GetBlock callers of the parallel read");
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(kProgram, s);
  base::SetLogLevel(base::LogLevel::kWarning);  // the store logs every Open
  std::setvbuf(stdout, nullptr, _IOLBF, 0);       // rounds show up as they finish
  if (flags.help_requested()) {
    std::printf("%s", flags.Usage().c_str());
    return 0;
  }
  std::filesystem::create_directories(dir);
  std::printf("kv_store_bench: dir %s, %lld MiB per size and round, best of %lld rounds\n",
              dir.c_str(), static_cast<long long>(total_mib), static_cast<long long>(rounds));
  std::printf("%-12s %7s | %-21s | %-21s | %s\n", "block bytes", "blocks",
              "write GB/s store/plain", "read GB/s store/plain",
              "ratio w / r / parallel r, scan s");
  for (absl::string_view text : absl::StrSplit(sizes_text, ',')) {
    uint64_t block = 0;
    if (!absl::SimpleAtoi(text, &block) || block == 0) {
      return Fail(kProgram, absl::InvalidArgumentError("--block-bytes: bad size"));
    }
    const size_t n = std::max<uint64_t>(1, (uint64_t(total_mib) << 20) / block);
    std::vector<std::string> blocks;
    for (size_t i = 0; i < n; ++i) blocks.push_back(Pattern(block, static_cast<uint32_t>(i)));
    Figures best_plain, best_store;
    double scan = 0;
    double best_crc_gbps = 0;
    for (int64_t r = 0; r < rounds; ++r) {
      // What the store adds to the plain file's work: a CRC32C over every byte at put (the
      // caller's checksum verified) and at get.
      const auto crc_start = Clock::now();
      uint32_t crc_sink = 0;
      for (const std::string& b : blocks) crc_sink ^= state::Crc32c(b);
      best_crc_gbps = std::max(
          best_crc_gbps, static_cast<double>(n * block) / Seconds(crc_start, Clock::now()) / 1e9);
      if (crc_sink == 1) std::fprintf(stderr, " ");
      // The order alternates, so that neither side always follows the other's deletes and
      // writeback.
      absl::StatusOr<Figures> plain = absl::UnknownError("not run");
      absl::StatusOr<Figures> store = absl::UnknownError("not run");
      double scan_seconds = 0;
      for (int side = 0; side < 2; ++side) {
        if ((side + r) % 2 == 0) {
          plain = PlainFile(dir, blocks);
        } else {
          store = Store(dir, blocks, static_cast<int>(std::max<int64_t>(1, readers)),
                        &scan_seconds);
        }
      }
      if (!plain.ok()) return Fail(kProgram, plain.status());
      if (!store.ok()) return Fail(kProgram, store.status());
      best_plain.write_gbps = std::max(best_plain.write_gbps, plain->write_gbps);
      best_plain.read_gbps = std::max(best_plain.read_gbps, plain->read_gbps);
      best_store.write_gbps = std::max(best_store.write_gbps, store->write_gbps);
      best_store.read_gbps = std::max(best_store.read_gbps, store->read_gbps);
      best_store.parallel_read_gbps =
          std::max(best_store.parallel_read_gbps, store->parallel_read_gbps);
      scan = r == 0 ? scan_seconds : std::min(scan, scan_seconds);
      std::printf("  round %lld: write %.2f / %.2f GB/s (flush %.0f%% / %.0f%% of it), "
                  "read %.2f (%lld readers %.2f) / %.2f GB/s\n",
                  static_cast<long long>(r + 1), store->write_gbps, plain->write_gbps,
                  100 * store->flush_share, 100 * plain->flush_share, store->read_gbps,
                  static_cast<long long>(readers), store->parallel_read_gbps, plain->read_gbps);
    }
    std::printf("%-12llu %7zu | %9.2f / %-9.2f | %9.2f / %-9.2f | %.2f / %.2f / %.2f, %.3f\n",
                static_cast<unsigned long long>(block), n, best_store.write_gbps,
                best_plain.write_gbps, best_store.read_gbps, best_plain.read_gbps,
                best_store.write_gbps / best_plain.write_gbps,
                best_store.read_gbps / best_plain.read_gbps,
                best_store.parallel_read_gbps / best_plain.read_gbps, scan);
    std::printf("  CRC32C in memory over the same bytes: %.2f GB/s\n", best_crc_gbps);
  }
  return 0;
}

}  // namespace
}  // namespace expertmesh::bench

int main(int argc, char** argv) { return expertmesh::bench::Run(argc, argv); }
