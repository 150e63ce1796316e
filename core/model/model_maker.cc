#include "core/model/model_maker.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/base/mapped_file.h"
#include "core/base/random.h"
#include "core/base/status_macros.h"
#include "core/model/checkpoint.h"
#include "core/model/safetensors.h"

namespace expertmesh::model {
namespace {

// ---- Deterministic randomness: integer-only, so every platform gives the same bits. ----

class Rng {
 public:
  Rng(uint64_t seed, std::string_view stream) : gen_(seed, stream) {}
  uint32_t Below(uint32_t n) { return gen_.Below(n); }
  // Approximately standard normal: the Irwin-Hall sum of four 16-bit uniforms, centred and
  // scaled to unit variance (bounded at +-3.46). Integer math plus one exact-rounded multiply,
  // so unlike std::normal_distribution or Box-Muller on libm it is the same everywhere.
  float Normal() {
    uint64_t r = gen_.Next();
    int64_t s = static_cast<int64_t>(r & 0xffff) + static_cast<int64_t>((r >> 16) & 0xffff) +
                static_cast<int64_t>((r >> 32) & 0xffff) + static_cast<int64_t>(r >> 48);
    // Var of one 16-bit uniform = (65536^2 - 1)/12, of the sum: 4x; 1/sqrt(that) ~ 2.6431e-5.
    return static_cast<float>(s - 131070) * 2.64306e-5f;
  }

 private:
  base::SplitMix64 gen_;
};

// ---- Encodings (MODEL.md, Checkpoint format). ----

uint16_t ToBF16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7fff + ((bits >> 16) & 1);  // round to nearest even (inputs are finite)
  return static_cast<uint16_t>(bits >> 16);
}

// Scale exponent of a block: 2^ceil(log2(amax / qmax)), amax floored (numerics contract).
int ScaleExponent(float amax, float qmax, float floor_amax) {
  double a = std::max<double>(amax, floor_amax) / qmax;
  int e;
  double m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  return m == 0.5 ? e - 1 : e;
}

// Nearest e4m3 code of x (|x| <= 448 after scaling), ties to even.
uint8_t ToE4M3Code(float x) {
  uint8_t sign = std::signbit(x) ? 0x80 : 0;
  double a = std::fabs(static_cast<double>(x));
  if (a >= 448.0) return sign | 0x7e;
  if (a < std::ldexp(1.0, -6)) {  // subnormal: multiples of 2^-9
    double q = std::nearbyint(std::ldexp(a, 9));
    return sign | static_cast<uint8_t>(q);  // q == 8 is exactly the smallest normal's code
  }
  int e;
  double m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1) -> 1.f * 2^(e-1)
  int exp = e - 1;
  double q = std::nearbyint((m * 2.0 - 1.0) * 8.0);
  if (q == 8.0) {
    q = 0;
    ++exp;
  }
  int field = exp + 7;
  if (field > 15 || (field == 15 && q > 6)) return sign | 0x7e;
  return sign | static_cast<uint8_t>((field << 3) | static_cast<int>(q));
}

