#include "core/model/checkpoint.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/base/mapped_file.h"
#include "core/model/test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace expertmesh::model {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing_util::ScratchDir;
using testing_util::TinyADir;
using testing_util::WriteRaw;

std::string GoldenConfigText() { return *base::ReadFileToString(TinyADir() + "/config.json"); }

std::string ViewBytes(const TensorView& v) {
  return std::string(reinterpret_cast<const char*>(v.data), v.nbytes);
}

// BF16 -> float exactly as MODEL.md defines it (the high half of a float32).
float Bf16(const uint8_t* p) {
  uint32_t bits = (static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8)) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

TEST(CheckpointTest, OpensAndValidatesGoldenTinyA) {
  auto ckpt = Checkpoint::Open(TinyADir());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const Checkpoint& c = **ckpt;
  EXPECT_EQ(c.config().num_hidden_layers, 4);
  EXPECT_EQ(c.NumShards(), 1);
  EXPECT_EQ(c.Names().size(), 669u);
  EXPECT_TRUE(ValidateCheckpoint(c).ok()) << ValidateCheckpoint(c);

  // FP8 linear layer with its E8M0 128x128 block scales.
  auto wq_a = c.GetMatrix("layers.0.attn.wq_a.weight", 128, 256);
  ASSERT_TRUE(wq_a.ok()) << wq_a.status();
  EXPECT_EQ(wq_a->format, kernels::WeightFormat::kFP8E4M3);
  EXPECT_EQ(wq_a->scale_format, kernels::ScaleFormat::kE8M0);
  EXPECT_EQ(wq_a->block_rows, 128);
  EXPECT_EQ(wq_a->block_cols, 128);
  auto scale = c.Get("layers.0.attn.wq_a.scale");
  ASSERT_TRUE(scale.ok());
  EXPECT_EQ(wq_a->scales, scale->data);  // in place: byte-sized data needs no alignment
  // FP4 routed expert.
  auto w2 = c.GetMatrix("layers.2.ffn.experts.7.w2.weight", 256, 128);
  ASSERT_TRUE(w2.ok()) << w2.status();
  EXPECT_EQ(w2->format, kernels::WeightFormat::kFP4E2M1);
  EXPECT_EQ(w2->scale_format, kernels::ScaleFormat::kE8M0);
  // BF16 and F32 matrices.
  auto gate = c.GetMatrix("layers.1.ffn.gate.weight", 16, 256);
  ASSERT_TRUE(gate.ok()) << gate.status();
  EXPECT_EQ(gate->format, kernels::WeightFormat::kBF16);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(gate->data) % 2, 0u);
  auto head = c.GetMatrix("head.weight", 1024, 256);
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_EQ(head->format, kernels::WeightFormat::kF32);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(head->data) % 4, 0u);
  auto raw_head = c.Get("head.weight");
  ASSERT_TRUE(raw_head.ok());
  EXPECT_EQ(std::memcmp(head->data, raw_head->data, raw_head->nbytes), 0);

  // BF16 norm -> float, compared with a decode of the raw bytes.
  auto norm = c.GetFloats("norm.weight", {256});
  ASSERT_TRUE(norm.ok()) << norm.status();
  auto raw_norm = c.Get("norm.weight");
  for (int i = 0; i < 256; ++i) EXPECT_EQ((*norm)[i], Bf16(raw_norm->data + 2 * i));
  // F32 stored at an offset that is not 4-aligned in the golden file (hc_attn_fn of layer 0).
  auto raw_fn = c.Get("layers.0.hc_attn_fn");
  ASSERT_TRUE(raw_fn.ok());
  auto fn = c.GetFloats("layers.0.hc_attn_fn", {24, 1024});
  ASSERT_TRUE(fn.ok()) << fn.status();
  EXPECT_EQ(std::memcmp(fn->data(), raw_fn->data, raw_fn->nbytes), 0);

  auto tid = c.GetInt32("layers.0.ffn.gate.tid2eid", {1024, 4});
  ASSERT_TRUE(tid.ok()) << tid.status();
  EXPECT_EQ(tid->size(), 4096u);
  for (int32_t e : *tid) {
    EXPECT_GE(e, 0);
    EXPECT_LT(e, 16);
  }
}

