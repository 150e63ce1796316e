#include "kv-store/kv_store_service.h"

#include "absl/strings/str_cat.h"
#include "core/rpc/reactors.h"
#include "core/rpc/status.h"

namespace expertmesh::kv_store {
namespace {

using expertmesh::v1::BlockKey;

absl::Status CheckTenant(const std::string& tenant, absl::string_view field) {
  if (tenant.size() > kMaxTenantBytes) {
    return absl::InvalidArgumentError(absl::StrCat(field, " is ", tenant.size(),
                                                   " bytes long; at most ", kMaxTenantBytes));
  }
  return absl::OkStatus();
}

// `field` is the key's name in the request ("key", "parent").
absl::StatusOr<BlockRef> CheckKey(bool present, const BlockKey& key, absl::string_view field) {
  if (!present) return absl::InvalidArgumentError(absl::StrCat(field, " is required"));
  if (absl::Status s = CheckTenant(key.tenant(), absl::StrCat(field, ".tenant")); !s.ok()) {
    return s;
  }
  if (key.end_position() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".end_position must be positive (the tokens the block covers from position 0)"));
  }
  return BlockRef{key.tenant(), key.chain_hash(), key.end_position()};
}

grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* context, const absl::Status& s) {
  return rpc::FinishUnary(context, rpc::ToGrpcStatus(s));
}

void ToProto(const BlockRef& ref, BlockKey* out) {
  out->set_tenant(ref.tenant);
  out->set_chain_hash(ref.chain_hash);
  out->set_end_position(ref.end_position);
}

}  // namespace

grpc::ServerUnaryReactor* KvStoreService::PutBlock(grpc::CallbackServerContext* c,
                                                   const expertmesh::v1::PutBlockRequest* request,
                                                   expertmesh::v1::PutBlockResponse* response) {
  absl::StatusOr<BlockRef> key = CheckKey(request->has_key(), request->key(), "key");
  if (!key.ok()) return Finish(c, key.status());
  PutArgs args;
  args.key = std::move(*key);
  if (request->has_parent()) {
    absl::StatusOr<BlockRef> parent = CheckKey(true, request->parent(), "parent");
    if (!parent.ok()) return Finish(c, parent.status());
    if (parent->tenant != args.key.tenant) {
      return Finish(c, absl::InvalidArgumentError(
                           "parent.tenant must equal key.tenant (a chain never crosses tenants)"));
    }
    if (parent->end_position >= args.key.end_position) {
      return Finish(c, absl::InvalidArgumentError(absl::StrCat(
                           "parent.end_position (", parent->end_position,
                           ") must be below key.end_position (", args.key.end_position, ")")));
    }
    args.parent = std::move(*parent);
  }
  if (request->sequence_id().size() > kMaxSequenceIdBytes) {
    return Finish(c, absl::InvalidArgumentError(absl::StrCat(
                         "sequence_id is ", request->sequence_id().size(), " bytes long; at most ",
                         kMaxSequenceIdBytes)));
  }
  if (request->data().empty()) {
    return Finish(c, absl::InvalidArgumentError("data is empty (a block has at least one byte)"));
  }
  args.sequence_id = request->sequence_id();
  args.data = request->data();
  args.crc32c = request->crc32c();
  absl::StatusOr<bool> stored = store_.Put(args);
  if (!stored.ok()) return Finish(c, stored.status());
  response->set_stored(*stored);
  return Finish(c, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvStoreService::GetBlock(grpc::CallbackServerContext* c,
                                                   const expertmesh::v1::GetBlockRequest* request,
                                                   expertmesh::v1::GetBlockResponse* response) {
  absl::StatusOr<BlockRef> key = CheckKey(request->has_key(), request->key(), "key");
  if (!key.ok()) return Finish(c, key.status());
  absl::StatusOr<GotBlock> block = store_.Get(*key);
  if (!block.ok()) return Finish(c, block.status());
  response->set_data(*block->data);
  response->set_crc32c(block->crc32c);
  response->set_tier(block->tier);
  return Finish(c, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvStoreService::HasPrefix(grpc::CallbackServerContext* c,
                                                    const expertmesh::v1::HasPrefixRequest* request,
                                                    expertmesh::v1::HasPrefixResponse* response) {
  absl::StatusOr<BlockRef> key = CheckKey(request->has_key(), request->key(), "key");
  if (!key.ok()) return Finish(c, key.status());
  response->set_present(store_.HasChain(*key));
  return Finish(c, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvStoreService::LookupPrefix(
    grpc::CallbackServerContext* c, const expertmesh::v1::LookupPrefixRequest* request,
    expertmesh::v1::LookupPrefixResponse* response) {
  if (absl::Status s = CheckTenant(request->tenant(), "tenant"); !s.ok()) return Finish(c, s);
  if (request->chain_hashes_size() > kMaxLookupHashes) {
    return Finish(c, absl::InvalidArgumentError(absl::StrCat(
                         "chain_hashes has ", request->chain_hashes_size(), " entries; at most ",
                         kMaxLookupHashes)));
  }
  std::vector<BlockRef> matched = store_.LookupPrefix(
      request->tenant(),
      absl::MakeConstSpan(request->chain_hashes().data(), request->chain_hashes_size()));
  response->set_matched_blocks(static_cast<uint32_t>(matched.size()));
  for (const BlockRef& ref : matched) ToProto(ref, response->add_keys());
  return Finish(c, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvStoreService::DeleteSequence(
    grpc::CallbackServerContext* c, const expertmesh::v1::DeleteSequenceRequest* request,
    expertmesh::v1::DeleteSequenceResponse* response) {
  if (absl::Status s = CheckTenant(request->tenant(), "tenant"); !s.ok()) return Finish(c, s);
  if (request->sequence_id().empty()) {
    return Finish(c, absl::InvalidArgumentError("sequence_id is required"));
  }
  response->set_freed_blocks(store_.DeleteSequence(request->tenant(), request->sequence_id()));
  return Finish(c, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvStoreService::Stats(grpc::CallbackServerContext* c,
                                                const expertmesh::v1::KvStatsRequest*,
                                                expertmesh::v1::KvStatsResponse* response) {
  for (const TierUsage& u : store_.Usage()) {
    expertmesh::v1::TierStats* t = response->add_tiers();
    t->set_tier(u.tier);
    t->set_blocks(u.blocks);
    t->set_bytes(u.bytes);
    t->set_capacity_bytes(u.capacity_bytes);
    t->set_hits(u.hits);
    t->set_misses(u.misses);
    t->set_evictions(u.evictions);
  }
  return Finish(c, absl::OkStatus());
}

}  // namespace expertmesh::kv_store
