// Tokenizer benchmark (not a test): single-thread encode and decode throughput of our tokenizer
// and, in the same run on the same input, of the JavaScript reference (@lenml/tokenizers with
// the DeepSeek-V3 file, run with node). The input is a deterministic mix of prose, code, CJK,
// numbers, other scripts and the texts of ../shared/tokenizer/vectors.jsonl, at least 10 MB.
//
// usage: tokenizer_bench [--mb N] [--tokenizer FILE] [--corpus-out FILE] [--js-modules DIR]
//   --js-modules DIR: directory holding node_modules with the reference packages (installed by
//   bench/tokenizer_bench.sh); without it only our side runs.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/base/random.h"
#include "core/base/utf8.h"
#include "core/tokenizer/pretokenizer.h"
#include "core/tokenizer/tokenizer.h"

namespace {

using Clock = std::chrono::steady_clock;
using expertmesh::base::AppendCodePoint;
using expertmesh::tokenizer::Tokenizer;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// splitmix64: the same corpus on every machine and compiler.
struct Rng {
  expertmesh::base::SplitMix64 gen;
  uint64_t Next() { return gen.Next(); }
  size_t Below(size_t n) { return static_cast<size_t>(Next() % n); }
  template <typename T, size_t N>
  const T& Pick(const T (&a)[N]) {
    return a[Below(N)];
  }
};

const char* const kWords[] = {"the",
                              "of",
                              "and",
                              "to",
                              "in",
                              "is",
                              "that",
                              "for",
                              "it",
                              "as",
                              "was",
                              "with",
                              "be",
                              "by",
                              "on",
                              "not",
                              "he",
                              "this",
                              "are",
                              "or",
                              "his",
                              "from",
                              "at",
                              "which",
                              "but",
                              "have",
                              "an",
                              "had",
                              "they",
                              "you",
                              "were",
                              "their",
                              "one",
                              "all",
                              "we",
                              "can",
                              "her",
                              "has",
                              "there",
                              "been",
                              "if",
                              "more",
                              "when",
                              "will",
                              "would",
                              "who",
                              "so",
                              "no",
                              "model",
                              "expert",
                              "token",
                              "network",
                              "memory",
                              "latency",
                              "throughput",
                              "attention",
                              "gateway",
                              "request",
                              "server",
                              "distributed",
                              "inference",
                              "weights",
                              "cluster",
                              "measurement",
                              "performance",
                              "history",
                              "river",
                              "mountain",
                              "government",
                              "language",
                              "understanding",
                              "although",
                              "particularly",
                              "nevertheless",
                              "approximately",
                              "responsibility",
                              "environment",
                              "characteristic",
                              "Wednesday",
                              "September",
                              "international",
                              "philosophy",
                              "architecture",
                              "experiment",
                              "quickly",
                              "beautiful",
                              "difficult",
                              "important",
                              "possible",
                              "different",
                              "general",
                              "small",
                              "large",
                              "early",
                              "young",
                              "public",
                              "available",
                              "similar",
                              "recent",
                              "various"};
const char* const kIdents[] = {"buffer",    "index",     "count",        "result",
                               "value",     "config",    "tokens",       "kv_cache",
                               "expert_id", "layerNorm", "hiddenStates", "x",
                               "i",         "MAX_BATCH", "router",       "std::vector<int32_t>",
                               "self",      "ctx"};
const char* const kOther[] = {"Москва", "развитие", "экономика", "Αθήνα",      "φιλοσοφία",
                              "Straße", "Größe",    "naïve",     "café",       "한국어",
                              "서울",   "العربية",  "हिन्दी",     "ภาษาไทย",    "tiếng Việt",
                              "🙂",   "🚀",        "👍🏽",  "🧑‍💻"};

void Prose(Rng& r, std::string* d) {
  const size_t sentences = 8 + r.Below(30);
  for (size_t s = 0; s < sentences; ++s) {
    const size_t words = 5 + r.Below(20);
    for (size_t w = 0; w < words; ++w) {
      std::string word = r.Pick(kWords);
      if (w == 0) word[0] = static_cast<char>(std::toupper(word[0]));
      if (w > 0) d->push_back(' ');
      d->append(word);
      if (w + 1 < words && r.Below(12) == 0) d->push_back(',');
    }
    d->append(r.Below(8) == 0 ? "?" : ".");
    d->append(r.Below(6) == 0 ? "\n\n" : " ");
  }
}

void Code(Rng& r, std::string* d) {
  const size_t lines = 10 + r.Below(40);
  int indent = 0;
  for (size_t l = 0; l < lines; ++l) {
    d->append(static_cast<size_t>(indent) * 2, ' ');
    switch (r.Below(6)) {
      case 0:
        d->append("for (int ").append(r.Pick(kIdents)).append(" = 0; i < ").append(r.Pick(kIdents));
        d->append(".size(); ++i) {\n");
        ++indent;
        break;
      case 1:
        d->append("auto ").append(r.Pick(kIdents)).append(" = ").append(r.Pick(kIdents));
        d->append("->Get(").append(std::to_string(r.Below(4096))).append(");\n");
        break;
      case 2:
        d->append("if (").append(r.Pick(kIdents)).append(" != nullptr && ");
        d->append(r.Pick(kIdents))
            .append(" >= ")
            .append(std::to_string(r.Below(100)))
            .append(") {\n");
        ++indent;
        break;
      case 3:
        d->append("// ").append(r.Pick(kWords)).append(" ").append(r.Pick(kWords)).append("\n");
        break;
      case 4:
        d->append("def ").append(r.Pick(kIdents)).append("(self, ").append(r.Pick(kIdents));
        d->append("):\n");
        break;
      default:
        if (indent > 0) {
          --indent;
          d->append("}\n");
        } else {
          d->append("return ").append(r.Pick(kIdents)).append(";\n");
        }
    }
  }
}

void Cjk(Rng& r, std::string* d) {
  const size_t n = 200 + r.Below(800);
  for (size_t i = 0; i < n; ++i) {
    const size_t k = r.Below(100);
    if (k < 70) {
      // Common hanzi sit early in the block: skew towards them.
      AppendCodePoint(0x4E00 + static_cast<char32_t>(r.Below(r.Below(4) == 0 ? 0x51A5 : 0x1000)),
                      d);
    } else if (k < 85) {
      AppendCodePoint(0x3041 + static_cast<char32_t>(r.Below(0x56)), d);  // hiragana
    } else if (k < 92) {
      AppendCodePoint(0x30A1 + static_cast<char32_t>(r.Below(0x5A)), d);  // katakana
    } else if (k < 97) {
      d->append(r.Below(2) == 0 ? "，" : "。");
    } else {
      d->append(std::to_string(r.Below(2030)));
    }
  }
}

void Numbers(Rng& r, std::string* d) {
  const size_t rows = 10 + r.Below(40);
  for (size_t i = 0; i < rows; ++i) {
    d->append(std::to_string(2000 + r.Below(30)))
        .append("-0")
        .append(std::to_string(1 + r.Below(9)));
    d->append("-1").append(std::to_string(r.Below(10))).append(", ");
    d->append(std::to_string(r.Below(1000000))).append(".").append(std::to_string(r.Below(100)));
    d->append(", ").append(std::to_string(r.Next() % 10000000000ULL)).append(", $");
    d->append(std::to_string(r.Below(99999))).append("\n");
  }
}

void Other(Rng& r, std::string* d) {
  const size_t n = 30 + r.Below(100);
  for (size_t i = 0; i < n; ++i) {
    d->append(r.Pick(kOther));
    d->append(r.Below(10) == 0 ? ".\n" : " ");
  }
}

std::vector<std::string> MakeCorpus(size_t min_bytes, const std::string& vectors_path) {
  std::vector<std::string> vector_texts;
  std::ifstream in(vectors_path);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("text")) vector_texts.push_back(j["text"].get<std::string>());
  }
  Rng r{expertmesh::base::SplitMix64(20261125)};
  std::vector<std::string> docs;
  size_t total = 0;
  while (total < min_bytes) {
    std::string d;
    const size_t k = r.Below(100);
    if (k < 45) {
      Prose(r, &d);
    } else if (k < 65) {
      Code(r, &d);
    } else if (k < 80) {
      Cjk(r, &d);
    } else if (k < 88) {
      Numbers(r, &d);
    } else if (k < 95) {
      Other(r, &d);
    } else if (!vector_texts.empty()) {
      for (int i = 0; i < 20; ++i)
        d.append(vector_texts[r.Below(vector_texts.size())]).append("\n");
    }
    total += d.size();
    docs.push_back(std::move(d));
  }
  return docs;
}

