// The kv-store's unit: a sequence's state as a chain of 128-token blocks (docs/state_format.md,
// Blocks). Block k holds what the sequence's state gained over tokens [128k, 128k + 128): per
// layer (trunk, then MTP) the sliding-window KV of those positions, the compressed entries and
// indexer keys completed in them, and the compressors' pending rows at the block's end, all in
// the model's exact codes. A state rebuilt by applying blocks 0..k to a fresh state continues
// with logits bit-identical to the uninterrupted sequence at position 128(k+1): the window is
// inside the blocks, so a prefix hit from another request is as good as the original state.
//
// Keys: a chain hash per block, h_k = H(h_{k-1}, tokens of block k), seeded by the tenant and a
// fingerprint of the model, so the same prefix under another tenant, model or numerics version
// never matches. Every block also carries its own token ids, which ApplyBlock can check, so a
// hash collision is caught rather than served.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model/config.h"
#include "core/model/sequence_state.h"

namespace expertmesh::state {

inline constexpr int kBlockTokens = 128;
inline constexpr uint32_t kBlockFormatVersion = 1;
// Bump when the engine's arithmetic changes in a way that changes any state value (a kernel's
// summation order, a rounding): blocks written by the old engine then stop matching, because a
// state from other numerics would not continue bit-identically. The disk tier outlives upgrades.
inline constexpr uint32_t kNumericsVersion = 1;

// A 64-bit fingerprint of everything that decides a state's bytes besides the tokens: the
// config (every field, via its canonical JSON), kBlockFormatVersion, kNumericsVersion, and
// `weights_id`, which names the weights (two checkpoints of one shape give different states;
// the caller passes e.g. the served model's name and revision).
uint64_t ModelFingerprint(const model::ModelConfig& config, std::string_view weights_id = {});

// h_{-1}: the chain's seed for (tenant, fingerprint).
uint64_t ChainSeed(std::string_view tenant, uint64_t fingerprint);
// h_k from h_{k-1} and block k's token ids (any count; blocks have kBlockTokens).
uint64_t NextChainHash(uint64_t prev, std::span<const int32_t> block_tokens);
// h_0, h_1, ... for every full block of `tokens` (a trailing partial block gets none).
std::vector<uint64_t> BlockChainHashes(std::string_view tenant, uint64_t fingerprint,
                                       std::span<const int32_t> tokens);

// What a block's header says (after its CRC32C was verified).
struct BlockHeader {
  uint32_t version = 0;
  uint32_t block_index = 0;  // k: tokens [128k, 128k + token_count)
  uint32_t token_count = 0;  // always kBlockTokens in this version
  bool has_mtp = false;      // whether the MTP layers' part is present
  uint64_t fingerprint = 0;
  uint64_t payload_bytes = 0;
  uint32_t crc32c = 0;  // of the header's other bytes and the payload
  int64_t begin() const { return int64_t{block_index} * kBlockTokens; }
  int64_t end() const { return begin() + token_count; }
};

inline constexpr size_t kBlockHeaderBytes = 40;

// Verifies the block's CRC32C and reads its header; needs no model (the kv-store calls it on
// every put and read). Errors: DataLoss for anything a corruption can cause (short block, CRC
// mismatch, length mismatch); InvalidArgument for a sound block of another format (magic,
// version).
absl::StatusOr<BlockHeader> VerifyBlock(std::string_view block);

// Encodes block `block_index` of `s`, whose token ids (kBlockTokens of them) are
// `block_tokens`. `s` must be at the block's end or past it while the ring and the compressors
// still hold the block's data (with the V4 window of 128: exactly at the end; call it when the
// sequence crosses the boundary). The MTP layers are included when mtp_position is at the
// block's end too (a worker that runs the MTP head feeds it right after sampling, so both are);
// otherwise the block has the trunk only. Errors: FailedPrecondition naming what is missing,
// InvalidArgument for a state of another shape or a token count != kBlockTokens.
absl::StatusOr<std::string> EncodeBlock(const model::ModelConfig& config, uint64_t fingerprint,
                                        const model::SequenceState& s, uint32_t block_index,
                                        std::span<const int32_t> block_tokens);

// Applies block k to `s`, which must be the state after blocks 0..k-1 (or a fresh state for
// k = 0): afterwards s->position = 128(k+1); mtp_position too if the block has the MTP part and
// the state's MTP was at 128k, else the MTP layers stay as they were (the caller sees it in
// mtp_position). If `expect_tokens` is not empty it must equal the block's token ids.
// Errors (s is unchanged on every error): DataLoss as VerifyBlock, or a payload that does not
// parse (drop the block and recompute); FailedPrecondition for a block of another model
// (fingerprint), a state not at 128k, or tokens different from `expect_tokens`;
// InvalidArgument for a state of another shape.
absl::Status ApplyBlock(const model::ModelConfig& config, uint64_t fingerprint,
                        std::string_view block, model::SequenceState* s,
                        std::span<const int32_t> expect_tokens = {});

// Bytes of block `block_index` as EncodeBlock writes it for engine-produced values, computed
// from the config alone (no state): for capacity planning and docs/state_format.md.
struct BlockBytes {
  int64_t header = 0;      // header + token ids
  int64_t window = 0;      // sliding-window KV of the block's positions
  int64_t compressed = 0;  // compressed entries completed in the block
  int64_t index_keys = 0;  // indexer keys completed in the block
  int64_t pending = 0;     // compressor rows carried across the block's end (ratio-4 overlap,
                           // partial windows of ratios that do not divide 128)
  int64_t total() const { return header + window + compressed + index_keys + pending; }
};
BlockBytes BlockSize(const model::ModelConfig& config, uint32_t block_index, bool with_mtp = true);

}  // namespace expertmesh::state
