#include "core/tokenizer/tokenizer.h"

#include <simdjson.h>

#include <algorithm>
#include <cstdlib>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "core/base/utf8.h"
#include "core/tokenizer/bpe.h"
#include "core/tokenizer/pretokenizer.h"

#ifndef EM_TOKENIZER_DEFAULT_PATH
#error "EM_TOKENIZER_DEFAULT_PATH must be defined by the build"
#endif

namespace expertmesh::tokenizer {
namespace {

using simdjson::dom::array;
using simdjson::dom::element;
using simdjson::dom::element_type;
using simdjson::dom::object;

constexpr int64_t kMaxTokenId = int64_t{1} << 24;

absl::Status Invalid(std::string_view field, std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(std::string(field), ": ", std::string(what)));
}

std::string TypeName(element e) {
  switch (e.type()) {
    case element_type::ARRAY:
      return "an array";
    case element_type::OBJECT:
      return "an object";
    case element_type::INT64:
    case element_type::UINT64:
    case element_type::DOUBLE:
      return "a number";
    case element_type::STRING:
      return "a string";
    case element_type::BOOL:
      return "a boolean";
    case element_type::NULL_VALUE:
      return "null";
  }
  return "unknown";
}

// Field accessors: each error names the field's path.
absl::StatusOr<element> Field(object o, std::string_view parent, std::string_view key) {
  element e;
  if (o.at_key(key).get(e) != simdjson::SUCCESS) {
    return Invalid(absl::StrCat(std::string(parent), ".", std::string(key)), "missing");
  }
  return e;
}
std::optional<element> OptionalField(object o, std::string_view key) {
  element e;
  if (o.at_key(key).get(e) != simdjson::SUCCESS || e.is_null()) return std::nullopt;
  return e;
}
absl::StatusOr<std::string_view> AsString(element e, std::string_view path) {
  std::string_view s;
  if (e.get_string().get(s) != simdjson::SUCCESS) {
    return Invalid(path, absl::StrCat("expected a string, got ", TypeName(e)));
  }
  return s;
}
absl::StatusOr<object> AsObject(element e, std::string_view path) {
  object o;
  if (e.get_object().get(o) != simdjson::SUCCESS) {
    return Invalid(path, absl::StrCat("expected an object, got ", TypeName(e)));
  }
  return o;
}
absl::StatusOr<array> AsArray(element e, std::string_view path) {
  array a;
  if (e.get_array().get(a) != simdjson::SUCCESS) {
    return Invalid(path, absl::StrCat("expected an array, got ", TypeName(e)));
  }
  return a;
}
absl::StatusOr<bool> AsBool(element e, std::string_view path) {
  bool b;
  if (e.get_bool().get(b) != simdjson::SUCCESS) {
    return Invalid(path, absl::StrCat("expected a boolean, got ", TypeName(e)));
  }
  return b;
}
absl::StatusOr<int32_t> AsId(element e, std::string_view path) {
  int64_t v;
  if (e.get_int64().get(v) != simdjson::SUCCESS) {
    return Invalid(path, absl::StrCat("expected an integer id, got ", TypeName(e)));
  }
  // Tables are sized by the largest id: bound it so that a bad file cannot ask for gigabytes.
  if (v < 0 || v >= kMaxTokenId) {
    return Invalid(path, absl::StrCat("id ", v, " is out of range [0, ", kMaxTokenId, ")"));
  }
  return static_cast<int32_t>(v);
}
absl::StatusOr<bool> OptionalBool(object o, std::string_view parent, std::string_view key,
                                  bool fallback) {
  auto e = OptionalField(o, key);
  if (!e) return fallback;
  return AsBool(*e, absl::StrCat(std::string(parent), ".", std::string(key)));
}
absl::StatusOr<std::string_view> TypeOf(object o, std::string_view path) {
  EM_ASSIGN_OR_RETURN(element t, Field(o, path, "type"));
  return AsString(t, absl::StrCat(std::string(path), ".type"));
}

// Leftmost-longest matcher over a set of byte strings (a byte trie).
class TokenMatcher {
 public:
  void Add(std::string_view s, int32_t id) {
    if (s.empty()) return;
    first_byte_[static_cast<uint8_t>(s[0])] = true;
    int32_t node = 0;
    for (char c : s) {
      const uint64_t key = (static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(c);
      auto [it, inserted] = edges_.try_emplace(key, static_cast<int32_t>(terminal_.size()));
      if (inserted) terminal_.push_back(-1);
      node = it->second;
    }
    if (terminal_[node] < 0) terminal_[node] = id;
  }
  bool empty() const { return terminal_.size() == 1; }
  // Finds the leftmost match at or after `from`; returns its start or npos; sets end and id.
  size_t Find(std::string_view text, size_t from, size_t* end, int32_t* id) const {
    for (size_t i = from; i < text.size(); ++i) {
      if (!first_byte_[static_cast<uint8_t>(text[i])]) continue;
      int32_t node = 0, best_id = -1;
      size_t best_end = 0;
      for (size_t j = i; j < text.size(); ++j) {
        const uint64_t key = (static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(text[j]);
        auto it = edges_.find(key);
        if (it == edges_.end()) break;
        node = it->second;
        if (terminal_[node] >= 0) {
          best_id = terminal_[node];
          best_end = j + 1;
        }
      }
      if (best_id >= 0) {
        *end = best_end;
        *id = best_id;
        return i;
      }
    }
    return std::string_view::npos;
  }

 private:
  std::array<bool, 256> first_byte_{};
  absl::flat_hash_map<uint64_t, int32_t> edges_;
  std::vector<int32_t> terminal_{-1};  // node 0 is the root
};

class BpeTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> Encode(std::string_view text, bool match_added_tokens) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 3 + 4);
    EncodeAppend(text, match_added_tokens, &ids);
    return ids;
  }

