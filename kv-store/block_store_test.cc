#include "kv-store/block_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "core/state/crc32c.h"
#include "kv-store/kv_store_metrics.h"
#include "prometheus/registry.h"
#include "tests/testing/child_process.h"

namespace expertmesh::kv_store {
using state::Crc32c;
using state::Crc32cExtend;
namespace {

// Distinct, deterministic contents per (seed, size).
std::string Bytes(int seed, size_t n) {
  std::string s(n, '\0');
  uint32_t x = 2166136261u ^ static_cast<uint32_t>(seed);
  for (char& c : s) {
    x = x * 1664525u + 1013904223u;
    c = static_cast<char>(x >> 24);
  }
  return s;
}

// A block of a chain: key (tenant, hash, end) with an optional parent.
struct TestBlock {
  BlockRef key;
  std::optional<BlockRef> parent;
  std::string data;
};

TestBlock Block(const std::string& tenant, uint64_t hash, uint32_t end, std::string data,
                const TestBlock* parent = nullptr) {
  TestBlock b{BlockRef{tenant, hash, end}, std::nullopt, std::move(data)};
  if (parent != nullptr) b.parent = parent->key;
  return b;
}

absl::StatusOr<bool> Put(BlockStore& store, const TestBlock& b, const std::string& seq = "") {
  PutArgs a;
  a.key = b.key;
  a.parent = b.parent;
  a.sequence_id = seq;
  a.data = b.data;
  a.crc32c = Crc32c(b.data);
  return store.Put(a);
}

std::unique_ptr<BlockStore> OpenStore(StoreOptions o, KvStoreMetrics* metrics = nullptr) {
  auto s = BlockStore::Open(std::move(o), metrics);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

StoreOptions MemoryOnly(uint64_t capacity) {
  StoreOptions o;
  o.memory_capacity_bytes = capacity;
  return o;
}

StoreOptions WithDisk(const std::string& dir, uint64_t memory, uint64_t disk) {
  StoreOptions o;
  o.memory_capacity_bytes = memory;
  o.disk_dir = dir;
  o.disk_capacity_bytes = disk;
  return o;
}

bool Stored(BlockStore& s, const TestBlock& b) { return s.Get(b.key).ok(); }

TierUsage UsageOf(BlockStore& s, const std::string& tier) {
  for (const TierUsage& u : s.Usage()) {
    if (u.tier == tier) return u;
  }
  ADD_FAILURE() << "no tier " << tier;
  return {};
}

TEST(BlockStoreTest, PutGetRoundTripInMemory) {
  auto store = OpenStore(MemoryOnly(1 << 20));
  TestBlock b = Block("acme", 0x1234, 128, Bytes(1, 5000));
  auto stored = Put(*store, b, "seq-1");
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_TRUE(*stored);
  auto got = store->Get(b.key);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got->data, b.data);
  EXPECT_EQ(got->crc32c, Crc32c(b.data));
  EXPECT_STREQ(got->tier, "memory");
  TierUsage m = UsageOf(*store, "memory");
  EXPECT_EQ(m.blocks, 1u);
  EXPECT_EQ(m.bytes, 5000u);
  EXPECT_EQ(m.hits, 1u);
  EXPECT_EQ(store->Usage().size(), 1u);  // no disk tier configured
}

TEST(BlockStoreTest, GetOfAnotherEndPositionOrUnknownKeyIsNotFound) {
  auto store = OpenStore(MemoryOnly(1 << 20));
  TestBlock b = Block("acme", 0x1234, 128, Bytes(1, 100));
  ASSERT_TRUE(Put(*store, b).ok());
  EXPECT_TRUE(absl::IsNotFound(store->Get(BlockRef{"acme", 0x1234, 256}).status()));
  EXPECT_TRUE(absl::IsNotFound(store->Get(BlockRef{"acme", 0x9999, 128}).status()));
  EXPECT_EQ(UsageOf(*store, "memory").misses, 2u);
}

TEST(BlockStoreTest, PutIsIdempotentAndRefusesOtherBytesUnderTheSameKey) {
  auto store = OpenStore(MemoryOnly(1 << 20));
  TestBlock b = Block("acme", 7, 128, Bytes(2, 1000));
  EXPECT_TRUE(*Put(*store, b, "s1"));
  auto again = Put(*store, b, "s2");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(*again);
  EXPECT_EQ(UsageOf(*store, "memory").blocks, 1u);
  TestBlock other = b;
  other.data = Bytes(3, 1000);
  auto conflict = Put(*store, other, "s3");
  EXPECT_TRUE(absl::IsAlreadyExists(conflict.status())) << conflict.status();
  EXPECT_EQ(*store->Get(b.key)->data, b.data);
}

TEST(BlockStoreTest, CrcMismatchOnPutIsDataLossAndStoresNothing) {
  auto store = OpenStore(MemoryOnly(1 << 20));
  TestBlock b = Block("acme", 7, 128, Bytes(2, 1000));
  PutArgs a;
  a.key = b.key;
  a.data = b.data;
  a.crc32c = Crc32c(b.data) ^ 1;
  auto r = store->Put(a);
  EXPECT_TRUE(absl::IsDataLoss(r.status())) << r.status();
  EXPECT_TRUE(absl::IsNotFound(store->Get(b.key).status()));
}

TEST(BlockStoreTest, MemoryTierEvictsLeastRecentlyUsedWithinItsCapacityInBytes) {
  auto store = OpenStore(MemoryOnly(3000));
  TestBlock a = Block("t", 1, 128, Bytes(1, 1000));
  TestBlock b = Block("t", 2, 128, Bytes(2, 1000));
  TestBlock c = Block("t", 3, 128, Bytes(3, 1000));
  TestBlock d = Block("t", 4, 128, Bytes(4, 1500));
  for (const TestBlock* x : {&a, &b, &c}) ASSERT_TRUE(Put(*store, *x).ok());
  EXPECT_EQ(UsageOf(*store, "memory").bytes, 3000u);
  ASSERT_TRUE(store->Get(a.key).ok());  // a becomes the most recently used: b is the oldest
  ASSERT_TRUE(Put(*store, d).ok());     // needs 1500 bytes: b and then c go
  EXPECT_TRUE(Stored(*store, a));
  EXPECT_FALSE(Stored(*store, b));
  EXPECT_FALSE(Stored(*store, c));
  EXPECT_TRUE(Stored(*store, d));
  TierUsage m = UsageOf(*store, "memory");
  EXPECT_EQ(m.bytes, 2500u);
  EXPECT_EQ(m.evictions, 2u);
  EXPECT_LE(m.bytes, m.capacity_bytes);
  // A block larger than the whole tier is refused rather than emptying it.
  TestBlock huge = Block("t", 5, 128, Bytes(5, 3001));
  EXPECT_TRUE(absl::IsResourceExhausted(Put(*store, huge).status()));
  EXPECT_TRUE(Stored(*store, a));
}

TEST(BlockStoreTest, EvictionTakesTheTailOfAChainBeforeItsHead) {
  auto store = OpenStore(MemoryOnly(3000));
  TestBlock h1 = Block("t", 11, 128, Bytes(1, 1000));
  TestBlock h2 = Block("t", 12, 256, Bytes(2, 1000), &h1);
  TestBlock other = Block("t", 21, 128, Bytes(3, 1000));
  for (const TestBlock* x : {&h1, &h2, &other}) ASSERT_TRUE(Put(*store, *x).ok());
  // h1 is the least recently used but h2 continues it: h2 goes first.
  ASSERT_TRUE(Put(*store, Block("t", 31, 128, Bytes(4, 1000))).ok());
  EXPECT_TRUE(Stored(*store, h1));
  EXPECT_FALSE(Stored(*store, h2));
  EXPECT_TRUE(Stored(*store, other));
}

TEST(BlockStoreTest, BlocksOfRunningSequencesAreNotEvicted) {
  auto store = OpenStore(MemoryOnly(2000));
  TestBlock a = Block("t", 1, 128, Bytes(1, 1000));
  TestBlock b = Block("t", 2, 256, Bytes(2, 1000), &a);
  ASSERT_TRUE(Put(*store, a, "running").ok());
  ASSERT_TRUE(Put(*store, b, "running").ok());
  TestBlock c = Block("t", 3, 128, Bytes(3, 1000));
  auto full = Put(*store, c);
  EXPECT_TRUE(absl::IsResourceExhausted(full.status())) << full.status();
  EXPECT_TRUE(Stored(*store, a));
  EXPECT_TRUE(Stored(*store, b));
  // Finished: its blocks become evictable but stay until room is needed.
  EXPECT_EQ(store->DeleteSequence("t", "running"), 2u);
  EXPECT_TRUE(Stored(*store, a));
  EXPECT_TRUE(Stored(*store, b));
  ASSERT_TRUE(Put(*store, c).ok());
  EXPECT_TRUE(Stored(*store, a));  // the chain's tail went, its head stays
  EXPECT_FALSE(Stored(*store, b));
  EXPECT_TRUE(Stored(*store, c));
}

TEST(BlockStoreTest, DeleteSequenceFreesOnlyBlocksNoOtherSequenceReferences) {
  auto store = OpenStore(MemoryOnly(1 << 20));
  TestBlock shared = Block("t", 1, 128, Bytes(1, 100));
  TestBlock own = Block("t", 2, 256, Bytes(2, 100), &shared);
  ASSERT_TRUE(Put(*store, shared, "s1").ok());
  ASSERT_TRUE(Put(*store, own, "s1").ok());
  ASSERT_TRUE(Put(*store, shared, "s2").ok());  // s2 reuses the prefix
  EXPECT_EQ(store->DeleteSequence("t", "s1"), 1u);
  EXPECT_EQ(store->DeleteSequence("t", "s1"), 0u);     // already gone
  EXPECT_EQ(store->DeleteSequence("other", "s2"), 0u);  // sequence ids are per tenant
  EXPECT_EQ(store->DeleteSequence("t", "s2"), 1u);
  EXPECT_TRUE(Stored(*store, shared));  // references only protect; deleting them keeps blocks
  EXPECT_TRUE(Stored(*store, own));
}

TEST(BlockStoreTest, LookupPrefixFindsTheLongestStoredChain) {
  auto store = OpenStore(MemoryOnly(1 << 20));
  TestBlock h1 = Block("t", 101, 128, Bytes(1, 100));
  TestBlock h2 = Block("t", 102, 256, Bytes(2, 100), &h1);
  TestBlock h3 = Block("t", 103, 384, Bytes(3, 100), &h2);
  TestBlock fork = Block("t", 202, 256, Bytes(4, 100), &h1);
  for (const TestBlock* x : {&h1, &h2, &h3, &fork}) ASSERT_TRUE(Put(*store, *x).ok());
  auto match = store->LookupPrefix("t", {101, 102, 103, 104});
  ASSERT_EQ(match.size(), 3u);
  EXPECT_EQ(match[2].chain_hash, 103u);
  EXPECT_EQ(match[2].end_position, 384u);
  EXPECT_EQ(store->LookupPrefix("t", {101, 202, 103}).size(), 2u);  // 103 does not follow 202
  EXPECT_EQ(store->LookupPrefix("t", {101, 999, 103}).size(), 1u);
  EXPECT_EQ(store->LookupPrefix("t", {102, 103}).size(), 0u);  // not the first block of a chain
  EXPECT_EQ(store->LookupPrefix("t", {}).size(), 0u);
  EXPECT_TRUE(store->HasChain(h3.key));
  EXPECT_FALSE(store->HasChain(BlockRef{"t", 103, 256}));
}

TEST(BlockStoreTest, APrefixOfOneTenantIsNeverAHitForAnother) {
  auto store = OpenStore(MemoryOnly(1 << 20));
  TestBlock h1 = Block("alice", 101, 128, Bytes(1, 100));
  TestBlock h2 = Block("alice", 102, 256, Bytes(2, 100), &h1);
  ASSERT_TRUE(Put(*store, h1).ok());
  ASSERT_TRUE(Put(*store, h2).ok());
  EXPECT_EQ(store->LookupPrefix("alice", {101, 102}).size(), 2u);
  EXPECT_EQ(store->LookupPrefix("bob", {101, 102}).size(), 0u);
  EXPECT_EQ(store->LookupPrefix("", {101, 102}).size(), 0u);
  EXPECT_TRUE(absl::IsNotFound(store->Get(BlockRef{"bob", 101, 128}).status()));
  EXPECT_FALSE(store->HasChain(BlockRef{"bob", 102, 256}));
  // The same key under another tenant is another block.
  TestBlock bobs = Block("bob", 101, 128, Bytes(9, 100));
  EXPECT_TRUE(*Put(*store, bobs));
  EXPECT_EQ(*store->Get(h1.key)->data, h1.data);
  EXPECT_EQ(*store->Get(bobs.key)->data, bobs.data);
}

class DiskTierTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::MakeTempDir("kv_store_disk"); }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::vector<std::string> Files(const std::string& suffix) {
    std::vector<std::string> out;
    for (const auto& e : std::filesystem::recursive_directory_iterator(dir_)) {
      if (e.is_regular_file() && e.path().string().ends_with(suffix)) {
        out.push_back(e.path().string());
      }
    }
    return out;
  }
  // The only segment file (the tests that use it write less than one segment).
  std::string Segment() {
    auto files = Files(".seg");
    EXPECT_EQ(files.size(), 1u);
    return files.empty() ? "" : files[0];
  }
  // Offset of the block's record in Segment(), as a fresh scan finds it.
  uint64_t RecordOf(const TestBlock& b) {
    DiskTier disk(dir_, false);
    EXPECT_TRUE(disk.Scan().ok());
    auto where = disk.Locate(b.key.tenant, b.key.chain_hash);
    EXPECT_TRUE(where.has_value());
    return where ? where->second : 0;
  }
  void FlipByte(uint64_t offset) {
    std::fstream f(Segment(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset));
    char c;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x10);
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(&c, 1);
  }
  std::string dir_;
};

