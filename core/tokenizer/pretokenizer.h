// The pre-tokenizer of tokenizer.json: a sequence of regex Splits (behavior Isolated) followed by
// ByteLevel (which only re-spells bytes; we keep raw bytes, so it is a no-op here). Each Split
// runs on every piece the previous one produced: a match becomes a piece, and so does the text
// between matches. For the three DeepSeek patterns a hand-written splitter gives the same pieces
// much faster; tokenizer_fuzz_test.cc proves the two equal on fuzzed input.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "core/tokenizer/regex.h"

namespace expertmesh::tokenizer {

class PreTokenizer {
 public:
  using Emit = absl::FunctionRef<void(std::string_view)>;

  // `patterns`: the Split regexes as written in tokenizer.json, applied in order. Errors name the
  // index of the pattern at fault. `allow_fast_path` false forces the regex path.
  static absl::StatusOr<std::unique_ptr<PreTokenizer>> Create(
      const std::vector<std::string>& patterns, bool allow_fast_path = true);

  // Calls `emit` with each piece of `text` (valid UTF-8; not checked), in order. Pieces are
  // non-empty and concatenate to `text`.
  void Split(std::string_view text, Emit emit) const;
  // Always the regex path (for tests and benchmarks).
  void SplitRegex(std::string_view text, Emit emit) const;

  bool has_fast_path() const { return fast_path_; }

 private:
  PreTokenizer() = default;
  void SplitStage(std::string_view text, size_t stage, Emit emit) const;
  void SplitDeepSeek(std::string_view text, Emit emit) const;

  std::vector<std::unique_ptr<Regex>> regexes_;
  bool fast_path_ = false;
};

// The DeepSeek-V3 Split patterns, as tokenizer.json writes them (JSON-decoded).
extern const char* const kDeepSeekPatterns[3];

}  // namespace expertmesh::tokenizer
