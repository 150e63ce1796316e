// The gRPC surface in process: field checks name the field, store errors keep their codes.
#include "kv-store/kv_store_service.h"

#include <memory>

#include "core/rpc/channel.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "core/state/crc32c.h"

namespace expertmesh::kv_store {
using state::Crc32c;
using state::Crc32cExtend;
namespace {

using namespace expertmesh::v1;

class KvStoreServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    StoreOptions o;
    o.memory_capacity_bytes = 1 << 20;
    store_ = std::move(*BlockStore::Open(o, nullptr));
    service_ = std::make_unique<KvStoreService>(*store_);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = KvStore::NewStub(rpc::MakeChannel("127.0.0.1:" + std::to_string(port)));
  }
  void TearDown() override { server_->Shutdown(); }

  template <typename Request, typename Response, typename Method>
  grpc::Status Call(Method method, const Request& request, Response* response) {
    grpc::ClientContext context;
    rpc::SetTimeout(context, absl::Seconds(10));
    return (stub_.get()->*method)(&context, request, response);
  }

  static PutBlockRequest PutRequest(const std::string& tenant, uint64_t hash, uint32_t end,
                                    const std::string& data) {
    PutBlockRequest r;
    r.mutable_key()->set_tenant(tenant);
    r.mutable_key()->set_chain_hash(hash);
    r.mutable_key()->set_end_position(end);
    r.set_sequence_id("seq");
    r.set_data(data);
    r.set_crc32c(Crc32c(data));
    return r;
  }

  void ExpectInvalid(const grpc::Status& s, const std::string& field) {
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
    EXPECT_NE(s.error_message().find(field), std::string::npos)
        << "'" << s.error_message() << "' does not name " << field;
  }

  std::unique_ptr<BlockStore> store_;
  std::unique_ptr<KvStoreService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<KvStore::Stub> stub_;
};

TEST_F(KvStoreServiceTest, PutGetLookupDeleteAndStats) {
  PutBlockResponse put;
  PutBlockRequest first = PutRequest("t", 1, 128, "first block");
  ASSERT_TRUE(Call(&KvStore::Stub::PutBlock, first, &put).ok());
  EXPECT_TRUE(put.stored());
  PutBlockRequest second = PutRequest("t", 2, 256, "second block");
  *second.mutable_parent() = first.key();
  ASSERT_TRUE(Call(&KvStore::Stub::PutBlock, second, &put).ok());
  ASSERT_TRUE(Call(&KvStore::Stub::PutBlock, second, &put).ok());
  EXPECT_FALSE(put.stored());

  GetBlockRequest get;
  *get.mutable_key() = second.key();
  GetBlockResponse got;
  ASSERT_TRUE(Call(&KvStore::Stub::GetBlock, get, &got).ok());
  EXPECT_EQ(got.data(), "second block");
  EXPECT_EQ(got.crc32c(), Crc32c("second block"));
  EXPECT_EQ(got.tier(), "memory");

  LookupPrefixRequest lookup;
  lookup.set_tenant("t");
  for (uint64_t h : {1, 2, 3}) lookup.add_chain_hashes(h);
  LookupPrefixResponse found;
  ASSERT_TRUE(Call(&KvStore::Stub::LookupPrefix, lookup, &found).ok());
  EXPECT_EQ(found.matched_blocks(), 2u);
  ASSERT_EQ(found.keys_size(), 2);
  EXPECT_EQ(found.keys(1).end_position(), 256u);
  lookup.set_tenant("u");
  ASSERT_TRUE(Call(&KvStore::Stub::LookupPrefix, lookup, &found).ok());
  EXPECT_EQ(found.matched_blocks(), 0u);

  HasPrefixRequest has;
  *has.mutable_key() = second.key();
  HasPrefixResponse present;
  ASSERT_TRUE(Call(&KvStore::Stub::HasPrefix, has, &present).ok());
  EXPECT_TRUE(present.present());

  DeleteSequenceRequest del;
  del.set_tenant("t");
  del.set_sequence_id("seq");
  DeleteSequenceResponse deleted;
  ASSERT_TRUE(Call(&KvStore::Stub::DeleteSequence, del, &deleted).ok());
  EXPECT_EQ(deleted.freed_blocks(), 2u);

  KvStatsResponse stats;
  ASSERT_TRUE(Call(&KvStore::Stub::Stats, KvStatsRequest(), &stats).ok());
  ASSERT_EQ(stats.tiers_size(), 1);
  EXPECT_EQ(stats.tiers(0).tier(), "memory");
  EXPECT_EQ(stats.tiers(0).blocks(), 2u);
  EXPECT_EQ(stats.tiers(0).hits(), 1u);
  EXPECT_EQ(stats.tiers(0).capacity_bytes(), 1u << 20);
}

