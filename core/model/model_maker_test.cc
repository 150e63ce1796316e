#include "core/model/model_maker.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>

#include "core/base/mapped_file.h"
#include "core/model/checkpoint.h"
#include "core/model/test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace expertmesh::model {
namespace {

using ::testing::HasSubstr;
using testing_util::ScratchDir;
using testing_util::TinyADir;

std::string Read(const std::string& path) {
  auto s = base::ReadFileToString(path);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : "";
}

std::string HeaderBytes(const std::string& file) {
  std::string all = Read(file);
  if (all.size() < 8) return "";
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(all[i]);
  return all.substr(0, 8 + n);
}

// Decoders written from MODEL.md's definitions, independent of the maker's encoders.
float E4M3(uint8_t b) {
  const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
  if (e == 15 && m == 7) return NAN;
  float v = e == 0 ? std::ldexp(m / 8.0f, -6) : std::ldexp(1 + m / 8.0f, e - 7);
  return s ? -v : v;
}
float E2M1(uint8_t nib) {
  static constexpr float kGrid[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
  return (nib & 8 ? -1 : 1) * kGrid[nib & 7];
}

// RMS of a dequantized FP8 weight with 128x128 E8M0 blocks.
double Fp8Rms(const Checkpoint& c, const std::string& prefix, int64_t rows, int64_t cols) {
  auto w = c.Get(prefix + "weight");
  auto s = c.Get(prefix + "scale");
  EXPECT_TRUE(w.ok() && s.ok()) << prefix;
  const int64_t sc = (cols + 127) / 128;
  double sum = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < cols; ++k) {
      float v = E4M3(w->data[r * cols + k]) *
                std::ldexp(1.0f, static_cast<int>(s->data[(r / 128) * sc + k / 128]) - 127);
      sum += static_cast<double>(v) * v;
    }
  }
  return std::sqrt(sum / static_cast<double>(rows * cols));
}

double Fp4Rms(const Checkpoint& c, const std::string& prefix, int64_t rows, int64_t cols) {
  auto w = c.Get(prefix + "weight");
  auto s = c.Get(prefix + "scale");
  EXPECT_TRUE(w.ok() && s.ok()) << prefix;
  double sum = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < cols; ++k) {
      uint8_t byte = w->data[(r * cols + k) / 2];
      float v = E2M1(k % 2 == 0 ? byte & 15 : byte >> 4) *
                std::ldexp(1.0f, static_cast<int>(s->data[r * (cols / 32) + k / 32]) - 127);
      sum += static_cast<double>(v) * v;
    }
  }
  return std::sqrt(sum / static_cast<double>(rows * cols));
}

double FloatRms(const Checkpoint& c, const std::string& name, std::vector<int64_t> shape) {
  auto v = c.GetFloats(name, shape);
  EXPECT_TRUE(v.ok()) << v.status();
  double sum = 0;
  for (float x : *v) sum += static_cast<double>(x) * x;
  return std::sqrt(sum / static_cast<double>(v->size()));
}

// The tiny-a-shaped preset is in exactly the golden checkpoint's format: same config.json bytes,
// same safetensors header bytes (names, dtypes, shapes, offsets, metadata, padding).
TEST(ModelMakerTest, TinyAShapeHasTheGoldenFormat) {
  ScratchDir dir;
  const std::string out = dir / "m";
  ASSERT_TRUE(WriteModelPreset("tiny-a-shape", 7, out).ok());
  EXPECT_EQ(Read(out + "/config.json"), Read(TinyADir() + "/config.json"));
  EXPECT_EQ(HeaderBytes(out + "/model.safetensors"),
            HeaderBytes(TinyADir() + "/model.safetensors"));
  EXPECT_EQ(std::filesystem::file_size(out + "/model.safetensors"),
            std::filesystem::file_size(TinyADir() + "/model.safetensors"));
}

