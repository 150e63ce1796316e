#include "core/state/state_codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/state/codes.h"
#include "core/state/crc32c.h"

namespace expertmesh::state {
namespace {

using model::BlockState;
using model::CompressorState;
using model::ModelConfig;
using model::SequenceState;

constexpr char kMagic[4] = {'E', 'M', 'S', 'T'};

using internal::Reader;
using internal::Writer;

// The shape fields written in the header, in order, with their names for errors.
std::vector<std::pair<const char*, uint32_t>> Shape(const ModelConfig& c) {
  std::vector<std::pair<const char*, uint32_t>> s = {
      {"num_blocks", static_cast<uint32_t>(c.NumBlocks())},
      {"head_dim", static_cast<uint32_t>(c.head_dim)},
      {"qk_rope_head_dim", static_cast<uint32_t>(c.qk_rope_head_dim)},
      {"sliding_window", static_cast<uint32_t>(c.sliding_window)},
      {"index_head_dim", static_cast<uint32_t>(c.index_head_dim)},
  };
  for (int b = 0; b < c.NumBlocks(); ++b) {
    s.push_back({"compress_ratios", static_cast<uint32_t>(c.CompressRatio(b))});
  }
  return s;
}

int64_t BlockPosition(const ModelConfig& c, const SequenceState& s, int b) {
  return b < c.num_hidden_layers ? s.position : s.mtp_position;
}

// Pending compressor rows: the filled slots of the current window, then (overlap, once a
// window completed) the previous window.
void WritePending(Writer& w, const CompressorState& cs, int64_t pos) {
  const int filled = static_cast<int>(pos % cs.ratio);
  w.F32(cs.a.data(), static_cast<size_t>(filled) * cs.row);
  w.F32(cs.g.data(), static_cast<size_t>(filled) * cs.row);
  if (!cs.prev_a.empty() && pos >= cs.ratio) {
    w.F32(cs.prev_a.data(), cs.prev_a.size());
    w.F32(cs.prev_g.data(), cs.prev_g.size());
  }
}

void ReadPending(Reader& r, CompressorState& cs, int64_t pos) {
  const int filled = static_cast<int>(pos % cs.ratio);
  r.F32(cs.a.data(), static_cast<size_t>(filled) * cs.row);
  r.F32(cs.g.data(), static_cast<size_t>(filled) * cs.row);
  if (!cs.prev_a.empty() && pos >= cs.ratio) {
    r.F32(cs.prev_a.data(), cs.prev_a.size());
    r.F32(cs.prev_g.data(), cs.prev_g.size());
  }
}

}  // namespace

std::string SerializeState(const ModelConfig& c, const SequenceState& s) {
  Writer w;
  w.Raw(kMagic, 4);
  w.U32(kStateFormatVersion);
  for (const auto& [name, v] : Shape(c)) w.U32(v);
  w.I64(s.position);
  w.I64(s.mtp_position);
  const int d = c.head_dim, r = c.qk_rope_head_dim, W = c.sliding_window, Id = c.index_head_dim;
  for (int b = 0; b < c.NumBlocks(); ++b) {
    const BlockState& bs = s.blocks[b];
    const int64_t pos = BlockPosition(c, s, b);
    auto kv = [&](const float* v) { w.Kv(v, d, r); };
    for (int64_t p = std::max<int64_t>(0, pos - W); p < pos; ++p) kv(&bs.window[(p % W) * d]);
    if (bs.ratio > 0) {
      for (int64_t m = 0; m < pos / bs.ratio; ++m) kv(&bs.compressed[m * d]);
      WritePending(w, bs.compressor, pos);
    }
    if (bs.ratio == 4) {
      for (int64_t m = 0; m < pos / 4; ++m) w.Fp4Blocks(&bs.index_keys[m * Id], Id);
      WritePending(w, bs.index_compressor, pos);
    }
  }
  w.U32(Crc32c(w.out()));
  return std::move(w.out());
}

absl::StatusOr<SequenceState> DeserializeState(const ModelConfig& c, std::string_view bytes) {
  if (bytes.size() < 12 || std::memcmp(bytes.data(), kMagic, 4) != 0) {
    return absl::InvalidArgumentError("sequence state: bad magic (not a state blob)");
  }
  uint32_t sum = 0;
  std::memcpy(&sum, bytes.data() + bytes.size() - 4, 4);
  if (sum != Crc32c(bytes.substr(0, bytes.size() - 4))) {
    return absl::DataLossError("sequence state: CRC32C checksum mismatch (corrupted bytes)");
  }
  Reader r(bytes.substr(0, bytes.size() - 4));
  char magic[4];
  r.Raw(magic, 4);
  const uint32_t version = r.U32();
  if (version != kStateFormatVersion) {
    return absl::InvalidArgumentError("sequence state: unsupported format version " +
                                      std::to_string(version));
  }
  for (const auto& [name, v] : Shape(c)) {
    const uint32_t got = r.U32();
    if (got != v) {
      return absl::InvalidArgumentError(std::string("sequence state: ") + name + " is " +
                                        std::to_string(got) + ", the model has " +
                                        std::to_string(v));
    }
  }
  SequenceState s = SequenceState::Create(c);
  s.position = r.I64();
  s.mtp_position = r.I64();
  if (!r.ok() || s.position < 0 || s.mtp_position < 0) {
    return absl::InvalidArgumentError("sequence state: bad positions");
  }
  const int d = c.head_dim, rd = c.qk_rope_head_dim, W = c.sliding_window, Id = c.index_head_dim;
  for (int b = 0; b < c.NumBlocks() && r.ok(); ++b) {
    BlockState& bs = s.blocks[b];
    const int64_t pos = BlockPosition(c, s, b);
    auto kv = [&](float* v) { r.Kv(v, d, rd); };
    for (int64_t p = std::max<int64_t>(0, pos - W); p < pos && r.ok(); ++p) {
      kv(&bs.window[(p % W) * d]);
    }
    if (bs.ratio > 0) {
      const int64_t n = pos / bs.ratio;
      // Every stored entry takes at least one byte, which bounds the allocation.
      if (n > static_cast<int64_t>(bytes.size())) {
        return absl::InvalidArgumentError("sequence state: truncated");
      }
      bs.compressed.resize(n * d);
      for (int64_t m = 0; m < n && r.ok(); ++m) kv(&bs.compressed[m * d]);
      ReadPending(r, bs.compressor, pos);
    }
    if (bs.ratio == 4) {
      const int64_t n = pos / 4;
      if (n > static_cast<int64_t>(bytes.size())) {
        return absl::InvalidArgumentError("sequence state: truncated");
      }
      bs.index_keys.resize(n * Id);
      for (int64_t m = 0; m < n && r.ok(); ++m) r.Fp4Blocks(&bs.index_keys[m * Id], Id);
      ReadPending(r, bs.index_compressor, pos);
    }
  }
  if (!r.ok()) return absl::InvalidArgumentError("sequence state: truncated");
  if (!r.done()) return absl::InvalidArgumentError("sequence state: trailing bytes");
  return s;
}

}  // namespace expertmesh::state