// A small checkpoint directory: the golden config plus hand-made tensors.
class HandMade : public ::testing::Test {
 protected:
  void SetUp() override { testing_util::WriteRaw(dir_ / "config.json", GoldenConfigText()); }
  absl::StatusOr<std::unique_ptr<Checkpoint>> Write(SafetensorsWriter& w) {
    absl::Status s = w.WriteFile(dir_ / "model.safetensors");
    if (!s.ok()) return s;
    return Checkpoint::Open(dir_.path());
  }
  static std::string Zeros(size_t n) { return std::string(n, '\0'); }

  ScratchDir dir_;
};

TEST_F(HandMade, GetMatrixErrorsNameTheTensorAndSayExpectedVsGot) {
  SafetensorsWriter w;
  ASSERT_TRUE(w.Add("fp8.weight", DType::kF8E4M3, {300, 200}, Zeros(60000)).ok());
  ASSERT_TRUE(w.Add("fp8.scale", DType::kF8E8M0, {3, 2}, Zeros(6)).ok());
  ASSERT_TRUE(w.Add("noscale.weight", DType::kF8E4M3, {4, 4}, Zeros(16)).ok());
  ASSERT_TRUE(w.Add("badscale.weight", DType::kF8E4M3, {4, 4}, Zeros(16)).ok());
  ASSERT_TRUE(w.Add("badscale.scale", DType::kF8E8M0, {2, 2}, Zeros(4)).ok());
  ASSERT_TRUE(w.Add("bf16scale.weight", DType::kF8E4M3, {4, 4}, Zeros(16)).ok());
  ASSERT_TRUE(w.Add("bf16scale.scale", DType::kBF16, {1, 1}, Zeros(2)).ok());
  ASSERT_TRUE(w.Add("f32scale.weight", DType::kF8E4M3, {4, 4}, Zeros(16)).ok());
  ASSERT_TRUE(w.Add("f32scale.scale", DType::kF32, {1, 1}, Zeros(4)).ok());
  ASSERT_TRUE(w.Add("fp4.weight", DType::kI8, {8, 32}, Zeros(256)).ok());
  ASSERT_TRUE(w.Add("fp4.scale", DType::kF8E8M0, {8, 2}, Zeros(16)).ok());
  ASSERT_TRUE(w.Add("f16.weight", DType::kF16, {4, 4}, Zeros(32)).ok());
  ASSERT_TRUE(w.Add("bf16.weight", DType::kBF16, {4, 4}, Zeros(32)).ok());
  ASSERT_TRUE(w.Add("oddname", DType::kF8E4M3, {4, 4}, Zeros(16)).ok());
  auto ckpt = Write(w);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const Checkpoint& c = **ckpt;

  auto ok = c.GetMatrix("fp8.weight", 300, 200);  // partial last blocks: ceil(300/128) = 3
  ASSERT_TRUE(ok.ok()) << ok.status();
  ok = c.GetMatrix("f32scale.weight", 4, 4);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->scale_format, kernels::ScaleFormat::kF32);
  ok = c.GetMatrix("fp4.weight", 8, 64);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->format, kernels::WeightFormat::kFP4E2M1);

  struct Case {
    std::string name;
    int64_t rows, cols;
    absl::StatusCode code;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"absent.weight", 4, 4, absl::StatusCode::kNotFound,
       "tensor 'absent.weight' not in checkpoint"},
      {"noscale.weight", 4, 4, absl::StatusCode::kNotFound,
       "tensor 'noscale.weight' (F8_E4M3) has no scale tensor 'noscale.scale'"},
      {"fp8.weight", 300, 100, absl::StatusCode::kInvalidArgument,
       "tensor 'fp8.weight': expected shape [300, 100], got [300, 200]"},
      {"badscale.weight", 4, 4, absl::StatusCode::kInvalidArgument,
       "tensor 'badscale.scale': expected scale shape [1, 1], got [2, 2]"},
      {"bf16scale.weight", 4, 4, absl::StatusCode::kInvalidArgument,
       "tensor 'bf16scale.scale': expected dtype F8_E8M0 or F32 for a scale, got BF16"},
      {"fp4.weight", 8, 32, absl::StatusCode::kInvalidArgument,
       "tensor 'fp4.weight': expected FP4-packed I8 shape [8, 16], got [8, 32]"},
      {"fp4.weight", 8, 48, absl::StatusCode::kInvalidArgument,
       "tensor 'fp4.weight': FP4 (I8) weight needs cols % 32 == 0, got 48"},
      {"f16.weight", 4, 4, absl::StatusCode::kInvalidArgument,
       "tensor 'f16.weight': expected dtype F32, BF16, F8_E4M3 or I8 (FP4) for a weight matrix, "
       "got F16"},
      {"bf16.weight", 4, 5, absl::StatusCode::kInvalidArgument,
       "tensor 'bf16.weight': expected shape [4, 5], got [4, 4]"},
      {"oddname", 4, 4, absl::StatusCode::kInvalidArgument, "name must end in 'weight'"},
  };
  for (const Case& k : cases) {
    auto m = c.GetMatrix(k.name, k.rows, k.cols);
    EXPECT_EQ(m.status().code(), k.code) << k.name << ": " << m.status();
    EXPECT_THAT(std::string(m.status().message()), HasSubstr(k.expect)) << k.name;
  }
}

