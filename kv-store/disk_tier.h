// The disk tier's files: one file per block under <dir>/t<hex tenant>/<hex chain hash>.blk,
// written to a temporary name and renamed, so a block file is either absent or complete (a
// crash mid-write leaves only a *.tmp, removed at the next start). Each file is a small header
// (magic, key, parent, data length, data CRC32C, header CRC32C) followed by the block bytes.
// docs/kv_store.md has the layout and why plain files were chosen over an embedded store.
// This class only does file I/O; the index, capacity and eviction are BlockStore's.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace expertmesh::kv_store {

// What a block file's header says.
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

// A block file found by Scan.
struct ScannedBlock {
  BlockFileHeader header;
  uint64_t file_bytes = 0;
  int64_t mtime_ns = 0;  // orders the rebuilt LRU (oldest first)
};

struct ScanResult {
  std::vector<ScannedBlock> blocks;
  int dropped_files = 0;  // torn, corrupt or misnamed block files, and *.tmp leftovers (deleted)
};

class DiskTier {
 public:
  // `dir` is created if missing. `fsync`: fdatasync each file before its rename (survives a
  // power loss; a process crash never needs it).
  DiskTier(std::string dir, bool fsync) : dir_(std::move(dir)), fsync_(fsync) {}

  // Creates the directory. Errors: Internal naming the path and errno text.
  absl::Status Init();

  // Reads every block file's header; deletes what cannot be served (leftover temporaries, bad
  // magic/header CRC, a size that disagrees with the header, a name that disagrees with the
  // key). Block data is verified at read, not here, so a start does not read the whole tier.
  absl::StatusOr<ScanResult> Scan();

  // Bytes the file of a block with this tenant and data size takes.
  static uint64_t FileBytes(std::string_view tenant, uint64_t data_bytes);
  // The header bytes as stored (exposed for tests that corrupt files on purpose).
  static std::string EncodeHeader(const BlockFileHeader& header);

  // Writes the block to a fresh temporary file next to its final path; returns that path.
  // Errors: Internal (I/O, with errno text), ResourceExhausted when the disk is full.
  absl::StatusOr<std::string> WriteTemp(const BlockFileHeader& header, std::string_view data,
                                        uint64_t serial);
  // Renames a WriteTemp result into place. Errors: Internal.
  absl::Status Publish(const std::string& temp_path, std::string_view tenant, uint64_t chain_hash);
  // Reads a block's data and checks header and CRC against `expected` (the index's copy).
  // Errors: NotFound (file missing), DataLoss (any mismatch), Internal (I/O).
  absl::StatusOr<std::string> Read(const BlockFileHeader& expected);
  // Deletes a block file (or a temporary); a missing file is fine.
  void Remove(std::string_view tenant, uint64_t chain_hash);
  static void RemovePath(const std::string& path);

  std::string BlockPath(std::string_view tenant, uint64_t chain_hash) const;
  const std::string& dir() const { return dir_; }

 private:
  std::string TenantDir(std::string_view tenant) const;

  std::string dir_;
  bool fsync_;
};

}  // namespace expertmesh::kv_store
