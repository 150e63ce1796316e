#include "core/tokenizer/pretokenizer.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/base/utf8.h"

namespace expertmesh::tokenizer {
namespace {

// Character classes of the DeepSeek patterns, one byte per code point.
enum : uint8_t {
  kL = 1,       // \p{L}
  kM = 2,       // \p{M}
  kN = 4,       // \p{N}
  kP = 8,       // \p{P}
  kS = 16,      // \p{S}
  kSpace = 32,  // \s: Unicode White_Space
  kCjk = 64,    // [\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]
};

// The table is read off PCRE2 itself (its \p{..} on every code point), so the fast path uses
// exactly the Unicode data of the regex path it replaces.
class CharClasses {
 public:
  CharClasses() : table_(0x110000, 0) {
    std::string all;
    all.reserve(0x50000 * 4);
    // Planes 4-13 are unassigned and planes 15-16 are private use (Co) in every Unicode version
    // so far: none of their code points is in a class, and skipping them makes this 3x faster.
    // (The every-code-point test samples them against the regexes.)
    for (char32_t cp = 0; cp < 0xF0000; ++cp) {
      if (cp >= 0xD800 && cp <= 0xDFFF) continue;
      if (cp == 0x40000) cp = 0xE0000;
      base::AppendCodePoint(cp, &all);
    }
    const std::pair<const char*, uint8_t> classes[] = {
        {"\\p{L}+", kL}, {"\\p{M}+", kM}, {"\\p{N}+", kN}, {"\\p{P}+", kP}, {"\\p{S}+", kS}};
    for (const auto& [pattern, bit] : classes) {
      auto regex = Regex::Compile(pattern);
      EM_CHECK(regex.ok());
      size_t pos = 0, begin = 0, end = 0;
      while (pos < all.size() && (*regex)->Find(all, pos, &begin, &end)) {
        for (size_t i = begin; i < end;) {
          const size_t len = base::NextUtf8(std::string_view(all).substr(i)).length;
          table_[base::DecodeCodePoint(std::string_view(all).substr(i), len)] |= bit;
          i += len;
        }
        pos = end;
      }
    }
    for (char32_t cp : {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, 0x2028, 0x2029,
                        0x202F, 0x205F, 0x3000}) {
      table_[cp] |= kSpace;
    }
    for (char32_t cp = 0x2000; cp <= 0x200A; ++cp) table_[cp] |= kSpace;
    for (auto [lo, hi] :
         {std::pair<char32_t, char32_t>{0x4E00, 0x9FA5}, {0x3040, 0x309F}, {0x30A0, 0x30FF}}) {
      for (char32_t cp = lo; cp <= hi; ++cp) table_[cp] |= kCjk;
    }
  }
  uint8_t operator[](char32_t cp) const { return table_[cp]; }

