#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/utf8.h"

namespace expertmesh::tokenizer {
namespace {

// Appends the decodable part of `s` to `out` (ill-formed subparts followed by more bytes become
// U+FFFD) and returns how many trailing bytes must wait for more input.
size_t AppendComplete(std::string_view s, std::string* out) {
  size_t i = 0, run = 0;
  while (i < s.size()) {
    if (static_cast<uint8_t>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const Utf8Step step = NextUtf8(s.substr(i));
    if (step.kind == Utf8Prefix::kComplete) {
      i += step.length;
    } else if (step.kind == Utf8Prefix::kIncomplete) {
      break;
    } else {
      out->append(s.data() + run, i - run);
      out->append(kReplacementChar);
      i += step.length;
      run = i;
    }
  }
  out->append(s.data() + run, i - run);
  return s.size() - i;
}

}  // namespace

void StreamDecoder::AddBytes(std::string_view bytes, std::string* out) {
  if (bytes.empty()) return;
  if (pending_.empty()) {
    const size_t held = AppendComplete(bytes, out);
    pending_.assign(bytes.substr(bytes.size() - held));
    return;
  }
  // Complete the held character first; then the rest goes through without copying.
  size_t used = 0;
  while (!pending_.empty() && used < bytes.size()) {
    pending_.push_back(bytes[used++]);
    const Utf8Step step = NextUtf8(pending_);
    if (step.kind == Utf8Prefix::kIncomplete) continue;
    const size_t held = AppendComplete(pending_, out);
    pending_.erase(0, pending_.size() - held);
  }
  if (pending_.empty() && used < bytes.size()) {
    const size_t held = AppendComplete(bytes.substr(used), out);
    pending_.assign(bytes.substr(bytes.size() - held));
  }
}

void StreamDecoder::Add(int32_t id, std::string* out) { AddBytes(tokenizer_.TokenBytes(id), out); }

std::string StreamDecoder::Add(int32_t id) {
  std::string out;
  Add(id, &out);
  return out;
}

std::string StreamDecoder::Flush() {
  std::string out;
  AppendUtf8Lossy(pending_, &out);
  pending_.clear();
  return out;
}

}  // namespace expertmesh::tokenizer