// Nearest e2m1 code of x (|x| <= 6 after scaling), ties to the even code.
uint8_t ToE2M1Code(float x) {
  static constexpr float kGrid[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
  uint8_t sign = std::signbit(x) ? 8 : 0;
  float a = std::fabs(x);
  int best = 0;
  for (int i = 1; i < 8; ++i) {
    float mid = 0.5f * (kGrid[i - 1] + kGrid[i]);
    if (a > mid || (a == mid && i % 2 == 0)) best = i;
  }
  if (best == 0) sign = 0;
  return sign | static_cast<uint8_t>(best);
}

// ---- What to write. ----

enum class Kind {
  kFp8Matrix,   // F8_E4M3 weight + E8M0 block scales; N(0, 1/cols)
  kFp4Matrix,   // I8 e2m1 pairs + E8M0 per-32 scales; N(0, 1/cols)
  kBf16Matrix,  // BF16; N(0, 1/cols)
  kF32Matrix,   // F32; N(0, 1/cols)
  kEmbedding,   // BF16; N(0, 1)
  kNorm,        // BF16; 1 + 0.1 N
  kF32Normal,   // F32; mean + std N
  kTid2Eid,     // I32 [V, k]: k distinct experts per token
};

struct Param {
  Kind kind;
  std::vector<int64_t> shape;  // logical [rows, cols] for matrices
  float mean = 0;
  float std = 1;
  std::string seed_name;  // whose random stream to use (MTP copies reuse the trunk's)
};

class Maker {
 public:
  Maker(const ModelConfig& c, uint64_t seed) : c_(c), seed_(seed) {}

  void Plan() {
    const int64_t V = c_.vocab_size, D = c_.hidden_size;
    Add("embed.weight", {Kind::kEmbedding, {V, D}});
    Add("head.weight", {Kind::kF32Matrix, {V, D}});
    Add("norm.weight", {Kind::kNorm, {D}});
    HcHead("");
    for (int b = 0; b < c_.NumBlocks(); ++b) Block(b);
  }

  std::vector<TensorSpec> Specs() const {
    std::vector<TensorSpec> specs;
    for (const auto& [name, p] : params_) {
      switch (p.kind) {
        case Kind::kFp8Matrix: {
          const int64_t br = c_.weight_block_size.rows, bc = c_.weight_block_size.cols;
          specs.push_back({name + "weight", DType::kF8E4M3, p.shape});
          specs.push_back({name + "scale",
                           DType::kF8E8M0,
                           {(p.shape[0] + br - 1) / br, (p.shape[1] + bc - 1) / bc}});
          break;
        }
        case Kind::kFp4Matrix:
          specs.push_back({name + "weight", DType::kI8, {p.shape[0], p.shape[1] / 2}});
          specs.push_back({name + "scale", DType::kF8E8M0, {p.shape[0], p.shape[1] / 32}});
          break;
        case Kind::kBf16Matrix:
        case Kind::kEmbedding:
        case Kind::kNorm:
          specs.push_back({name, DType::kBF16, p.shape});
          break;
        case Kind::kF32Matrix:
        case Kind::kF32Normal:
          specs.push_back({name, DType::kF32, p.shape});
          break;
        case Kind::kTid2Eid:
          specs.push_back({name, DType::kI32, p.shape});
          break;
      }
    }
    return specs;
  }

  // Fills the bytes of one file tensor. A quantized pair is generated once: the part not asked
  // for yet waits in pending_ (the layout puts "x.scale" right before "x.weight").
  absl::Status Produce(const TensorSpec& spec, std::vector<uint8_t>* out) {
    if (auto it = pending_.find(spec.name); it != pending_.end()) {
      *out = std::move(it->second);
      pending_.erase(it);
      return absl::OkStatus();
    }
    std::string key = spec.name;
    std::string sibling;
    if (!params_.contains(key)) {
      // A quantized pair is planned under its prefix "<...>." .
      for (const char* suffix : {"weight", "scale"}) {
        if (absl::EndsWith(spec.name, suffix)) {
          key = spec.name.substr(0, spec.name.size() - std::strlen(suffix));
        }
      }
    }
    auto it = params_.find(key);
    if (it == params_.end()) {
      return absl::InternalError(absl::StrCat("make-model: no plan for tensor '", spec.name, "'"));
    }
    const Param& p = it->second;
    Rng rng(seed_, p.seed_name.empty() ? key : p.seed_name);
    const int64_t n = NumElements(p.shape);
    switch (p.kind) {
      case Kind::kFp8Matrix:
      case Kind::kFp4Matrix: {
        std::vector<uint8_t> codes, scales;
        if (p.kind == Kind::kFp8Matrix) {
          QuantizeFp8(rng, p.shape[0], p.shape[1], &codes, &scales);
        } else {
          QuantizeFp4(rng, p.shape[0], p.shape[1], &codes, &scales);
        }
        const bool want_weight = absl::EndsWith(spec.name, "weight");
        *out = want_weight ? std::move(codes) : std::move(scales);
        pending_[key + (want_weight ? "scale" : "weight")] =
            want_weight ? std::move(scales) : std::move(codes);
        break;
      }
      case Kind::kBf16Matrix:
      case Kind::kEmbedding:
      case Kind::kNorm: {
        const float std = p.kind == Kind::kBf16Matrix ? ColStd(p) : p.std;
        const float mean = p.kind == Kind::kNorm ? 1.0f : p.mean;
        const float nstd = p.kind == Kind::kNorm ? 0.1f : std;
        out->resize(static_cast<size_t>(n) * 2);
        for (int64_t i = 0; i < n; ++i) {
          uint16_t b = ToBF16(mean + nstd * rng.Normal());
          std::memcpy(out->data() + 2 * i, &b, 2);
        }
        break;
      }
      case Kind::kF32Matrix:
      case Kind::kF32Normal: {
        const float std = p.kind == Kind::kF32Matrix ? ColStd(p) : p.std;
        out->resize(static_cast<size_t>(n) * 4);
        for (int64_t i = 0; i < n; ++i) {
          float v = p.mean + std * rng.Normal();
          std::memcpy(out->data() + 4 * i, &v, 4);
        }
        break;
      }
      case Kind::kTid2Eid: {
        const int64_t rows = p.shape[0], k = p.shape[1];
        out->resize(static_cast<size_t>(n) * 4);
        std::vector<int32_t> perm(static_cast<size_t>(c_.n_routed_experts));
        for (int64_t r = 0; r < rows; ++r) {
          for (size_t e = 0; e < perm.size(); ++e) perm[e] = static_cast<int32_t>(e);
          for (int64_t j = 0; j < k; ++j) {  // partial Fisher-Yates: k distinct experts
            uint32_t pick =
                static_cast<uint32_t>(j) + rng.Below(static_cast<uint32_t>(perm.size() - j));
            std::swap(perm[static_cast<size_t>(j)], perm[pick]);
            std::memcpy(out->data() + 4 * (r * k + j), &perm[static_cast<size_t>(j)], 4);
          }
        }
        break;
      }
    }
    return absl::OkStatus();
  }

 private:
  static float ColStd(const Param& p) { return 1.0f / std::sqrt(static_cast<float>(p.shape[1])); }

  void Add(std::string name, Param p) { params_[std::move(name)] = std::move(p); }
  void Normal(std::string name, std::vector<int64_t> shape, float mean, float std) {
    Add(std::move(name), {Kind::kF32Normal, std::move(shape), mean, std});
  }
  // Quantized matrices are keyed by their prefix ("...wq_a."): the file has weight and scale.
  void Fp8(const std::string& weight_name, int64_t rows, int64_t cols) {
    Add(weight_name.substr(0, weight_name.size() - 6), {Kind::kFp8Matrix, {rows, cols}});
  }
  void Expert(const std::string& weight_name, int64_t rows, int64_t cols) {
    if (c_.expert_dtype == ExpertDType::kFP4) {
      Add(weight_name.substr(0, weight_name.size() - 6), {Kind::kFp4Matrix, {rows, cols}});
    } else {
      Fp8(weight_name, rows, cols);
    }
  }
  void Bf16(const std::string& name, int64_t rows, int64_t cols) {
    Add(name, {Kind::kBf16Matrix, {rows, cols}});
  }
  void Norm(const std::string& name, int64_t n) { Add(name, {Kind::kNorm, {n}}); }

  void HcHead(const std::string& p) {
    const int64_t hc = c_.hc_mult, D = c_.hidden_size;
    Normal(p + "hc_head_fn", {hc, hc * D}, 0, HcFnStd());
    Normal(p + "hc_head_base", {hc}, 0.2f, 0.2f);
    Normal(p + "hc_head_scale", {1}, 1.0f, 0.15f);
  }
  // Keeps each mix value (fn . flat(X) / rms(X)) of order 1.6, as in the golden checkpoint.
  float HcFnStd() const {
    return 1.6f / std::sqrt(static_cast<float>(c_.hc_mult * c_.hidden_size));
  }

  void Compressor(const std::string& p, int ratio, int64_t width) {
    const int64_t coff = ratio == 4 ? 2 : 1, D = c_.hidden_size;
    Normal(p + "ape", {ratio, coff * width}, 0, 0.5f);
    Bf16(p + "wkv.weight", coff * width, D);
    Bf16(p + "wgate.weight", coff * width, D);
    Norm(p + "norm.weight", width);
  }

  void Block(int b) {
    const std::string p = BlockPrefix(c_, b);
    const int64_t D = c_.hidden_size, hc = c_.hc_mult, H = c_.num_attention_heads;
    const int64_t d = c_.head_dim, Q = c_.q_lora_rank, G = c_.o_groups, R = c_.o_lora_rank;
    const int64_t mix = (2 + hc) * hc;
    Norm(p + "attn_norm.weight", D);
    Norm(p + "ffn_norm.weight", D);
    for (const char* which : {"attn", "ffn"}) {
      Normal(absl::StrCat(p, "hc_", which, "_fn"), {mix, hc * D}, 0, HcFnStd());
      Normal(absl::StrCat(p, "hc_", which, "_base"), {mix}, 0, 0.5f);
      Normal(absl::StrCat(p, "hc_", which, "_scale"), {3}, 1.0f, 0.15f);
    }
    const std::string a = p + "attn.";
    Normal(a + "attn_sink", {H}, 0, 1.0f);
    Fp8(a + "wq_a.weight", Q, D);
    Norm(a + "q_norm.weight", Q);
    Fp8(a + "wq_b.weight", H * d, Q);
    Fp8(a + "wkv.weight", d, D);
    Norm(a + "kv_norm.weight", d);
    Fp8(a + "wo_a.weight", G * R, H * d / G);
    Fp8(a + "wo_b.weight", D, G * R);
    const int ratio = c_.CompressRatio(b);
    if (ratio > 0) Compressor(a + "compressor.", ratio, d);
    if (ratio == 4) {
      const int64_t ih = c_.index_n_heads, id = c_.index_head_dim;
      Fp8(a + "indexer.wq_b.weight", ih * id, Q);
      Bf16(a + "indexer.weights_proj.weight", ih, D);
      Compressor(a + "indexer.compressor.", 4, id);
    }
    const std::string f = p + "ffn.";
    const int64_t E = c_.n_routed_experts, I = c_.moe_intermediate_size;
    Bf16(f + "gate.weight", E, D);
    if (c_.IsHashLayer(b)) {
      Add(f + "gate.tid2eid", {Kind::kTid2Eid, {c_.vocab_size, c_.num_experts_per_tok}});
    } else {
      Normal(f + "gate.bias", {E}, 0, 0.1f);
    }
    for (int64_t e = 0; e < E; ++e) {
      const std::string x = absl::StrCat(f, "experts.", e, ".");
      Expert(x + "w1.weight", I, D);
      Expert(x + "w3.weight", I, D);
      Expert(x + "w2.weight", D, I);
    }
    if (c_.n_shared_experts > 0) {
      const int64_t si = I * c_.n_shared_experts;
      Fp8(f + "shared_experts.w1.weight", si, D);
      Fp8(f + "shared_experts.w3.weight", si, D);
      Fp8(f + "shared_experts.w2.weight", D, si);
    }
    if (b >= c_.num_hidden_layers) {
      Fp8(p + "e_proj.weight", D, D);
      Fp8(p + "h_proj.weight", D, D);
      Norm(p + "enorm.weight", D);
      Norm(p + "hnorm.weight", D);
      Norm(p + "norm.weight", D);
      HcHead(p);
      // The released layout stores the shared embedding and head again under the MTP prefix;
      // ours are byte copies of the trunk's (same random stream), so either may be used.
      Add(p + "embed.weight", {Kind::kEmbedding, {c_.vocab_size, D}, 0, 1, "embed.weight"});
      Add(p + "head.weight", {Kind::kF32Matrix, {c_.vocab_size, D}, 0, 1, "head.weight"});
    }
  }

  // N(0, 1/cols) values, FP8 e4m3 codes with one E8M0 scale per weight block.
  void QuantizeFp8(Rng& rng, int64_t rows, int64_t cols, std::vector<uint8_t>* codes,
                   std::vector<uint8_t>* scales) const {
    const float std = 1.0f / std::sqrt(static_cast<float>(cols));
    std::vector<float> v(static_cast<size_t>(rows * cols));
    for (float& x : v) x = std * rng.Normal();
    const int64_t br = c_.weight_block_size.rows, bc = c_.weight_block_size.cols;
    const int64_t sr = (rows + br - 1) / br, sc = (cols + bc - 1) / bc;
    codes->resize(v.size());
    scales->resize(static_cast<size_t>(sr * sc));
    for (int64_t bi = 0; bi < sr; ++bi) {
      for (int64_t bj = 0; bj < sc; ++bj) {
        const int64_t r0 = bi * br, r1 = std::min(rows, r0 + br);
        const int64_t c0 = bj * bc, c1 = std::min(cols, c0 + bc);
        float amax = 0;
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(v[r * cols + c]));
        }
        const int e = ScaleExponent(amax, 448.0f, 1e-4f);
        (*scales)[bi * sc + bj] = static_cast<uint8_t>(e + 127);
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t c = c0; c < c1; ++c) {
            (*codes)[r * cols + c] = ToE4M3Code(std::ldexp(v[r * cols + c], -e));
          }
        }
      }
    }
  }

  // N(0, 1/cols) values, FP4 e2m1 codes (two a byte, low nibble = even column), E8M0 per 32.
  void QuantizeFp4(Rng& rng, int64_t rows, int64_t cols, std::vector<uint8_t>* codes,
                   std::vector<uint8_t>* scales) const {
    const float std = 1.0f / std::sqrt(static_cast<float>(cols));
    codes->assign(static_cast<size_t>(rows * cols / 2), 0);
    scales->resize(static_cast<size_t>(rows * cols / 32));
    float group[32];
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < cols / 32; ++g) {
        float amax = 0;
        for (float& x : group) {
          x = std * rng.Normal();
          amax = std::max(amax, std::fabs(x));
        }
        const int e = ScaleExponent(amax, 6.0f, std::ldexp(6.0f, -126));
        (*scales)[r * (cols / 32) + g] = static_cast<uint8_t>(e + 127);
        for (int i = 0; i < 32; i += 2) {
          uint8_t lo = ToE2M1Code(std::ldexp(group[i], -e));
          uint8_t hi = ToE2M1Code(std::ldexp(group[i + 1], -e));
          (*codes)[(r * cols + g * 32 + i) / 2] = static_cast<uint8_t>(lo | (hi << 4));
        }
      }
    }
  }

  const ModelConfig& c_;
  uint64_t seed_;
  std::map<std::string, Param> params_;
  std::map<std::string, std::vector<uint8_t>> pending_;
};

