#include "kv-store/block_store.h"

#include <algorithm>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/base/log.h"
#include "core/base/status_macros.h"
#include "core/state/crc32c.h"

namespace expertmesh::kv_store {
using state::Crc32c;
using state::Crc32cExtend;
namespace {

std::string Describe(std::string_view tenant, uint64_t chain_hash, uint32_t end_position) {
  return absl::StrFormat("(tenant \"%s\", chain_hash %016x, end_position %u)",
                         absl::CEscape(absl::string_view(tenant.data(), tenant.size())), chain_hash, end_position);
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void Inc(uint64_t& local, prometheus::Counter* counter) {
  ++local;
  if (counter != nullptr) counter->Increment();
}

}  // namespace

BlockStore::BlockStore(StoreOptions options, KvStoreMetrics* metrics)
    : options_(std::move(options)), metrics_(metrics) {
  memory_usage_.tier = "memory";
  memory_usage_.capacity_bytes = options_.memory_capacity_bytes;
  disk_usage_.tier = "disk";
  disk_usage_.capacity_bytes = options_.disk_dir.empty() ? 0 : options_.disk_capacity_bytes;
  if (metrics_ != nullptr) {
    metrics_->memory.capacity_bytes->Set(static_cast<double>(memory_usage_.capacity_bytes));
    metrics_->disk.capacity_bytes->Set(static_cast<double>(disk_usage_.capacity_bytes));
  }
}

BlockStore::~BlockStore() = default;

absl::StatusOr<std::unique_ptr<BlockStore>> BlockStore::Open(StoreOptions options,
                                                            KvStoreMetrics* metrics) {
  std::unique_ptr<BlockStore> store(new BlockStore(std::move(options), metrics));
  if (store->options_.disk_dir.empty()) return store;
  store->disk_ = std::make_unique<DiskTier>(store->options_.disk_dir, store->options_.disk_fsync);
  EM_RETURN_IF_ERROR(store->disk_->Init());
  EM_ASSIGN_OR_RETURN(ScanResult scan, store->disk_->Scan());
  std::sort(scan.blocks.begin(), scan.blocks.end(),
            [](const ScannedBlock& a, const ScannedBlock& b) { return a.mtime_ns < b.mtime_ns; });
  absl::MutexLock lock(&store->mu_);
  for (ScannedBlock& b : scan.blocks) {
    auto e = std::make_unique<Entry>();
    e->id = Id{b.header.tenant, b.header.chain_hash};
    e->meta = std::move(b.header);
    e->serial = store->next_serial_++;
    e->on_disk = true;
    e->file_bytes = b.file_bytes;
    store->disk_lru_.push_back(e.get());
    e->disk_lru = std::prev(store->disk_lru_.end());
    store->disk_bytes_ += b.file_bytes;
    store->InsertIndexLocked(std::move(e));
  }
  if (metrics != nullptr) metrics->disk.corrupt->Increment(scan.dropped_files);
  // A smaller --disk-capacity-bytes than last time: shrink now rather than at the next put.
  int evicted = 0;
  while (store->disk_bytes_ > store->options_.disk_capacity_bytes) {
    Entry* victim = store->PickVictimLocked(store->disk_lru_);
    if (victim == nullptr) break;
    store->EraseLocked(victim);
    Inc(store->disk_usage_.evictions, metrics ? metrics->disk.evictions : nullptr);
    ++evicted;
  }
  store->PublishGaugesLocked();
  base::LogInfo("disk tier loaded",
                {{"dir", store->options_.disk_dir},
                 {"blocks", static_cast<uint64_t>(store->disk_lru_.size())},
                 {"bytes", store->disk_bytes_},
                 {"dropped_files", scan.dropped_files},
                 {"evicted", evicted}});
  return store;
}

BlockStore::Entry* BlockStore::FindLocked(const Id& id) {
  auto it = index_.find(id);
  return it == index_.end() ? nullptr : it->second.get();
}

void BlockStore::TouchLocked(Entry* e) {
  if (e->data) memory_lru_.splice(memory_lru_.end(), memory_lru_, e->memory_lru);
  if (e->on_disk) disk_lru_.splice(disk_lru_.end(), disk_lru_, e->disk_lru);
}

void BlockStore::AddRefLocked(Entry* e, const std::string& sequence_id) {
  if (sequence_id.empty() || !e->refs.insert(sequence_id).second) return;
  if (e->refs.size() == 1) ++referenced_blocks_;
  sequences_[{e->id.tenant, sequence_id}].push_back(e->id);
}

void BlockStore::InsertIndexLocked(std::unique_ptr<Entry> e) {
  if (e->meta.has_parent) ++children_[Id{e->id.tenant, e->meta.parent_hash}];
  Id id = e->id;
  index_[std::move(id)] = std::move(e);
}

void BlockStore::DropMemoryLocked(Entry* e) {
  if (!e->data) return;
  memory_bytes_ -= e->meta.data_bytes;
  memory_lru_.erase(e->memory_lru);
  e->data.reset();
}

BlockStore::Entry* BlockStore::PickVictimLocked(const std::list<Entry*>& lru) {
  Entry* fallback = nullptr;
  for (Entry* e : lru) {
    if (!e->refs.empty()) continue;
    if (!children_.contains(e->id)) return e;
    if (fallback == nullptr) fallback = e;
  }
  return fallback;
}

void BlockStore::EraseLocked(Entry* e) {
  DropMemoryLocked(e);
  if (e->on_disk) {
    disk_->Remove(e->id.tenant, e->id.chain_hash);
    disk_lru_.erase(e->disk_lru);
    disk_bytes_ -= e->file_bytes;
    e->on_disk = false;
  }
  if (!e->refs.empty()) --referenced_blocks_;
  if (e->meta.has_parent) {
    auto it = children_.find(Id{e->id.tenant, e->meta.parent_hash});
    if (it != children_.end() && --it->second == 0) children_.erase(it);
  }
  index_.erase(e->id);  // destroys *e
}

bool BlockStore::MakeMemoryRoomLocked(uint64_t bytes) {
  if (bytes > options_.memory_capacity_bytes) return false;
  while (memory_bytes_ + bytes > options_.memory_capacity_bytes) {
    Entry* victim = nullptr;
    if (disk_) {
      // Memory only caches the disk tier: any block may leave it, unreferenced ones first.
      for (Entry* e : memory_lru_) {
        if (e->refs.empty()) {
          victim = e;
          break;
        }
      }
      if (victim == nullptr && !memory_lru_.empty()) victim = memory_lru_.front();
      if (victim == nullptr) return false;
      DropMemoryLocked(victim);
    } else {
      victim = PickVictimLocked(memory_lru_);
      if (victim == nullptr) return false;
      EraseLocked(victim);
    }
    Inc(memory_usage_.evictions, metrics_ ? metrics_->memory.evictions : nullptr);
  }
  return true;
}

bool BlockStore::MakeDiskRoomLocked(uint64_t bytes) {
  if (bytes > options_.disk_capacity_bytes) return false;
  while (disk_bytes_ + disk_reserved_ + bytes > options_.disk_capacity_bytes) {
    Entry* victim = PickVictimLocked(disk_lru_);
    if (victim == nullptr) return false;
    EraseLocked(victim);
    Inc(disk_usage_.evictions, metrics_ ? metrics_->disk.evictions : nullptr);
  }
  return true;
}

bool BlockStore::InsertMemoryLocked(Entry* e, std::shared_ptr<const std::string> data) {
  if (e->data || !MakeMemoryRoomLocked(data->size())) return false;
  e->data = std::move(data);
  memory_lru_.push_back(e);
  e->memory_lru = std::prev(memory_lru_.end());
  memory_bytes_ += e->meta.data_bytes;
  return true;
}

void BlockStore::PublishGaugesLocked() {
  if (metrics_ == nullptr) return;
  metrics_->memory.bytes->Set(static_cast<double>(memory_bytes_));
  metrics_->memory.blocks->Set(static_cast<double>(memory_lru_.size()));
  metrics_->disk.bytes->Set(static_cast<double>(disk_bytes_));
  metrics_->disk.blocks->Set(static_cast<double>(disk_lru_.size()));
  metrics_->referenced_blocks->Set(static_cast<double>(referenced_blocks_));
}

absl::StatusOr<bool> BlockStore::DuplicateLocked(Entry* e, const PutArgs& args) {
  if (e->meta.end_position != args.key.end_position ||
      e->meta.data_bytes != args.data.size() || e->meta.data_crc32c != args.crc32c) {
    return absl::AlreadyExistsError(absl::StrFormat(
        "key %s is already stored with other data (%u bytes, crc32c %08x, end_position %u); "
        "a block key must name one content",
        Describe(args.key.tenant, args.key.chain_hash, args.key.end_position),
        e->meta.data_bytes, e->meta.data_crc32c, e->meta.end_position));
  }
  AddRefLocked(e, args.sequence_id);
  TouchLocked(e);
  PublishGaugesLocked();
  return false;
}

absl::StatusOr<bool> BlockStore::Put(const PutArgs& args) {
  const uint32_t crc = Crc32c(args.data);
  if (crc != args.crc32c) {
    return absl::DataLossError(absl::StrFormat(
        "crc32c %08x does not match data (%u bytes have crc32c %08x)", args.crc32c,
        args.data.size(), crc));
  }
  const Id id{args.key.tenant, args.key.chain_hash};
  BlockFileHeader meta;
  meta.tenant = args.key.tenant;
  meta.chain_hash = args.key.chain_hash;
  meta.end_position = args.key.end_position;
  if (args.parent.has_value()) {
    meta.has_parent = true;
    meta.parent_hash = args.parent->chain_hash;
    meta.parent_end = args.parent->end_position;
  }
  meta.data_bytes = args.data.size();
  meta.data_crc32c = crc;

  auto new_entry = [&](uint64_t serial) {
    auto e = std::make_unique<Entry>();
    e->id = id;
    e->meta = meta;
    e->serial = serial;
    return e;
  };

  if (!disk_) {
    absl::MutexLock lock(&mu_);
    if (Entry* e = FindLocked(id)) return DuplicateLocked(e, args);
    const auto start = Clock::now();
    if (!MakeMemoryRoomLocked(args.data.size())) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "no room for %u bytes of data in the memory tier (capacity %u bytes, %u referenced "
          "blocks that running sequences still need)",
          args.data.size(), options_.memory_capacity_bytes, referenced_blocks_));
    }
    auto owned = new_entry(next_serial_++);
    Entry* e = owned.get();
    InsertIndexLocked(std::move(owned));
    InsertMemoryLocked(e, std::make_shared<const std::string>(args.data));
    AddRefLocked(e, args.sequence_id);
    if (metrics_) metrics_->memory.write_seconds->Observe(SecondsSince(start));
    PublishGaugesLocked();
    return true;
  }

  const uint64_t file_bytes = DiskTier::FileBytes(args.key.tenant, args.data.size());
  uint64_t serial = 0;
  {
    absl::MutexLock lock(&mu_);
    if (Entry* e = FindLocked(id)) return DuplicateLocked(e, args);
    if (!MakeDiskRoomLocked(file_bytes)) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "no room for a %u-byte block file in the disk tier (capacity %u bytes, %u referenced "
          "blocks that running sequences still need)",
          file_bytes, options_.disk_capacity_bytes, referenced_blocks_));
    }
    disk_reserved_ += file_bytes;
    serial = next_serial_++;
  }
  // The file is written outside the lock (megabytes); only the rename and the index update,
  // which must not interleave with an eviction of the same key, are under it.
  const auto start = Clock::now();
  absl::StatusOr<std::string> temp = disk_->WriteTemp(meta, args.data, serial);
  std::shared_ptr<const std::string> copy;
  if (temp.ok() && args.data.size() <= options_.memory_capacity_bytes) {
    copy = std::make_shared<const std::string>(args.data);
  }
  absl::MutexLock lock(&mu_);
  disk_reserved_ -= file_bytes;
  if (!temp.ok()) return temp.status();
  if (Entry* e = FindLocked(id)) {  // an identical put won the race
    DiskTier::RemovePath(*temp);
    return DuplicateLocked(e, args);
  }
  EM_RETURN_IF_ERROR(disk_->Publish(*temp, args.key.tenant, args.key.chain_hash));
  if (metrics_) metrics_->disk.write_seconds->Observe(SecondsSince(start));
  auto owned = new_entry(serial);
  Entry* e = owned.get();
  e->on_disk = true;
  e->file_bytes = file_bytes;
  disk_lru_.push_back(e);
  e->disk_lru = std::prev(disk_lru_.end());
  disk_bytes_ += file_bytes;
  InsertIndexLocked(std::move(owned));
  if (copy) {
    const auto memory_start = Clock::now();
    if (InsertMemoryLocked(e, std::move(copy)) && metrics_) {
      metrics_->memory.write_seconds->Observe(SecondsSince(memory_start));
    }
  }
  AddRefLocked(e, args.sequence_id);
  PublishGaugesLocked();
  return true;
}