TEST_F(DiskTierTest, BlocksAreWrittenThroughAndARestartedStoreServesThem) {
  TestBlock h1 = Block("acme", 101, 128, Bytes(1, 70000));
  TestBlock h2 = Block("acme", 102, 256, Bytes(2, 30000), &h1);
  TestBlock empty_tenant = Block("", 101, 128, Bytes(3, 10));
  {
    auto store = OpenStore(WithDisk(dir_, 1 << 20, 1 << 24));
    for (const TestBlock* x : {&h1, &h2, &empty_tenant}) ASSERT_TRUE(Put(*store, *x, "s").ok());
    EXPECT_EQ(UsageOf(*store, "disk").blocks, 3u);
    EXPECT_EQ(UsageOf(*store, "memory").blocks, 3u);
  }
  EXPECT_EQ(Files(".seg").size(), 1u);  // appended to one segment
  auto store = OpenStore(WithDisk(dir_, 1 << 20, 1 << 24));
  EXPECT_EQ(UsageOf(*store, "disk").blocks, 3u);
  EXPECT_EQ(UsageOf(*store, "memory").blocks, 0u);
  EXPECT_EQ(store->LookupPrefix("acme", {101, 102}).size(), 2u);
  auto first = store->Get(h2.key);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(*first->data, h2.data);
  EXPECT_STREQ(first->tier, "disk");
  auto second = store->Get(h2.key);  // promoted by the first read
  ASSERT_TRUE(second.ok());
  EXPECT_STREQ(second->tier, "memory");
  EXPECT_EQ(*store->Get(empty_tenant.key)->data, empty_tenant.data);
  EXPECT_FALSE(*Put(*store, h1));  // still known after the restart: deduplicated
  TierUsage d = UsageOf(*store, "disk");
  EXPECT_EQ(d.hits, 2u);
}

