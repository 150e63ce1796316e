#include "core/tokenizer/bpe.h"

#include <algorithm>
#include <climits>
#include <mutex>
#include <queue>

#include "absl/container/inlined_vector.h"
#include "absl/hash/hash.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/base/utf8.h"

namespace expertmesh::tokenizer {
namespace {

struct ByteTables {
  std::array<char32_t, 256> to_unicode{};
  std::array<int16_t, 324> to_byte{};    // code point -> byte, -1 if not in the alphabet
  std::array<std::string, 256> spelled;  // UTF-8 of to_unicode[b]
  ByteTables() {
    to_byte.fill(-1);
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      to_unicode[b] = printable ? static_cast<char32_t>(b) : next++;
      to_byte[to_unicode[b]] = static_cast<int16_t>(b);
      base::AppendCodePoint(to_unicode[b], &spelled[b]);
    }
  }
};

const ByteTables& Tables() {
  static const ByteTables* tables = new ByteTables();
  return *tables;
}

// Pieces longer than this are not cached: they are rare and would crowd the cache.
constexpr size_t kMaxCachedPieceBytes = 48;
// Below this many symbols the merge loop scans an array; above it a heap wins.
constexpr size_t kHeapThreshold = 96;

}  // namespace

char32_t ByteToUnicode(uint8_t b) { return Tables().to_unicode[b]; }

bool ByteLevelToBytes(std::string_view token, std::string* bytes) {
  const ByteTables& t = Tables();
  bytes->clear();
  size_t i = 0;
  while (i < token.size()) {
    const base::Utf8Step step = base::NextUtf8(token.substr(i));
    if (step.kind != base::Utf8Prefix::kComplete) return false;
    const char32_t cp = base::DecodeCodePoint(token.substr(i), step.length);
    if (cp >= t.to_byte.size() || t.to_byte[cp] < 0) return false;
    bytes->push_back(static_cast<char>(t.to_byte[cp]));
    i += step.length;
  }
  return true;
}

std::string BytesToByteLevel(std::string_view bytes) {
  const ByteTables& t = Tables();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) out.append(t.spelled[static_cast<uint8_t>(c)]);
  return out;
}

// Sharded map from piece bytes to ids. A shard that fills up is cleared: pieces of a language
// recur quickly, so the cache refills with what matters now.
struct BpeModel::Cache {
  static constexpr size_t kShards = 16;
  static constexpr size_t kShardCapacity = 8192;
  struct Shard {
    absl::Mutex mu;
    absl::flat_hash_map<std::string, absl::InlinedVector<int32_t, 6>> map ABSL_GUARDED_BY(mu);
  };
  std::array<Shard, kShards> shards;
};

BpeModel::BpeModel() : cache_(std::make_unique<Cache>()) {}
BpeModel::~BpeModel() = default;

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::Create(
    const std::vector<std::pair<std::string, int32_t>>& vocab, const std::vector<Merge>& merges,
    const Options& options) {
  std::unique_ptr<BpeModel> model(new BpeModel());
  model->options_ = options;
  model->byte_id_.fill(-1);
  absl::flat_hash_map<std::string_view, int32_t> spelled_to_id;
  spelled_to_id.reserve(vocab.size());
  model->bytes_to_id_.reserve(vocab.size());
  std::string bytes;
  for (const auto& [token, id] : vocab) {
    spelled_to_id[token] = id;
    // Keys outside the byte-level alphabet (e.g. "<｜begin▁of▁sentence｜>") cannot come out of
    // the merge loop; they stay reachable through the added tokens.
    if (!ByteLevelToBytes(token, &bytes)) continue;
    model->bytes_to_id_[bytes] = id;
    if (bytes.size() == 1) model->byte_id_[static_cast<uint8_t>(bytes[0])] = id;
  }
  model->merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const Merge& m = merges[rank];
    auto left = spelled_to_id.find(m.left);
    auto right = spelled_to_id.find(m.right);
    if (left == spelled_to_id.end() || right == spelled_to_id.end()) {
      return absl::InvalidArgumentError(absl::StrCat("model.merges[", rank, "]: token '",
                                                     left == spelled_to_id.end() ? m.left : m.right,
                                                     "' is not in model.vocab"));
    }
    auto merged = spelled_to_id.find(m.left + m.right);
    if (merged == spelled_to_id.end()) {
      return absl::InvalidArgumentError(absl::StrCat("model.merges[", rank, "]: the merged token '",
                                                     m.left + m.right, "' is not in model.vocab"));
    }
    // The first (lowest-rank) occurrence of a pair wins, as in the reference.
    model->merges_.try_emplace(PairKey(left->second, right->second),
                               MergeInfo{static_cast<int32_t>(rank), merged->second});
  }
  return model;
}

