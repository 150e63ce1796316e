// The byte encodings shared by the whole-state codec and the block codec (docs/state_format.md):
// KV vectors as FP8 codes with one exponent byte per 64 plus float32 rope dims, indexer keys as
// FP4 codes with one exponent byte per 32. Exact for the values the engine produces (they are
// QAT-rounded to those grids); a block of 64 (32) values that is not representable is written
// raw (exponent byte 0xFF, then float32), so encoding is lossless for any input.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace expertmesh::state::internal {

inline constexpr uint8_t kRawBlock = 0xFF;

class Writer {
 public:
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U32(uint32_t v) { Raw(&v, 4); }
  void U64(uint64_t v) { Raw(&v, 8); }
  void I64(int64_t v) { Raw(&v, 8); }
  void F32(const float* v, size_t n) { Raw(v, n * 4); }
  void Raw(const void* p, size_t n) {
    if (n > 0) out_.append(static_cast<const char*>(p), n);  // p may be null when n == 0
  }
  void Fp8Blocks(const float* x, int n);
  void Fp4Blocks(const float* x, int n);
  // A KV vector of d values: FP8 blocks for the first d - r, then the r rope dims as float32.
  void Kv(const float* v, int d, int r) {
    Fp8Blocks(v, d - r);
    F32(v + d - r, r);
  }
  std::string& out() { return out_; }

 private:
  std::string out_;
};

// Reads what Writer wrote. A short read sets !ok() and leaves zeros; callers check ok() once.
class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}
  bool ok() const { return ok_; }
  bool done() const { return pos_ == in_.size(); }
  size_t remaining() const { return in_.size() - pos_; }
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
  uint64_t U64() {
    uint64_t v = 0;
    Raw(&v, 8);
    return v;
  }
  int64_t I64() {
    int64_t v = 0;
    Raw(&v, 8);
    return v;
  }
  void F32(float* v, size_t n) { Raw(v, n * 4); }
  void Raw(void* p, size_t n) {
    if (n == 0) return;  // p may be null (an empty vector's data())
    if (!ok_ || in_.size() - pos_ < n) {
      ok_ = false;
      return;
    }
    std::memcpy(p, in_.data() + pos_, n);
    pos_ += n;
  }
  void Fp8Blocks(float* x, int n);
  void Fp4Blocks(float* x, int n);
  void Kv(float* v, int d, int r) {
    Fp8Blocks(v, d - r);
    F32(v + d - r, r);
  }

 private:
  std::string_view in_;
  size_t pos_ = 0;
  bool ok_ = true;
};

// Encoded sizes when every block is stored as codes (always, for engine-produced values).
int64_t Fp8Bytes(int64_t n);
int64_t Fp4Bytes(int64_t n);
inline int64_t KvBytes(int d, int r) { return Fp8Bytes(d - r) + 4 * int64_t{r}; }

}  // namespace expertmesh::state::internal
