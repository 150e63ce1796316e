// The kv-store's gRPC service over a BlockStore: checks every request field (INVALID_ARGUMENT
// naming the field) and maps the store's answers to the RPCs of kv_store.proto.
#pragma once

#include "expertmesh/v1/kv_store.grpc.pb.h"
#include "kv-store/block_store.h"

namespace expertmesh::kv_store {

// Longest tenant accepted: it names a directory of the disk tier in hex (2 characters a byte,
// within the 255 of a file name).
inline constexpr size_t kMaxTenantBytes = 120;
inline constexpr size_t kMaxSequenceIdBytes = 256;
// Blocks of a 8M-token prompt; more is a caller bug.
inline constexpr int kMaxLookupHashes = 65536;

class KvStoreService final : public expertmesh::v1::KvStore::CallbackService {
 public:
  explicit KvStoreService(BlockStore& store) : store_(store) {}

  grpc::ServerUnaryReactor* PutBlock(grpc::CallbackServerContext* context,
                                     const expertmesh::v1::PutBlockRequest* request,
                                     expertmesh::v1::PutBlockResponse* response) override;
  grpc::ServerUnaryReactor* GetBlock(grpc::CallbackServerContext* context,
                                     const expertmesh::v1::GetBlockRequest* request,
                                     expertmesh::v1::GetBlockResponse* response) override;
  grpc::ServerUnaryReactor* HasPrefix(grpc::CallbackServerContext* context,
                                      const expertmesh::v1::HasPrefixRequest* request,
                                      expertmesh::v1::HasPrefixResponse* response) override;
  grpc::ServerUnaryReactor* LookupPrefix(grpc::CallbackServerContext* context,
                                         const expertmesh::v1::LookupPrefixRequest* request,
                                         expertmesh::v1::LookupPrefixResponse* response) override;
  grpc::ServerUnaryReactor* DeleteSequence(
      grpc::CallbackServerContext* context, const expertmesh::v1::DeleteSequenceRequest* request,
      expertmesh::v1::DeleteSequenceResponse* response) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* context,
                                  const expertmesh::v1::KvStatsRequest* request,
                                  expertmesh::v1::KvStatsResponse* response) override;

 private:
  BlockStore& store_;
};

}  // namespace expertmesh::kv_store