void BpeModel::MergeSmall(std::vector<int32_t>* symbols) const {
  std::vector<int32_t>& s = *symbols;
  thread_local std::vector<const MergeInfo*> pair;
  pair.resize(s.size());
  for (size_t i = 0; i + 1 < s.size(); ++i) pair[i] = FindMerge(s[i], s[i + 1]);
  pair[s.size() - 1] = nullptr;
  size_t n = s.size();
  while (n > 1) {
    size_t best = n;
    int32_t best_rank = INT32_MAX;
    for (size_t i = 0; i + 1 < n; ++i) {
      if (pair[i] != nullptr && pair[i]->rank < best_rank) {
        best_rank = pair[i]->rank;
        best = i;
      }
    }
    if (best == n) break;
    s[best] = pair[best]->id;
    std::copy(s.begin() + best + 2, s.begin() + n, s.begin() + best + 1);
    std::copy(pair.begin() + best + 2, pair.begin() + n, pair.begin() + best + 1);
    --n;
    pair[best] = best + 1 < n ? FindMerge(s[best], s[best + 1]) : nullptr;
    if (best > 0) pair[best - 1] = FindMerge(s[best - 1], s[best]);
  }
  s.resize(n);
}

void BpeModel::MergeHeap(std::vector<int32_t>* symbols) const {
  std::vector<int32_t>& s = *symbols;
  const int32_t n = static_cast<int32_t>(s.size());
  struct Link {
    int32_t prev, next;
  };
  std::vector<Link> link(n);
  for (int32_t i = 0; i < n; ++i) link[i] = {i - 1, i + 1 < n ? i + 1 : -1};
  struct Candidate {
    int32_t rank, pos, left, right;
    // priority_queue pops the largest: invert so the lowest rank, then leftmost, comes first.
    bool operator<(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate> heap;
  auto push = [&](int32_t pos) {
    const int32_t next = link[pos].next;
    if (next < 0) return;
    if (const MergeInfo* m = FindMerge(s[pos], s[next])) heap.push({m->rank, pos, s[pos], s[next]});
  };
  for (int32_t i = 0; i + 1 < n; ++i) push(i);
  std::vector<bool> dead(n, false);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    if (dead[c.pos]) continue;
    const int32_t next = link[c.pos].next;
    if (next < 0 || s[c.pos] != c.left || s[next] != c.right) continue;
    s[c.pos] = FindMerge(c.left, c.right)->id;
    dead[next] = true;
    link[c.pos].next = link[next].next;
    if (link[next].next >= 0) link[link[next].next].prev = c.pos;
    if (link[c.pos].prev >= 0) push(link[c.pos].prev);
    push(c.pos);
  }
  size_t out = 0;
  for (int32_t i = 0; i < n; ++i) {
    if (!dead[i]) s[out++] = s[i];
  }
  s.resize(out);
}

void BpeModel::EncodeWordUncached(std::string_view word, bool force_heap,
                                  std::vector<int32_t>* ids) const {
  if (options_.ignore_merges) {
    auto it = bytes_to_id_.find(absl::string_view(word.data(), word.size()));
    if (it != bytes_to_id_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  thread_local std::vector<int32_t> symbols;
  symbols.clear();
  for (char c : word) {
    int32_t id = byte_id_[static_cast<uint8_t>(c)];
    if (id < 0) {
      if (options_.unk_id < 0) continue;
      if (options_.fuse_unk && !symbols.empty() && symbols.back() == options_.unk_id) continue;
      id = options_.unk_id;
    }
    symbols.push_back(id);
  }
  if (symbols.size() > 1) {
    if (force_heap || symbols.size() > kHeapThreshold) {
      MergeHeap(&symbols);
    } else {
      MergeSmall(&symbols);
    }
  }
  ids->insert(ids->end(), symbols.begin(), symbols.end());
}

void BpeModel::EncodeWord(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.size() == 1) {
    const int32_t id = byte_id_[static_cast<uint8_t>(word[0])];
    if (id >= 0) {
      ids->push_back(id);
      return;
    }
  }
  if (word.size() > kMaxCachedPieceBytes) {
    EncodeWordUncached(word, false, ids);
    return;
  }
  const absl::string_view key(word.data(), word.size());
  Cache::Shard& shard = cache_->shards[absl::Hash<absl::string_view>{}(key) % Cache::kShards];
  {
    absl::MutexLock lock(&shard.mu);
    auto it = shard.map.find(key);
    if (it != shard.map.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t start = ids->size();
  EncodeWordUncached(word, false, ids);
  absl::InlinedVector<int32_t, 6> value(ids->begin() + start, ids->end());
  absl::MutexLock lock(&shard.mu);
  if (shard.map.size() >= Cache::kShardCapacity) shard.map.clear();
  shard.map.try_emplace(std::string(word), std::move(value));
}

}  // namespace expertmesh::tokenizer