struct Figures {
  double encode_s = 0, decode_s = 0;
  size_t tokens = 0, decoded_bytes = 0;
};

Figures RunOurs(const Tokenizer& tok, const std::vector<std::string>& docs) {
  // The same warm-up as the JavaScript side: 20 documents.
  for (size_t i = 0; i < docs.size() && i < 20; ++i) (void)tok.Encode(docs[i]);
  Figures f;
  std::vector<std::vector<int32_t>> ids(docs.size());
  auto t0 = Clock::now();
  for (size_t i = 0; i < docs.size(); ++i) ids[i] = tok.Encode(docs[i]);
  auto t1 = Clock::now();
  f.encode_s = Seconds(t0, t1);
  for (const auto& v : ids) f.tokens += v.size();
  t0 = Clock::now();
  for (const auto& v : ids) f.decoded_bytes += tok.Decode(v).size();
  t1 = Clock::now();
  f.decode_s = Seconds(t0, t1);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  size_t mb = 12;
  std::string tokenizer_path = EM_DEPS_DIR "/tokenizer/deepseek_v3/tokenizer.json";
  std::string corpus_out = "/tmp/expertmesh_tokenizer_corpus.jsonl";
  std::string js_modules;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--mb") {
      mb = std::stoul(value());
    } else if (a == "--tokenizer") {
      tokenizer_path = value();
    } else if (a == "--corpus-out") {
      corpus_out = value();
    } else if (a == "--js-modules") {
      js_modules = value();
    } else {
      std::fprintf(stderr,
                   "usage: %s [--mb N] [--tokenizer FILE] [--corpus-out FILE] "
                   "[--js-modules DIR]\n",
                   argv[0]);
      return 2;
    }
  }

  auto tok = Tokenizer::FromFile(tokenizer_path);
  if (!tok.ok()) {
    std::fprintf(stderr, "%s\n", std::string(tok.status().message()).c_str());
    return 1;
  }
  const std::vector<std::string> docs =
      MakeCorpus(mb * 1000 * 1000, EM_SHARED_DIR "/tokenizer/vectors.jsonl");
  size_t bytes = 0;
  {
    std::ofstream out(corpus_out, std::ios::binary | std::ios::trunc);
    for (const std::string& d : docs) {
      bytes += d.size();
      out << nlohmann::json{{"text", d}}.dump() << "\n";
    }
  }
  std::printf("corpus: %zu documents, %.2f MB (%s)\n", docs.size(), bytes / 1e6,
              corpus_out.c_str());

  // Pre-tokenizer alone: the hand-written DeepSeek splitter against the PCRE2 regex path.
  {
    auto fast = expertmesh::tokenizer::PreTokenizer::Create(
        {expertmesh::tokenizer::kDeepSeekPatterns[0], expertmesh::tokenizer::kDeepSeekPatterns[1],
         expertmesh::tokenizer::kDeepSeekPatterns[2]});
    if (fast.ok()) {
      size_t pieces_fast = 0, pieces_regex = 0;
      auto t0 = Clock::now();
      for (const auto& d : docs) (*fast)->Split(d, [&](std::string_view) { ++pieces_fast; });
      auto t1 = Clock::now();
      for (const auto& d : docs) (*fast)->SplitRegex(d, [&](std::string_view) { ++pieces_regex; });
      auto t2 = Clock::now();
      std::printf(
          "pre-tokenize: %s %.1f MB/s (%zu pieces), PCRE2 regex path %.1f MB/s (%zu pieces)\n",
          (*fast)->has_fast_path() ? "fast path" : "(no fast path)", bytes / 1e6 / Seconds(t0, t1),
          pieces_fast, bytes / 1e6 / Seconds(t1, t2), pieces_regex);
    }
  }

  const Figures ours = RunOurs(**tok, docs);
  std::printf("ours: encode %.2f MB/s, %.2f M tokens/s (%zu tokens in %.3f s); decode %.1f MB/s\n",
              bytes / 1e6 / ours.encode_s, ours.tokens / 1e6 / ours.encode_s, ours.tokens,
              ours.encode_s, ours.decoded_bytes / 1e6 / ours.decode_s);

  if (js_modules.empty()) return 0;
  const std::string cmd = "node \"" EM_SOURCE_DIR "/bench/tokenizer_js/run.mjs\" \"" + js_modules +
                          "\" \"" + corpus_out + "\" 2>&1";
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(cmd.c_str(), "r"), pclose);
  if (!pipe) {
    std::fprintf(stderr, "cannot run %s\n", cmd.c_str());
    return 1;
  }
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), pipe.get())) > 0) out.append(buf, n);
  auto js = nlohmann::json::parse(out, nullptr, false);
  if (!js.is_object() || !js.contains("encode_s")) {
    if (out.size() > 2000) out = "..." + out.substr(out.size() - 2000);
    std::fprintf(stderr, "the JavaScript reference failed: %s\n", out.c_str());
    return 1;
  }
  const double js_encode_s = js["encode_s"].get<double>();
  const double js_decode_s = js["decode_s"].get<double>();
  const size_t js_tokens = js["tokens"].get<size_t>();
  std::printf(
      "js (%s): encode %.2f MB/s, %.3f M tokens/s (%zu tokens in %.3f s); decode %.1f MB/s\n",
      js["node"].get<std::string>().c_str(), bytes / 1e6 / js_encode_s,
      js_tokens / 1e6 / js_encode_s, js_tokens, js_encode_s,
      js["decoded_bytes"].get<size_t>() / 1e6 / js_decode_s);
  // The reference's \s differs from Hugging Face's on U+0085 and U+FEFF (some vector texts in
  // the corpus hold them), so its count may differ slightly; ours equals Hugging Face's ids.
  std::printf(
      "token counts: ours %zu, js %zu (%s)\n", ours.tokens, js_tokens,
      ours.tokens == js_tokens ? "equal" : "differ: see docs/tokenizer.md on U+0085/U+FEFF");
  std::printf("ratio ours/js: encode %.1fx, decode %.1fx\n", js_encode_s / ours.encode_s,
              js_decode_s / ours.decode_s);
  return 0;
}
