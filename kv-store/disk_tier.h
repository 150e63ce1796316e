// The disk tier's files: append-only segment files <dir>/<16 hex digits>.seg (256 MiB each by
// default), each a run of records (a header with the block's key, parent, data length and CRC32C,
// a header CRC32C, then the block bytes). docs/kv_store.md has the layout and why segments
// replaced one file per block (ext4's per-file inode work capped small-block writes at 0.12 of a
// sequential file).
//
// A record is appended once and never rewritten, except for its first 4 bytes (live/dead) when the
// block is removed, so a restart (Scan) does not bring it back. Space comes back by whole
// segments: a segment with no live record is deleted, and when the dead bytes of the sealed
// segments exceed a quarter of the live bytes (and one segment), the sealed segment with the most
// dead bytes has its live records copied forward into the current segment and is deleted. Which
// blocks live is BlockStore's choice (LRU, references, tail before head); this class does the
// I/O and keeps its own key -> (segment, offset) map.
//
// Crash safety: a record is appended with one pwritev; a process killed mid-append leaves a
// record that is cut short, which Scan detects (the length or CRCs disagree) and truncates away.
// Scan also checks the data CRC32C of the newest segment's last record, the only one a crash can
// have left torn. Block data elsewhere is verified at read.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace expertmesh::kv_store {

// What a record's header says.
struct BlockFileHeader {
  std::string tenant;
  uint64_t chain_hash = 0;
  uint32_t end_position = 0;
  bool has_parent = false;
  uint64_t parent_hash = 0;
  uint32_t parent_end = 0;
  uint64_t data_bytes = 0;
  uint32_t data_crc32c = 0;
};

// A live record found by Scan.
struct ScannedBlock {
  BlockFileHeader header;
  uint64_t file_bytes = 0;  // the record's bytes (FileBytes)
  int64_t mtime_ns = 0;     // when it was first written (wall clock): orders the rebuilt LRU
};

struct ScanResult {
  std::vector<ScannedBlock> blocks;
  // Torn or corrupt records cut off segment tails, and duplicate or unreadable segments.
  int dropped_files = 0;
};

struct DiskTierOptions {
  // Appends go to one segment until the next record would pass this; a record larger than it
  // gets a segment of its own.
  uint64_t segment_bytes = uint64_t{256} << 20;
  // Sealed segments' dead bytes allowed before one is compacted: this fraction of the live bytes,
  // and at least one segment.
  double dead_fraction = 0.25;
};

// Counters for tests and the benchmark.
struct DiskTierStats {
  uint64_t segments = 0;
  uint64_t file_bytes = 0;      // all segment files
  uint64_t live_bytes = 0;      // published, not removed records
  uint64_t compactions = 0;     // segments deleted after copying their live records forward
  uint64_t copied_records = 0;  // records copied forward
  uint64_t deleted_segments = 0;
};

class DiskTier {
 public:
  // `dir` is created if missing. `fsync`: fdatasync after each append (survives a power loss; a
  // process crash never needs it). Options: DefaultOptions() unless given.
  DiskTier(std::string dir, bool fsync);
  DiskTier(std::string dir, bool fsync, DiskTierOptions options);
  ~DiskTier();
  DiskTier(const DiskTier&) = delete;
  DiskTier& operator=(const DiskTier&) = delete;

  // What a DiskTier constructed without options gets (BlockStore's). Tests shrink segments
  // through ScopedDefaultOptionsForTesting to make a store compact.
  static DiskTierOptions DefaultOptions();
  class ScopedDefaultOptionsForTesting {
   public:
    explicit ScopedDefaultOptionsForTesting(DiskTierOptions options);
    ~ScopedDefaultOptionsForTesting();

   private:
    DiskTierOptions saved_;
  };

  // Creates the directory. Errors: Internal naming the path and errno text.
  absl::Status Init();