absl::StatusOr<GotBlock> BlockStore::Get(const BlockRef& key) {
  const Id id{key.tenant, key.chain_hash};
  std::shared_ptr<const std::string> cached;
  BlockFileHeader meta;
  uint64_t serial = 0;
  {
    absl::MutexLock lock(&mu_);
    Entry* e = FindLocked(id);
    if (e == nullptr || e->meta.end_position != key.end_position) {
      Inc(memory_usage_.misses, metrics_ ? metrics_->memory.misses : nullptr);
      if (disk_) Inc(disk_usage_.misses, metrics_ ? metrics_->disk.misses : nullptr);
      return absl::NotFoundError(absl::StrCat(
          "no block ", Describe(key.tenant, key.chain_hash, key.end_position), " is stored"));
    }
    TouchLocked(e);
    if (e->data) {
      cached = e->data;
    } else {
      Inc(memory_usage_.misses, metrics_ ? metrics_->memory.misses : nullptr);
    }
    meta = e->meta;
    serial = e->serial;
  }
  // Drops the block if it is still the entry this read saw (not a newer put of the key).
  auto drop = [&](prometheus::Counter* corrupt_counter) {
    absl::MutexLock lock(&mu_);
    if (corrupt_counter != nullptr) corrupt_counter->Increment();
    Entry* e = FindLocked(id);
    if (e != nullptr && e->serial == serial) EraseLocked(e);
    PublishGaugesLocked();
  };

  if (cached) {
    const auto start = Clock::now();
    const uint32_t crc = Crc32c(*cached);
    if (crc != meta.data_crc32c) {
      drop(metrics_ ? metrics_->memory.corrupt : nullptr);
      base::LogWarning("dropped a corrupt block from memory",
                       {{"block", Describe(key.tenant, key.chain_hash, key.end_position)}});
      return absl::DataLossError(absl::StrFormat(
          "block %s failed its CRC32C check in memory (%08x, stored %08x); it was dropped",
          Describe(key.tenant, key.chain_hash, key.end_position), crc, meta.data_crc32c));
    }
    absl::MutexLock lock(&mu_);
    Inc(memory_usage_.hits, metrics_ ? metrics_->memory.hits : nullptr);
    if (metrics_) metrics_->memory.read_seconds->Observe(SecondsSince(start));
    return GotBlock{std::move(cached), crc, "memory"};
  }

  const auto start = Clock::now();
  absl::StatusOr<std::string> read = disk_->Read(meta);
  if (!read.ok()) {
    if (absl::IsNotFound(read.status())) {
      {
        absl::MutexLock lock(&mu_);
        Inc(disk_usage_.misses, metrics_ ? metrics_->disk.misses : nullptr);
      }
      drop(nullptr);
      return absl::NotFoundError(absl::StrCat(
          "no block ", Describe(key.tenant, key.chain_hash, key.end_position),
          " is stored (its file disappeared)"));
    }
    if (absl::IsDataLoss(read.status())) {
      drop(metrics_ ? metrics_->disk.corrupt : nullptr);
      base::LogWarning("dropped a corrupt block file",
                       {{"error", std::string(read.status().message())}});
      return absl::DataLossError(absl::StrCat(read.status().message(), "; the block was dropped"));
    }
    return read.status();
  }
  auto data = std::make_shared<const std::string>(std::move(*read));
  absl::MutexLock lock(&mu_);
  Inc(disk_usage_.hits, metrics_ ? metrics_->disk.hits : nullptr);
  if (metrics_) metrics_->disk.read_seconds->Observe(SecondsSince(start));
  Entry* e = FindLocked(id);
  if (e != nullptr && e->serial == serial) InsertMemoryLocked(e, data);  // promote
  PublishGaugesLocked();
  return GotBlock{std::move(data), meta.data_crc32c, "disk"};
}

