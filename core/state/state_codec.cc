#include "core/state/state_codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/base/hash.h"
#include "core/kernels/matmul.h"
#include "core/model/quantize.h"

namespace expertmesh::state {
namespace {

using model::BlockState;
using model::CompressorState;
using model::ModelConfig;
using model::SequenceState;

constexpr char kMagic[4] = {'E', 'M', 'S', 'T'};
constexpr uint8_t kRawBlock = 0xFF;  // exponent byte meaning "float32 values follow"

// The checksum's FNV-1a starts from this basis, not the published 14695981039346656037 (a digit
// short): version-1 blobs were written with it, so it stays part of the format.
constexpr uint64_t kChecksumBasis = 1469598103934665603ull;

uint64_t Checksum(const char* p, size_t n) {
  return base::Fnv1a64(std::string_view(p, n), kChecksumBasis);
}

class Writer {
 public:
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U32(uint32_t v) { Raw(&v, 4); }
  void I64(int64_t v) { Raw(&v, 8); }
  void F32(const float* v, size_t n) { Raw(v, n * 4); }
  void Raw(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  std::string& out() { return out_; }

  // FP8 blocks of 64 (codes + exponent byte each), exact for QAT-rounded values; a block that
  // is not exactly representable is stored raw.
  void Fp8Blocks(const float* x, int n) {
    for (int b = 0; b < n; b += model::kFp8Block) {
      const int len = std::min(model::kFp8Block, n - b);
      std::vector<uint8_t> codes(len);
      int k = 0;
      if (EncodeBlock(x + b, len, model::kFp8Max, 1e-4f, false, codes.data(), &k)) {
        U8(static_cast<uint8_t>(k + 127));
        Raw(codes.data(), len);
      } else {
        U8(kRawBlock);
        F32(x + b, len);
      }
    }
  }
  // FP4 blocks of 32: exponent byte, then len/2 bytes (two codes, low nibble first).
  void Fp4Blocks(const float* x, int n) {
    for (int b = 0; b < n; b += model::kFp4Block) {
      const int len = std::min(model::kFp4Block, n - b);
      std::vector<uint8_t> codes(len);
      int k = 0;
      if (EncodeBlock(x + b, len, model::kFp4Max, 6.0f * 0x1p-126f, true, codes.data(), &k)) {
        U8(static_cast<uint8_t>(k + 127));
        for (int i = 0; i < len; i += 2) {
          U8(static_cast<uint8_t>(codes[i] | ((i + 1 < len ? codes[i + 1] : 0) << 4)));
        }
      } else {
        U8(kRawBlock);
        F32(x + b, len);
      }
    }
  }

 private:
  static bool EncodeBlock(const float* x, int len, float qmax, float floor, bool fp4,
                          uint8_t* codes, int* k_out) {
    float amax = 0;
    for (int i = 0; i < len; ++i) amax = std::max(amax, std::fabs(x[i]));
    const int k0 = model::BlockScaleExponent(amax, qmax, floor);
    // Rounding up to a power of two can lower the exponent by one; both decode exactly.
    for (int k : {k0, k0 + 1}) {
      if (k + 127 < 0 || k + 127 >= kRawBlock) continue;
      bool ok = true;
      for (int i = 0; i < len && ok; ++i) {
        const float v = std::ldexp(x[i], -k);
        ok = fp4 ? model::EncodeE2M1(v, &codes[i]) : model::EncodeE4M3(v, &codes[i]);
        if (ok && std::ldexp(v, k) != x[i]) ok = false;
      }
      if (ok) {
        *k_out = k;
        return true;
      }
    }
    return false;
  }

  std::string out_;
};

class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}
  bool ok() const { return ok_; }
  bool done() const { return pos_ == in_.size(); }
  uint8_t U8() {
    uint8_t v = 0;
    Raw(&v, 1);
    return v;
  }
  uint32_t U32() {
    uint32_t v = 0;
    Raw(&v, 4);
    return v;
  }
  int64_t I64() {
    int64_t v = 0;
    Raw(&v, 8);
    return v;
  }
  void F32(float* v, size_t n) { Raw(v, n * 4); }
  void Raw(void* p, size_t n) {
    if (!ok_ || in_.size() - pos_ < n) {
      ok_ = false;
      return;
    }
    std::memcpy(p, in_.data() + pos_, n);
    pos_ += n;
  }
  void Fp8Blocks(float* x, int n) {
    for (int b = 0; b < n && ok_; b += model::kFp8Block) {
      const int len = std::min(model::kFp8Block, n - b);
      const uint8_t e = U8();
      if (e == kRawBlock) {
        F32(x + b, len);
        continue;
      }
      for (int i = 0; i < len; ++i) {
        x[b + i] = std::ldexp(kernels::DecodeE4M3(U8()), static_cast<int>(e) - 127);
      }
    }
  }
  void Fp4Blocks(float* x, int n) {
    for (int b = 0; b < n && ok_; b += model::kFp4Block) {
      const int len = std::min(model::kFp4Block, n - b);
      const uint8_t e = U8();
      if (e == kRawBlock) {
        F32(x + b, len);
        continue;
      }
      for (int i = 0; i < len; i += 2) {
        const uint8_t byte = U8();
        x[b + i] = std::ldexp(kernels::DecodeE2M1(byte & 0xF), static_cast<int>(e) - 127);
        if (i + 1 < len) {
          x[b + i + 1] = std::ldexp(kernels::DecodeE2M1(byte >> 4), static_cast<int>(e) - 127);
        }
      }
    }
  }

 private:
  std::string_view in_;
  size_t pos_ = 0;
  bool ok_ = true;
};

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
    auto kv = [&](const float* v) {
      w.Fp8Blocks(v, d - r);
      w.F32(v + d - r, r);
    };
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
  const uint64_t sum = Checksum(w.out().data(), w.out().size());
  w.Raw(&sum, 8);
  return std::move(w.out());
}

absl::StatusOr<SequenceState> DeserializeState(const ModelConfig& c, std::string_view bytes) {
  if (bytes.size() < 16 || std::memcmp(bytes.data(), kMagic, 4) != 0) {
    return absl::InvalidArgumentError("sequence state: bad magic (not a state blob)");
  }
  uint64_t sum = 0;
  std::memcpy(&sum, bytes.data() + bytes.size() - 8, 8);
  if (sum != Checksum(bytes.data(), bytes.size() - 8)) {
    return absl::InvalidArgumentError("sequence state: checksum mismatch (corrupted bytes)");
  }
  Reader r(bytes.substr(0, bytes.size() - 8));
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
    auto kv = [&](float* v) {
      r.Fp8Blocks(v, d - rd);
      r.F32(v + d - rd, rd);
    };
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
