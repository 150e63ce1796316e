#include "core/tokenizer/tokenizer.h"

#include "core/base/utf8.h"

namespace expertmesh::tokenizer {

void StreamDecoder::AddBytes(std::string_view bytes, std::string* out) {
  if (bytes.empty()) return;
  if (pending_.empty()) {
    const size_t held = base::AppendUtf8LossyHoldingTail(bytes, out);
    pending_.assign(bytes.substr(bytes.size() - held));
    return;
  }
  // Complete the held character first; then the rest goes through without copying.
  size_t used = 0;
  while (!pending_.empty() && used < bytes.size()) {
    pending_.push_back(bytes[used++]);
    const base::Utf8Step step = base::NextUtf8(pending_);
    if (step.kind == base::Utf8Prefix::kIncomplete) continue;
    const size_t held = base::AppendUtf8LossyHoldingTail(pending_, out);
    pending_.erase(0, pending_.size() - held);
  }
  if (pending_.empty() && used < bytes.size()) {
    const size_t held = base::AppendUtf8LossyHoldingTail(bytes.substr(used), out);
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
  base::AppendUtf8Lossy(pending_, &out);
  pending_.clear();
  return out;
}

}  // namespace expertmesh::tokenizer