TEST_F(HandMade, FloatAndIntErrors) {
  SafetensorsWriter w;
  ASSERT_TRUE(w.Add("n.weight", DType::kF16, {4}, Zeros(8)).ok());
  ASSERT_TRUE(w.AddF32("b", {4}, {1, 2, 3, 4}).ok());
  ASSERT_TRUE(w.AddI32("ids", {2, 2}, {0, 1, 2, 3}).ok());
  auto ckpt = Write(w);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const Checkpoint& c = **ckpt;
  auto f = c.GetFloats("n.weight", {4});
  EXPECT_THAT(std::string(f.status().message()),
              HasSubstr("tensor 'n.weight': expected dtype F32 or BF16, got F16"));
  f = c.GetFloats("b", {2, 2});
  EXPECT_THAT(std::string(f.status().message()),
              HasSubstr("tensor 'b': expected shape [2, 2], got [4]"));
  f = c.GetFloats("nope", {4});
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
  auto i = c.GetInt32("b", {4});
  EXPECT_THAT(std::string(i.status().message()),
              HasSubstr("tensor 'b': expected dtype I32, got F32"));
  i = c.GetInt32("ids", {4});
  EXPECT_THAT(std::string(i.status().message()),
              HasSubstr("tensor 'ids': expected shape [4], got [2, 2]"));
  i = c.GetInt32("ids", {2, 2});
  ASSERT_TRUE(i.ok());
  EXPECT_THAT(*i, ElementsAre(0, 1, 2, 3));
}

// safetensors does not align tensors: misaligned F32/BF16/I32 data is served from an aligned
// copy with the same bytes.
TEST_F(HandMade, MisalignedTensorsAreServedAligned) {
  SafetensorsWriter w;
  ASSERT_TRUE(w.Add("a.scale", DType::kF8E8M0, {1}, std::string(1, '\x7f')).ok());  // offset 0..1
  std::string f32(4 * 4, '\0');
  for (int k = 0; k < 4; ++k) {
    float v = 0.5f + k;
    std::memcpy(&f32[4 * k], &v, 4);
  }
  ASSERT_TRUE(w.Add("b.weight", DType::kF32, {2, 2}, f32).ok());  // starts at offset 1
  std::string ids(8, '\0');
  int32_t idv[2] = {5, 9};
  std::memcpy(ids.data(), idv, 8);
  ASSERT_TRUE(w.Add("c.ids", DType::kI32, {2}, ids).ok());
  auto ckpt = Write(w);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const Checkpoint& c = **ckpt;
  auto raw = c.Get("b.weight");
  ASSERT_TRUE(raw.ok());
  ASSERT_NE(reinterpret_cast<uintptr_t>(raw->data) % 4, 0u) << "test layout should misalign";
  auto m = c.GetMatrix("b.weight", 2, 2);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(m->data) % 4, 0u);
  EXPECT_EQ(std::memcmp(m->data, f32.data(), 16), 0);
  // A second request returns the same copy, not a new one.
  EXPECT_EQ(c.GetMatrix("b.weight", 2, 2)->data, m->data);
  auto i = c.GetInt32("c.ids", {2});
  ASSERT_TRUE(i.ok());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(i->data()) % 4, 0u);
  EXPECT_THAT(*i, ElementsAre(5, 9));
  auto fl = c.GetFloats("b.weight", {2, 2});
  ASSERT_TRUE(fl.ok());
  EXPECT_THAT(*fl, ElementsAre(0.5f, 1.5f, 2.5f, 3.5f));
}

