#include "kv-store/kv_store_service.h"

#include "core/rpc/reactors.h"

namespace expertmesh::kv_store {
namespace {
constexpr char kNoTiers[] =
    "the kv-store's block tiers (memory LRU, disk) and prefix index are not built yet";

grpc::ServerUnaryReactor* NotYet(grpc::CallbackServerContext* context, const char* rpc) {
  return rpc::FinishUnary(context, rpc::Unimplemented(rpc, kNoTiers));
}
}  // namespace

grpc::ServerUnaryReactor* KvStoreService::PutBlock(grpc::CallbackServerContext* c,
                                                   const expertmesh::v1::PutBlockRequest*,
                                                   expertmesh::v1::PutBlockResponse*) {
  return NotYet(c, "KvStore.PutBlock");
}
grpc::ServerUnaryReactor* KvStoreService::GetBlock(grpc::CallbackServerContext* c,
                                                   const expertmesh::v1::GetBlockRequest*,
                                                   expertmesh::v1::GetBlockResponse*) {
  return NotYet(c, "KvStore.GetBlock");
}
grpc::ServerUnaryReactor* KvStoreService::HasPrefix(grpc::CallbackServerContext* c,
                                                    const expertmesh::v1::HasPrefixRequest*,
                                                    expertmesh::v1::HasPrefixResponse*) {
  return NotYet(c, "KvStore.HasPrefix");
}
grpc::ServerUnaryReactor* KvStoreService::LookupPrefix(grpc::CallbackServerContext* c,
                                                       const expertmesh::v1::LookupPrefixRequest*,
                                                       expertmesh::v1::LookupPrefixResponse*) {
  return NotYet(c, "KvStore.LookupPrefix");
}
grpc::ServerUnaryReactor* KvStoreService::DeleteSequence(
    grpc::CallbackServerContext* c, const expertmesh::v1::DeleteSequenceRequest*,
    expertmesh::v1::DeleteSequenceResponse*) {
  return NotYet(c, "KvStore.DeleteSequence");
}
grpc::ServerUnaryReactor* KvStoreService::Stats(grpc::CallbackServerContext* c,
                                                const expertmesh::v1::KvStatsRequest*,
                                                expertmesh::v1::KvStatsResponse*) {
  return NotYet(c, "KvStore.Stats");
}

}  // namespace expertmesh::kv_store
