#include "core/base/utf8.h"

#include <cstdint>

namespace expertmesh::base {

Utf8Step NextUtf8(std::string_view s) {
  const auto b0 = static_cast<uint8_t>(s[0]);
  if (b0 < 0x80) return {Utf8Prefix::kComplete, 1};
  size_t need;
  // Bounds of the second byte (Unicode Table 3-7); later bytes are always 80..BF.
  uint8_t lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return {Utf8Prefix::kInvalid, 1};
  }
  for (size_t i = 1; i < need; ++i) {
    if (i >= s.size()) return {Utf8Prefix::kIncomplete, i};
    const auto b = static_cast<uint8_t>(s[i]);
    const uint8_t l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
    if (b < l || b > h) return {Utf8Prefix::kInvalid, i};
  }
  return {Utf8Prefix::kComplete, need};
}

bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    // ASCII runs dominate real text: skip 8 bytes at a time.
    while (i + 8 <= s.size()) {
      uint64_t w;
      __builtin_memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ULL) break;
      i += 8;
    }
    if (i >= s.size()) break;
    if (static_cast<uint8_t>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const Utf8Step step = NextUtf8(s.substr(i));
    if (step.kind != Utf8Prefix::kComplete) return false;
    i += step.length;
  }
  return true;
}

size_t AppendUtf8LossyHoldingTail(std::string_view s, std::string* out) {
  size_t i = 0, run = 0;  // [run, i) is well-formed and not yet copied
  while (i < s.size()) {
    if (static_cast<uint8_t>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const Utf8Step step = NextUtf8(s.substr(i));
    if (step.kind == Utf8Prefix::kComplete) {
      i += step.length;
      continue;
    }
    if (step.kind == Utf8Prefix::kIncomplete) break;
    out->append(s.data() + run, i - run);
    out->append(kReplacementChar);
    i += step.length;
    run = i;
  }
  out->append(s.data() + run, i - run);
  return s.size() - i;
}

void AppendUtf8Lossy(std::string_view s, std::string* out) {
  // A truncated character can only be at the end, and it is one maximal ill-formed subpart.
  if (AppendUtf8LossyHoldingTail(s, out) > 0) out->append(kReplacementChar);
}

void AppendCodePoint(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

char32_t DecodeCodePoint(std::string_view s, size_t length) {
  const auto b0 = static_cast<uint8_t>(s[0]);
  if (length == 1) return b0;
  char32_t cp = b0 & (0x7F >> length);
  for (size_t i = 1; i < length; ++i) cp = (cp << 6) | (static_cast<uint8_t>(s[i]) & 0x3F);
  return cp;
}

}  // namespace expertmesh::base