ModelConfig TinyAShape() {
  ModelConfig c;
  c.vocab_size = 1024;
  c.hidden_size = 256;
  c.moe_intermediate_size = 128;
  c.num_hidden_layers = 4;
  c.num_hash_layers = 1;
  c.num_nextn_predict_layers = 1;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 1;
  c.n_routed_experts = 16;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 4;
  c.scoring_func = ScoringFunc::kSqrtSoftplus;
  c.routed_scaling_factor = 1.5;
  c.norm_topk_prob = true;
  c.swiglu_limit = 10.0;
  c.q_lora_rank = 128;
  c.head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.rms_norm_eps = 1e-6;
  c.o_groups = 2;
  c.o_lora_rank = 64;
  c.sliding_window = 32;
  c.compress_ratios = {0, 4, 16, 4, 0};
  c.compress_rope_theta = 160000.0;
  c.rope_theta = 10000.0;
  c.rope_scaling = {16, 32, 1, 65536};
  c.index_n_heads = 16;
  c.index_head_dim = 64;
  c.index_topk = 8;
  c.hc_mult = 4;
  c.hc_sinkhorn_iters = 20;
  c.hc_eps = 1e-6;
  c.max_position_embeddings = 1024;
  c.bos_token_id = 0;
  c.eos_token_id = 1;
  c.expert_dtype = ExpertDType::kFP4;
  c.weight_block_size = {128, 128};
  return c;
}