TEST_F(KvStoreServiceTest, StoreErrorsKeepTheirCodes) {
  PutBlockResponse put;
  PutBlockRequest bad_crc = PutRequest("t", 1, 128, "data");
  bad_crc.set_crc32c(bad_crc.crc32c() + 1);
  EXPECT_EQ(Call(&KvStore::Stub::PutBlock, bad_crc, &put).error_code(),
            grpc::StatusCode::DATA_LOSS);
  GetBlockRequest get;
  *get.mutable_key() = bad_crc.key();
  GetBlockResponse got;
  EXPECT_EQ(Call(&KvStore::Stub::GetBlock, get, &got).error_code(), grpc::StatusCode::NOT_FOUND);
  ASSERT_TRUE(Call(&KvStore::Stub::PutBlock, PutRequest("t", 1, 128, "data"), &put).ok());
  EXPECT_EQ(Call(&KvStore::Stub::PutBlock, PutRequest("t", 1, 128, "other"), &put).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);
}

TEST_F(KvStoreServiceTest, EveryBadFieldIsInvalidArgumentNamingIt) {
  PutBlockResponse put;
  PutBlockRequest no_key = PutRequest("t", 1, 128, "d");
  no_key.clear_key();
  ExpectInvalid(Call(&KvStore::Stub::PutBlock, no_key, &put), "key is required");
  ExpectInvalid(Call(&KvStore::Stub::PutBlock, PutRequest("t", 1, 0, "d"), &put),
                "key.end_position");
  ExpectInvalid(
      Call(&KvStore::Stub::PutBlock, PutRequest(std::string(121, 'x'), 1, 128, "d"), &put),
      "key.tenant");
  ExpectInvalid(Call(&KvStore::Stub::PutBlock, PutRequest("t", 1, 128, ""), &put), "data");
  PutBlockRequest long_seq = PutRequest("t", 1, 128, "d");
  long_seq.set_sequence_id(std::string(257, 's'));
  ExpectInvalid(Call(&KvStore::Stub::PutBlock, long_seq, &put), "sequence_id");
  PutBlockRequest other_tenant = PutRequest("t", 2, 256, "d");
  *other_tenant.mutable_parent() = PutRequest("u", 1, 128, "d").key();
  ExpectInvalid(Call(&KvStore::Stub::PutBlock, other_tenant, &put), "parent.tenant");
  PutBlockRequest later_parent = PutRequest("t", 2, 256, "d");
  *later_parent.mutable_parent() = PutRequest("t", 1, 256, "d").key();
  ExpectInvalid(Call(&KvStore::Stub::PutBlock, later_parent, &put), "parent.end_position");
  PutBlockRequest zero_parent = PutRequest("t", 2, 256, "d");
  *zero_parent.mutable_parent() = PutRequest("t", 1, 0, "d").key();
  ExpectInvalid(Call(&KvStore::Stub::PutBlock, zero_parent, &put), "parent.end_position");

  GetBlockResponse got;
  ExpectInvalid(Call(&KvStore::Stub::GetBlock, GetBlockRequest(), &got), "key is required");
  HasPrefixResponse has;
  ExpectInvalid(Call(&KvStore::Stub::HasPrefix, HasPrefixRequest(), &has), "key is required");
  LookupPrefixRequest lookup;
  lookup.set_tenant(std::string(121, 'x'));
  LookupPrefixResponse found;
  ExpectInvalid(Call(&KvStore::Stub::LookupPrefix, lookup, &found), "tenant");
  lookup.set_tenant("t");
  for (int i = 0; i <= kMaxLookupHashes; ++i) lookup.add_chain_hashes(i);
  ExpectInvalid(Call(&KvStore::Stub::LookupPrefix, lookup, &found), "chain_hashes");
  DeleteSequenceRequest del;
  del.set_tenant("t");
  DeleteSequenceResponse deleted;
  ExpectInvalid(Call(&KvStore::Stub::DeleteSequence, del, &deleted), "sequence_id");
}

}  // namespace
}  // namespace expertmesh::kv_store