  void EncodeAppend(std::string_view text, bool match_added_tokens,
                    std::vector<int32_t>* ids) const override {
    if (!match_added_tokens) {
      EncodeOrdinary(text, ids);
      return;
    }
    // As the reference: tokens that skip normalization are split out first, then the others
    // inside what is left (with an identity normalizer the two differ only in precedence).
    SplitAdded(raw_tokens_, text, ids, [this](std::string_view gap, std::vector<int32_t>* out) {
      SplitAdded(normalized_tokens_, gap, out,
                 [this](std::string_view g, std::vector<int32_t>* o) { EncodeOrdinary(g, o); });
    });
  }

  std::string DecodeBytes(absl::Span<const int32_t> ids) const override {
    std::string out;
    size_t total = 0;
    for (int32_t id : ids) total += TokenBytes(id).size();
    out.reserve(total);
    for (int32_t id : ids) out.append(TokenBytes(id));
    return out;
  }

  std::string Decode(absl::Span<const int32_t> ids) const override {
    const std::string bytes = DecodeBytes(ids);
    if (base::IsValidUtf8(bytes)) return bytes;
    return base::Utf8Lossy(bytes);
  }

  std::string_view TokenBytes(int32_t id) const override {
    if (id < 0 || static_cast<size_t>(id) + 1 >= offsets_.size()) return {};
    return std::string_view(blob_).substr(offsets_[id], offsets_[id + 1] - offsets_[id]);
  }

  std::optional<int32_t> TokenToId(std::string_view token) const override {
    auto added = added_by_content_.find(absl::string_view(token.data(), token.size()));
    if (added != added_by_content_.end()) return added->second;
    auto spelled = spelled_to_id_.find(absl::string_view(token.data(), token.size()));
    if (spelled != spelled_to_id_.end()) return spelled->second;
    return std::nullopt;
  }

  std::optional<std::string> IdToToken(int32_t id) const override {
    if (id < 0 || id >= static_cast<int32_t>(spelled_.size())) return std::nullopt;
    if (!has_token_[id]) return std::nullopt;
    return spelled_[id];
  }

  bool IsAddedToken(int32_t id) const override {
    return id >= 0 && id < static_cast<int32_t>(kind_.size()) && kind_[id] != Kind::kNone &&
           kind_[id] != Kind::kVocab;
  }
  bool IsSpecial(int32_t id) const override {
    return id >= 0 && id < static_cast<int32_t>(kind_.size()) && kind_[id] == Kind::kSpecial;
  }
  const std::vector<AddedToken>& added_tokens() const override { return added_; }
  int32_t vocab_size() const override { return vocab_size_; }

  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(std::string_view json,
                                                         const LoadOptions& options);
  const BpeModel& bpe() const { return *bpe_; }

 private:
  enum class Kind : uint8_t { kNone, kVocab, kAdded, kSpecial };

