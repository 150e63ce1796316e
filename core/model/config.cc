#include "core/model/config.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace expertmesh::model {
namespace {

using nlohmann::json;

// Largest accepted size for any dimension: keeps every product of two or three dims (e.g.
// V*D, (2+Hc)Hc * Hc*D) far from int64 overflow while allowing any real model.
constexpr int64_t kMaxDim = int64_t{1} << 31;

absl::Status KeyError(std::string_view key, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("config.json: key '", std::string(key), "' ", std::string(what)));
}

std::string TypeName(const json& v) { return v.type_name(); }

// Reads an integer key. A float with an integral value (e.g. 16.0) is accepted because some
// exporters write every number as a float.
absl::Status ReadInt(const json& obj, std::string_view key, bool required, int64_t lo, int64_t hi,
                     int64_t* out) {
  auto it = obj.find(std::string(key));
  if (it == obj.end() || it->is_null()) {
    if (required) return KeyError(key, "is missing");
    return absl::OkStatus();
  }
  int64_t v = 0;
  if (it->is_number_integer()) {
    if (it->is_number_unsigned() && it->get<uint64_t>() > static_cast<uint64_t>(hi)) {
      return KeyError(key, absl::StrCat("must be in [", lo, ", ", hi, "], got ", it->dump()));
    }
    v = it->get<int64_t>();
  } else if (it->is_number_float()) {
    double d = it->get<double>();
    if (!std::isfinite(d) || d != std::floor(d) || std::fabs(d) > 9e15) {
      return KeyError(key, absl::StrCat("must be an integer, got ", it->dump()));
    }
    v = static_cast<int64_t>(d);
  } else {
    return KeyError(key, absl::StrCat("must be an integer, got ", TypeName(*it)));
  }
  if (v < lo || v > hi) {
    return KeyError(key, absl::StrCat("must be in [", lo, ", ", hi, "], got ", v));
  }
  *out = v;
  return absl::OkStatus();
}

template <typename T>
absl::Status ReadIntAs(const json& obj, std::string_view key, bool required, int64_t lo, int64_t hi,
                       T* out) {
  int64_t v = static_cast<int64_t>(*out);
  EM_RETURN_IF_ERROR(ReadInt(obj, key, required, lo, hi, &v));
  *out = static_cast<T>(v);
  return absl::OkStatus();
}

absl::Status ReadDouble(const json& obj, std::string_view key, bool required, double* out) {
  auto it = obj.find(std::string(key));
  if (it == obj.end() || it->is_null()) {
    if (required) return KeyError(key, "is missing");
    return absl::OkStatus();
  }
  if (!it->is_number()) return KeyError(key, absl::StrCat("must be a number, got ", TypeName(*it)));
  double d = it->get<double>();
  if (!std::isfinite(d)) return KeyError(key, "must be finite");
  *out = d;
  return absl::OkStatus();
}

absl::Status ReadBool(const json& obj, std::string_view key, bool* out) {
  auto it = obj.find(std::string(key));
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean())
    return KeyError(key, absl::StrCat("must be a boolean, got ", TypeName(*it)));
  *out = it->get<bool>();
  return absl::OkStatus();
}

absl::Status ReadString(const json& obj, std::string_view key, bool required, std::string* out) {
  auto it = obj.find(std::string(key));
  if (it == obj.end() || it->is_null()) {
    if (required) return KeyError(key, "is missing");
    return absl::OkStatus();
  }
  if (!it->is_string()) return KeyError(key, absl::StrCat("must be a string, got ", TypeName(*it)));
  *out = it->get<std::string>();
  return absl::OkStatus();
}

absl::Status Positive(std::string_view key, double v) {
  if (!(v > 0)) return KeyError(key, absl::StrCat("must be > 0, got ", v));
  return absl::OkStatus();
}