// Magnitudes like the golden checkpoint's, so activations stay in the same range.
TEST(ModelMakerTest, TinyAShapeMagnitudesMatchGolden) {
  ScratchDir dir;
  ASSERT_TRUE(WriteModelPreset("tiny-a-shape", 3, dir / "m").ok());
  auto made = Checkpoint::Open(dir / "m");
  auto golden = Checkpoint::Open(TinyADir());
  ASSERT_TRUE(made.ok() && golden.ok());
  auto near = [](double a, double b, const std::string& what) {
    EXPECT_NEAR(a / b, 1.0, 0.25) << what << ": made " << a << " golden " << b;
  };
  for (auto [prefix, rows, cols] : std::vector<std::tuple<std::string, int64_t, int64_t>>{
           {"layers.1.attn.wq_a.", 128, 256},
           {"layers.1.attn.wq_b.", 512, 128},
           {"layers.3.attn.indexer.wq_b.", 1024, 128},
           {"layers.2.ffn.shared_experts.w2.", 256, 128},
           {"mtp.0.e_proj.", 256, 256}}) {
    near(Fp8Rms(**made, prefix, rows, cols), Fp8Rms(**golden, prefix, rows, cols), prefix);
  }
  for (auto [prefix, rows, cols] : std::vector<std::tuple<std::string, int64_t, int64_t>>{
           {"layers.1.ffn.experts.3.w1.", 128, 256}, {"layers.1.ffn.experts.3.w2.", 256, 128}}) {
    near(Fp4Rms(**made, prefix, rows, cols), Fp4Rms(**golden, prefix, rows, cols), prefix);
  }
  for (auto [name, shape] : std::vector<std::pair<std::string, std::vector<int64_t>>>{
           {"embed.weight", {1024, 256}},
           {"head.weight", {1024, 256}},
           {"norm.weight", {256}},
           {"layers.1.hc_attn_fn", {24, 1024}},
           {"layers.1.attn.compressor.wkv.weight", {256, 256}},
           {"layers.1.ffn.gate.weight", {16, 256}},
           {"layers.1.hc_ffn_scale", {3}}}) {
    near(FloatRms(**made, name, shape), FloatRms(**golden, name, shape), name);
  }
}

// Every block's scale follows the numerics contract's rule 2^ceil(log2(amax/qmax)): the largest
// code in a block is in (qmax/2, qmax], and no code is NaN.
TEST(ModelMakerTest, QuantizedBlocksUseTheFullCodeRange) {
  ScratchDir dir;
  ASSERT_TRUE(WriteModelPreset("tiny-a-shape", 11, dir / "m").ok());
  auto c = Checkpoint::Open(dir / "m");
  ASSERT_TRUE(c.ok());
  auto w = (*c)->Get("layers.1.attn.wq_b.weight");  // [512, 128]: 4 blocks of 128x128
  ASSERT_TRUE(w.ok());
  for (int b = 0; b < 4; ++b) {
    float amax = 0;
    for (int i = b * 128 * 128; i < (b + 1) * 128 * 128; ++i) {
      float v = E4M3(w->data[i]);
      ASSERT_FALSE(std::isnan(v));
      amax = std::max(amax, std::fabs(v));
    }
    EXPECT_GT(amax, 224.0f);
    EXPECT_LE(amax, 448.0f);
  }
  auto x = (*c)->Get("layers.2.ffn.experts.0.w1.weight");  // [128, 128 packed]
  ASSERT_TRUE(x.ok());
  for (int g = 0; g < 128 * 256 / 32; ++g) {
    float amax = 0;
    for (int i = 0; i < 16; ++i) {
      uint8_t byte = x->data[g * 16 + i];
      amax = std::max({amax, std::fabs(E2M1(byte & 15)), std::fabs(E2M1(byte >> 4))});
    }
    EXPECT_GE(amax, 3.0f) << "group " << g;
  }
}

TEST(ModelMakerTest, DeterministicAndSeedDependent) {
  ScratchDir dir;
  ASSERT_TRUE(WriteModelPreset("tiny-a-shape", 42, dir / "a").ok());
  ASSERT_TRUE(WriteModelPreset("tiny-a-shape", 42, dir / "b").ok());
  ASSERT_TRUE(WriteModelPreset("tiny-a-shape", 43, dir / "c").ok());
  const std::string a = Read(dir / "a/model.safetensors");
  EXPECT_EQ(a, Read(dir / "b/model.safetensors"));
  EXPECT_EQ(Read(dir / "a/config.json"), Read(dir / "b/config.json"));
  const std::string c = Read(dir / "c/model.safetensors");
  EXPECT_EQ(a.size(), c.size());
  EXPECT_NE(a, c);
}

TEST(ModelMakerTest, HashRoutingTableHasDistinctExperts) {
  ScratchDir dir;
  ASSERT_TRUE(WriteModelPreset("tiny-a-shape", 5, dir / "m").ok());
  auto c = Checkpoint::Open(dir / "m");
  ASSERT_TRUE(c.ok());
  auto t = (*c)->GetInt32("layers.0.ffn.gate.tid2eid", {1024, 4});
  ASSERT_TRUE(t.ok());
  std::vector<int> hits(16, 0);
  for (int r = 0; r < 1024; ++r) {
    std::set<int32_t> row(t->begin() + r * 4, t->begin() + r * 4 + 4);
    EXPECT_EQ(row.size(), 4u) << "token " << r;
    for (int32_t e : row) ++hits[static_cast<size_t>(e)];
  }
  for (int h : hits) EXPECT_GT(h, 150);  // 256 expected per expert; all experts used
}

