// Test-only helpers for em_tokenizer's tests: the two reference tokenizers, loaded once per
// process, and seeded random inputs (byte strings, and Unicode strings drawn from the character
// classes where tokenizers go wrong).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "core/base/utf8.h"
#include "core/tokenizer/tokenizer.h"

namespace expertmesh::tokenizer::testing {

inline const std::string kV3Path = EM_DEPS_DIR "/tokenizer/deepseek_v3/tokenizer.json";

// The published DeepSeek-V3 file as it is, and the default (V4) tokenizer. Abort the test
// process if they cannot load (the load itself is checked by its own test).
inline const Tokenizer& V3() {
  static const Tokenizer* tok = [] {
    auto t = Tokenizer::FromFile(kV3Path);
    if (!t.ok()) {
      std::fprintf(stderr, "cannot load %s: %s\n", kV3Path.c_str(),
                   std::string(t.status().message()).c_str());
      std::abort();
    }
    return t->release();
  }();
  return *tok;
}

inline const Tokenizer& V4() {
  static const Tokenizer* tok = [] {
    auto t = LoadDefaultTokenizer();
    if (!t.ok()) {
      std::fprintf(stderr, "cannot load the default tokenizer: %s\n",
                   std::string(t.status().message()).c_str());
      std::abort();
    }
    return t->release();
  }();
  return *tok;
}

// Iterations for a fuzz loop: `fallback`, or $EM_FUZZ_ITERATIONS for longer runs on demand.
inline int FuzzIterations(int fallback) {
  const char* env = std::getenv("EM_FUZZ_ITERATIONS");
  if (env != nullptr && std::atoi(env) > 0) return std::atoi(env);
  return fallback;
}

class UnicodeFuzzer {
 public:
  explicit UnicodeFuzzer(uint64_t seed) : rng_(seed) {}

  std::mt19937_64& rng() { return rng_; }
  size_t Below(size_t n) { return static_cast<size_t>(rng_() % n); }

  std::string RandomBytes(size_t max_len) {
    std::string s(Below(max_len + 1), '\0');
    for (char& c : s) {
      // Bias towards bytes that start or continue UTF-8 sequences and ASCII separators.
      switch (Below(4)) {
        case 0:
          c = static_cast<char>(0x80 + Below(0x80));
          break;
        case 1:
          c = static_cast<char>(" \n\t0a<|"[Below(7)]);
          break;
        default:
          c = static_cast<char>(Below(256));
      }
    }
    return s;
  }

  // A valid UTF-8 string of up to `max_chars` characters (runs of one class, mixed).
  std::string RandomUnicode(size_t max_chars, const std::vector<std::string>& specials = {}) {
    std::string s;
    const size_t n = Below(max_chars + 1);
    while (CountChars(s) < n) {
      const size_t run = 1 + Below(6);
      const size_t cls = Below(specials.empty() ? 16 : 17);
      for (size_t i = 0; i < run; ++i) AppendFromClass(cls, specials, &s);
    }
    return s;
  }

 private:
  static size_t CountChars(const std::string& s) {
    size_t n = 0;
    for (char c : s) n += (static_cast<uint8_t>(c) & 0xC0) != 0x80;
    return n;
  }
  char32_t Pick(std::initializer_list<char32_t> list) {
    return *(list.begin() + Below(list.size()));
  }
  void AppendFromClass(size_t cls, const std::vector<std::string>& specials, std::string* s) {
    char32_t cp = 'a';
    switch (cls) {
      case 0:
        cp = static_cast<char32_t>('a' + Below(26));
        break;
      case 1:
        cp = static_cast<char32_t>('A' + Below(26));
        break;
      case 2:
        cp = static_cast<char32_t>('0' + Below(10));
        break;
      case 3:  // other digits and numbers: fullwidth, Arabic-Indic, Devanagari, superscript,
               // roman numeral, vulgar fraction, circled
        cp = Pick({0xFF10, 0xFF19, 0x0660, 0x0669, 0x0966, 0x00B2, 0x00B9, 0x2160, 0x216B, 0x00BD,
                   0x2460, 0x3007, 0x1D7CE});
        break;
      case 4:  // whitespace classes, including the ones engines disagree on
        cp = Pick({' ',    ' ',    '\n',   '\r',   '\t',   0x0B,   0x0C,
                   0x85,   0xA0,   0x1680, 0x180E, 0x2000, 0x2009, 0x200A,
                   0x200B, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0xFEFF});
        break;
      case 5:  // ASCII punctuation and symbols
        cp = static_cast<char32_t>("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"[Below(32)]);
        break;
      case 6:
        cp = static_cast<char32_t>(0x4E00 + Below(0x51A6));
        break;  // CJK in the split range
      case 7:
        cp = static_cast<char32_t>(0x9FA6 + Below(0x5A));
        break;  // CJK past it
      case 8:
        cp = static_cast<char32_t>(0x3040 + Below(0xC0));
        break;  // kana
      case 9:   // emoji, modifiers, ZWJ, variation selectors, keycaps, flags
        cp = Pick({0x1F600, 0x1F680, 0x1F9D1, 0x1F3FB, 0x1F3FF, 0x200D, 0xFE0F, 0x20E3, 0x1F1FA,
                   0x1F1F8, 0x2764, 0x1F51F});
        break;
      case 10:
        cp = static_cast<char32_t>(0x0300 + Below(0x70));
        break;  // combining marks
      case 11:
        cp = static_cast<char32_t>(0x0400 + Below(0x100));
        break;  // Cyrillic
      case 12:  // Arabic, Devanagari, Thai, Hangul
        cp = Pick({0x0627, 0x0644, 0x0645, 0x0915, 0x093F, 0x094D, 0x0E01, 0x0E31, 0xAC00, 0xD55C});
        break;
      case 13:  // control characters and unassigned / private use / non-characters
        cp = Pick({0x00, 0x01, 0x1B, 0x7F, 0x80, 0x9F, 0xE000, 0xF8FF, 0xFFFE, 0xFFFF, 0x10FFFF,
                   0xE0001, 0x0378});
        break;
      case 14:  // Unicode punctuation and symbols
        cp = Pick({0x2014, 0x2026, 0x00AB, 0x00BB, 0x3001, 0x3002, 0xFF0C, 0xFF5C, 0x2581, 0x20AC,
                   0x00A9, 0x2192, 0x221E, 0x00B7, 0x00BF});
        break;
      case 15:
        cp = static_cast<char32_t>(1 + Below(0x10FFFF));
        break;  // anything
      default:
        s->append(specials[Below(specials.size())]);
        return;
    }
    if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;
    base::AppendCodePoint(cp, s);
  }

  std::mt19937_64 rng_;
};

}  // namespace expertmesh::tokenizer::testing
