// The kv-store's blocks: an index keyed by (tenant, chain hash), a memory tier (LRU, capacity in
// bytes) over an optional disk tier (DiskTier files, capacity in bytes), and references from
// running sequences. Blocks are opaque bytes with a CRC32C, verified when stored and on every
// read from either tier; a block that fails is dropped and answered DATA_LOSS, never served.
//
// Eviction: with a disk tier, memory is a cache of it (blocks are written through at put), so
// memory evicts in plain LRU order, unreferenced blocks first. The last tier (disk, or memory
// when there is none) is the store itself: it evicts only blocks that no live sequence
// references, least recently used first among those that are the last stored block of their
// chain, so a shared prefix loses its tail before its head. When only referenced blocks are
// left, a put is refused with RESOURCE_EXHAUSTED. Thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "kv-store/disk_tier.h"
#include "kv-store/kv_store_metrics.h"

namespace expertmesh::kv_store {

struct StoreOptions {
  uint64_t memory_capacity_bytes = uint64_t{1} << 30;
  std::string disk_dir;  // empty: memory only
  uint64_t disk_capacity_bytes = uint64_t{8} << 30;
  bool disk_fsync = false;
};

// Key of a block as the API gives it.
struct BlockRef {
  std::string tenant;
  uint64_t chain_hash = 0;
  uint32_t end_position = 0;
};

struct PutArgs {
  BlockRef key;
  std::optional<BlockRef> parent;  // same tenant, smaller end_position
  std::string sequence_id;         // empty: the block is stored unreferenced
  std::string_view data;
  uint32_t crc32c = 0;
};

struct GotBlock {
  std::shared_ptr<const std::string> data;  // shared with the memory tier: never modified
  uint32_t crc32c = 0;
  const char* tier = "";  // "memory" or "disk"
};

struct TierUsage {
  const char* tier = "";
  uint64_t blocks = 0;
  uint64_t bytes = 0;
  uint64_t capacity_bytes = 0;
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t evictions = 0;
};

class BlockStore {
 public:
  // Opens the tiers; with a disk tier, rebuilds the index from its files (Scan), evicting down
  // to capacity if it shrank. `metrics` may be null (tests). Errors: those of DiskTier::Init/Scan.
  static absl::StatusOr<std::unique_ptr<BlockStore>> Open(StoreOptions options,
                                                          KvStoreMetrics* metrics);
  ~BlockStore();

  // Stores a block (the caller validated the fields). Returns true if stored, false if the
  // same key with the same bytes was already there (the sequence's reference is added either
  // way). Errors: DataLoss (crc32c is not the CRC of data), AlreadyExists (the key is stored
  // with other bytes), ResourceExhausted (no room: the block is larger than the tier or every
  // block is referenced by a live sequence), Internal (disk I/O).
  absl::StatusOr<bool> Put(const PutArgs& args);

  // Errors: NotFound, DataLoss (a tier's copy failed its CRC: it is dropped).
  absl::StatusOr<GotBlock> Get(const BlockRef& key);

  // Whether the block and every ancestor up to the chain's first block are stored.
  bool HasChain(const BlockRef& key);

  // The longest run of leading `chain_hashes` stored for `tenant`, each block the parent of the
  // next. Touches them for the LRU (the prefix is about to be read).
  std::vector<BlockRef> LookupPrefix(std::string_view tenant,
                                     absl::Span<const uint64_t> chain_hashes);

  // Drops the sequence's references; returns how many blocks no longer have any.
  uint32_t DeleteSequence(std::string_view tenant, std::string_view sequence_id);

  // Fastest tier first; the disk tier only when configured.
  std::vector<TierUsage> Usage();

  bool has_disk() const { return disk_ != nullptr; }
  const StoreOptions& options() const { return options_; }

 private:
  struct Id {
    std::string tenant;
    uint64_t chain_hash = 0;
    bool operator==(const Id& o) const {
      return chain_hash == o.chain_hash && tenant == o.tenant;
    }
    template <typename H>
    friend H AbslHashValue(H h, const Id& id) {
      return H::combine(std::move(h), id.tenant, id.chain_hash);
    }
  };
  struct Entry {
    Id id;
    BlockFileHeader meta;  // key, parent, data size and CRC (also the disk header)
    uint64_t serial = 0;   // tells a re-put entry from the one a reader saw
    std::shared_ptr<const std::string> data;  // the memory tier's copy, or null
    std::list<Entry*>::iterator memory_lru;
    bool on_disk = false;
    uint64_t file_bytes = 0;
    std::list<Entry*>::iterator disk_lru;
    absl::flat_hash_set<std::string> refs;  // live sequence ids (of this tenant)
  };
  using Clock = std::chrono::steady_clock;

  BlockStore(StoreOptions options, KvStoreMetrics* metrics);

  Entry* FindLocked(const Id& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TouchLocked(Entry* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AddRefLocked(Entry* e, const std::string& sequence_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Puts `data` into memory, evicting others; false if it cannot fit.
  bool InsertMemoryLocked(Entry* e, std::shared_ptr<const std::string> data)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropMemoryLocked(Entry* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes room for `bytes` more in memory; false if it cannot.
  bool MakeMemoryRoomLocked(uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool MakeDiskRoomLocked(uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The store-level victim in `lru` (oldest at the front): unreferenced, preferably with no
  // stored child. Null if every block is referenced.
  Entry* PickVictimLocked(const std::list<Entry*>& lru) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Removes the block from every tier and the index (marking its disk record dead).
  void EraseLocked(Entry* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void InsertIndexLocked(std::unique_ptr<Entry> e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PublishGaugesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<bool> DuplicateLocked(Entry* e, const PutArgs& args)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  StoreOptions options_;
  KvStoreMetrics* metrics_;  // may be null
  std::unique_ptr<DiskTier> disk_;

  absl::Mutex mu_;
  absl::flat_hash_map<Id, std::unique_ptr<Entry>> index_ ABSL_GUARDED_BY(mu_);
  // Stored blocks per parent id (whether or not the parent itself is stored).
  absl::flat_hash_map<Id, uint32_t> children_ ABSL_GUARDED_BY(mu_);
  // (tenant, sequence id) -> ids of the blocks it references.
  absl::flat_hash_map<std::pair<std::string, std::string>, std::vector<Id>> sequences_
      ABSL_GUARDED_BY(mu_);
  std::list<Entry*> memory_lru_ ABSL_GUARDED_BY(mu_);  // oldest first
  std::list<Entry*> disk_lru_ ABSL_GUARDED_BY(mu_);    // oldest first
  uint64_t memory_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t disk_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t disk_reserved_ ABSL_GUARDED_BY(mu_) = 0;  // puts appending their records
  uint64_t next_serial_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t referenced_blocks_ ABSL_GUARDED_BY(mu_) = 0;
  TierUsage memory_usage_ ABSL_GUARDED_BY(mu_);
  TierUsage disk_usage_ ABSL_GUARDED_BY(mu_);
};

}  // namespace expertmesh::kv_store
