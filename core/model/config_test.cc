#include "core/model/config.h"

#include <functional>
#include <string>

#include "absl/status/status.h"
#include "core/base/mapped_file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace expertmesh::model {
namespace {

using nlohmann::ordered_json;
using ::testing::HasSubstr;

const std::string kTinyA = std::string(EM_SHARED_DIR) + "/golden/tiny-a";

std::string GoldenConfigText() {
  auto text = base::ReadFileToString(kTinyA + "/config.json");
  EXPECT_TRUE(text.ok()) << text.status();
  return text.ok() ? *text : "";
}

ordered_json GoldenConfig() { return ordered_json::parse(GoldenConfigText()); }

TEST(ConfigTest, ParsesGoldenTinyA) {
  auto c = LoadModelConfig(kTinyA);
  ASSERT_TRUE(c.ok()) << c.status();
  // Expected values read off golden/tiny-a/config.json.
  EXPECT_EQ(c->vocab_size, 1024);
  EXPECT_EQ(c->hidden_size, 256);
  EXPECT_EQ(c->num_hidden_layers, 4);
  EXPECT_EQ(c->num_attention_heads, 4);
  EXPECT_EQ(c->num_key_value_heads, 1);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->qk_rope_head_dim, 64);
  EXPECT_EQ(c->q_lora_rank, 128);
  EXPECT_EQ(c->o_groups, 2);
  EXPECT_EQ(c->o_lora_rank, 64);
  EXPECT_EQ(c->sliding_window, 32);
  EXPECT_EQ(c->compress_ratios, (std::vector<int>{0, 4, 16, 4, 0}));
  EXPECT_EQ(c->index_n_heads, 16);
  EXPECT_EQ(c->index_head_dim, 64);
  EXPECT_EQ(c->index_topk, 8);
  EXPECT_EQ(c->n_routed_experts, 16);
  EXPECT_EQ(c->num_experts_per_tok, 4);
  EXPECT_EQ(c->moe_intermediate_size, 128);
  EXPECT_EQ(c->n_shared_experts, 1);
  EXPECT_EQ(c->num_hash_layers, 1);
  EXPECT_EQ(c->scoring_func, ScoringFunc::kSqrtSoftplus);
  EXPECT_DOUBLE_EQ(c->routed_scaling_factor, 1.5);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_DOUBLE_EQ(c->swiglu_limit, 10.0);
  EXPECT_EQ(c->hc_mult, 4);
  EXPECT_EQ(c->hc_sinkhorn_iters, 20);
  EXPECT_DOUBLE_EQ(c->hc_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(c->compress_rope_theta, 160000.0);
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 16);
  EXPECT_DOUBLE_EQ(c->rope_scaling.beta_fast, 32);
  EXPECT_DOUBLE_EQ(c->rope_scaling.beta_slow, 1);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 65536);
  EXPECT_EQ(c->num_nextn_predict_layers, 1);
  EXPECT_EQ(c->max_position_embeddings, 1024);
  EXPECT_EQ(c->bos_token_id, 0);
  EXPECT_EQ(c->eos_token_id, 1);
  EXPECT_EQ(c->expert_dtype, ExpertDType::kFP4);
  EXPECT_EQ(c->weight_block_size.rows, 128);
  EXPECT_EQ(c->weight_block_size.cols, 128);

  EXPECT_EQ(c->NumBlocks(), 5);
  EXPECT_EQ(c->CompressRatio(0), 0);
  EXPECT_EQ(c->CompressRatio(2), 16);
  EXPECT_EQ(c->CompressRatio(4), 0);  // the MTP layer
  EXPECT_TRUE(c->IsHashLayer(0));
  EXPECT_FALSE(c->IsHashLayer(1));
  EXPECT_FALSE(c->IsHashLayer(4));
}

// Writing the parsed golden config gives the golden file back, byte for byte: make-model's
// config.json is in the released layout.
TEST(ConfigTest, ToJsonReproducesGoldenFile) {
  auto c = ParseModelConfig(GoldenConfigText());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(ModelConfigToJson(*c), GoldenConfigText());
}

TEST(ConfigTest, LongerCompressRatiosAreAccepted) {
  ordered_json j = GoldenConfig();
  j["compress_ratios"] = {0, 4, 128, 4, 0, 4, 128};
  auto c = ParseModelConfig(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->CompressRatio(2), 128);
  EXPECT_EQ(c->CompressRatio(4), 0);
}