TEST_F(HandMade, FileLevelErrorsNameTheTensor) {
  const std::string header = R"({"x.weight":{"dtype":"F8_E5M3","shape":[2],"data_offsets":[0,2]}})";
  WriteRaw(dir_ / "model.safetensors", testing_util::RawSafetensors(header, "ab"));
  auto c = Checkpoint::Open(dir_.path());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()),
              HasSubstr("tensor 'x.weight': unknown dtype 'F8_E5M3'"));
  // Truncated file: the tensor's bytes run past the end.
  const std::string h2 = R"({"y":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})";
  WriteRaw(dir_ / "model.safetensors", testing_util::RawSafetensors(h2, std::string(10, '\0')));
  c = Checkpoint::Open(dir_.path());
  EXPECT_THAT(std::string(c.status().message()),
              HasSubstr("tensor 'y': data_offsets [0, 16] out of range"));
}

TEST_F(HandMade, InconsistentConfigKeyIsNamed) {
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(GoldenConfigText());
  j["o_groups"] = 3;
  WriteRaw(dir_ / "config.json", j.dump());
  SafetensorsWriter w;
  ASSERT_TRUE(w.AddF32("b", {1}, {1}).ok());
  auto c = Write(w);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("config.json"));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("'o_groups' (3) must divide"));
}

TEST_F(HandMade, NoTensorFileIsNotFound) {
  auto c = Checkpoint::Open(dir_.path());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(c.status().message()),
              HasSubstr("neither model.safetensors nor model.safetensors.index.json"));
}

// ValidateCheckpoint names the first tensor that is missing or misshaped.
TEST(CheckpointValidateTest, ReportsMissingAndMisshapedTensors) {
  auto golden = SafetensorsFile::Open(TinyADir() + "/model.safetensors");
  ASSERT_TRUE(golden.ok());
  auto copy_except = [&](const std::string& skip, const std::string& reshape,
                         SafetensorsWriter* w) {
    for (const std::string& name : (*golden)->Names()) {
      if (name == skip) continue;
      auto v = (*golden)->Get(name);
      std::vector<int64_t> shape = v->shape;
      if (name == reshape) std::swap(shape[0], shape[1]);
      ASSERT_TRUE(w->Add(name, v->dtype, shape, ViewBytes(*v)).ok());
    }
  };
  struct Case {
    std::string skip, reshape, expect;
  };
  const std::vector<Case> cases = {
      {"layers.3.attn.indexer.compressor.ape", "", "'layers.3.attn.indexer.compressor.ape' not in"},
      {"mtp.0.hc_head_scale", "", "'mtp.0.hc_head_scale' not in"},
      {"layers.2.ffn.experts.15.w3.scale", "",
       "has no scale tensor 'layers.2.ffn.experts.15.w3.scale'"},
      {"layers.1.ffn.gate.bias", "", "'layers.1.ffn.gate.bias' not in"},
      {"layers.0.ffn.gate.tid2eid", "", "'layers.0.ffn.gate.tid2eid' not in"},
      {"", "layers.2.attn.compressor.ape",
       "'layers.2.attn.compressor.ape': expected shape [16, 128], got [128, 16]"},
      {"", "layers.1.attn.wo_b.weight",
       "'layers.1.attn.wo_b.weight': expected shape [256, 128], got [128, 256]"},
  };
  for (const Case& k : cases) {
    ScratchDir dir;
    WriteRaw(dir / "config.json", GoldenConfigText());
    SafetensorsWriter w;
    copy_except(k.skip, k.reshape, &w);
    ASSERT_TRUE(w.WriteFile(dir / "model.safetensors").ok());
    auto c = Checkpoint::Open(dir.path());
    ASSERT_TRUE(c.ok()) << c.status();
    absl::Status s = ValidateCheckpoint(**c);
    EXPECT_FALSE(s.ok()) << k.expect;
    EXPECT_THAT(std::string(s.message()), HasSubstr(k.expect));
  }
}

