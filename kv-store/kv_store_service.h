// The kv-store's gRPC service. The block tiers (memory LRU, disk) and the prefix index are not
// built yet, so every RPC answers UNIMPLEMENTED saying so; the process still joins the cluster
// with its capacity so that membership and deployment can be exercised.
#pragma once

#include "expertmesh/v1/kv_store.grpc.pb.h"

namespace expertmesh::kv_store {

class KvStoreService final : public expertmesh::v1::KvStore::CallbackService {
 public:
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
};

}  // namespace expertmesh::kv_store
