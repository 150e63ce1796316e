// Byte-level BPE tokenizer loaded from a Hugging Face tokenizer.json (the DeepSeek-V3/V4 family).
// Contract: ../shared/tokenizer/README.md; the design notes are in docs/tokenizer.md. Immutable
// after loading: all methods are const and thread-safe (the only shared mutable state is an
// internal, internally locked cache of BPE results).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace expertmesh::tokenizer {

// One entry of tokenizer.json's "added_tokens". Only lstrip = rstrip = single_word = false is
// supported (what the DeepSeek files use); `normalized` is accepted either way because the only
// supported normalizers are the identity.
struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = true;
  bool normalized = false;
};

// How FromJson builds the tokenizer beyond what the file says.
struct LoadOptions {
  // Added after the file's own added tokens. An entry whose id or content the file already has is
  // skipped (the file wins), so a real V4 file given in place of the V3 one loads as it is.
  std::vector<AddedToken> extra_added_tokens;
  // vocab_size() is at least this (the model's embedding rows); ids without a token decode to
  // nothing.
  int32_t min_vocab_size = 0;
};

class Tokenizer {
 public:
  // Parses a tokenizer.json document. Errors (InvalidArgument) name what is malformed or
  // unsupported (e.g. "model.type: only BPE is supported").
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view json);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view json,
                                                             const LoadOptions& options);
  // As FromJson on the file's contents; errors are prefixed with the path. NotFound when the file
  // is missing.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path,
                                                             const LoadOptions& options);

  virtual ~Tokenizer() = default;

  // Plain encoding of `text`, no BOS. With match_added_tokens, literal added-token text becomes
  // that token's id (leftmost, longest match); without it every byte goes through the BPE, so
  // client text can never forge a control token. `text` may be any bytes: ill-formed UTF-8 is
  // encoded byte for byte (each maximal ill-formed subpart is its own piece), so DecodeBytes
  // always gives `text` back.
  virtual std::vector<int32_t> Encode(std::string_view text,
                                      bool match_added_tokens = true) const = 0;
  // Encode appending to `ids` (no clear), for callers that build one sequence from parts.
  virtual void EncodeAppend(std::string_view text, bool match_added_tokens,
                            std::vector<int32_t>* ids) const = 0;

  // Concatenated bytes of the tokens (ids without a token, including negative or >= vocab_size
  // ones, decode to nothing). The result may hold invalid UTF-8 when ids split a character; see
  // StreamDecoder for streaming text.
  virtual std::string DecodeBytes(absl::Span<const int32_t> ids) const = 0;
  // DecodeBytes with each maximal ill-formed UTF-8 subpart replaced by one U+FFFD.
  virtual std::string Decode(absl::Span<const int32_t> ids) const = 0;
  // The bytes of one token (empty for ids without a token). Valid while the tokenizer lives.
  virtual std::string_view TokenBytes(int32_t id) const = 0;

  // Id of an added token or vocabulary entry written exactly as `token` (vocabulary entries in
  // their byte-level form, e.g. "Ġthe"); nullopt when absent. Added tokens win over the vocabulary.
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  // The token written as in tokenizer.json (added-token content, or the byte-level vocabulary
  // key); nullopt for ids without a token.
  virtual std::optional<std::string> IdToToken(int32_t id) const = 0;
  // True for added tokens (control strings, placeholders) and, for IsSpecial, only those whose
  // "special" flag is set.
  virtual bool IsAddedToken(int32_t id) const = 0;
  virtual bool IsSpecial(int32_t id) const = 0;
  // All added tokens, ordered by id.
  virtual const std::vector<AddedToken>& added_tokens() const = 0;

  // Number of ids (largest id + 1, or LoadOptions::min_vocab_size if larger).
  virtual int32_t vocab_size() const = 0;
};

// Rows of DeepSeek-V3/V4's embedding table: the default tokenizer's vocab_size().
inline constexpr int32_t kDeepSeekVocabRows = 129280;

// The DeepSeek-V4 added tokens (ids 128815..128845) that the V3 file lacks, built here (the
// published control tokens at their ids, `<｜place▁holder▁no▁N｜>` elsewhere, N = id - 128000).
std::vector<AddedToken> DeepSeekV4AddedTokens();

// Path of the default tokenizer.json: $EXPERTMESH_TOKENIZER if set and non-empty, else the V3
// file that scripts/setup.sh installs under the project's .deps directory.
std::string DefaultTokenizerPath();

// The default (DeepSeek-V4) tokenizer: DefaultTokenizerPath() plus DeepSeekV4AddedTokens(),
// vocab_size() = kDeepSeekVocabRows. NotFound, telling the user to run scripts/setup.sh, when the
// file is missing.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadDefaultTokenizer();

// `path` empty: LoadDefaultTokenizer(); otherwise FromFile(path) as it is (no V4 overlay).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& path);

// Turns ids arriving one at a time into text without ever splitting a UTF-8 character: bytes that
// may still start a valid character are held back until the next token completes them or Flush.
// Bytes that can no longer become valid are emitted as U+FFFD at once (they would be U+FFFD
// whatever follows), so the concatenation of every Add and the final Flush equals
// Tokenizer::Decode of all the ids. Not thread-safe; the tokenizer must outlive it.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer) : tokenizer_(tokenizer) {}

  // Text completed by this token (possibly empty).
  std::string Add(int32_t id);
  // Same, appending to `out`.
  void Add(int32_t id, std::string* out);
  // Same for raw bytes (e.g. a token's bytes obtained elsewhere).
  void AddBytes(std::string_view bytes, std::string* out);
  // Ends the stream: held bytes (an unfinished character) become U+FFFD. The decoder is then
  // empty and may start a new stream.
  std::string Flush();
  // Bytes held back, waiting for the rest of a character (at most 3).
  size_t pending_bytes() const { return pending_.size(); }

 private:
  const Tokenizer& tokenizer_;
  std::string pending_;
};

}  // namespace expertmesh::tokenizer