// Writes golden tiny-a as shards (tensor -> shard by `shard_of`) plus the index.
void WriteSharded(const std::string& dir, int num_shards,
                  const std::function<int(const std::string&)>& shard_of) {
  auto golden = SafetensorsFile::Open(TinyADir() + "/model.safetensors");
  ASSERT_TRUE(golden.ok());
  WriteRaw(dir + "/config.json", GoldenConfigText());
  std::vector<SafetensorsWriter> writers(static_cast<size_t>(num_shards));
  nlohmann::ordered_json index;
  index["metadata"] = {{"total_size", 0}};
  auto shard_name = [&](int i) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "model-%05d-of-%05d.safetensors", i + 1, num_shards);
    return std::string(buf);
  };
  for (const std::string& name : (*golden)->Names()) {
    auto v = (*golden)->Get(name);
    int s = shard_of(name);
    ASSERT_TRUE(writers[static_cast<size_t>(s)].Add(name, v->dtype, v->shape, ViewBytes(*v)).ok());
    index["weight_map"][name] = shard_name(s);
  }
  for (int i = 0; i < num_shards; ++i) {
    ASSERT_TRUE(writers[static_cast<size_t>(i)].WriteFile(dir + "/" + shard_name(i)).ok());
  }
  WriteRaw(dir + "/model.safetensors.index.json", index.dump(2));
}

TEST(CheckpointShardTest, TwoShardRoundTripGivesSameBytes) {
  ScratchDir dir;
  WriteSharded(dir.path(), 2, [](const std::string& name) {
    return name.rfind("layers.0.", 0) == 0 || name.rfind("layers.1.", 0) == 0 ? 0 : 1;
  });
  auto sharded = Checkpoint::Open(dir.path());
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  EXPECT_EQ((*sharded)->NumShards(), 2);
  EXPECT_TRUE((*sharded)->OpenedShards().empty());  // nothing mapped by Open
  auto golden = Checkpoint::Open(TinyADir());
  ASSERT_TRUE(golden.ok());
  EXPECT_EQ((*sharded)->Names(), (*golden)->Names());
  for (const std::string& name : (*golden)->Names()) {
    auto a = (*golden)->Get(name);
    auto b = (*sharded)->Get(name);
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(a->dtype, b->dtype) << name;
    EXPECT_EQ(a->shape, b->shape) << name;
    EXPECT_EQ(ViewBytes(*a), ViewBytes(*b)) << name;
  }
  EXPECT_TRUE(ValidateCheckpoint(**sharded).ok()) << ValidateCheckpoint(**sharded);
}

TEST(CheckpointShardTest, IndexErrors) {
  ScratchDir dir;
  WriteSharded(dir.path(), 2,
               [](const std::string& name) { return name.rfind("mtp.", 0) == 0 ? 1 : 0; });
  // A listed shard that does not exist: found at Open, naming the shard.
  std::filesystem::remove(dir / "model-00002-of-00002.safetensors");
  auto c = Checkpoint::Open(dir.path());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(c.status().message()),
              HasSubstr("shard 'model-00002-of-00002.safetensors' (holding tensor 'mtp."));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("does not exist"));

  // The index maps a tensor to a shard that lacks it.
  auto text = base::ReadFileToString(dir / "model.safetensors.index.json");
  nlohmann::json j = nlohmann::json::parse(*text);
  j["weight_map"]["mtp.0.norm.weight"] = "model-00001-of-00002.safetensors";
  for (auto& [k, v] : j["weight_map"].items()) {
    if (v == "model-00002-of-00002.safetensors") v = "model-00001-of-00002.safetensors";
  }
  WriteRaw(dir / "model.safetensors.index.json", j.dump());
  c = Checkpoint::Open(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
  auto t = (*c)->Get("mtp.0.norm.weight");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(
      std::string(t.status().message()),
      HasSubstr(
          "tensor 'mtp.0.norm.weight' is mapped to shard 'model-00001-of-00002.safetensors'"));

  // Malformed index files.
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"{", "malformed JSON"},
      {R"({"metadata":{}})", "missing or non-object 'weight_map'"},
      {R"({"weight_map":{"a":3}})", "weight_map entry of tensor 'a' is not a string"},
      {R"({"weight_map":{"a":"../x.safetensors"}})", "tensor 'a' maps to shard '../x.safetensors'"},
      {R"({"weight_map":{"a":"/etc/x"}})", "tensor 'a' maps to shard '/etc/x'"},
  };
  for (const auto& [content, expect] : bad) {
    WriteRaw(dir / "model.safetensors.index.json", content);
    c = Checkpoint::Open(dir.path());
    EXPECT_FALSE(c.ok()) << content;
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(expect)) << content;
  }
}