  // Walks every segment's record headers and builds the key map; truncates a segment at the
  // first record that cannot be parsed or runs past the end (a torn tail), skips removed
  // records (and all but the newest copy of a key), deletes the one-file-per-block layout of
  // earlier versions. Returns the live records.
  absl::StatusOr<ScanResult> Scan();

  // Bytes the record of a block with this tenant and data size takes (the capacity unit).
  static uint64_t FileBytes(std::string_view tenant, uint64_t data_bytes);
  // The header bytes as stored (for tests that corrupt records on purpose).
  static std::string EncodeHeader(const BlockFileHeader& header, int64_t written_ns = 0);

  // Appends the record to the current segment; returns a token that Publish makes readable or
  // RemovePath discards. `serial` is unused (the token names the record). May first delete or
  // compact segments (this runs outside BlockStore's lock). Errors: Internal (I/O, with errno
  // text), ResourceExhausted when the disk is full (nothing is left appended).
  absl::StatusOr<std::string> WriteTemp(const BlockFileHeader& header, std::string_view data,
                                        uint64_t serial);
  // Makes a WriteTemp record the key's copy. Errors: Internal (not a token of this tier).
  absl::Status Publish(const std::string& token, std::string_view tenant, uint64_t chain_hash);
  // Reads a block's data and checks header and CRC against `expected` (the index's copy).
  // Errors: NotFound (no record), DataLoss (any mismatch or a record cut short), Internal (I/O).
  absl::StatusOr<std::string> Read(const BlockFileHeader& expected);
  // Marks the key's record dead (a missing key is fine); its segment goes once all are.
  void Remove(std::string_view tenant, uint64_t chain_hash);
  // Marks an unpublished WriteTemp record dead.
  static void RemovePath(const std::string& token);

  // Where the key's record is: the segment file and the record's offset in it (tests).
  std::optional<std::pair<std::string, uint64_t>> Locate(std::string_view tenant,
                                                         uint64_t chain_hash);
  DiskTierStats Stats();
  const std::string& dir() const { return dir_; }
  const DiskTierOptions& options() const { return options_; }

 private:
  struct Segment;
  struct Loc {
    std::shared_ptr<Segment> segment;
    uint64_t offset = 0;
    uint64_t bytes = 0;
  };
  using Key = std::pair<std::string, uint64_t>;
  struct Appended {
    std::shared_ptr<Segment> segment;
    uint64_t offset = 0;
  };

  std::string SegmentPath(uint64_t id) const;
  // Appends one record (header and data as separate pieces) to the current segment, rolling
  // to a new one when it would pass segment_bytes. Leaves nothing behind on error.
  absl::StatusOr<Appended> AppendLocked(std::string_view head, std::string_view data)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  // Deletes segments without live records and compacts one if dead bytes are over budget.
  void MaintainLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  // Copies the segment's live records forward and deletes it. false if it was skipped.
  bool CompactLocked(const std::shared_ptr<Segment>& victim)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  // Whether the segment holds an appended record that is neither published nor discarded.
  bool HasPendingLocked(const Segment& segment) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropSegmentLocked(const std::shared_ptr<Segment>& segment)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string dir_;
  const bool fsync_;
  const DiskTierOptions options_;

  absl::Mutex write_mu_ ABSL_ACQUIRED_BEFORE(mu_);  // one appender (and compactor) at a time
  absl::Mutex mu_;
  absl::flat_hash_map<Key, Loc> index_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::shared_ptr<Segment>> segments_ ABSL_GUARDED_BY(mu_);  // by id
  std::shared_ptr<Segment> current_ ABSL_GUARDED_BY(mu_);
  uint64_t next_segment_id_ ABSL_GUARDED_BY(mu_) = 1;
  // Appended records not yet published or discarded: (segment id, offset) -> record bytes.
  absl::flat_hash_map<std::pair<uint64_t, uint64_t>, uint64_t> pending_ ABSL_GUARDED_BY(mu_);
  uint64_t live_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  DiskTierStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace expertmesh::kv_store
