// Serialization of a sequence's inference state (model::SequenceState) to bytes and back, for
// the kv-store and for moving a sequence between workers. The byte format (docs/state_format.md)
// is versioned and checksummed; KV values are stored as their exact FP8 / FP4 codes plus one
// exponent byte per block, so a restored sequence continues with bit-identical logits.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "core/model/config.h"
#include "core/model/sequence_state.h"

namespace expertmesh::state {

// 2: CRC32C trailer (1 had FNV-1a 64; nothing stored version 1 durably, so it is not read).
inline constexpr uint32_t kStateFormatVersion = 2;

// Encodes `s` (shaped for `config`). Thread-compatible (reads s).
std::string SerializeState(const model::ModelConfig& config, const model::SequenceState& s);

// Decodes bytes written by SerializeState for the same model shape. Errors: DataLoss for a
// CRC32C mismatch (corrupted bytes: recompute, never use); InvalidArgument, saying what is wrong,
// for bad magic, an unsupported version, a model shape that differs from `config` (naming the
// field), truncated or trailing bytes.
absl::StatusOr<model::SequenceState> DeserializeState(const model::ModelConfig& config,
                                                      std::string_view bytes);

}  // namespace expertmesh::state