ModelConfig Tiny() {
  ModelConfig c = TinyAShape();
  c.vocab_size = 129280;  // the DeepSeek V3/V4 tokenizer's vocabulary
  c.sliding_window = 128;
  c.compress_ratios = {0, 4, 128, 4, 0};
  c.index_topk = 16;
  c.max_position_embeddings = 65536;
  return c;
}

struct PresetEntry {
  const char* name;
  const char* summary;
  ModelConfig (*make)();
};

const PresetEntry kPresets[] = {
    {"tiny",
     "the cluster's default model: V=129280 (real tokenizer), D=256, 4 layers with ratios "
     "0,4,128,4 + 1 MTP layer, 16 FP4 experts top-4, 389 MiB",
     Tiny},
    {"tiny-a-shape",
     "the shapes of golden/tiny-a: V=1024, D=256, 4 layers with ratios 0,4,16,4 + 1 MTP, 11 MiB",
     TinyAShape},
};

}  // namespace

std::vector<ModelPreset> ListModelPresets() {
  std::vector<ModelPreset> out;
  for (const auto& p : kPresets) out.push_back({p.name, p.summary});
  return out;
}

absl::StatusOr<ModelConfig> PresetConfig(std::string_view preset) {
  std::vector<std::string> names;
  for (const auto& p : kPresets) {
    if (preset == p.name) return p.make();
    names.push_back(p.name);
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown preset '", std::string(preset),
                                                 "' (known: ", absl::StrJoin(names, ", "), ")"));
}