TEST_F(DiskTierTest, AFlippedByteInABlockFileIsDataLossAndTheBlockIsDropped) {
  TestBlock b = Block("acme", 101, 128, Bytes(1, 4096));
  TestBlock after = Block("acme", 102, 256, Bytes(2, 4096), &b);
  {
    auto store = OpenStore(WithDisk(dir_, 1 << 20, 1 << 24));
    ASSERT_TRUE(Put(*store, b).ok());
    ASSERT_TRUE(Put(*store, after).ok());  // b is not the segment's tail: no check at start
  }
  FlipByte(RecordOf(b) + DiskTier::FileBytes("acme", 0) + 4000);
  prometheus::Registry registry;
  KvStoreMetrics metrics(registry);
  auto store = OpenStore(WithDisk(dir_, 1 << 20, 1 << 24), &metrics);
  EXPECT_EQ(UsageOf(*store, "disk").blocks, 2u);  // the header is intact: found at start
  auto got = store->Get(b.key);
  EXPECT_TRUE(absl::IsDataLoss(got.status())) << got.status();
  EXPECT_TRUE(absl::IsNotFound(store->Get(b.key).status()));
  EXPECT_EQ(UsageOf(*store, "disk").blocks, 1u);
  EXPECT_EQ(metrics.disk.corrupt->Value(), 1);
  EXPECT_EQ(store->LookupPrefix("acme", {101}).size(), 0u);
  // The drop is on disk too: a restart does not bring the corrupt record back.
  store.reset();
  store = OpenStore(WithDisk(dir_, 1 << 20, 1 << 24));
  EXPECT_EQ(UsageOf(*store, "disk").blocks, 1u);
  EXPECT_TRUE(absl::IsNotFound(store->Get(b.key).status()));
  EXPECT_EQ(*store->Get(after.key)->data, after.data);
  // Stored again (recomputed), it is served again.
  EXPECT_TRUE(*Put(*store, b));
  EXPECT_EQ(*store->Get(b.key)->data, b.data);
}