// Loading one expert maps only its shard: the other shards' files are never opened.
TEST(CheckpointShardTest, SubsetLoadOpensOnlyTheNeededShard) {
  ScratchDir dir;
  // Shard 0: everything but routed experts; shard 1+e%3: the routed experts, spread.
  WriteSharded(dir.path(), 4, [](const std::string& name) {
    size_t p = name.find(".experts.");
    if (p == std::string::npos) return 0;
    return 1 + std::stoi(name.substr(p + 9)) % 3;
  });
  auto c = Checkpoint::Open(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE((*c)->Has("layers.2.ffn.experts.5.w1.weight"));  // Has maps nothing
  EXPECT_TRUE((*c)->OpenedShards().empty());
  auto m = (*c)->GetMatrix("layers.2.ffn.experts.5.w1.weight", 128, 256);
  ASSERT_TRUE(m.ok()) << m.status();
  // Expert 5 is in shard 1 + 5 % 3 = 3, the file numbered 4.
  EXPECT_THAT((*c)->OpenedShards(), ElementsAre("model-00004-of-00004.safetensors"));
  ASSERT_TRUE((*c)->GetMatrix("layers.0.ffn.experts.8.w2.weight", 256, 128).ok());
  EXPECT_THAT((*c)->OpenedShards(), ElementsAre("model-00004-of-00004.safetensors"));
  ASSERT_TRUE((*c)->GetMatrix("layers.0.ffn.experts.7.w2.weight", 256, 128).ok());
  EXPECT_THAT((*c)->OpenedShards(),
              ElementsAre("model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"));
}

// Pages of [addr, addr + len) present in this process's page table, from /proc/self/pagemap
// (bit 63 of each page's entry; readable without privileges, which only hides the frame
// numbers). This is what the process mapped, whatever the file system keeps cached.
absl::StatusOr<size_t> MappedBytes(const void* addr, size_t len) {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t first = reinterpret_cast<uintptr_t>(addr) / page;
  const uintptr_t last = (reinterpret_cast<uintptr_t>(addr) + len + page - 1) / page;
  int fd = ::open("/proc/self/pagemap", O_RDONLY);
  if (fd < 0) return absl::ErrnoToStatus(errno, "open /proc/self/pagemap");
  std::vector<uint64_t> entries(last - first);
  const ssize_t want = static_cast<ssize_t>(entries.size() * sizeof(uint64_t));
  const ssize_t got = ::pread(fd, entries.data(), want, static_cast<off_t>(first * 8));
  const int err = errno;
  ::close(fd);
  if (got != want) return absl::ErrnoToStatus(got < 0 ? err : EIO, "read /proc/self/pagemap");
  size_t n = 0;
  for (uint64_t e : entries) n += (e >> 63) & 1;
  return n * page;
}

// Within one mapped file, loading one tensor brings only its pages into memory, even with the
// kernel's multi-MB readahead. Two measures, each asserted where it works:
// - mapped (pagemap): pages this process's page table holds, i.e. what the loader touched plus
//   the kernel's fault-around; independent of the file system.
// - cached (mincore): pages in the page cache, which is where readahead would show. Only
//   meaningful when the file can be evicted first: on tmpfs the page cache is the file's storage
//   and posix_fadvise(DONTNEED) keeps it, and some overlay/FUSE mounts ignore the advice too. There
//   the cache measure is dropped (and the reason printed), never skipped or faked.
TEST(CheckpointPagesTest, LoadingOneTensorTouchesOnlyItsPages) {
  ScratchDir dir;
  WriteRaw(dir / "config.json", GoldenConfigText());
  constexpr int kTensors = 16;
  constexpr int64_t kRows = 1024, kCols = 2048;
  constexpr size_t kBytes = kRows * kCols * 2;  // 4 MiB of BF16 each
  SafetensorsWriter w;
  for (int e = 0; e < kTensors; ++e) {
    std::vector<uint8_t> bytes(kBytes, static_cast<uint8_t>(e + 1));
    ASSERT_TRUE(
        w.Add(absl::StrCat("blob.", e, ".weight"), DType::kBF16, {kRows, kCols}, std::move(bytes))
            .ok());
  }
  const std::string path = dir / "model.safetensors";
  ASSERT_TRUE(w.WriteFile(path).ok());
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  bool evicted = false;
  {
    // Evict the file, then check on a private mapping (mincore touches nothing) that it worked.
    int fd = ::open(path.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::fdatasync(fd), 0);
    const int advice = ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    const size_t size = static_cast<size_t>(std::filesystem::file_size(path));
    void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    ASSERT_NE(map, MAP_FAILED);
    std::vector<unsigned char> vec((size + page - 1) / page);
    ASSERT_EQ(::mincore(map, size, vec.data()), 0);
    size_t cached = 0;
    for (unsigned char x : vec) cached += x & 1;
    ::munmap(map, size);
    ::close(fd);
    evicted = advice == 0 && cached <= 4;
    if (!evicted) {
      std::printf(
          "[page cache] %s cannot be evicted here (posix_fadvise: %s, %zu of %zu pages still "
          "cached, e.g. tmpfs): the readahead (mincore) checks are dropped, the mapped-page "
          "(pagemap) checks still hold\n",
          path.c_str(), advice == 0 ? "ok" : std::strerror(advice), cached, vec.size());
    }
  }
  auto c = Checkpoint::Open(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
  auto cached_in = [&](const TensorView& v) {
    const uintptr_t b = reinterpret_cast<uintptr_t>(v.data) / page * page;
    const uintptr_t e = reinterpret_cast<uintptr_t>(v.data) + v.nbytes;
    std::vector<unsigned char> vec((e - b + page - 1) / page);
    EXPECT_EQ(::mincore(reinterpret_cast<void*>(b), e - b, vec.data()), 0);
    size_t n = 0;
    for (unsigned char x : vec) n += x & 1;
    return n * page;
  };
  auto mapped_in = [&](const TensorView& v) -> size_t {
    auto n = MappedBytes(v.data, v.nbytes);
    EXPECT_TRUE(n.ok()) << n.status();
    return n.ok() ? *n : SIZE_MAX / (2 * kTensors);
  };
  // Bytes of every tensor but `skip`, by one of the measures.
  auto others = [&](int skip, auto measure) {
    size_t n = 0;
    for (int e = 0; e < kTensors; ++e) {
      if (e != skip) n += measure(*(*c)->Get(absl::StrCat("blob.", e, ".weight")));
    }
    return n;
  };
  // At most the pages shared with the neighbours at both ends (fault-around maps cached pages
  // only, 64 KiB by default), never the other 60 MiB.
  constexpr size_t kSlack = 2 * 64 * 1024;
  // Opening read the header only.
  EXPECT_LE(others(-1, mapped_in), kSlack) << "mapped after Open";
  if (evicted) {
    EXPECT_LE(others(-1, cached_in), kSlack) << "cached after Open";
  }
  auto m = (*c)->GetMatrix("blob.9.weight", kRows, kCols);
  ASSERT_TRUE(m.ok()) << m.status();
  const uint8_t* p = static_cast<const uint8_t*>(m->data);
  uint64_t sum = 0;
  for (size_t i = 0; i < kBytes; i += 64) sum += p[i];
  EXPECT_EQ(sum, (kBytes / 64) * 10);
  auto target = (*c)->Get("blob.9.weight");
  ASSERT_TRUE(target.ok()) << target.status();
  // The measures can see what they should: the tensor read is mapped (and cached) in full.
  EXPECT_GE(mapped_in(*target), kBytes);
  EXPECT_GE(cached_in(*target), kBytes);
  EXPECT_LE(others(9, mapped_in), kSlack) << "other tensors' mapped bytes";
  if (evicted) {
    EXPECT_LE(others(9, cached_in), kSlack) << "other tensors' cached bytes";
  }
}

}  // namespace
}  // namespace expertmesh::model