  template <typename Gap>
  void SplitAdded(const TokenMatcher& matcher, std::string_view text, std::vector<int32_t>* ids,
                  Gap&& gap) const {
    if (matcher.empty()) {
      gap(text, ids);
      return;
    }
    size_t pos = 0;
    while (pos < text.size()) {
      size_t end = 0;
      int32_t id = -1;
      const size_t start = matcher.Find(text, pos, &end, &id);
      if (start == std::string_view::npos) break;
      if (start > pos) gap(text.substr(pos, start - pos), ids);
      ids->push_back(id);
      pos = end;
    }
    if (pos < text.size()) gap(text.substr(pos), ids);
  }

  // Pre-tokenizer + BPE on text with no added-token matching. Ill-formed UTF-8 cannot go through
  // the regexes, so each maximal ill-formed subpart becomes a piece of its own (its bytes are in
  // the byte-level vocabulary) and the well-formed runs around it are split as usual.
  void EncodeOrdinary(std::string_view text, std::vector<int32_t>* ids) const {
    if (text.empty()) return;
    auto emit = [this, ids](std::string_view piece) { bpe_->EncodeWord(piece, ids); };
    if (base::IsValidUtf8(text)) {
      pre_->Split(text, emit);
      return;
    }
    size_t i = 0, run = 0;
    while (i < text.size()) {
      const base::Utf8Step step = base::NextUtf8(text.substr(i));
      if (step.kind == base::Utf8Prefix::kComplete) {
        i += step.length;
        continue;
      }
      if (i > run) pre_->Split(text.substr(run, i - run), emit);
      bpe_->EncodeWord(text.substr(i, step.length), ids);
      i += step.length;
      run = i;
    }
    if (i > run) pre_->Split(text.substr(run, i - run), emit);
  }

  std::unique_ptr<BpeModel> bpe_;
  std::unique_ptr<PreTokenizer> pre_;
  TokenMatcher raw_tokens_, normalized_tokens_;
  std::vector<AddedToken> added_;
  absl::flat_hash_map<std::string, int32_t> added_by_content_;
  absl::flat_hash_map<std::string, int32_t> spelled_to_id_;  // vocabulary as written in the file
  std::vector<std::string> spelled_;                         // id -> token as written
  std::vector<bool> has_token_;
  std::vector<Kind> kind_;
  std::string blob_;               // every token's bytes, back to back
  std::vector<uint32_t> offsets_;  // id -> [offsets_[id], offsets_[id + 1]) in blob_
  int32_t vocab_size_ = 0;
};

// The ByteLevel decoder's rule: a token spelled entirely in the byte-level alphabet decodes to
// those bytes, any other token to its own UTF-8 text.
std::string DecodedBytes(std::string_view spelled) {
  std::string bytes;
  if (ByteLevelToBytes(spelled, &bytes)) return bytes;
  return std::string(spelled);
}

absl::Status CheckNormalizer(object root) {
  auto norm = OptionalField(root, "normalizer");
  if (!norm) return absl::OkStatus();
  EM_ASSIGN_OR_RETURN(object n, AsObject(*norm, "normalizer"));
  EM_ASSIGN_OR_RETURN(std::string_view type, TypeOf(n, "normalizer"));
  if (type == "Sequence") {
    EM_ASSIGN_OR_RETURN(element list, Field(n, "normalizer", "normalizers"));
    EM_ASSIGN_OR_RETURN(array a, AsArray(list, "normalizer.normalizers"));
    if (a.size() != 0) {
      return Invalid("normalizer.normalizers",
                     "only an empty Sequence (no normalization) is supported");
    }
    return absl::OkStatus();
  }
  return Invalid(
      "normalizer.type",
      absl::StrCat("'", std::string(type), "' is not supported (only null or an empty Sequence)"));
}

