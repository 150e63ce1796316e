// The byte-level BPE model: vocabulary and merge table keyed on raw bytes (the byte-level
// alphabet of tokenizer.json is undone at load time), the merge loop, and a cache of the results
// for repeated pieces. Internal to em_tokenizer; exposed for its tests.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace expertmesh::tokenizer {

// GPT-2's byte <-> printable character map used by ByteLevel pre-tokenizers and decoders.
// Returns the code point standing for byte `b`.
char32_t ByteToUnicode(uint8_t b);
// Converts a byte-level string (every character one of the 256 ByteToUnicode characters) to raw
// bytes; false when some character is not in the alphabet.
bool ByteLevelToBytes(std::string_view token, std::string* bytes);
// The byte-level spelling of raw bytes.
std::string BytesToByteLevel(std::string_view bytes);

class BpeModel {
 public:
  struct Merge {
    std::string left, right;  // byte-level spellings as in the file
  };
  struct Options {
    bool ignore_merges = false;
    int32_t unk_id = -1;  // -1: a byte without a vocabulary entry is dropped (as the reference)
    bool fuse_unk = false;
  };

  // `vocab`: byte-level token -> id. Errors name the offending entry.
  static absl::StatusOr<std::unique_ptr<BpeModel>> Create(
      const std::vector<std::pair<std::string, int32_t>>& vocab, const std::vector<Merge>& merges,
      const Options& options);

  // Appends the ids of one pre-tokenized piece (raw bytes, non-empty).
  void EncodeWord(std::string_view word, std::vector<int32_t>* ids) const;
  // The merge loop without the cache; `force_heap` picks the heap algorithm whatever the length
  // (tests check both algorithms agree).
  void EncodeWordUncached(std::string_view word, bool force_heap, std::vector<int32_t>* ids) const;

  // Raw bytes -> id for the vocabulary (entries whose key is not byte-level are absent).
  const absl::flat_hash_map<std::string, int32_t>& bytes_to_id() const { return bytes_to_id_; }

  ~BpeModel();

 private:
  BpeModel();
  struct MergeInfo {
    int32_t rank;
    int32_t id;
  };
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  const MergeInfo* FindMerge(int32_t a, int32_t b) const {
    auto it = merges_.find(PairKey(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  }
  void MergeSmall(std::vector<int32_t>* symbols) const;
  void MergeHeap(std::vector<int32_t>* symbols) const;

  Options options_;
  absl::flat_hash_map<std::string, int32_t> bytes_to_id_;
  absl::flat_hash_map<uint64_t, MergeInfo> merges_;
  std::array<int32_t, 256> byte_id_{};
  struct Cache;
  std::unique_ptr<Cache> cache_;
};

class Tokenizer;
// The BPE model inside a tokenizer made by Tokenizer::FromJson/FromFile (tests only).
const BpeModel& BpeForTesting(const Tokenizer& tokenizer);

}  // namespace expertmesh::tokenizer
