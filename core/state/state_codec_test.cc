// State serialization: a sequence serialized mid-way and restored into a fresh state continues
// with the same logits (bit-identical to not serializing, and within the golden contract).
#include "core/state/state_codec.h"

#include <cstdio>

#include "core/model/golden_contract.h"
#include "core/model/model.h"
#include "gtest/gtest.h"

namespace expertmesh::state {
namespace {

using model::Model;
using model::Segment;
using model::SequenceState;

class StateCodecTest : public ::testing::Test {
 protected:
  // Loaded once, in the first test's SetUp: a load failure fails every test (in
  // SetUpTestSuite it would only mark them skipped).
  void SetUp() override {
    if (model_ == nullptr && load_error_.empty()) {
      const std::string dir = model::testing::GoldenDir("tiny-a");
      auto m = Model::Load(dir);
      auto g = model::SafetensorsFile::Open(dir + "/golden.safetensors");
      if (!m.ok()) {
        load_error_ = m.status().ToString();
      } else if (!g.ok()) {
        load_error_ = g.status().ToString();
      } else {
        model_ = m->release();
        golden_ = g->release();
      }
    }
    ASSERT_TRUE(load_error_.empty()) << load_error_;
  }
  static void TearDownTestSuite() {
    delete model_;
    delete golden_;
  }
  static Model* model_;
  static model::SafetensorsFile* golden_;
  static std::string load_error_;
};
Model* StateCodecTest::model_ = nullptr;
model::SafetensorsFile* StateCodecTest::golden_ = nullptr;
std::string StateCodecTest::load_error_;

// Golden schedule (prefill, then one-token decode) with the state serialized and restored into
// a fresh object at `cut` (and, for the decode part, again every `every` tokens).
TEST_F(StateCodecTest, RestoredSequenceContinuesWithGoldenLogits) {
  const std::vector<int32_t> ids = model::testing::ReadI32(*golden_, "input_ids");
  const std::vector<float> want = model::testing::ReadF32(*golden_, "logits");
  const auto shape = golden_->Get("input_ids")->shape;
  const int64_t batch = shape[0], tokens = shape[1];
  const int64_t prefill = golden_->Get("prefill_layer_out.0")->shape[0];
  const int64_t V = model_->config().vocab_size;
  std::vector<float> got;
  for (int64_t seq = 0; seq < batch; ++seq) {
    const int32_t* t = ids.data() + seq * tokens;
    // Cut the prefill at a point that is not a multiple of any ratio.
    const int64_t cut = prefill / 2 + 1;
    SequenceState st = model_->NewState();
    model::ForwardOptions opt;
    opt.all_logits = true;
    Segment a{&st, absl::MakeConstSpan(t, cut)};
    auto la = model_->Forward({&a, 1}, opt);
    ASSERT_TRUE(la.ok()) << la.status();
    got.insert(got.end(), la->begin(), la->end());
    std::string bytes = SerializeState(model_->config(), st);
    auto restored = DeserializeState(model_->config(), bytes);
    ASSERT_TRUE(restored.ok()) << restored.status();
    EXPECT_EQ(SerializeState(model_->config(), *restored), bytes);
    st = std::move(*restored);
    Segment b{&st, absl::MakeConstSpan(t + cut, prefill - cut)};
    auto lb = model_->Forward({&b, 1}, opt);
    ASSERT_TRUE(lb.ok()) << lb.status();
    got.insert(got.end(), lb->begin(), lb->end());
    for (int64_t p = prefill; p < tokens; ++p) {
      if ((p - prefill) % 13 == 5) {
        auto r = DeserializeState(model_->config(), SerializeState(model_->config(), st));
        ASSERT_TRUE(r.ok()) << r.status();
        st = std::move(*r);
      }
      Segment d{&st, absl::MakeConstSpan(t + p, 1)};
      auto ld = model_->Forward({&d, 1}, opt);
      ASSERT_TRUE(ld.ok()) << ld.status();
      got.insert(got.end(), ld->begin(), ld->end());
    }
  }
  ASSERT_EQ(got.size(), want.size());
  auto f = model::testing::CompareLogits(got.data(), want.data(), batch * tokens, V);
  std::printf("[contract] serialize+restore mid-sequence: %s\n", f.ToString().c_str());
  EXPECT_TRUE(f.Meets()) << f.ToString();
}

// Restoring is exact: the continuation's logits are bit-identical to the uninterrupted run.
TEST_F(StateCodecTest, RestoreIsBitExact) {
  const std::vector<int32_t> ids = model::testing::ReadI32(*golden_, "input_ids");
  const int64_t tokens = golden_->Get("input_ids")->shape[1];
  const int32_t* t = ids.data();
  SequenceState st = model_->NewState();
  Segment a{&st, absl::MakeConstSpan(t, 75)};
  ASSERT_TRUE(model_->Forward({&a, 1}, {}).ok());
  auto copy = DeserializeState(model_->config(), SerializeState(model_->config(), st));
  ASSERT_TRUE(copy.ok()) << copy.status();
  for (int64_t p = 75; p < std::min<int64_t>(tokens, 90); ++p) {
    Segment s1{&st, absl::MakeConstSpan(t + p, 1)};
    Segment s2{&*copy, absl::MakeConstSpan(t + p, 1)};
    auto l1 = model_->Forward({&s1, 1}, {});
    auto l2 = model_->Forward({&s2, 1}, {});
    ASSERT_TRUE(l1.ok() && l2.ok());
    EXPECT_EQ(*l1, *l2) << "position " << p;
  }
}

TEST_F(StateCodecTest, RejectsCorruptAndMismatchedBytes) {
  const auto& c = model_->config();
  SequenceState st = model_->NewState();
  const std::vector<int32_t> ids = model::testing::ReadI32(*golden_, "input_ids");
  Segment a{&st, absl::MakeConstSpan(ids.data(), 23)};
  ASSERT_TRUE(model_->Forward({&a, 1}, {}).ok());
  const std::string good = SerializeState(c, st);

  std::string flipped = good;
  flipped[good.size() / 2] ^= 0x10;
  auto r = DeserializeState(c, flipped);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_NE(r.status().message().find("checksum"), std::string::npos) << r.status();

  r = DeserializeState(c, good.substr(0, good.size() - 20));
  EXPECT_FALSE(r.ok());

  r = DeserializeState(c, "not a state at all, clearly");
  EXPECT_NE(r.status().message().find("magic"), std::string::npos) << r.status();

  model::ModelConfig other = c;
  other.sliding_window += 1;
  r = DeserializeState(other, good);
  EXPECT_NE(r.status().message().find("sliding_window"), std::string::npos) << r.status();
}

TEST_F(StateCodecTest, KvIsStoredAsCodes) {
  // Window and compressed KV take one byte per non-rope dim plus an exponent byte per 64 (rope
  // dims float32); indexer keys half a byte per dim plus an exponent per 32 (docs/state_format.md).
  const auto& c = model_->config();
  const std::vector<int32_t> ids = model::testing::ReadI32(*golden_, "input_ids");
  SequenceState st = model_->NewState();
  const int64_t pos = 200;
  Segment a{&st, absl::MakeConstSpan(ids.data(), pos)};
  ASSERT_TRUE(model_->Forward({&a, 1}, {}).ok());
  const int64_t d = c.head_dim, r = c.qk_rope_head_dim, Id = c.index_head_dim;
  const int64_t kv_bytes = (d - r) + (d - r + 63) / 64 + 4 * r;
  const int64_t key_bytes = Id / 2 + (Id + 31) / 32;
  int64_t expect = 0;
  for (int b = 0; b < c.num_hidden_layers; ++b) {
    const int ratio = c.CompressRatio(b);
    expect += std::min<int64_t>(pos, c.sliding_window) * kv_bytes;
    if (ratio > 0) {
      const int64_t row = (ratio == 4 ? 2 : 1) * d;
      expect += pos / ratio * kv_bytes + 2 * 4 * row * (pos % ratio + (ratio == 4 ? ratio : 0));
    }
    if (ratio == 4) {
      const int64_t row = 2 * Id;
      expect += pos / 4 * key_bytes + 2 * 4 * row * (pos % 4 + 4);
    }
  }
  const std::string bytes = SerializeState(c, st);
  // Header: magic, version, shape, positions; trailer: CRC32C.
  const int64_t header = 4 + 4 + 4 * (5 + c.NumBlocks()) + 16 + 4;
  EXPECT_EQ(static_cast<int64_t>(bytes.size()), expect + header);
}

}  // namespace
}  // namespace expertmesh::state