 private:
  std::vector<uint8_t> table_;
};

const CharClasses& Classes() {
  static const CharClasses* classes = new CharClasses();
  return *classes;
}

// Decodes the (valid) character at s[i].
inline char32_t CharAt(std::string_view s, size_t i, size_t* len) {
  const auto b = static_cast<uint8_t>(s[i]);
  if (b < 0x80) {
    *len = 1;
    return b;
  }
  if (b < 0xE0) {
    *len = 2;
    return ((b & 0x1F) << 6) | (static_cast<uint8_t>(s[i + 1]) & 0x3F);
  }
  if (b < 0xF0) {
    *len = 3;
    return ((b & 0x0F) << 12) | ((static_cast<uint8_t>(s[i + 1]) & 0x3F) << 6) |
           (static_cast<uint8_t>(s[i + 2]) & 0x3F);
  }
  *len = 4;
  return ((b & 0x07) << 18) | ((static_cast<uint8_t>(s[i + 1]) & 0x3F) << 12) |
         ((static_cast<uint8_t>(s[i + 2]) & 0x3F) << 6) | (static_cast<uint8_t>(s[i + 3]) & 0x3F);
}

inline bool IsAsciiPunct(char32_t c) {
  return (c >= '!' && c <= '/') || (c >= ':' && c <= '@') || (c >= '[' && c <= '`') ||
         (c >= '{' && c <= '~');
}
inline bool IsAsciiLetter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// End of the run of characters whose class has a bit of `mask`, starting at i.
inline size_t RunEnd(const CharClasses& cc, std::string_view s, size_t i, uint8_t mask) {
  size_t len;
  while (i < s.size() && (cc[CharAt(s, i, &len)] & mask)) i += len;
  return i;
}

inline size_t CrLfEnd(std::string_view s, size_t i) {
  while (i < s.size() && (s[i] == '\r' || s[i] == '\n')) ++i;
  return i;
}

// The main DeepSeek pattern, tried at s[p] exactly as a backtracking engine tries its
// alternatives in order; returns the end of the match, or 0 when none starts at p:
//   [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+
//   | [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
//   | ' '?[\p{P}\p{S}]+[\r\n]*
//   | \s*[\r\n]+ | \s+(?!\S) | \s+
size_t MatchMainAt(const CharClasses& cc, std::string_view s, size_t p) {
  size_t l0;
  const char32_t c0 = CharAt(s, p, &l0);
  const uint8_t k0 = cc[c0];
  const size_t p1 = p + l0;
  if (IsAsciiPunct(c0) && p1 < s.size() && IsAsciiLetter(s[p1])) {
    size_t e = p1;
    while (e < s.size() && IsAsciiLetter(s[e])) ++e;
    return e;
  }
  size_t l1 = 0;
  const uint8_t k1 = p1 < s.size() ? cc[CharAt(s, p1, &l1)] : 0;
  if (c0 != '\r' && c0 != '\n' && !(k0 & (kL | kP | kS)) && (k1 & (kL | kM))) {
    return RunEnd(cc, s, p1, kL | kM);
  }
  if (k0 & (kL | kM)) return RunEnd(cc, s, p, kL | kM);
  if (c0 == ' ' && (k1 & (kP | kS))) return CrLfEnd(s, RunEnd(cc, s, p1, kP | kS));
  if (k0 & (kP | kS)) return CrLfEnd(s, RunEnd(cc, s, p, kP | kS));
  if (!(k0 & kSpace)) return 0;
  // The whitespace run [p, q), the last CR/LF in it, and the start of its last character.
  size_t q = p, last_crlf = std::string_view::npos, last_start = p, len;
  while (q < s.size()) {
    const char32_t c = CharAt(s, q, &len);
    if (!(cc[c] & kSpace)) break;
    if (c == '\r' || c == '\n') last_crlf = q;
    last_start = q;
    q += len;
  }
  if (last_crlf != std::string_view::npos) return last_crlf + 1;  // \s*[\r\n]+
  if (q == s.size()) return q;                                    // \s+(?!\S) at the end
  if (last_start > p) return last_start;  // \s+(?!\S): give back the last character
  return q;                               // \s+
}

// Find-all of the main pattern over one piece, emitting matches and the text between them.
void SplitMain(const CharClasses& cc, std::string_view s, PreTokenizer::Emit emit) {
  size_t p = 0, gap = 0, len;
  while (p < s.size()) {
    const size_t end = MatchMainAt(cc, s, p);
    if (end == 0) {
      CharAt(s, p, &len);
      p += len;
      continue;
    }
    if (p > gap) emit(s.substr(gap, p - gap));
    emit(s.substr(p, end - p));
    p = gap = end;
  }
  if (gap < s.size()) emit(s.substr(gap));
}

}  // namespace

const char* const kDeepSeekPatterns[3] = {
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./"
    ":;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
};

absl::StatusOr<std::unique_ptr<PreTokenizer>> PreTokenizer::Create(
    const std::vector<std::string>& patterns, bool allow_fast_path) {
  std::unique_ptr<PreTokenizer> pre(new PreTokenizer());
  for (size_t i = 0; i < patterns.size(); ++i) {
    const std::string context = absl::StrCat("pre_tokenizer Split pattern ", i);
    auto translated = TranslatePattern(patterns[i]);
    if (!translated.ok()) return base::Annotate(translated.status(), context);
    auto regex = Regex::Compile(*translated);
    if (!regex.ok()) return base::Annotate(regex.status(), context);
    pre->regexes_.push_back(std::move(*regex));
  }
  if (allow_fast_path && patterns.size() == 3) {
    pre->fast_path_ = patterns[0] == kDeepSeekPatterns[0] && patterns[1] == kDeepSeekPatterns[1] &&
                      patterns[2] == kDeepSeekPatterns[2];
  }
  return pre;
}

void PreTokenizer::SplitStage(std::string_view text, size_t stage, Emit emit) const {
  if (stage == regexes_.size()) {
    emit(text);
    return;
  }
  const Regex& regex = *regexes_[stage];
  size_t pos = 0, begin = 0, end = 0;
  while (pos < text.size() && regex.Find(text, pos, &begin, &end)) {
    if (begin > pos) SplitStage(text.substr(pos, begin - pos), stage + 1, emit);
    SplitStage(text.substr(begin, end - begin), stage + 1, emit);
    pos = end;
  }
  if (pos < text.size()) SplitStage(text.substr(pos), stage + 1, emit);
}

void PreTokenizer::SplitRegex(std::string_view text, Emit emit) const {
  if (text.empty()) return;
  SplitStage(text, 0, emit);
}

void PreTokenizer::Split(std::string_view text, Emit emit) const {
  if (fast_path_) {
    SplitDeepSeek(text, emit);
  } else {
    SplitRegex(text, emit);
  }
}

// Splits 1 and 2 need no regex: \p{N} and the CJK ranges are disjoint, so the pieces they leave
// are digit groups of at most three, maximal CJK runs, and maximal runs of everything else. A
// digit group holds nothing the main pattern can match (its alternatives all need a letter,
// mark, punctuation, symbol or space), so it is one piece; the other runs go through SplitMain.
void PreTokenizer::SplitDeepSeek(std::string_view text, Emit emit) const {
  const CharClasses& cc = Classes();
  size_t i = 0, len;
  while (i < text.size()) {
    const uint8_t k = cc[CharAt(text, i, &len)];
    size_t end = i + len;
    if (k & kN) {
      for (int n = 1; n < 3 && end < text.size(); ++n) {
        size_t l;
        if (!(cc[CharAt(text, end, &l)] & kN)) break;
        end += l;
      }
      emit(text.substr(i, end - i));
    } else if (k & kCjk) {
      end = RunEnd(cc, text, end, kCjk);
      SplitMain(cc, text.substr(i, end - i), emit);
    } else {
      size_t l;
      while (end < text.size() && !(cc[CharAt(text, end, &l)] & (kN | kCjk))) end += l;
      SplitMain(cc, text.substr(i, end - i), emit);
    }
    i = end;
  }
}

}  // namespace expertmesh::tokenizer