absl::Status CheckByteLevel(object o, std::string_view path, bool is_pre_tokenizer) {
  EM_ASSIGN_OR_RETURN(bool add_prefix_space,
                      OptionalBool(o, path, "add_prefix_space", /*fallback=*/false));
  if (is_pre_tokenizer) {
    if (add_prefix_space) {
      return Invalid(absl::StrCat(std::string(path), ".add_prefix_space"), "true is not supported");
    }
    EM_ASSIGN_OR_RETURN(bool use_regex, OptionalBool(o, path, "use_regex", /*fallback=*/true));
    if (use_regex) {
      return Invalid(absl::StrCat(std::string(path), ".use_regex"),
                     "true (the built-in GPT-2 split) is not supported; use Split steps");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> ParsePreTokenizer(object root) {
  auto pre = OptionalField(root, "pre_tokenizer");
  if (!pre) return Invalid("pre_tokenizer", "null is not supported (a ByteLevel step is required)");
  EM_ASSIGN_OR_RETURN(object p, AsObject(*pre, "pre_tokenizer"));
  EM_ASSIGN_OR_RETURN(std::string_view type, TypeOf(p, "pre_tokenizer"));
  std::vector<std::pair<object, std::string>> steps;
  if (type == "Sequence") {
    EM_ASSIGN_OR_RETURN(element list, Field(p, "pre_tokenizer", "pretokenizers"));
    EM_ASSIGN_OR_RETURN(array a, AsArray(list, "pre_tokenizer.pretokenizers"));
    size_t i = 0;
    for (element e : a) {
      const std::string path = absl::StrCat("pre_tokenizer.pretokenizers[", i++, "]");
      EM_ASSIGN_OR_RETURN(object o, AsObject(e, path));
      steps.emplace_back(o, path);
    }
  } else {
    steps.emplace_back(p, "pre_tokenizer");
  }
  std::vector<std::string> patterns;
  bool byte_level = false;
  for (const auto& [o, path] : steps) {
    EM_ASSIGN_OR_RETURN(std::string_view step_type, TypeOf(o, path));
    if (byte_level) {
      return Invalid(path, absl::StrCat("a '", std::string(step_type),
                                        "' step after ByteLevel is not supported"));
    }
    if (step_type == "ByteLevel") {
      EM_RETURN_IF_ERROR(CheckByteLevel(o, path, /*is_pre_tokenizer=*/true));
      byte_level = true;
      continue;
    }
    if (step_type != "Split") {
      return Invalid(absl::StrCat(path, ".type"),
                     absl::StrCat("'", std::string(step_type),
                                  "' is not supported (only Split and ByteLevel)"));
    }
    EM_ASSIGN_OR_RETURN(element behavior_e, Field(o, path, "behavior"));
    EM_ASSIGN_OR_RETURN(std::string_view behavior,
                        AsString(behavior_e, absl::StrCat(path, ".behavior")));
    if (behavior != "Isolated") {
      return Invalid(
          absl::StrCat(path, ".behavior"),
          absl::StrCat("'", std::string(behavior), "' is not supported (only Isolated)"));
    }
    EM_ASSIGN_OR_RETURN(bool invert, OptionalBool(o, path, "invert", false));
    if (invert) return Invalid(absl::StrCat(path, ".invert"), "true is not supported");
    EM_ASSIGN_OR_RETURN(element pattern_e, Field(o, path, "pattern"));
    EM_ASSIGN_OR_RETURN(object pattern, AsObject(pattern_e, absl::StrCat(path, ".pattern")));
    element regex;
    if (pattern.at_key("Regex").get(regex) == simdjson::SUCCESS) {
      EM_ASSIGN_OR_RETURN(std::string_view r,
                          AsString(regex, absl::StrCat(path, ".pattern.Regex")));
      patterns.emplace_back(r);
    } else {
      return Invalid(absl::StrCat(path, ".pattern"),
                     "only {\"Regex\": ...} patterns are supported");
    }
  }
  if (!byte_level) return Invalid("pre_tokenizer", "a ByteLevel step is required (byte-level BPE)");
  return patterns;
}

absl::Status CheckDecoder(object root) {
  auto dec = OptionalField(root, "decoder");
  if (!dec) return Invalid("decoder", "null is not supported (only ByteLevel)");
  EM_ASSIGN_OR_RETURN(object d, AsObject(*dec, "decoder"));
  EM_ASSIGN_OR_RETURN(std::string_view type, TypeOf(d, "decoder"));
  if (type != "ByteLevel") {
    return Invalid("decoder.type",
                   absl::StrCat("'", std::string(type), "' is not supported (only ByteLevel)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<AddedToken>> ParseAddedTokens(object root) {
  std::vector<AddedToken> out;
  auto list = OptionalField(root, "added_tokens");
  if (!list) return out;
  EM_ASSIGN_OR_RETURN(array a, AsArray(*list, "added_tokens"));
  size_t i = 0;
  for (element e : a) {
    const std::string path = absl::StrCat("added_tokens[", i++, "]");
    EM_ASSIGN_OR_RETURN(object o, AsObject(e, path));
    AddedToken t;
    EM_ASSIGN_OR_RETURN(element id, Field(o, path, "id"));
    EM_ASSIGN_OR_RETURN(t.id, AsId(id, absl::StrCat(path, ".id")));
    EM_ASSIGN_OR_RETURN(element content, Field(o, path, "content"));
    EM_ASSIGN_OR_RETURN(std::string_view c, AsString(content, absl::StrCat(path, ".content")));
    if (c.empty()) return Invalid(absl::StrCat(path, ".content"), "empty");
    t.content = std::string(c);
    EM_ASSIGN_OR_RETURN(t.special, OptionalBool(o, path, "special", false));
    EM_ASSIGN_OR_RETURN(t.normalized, OptionalBool(o, path, "normalized", !t.special));
    for (const char* flag : {"lstrip", "rstrip", "single_word"}) {
      EM_ASSIGN_OR_RETURN(bool set, OptionalBool(o, path, flag, false));
      if (set) {
        return Invalid(absl::StrCat(path, ".", flag),
                       absl::StrCat("true is not supported (token '", t.content, "')"));
      }
    }
    out.push_back(std::move(t));
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> BpeTokenizer::Load(std::string_view json,
                                                              const LoadOptions& options) {
  simdjson::dom::parser parser;
  simdjson::padded_string padded(json.data(), json.size());
  element doc;
  if (auto error = parser.parse(padded).get(doc); error != simdjson::SUCCESS) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.json is not valid JSON: ", simdjson::error_message(error)));
  }
  EM_ASSIGN_OR_RETURN(object root, AsObject(doc, "tokenizer.json"));
  EM_RETURN_IF_ERROR(CheckNormalizer(root));
  EM_ASSIGN_OR_RETURN(std::vector<std::string> patterns, ParsePreTokenizer(root));
  EM_RETURN_IF_ERROR(CheckDecoder(root));
  EM_ASSIGN_OR_RETURN(std::vector<AddedToken> added, ParseAddedTokens(root));

  // model
  EM_ASSIGN_OR_RETURN(element model_e, Field(root, "tokenizer.json", "model"));
  EM_ASSIGN_OR_RETURN(object model, AsObject(model_e, "model"));
  {
    // Files written by older versions of the reference omit model.type; BPE is then implied.
    auto type_e = OptionalField(model, "type");
    if (type_e) {
      EM_ASSIGN_OR_RETURN(std::string_view type, AsString(*type_e, "model.type"));
      if (type != "BPE") return Invalid("model.type", "only BPE is supported");
    }
  }
  if (auto dropout = OptionalField(model, "dropout")) {
    double d = 0;
    if (dropout->get_double().get(d) != simdjson::SUCCESS || d != 0.0) {
      return Invalid("model.dropout", "only null is supported");
    }
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (auto e = OptionalField(model, key)) {
      EM_ASSIGN_OR_RETURN(std::string_view s, AsString(*e, absl::StrCat("model.", key)));
      if (!s.empty()) return Invalid(absl::StrCat("model.", key), "only null is supported");
    }
  }
  EM_ASSIGN_OR_RETURN(bool byte_fallback, OptionalBool(model, "model", "byte_fallback", false));
  if (byte_fallback) return Invalid("model.byte_fallback", "true is not supported");
  BpeModel::Options bpe_options;
  EM_ASSIGN_OR_RETURN(bpe_options.ignore_merges,
                      OptionalBool(model, "model", "ignore_merges", false));
  EM_ASSIGN_OR_RETURN(bpe_options.fuse_unk, OptionalBool(model, "model", "fuse_unk", false));

  EM_ASSIGN_OR_RETURN(element vocab_e, Field(model, "model", "vocab"));
  EM_ASSIGN_OR_RETURN(object vocab_o, AsObject(vocab_e, "model.vocab"));
  std::vector<std::pair<std::string, int32_t>> vocab;
  vocab.reserve(vocab_o.size());
  for (auto [key, value] : vocab_o) {
    EM_ASSIGN_OR_RETURN(int32_t id,
                        AsId(value, absl::StrCat("model.vocab[\"", std::string(key), "\"]")));
    vocab.emplace_back(std::string(key), id);
  }
  if (vocab.empty()) return Invalid("model.vocab", "empty");

  EM_ASSIGN_OR_RETURN(element merges_e, Field(model, "model", "merges"));
  EM_ASSIGN_OR_RETURN(array merges_a, AsArray(merges_e, "model.merges"));
  std::vector<BpeModel::Merge> merges;
  merges.reserve(merges_a.size());
  size_t m = 0;
  for (element e : merges_a) {
    const std::string path = absl::StrCat("model.merges[", m++, "]");
    BpeModel::Merge merge;
    std::string_view s;
    array pair;
    if (e.get_string().get(s) == simdjson::SUCCESS) {
      // "a b": byte-level tokens never hold a plain space, so the first space separates them.
      const size_t space = s.find(' ');
      if (space == std::string_view::npos || space == 0 || space + 1 >= s.size() ||
          s.find(' ', space + 1) != std::string_view::npos) {
        return Invalid(path, absl::StrCat("expected \"left right\", got \"", std::string(s), "\""));
      }
      merge.left = std::string(s.substr(0, space));
      merge.right = std::string(s.substr(space + 1));
    } else if (e.get_array().get(pair) == simdjson::SUCCESS) {
      if (pair.size() != 2) return Invalid(path, "expected a pair [left, right]");
      EM_ASSIGN_OR_RETURN(std::string_view l, AsString(pair.at(0).value_unsafe(), path + "[0]"));
      EM_ASSIGN_OR_RETURN(std::string_view r, AsString(pair.at(1).value_unsafe(), path + "[1]"));
      merge.left = std::string(l);
      merge.right = std::string(r);
    } else {
      return Invalid(path, absl::StrCat("expected a string or a pair, got ", TypeName(e)));
    }
    merges.push_back(std::move(merge));
  }

  auto tok = std::unique_ptr<BpeTokenizer>(new BpeTokenizer());
  // Ids: vocabulary first, then the added tokens (which take precedence for an id in both).
  int32_t max_id = -1;
  for (const auto& [token, id] : vocab) max_id = std::max(max_id, id);
  for (const AddedToken& t : added) max_id = std::max(max_id, t.id);

  // Overlay: extra tokens whose id and content are both new.
  {
    absl::flat_hash_set<int32_t> ids;
    absl::flat_hash_set<std::string> contents;
    for (const AddedToken& t : added) {
      ids.insert(t.id);
      contents.insert(t.content);
    }
    for (const AddedToken& t : options.extra_added_tokens) {
      if (ids.contains(t.id) || contents.contains(t.content)) continue;
      added.push_back(t);
      max_id = std::max(max_id, t.id);
    }
  }
  tok->vocab_size_ = std::max(max_id + 1, options.min_vocab_size);
  const size_t n = static_cast<size_t>(tok->vocab_size_);
  tok->spelled_.assign(n, std::string());
  tok->has_token_.assign(n, false);
  tok->kind_.assign(n, Kind::kNone);
  tok->spelled_to_id_.reserve(vocab.size());
  for (const auto& [token, id] : vocab) {
    if (tok->has_token_[id]) {
      return Invalid("model.vocab", absl::StrCat("id ", id, " is used by two tokens ('",
                                                 tok->spelled_[id], "' and '", token, "')"));
    }
    tok->spelled_[id] = token;
    tok->has_token_[id] = true;
    tok->kind_[id] = Kind::kVocab;
    tok->spelled_to_id_[token] = id;
  }
  for (const AddedToken& t : added) {
    if (tok->kind_[t.id] == Kind::kAdded || tok->kind_[t.id] == Kind::kSpecial) {
      return Invalid("added_tokens", absl::StrCat("id ", t.id, " is listed twice"));
    }
    if (!tok->added_by_content_.try_emplace(t.content, t.id).second) {
      return Invalid("added_tokens", absl::StrCat("content '", t.content, "' is listed twice"));
    }
    tok->spelled_[t.id] = t.content;
    tok->has_token_[t.id] = true;
    tok->kind_[t.id] = t.special ? Kind::kSpecial : Kind::kAdded;
    (t.normalized ? tok->normalized_tokens_ : tok->raw_tokens_).Add(t.content, t.id);
  }
  std::sort(added.begin(), added.end(),
            [](const AddedToken& a, const AddedToken& b) { return a.id < b.id; });
  tok->added_ = std::move(added);

  tok->offsets_.resize(n + 1);
  for (size_t id = 0; id < n; ++id) {
    tok->offsets_[id] = static_cast<uint32_t>(tok->blob_.size());
    if (tok->has_token_[id]) tok->blob_.append(DecodedBytes(tok->spelled_[id]));
  }
  tok->offsets_[n] = static_cast<uint32_t>(tok->blob_.size());

  if (auto unk = OptionalField(model, "unk_token")) {
    EM_ASSIGN_OR_RETURN(std::string_view u, AsString(*unk, "model.unk_token"));
    auto it = tok->spelled_to_id_.find(absl::string_view(u.data(), u.size()));
    if (it == tok->spelled_to_id_.end()) {
      return Invalid("model.unk_token",
                     absl::StrCat("'", std::string(u), "' is not in model.vocab"));
    }
    bpe_options.unk_id = it->second;
  }
  EM_ASSIGN_OR_RETURN(tok->bpe_, BpeModel::Create(vocab, merges, bpe_options));
  EM_ASSIGN_OR_RETURN(tok->pre_, PreTokenizer::Create(patterns));
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view json) {
  return BpeTokenizer::Load(json, LoadOptions());
}
absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view json,
                                                               const LoadOptions& options) {
  return BpeTokenizer::Load(json, options);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  return FromFile(path, LoadOptions());
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path,
                                                               const LoadOptions& options) {
  auto file = base::MappedFile::Open(path);
  if (!file.ok()) return base::Annotate(file.status(), absl::StrCat("tokenizer ", path));
  auto tok = BpeTokenizer::Load((*file)->view(), options);
  if (!tok.ok()) return base::Annotate(tok.status(), path);
  return tok;
}

const BpeModel& BpeForTesting(const Tokenizer& tokenizer) {
  return dynamic_cast<const BpeTokenizer&>(tokenizer).bpe();
}

std::vector<AddedToken> DeepSeekV4AddedTokens() {
  struct Known {
    int32_t id;
    const char* content;
  };
  // Published DeepSeek-V4 control tokens (../shared/design/CHAT_FORMAT.md, Special strings).
  static constexpr Known kKnown[] = {
      {128821, "<think>"},
      {128822, "</think>"},
      {128825, "\uFF5CDSML\uFF5C"},
      {128828, "<\uFF5Clatest_reminder\uFF5C>"},
      {128829, "<\uFF5Caction\uFF5C>"},
      {128830, "<\uFF5Cquery\uFF5C>"},
      {128831, "<\uFF5Cauthority\uFF5C>"},
      {128832, "<\uFF5Cdomain\uFF5C>"},
      {128836, "<\uFF5Ctitle\uFF5C>"},
      {128845, "<\uFF5Cread_url\uFF5C>"},
  };
  constexpr int32_t kFirst = 128815, kLast = 128845;
  std::vector<AddedToken> out;
  for (int32_t id = kFirst; id <= kLast; ++id) {
    AddedToken t;
    t.id = id;
    t.special = true;
    t.normalized = false;
    for (const Known& k : kKnown) {
      if (k.id == id) t.content = k.content;
    }
    if (t.content.empty()) {
      t.content = absl::StrCat("<\uFF5Cplace\u2581holder\u2581no\u2581", id - 128000, "\uFF5C>");
    }
    out.push_back(std::move(t));
  }
  return out;
}

std::string DefaultTokenizerPath() {
  const char* env = std::getenv("EXPERTMESH_TOKENIZER");
  if (env != nullptr && env[0] != '\0') return env;
  return EM_TOKENIZER_DEFAULT_PATH;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadDefaultTokenizer() {
  const std::string path = DefaultTokenizerPath();
  LoadOptions options;
  options.extra_added_tokens = DeepSeekV4AddedTokens();
  options.min_vocab_size = kDeepSeekVocabRows;
  auto tok = Tokenizer::FromFile(path, options);
  if (absl::IsNotFound(tok.status())) {
    return absl::NotFoundError(absl::StrCat(
        "the default tokenizer file ", path,
        " is missing: run scripts/setup.sh (it installs the DeepSeek-V3 tokenizer.json), or pass "
        "--tokenizer FILE / set EXPERTMESH_TOKENIZER"));
  }
  return tok;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& path) {
  if (path.empty()) return LoadDefaultTokenizer();
  return Tokenizer::FromFile(path);
}

}  // namespace expertmesh::tokenizer