TEST_F(DiskTierTest, ATornTailIsCutOffAtStartAndNeverServed) {
  TestBlock a = Block("acme", 1, 128, Bytes(1, 5000));
  TestBlock b = Block("acme", 2, 256, Bytes(2, 5000), &a);
  TestBlock c = Block("acme", 3, 384, Bytes(3, 5000), &b);
  {
    auto store = OpenStore(WithDisk(dir_, 1 << 20, 1 << 24));
    for (const TestBlock* x : {&a, &b, &c}) ASSERT_TRUE(Put(*store, *x, "s").ok());
  }
  // A crash in the middle of appending c: its record stops 3000 bytes into the data.
  const uint64_t c_at = RecordOf(c);
  ASSERT_EQ(::truncate(Segment().c_str(), c_at + DiskTier::FileBytes("acme", 0) + 3000), 0);
  // Garbage of an old layout's tenant directory is cleared too.
  std::filesystem::create_directories(dir_ + "/t61636d65");
  std::ofstream(dir_ + "/t61636d65/0000000000000009.7.tmp") << "partial";
  prometheus::Registry registry;
  KvStoreMetrics metrics(registry);
  auto store = OpenStore(WithDisk(dir_, 1 << 20, 1 << 24), &metrics);
  EXPECT_EQ(UsageOf(*store, "disk").blocks, 2u);
  EXPECT_EQ(metrics.disk.corrupt->Value(), 1);
  EXPECT_EQ(std::filesystem::file_size(Segment()), c_at);  // cut where c began
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/t61636d65"));
  EXPECT_EQ(*store->Get(a.key)->data, a.data);
  EXPECT_EQ(*store->Get(b.key)->data, b.data);
  EXPECT_TRUE(absl::IsNotFound(store->Get(c.key).status()));
  EXPECT_EQ(store->LookupPrefix("acme", {1, 2, 3}).size(), 2u);
  // Appends continue after the cut, and a restart finds them.
  EXPECT_TRUE(*Put(*store, c));
  store.reset();
  store = OpenStore(WithDisk(dir_, 1 << 20, 1 << 24));
  EXPECT_EQ(store->LookupPrefix("acme", {1, 2, 3}).size(), 3u);
  EXPECT_EQ(*store->Get(c.key)->data, c.data);
}