TEST(ModelMakerTest, MtpEmbeddingAndHeadAreCopiesOfTheTrunks) {
  ScratchDir dir;
  ASSERT_TRUE(WriteModelPreset("tiny-a-shape", 9, dir / "m").ok());
  auto c = Checkpoint::Open(dir / "m");
  ASSERT_TRUE(c.ok());
  for (const char* name : {"embed.weight", "head.weight"}) {
    auto a = (*c)->Get(name);
    auto b = (*c)->Get(std::string("mtp.0.") + name);
    ASSERT_TRUE(a.ok() && b.ok());
    ASSERT_EQ(a->nbytes, b->nbytes);
    EXPECT_EQ(std::memcmp(a->data, b->data, a->nbytes), 0) << name;
  }
}

// The cluster's default model: real vocabulary, ratios 0/4/128, loads and validates.
TEST(ModelMakerTest, TinyLoadsAndValidates) {
  ScratchDir dir;
  std::vector<std::string> lines;
  static std::vector<std::string>* sink;
  sink = &lines;
  ASSERT_TRUE(WriteModelPreset("tiny", 0, dir / "tiny", [](std::string_view l) {
                sink->push_back(std::string(l));
              }).ok());
  EXPECT_FALSE(lines.empty());
  auto c = Checkpoint::Open(dir / "tiny");
  ASSERT_TRUE(c.ok()) << c.status();
  const ModelConfig& cfg = (*c)->config();
  EXPECT_EQ(cfg.vocab_size, 129280);
  EXPECT_EQ(cfg.CompressRatio(0), 0);
  EXPECT_EQ(cfg.CompressRatio(1), 4);
  EXPECT_EQ(cfg.CompressRatio(2), 128);
  EXPECT_EQ(cfg.num_hash_layers, 1);
  EXPECT_EQ(cfg.num_nextn_predict_layers, 1);
  EXPECT_EQ(cfg.n_routed_experts, 16);
  EXPECT_EQ(cfg.num_experts_per_tok, 4);
  EXPECT_EQ(cfg.bos_token_id, 0);
  EXPECT_EQ(cfg.eos_token_id, 1);
  absl::Status v = ValidateCheckpoint(**c);
  EXPECT_TRUE(v.ok()) << v;
  auto w = (*c)->GetMatrix("layers.2.attn.compressor.wkv.weight", 128, 256);
  ASSERT_TRUE(w.ok()) << w.status();
  auto e = (*c)->GetMatrix("layers.3.ffn.experts.15.w2.weight", 256, 128);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->format, kernels::WeightFormat::kFP4E2M1);
}

TEST(ModelMakerTest, Fp8ExpertsWhenTheConfigSaysSo) {
  ScratchDir dir;
  auto cfg = PresetConfig("tiny-a-shape");
  ASSERT_TRUE(cfg.ok());
  cfg->expert_dtype = ExpertDType::kFP8;
  ASSERT_TRUE(WriteModel(*cfg, 1, dir / "m").ok());
  auto c = Checkpoint::Open(dir / "m");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->config().expert_dtype, ExpertDType::kFP8);
  absl::Status v = ValidateCheckpoint(**c);
  EXPECT_TRUE(v.ok()) << v;
  auto e = (*c)->GetMatrix("layers.1.ffn.experts.2.w2.weight", 256, 128);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->format, kernels::WeightFormat::kFP8E4M3);
  // The golden config says fp4: its FP4 experts fail validation against an fp8 config.
  ScratchDir other;
  std::filesystem::copy_file(TinyADir() + "/model.safetensors", other / "model.safetensors");
  std::string text = Read(TinyADir() + "/config.json");
  text.replace(text.find("\"fp4\""), 5, "\"fp8\"");
  testing_util::WriteRaw(other / "config.json", text);
  auto g = Checkpoint::Open(other.path());
  ASSERT_TRUE(g.ok()) << g.status();
  v = ValidateCheckpoint(**g);
  EXPECT_THAT(std::string(v.message()),
              HasSubstr("tensor 'layers.0.ffn.experts.0.w1.weight': expected dtype F8_E4M3 (as "
                        "config expert_dtype says), got I8"));
}

TEST(ModelMakerTest, Errors) {
  ScratchDir dir;
  auto s = WriteModelPreset("huge", 0, dir / "x");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("unknown preset 'huge' (known: tiny, tiny-a-shape"));
  ASSERT_TRUE(WriteModelPreset("tiny-a-shape", 0, dir / "m").ok());
  s = WriteModelPreset("tiny-a-shape", 1, dir / "m");
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists);
  // An inconsistent config is refused before anything is written, naming the key.
  auto cfg = PresetConfig("tiny-a-shape");
  ASSERT_TRUE(cfg.ok());
  cfg->o_groups = 3;
  s = WriteModel(*cfg, 0, dir / "bad");
  EXPECT_THAT(std::string(s.message()), HasSubstr("'o_groups'"));
  // Nothing but the two finished models is left in the directory (no temporaries).
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    names.push_back(e.path().filename().string());
  }
  EXPECT_THAT(names, ::testing::UnorderedElementsAre("m"));
}

}  // namespace
}  // namespace expertmesh::model
