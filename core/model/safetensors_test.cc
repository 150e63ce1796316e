#include "core/model/safetensors.h"

#include <cstring>
#include <string>

#include "core/base/mapped_file.h"
#include "core/model/test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace expertmesh::model {
namespace {

using ::testing::HasSubstr;
using testing_util::RawSafetensors;
using testing_util::ScratchDir;
using testing_util::WriteRaw;

std::string Bytes(size_t n, uint8_t start) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(start + i * 7);
  return s;
}

TEST(SafetensorsTest, DTypeNamesRoundTrip) {
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16, DType::kF8E4M3, DType::kF8E8M0,
                  DType::kI8, DType::kI32, DType::kI64, DType::kU8, DType::kBool}) {
    auto parsed = ParseDType(DTypeName(d));
    ASSERT_TRUE(parsed.ok()) << DTypeName(d);
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF8E4M3), 1u);
  EXPECT_EQ(DTypeSize(DType::kI64), 8u);
  EXPECT_FALSE(ParseDType("Q4_K").ok());
}

TEST(SafetensorsTest, WriterRoundTrip) {
  ScratchDir dir;
  SafetensorsWriter w;
  const std::string a = Bytes(6 * 4, 1), b = Bytes(3 * 2, 50), c = Bytes(5, 9);
  ASSERT_TRUE(w.Add("z.last", DType::kF32, {2, 3}, a).ok());
  ASSERT_TRUE(w.Add("a.first", DType::kBF16, {3}, b).ok());
  ASSERT_TRUE(w.Add("m.codes", DType::kF8E4M3, {5}, c).ok());
  ASSERT_TRUE(w.AddI32("m.ids", {2}, {7, -8}).ok());
  ASSERT_TRUE(w.Add("empty", DType::kF32, {0, 4}, std::string_view()).ok());
  w.SetMetadata("format", "pt");
  const std::string path = dir / "x.safetensors";
  ASSERT_TRUE(w.WriteFile(path).ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->Names(),
            (std::vector<std::string>{"a.first", "empty", "m.codes", "m.ids", "z.last"}));
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  auto v = (*file)->Get("z.last");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->dtype, DType::kF32);
  EXPECT_EQ(v->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(v->data), v->nbytes), a);
  v = (*file)->Get("a.first");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(v->data), v->nbytes), b);
  // Data starts 8-byte aligned and tensors are laid out in name order.
  const uint8_t* base = (*file)->mapped_file().data();
  EXPECT_EQ((v->data - base) % 8, 0);
  auto ids = (*file)->Get("m.ids");
  ASSERT_TRUE(ids.ok());
  int32_t got[2];
  std::memcpy(got, ids->data, 8);
  EXPECT_EQ(got[0], 7);
  EXPECT_EQ(got[1], -8);
  auto e = (*file)->Get("empty");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->nbytes, 0u);
  EXPECT_EQ(w.Serialize(), *base::ReadFileToString(path));

  auto missing = (*file)->Get("nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("'nope'"));
}

TEST(SafetensorsTest, WriterRejectsBadInput) {
  SafetensorsWriter w;
  ASSERT_TRUE(w.Add("t", DType::kF32, {2}, Bytes(8, 0)).ok());
  auto s = w.Add("t", DType::kF32, {2}, Bytes(8, 0));
  EXPECT_THAT(std::string(s.message()), HasSubstr("'t' added twice"));
  s = w.Add("u", DType::kBF16, {3, 2}, Bytes(11, 0));
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tensor 'u': 11 bytes given, shape [3, 2] of BF16 needs 12"));
  s = w.Add("", DType::kF32, {}, Bytes(4, 0));
  EXPECT_FALSE(s.ok());
  s = w.Add("neg", DType::kF32, {-1}, "");
  EXPECT_THAT(std::string(s.message()), HasSubstr("'neg': negative dim"));
}

// The writer's header layout is the golden checkpoint's, byte for byte: rebuilding the header
// of golden/tiny-a from its tensor list gives its exact bytes.
TEST(SafetensorsTest, HeaderMatchesGoldenLayout) {
  const std::string path = testing_util::TinyADir() + "/model.safetensors";
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<TensorSpec> specs;
  for (const std::string& name : (*file)->Names()) {
    auto v = (*file)->Get(name);
    ASSERT_TRUE(v.ok());
    specs.push_back({name, v->dtype, v->shape});
  }
  EXPECT_EQ(specs.size(), 669u);
  auto header = SafetensorsHeader(specs, (*file)->metadata());
  ASSERT_TRUE(header.ok()) << header.status();
  const std::string golden((*file)->mapped_file().view().substr(0, header->size()));
  EXPECT_EQ(*header, golden);
}