TEST(ConfigTest, OptionalKeysTakeDocumentedDefaults) {
  ordered_json j = GoldenConfig();
  for (const char* key :
       {"num_key_value_heads", "norm_topk_prob", "swiglu_limit", "num_nextn_predict_layers",
        "n_shared_experts", "num_hash_layers", "expert_dtype", "quantization_config",
        "rope_scaling", "compress_rope_theta", "max_position_embeddings", "bos_token_id",
        "eos_token_id", "rms_norm_eps", "hc_eps", "hc_sinkhorn_iters"}) {
    j.erase(key);
  }
  auto c = ParseModelConfig(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 1);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_EQ(c->swiglu_limit, 0.0);
  EXPECT_EQ(c->num_nextn_predict_layers, 0);
  EXPECT_EQ(c->n_shared_experts, 0);
  EXPECT_EQ(c->num_hash_layers, 0);
  EXPECT_EQ(c->expert_dtype, ExpertDType::kFP4);
  EXPECT_EQ(c->weight_block_size.rows, 128);
  EXPECT_EQ(c->rope_scaling.factor, 1.0);
  EXPECT_EQ(c->compress_rope_theta, 10000.0);
  EXPECT_EQ(c->max_position_embeddings, 0);
  EXPECT_EQ(c->bos_token_id, 0);
  EXPECT_EQ(c->eos_token_id, 1);
  EXPECT_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_EQ(c->hc_eps, 1e-6);
  EXPECT_EQ(c->hc_sinkhorn_iters, 20);
  EXPECT_EQ(c->NumBlocks(), 4);
}

TEST(ConfigTest, MalformedJson) {
  auto c = ParseModelConfig("{\"vocab_size\": 12,");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("malformed JSON"));
  c = ParseModelConfig("[1, 2]");
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("must be an object"));
}

TEST(ConfigTest, MissingDirIsNotFound) {
  auto c = LoadModelConfig("/nonexistent/expertmesh-model");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("config.json"));
}

struct BadCase {
  std::string label;
  std::function<void(ordered_json&)> mutate;
  std::string expect;  // substring of the error: the key's name and what is wrong
};

