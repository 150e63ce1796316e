// The model's hyper-parameters, parsed from a checkpoint's HF-style config.json
// (MODEL.md, Notation and config). Every key of MODEL.md's table has a member of the same
// snake_case name; parsing rejects missing, ill-typed and inconsistent keys with the key's name,
// so the forward pass can rely on the invariants documented below.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh::model {

enum class ScoringFunc { kSqrtSoftplus, kSigmoid, kSoftmax };

// Format of the routed experts' weights ("expert_dtype"): FP4 = I8-packed e2m1 with per-32
// E8M0 scales, FP8 = e4m3 with 128x128 block scales like the other linear layers.
enum class ExpertDType { kFP4, kFP8 };

struct RopeScaling {
  double factor = 1.0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  int64_t original_max_position_embeddings = 0;
};

// quantization_config.weight_block_size: FP8 scale block [rows, cols].
struct WeightBlockSize {
  int rows = 128;
  int cols = 128;
};

// Invariants after ParseModelConfig succeeds (all checked, errors name the key):
// - every size > 0 except sliding_window, index_topk, n_shared_experts, num_hash_layers,
//   num_nextn_predict_layers, which are >= 0; num_key_value_heads == 1;
// - qk_rope_head_dim even and <= head_dim; num_attention_heads % o_groups == 0;
// - index_head_dim a power of two, >= qk_rope_head_dim, even (Hadamard, RoPE);
// - num_experts_per_tok <= n_routed_experts; num_hash_layers <= num_hidden_layers;
// - compress_ratios.size() >= num_hidden_layers + num_nextn_predict_layers (extra entries are
//   kept but unused), each ratio >= 0;
// - expert_dtype == kFP4 implies moe_intermediate_size % 32 == 0 and hidden_size % 32 == 0
//   (the FP4 scale groups of w1/w3 and w2).
struct ModelConfig {
  int64_t vocab_size = 0;             // V
  int64_t hidden_size = 0;            // D
  int num_hidden_layers = 0;          // L
  int num_attention_heads = 0;        // H
  int num_key_value_heads = 1;        // always 1 (one shared KV head)
  int head_dim = 0;                   // d
  int qk_rope_head_dim = 0;           // r
  int q_lora_rank = 0;                // Q
  int o_groups = 0;                   // G
  int o_lora_rank = 0;                // R
  int sliding_window = 0;             // W
  std::vector<int> compress_ratios;   // one per layer, then one per MTP layer (maybe longer)
  int index_n_heads = 0;              // IH
  int index_head_dim = 0;             // Id
  int index_topk = 0;                 // K
  int n_routed_experts = 0;           // E
  int num_experts_per_tok = 0;        // k
  int64_t moe_intermediate_size = 0;  // I
  int n_shared_experts = 0;
  int num_hash_layers = 0;
  ScoringFunc scoring_func = ScoringFunc::kSqrtSoftplus;
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = true;  // optional, default true (V4 always normalizes)
  double swiglu_limit = 0.0;   // optional, default 0 (= no clamp)
  int hc_mult = 0;             // Hc
  int hc_sinkhorn_iters = 0;
  double hc_eps = 0.0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  double compress_rope_theta = 0.0;
  RopeScaling rope_scaling;
  int num_nextn_predict_layers = 0;  // optional, default 0
  int64_t max_position_embeddings = 0;
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 1;
  ExpertDType expert_dtype = ExpertDType::kFP4;  // optional, default fp4
  WeightBlockSize weight_block_size;             // optional, default 128x128

  // compress_ratios[layer]; `layer` may be num_hidden_layers + i for MTP block i.
  // REQUIRES: 0 <= layer < num_hidden_layers + num_nextn_predict_layers.
  int CompressRatio(int layer) const;
  // True for trunk layers l < num_hash_layers (routed by gate.tid2eid). MTP layers (layer >=
  // num_hidden_layers) are never hash layers.
  bool IsHashLayer(int layer) const;
  // Total number of blocks with attention/MoE: trunk layers plus MTP layers.
  int NumBlocks() const { return num_hidden_layers + num_nextn_predict_layers; }
};

// Parses and validates config.json text. Errors: InvalidArgument naming the key (missing,
// wrong type, out of range, inconsistent with another key) or saying the JSON is malformed.
//
// Keys that may be absent (released configs or older exports omit them), with their defaults:
//   num_key_value_heads (1), norm_topk_prob (true), swiglu_limit (0 = off),
//   num_nextn_predict_layers (0), n_shared_experts (0), num_hash_layers (0),
//   expert_dtype ("fp4", the released V4 format; the loader still decides FP8 vs FP4 per
//   tensor by its dtype),
//   quantization_config / weight_block_size ([128, 128]), rope_scaling (factor 1: no YaRN),
//   compress_rope_theta (rope_theta), max_position_embeddings (0 = unknown), bos_token_id (0),
//   eos_token_id (1), rms_norm_eps (1e-6), hc_eps (1e-6), hc_sinkhorn_iters (20).
// All other keys of MODEL.md's table are required.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json);

// Reads and parses `dir`/config.json. Errors: those of ParseModelConfig (prefixed with the
// path), NotFound if the file is missing.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);

// The config as JSON text in the released config.json layout (make-model writes it).
std::string ModelConfigToJson(const ModelConfig& config);

}  // namespace expertmesh::model