TEST(SafetensorsTest, StreamingWriterChecksProducedSize) {
  ScratchDir dir;
  const std::string path = dir / "s.safetensors";
  auto s = WriteSafetensorsStreaming(path, {{"a", DType::kF32, {2}}}, {},
                                     [](const TensorSpec&, std::vector<uint8_t>* b) {
                                       b->assign(7, 0);
                                       return absl::OkStatus();
                                     });
  EXPECT_THAT(std::string(s.message()), HasSubstr("tensor 'a': produced 7 bytes"));
  // Nothing half-written is left behind.
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

struct BadFile {
  std::string label;
  std::string bytes;
  std::string expect;
};

TEST(SafetensorsTest, EveryMalformedFileIsRejectedWithItsReason) {
  const std::string ok_header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::vector<BadFile> cases = {
      {"empty", "", "truncated: 0 bytes"},
      {"short", "abc", "truncated: 3 bytes"},
      {"length beyond file", RawSafetensors(ok_header, Bytes(8, 0), 1000),
       "header length 1000 out of range"},
      {"huge length", RawSafetensors(ok_header, Bytes(8, 0), 1ull << 62), "out of range"},
      {"bad json", RawSafetensors(R"({"w":{"dtype":"F32",)", ""), "malformed JSON header"},
      {"not object", RawSafetensors("[1,2]", ""), "JSON header is not an object"},
      {"unknown dtype",
       RawSafetensors(R"({"w.q":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,2]}})", "ab"),
       "tensor 'w.q': unknown dtype 'Q4_K'"},
      {"missing dtype", RawSafetensors(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", Bytes(8, 0)),
       "tensor 'w': missing or non-string dtype"},
      {"bad shape",
       RawSafetensors(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", Bytes(8, 0)),
       "tensor 'w': bad shape [-2]"},
      {"shape not array",
       RawSafetensors(R"({"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", Bytes(8, 0)),
       "tensor 'w': missing or non-array shape"},
      {"offsets missing", RawSafetensors(R"({"w":{"dtype":"F32","shape":[2]}})", Bytes(8, 0)),
       "tensor 'w': data_offsets must be [begin, end]"},
      {"offsets out of range (truncated data)", RawSafetensors(ok_header, Bytes(5, 0)),
       "tensor 'w': data_offsets [0, 8] out of range (data section has 5 bytes"},
      {"offsets reversed",
       RawSafetensors(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", Bytes(8, 0)),
       "tensor 'w': data_offsets [8, 0] out of range"},
      {"offsets vs shape",
       RawSafetensors(R"({"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}})", Bytes(8, 0)),
       "tensor 'w': shape [3] of BF16 needs 6 bytes, data_offsets give 8"},
      {"overflowing shape",
       RawSafetensors(
           R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})",
           Bytes(8, 0)),
       "needs too many bytes"},
      {"entry not object", RawSafetensors(R"({"w":3})", ""), "tensor 'w': entry is not an object"},
      {"metadata not strings", RawSafetensors(R"({"__metadata__":{"a":1}})", ""),
       "__metadata__ value of 'a' is not a string"},
  };
  ScratchDir dir;
  for (const BadFile& bf : cases) {
    const std::string path = dir / "bad.safetensors";
    WriteRaw(path, bf.bytes);
    auto f = SafetensorsFile::Open(path);
    ASSERT_FALSE(f.ok()) << bf.label;
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << bf.label;
    EXPECT_THAT(std::string(f.status().message()), HasSubstr(bf.expect)) << bf.label;
    EXPECT_THAT(std::string(f.status().message()), HasSubstr(path)) << bf.label;
  }
}

TEST(SafetensorsTest, MissingFileIsNotFound) {
  auto f = SafetensorsFile::Open("/nonexistent/model.safetensors");
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
}

// Every golden tensor's bytes lie inside the file (sanity of offsets against the golden).
TEST(SafetensorsTest, OpensGoldenCheckpoint) {
  auto file = SafetensorsFile::Open(testing_util::TinyADir() + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  auto v = (*file)->Get("layers.1.ffn.experts.3.w2.weight");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->dtype, DType::kI8);
  EXPECT_EQ(v->shape, (std::vector<int64_t>{256, 64}));
  EXPECT_EQ(v->nbytes, 256u * 64u);
  auto tid = (*file)->Get("layers.0.ffn.gate.tid2eid");
  ASSERT_TRUE(tid.ok());
  EXPECT_EQ(tid->dtype, DType::kI32);
}

}  // namespace
}  // namespace expertmesh::model