TEST_F(DiskTierTest, ATailOfTheRightLengthButWrongBytesIsCutOffToo) {
  // What a power loss without --disk-fsync can leave: the length made it, the data did not.
  TestBlock a = Block("acme", 1, 128, Bytes(1, 5000));
  TestBlock b = Block("acme", 2, 256, Bytes(2, 5000), &a);
  {
    auto store = OpenStore(WithDisk(dir_, 1 << 20, 1 << 24));
    for (const TestBlock* x : {&a, &b}) ASSERT_TRUE(Put(*store, *x).ok());
  }
  const uint64_t b_at = RecordOf(b);
  FlipByte(b_at + DiskTier::FileBytes("acme", 0) + 4999);
  prometheus::Registry registry;
  KvStoreMetrics metrics(registry);
  auto store = OpenStore(WithDisk(dir_, 1 << 20, 1 << 24), &metrics);
  EXPECT_EQ(UsageOf(*store, "disk").blocks, 1u);
  EXPECT_EQ(metrics.disk.corrupt->Value(), 1);
  EXPECT_EQ(std::filesystem::file_size(Segment()), b_at);
  EXPECT_TRUE(absl::IsNotFound(store->Get(b.key).status()));
  EXPECT_EQ(*store->Get(a.key)->data, a.data);
}

TEST_F(DiskTierTest, ACorruptHeaderEndsItsSegmentThere) {
  TestBlock a = Block("acme", 1, 128, Bytes(1, 5000));
  TestBlock b = Block("acme", 2, 128, Bytes(2, 5000));
  TestBlock c = Block("acme", 3, 128, Bytes(3, 5000));
  {
    auto store = OpenStore(WithDisk(dir_, 1 << 20, 1 << 24));
    for (const TestBlock* x : {&a, &b, &c}) ASSERT_TRUE(Put(*store, *x).ok());
  }
  const uint64_t b_at = RecordOf(b);
  FlipByte(b_at + 20);  // inside the chain hash: the header CRC no longer matches
  prometheus::Registry registry;
  KvStoreMetrics metrics(registry);
  auto store = OpenStore(WithDisk(dir_, 1 << 20, 1 << 24), &metrics);
  // Without b's length nothing after it can be found: c goes with it, never a misparse.
  EXPECT_EQ(UsageOf(*store, "disk").blocks, 1u);
  EXPECT_EQ(metrics.disk.corrupt->Value(), 1);
  EXPECT_EQ(std::filesystem::file_size(Segment()), b_at);
  EXPECT_TRUE(store->Get(a.key).ok());
  EXPECT_TRUE(absl::IsNotFound(store->Get(b.key).status()));
  EXPECT_TRUE(absl::IsNotFound(store->Get(c.key).status()));
}

