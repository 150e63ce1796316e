// The real expertmesh-kv-store binary: blocks put over gRPC survive a SIGKILL, served from the
// same --disk-dir by the restarted process; its /metrics has the per-tier families.
#include <signal.h>
#include <sys/wait.h>

#include <filesystem>
#include <string>
#include <vector>

#include "core/rpc/channel.h"
#include "expertmesh/v1/kv_store.grpc.pb.h"
#include "gtest/gtest.h"
#include "core/state/crc32c.h"
#include "tests/service_harness.h"
#include "tests/testing/prom_text.h"

namespace expertmesh::testing {
namespace {

using namespace expertmesh::v1;

std::string Data(int i) {
  std::string s(20000 + 1000 * i, '\0');
  for (size_t k = 0; k < s.size(); ++k) s[k] = static_cast<char>((k * 31 + i * 7) & 0xFF);
  return s;
}

class KvStoreProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("kv_store_e2e");
    disk_ = dir_ + "/blocks";
  }
  void TearDown() override {
    service_.process.reset();
    std::filesystem::remove_all(dir_);
  }

  void Start(const std::string& name) {
    auto started = StartService(name, kKvStoreBinary,
                                {"--disk-dir=" + disk_, "--memory-capacity-bytes=1000000",
                                 "--disk-capacity-bytes=100000000"},
                                dir_);
    ASSERT_TRUE(started.ok()) << started.status();
    service_ = std::move(*started);
    stub_ = KvStore::NewStub(rpc::MakeChannel(service_.grpc_address()));
  }

  BlockKey Key(int i) {
    BlockKey k;
    k.set_tenant("tenant-a");
    k.set_chain_hash(0xABC000 + i);
    k.set_end_position(128 * (i + 1));
    return k;
  }

  std::string dir_;
  std::string disk_;
  RunningService service_;
  std::unique_ptr<KvStore::Stub> stub_;
};

TEST_F(KvStoreProcessTest, BlocksSurviveASigkillAndAreServedFromDiskAfterTheRestart) {
  constexpr int kBlocks = 6;
  Start("kv-store-1");
  for (int i = 0; i < kBlocks; ++i) {
    PutBlockRequest put;
    *put.mutable_key() = Key(i);
    if (i > 0) *put.mutable_parent() = Key(i - 1);
    put.set_sequence_id("seq-1");
    put.set_data(Data(i));
    put.set_crc32c(state::Crc32c(put.data()));
    PutBlockResponse stored;
    grpc::ClientContext context;
    rpc::SetTimeout(context, absl::Seconds(10));
    grpc::Status s = stub_->PutBlock(&context, put, &stored);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_TRUE(stored.stored());
  }
  service_.process->Signal(SIGKILL);
  ASSERT_TRUE(service_.process->WaitForExit(absl::Seconds(10)).has_value());

  Start("kv-store-2");
  LookupPrefixRequest lookup;
  lookup.set_tenant("tenant-a");
  for (int i = 0; i < kBlocks + 2; ++i) lookup.add_chain_hashes(Key(i).chain_hash());
  LookupPrefixResponse found;
  {
    grpc::ClientContext context;
    rpc::SetTimeout(context, absl::Seconds(10));
    ASSERT_TRUE(stub_->LookupPrefix(&context, lookup, &found).ok());
  }
  EXPECT_EQ(found.matched_blocks(), static_cast<uint32_t>(kBlocks));
  lookup.set_tenant("tenant-b");
  {
    grpc::ClientContext context;
    rpc::SetTimeout(context, absl::Seconds(10));
    ASSERT_TRUE(stub_->LookupPrefix(&context, lookup, &found).ok());
  }
  EXPECT_EQ(found.matched_blocks(), 0u);
  for (int i = 0; i < kBlocks; ++i) {
    GetBlockRequest get;
    *get.mutable_key() = Key(i);
    GetBlockResponse got;
    grpc::ClientContext context;
    rpc::SetTimeout(context, absl::Seconds(10));
    grpc::Status s = stub_->GetBlock(&context, get, &got);
    ASSERT_TRUE(s.ok()) << i << ": " << s.error_message();
    EXPECT_EQ(got.data(), Data(i)) << i;
    EXPECT_EQ(got.crc32c(), state::Crc32c(Data(i)));
    EXPECT_EQ(got.tier(), "disk");
  }

  auto response = HttpRequest(service_.ports.metrics, "GET", "/metrics");
  ASSERT_TRUE(response.ok()) << response.status();
  auto scrape = ParsePromText(response->body);
  ASSERT_TRUE(scrape.ok()) << scrape.status();
  auto disk_hits = scrape->Find("expertmesh_kv_store_hits_total", {{"tier", "disk"}});
  ASSERT_EQ(disk_hits.size(), 1u);
  EXPECT_EQ(disk_hits[0].value, kBlocks);
  auto disk_blocks = scrape->Find("expertmesh_kv_store_blocks", {{"tier", "disk"}});
  ASSERT_EQ(disk_blocks.size(), 1u);
  EXPECT_EQ(disk_blocks[0].value, kBlocks);
  EXPECT_EQ(scrape->Find("expertmesh_kv_store_blocks", {{"tier", "memory"}}).size(), 1u);

  service_.process->Signal(SIGTERM);
  auto status = service_.process->WaitForExit(absl::Seconds(10));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << service_.process->Log();
}

TEST_F(KvStoreProcessTest, BadFlagsAreRefusedNamingTheFlag) {
  auto started = StartService("kv-store-bad", kKvStoreBinary, {"--memory-capacity-bytes=0"},
                              dir_, absl::Seconds(10));
  ASSERT_FALSE(started.ok());
  EXPECT_NE(started.status().message().find("--memory-capacity-bytes"), std::string::npos)
      << started.status();
}

}  // namespace
}  // namespace expertmesh::testing
