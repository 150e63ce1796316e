// A complete, valid config.json for tests that need a model directory but no weights (the
// router's placement, the gateway's model list): services parse config.json with the real
// parser, which rejects partial configs, so a test must not hand-write three keys.
#pragma once

#include <string>

#include "nlohmann/json.hpp"

namespace expertmesh::testing {

// A small DeepSeek-V4-shaped config (the dimensions of golden/tiny-a) with the given number of
// trunk layers, MTP layers and routed experts (experts >= 1).
inline std::string SmallModelConfigJson(int layers, int mtp_layers, int experts,
                                        const std::string& expert_dtype = "fp4") {
  nlohmann::ordered_json j;
  j["architectures"] = {"DeepseekV4ForCausalLM"};
  j["model_type"] = "deepseek_v4";
  j["vocab_size"] = 1024;
  j["hidden_size"] = 256;
  j["moe_intermediate_size"] = 128;
  j["num_hidden_layers"] = layers;
  j["num_hash_layers"] = 0;
  j["num_nextn_predict_layers"] = mtp_layers;
  j["num_attention_heads"] = 4;
  j["num_key_value_heads"] = 1;
  j["n_routed_experts"] = experts;
  j["n_shared_experts"] = 1;
  j["num_experts_per_tok"] = experts < 4 ? experts : 4;
  j["scoring_func"] = "sqrtsoftplus";
  j["routed_scaling_factor"] = 1.5;
  j["swiglu_limit"] = 10.0;
  j["q_lora_rank"] = 128;
  j["head_dim"] = 128;
  j["qk_rope_head_dim"] = 64;
  j["o_groups"] = 2;
  j["o_lora_rank"] = 64;
  j["sliding_window"] = 32;
  // Layer 0 uncompressed, the others alternate the two compressed kinds.
  nlohmann::json ratios = nlohmann::json::array();
  for (int l = 0; l < layers + mtp_layers; ++l) ratios.push_back(l == 0 ? 0 : (l % 2 ? 4 : 16));
  j["compress_ratios"] = ratios;
  j["rope_theta"] = 10000.0;
  j["index_n_heads"] = 16;
  j["index_head_dim"] = 64;
  j["index_topk"] = 8;
  j["hc_mult"] = 4;
  j["max_position_embeddings"] = 1024;
  j["expert_dtype"] = expert_dtype;
  return j.dump(2) + "\n";
}

}  // namespace expertmesh::testing
