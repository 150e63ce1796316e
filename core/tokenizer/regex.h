// A PCRE2 regular expression (UTF + UCP, JIT-compiled) with the find-all loop the pre-tokenizer
// needs, and the translation of a tokenizer.json (Oniguruma-flavoured) pattern into PCRE2 syntax.
// Every PCRE2 handle is owned by RAII wrappers.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace expertmesh::tokenizer {

// Rewrites a Hugging Face tokenizer pattern for PCRE2 so that it has the reference's meaning:
// `\s`/`\S` become explicit classes of Unicode White_Space (PCRE2's UCP `\s` also takes U+180E,
// which is not White_Space), `\d` becomes `\p{Nd}`. Constructs whose meaning differs between the
// two engines and that no supported file uses (`\w`, `\W`, `\b`, `\B`, `\h`, `\H`, `\S` inside a
// class) are rejected with InvalidArgument naming the construct.
absl::StatusOr<std::string> TranslatePattern(std::string_view pattern);

class Regex {
 public:
  // Compiles `pattern` (already in PCRE2 syntax) with PCRE2_UTF | PCRE2_UCP and JIT-compiles it.
  // `literal` compiles it as a plain string (PCRE2_LITERAL). Errors name the offset and reason.
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern,
                                                        bool literal = false);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Finds the first non-empty match in subject[start..] (subject must be valid UTF-8: it is not
  // checked again). Returns false when there is none; sets [*match_begin, *match_end).
  // Thread-safe: match state lives in per-thread storage.
  bool Find(std::string_view subject, size_t start, size_t* match_begin, size_t* match_end) const;

  const std::string& pattern() const { return pattern_; }

 private:
  struct Impl;
  Regex(std::string pattern, std::unique_ptr<Impl> impl);
  std::string pattern_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace expertmesh::tokenizer
