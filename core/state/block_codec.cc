#include "core/state/block_codec.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/base/hash.h"
#include "core/state/codes.h"
#include "core/state/crc32c.h"

namespace expertmesh::state {
namespace {

using internal::Reader;
using internal::Writer;
using model::BlockState;
using model::CompressorState;
using model::ModelConfig;
using model::SequenceState;

constexpr char kMagic[4] = {'E', 'M', 'B', 'K'};
constexpr uint32_t kFlagMtp = 1;
// Offset of the CRC field: the last 4 header bytes.
constexpr size_t kCrcOffset = kBlockHeaderBytes - 4;

// Domain tags keep the three uses of the hash apart (a tenant string can never be read as a
// block of tokens, nor a config as either).
constexpr uint64_t kDomainModel = 0x656d2d6d6f64656cull;  // "em-model"
constexpr uint64_t kDomainSeed = 0x656d2d7365656421ull;   // "em-seed!"
constexpr uint64_t kDomainBlock = 0x656d2d626c6f636bull;  // "em-block"

// One absorb step: a bijection of the word for a fixed state, so inputs that differ in one
// word never collide, and Mix64 spreads every input bit over the whole state.
uint64_t Absorb(uint64_t h, uint64_t w) { return base::Mix64((h ^ w) + base::kSplitMix64Gamma); }

uint64_t AbsorbBytes(uint64_t h, std::string_view b) {
  size_t i = 0;
  for (; i + 8 <= b.size(); i += 8) {
    uint64_t w = 0;
    for (int j = 7; j >= 0; --j) w = (w << 8) | static_cast<uint8_t>(b[i + j]);
    h = Absorb(h, w);
  }
  if (i < b.size()) {
    uint64_t w = 0;
    for (size_t j = b.size(); j-- > i;) w = (w << 8) | static_cast<uint8_t>(b[j]);
    h = Absorb(h, w);
  }
  return Absorb(h, b.size());  // the length ends the input: "a" and "a\0" differ
}

// Which parts of layer `b` block [S, E) holds.
struct LayerPlan {
  int ratio = 0;
  int64_t win_lo = 0, win_hi = 0;  // window positions [win_lo, win_hi)
  int64_t ent_lo = 0, ent_hi = 0;  // compressed entries (ratio > 0)
  int64_t key_lo = 0, key_hi = 0;  // indexer keys (ratio == 4)
  int filled = 0;                  // pending rows of the current window at E
  bool overlap = false;            // ratio 4 with a completed window: prev rows carried
};

LayerPlan Plan(const ModelConfig& c, int b, int64_t S, int64_t E) {
  LayerPlan p;
  p.ratio = c.CompressRatio(b);
  p.win_lo = std::max(S, E - c.sliding_window);
  p.win_hi = E;
  if (p.ratio > 0) {
    p.ent_lo = S / p.ratio;
    p.ent_hi = E / p.ratio;
    p.filled = static_cast<int>(E % p.ratio);
    p.overlap = p.ratio == 4 && E >= p.ratio;
  }
  if (p.ratio == 4) {
    p.key_lo = S / 4;
    p.key_hi = E / 4;
  }
  return p;
}

// Rows a compressor carries across E: the current window's filled rows (whole), then for the
// overlap the previous window's rows, of which only the first halves are ever read (the entry
// after E pools window m-1's A halves, MODEL.md Compressor).
void WritePending(Writer& w, const CompressorState& cs, const LayerPlan& p) {
  w.F32(cs.a.data(), static_cast<size_t>(p.filled) * cs.row);
  w.F32(cs.g.data(), static_cast<size_t>(p.filled) * cs.row);
  if (p.overlap) {
    const int half = cs.row / 2;
    for (int s = 0; s < cs.ratio; ++s) w.F32(&cs.prev_a[s * cs.row], half);
    for (int s = 0; s < cs.ratio; ++s) w.F32(&cs.prev_g[s * cs.row], half);
  }
}

int64_t PendingBytes(int ratio, int width, const LayerPlan& p) {
  const int64_t row = (ratio == 4 ? 2 : 1) * int64_t{width};
  return 4 * (2 * p.filled * row + (p.overlap ? 2 * ratio * (row / 2) : 0));
}

// The decoded rows of one compressor, applied only once the whole block parsed.
struct PendingDelta {
  std::vector<float> a, g, prev_a, prev_g;
};

void ReadPending(Reader& r, const CompressorState& shape, const LayerPlan& p, PendingDelta& d) {
  d.a.resize(static_cast<size_t>(p.filled) * shape.row);
  d.g.resize(d.a.size());
  r.F32(d.a.data(), d.a.size());
  r.F32(d.g.data(), d.g.size());
  if (p.overlap) {
    d.prev_a.resize(static_cast<size_t>(shape.ratio) * (shape.row / 2));
    d.prev_g.resize(d.prev_a.size());
    r.F32(d.prev_a.data(), d.prev_a.size());
    r.F32(d.prev_g.data(), d.prev_g.size());
  }
}

void CommitPending(const PendingDelta& d, const LayerPlan& p, CompressorState& cs) {
  std::copy(d.a.begin(), d.a.end(), cs.a.begin());
  std::copy(d.g.begin(), d.g.end(), cs.g.begin());
  if (p.overlap) {
    const int half = cs.row / 2;
    for (int s = 0; s < cs.ratio; ++s) {
      std::copy_n(&d.prev_a[s * half], half, &cs.prev_a[s * cs.row]);
      std::copy_n(&d.prev_g[s * half], half, &cs.prev_g[s * cs.row]);
    }
  }
}

struct LayerDelta {
  LayerPlan plan;
  std::vector<float> window, entries, keys;
  PendingDelta pending, index_pending;
};

// The state's vectors have the sizes SequenceState::Create gives `c` (the compressed entries and
// keys may be of any length; callers check those against positions).
absl::Status CheckShape(const ModelConfig& c, const SequenceState& s) {
  if (static_cast<int>(s.blocks.size()) != c.NumBlocks()) {
    return absl::InvalidArgumentError(absl::StrCat("state has ", s.blocks.size(),
                                                   " layers, the model ", c.NumBlocks()));
  }
  const size_t d = c.head_dim;
  for (int b = 0; b < c.NumBlocks(); ++b) {
    const BlockState& bs = s.blocks[b];
    const int ratio = c.CompressRatio(b);
    const auto rows = [&](const CompressorState& cs, int width) {
      const size_t row = (ratio == 4 ? 2 : 1) * static_cast<size_t>(width);
      const size_t n = static_cast<size_t>(ratio) * row;
      return cs.ratio == ratio && cs.row == static_cast<int>(row) && cs.a.size() == n &&
             cs.g.size() == n && cs.prev_a.size() == (ratio == 4 ? n : 0) &&
             cs.prev_g.size() == cs.prev_a.size();
    };
    bool ok = bs.ratio == ratio && bs.window.size() == c.sliding_window * d;
    if (ratio > 0) ok = ok && rows(bs.compressor, c.head_dim);
    if (ratio == 4) ok = ok && rows(bs.index_compressor, c.index_head_dim);
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat("state layer ", b, " has another shape"));
    }
  }
  return absl::OkStatus();
}

