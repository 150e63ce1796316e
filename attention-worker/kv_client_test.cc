// The attention worker's kv-store client against a real KvStoreService on loopback: puts go out
// in order with their parents and come back as one chain; a chain broken by a lost block stops
// there; a store that is gone answers within the deadlines (an error, never a hang); a full
// queue drops and counts.
#include "attention-worker/kv_client.h"

#include <memory>
#include <string>

#include "core/state/crc32c.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kv-store/block_store.h"
#include "kv-store/kv_store_service.h"
#include "prometheus/registry.h"

namespace expertmesh::attention_worker {
namespace {

class KvClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto store = kv_store::BlockStore::Open(kv_store::StoreOptions{}, nullptr);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    service_ = std::make_unique<kv_store::KvStoreService>(*store_);
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(service_.get());
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

  static KvPut Put(const std::string& tenant, uint64_t hash, uint32_t end, uint64_t parent_hash,
                   const std::string& data) {
    KvPut p;
    p.key = {tenant, hash, end};
    if (end > 128) p.parent = KvBlockKey{tenant, parent_hash, end - 128};
    p.sequence_id = "s";
    p.data = data;
    return p;
  }

  std::unique_ptr<kv_store::BlockStore> store_;
  std::unique_ptr<kv_store::KvStoreService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

TEST_F(KvClientTest, PutsComeBackAsOneChainPerTenant) {
  KvClient c(address(), KvClientOptions{});
  c.PutAsync(Put("t", 11, 128, 0, "block-0"));
  c.PutAsync(Put("t", 22, 256, 11, "block-1"));
  c.PutAsync(Put("t", 33, 384, 22, "block-2"));
  ASSERT_TRUE(c.WaitIdle(absl::Seconds(30)));
  PrefixFetch f = c.FetchPrefix("t", {11, 22, 99});
  EXPECT_TRUE(f.lookup_status.ok()) << f.lookup_status;
  EXPECT_TRUE(f.get_status.ok()) << f.get_status;
  EXPECT_EQ(f.matched_blocks, 2u);
  ASSERT_EQ(f.blocks.size(), 2u);
  EXPECT_EQ(f.blocks[0], "block-0");
  EXPECT_EQ(f.blocks[1], "block-1");
  EXPECT_EQ(c.FetchPrefix("t", {11, 22, 33}).blocks.size(), 3u);
  EXPECT_EQ(c.FetchPrefix("other", {11, 22, 33}).matched_blocks, 0u);
  c.DeleteSequenceAsync("t", "s");
  ASSERT_TRUE(c.WaitIdle(absl::Seconds(30)));
  // Deleting the references keeps the blocks for reuse.
  EXPECT_EQ(c.FetchPrefix("t", {11, 22, 33}).blocks.size(), 3u);
}

TEST_F(KvClientTest, AStoreThatIsGoneIsAnErrorWithinTheDeadlines) {
  const std::string gone = address();
  server_->Shutdown();
  server_.reset();
  prometheus::Registry registry;
  KvClientOptions o;
  o.registry = &registry;
  KvClient c(gone, o);
  const absl::Time t0 = absl::Now();
  PrefixFetch f = c.FetchPrefix("t", {1, 2});
  EXPECT_FALSE(f.lookup_status.ok());
  EXPECT_TRUE(f.blocks.empty());
  EXPECT_LT(absl::Now() - t0, absl::Seconds(10));  // lookup deadline 200 ms; bound is loose
  // Block 0 fails, so block 1 (whose parent is missing) is not sent at all.
  c.PutAsync(Put("t", 1, 128, 0, "a"));
  ASSERT_TRUE(c.WaitIdle(absl::Seconds(30)));
  c.PutAsync(Put("t", 2, 256, 1, "b"));
  ASSERT_TRUE(c.WaitIdle(absl::Seconds(30)));
  auto count = [&](const std::string& result) {
    for (const auto& fam : registry.Collect()) {
      if (fam.name != "expertmesh_attention_kv_block_puts_total") continue;
      for (const auto& m : fam.metric) {
        for (const auto& l : m.label) {
          if (l.name == "result" && l.value == result) return m.counter.value;
        }
      }
    }
    return -1.0;
  };
  EXPECT_EQ(count("failed"), 1);
  EXPECT_EQ(count("skipped"), 1);
}

TEST_F(KvClientTest, AFullQueueDropsTheBlock) {
  prometheus::Registry registry;
  KvClientOptions o;
  o.registry = &registry;
  o.max_queued_bytes = 10;  // one small block at a time
  KvClient c(address(), o);
  // A block larger than the whole queue can never be queued.
  c.PutAsync(Put("t", 5, 128, 0, std::string(11, 'x')));
  ASSERT_TRUE(c.WaitIdle(absl::Seconds(30)));
  EXPECT_EQ(c.FetchPrefix("t", {5}).matched_blocks, 0u);
  double dropped = -1;
  for (const auto& fam : registry.Collect()) {
    if (fam.name != "expertmesh_attention_kv_block_puts_total") continue;
    for (const auto& m : fam.metric) {
      if (m.label.size() == 1 && m.label[0].value == "dropped") dropped = m.counter.value;
    }
  }
  EXPECT_EQ(dropped, 1);
}

}  // namespace
}  // namespace expertmesh::attention_worker