bool BlockStore::HasChain(const BlockRef& key) {
  absl::MutexLock lock(&mu_);
  Entry* e = FindLocked(Id{key.tenant, key.chain_hash});
  if (e == nullptr || e->meta.end_position != key.end_position) return false;
  for (size_t steps = 0; e->meta.has_parent; ++steps) {
    if (steps > index_.size()) return false;  // a cycle can only come from hash collisions
    Entry* parent = FindLocked(Id{key.tenant, e->meta.parent_hash});
    if (parent == nullptr || parent->meta.end_position != e->meta.parent_end) return false;
    e = parent;
  }
  return true;
}

std::vector<BlockRef> BlockStore::LookupPrefix(std::string_view tenant,
                                               absl::Span<const uint64_t> chain_hashes) {
  std::vector<BlockRef> out;
  absl::MutexLock lock(&mu_);
  std::vector<Entry*> matched;
  Id id{std::string(tenant), 0};
  for (size_t i = 0; i < chain_hashes.size(); ++i) {
    id.chain_hash = chain_hashes[i];
    Entry* e = FindLocked(id);
    if (e == nullptr) break;
    // Each block must continue the previous one, so that the run is one stored chain.
    if (i == 0 ? e->meta.has_parent
               : (!e->meta.has_parent || e->meta.parent_hash != chain_hashes[i - 1] ||
                  e->meta.parent_end != matched.back()->meta.end_position)) {
      break;
    }
    matched.push_back(e);
  }
  // Touched last block first, so that the head of a prefix is the most recently used.
  for (auto it = matched.rbegin(); it != matched.rend(); ++it) TouchLocked(*it);
  for (Entry* e : matched) out.push_back(BlockRef{e->id.tenant, e->id.chain_hash,
                                                  e->meta.end_position});
  return out;
}

uint32_t BlockStore::DeleteSequence(std::string_view tenant, std::string_view sequence_id) {
  absl::MutexLock lock(&mu_);
  auto it = sequences_.find(std::make_pair(std::string(tenant), std::string(sequence_id)));
  if (it == sequences_.end()) return 0;
  uint32_t freed = 0;
  for (const Id& id : it->second) {
    Entry* e = FindLocked(id);
    if (e == nullptr) continue;
    if (e->refs.erase(std::string(sequence_id)) > 0 && e->refs.empty()) {
      --referenced_blocks_;
      ++freed;
    }
  }
  sequences_.erase(it);
  PublishGaugesLocked();
  return freed;
}

std::vector<TierUsage> BlockStore::Usage() {
  absl::MutexLock lock(&mu_);
  std::vector<TierUsage> out;
  TierUsage m = memory_usage_;
  m.blocks = memory_lru_.size();
  m.bytes = memory_bytes_;
  out.push_back(m);
  if (disk_) {
    TierUsage d = disk_usage_;
    d.blocks = disk_lru_.size();
    d.bytes = disk_bytes_;
    out.push_back(d);
  }
  return out;
}

}  // namespace expertmesh::kv_store