TEST_F(DiskTierTest, DiskTierEvictsWithinItsCapacityButNeverReferencedBlocks) {
  const uint64_t file = DiskTier::FileBytes("t", 1000);
  auto store = OpenStore(WithDisk(dir_, 1 << 20, 3 * file));
  TestBlock a = Block("t", 1, 128, Bytes(1, 1000));
  TestBlock b = Block("t", 2, 128, Bytes(2, 1000));
  TestBlock c = Block("t", 3, 128, Bytes(3, 1000));
  TestBlock d = Block("t", 4, 128, Bytes(4, 1000));
  ASSERT_TRUE(Put(*store, a, "live").ok());
  ASSERT_TRUE(Put(*store, b).ok());
  ASSERT_TRUE(Put(*store, c).ok());
  ASSERT_TRUE(Put(*store, d).ok());  // a is the oldest but referenced: b goes
  EXPECT_TRUE(Stored(*store, a));
  EXPECT_FALSE(Stored(*store, b));
  EXPECT_TRUE(Stored(*store, c));
  TierUsage disk = UsageOf(*store, "disk");
  EXPECT_EQ(disk.blocks, 3u);
  EXPECT_EQ(disk.bytes, 3 * file);
  EXPECT_EQ(disk.evictions, 1u);
  // A smaller capacity at the next start shrinks the tier (references do not survive a
  // restart: the sequences that held them re-put their blocks).
  store.reset();
  auto smaller = OpenStore(WithDisk(dir_, 1 << 20, 2 * file));
  EXPECT_EQ(UsageOf(*smaller, "disk").blocks, 2u);
  // Evictions are on disk: a start with room again does not bring them back.
  smaller.reset();
  auto again = OpenStore(WithDisk(dir_, 1 << 20, 3 * file));
  EXPECT_EQ(UsageOf(*again, "disk").blocks, 2u);
  EXPECT_FALSE(Stored(*again, b));
}

TEST_F(DiskTierTest, MemoryIsACacheOfDiskAndBlocksLargerThanMemoryStayOnDisk) {
  auto store = OpenStore(WithDisk(dir_, 2500, 1 << 24));
  TestBlock a = Block("t", 1, 128, Bytes(1, 1000));
  TestBlock b = Block("t", 2, 128, Bytes(2, 1000));
  TestBlock c = Block("t", 3, 128, Bytes(3, 1000));
  TestBlock big = Block("t", 4, 128, Bytes(4, 4000));
  for (const TestBlock* x : {&a, &b, &c, &big}) ASSERT_TRUE(Put(*store, *x, "live").ok());
  // Referenced blocks may leave memory here: they are safe on disk.
  EXPECT_EQ(UsageOf(*store, "memory").blocks, 2u);
  EXPECT_EQ(UsageOf(*store, "disk").blocks, 4u);
  auto got_a = store->Get(a.key);
  ASSERT_TRUE(got_a.ok());
  EXPECT_STREQ(got_a->tier, "disk");
  auto got_big = store->Get(big.key);
  ASSERT_TRUE(got_big.ok());
  EXPECT_EQ(*got_big->data, big.data);
  EXPECT_STREQ(store->Get(big.key)->tier, "disk");  // never fits in memory
  EXPECT_LE(UsageOf(*store, "memory").bytes, 2500u);
}

TEST_F(DiskTierTest, MetricsCountHitsAndMissesPerTier) {
  prometheus::Registry registry;
  KvStoreMetrics metrics(registry);
  auto store = OpenStore(WithDisk(dir_, 1 << 20, 1 << 24), &metrics);
  TestBlock a = Block("t", 1, 128, Bytes(1, 1000));
  ASSERT_TRUE(Put(*store, a).ok());
  ASSERT_TRUE(store->Get(a.key).ok());
  EXPECT_FALSE(store->Get(BlockRef{"t", 2, 128}).ok());
  EXPECT_EQ(metrics.memory.hits->Value(), 1);
  EXPECT_EQ(metrics.memory.misses->Value(), 1);
  EXPECT_EQ(metrics.disk.misses->Value(), 1);
  EXPECT_EQ(metrics.disk.blocks->Value(), 1);
  EXPECT_EQ(metrics.disk.bytes->Value(), static_cast<double>(DiskTier::FileBytes("t", 1000)));
  EXPECT_EQ(metrics.memory.bytes->Value(), 1000);
  EXPECT_EQ(metrics.disk.capacity_bytes->Value(), static_cast<double>(1 << 24));
  EXPECT_EQ(metrics.disk.write_seconds->Collect().histogram.sample_count, 1u);
  EXPECT_EQ(metrics.memory.read_seconds->Collect().histogram.sample_count, 1u);
}