// Whether layer `b` at position P still holds all of block [S, E) (see EncodeBlock).
bool Holds(const ModelConfig& c, const BlockState& bs, const LayerPlan& p, int64_t P, int64_t E) {
  if (P < E) return false;
  if (P - c.sliding_window > p.win_lo) return false;  // ring slots overwritten since E
  if (p.ratio > 0) {
    if (P / p.ratio != E / p.ratio) return false;  // pending rows of E replaced
    if (static_cast<int64_t>(bs.compressed.size()) < p.ent_hi * c.head_dim) return false;
  }
  if (p.ratio == 4 && static_cast<int64_t>(bs.index_keys.size()) < p.key_hi * c.index_head_dim) {
    return false;
  }
  return true;
}

void PutHeader(std::string& out, uint32_t flags, uint32_t block_index, uint64_t fingerprint,
               uint64_t payload_bytes) {
  Writer w;
  w.Raw(kMagic, 4);
  w.U32(kBlockFormatVersion);
  w.U32(flags);
  w.U32(block_index);
  w.U32(kBlockTokens);
  w.U64(fingerprint);
  w.U64(payload_bytes);
  std::memcpy(out.data(), w.out().data(), kCrcOffset);
}

}  // namespace

uint64_t ModelFingerprint(const ModelConfig& config, std::string_view weights_id) {
  uint64_t h = Absorb(kDomainModel, kBlockFormatVersion);
  h = Absorb(h, kNumericsVersion);
  h = AbsorbBytes(h, model::ModelConfigToJson(config));
  return AbsorbBytes(h, weights_id);
}

