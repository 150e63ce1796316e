// UTF-8 scanning shared by the tokenizer, its decoders, the chat JSON reader and the CLI:
// validation, the length of a well-formed character, and lossy repair by the "maximal subpart"
// rule (each maximal ill-formed subsequence becomes one U+FFFD, as Rust's String::from_utf8_lossy
// and the WHATWG decoder do, so our text equals what the Hugging Face reference prints).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace expertmesh::base {

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// Outcome of looking at the bytes at the start of a buffer.
enum class Utf8Prefix {
  kComplete,    // a well-formed character of `length` bytes
  kIncomplete,  // all `length` bytes (to the end) may still start a character: need more bytes
  kInvalid,     // `length` bytes form a maximal ill-formed subpart (at least 1)
};

struct Utf8Step {
  Utf8Prefix kind;
  size_t length;
};

// Classifies the character starting at s[0]; s must not be empty.
Utf8Step NextUtf8(std::string_view s);

// True when `s` is entirely well-formed UTF-8 (no surrogates, no overlongs, <= U+10FFFF).
bool IsValidUtf8(std::string_view s);

// Appends `s` to `out`, replacing each maximal ill-formed subpart (including a truncated
// character at the end) with U+FFFD.
void AppendUtf8Lossy(std::string_view s, std::string* out);
inline std::string Utf8Lossy(std::string_view s) {
  std::string out;
  AppendUtf8Lossy(s, &out);
  return out;
}

// Like AppendUtf8Lossy, but a truncated character at the end (which more bytes may complete) is
// neither appended nor replaced: returns its length in bytes (0 when there is none), so a
// streaming caller can keep those bytes for the next chunk.
size_t AppendUtf8LossyHoldingTail(std::string_view s, std::string* out);

// Encodes code point `cp` (<= U+10FFFF) as UTF-8 onto `out`. A surrogate comes out in its
// 3-byte form, which the chat JSON reader relies on for a lone surrogate escape; callers that
// need well-formed output pass scalar values only.
void AppendCodePoint(char32_t cp, std::string* out);

// Decodes the well-formed character at s[0] of `length` bytes (from NextUtf8).
char32_t DecodeCodePoint(std::string_view s, size_t length);

}  // namespace expertmesh::base