bool IsPowerOfTwo(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

absl::Status ParseObject(const json& j, ModelConfig& c) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: top level must be an object, got ", TypeName(j)));
  }
  EM_RETURN_IF_ERROR(ReadIntAs(j, "vocab_size", true, 1, kMaxDim, &c.vocab_size));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "hidden_size", true, 1, kMaxDim, &c.hidden_size));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "num_hidden_layers", true, 1, 1 << 16, &c.num_hidden_layers));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "num_attention_heads", true, 1, 1 << 16, &c.num_attention_heads));
  EM_RETURN_IF_ERROR(
      ReadIntAs(j, "num_key_value_heads", false, 0, 1 << 16, &c.num_key_value_heads));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "head_dim", true, 1, 1 << 20, &c.head_dim));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "qk_rope_head_dim", true, 1, 1 << 20, &c.qk_rope_head_dim));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "q_lora_rank", true, 1, 1 << 24, &c.q_lora_rank));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "o_groups", true, 1, 1 << 16, &c.o_groups));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "o_lora_rank", true, 1, 1 << 24, &c.o_lora_rank));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "sliding_window", true, 1, 1 << 24, &c.sliding_window));

  auto cr = j.find("compress_ratios");
  if (cr == j.end() || cr->is_null()) return KeyError("compress_ratios", "is missing");
  if (!cr->is_array()) {
    return KeyError("compress_ratios", absl::StrCat("must be an array, got ", TypeName(*cr)));
  }
  c.compress_ratios.clear();
  for (size_t i = 0; i < cr->size(); ++i) {
    const json& v = (*cr)[i];
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > (1 << 24)) {
      return KeyError(
          "compress_ratios",
          absl::StrCat("entry ", i, " must be an integer in [0, 16777216], got ", v.dump()));
    }
    c.compress_ratios.push_back(static_cast<int>(v.get<int64_t>()));
  }

  EM_RETURN_IF_ERROR(ReadIntAs(j, "index_n_heads", true, 1, 1 << 16, &c.index_n_heads));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "index_head_dim", true, 1, 1 << 20, &c.index_head_dim));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "index_topk", true, 1, 1 << 30, &c.index_topk));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "n_routed_experts", true, 1, 1 << 20, &c.n_routed_experts));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "num_experts_per_tok", true, 1, 1 << 20, &c.num_experts_per_tok));
  EM_RETURN_IF_ERROR(
      ReadIntAs(j, "moe_intermediate_size", true, 1, kMaxDim, &c.moe_intermediate_size));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "n_shared_experts", false, 0, 1 << 10, &c.n_shared_experts));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "num_hash_layers", false, 0, 1 << 16, &c.num_hash_layers));

  std::string scoring;
  EM_RETURN_IF_ERROR(ReadString(j, "scoring_func", true, &scoring));
  if (scoring == "sqrtsoftplus") {
    c.scoring_func = ScoringFunc::kSqrtSoftplus;
  } else if (scoring == "sigmoid") {
    c.scoring_func = ScoringFunc::kSigmoid;
  } else if (scoring == "softmax") {
    c.scoring_func = ScoringFunc::kSoftmax;
  } else {
    return KeyError(
        "scoring_func",
        absl::StrCat("must be one of sqrtsoftplus, sigmoid, softmax; got '", scoring, "'"));
  }
  EM_RETURN_IF_ERROR(ReadDouble(j, "routed_scaling_factor", true, &c.routed_scaling_factor));
  EM_RETURN_IF_ERROR(Positive("routed_scaling_factor", c.routed_scaling_factor));
  EM_RETURN_IF_ERROR(ReadBool(j, "norm_topk_prob", &c.norm_topk_prob));
  EM_RETURN_IF_ERROR(ReadDouble(j, "swiglu_limit", false, &c.swiglu_limit));
  if (c.swiglu_limit < 0) return KeyError("swiglu_limit", "must be >= 0 (0 = no clamp)");

  EM_RETURN_IF_ERROR(ReadIntAs(j, "hc_mult", true, 1, 64, &c.hc_mult));
  c.hc_sinkhorn_iters = 20;
  EM_RETURN_IF_ERROR(ReadIntAs(j, "hc_sinkhorn_iters", false, 1, 1 << 16, &c.hc_sinkhorn_iters));
  c.hc_eps = 1e-6;
  EM_RETURN_IF_ERROR(ReadDouble(j, "hc_eps", false, &c.hc_eps));
  if (c.hc_eps < 0) return KeyError("hc_eps", "must be >= 0");
  EM_RETURN_IF_ERROR(ReadDouble(j, "rms_norm_eps", false, &c.rms_norm_eps));
  EM_RETURN_IF_ERROR(Positive("rms_norm_eps", c.rms_norm_eps));
  EM_RETURN_IF_ERROR(ReadDouble(j, "rope_theta", true, &c.rope_theta));
  EM_RETURN_IF_ERROR(Positive("rope_theta", c.rope_theta));
  c.compress_rope_theta = c.rope_theta;
  EM_RETURN_IF_ERROR(ReadDouble(j, "compress_rope_theta", false, &c.compress_rope_theta));
  EM_RETURN_IF_ERROR(Positive("compress_rope_theta", c.compress_rope_theta));

  c.rope_scaling = RopeScaling{};
  auto rs = j.find("rope_scaling");
  if (rs != j.end() && !rs->is_null()) {
    if (!rs->is_object()) {
      return KeyError("rope_scaling", absl::StrCat("must be an object, got ", TypeName(*rs)));
    }
    std::string type = "yarn";
    EM_RETURN_IF_ERROR(ReadString(*rs, "type", false, &type));
    if (type != "yarn") {
      return KeyError("rope_scaling.type", absl::StrCat("must be 'yarn', got '", type, "'"));
    }
    // Errors inside name the nested key in full.
    auto nested = [](absl::Status s) {
      if (s.ok()) return s;
      std::string m(s.message());
      const std::string from = "key '";
      size_t p = m.find(from);
      if (p != std::string::npos) m.insert(p + from.size(), "rope_scaling.");
      return absl::InvalidArgumentError(m);
    };
    EM_RETURN_IF_ERROR(nested(ReadDouble(*rs, "factor", true, &c.rope_scaling.factor)));
    EM_RETURN_IF_ERROR(nested(ReadDouble(*rs, "beta_fast", true, &c.rope_scaling.beta_fast)));
    EM_RETURN_IF_ERROR(nested(ReadDouble(*rs, "beta_slow", true, &c.rope_scaling.beta_slow)));
    EM_RETURN_IF_ERROR(
        nested(ReadIntAs(*rs, "original_max_position_embeddings", true, 1, int64_t{1} << 40,
                         &c.rope_scaling.original_max_position_embeddings)));
    if (!(c.rope_scaling.factor >= 1.0)) {
      return KeyError("rope_scaling.factor",
                      absl::StrCat("must be >= 1, got ", c.rope_scaling.factor));
    }
    if (!(c.rope_scaling.beta_fast > 0)) {
      return KeyError("rope_scaling.beta_fast",
                      absl::StrCat("must be > 0, got ", c.rope_scaling.beta_fast));
    }
    if (!(c.rope_scaling.beta_slow > 0)) {
      return KeyError("rope_scaling.beta_slow",
                      absl::StrCat("must be > 0, got ", c.rope_scaling.beta_slow));
    }
  }

  EM_RETURN_IF_ERROR(
      ReadIntAs(j, "num_nextn_predict_layers", false, 0, 1 << 10, &c.num_nextn_predict_layers));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "max_position_embeddings", false, 0, int64_t{1} << 40,
                               &c.max_position_embeddings));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "bos_token_id", false, 0, kMaxDim, &c.bos_token_id));
  EM_RETURN_IF_ERROR(ReadIntAs(j, "eos_token_id", false, 0, kMaxDim, &c.eos_token_id));

  std::string expert_dtype = "fp4";
  EM_RETURN_IF_ERROR(ReadString(j, "expert_dtype", false, &expert_dtype));
  if (expert_dtype == "fp4") {
    c.expert_dtype = ExpertDType::kFP4;
  } else if (expert_dtype == "fp8") {
    c.expert_dtype = ExpertDType::kFP8;
  } else {
    return KeyError("expert_dtype",
                    absl::StrCat("must be 'fp4' or 'fp8', got '", expert_dtype, "'"));
  }

  c.weight_block_size = WeightBlockSize{};
  auto qc = j.find("quantization_config");
  if (qc != j.end() && !qc->is_null()) {
    if (!qc->is_object()) {
      return KeyError("quantization_config",
                      absl::StrCat("must be an object, got ", TypeName(*qc)));
    }
    std::string s;
    if (qc->contains("quant_method")) {
      EM_RETURN_IF_ERROR(ReadString(*qc, "quant_method", true, &s));
      if (s != "fp8") {
        return KeyError("quantization_config.quant_method",
                        absl::StrCat("must be 'fp8', got '", s, "'"));
      }
    }
    if (qc->contains("fmt")) {
      EM_RETURN_IF_ERROR(ReadString(*qc, "fmt", true, &s));
      if (s != "e4m3") {
        return KeyError("quantization_config.fmt", absl::StrCat("must be 'e4m3', got '", s, "'"));
      }
    }
    if (qc->contains("scale_fmt")) {
      EM_RETURN_IF_ERROR(ReadString(*qc, "scale_fmt", true, &s));
      if (s != "ue8m0") {
        return KeyError("quantization_config.scale_fmt",
                        absl::StrCat("must be 'ue8m0', got '", s, "'"));
      }
    }
    auto bs = qc->find("weight_block_size");
    if (bs != qc->end() && !bs->is_null()) {
      if (!bs->is_array() || bs->size() != 2 || !(*bs)[0].is_number_integer() ||
          !(*bs)[1].is_number_integer() || (*bs)[0].get<int64_t>() < 1 ||
          (*bs)[1].get<int64_t>() < 1 || (*bs)[0].get<int64_t>() > (1 << 20) ||
          (*bs)[1].get<int64_t>() > (1 << 20)) {
        return KeyError(
            "quantization_config.weight_block_size",
            absl::StrCat("must be [rows, cols] of positive integers, got ", bs->dump()));
      }
      c.weight_block_size.rows = static_cast<int>((*bs)[0].get<int64_t>());
      c.weight_block_size.cols = static_cast<int>((*bs)[1].get<int64_t>());
    }
  }
  return absl::OkStatus();
}