uint64_t ChainSeed(std::string_view tenant, uint64_t fingerprint) {
  return AbsorbBytes(Absorb(kDomainSeed, fingerprint), tenant);
}

uint64_t NextChainHash(uint64_t prev, std::span<const int32_t> tokens) {
  uint64_t h = Absorb(prev, kDomainBlock);
  size_t i = 0;
  for (; i + 2 <= tokens.size(); i += 2) {
    h = Absorb(h, static_cast<uint32_t>(tokens[i]) |
                      (uint64_t{static_cast<uint32_t>(tokens[i + 1])} << 32));
  }
  if (i < tokens.size()) h = Absorb(h, static_cast<uint32_t>(tokens[i]));
  return Absorb(h, tokens.size());
}

std::vector<uint64_t> BlockChainHashes(std::string_view tenant, uint64_t fingerprint,
                                       std::span<const int32_t> tokens) {
  std::vector<uint64_t> out;
  uint64_t h = ChainSeed(tenant, fingerprint);
  for (size_t b = 0; b + kBlockTokens <= tokens.size(); b += kBlockTokens) {
    h = NextChainHash(h, tokens.subspan(b, kBlockTokens));
    out.push_back(h);
  }
  return out;
}

absl::StatusOr<BlockHeader> VerifyBlock(std::string_view block) {
  if (block.size() < kBlockHeaderBytes) {
    return absl::DataLossError(
        absl::StrCat("state block: ", block.size(), " bytes, shorter than its header"));
  }
  Reader r(block.substr(0, kBlockHeaderBytes));
  char magic[4];
  r.Raw(magic, 4);
  BlockHeader h;
  h.version = r.U32();
  const uint32_t flags = r.U32();
  h.block_index = r.U32();
  h.token_count = r.U32();
  h.fingerprint = r.U64();
  h.payload_bytes = r.U64();
  h.crc32c = r.U32();
  h.has_mtp = (flags & kFlagMtp) != 0;
  const uint32_t crc =
      Crc32cExtend(Crc32c(block.substr(0, kCrcOffset)), block.substr(kBlockHeaderBytes));
  if (crc != h.crc32c) {
    return absl::DataLossError("state block: CRC32C mismatch (corrupted block)");
  }
  if (std::memcmp(magic, kMagic, 4) != 0) {
    return absl::InvalidArgumentError("state block: bad magic (not a state block)");
  }
  if (h.version != kBlockFormatVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("state block: unsupported format version ", h.version));
  }
  if (h.payload_bytes != block.size() - kBlockHeaderBytes) {
    return absl::DataLossError(absl::StrCat("state block: payload is ",
                                            block.size() - kBlockHeaderBytes,
                                            " bytes, the header says ", h.payload_bytes));
  }
  if (h.token_count != kBlockTokens || (flags & ~kFlagMtp) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("state block: token_count ", h.token_count, " / flags ", flags,
                     " not of format version ", kBlockFormatVersion));
  }
  return h;
}