absl::Status WriteModel(const ModelConfig& config, uint64_t seed, const std::string& out_dir,
                        void (*progress)(std::string_view line)) {
  // Round-trip the config through its own parser: a preset or test config that is inconsistent
  // fails here, with the key named, instead of producing an unloadable model.
  const std::string config_json = ModelConfigToJson(config);
  EM_RETURN_IF_ERROR(base::Annotate(ParseModelConfig(config_json).status(), "make-model"));

  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(out_dir, ec)) {
    return absl::AlreadyExistsError(absl::StrCat(out_dir, " already exists"));
  }
  const std::string tmp_dir = absl::StrCat(out_dir, ".tmp-", ::getpid());
  fs::remove_all(tmp_dir, ec);
  if (!fs::create_directories(tmp_dir, ec)) {
    return absl::InternalError(absl::StrCat("creating ", tmp_dir, ": ", ec.message()));
  }
  struct Cleanup {
    std::string dir;
    bool keep = false;
    ~Cleanup() {
      std::error_code e;
      if (!keep) fs::remove_all(dir, e);
    }
  } cleanup{tmp_dir};

  EM_RETURN_IF_ERROR(base::WriteFileAtomically(tmp_dir + "/config.json", config_json));
  Maker maker(config, seed);
  maker.Plan();
  std::vector<TensorSpec> specs = maker.Specs();
  uint64_t total = 0;
  for (const auto& s : specs)
    total += static_cast<uint64_t>(NumElements(s.shape)) * DTypeSize(s.dtype);
  // One line per 64 MiB and one at the end (a small model reports once).
  const uint64_t step = 64ull << 20;
  uint64_t written = 0, next_report = std::min(step, total);
  size_t done = 0;
  EM_RETURN_IF_ERROR(WriteSafetensorsStreaming(
      tmp_dir + "/model.safetensors", specs, {{"format", "pt"}},
      [&](const TensorSpec& s, std::vector<uint8_t>* bytes) -> absl::Status {
        EM_RETURN_IF_ERROR(maker.Produce(s, bytes));
        written += bytes->size();
        ++done;
        if (progress != nullptr && written >= next_report) {
          progress(absl::StrCat("model.safetensors: ", written >> 20, " / ", total >> 20, " MiB, ",
                                done, " / ", specs.size(), " tensors"));
          next_report = written == total ? UINT64_MAX : std::min(total, written + step);
        }
        return absl::OkStatus();
      }));
  fs::rename(tmp_dir, out_dir, ec);
  if (ec)
    return absl::InternalError(
        absl::StrCat("renaming ", tmp_dir, " to ", out_dir, ": ", ec.message()));
  cleanup.keep = true;
  return absl::OkStatus();
}

absl::Status WriteModelPreset(std::string_view preset, uint64_t seed, const std::string& out_dir,
                              void (*progress)(std::string_view line)) {
  EM_ASSIGN_OR_RETURN(ModelConfig config, PresetConfig(preset));
  return WriteModel(config, seed, out_dir, progress);
}

}  // namespace expertmesh::model