TEST(ConfigTest, EveryBadKeyIsNamed) {
  const std::vector<BadCase> cases = {
      {"missing required", [](ordered_json& j) { j.erase("hidden_size"); },
       "'hidden_size' is missing"},
      {"missing vocab", [](ordered_json& j) { j.erase("vocab_size"); }, "'vocab_size' is missing"},
      {"missing ratios", [](ordered_json& j) { j.erase("compress_ratios"); },
       "'compress_ratios' is missing"},
      {"missing scoring", [](ordered_json& j) { j.erase("scoring_func"); },
       "'scoring_func' is missing"},
      {"string for int", [](ordered_json& j) { j["num_attention_heads"] = "4"; },
       "'num_attention_heads' must be an integer"},
      {"fraction for int", [](ordered_json& j) { j["head_dim"] = 127.5; },
       "'head_dim' must be an integer"},
      {"zero size", [](ordered_json& j) { j["q_lora_rank"] = 0; }, "'q_lora_rank' must be in"},
      {"negative", [](ordered_json& j) { j["sliding_window"] = -1; },
       "'sliding_window' must be in"},
      {"bool type", [](ordered_json& j) { j["norm_topk_prob"] = 1; },
       "'norm_topk_prob' must be a boolean"},
      {"number type", [](ordered_json& j) { j["rope_theta"] = "10000"; },
       "'rope_theta' must be a number"},
      {"head_dim < rope", [](ordered_json& j) { j["head_dim"] = 32; },
       "'head_dim' (32) must be >= qk_rope_head_dim (64)"},
      {"odd rope", [](ordered_json& j) { j["qk_rope_head_dim"] = 63; },
       "'qk_rope_head_dim' must be even"},
      {"heads % groups", [](ordered_json& j) { j["o_groups"] = 3; },
       "'o_groups' (3) must divide num_attention_heads (4)"},
      {"topk > experts", [](ordered_json& j) { j["num_experts_per_tok"] = 17; },
       "'num_experts_per_tok' (17) must be <= n_routed_experts (16)"},
      {"short ratios",
       [](ordered_json& j) {
         j["compress_ratios"] = {0, 4, 16, 4};
       },
       "'compress_ratios' has 4 entries, needs num_hidden_layers + num_nextn_predict_layers = 5"},
      {"ratio type", [](ordered_json& j) { j["compress_ratios"][1] = "4"; },
       "'compress_ratios' entry 1 must be an integer"},
      {"ratios not array", [](ordered_json& j) { j["compress_ratios"] = 4; },
       "'compress_ratios' must be an array"},
      {"kv heads", [](ordered_json& j) { j["num_key_value_heads"] = 4; },
       "'num_key_value_heads' must be 1"},
      {"scoring", [](ordered_json& j) { j["scoring_func"] = "tanh"; },
       "'scoring_func' must be one of sqrtsoftplus, sigmoid, softmax; got 'tanh'"},
      {"hadamard", [](ordered_json& j) { j["index_head_dim"] = 96; },
       "'index_head_dim' must be a power of two"},
      {"indexer < rope", [](ordered_json& j) { j["index_head_dim"] = 32; },
       "'index_head_dim' (32) must be >= qk_rope_head_dim (64)"},
      {"fp4 moe size", [](ordered_json& j) { j["moe_intermediate_size"] = 136; },
       "'moe_intermediate_size' must be a multiple of 32 for FP4"},
      {"fp4 hidden", [](ordered_json& j) { j["hidden_size"] = 272; },
       "'hidden_size' must be a multiple of 32 for FP4"},
      {"expert dtype", [](ordered_json& j) { j["expert_dtype"] = "int4"; },
       "'expert_dtype' must be 'fp4' or 'fp8'"},
      {"hash layers", [](ordered_json& j) { j["num_hash_layers"] = 5; },
       "'num_hash_layers' (5) must be <= num_hidden_layers (4)"},
      {"bos", [](ordered_json& j) { j["bos_token_id"] = 1024; },
       "'bos_token_id' (1024) must be < vocab_size (1024)"},
      {"eos", [](ordered_json& j) { j["eos_token_id"] = 5000; }, "'eos_token_id' (5000)"},
      {"rope type", [](ordered_json& j) { j["rope_scaling"]["type"] = "linear"; },
       "'rope_scaling.type' must be 'yarn'"},
      {"rope factor missing", [](ordered_json& j) { j["rope_scaling"].erase("factor"); },
       "'rope_scaling.factor' is missing"},
      {"rope orig type",
       [](ordered_json& j) { j["rope_scaling"]["original_max_position_embeddings"] = "x"; },
       "'rope_scaling.original_max_position_embeddings' must be an integer"},
      {"rope factor < 1", [](ordered_json& j) { j["rope_scaling"]["factor"] = 0.5; },
       "'rope_scaling.factor' must be >= 1"},
      {"block size", [](ordered_json& j) { j["quantization_config"]["weight_block_size"] = {128}; },
       "'quantization_config.weight_block_size' must be [rows, cols]"},
      {"quant fmt", [](ordered_json& j) { j["quantization_config"]["fmt"] = "e5m2"; },
       "'quantization_config.fmt' must be 'e4m3'"},
      {"scale fmt", [](ordered_json& j) { j["quantization_config"]["scale_fmt"] = "fp32"; },
       "'quantization_config.scale_fmt' must be 'ue8m0'"},
      {"eps", [](ordered_json& j) { j["rms_norm_eps"] = 0; }, "'rms_norm_eps' must be > 0"},
      {"scaling factor", [](ordered_json& j) { j["routed_scaling_factor"] = -1.5; },
       "'routed_scaling_factor' must be > 0"},
      {"swiglu", [](ordered_json& j) { j["swiglu_limit"] = -1; }, "'swiglu_limit' must be >= 0"},
      {"hc_mult", [](ordered_json& j) { j["hc_mult"] = 0; }, "'hc_mult' must be in"},
      {"huge", [](ordered_json& j) { j["vocab_size"] = 1ull << 40; }, "'vocab_size' must be in"},
  };
  for (const BadCase& bc : cases) {
    ordered_json j = GoldenConfig();
    bc.mutate(j);
    auto c = ParseModelConfig(j.dump());
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << bc.label;
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(bc.expect)) << bc.label;
  }
}

TEST(ConfigTest, FloatWrittenIntegersAreAccepted) {
  ordered_json j = GoldenConfig();
  j["hidden_size"] = 256.0;
  auto c = ParseModelConfig(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 256);
}

TEST(ConfigTest, Fp8ExpertsRelaxTheFp4Multiple) {
  ordered_json j = GoldenConfig();
  j["expert_dtype"] = "fp8";
  j["moe_intermediate_size"] = 136;
  auto c = ParseModelConfig(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->expert_dtype, ExpertDType::kFP8);
}

}  // namespace
}  // namespace expertmesh::model