absl::Status CheckConsistency(const ModelConfig& c) {
  if (c.num_key_value_heads != 1) {
    return KeyError("num_key_value_heads",
                    absl::StrCat("must be 1 (one shared KV head), got ", c.num_key_value_heads));
  }
  if (c.qk_rope_head_dim % 2 != 0) {
    return KeyError("qk_rope_head_dim",
                    absl::StrCat("must be even (RoPE pairs), got ", c.qk_rope_head_dim));
  }
  if (c.head_dim < c.qk_rope_head_dim) {
    return KeyError("head_dim", absl::StrCat("(", c.head_dim, ") must be >= qk_rope_head_dim (",
                                             c.qk_rope_head_dim, ")"));
  }
  if (c.num_attention_heads % c.o_groups != 0) {
    return KeyError("o_groups", absl::StrCat("(", c.o_groups, ") must divide num_attention_heads (",
                                             c.num_attention_heads, ")"));
  }
  if (!IsPowerOfTwo(c.index_head_dim)) {
    return KeyError(
        "index_head_dim",
        absl::StrCat("must be a power of two (Hadamard transform), got ", c.index_head_dim));
  }
  if (c.index_head_dim < c.qk_rope_head_dim) {
    return KeyError("index_head_dim",
                    absl::StrCat("(", c.index_head_dim, ") must be >= qk_rope_head_dim (",
                                 c.qk_rope_head_dim, ")"));
  }
  if (c.num_experts_per_tok > c.n_routed_experts) {
    return KeyError("num_experts_per_tok",
                    absl::StrCat("(", c.num_experts_per_tok, ") must be <= n_routed_experts (",
                                 c.n_routed_experts, ")"));
  }
  if (c.num_hash_layers > c.num_hidden_layers) {
    return KeyError("num_hash_layers",
                    absl::StrCat("(", c.num_hash_layers, ") must be <= num_hidden_layers (",
                                 c.num_hidden_layers, ")"));
  }
  const size_t need = static_cast<size_t>(c.num_hidden_layers) + c.num_nextn_predict_layers;
  if (c.compress_ratios.size() < need) {
    return KeyError(
        "compress_ratios",
        absl::StrCat("has ", c.compress_ratios.size(),
                     " entries, needs num_hidden_layers + num_nextn_predict_layers = ", need));
  }
  if (c.expert_dtype == ExpertDType::kFP4) {
    if (c.moe_intermediate_size % 32 != 0) {
      return KeyError("moe_intermediate_size",
                      absl::StrCat("must be a multiple of 32 for FP4 experts (per-32 scales), got ",
                                   c.moe_intermediate_size));
    }
    if (c.hidden_size % 32 != 0) {
      return KeyError("hidden_size",
                      absl::StrCat("must be a multiple of 32 for FP4 experts (per-32 scales), got ",
                                   c.hidden_size));
    }
  }
  if (c.bos_token_id >= c.vocab_size) {
    return KeyError("bos_token_id", absl::StrCat("(", c.bos_token_id, ") must be < vocab_size (",
                                                 c.vocab_size, ")"));
  }
  if (c.eos_token_id >= c.vocab_size) {
    return KeyError("eos_token_id", absl::StrCat("(", c.eos_token_id, ") must be < vocab_size (",
                                                 c.vocab_size, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

int ModelConfig::CompressRatio(int layer) const {
  EM_CHECK(layer >= 0 && layer < NumBlocks());
  return compress_ratios[static_cast<size_t>(layer)];
}

bool ModelConfig::IsHashLayer(int layer) const {
  return layer >= 0 && layer < num_hidden_layers && layer < num_hash_layers;
}

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view text) {
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("config.json: malformed JSON");
  ModelConfig c;
  try {
    EM_RETURN_IF_ERROR(ParseObject(j, c));
  } catch (const json::exception& e) {
    // get<>() on a checked type cannot throw; this guards against a missed check.
    return absl::InvalidArgumentError(absl::StrCat("config.json: ", e.what()));
  }
  EM_RETURN_IF_ERROR(CheckConsistency(c));
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir) {
  const std::string path = dir + "/config.json";
  EM_ASSIGN_OR_RETURN(std::string text, base::ReadFileToString(path));
  auto config = ParseModelConfig(text);
  if (!config.ok()) return base::Annotate(config.status(), path);
  return config;
}

std::string ModelConfigToJson(const ModelConfig& c) {
  nlohmann::ordered_json j;
  j["architectures"] = {"DeepseekV4ForCausalLM"};
  j["model_type"] = "deepseek_v4";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_hash_layers"] = c.num_hash_layers;
  j["num_nextn_predict_layers"] = c.num_nextn_predict_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["n_routed_experts"] = c.n_routed_experts;
  j["n_shared_experts"] = c.n_shared_experts;
  j["num_experts_per_tok"] = c.num_experts_per_tok;
  switch (c.scoring_func) {
    case ScoringFunc::kSqrtSoftplus:
      j["scoring_func"] = "sqrtsoftplus";
      break;
    case ScoringFunc::kSigmoid:
      j["scoring_func"] = "sigmoid";
      break;
    case ScoringFunc::kSoftmax:
      j["scoring_func"] = "softmax";
      break;
  }
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["topk_method"] = "noaux_tc";
  j["swiglu_limit"] = c.swiglu_limit;
  j["q_lora_rank"] = c.q_lora_rank;
  j["head_dim"] = c.head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["o_groups"] = c.o_groups;
  j["o_lora_rank"] = c.o_lora_rank;
  j["sliding_window"] = c.sliding_window;
  j["compress_ratios"] = c.compress_ratios;
  j["compress_rope_theta"] = c.compress_rope_theta;
  j["rope_theta"] = c.rope_theta;
  nlohmann::ordered_json rs;
  rs["type"] = "yarn";
  // Integral values are written as integers, as the released configs do.
  auto number = [](double v) -> nlohmann::ordered_json {
    if (v == std::floor(v) && std::fabs(v) < 9e15) return static_cast<int64_t>(v);
    return v;
  };
  rs["factor"] = number(c.rope_scaling.factor);
  rs["beta_fast"] = number(c.rope_scaling.beta_fast);
  rs["beta_slow"] = number(c.rope_scaling.beta_slow);
  rs["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings;
  j["rope_scaling"] = rs;
  j["index_n_heads"] = c.index_n_heads;
  j["index_head_dim"] = c.index_head_dim;
  j["index_topk"] = c.index_topk;
  j["hc_mult"] = c.hc_mult;
  j["hc_sinkhorn_iters"] = c.hc_sinkhorn_iters;
  j["hc_eps"] = c.hc_eps;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  j["tie_word_embeddings"] = false;
  j["torch_dtype"] = "bfloat16";
  j["expert_dtype"] = c.expert_dtype == ExpertDType::kFP4 ? "fp4" : "fp8";
  nlohmann::ordered_json qc;
  qc["activation_scheme"] = "dynamic";
  qc["fmt"] = "e4m3";
  qc["quant_method"] = "fp8";
  qc["scale_fmt"] = "ue8m0";
  qc["weight_block_size"] = {c.weight_block_size.rows, c.weight_block_size.cols};
  j["quantization_config"] = qc;
  return j.dump(2);
}

}  // namespace expertmesh::model