absl::StatusOr<std::string> EncodeBlock(const ModelConfig& c, uint64_t fingerprint,
                                        const SequenceState& s, uint32_t block_index,
                                        std::span<const int32_t> block_tokens) {
  if (block_tokens.size() != kBlockTokens) {
    return absl::InvalidArgumentError(absl::StrCat("EncodeBlock: block_tokens has ",
                                                   block_tokens.size(), " ids, not ",
                                                   kBlockTokens));
  }
  if (absl::Status st = CheckShape(c, s); !st.ok()) return st;
  const int64_t S = int64_t{block_index} * kBlockTokens, E = S + kBlockTokens;
  const int L = c.num_hidden_layers;
  for (int b = 0; b < L; ++b) {
    if (!Holds(c, s.blocks[b], Plan(c, b, S, E), s.position, E)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "EncodeBlock: block ", block_index, " is tokens [", S, ", ", E, "), the state is at ",
          s.position, " (layer ", b, " no longer or not yet holds them)"));
    }
  }
  bool mtp = c.NumBlocks() > L;
  for (int b = L; b < c.NumBlocks() && mtp; ++b) {
    mtp = Holds(c, s.blocks[b], Plan(c, b, S, E), s.mtp_position, E);
  }
  const int d = c.head_dim, r = c.qk_rope_head_dim, Id = c.index_head_dim, W = c.sliding_window;
  Writer w;
  w.Raw(std::string(kBlockHeaderBytes, '\0').data(), kBlockHeaderBytes);
  w.Raw(block_tokens.data(), block_tokens.size() * 4);
  for (int b = 0; b < (mtp ? c.NumBlocks() : L); ++b) {
    const BlockState& bs = s.blocks[b];
    const LayerPlan p = Plan(c, b, S, E);
    for (int64_t q = p.win_lo; q < p.win_hi; ++q) w.Kv(&bs.window[(q % W) * d], d, r);
    if (p.ratio > 0) {
      for (int64_t m = p.ent_lo; m < p.ent_hi; ++m) w.Kv(&bs.compressed[m * d], d, r);
      WritePending(w, bs.compressor, p);
    }
    if (p.ratio == 4) {
      for (int64_t m = p.key_lo; m < p.key_hi; ++m) w.Fp4Blocks(&bs.index_keys[m * Id], Id);
      WritePending(w, bs.index_compressor, p);
    }
  }
  std::string out = std::move(w.out());
  PutHeader(out, mtp ? kFlagMtp : 0, block_index, fingerprint, out.size() - kBlockHeaderBytes);
  const uint32_t crc = Crc32cExtend(Crc32c(std::string_view(out).substr(0, kCrcOffset)),
                                    std::string_view(out).substr(kBlockHeaderBytes));
  std::memcpy(out.data() + kCrcOffset, &crc, 4);
  return out;
}