TEST_F(DiskTierTest, ConcurrentPutsAndGetsOfSharedKeysStayConsistent) {
  // Small tiers force evictions in both while four threads put and read the same keys.
  const uint64_t file = DiskTier::FileBytes("t", 2000);
  auto store = OpenStore(WithDisk(dir_, 5 * 2000, 12 * file));
  constexpr int kKeys = 40;
  std::vector<std::thread> threads;
  std::vector<int> errors(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 5; ++round) {
        for (int k = 0; k < kKeys; ++k) {
          TestBlock b = Block("t", 1 + k, 128, Bytes(k, 2000));
          auto put = Put(*store, b, t == 0 && k < 3 ? "pinned" : "");
          if (!put.ok()) ++errors[t];
          auto got = store->Get(b.key);
          if (got.ok() ? *got->data != b.data : !absl::IsNotFound(got.status())) ++errors[t];
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(errors[t], 0) << "thread " << t;
  TierUsage disk = UsageOf(*store, "disk");
  EXPECT_LE(disk.bytes, 12 * file);
  EXPECT_EQ(disk.bytes, disk.blocks * file);
  EXPECT_LE(UsageOf(*store, "memory").bytes, 5u * 2000);
  for (int k = 0; k < 3; ++k) EXPECT_TRUE(Stored(*store, Block("t", 1 + k, 128, "")));
  // The segments hold exactly the blocks the index has.
  store.reset();
  store = OpenStore(WithDisk(dir_, 5 * 2000, 12 * file));
  EXPECT_EQ(UsageOf(*store, "disk").blocks, disk.blocks);
  for (int k = 0; k < kKeys; ++k) {
    auto got = store->Get(Block("t", 1 + k, 128, "").key);
    if (got.ok()) {
      EXPECT_EQ(*got->data, Bytes(k, 2000)) << k;
    }
  }
}

// Writes a block straight through a DiskTier, as BlockStore::Put does.
void Append(DiskTier& disk, const std::string& tenant, uint64_t hash, const std::string& data) {
  BlockFileHeader h;
  h.tenant = tenant;
  h.chain_hash = hash;
  h.end_position = 128;
  h.data_bytes = data.size();
  h.data_crc32c = Crc32c(data);
  auto token = disk.WriteTemp(h, data, 0);
  ASSERT_TRUE(token.ok()) << token.status();
  ASSERT_TRUE(disk.Publish(*token, tenant, hash).ok());
}

absl::StatusOr<std::string> ReadBack(DiskTier& disk, const std::string& tenant, uint64_t hash,
                                     const std::string& data) {
  BlockFileHeader h;
  h.tenant = tenant;
  h.chain_hash = hash;
  h.end_position = 128;
  h.data_bytes = data.size();
  h.data_crc32c = Crc32c(data);
  return disk.Read(h);
}

TEST_F(DiskTierTest, SegmentsAreDeletedWholeAndSurvivorsAreCopiedForward) {
  const uint64_t record = DiskTier::FileBytes("t", 1000);
  DiskTierOptions o;
  o.segment_bytes = 4 * record;  // four records a segment
  o.dead_fraction = 0.25;
  DiskTier disk(dir_, false, o);
  ASSERT_TRUE(disk.Init().ok());
  ASSERT_TRUE(disk.Scan().ok());
  for (uint64_t k = 1; k <= 12; ++k) Append(disk, "t", k, Bytes(k, 1000));
  EXPECT_EQ(disk.Stats().segments, 3u);  // 1-4, 5-8, 9-12 (the current one)
  const std::string first_segment = disk.Locate("t", 1)->first;
  // Segment 2 dies whole: deleted at the next append, nothing copied.
  for (uint64_t k = 5; k <= 8; ++k) disk.Remove("t", k);
  // Segment 1 loses one record; the rest are what the block store keeps (referenced or recently
  // used).
  disk.Remove("t", 2);
  Append(disk, "t", 13, Bytes(13, 1000));
  DiskTierStats s = disk.Stats();
  EXPECT_EQ(s.deleted_segments, 1u);
  EXPECT_EQ(s.compactions, 0u);  // 1 dead record is within the budget (one segment)
  EXPECT_EQ(s.copied_records, 0u);
  EXPECT_TRUE(std::filesystem::exists(first_segment));
  // More dead records in segments 1 and 3 push the dead bytes of sealed segments (5 records)
  // over the budget (one segment, 4): segment 1, the one with the most, is compacted.
  disk.Remove("t", 3);
  disk.Remove("t", 4);
  disk.Remove("t", 9);
  disk.Remove("t", 10);
  Append(disk, "t", 14, Bytes(14, 1000));
  s = disk.Stats();
  EXPECT_EQ(s.compactions, 1u);
  EXPECT_EQ(s.copied_records, 1u);  // block 1
  EXPECT_FALSE(std::filesystem::exists(first_segment));
  EXPECT_NE(disk.Locate("t", 1)->first, first_segment);
  for (uint64_t k : {1, 11, 12, 13, 14}) {
    auto got = ReadBack(disk, "t", k, Bytes(k, 1000));
    ASSERT_TRUE(got.ok()) << k << ": " << got.status();
    EXPECT_EQ(*got, Bytes(k, 1000)) << k;
  }
  for (uint64_t k : {2, 3, 4, 5, 9, 10}) {
    EXPECT_TRUE(absl::IsNotFound(ReadBack(disk, "t", k, Bytes(k, 1000)).status())) << k;
  }
  EXPECT_EQ(s.live_bytes, 5 * record);
  EXPECT_EQ(s.segments, 2u);  // 3 (11, 12) and 4 (13, 14, 1)
  // A restart finds each survivor once, and none of the removed blocks.
  DiskTier again(dir_, false, o);
  auto scan = again.Scan();
  ASSERT_TRUE(scan.ok()) << scan.status();
  std::vector<uint64_t> found;
  for (const ScannedBlock& b : scan->blocks) found.push_back(b.header.chain_hash);
  std::sort(found.begin(), found.end());
  EXPECT_EQ(found, (std::vector<uint64_t>{1, 11, 12, 13, 14}));
  EXPECT_EQ(scan->dropped_files, 0);
  EXPECT_EQ(*ReadBack(again, "t", 1, Bytes(1, 1000)), Bytes(1, 1000));
}

TEST_F(DiskTierTest, ADiscardedAppendIsNotFoundAfterARestart) {
  DiskTier disk(dir_, false);
  ASSERT_TRUE(disk.Init().ok());
  ASSERT_TRUE(disk.Scan().ok());
  const std::string data = Bytes(1, 1000);
  BlockFileHeader h;
  h.tenant = "t";
  h.chain_hash = 7;
  h.end_position = 128;
  h.data_bytes = data.size();
  h.data_crc32c = Crc32c(data);
  auto token = disk.WriteTemp(h, data, 0);
  ASSERT_TRUE(token.ok());
  DiskTier::RemovePath(*token);  // the put lost a race to an identical one
  Append(disk, "t", 8, Bytes(8, 1000));
  DiskTier again(dir_, false);
  auto scan = again.Scan();
  ASSERT_TRUE(scan.ok());
  ASSERT_EQ(scan->blocks.size(), 1u);
  EXPECT_EQ(scan->blocks[0].header.chain_hash, 8u);
}

TEST_F(DiskTierTest, TheStoreEvictsBySegmentAndCopiesReferencedBlocksForward) {
  const uint64_t record = DiskTier::FileBytes("t", 1000);
  DiskTierOptions o;
  o.segment_bytes = 4 * record;
  DiskTier::ScopedDefaultOptionsForTesting small_segments(o);
  const uint64_t capacity = 8 * record;
  auto store = OpenStore(WithDisk(dir_, 1, capacity));  // memory holds nothing
  TestBlock pinned = Block("t", 1, 128, Bytes(1, 1000));
  ASSERT_TRUE(Put(*store, pinned, "live").ok());
  const std::string first_segment = dir_ + "/0000000000000001.seg";
  ASSERT_TRUE(std::filesystem::exists(first_segment));
  for (int k = 2; k <= 40; ++k) {
    ASSERT_TRUE(Put(*store, Block("t", k, 128, Bytes(k, 1000))).ok()) << k;
    // However the blocks die, the files stay within the live bytes' budget.
    uint64_t on_disk = 0;
    for (const std::string& f : Files(".seg")) on_disk += std::filesystem::file_size(f);
    EXPECT_LE(on_disk, capacity + 4 * record /* dead budget */ + 2 * 4 * record) << k;
  }
  // The pinned block's first segment was deleted; the block itself was copied forward.
  EXPECT_FALSE(std::filesystem::exists(first_segment));
  auto got = store->Get(pinned.key);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got->data, pinned.data);
  const TierUsage disk = UsageOf(*store, "disk");
  EXPECT_EQ(disk.blocks, 8u);
  for (int k = 34; k <= 40; ++k) EXPECT_TRUE(Stored(*store, Block("t", k, 128, ""))) << k;
  store.reset();
  store = OpenStore(WithDisk(dir_, 1, capacity));
  EXPECT_EQ(UsageOf(*store, "disk").blocks, 8u);
  EXPECT_EQ(*store->Get(pinned.key)->data, pinned.data);
  for (int k = 34; k <= 40; ++k) {
    EXPECT_EQ(*store->Get(Block("t", k, 128, "").key)->data, Bytes(k, 1000)) << k;
  }
}

}  // namespace
}  // namespace expertmesh::kv_store