absl::Status ApplyBlock(const ModelConfig& c, uint64_t fingerprint, std::string_view block,
                        SequenceState* s, std::span<const int32_t> expect_tokens) {
  absl::StatusOr<BlockHeader> h = VerifyBlock(block);
  if (!h.ok()) return h.status();
  if (h->fingerprint != fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        "state block: model fingerprint ", h->fingerprint, " is not this model's ", fingerprint));
  }
  if (absl::Status st = CheckShape(c, *s); !st.ok()) return st;
  const int64_t S = h->begin(), E = h->end();
  if (s->position != S) {
    return absl::FailedPreconditionError(absl::StrCat("state block ", h->block_index,
                                                      " starts at token ", S,
                                                      ", the state is at ", s->position));
  }
  const int L = c.num_hidden_layers;
  const int layers = h->has_mtp ? c.NumBlocks() : L;
  const bool apply_mtp = h->has_mtp && s->mtp_position == S;
  const int d = c.head_dim, r = c.qk_rope_head_dim, Id = c.index_head_dim;

  Reader rd(block.substr(kBlockHeaderBytes));
  std::vector<int32_t> tokens(kBlockTokens);
  rd.Raw(tokens.data(), tokens.size() * 4);
  std::vector<LayerDelta> delta(layers);
  for (int b = 0; b < layers && rd.ok(); ++b) {
    LayerDelta& ld = delta[b];
    const LayerPlan& p = ld.plan = Plan(c, b, S, E);
    const BlockState& bs = s->blocks[b];
    ld.window.resize((p.win_hi - p.win_lo) * d);
    for (int64_t q = 0; q < p.win_hi - p.win_lo; ++q) rd.Kv(&ld.window[q * d], d, r);
    if (p.ratio > 0) {
      ld.entries.resize((p.ent_hi - p.ent_lo) * d);
      for (int64_t m = 0; m < p.ent_hi - p.ent_lo; ++m) rd.Kv(&ld.entries[m * d], d, r);
      ReadPending(rd, bs.compressor, p, ld.pending);
    }
    if (p.ratio == 4) {
      ld.keys.resize((p.key_hi - p.key_lo) * Id);
      for (int64_t m = 0; m < p.key_hi - p.key_lo; ++m) rd.Fp4Blocks(&ld.keys[m * Id], Id);
      ReadPending(rd, bs.index_compressor, p, ld.index_pending);
    }
  }
  if (!rd.ok() || !rd.done()) {
    return absl::DataLossError(absl::StrCat("state block ", h->block_index,
                                            ": payload does not match the model's layout"));
  }
  if (!expect_tokens.empty() &&
      !std::equal(expect_tokens.begin(), expect_tokens.end(), tokens.begin(), tokens.end())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "state block ", h->block_index, ": its token ids differ from the expected ones"));
  }
  // The state must be exactly "after blocks 0..k-1" in what appends (entries, keys).
  for (int b = 0; b < (apply_mtp ? layers : L); ++b) {
    const LayerPlan& p = delta[b].plan;
    const BlockState& bs = s->blocks[b];
    if ((p.ratio > 0 && static_cast<int64_t>(bs.compressed.size()) != p.ent_lo * d) ||
        (p.ratio == 4 && static_cast<int64_t>(bs.index_keys.size()) != p.key_lo * Id)) {
      return absl::FailedPreconditionError(
          absl::StrCat("state block ", h->block_index, ": layer ", b,
                       " of the state does not end at token ", S));
    }
  }

  const int W = c.sliding_window;
  for (int b = 0; b < (apply_mtp ? layers : L); ++b) {
    LayerDelta& ld = delta[b];
    const LayerPlan& p = ld.plan;
    BlockState& bs = s->blocks[b];
    for (int64_t q = p.win_lo; q < p.win_hi; ++q) {
      std::copy_n(&ld.window[(q - p.win_lo) * d], d, &bs.window[(q % W) * d]);
    }
    if (p.ratio > 0) {
      bs.compressed.insert(bs.compressed.end(), ld.entries.begin(), ld.entries.end());
      CommitPending(ld.pending, p, bs.compressor);
    }
    if (p.ratio == 4) {
      bs.index_keys.insert(bs.index_keys.end(), ld.keys.begin(), ld.keys.end());
      CommitPending(ld.index_pending, p, bs.index_compressor);
    }
  }
  s->position = E;
  if (apply_mtp) s->mtp_position = E;
  return absl::OkStatus();
}

BlockBytes BlockSize(const ModelConfig& c, uint32_t block_index, bool with_mtp) {
  const int64_t S = int64_t{block_index} * kBlockTokens, E = S + kBlockTokens;
  const int64_t kv = internal::KvBytes(c.head_dim, c.qk_rope_head_dim);
  const int64_t key = internal::Fp4Bytes(c.index_head_dim);
  BlockBytes out;
  out.header = kBlockHeaderBytes + 4 * kBlockTokens;
  for (int b = 0; b < (with_mtp ? c.NumBlocks() : c.num_hidden_layers); ++b) {
    const LayerPlan p = Plan(c, b, S, E);
    out.window += (p.win_hi - p.win_lo) * kv;
    if (p.ratio > 0) {
      out.compressed += (p.ent_hi - p.ent_lo) * kv;
      out.pending += PendingBytes(p.ratio, c.head_dim, p);
    }
    if (p.ratio == 4) {
      out.index_keys += (p.key_hi - p.key_lo) * key;
      out.pending += PendingBytes(p.ratio, c.index_head_dim, p);
    }
  }
  return out;
}

}  // namespace expertmesh::state
