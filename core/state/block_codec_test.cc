// Block codec: on the cluster's default model ("tiny": layers with ratios 0, 4, 128, 4 and an
// MTP layer of ratio 0, window 128), a 4,096-token sequence is encoded block by block; at every
// boundary a state rebuilt from blocks 0..k continues (trunk and MTP head) with the same logit
// bytes as the uninterrupted sequence, a corrupted block is DataLoss and recomputing it matches
// again. Also the key chain and the block sizes of the V4-Flash / V4-Pro configurations.
#include "core/state/block_codec.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>

#include "core/base/hash.h"
#include "core/model/model.h"
#include "core/model/model_maker.h"
#include "core/state/codes.h"
#include "gtest/gtest.h"

namespace expertmesh::state {
namespace {

using model::Model;
using model::ModelConfig;
using model::Segment;
using model::SequenceState;

bool SameBytes(const std::vector<float>& a, const std::vector<float>& b) {
  // memcmp's pointers must not be null, which an empty vector's data() may be.
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
}

class BlockCodecTest : public ::testing::Test {
 protected:
  // Made and loaded once, in the first test's SetUp: a failure fails every test.
  void SetUp() override {
    if (model_ == nullptr && load_error_.empty()) {
      dir_ = new std::string(::testing::TempDir() + "/em_block_codec_" +
                             std::to_string(::getpid()));
      std::filesystem::remove_all(*dir_);
      absl::Status made = model::WriteModelPreset("tiny", 0, *dir_ + "/m");
      auto m = made.ok() ? Model::Load(*dir_ + "/m") : absl::StatusOr<std::unique_ptr<Model>>(made);
      if (m.ok()) {
        model_ = m->release();
      } else {
        load_error_ = m.status().ToString();
      }
    }
    ASSERT_TRUE(load_error_.empty()) << load_error_;
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
    if (dir_ != nullptr) std::filesystem::remove_all(*dir_);
    delete dir_;
  }

  // Deterministic token ids in [2, V).
  static std::vector<int32_t> Tokens(int64_t n, uint64_t seed) {
    std::vector<int32_t> t(n);
    const uint64_t V = model_->config().vocab_size;
    for (int64_t i = 0; i < n; ++i) {
      t[i] = static_cast<int32_t>(2 + base::SplitMix64Hash(seed * 1000003 + i) % (V - 2));
    }
    return t;
  }

  // Trunk over tokens [p, p + n) and the MTP head over their successors, as a worker that
  // drafts with MTP runs a prefill chunk. Returns the last trunk and MTP logits.
  static std::vector<float> Step(SequenceState& st, const std::vector<int32_t>& t, int64_t n) {
    const int64_t p = st.position;
    std::vector<float> streams;
    model::ForwardOptions opt;
    opt.final_streams = &streams;
    Segment seg{&st, absl::MakeConstSpan(t.data() + p, n)};
    auto l = model_->Forward({&seg, 1}, opt);
    EXPECT_TRUE(l.ok()) << l.status();
    if (!l.ok()) return {};
    Segment mseg{&st, absl::MakeConstSpan(t.data() + p + 1, n)};
    auto ml = model_->ForwardMtp(0, {&mseg, 1}, streams.data(), false);
    EXPECT_TRUE(ml.ok()) << ml.status();
    if (!ml.ok()) return {};
    std::vector<float> out = std::move(*l);
    out.insert(out.end(), ml->begin(), ml->end());
    return out;
  }

  // Two decode steps (trunk + MTP head each): the continuation compared byte for byte.
  static std::vector<float> Continue(SequenceState st, const std::vector<int32_t>& t) {
    std::vector<float> a = Step(st, t, 1);
    std::vector<float> b = Step(st, t, 1);
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }

  static absl::Status Rebuild(const std::vector<std::string>& blocks, size_t count,
                              uint64_t fp, const std::vector<int32_t>& t, SequenceState* st) {
    *st = model_->NewState();
    for (size_t j = 0; j < count; ++j) {
      absl::Status s = ApplyBlock(model_->config(), fp, blocks[j], st,
                                  std::span(t).subspan(j * kBlockTokens, kBlockTokens));
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }

  static Model* model_;
  static std::string* dir_;
  static std::string load_error_;
};
Model* BlockCodecTest::model_ = nullptr;
std::string* BlockCodecTest::dir_ = nullptr;
std::string BlockCodecTest::load_error_;

TEST_F(BlockCodecTest, TinyModelCoversRatiosZeroFourAndOneTwentyEightWithMtp) {
  const ModelConfig& c = model_->config();
  ASSERT_EQ(c.num_hidden_layers, 4);
  ASSERT_EQ(c.num_nextn_predict_layers, 1);
  EXPECT_EQ(c.sliding_window, kBlockTokens);
  std::vector<int> ratios;
  for (int b = 0; b < c.NumBlocks(); ++b) ratios.push_back(c.CompressRatio(b));
  EXPECT_EQ(ratios, (std::vector<int>{0, 4, 128, 4, 0}));
}

// The acceptance test of issue 10's block codec: every boundary of a 4,096-token sequence.
TEST_F(BlockCodecTest, RebuiltStateContinuesBitIdenticallyAtEveryBoundary) {
  const ModelConfig& c = model_->config();
  const uint64_t fp = ModelFingerprint(c, "tiny seed 0");
  constexpr int64_t kTokens = 4096;
  const std::vector<int32_t> t = Tokens(kTokens + 8, 1);
  SequenceState st = model_->NewState();
  std::vector<std::string> blocks;
  int64_t flips = 0;
  for (uint32_t k = 0; k * kBlockTokens < kTokens; ++k) {
    SCOPED_TRACE("block " + std::to_string(k));
    const int64_t S = int64_t{k} * kBlockTokens, E = S + kBlockTokens;
    ASSERT_FALSE(Step(st, t, kBlockTokens).empty());
    ASSERT_EQ(st.position, E);
    ASSERT_EQ(st.mtp_position, E);
    auto block = EncodeBlock(c, fp, st, k, std::span(t).subspan(S, kBlockTokens));
    ASSERT_TRUE(block.ok()) << block.status();
    EXPECT_EQ(static_cast<int64_t>(block->size()), BlockSize(c, k).total());
    auto header = VerifyBlock(*block);
    ASSERT_TRUE(header.ok()) << header.status();
    EXPECT_TRUE(header->has_mtp);
    EXPECT_EQ(header->block_index, k);
    blocks.push_back(*block);
    if (k == 0 || k == 31) {
      const BlockBytes b = BlockSize(c, k);
      std::printf("[block %u] %zu bytes: header+tokens %lld, window %lld, compressed %lld, "
                  "index keys %lld, carried compressor rows %lld\n",
                  k, block->size(), static_cast<long long>(b.header),
                  static_cast<long long>(b.window), static_cast<long long>(b.compressed),
                  static_cast<long long>(b.index_keys), static_cast<long long>(b.pending));
    }

    SequenceState rebuilt;
    ASSERT_TRUE(Rebuild(blocks, k + 1, fp, t, &rebuilt).ok());
    ASSERT_EQ(rebuilt.position, E);
    ASSERT_EQ(rebuilt.mtp_position, E);
    // What the future reads, compared directly: the ring (W == 128: every slot), the entries,
    // the keys; the carried compressor rows by re-encoding the last block.
    for (int b = 0; b < c.NumBlocks(); ++b) {
      EXPECT_TRUE(SameBytes(rebuilt.blocks[b].window, st.blocks[b].window)) << "layer " << b;
      EXPECT_TRUE(SameBytes(rebuilt.blocks[b].compressed, st.blocks[b].compressed)) << b;
      EXPECT_TRUE(SameBytes(rebuilt.blocks[b].index_keys, st.blocks[b].index_keys)) << b;
    }
    auto again = EncodeBlock(c, fp, rebuilt, k, std::span(t).subspan(S, kBlockTokens));
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_TRUE(*again == *block) << "re-encoded block differs";

    const std::vector<float> want = Continue(st, t);
    ASSERT_EQ(want.size(), 4u * c.vocab_size);
    EXPECT_TRUE(SameBytes(Continue(rebuilt, t), want)) << "logits after rebuilding 0.." << k;

    // A flipped byte anywhere in the block (a few offsets per block, the header included) is
    // DataLoss and leaves the state as it was.
    SequenceState prefix;
    ASSERT_TRUE(Rebuild(blocks, k, fp, t, &prefix).ok());
    const std::string prefix_bytes = [&] {
      std::string s;
      for (const auto& bs : prefix.blocks) s.append(reinterpret_cast<const char*>(
          bs.compressed.data()), bs.compressed.size() * 4);
      return s;
    }();
    for (int f = 0; f < 6; ++f) {
      const size_t at = f == 0 ? k % kBlockHeaderBytes
                               : base::SplitMix64Hash(k * 16 + f) % block->size();
      std::string bad = *block;
      bad[at] ^= static_cast<char>(1 << (f % 8));
      SequenceState probe = prefix;
      absl::Status s = ApplyBlock(c, fp, bad, &probe);
      EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << "flip at " << at << ": " << s;
      EXPECT_EQ(probe.position, S);
      ++flips;
    }
    EXPECT_EQ(VerifyBlock(block->substr(0, block->size() - 1)).status().code(),
              absl::StatusCode::kDataLoss);
    // The caller drops the block and recomputes its tokens: same block, same continuation.
    ASSERT_FALSE(Step(prefix, t, kBlockTokens).empty());
    auto recomputed = EncodeBlock(c, fp, prefix, k, std::span(t).subspan(S, kBlockTokens));
    ASSERT_TRUE(recomputed.ok()) << recomputed.status();
    EXPECT_TRUE(*recomputed == *block) << "recomputed block differs";
    EXPECT_TRUE(SameBytes(Continue(prefix, t), want)) << "logits after recomputing block " << k;
  }
  EXPECT_EQ(blocks.size(), 32u);
  std::printf("32 boundaries checked, %lld corrupted blocks rejected\n",
              static_cast<long long>(flips));
}

TEST_F(BlockCodecTest, RejectsWrongModelTokensAndPosition) {
  const ModelConfig& c = model_->config();
  const uint64_t fp = ModelFingerprint(c, "tiny seed 0");
  const std::vector<int32_t> t = Tokens(2 * kBlockTokens + 1, 2);
  SequenceState st = model_->NewState();
  ASSERT_FALSE(Step(st, t, kBlockTokens).empty());
  const auto first = std::span(t).subspan(0, kBlockTokens);
  auto block = EncodeBlock(c, fp, st, 0, first);
  ASSERT_TRUE(block.ok()) << block.status();

  // The state is at 128: block 1 ([128, 256)) is not there yet.
  EXPECT_EQ(EncodeBlock(c, fp, st, 1, first).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(EncodeBlock(c, fp, st, 0, first.subspan(1)).status().code(),
            absl::StatusCode::kInvalidArgument);

  SequenceState fresh = model_->NewState();
  EXPECT_EQ(ApplyBlock(c, fp + 1, *block, &fresh).code(), absl::StatusCode::kFailedPrecondition);
  std::vector<int32_t> other(first.begin(), first.end());
  other[7] ^= 1;
  EXPECT_EQ(ApplyBlock(c, fp, *block, &fresh, other).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(fresh.position, 0);
  ASSERT_TRUE(ApplyBlock(c, fp, *block, &fresh, first).ok());
  // Applying block 0 again to a state at 128 is refused.
  EXPECT_EQ(ApplyBlock(c, fp, *block, &fresh).code(), absl::StatusCode::kFailedPrecondition);

  // Past the block's end the ring (W == 128) no longer holds it.
  ASSERT_FALSE(Step(st, t, 1).empty());
  EXPECT_EQ(EncodeBlock(c, fp, st, 0, first).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

// A state whose MTP head has not run (a worker without MTP) gives trunk-only blocks; applying
// them leaves the MTP layers behind, visibly, and the trunk still continues exactly.
TEST_F(BlockCodecTest, TrunkOnlyBlocksWhenMtpDidNotRun) {
  const ModelConfig& c = model_->config();
  const uint64_t fp = ModelFingerprint(c, "tiny seed 0");
  const std::vector<int32_t> t = Tokens(2 * kBlockTokens + 2, 3);
  SequenceState st = model_->NewState();
  std::vector<std::string> blocks;
  for (uint32_t k = 0; k < 2; ++k) {
    Segment seg{&st, absl::MakeConstSpan(t.data() + k * kBlockTokens, kBlockTokens)};
    ASSERT_TRUE(model_->Forward({&seg, 1}, {}).ok());
    auto b = EncodeBlock(c, fp, st, k, std::span(t).subspan(k * kBlockTokens, kBlockTokens));
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_FALSE(VerifyBlock(*b)->has_mtp);
    EXPECT_EQ(static_cast<int64_t>(b->size()), BlockSize(c, k, /*with_mtp=*/false).total());
    blocks.push_back(*b);
  }
  SequenceState rebuilt;
  ASSERT_TRUE(Rebuild(blocks, 2, fp, t, &rebuilt).ok());
  EXPECT_EQ(rebuilt.mtp_position, 0);
  Segment a{&st, absl::MakeConstSpan(t.data() + 256, 2)};
  Segment b{&rebuilt, absl::MakeConstSpan(t.data() + 256, 2)};
  model::ForwardOptions opt;
  opt.all_logits = true;
  auto la = model_->Forward({&a, 1}, opt);
  auto lb = model_->Forward({&b, 1}, opt);
  ASSERT_TRUE(la.ok() && lb.ok());
  EXPECT_TRUE(SameBytes(*la, *lb));
}

// Shapes the default model does not have: a ratio that does not divide 128 (48: the block's end
// falls inside a compressor window, whose rows are carried) and a window longer than a block
// (200: the ring at E holds positions of two blocks). Every boundary of 768 tokens.
TEST(BlockCodecShapes, RatioNotDividing128AndWindowLongerThanBlock) {
  ModelConfig c = *model::PresetConfig("tiny-a-shape");
  c.compress_ratios = {0, 4, 48, 4, 0};
  c.sliding_window = 200;
  c.max_position_embeddings = 65536;
  const std::string dir =
      ::testing::TempDir() + "/em_block_shapes_" + std::to_string(::getpid());
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(model::WriteModel(c, 4, dir).ok());
  auto loaded = Model::Load(dir);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  Model& m = **loaded;
  const uint64_t fp = ModelFingerprint(m.config(), "shapes");
  std::vector<int32_t> t(6 * kBlockTokens + 4);
  for (size_t i = 0; i < t.size(); ++i) {
    t[i] = static_cast<int32_t>(2 + base::SplitMix64Hash(i + 77) % (c.vocab_size - 2));
  }
  auto step = [&](SequenceState& st, int64_t n) {
    const int64_t p = st.position;
    std::vector<float> streams;
    model::ForwardOptions opt;
    opt.final_streams = &streams;
    Segment seg{&st, absl::MakeConstSpan(t.data() + p, n)};
    auto l = m.Forward({&seg, 1}, opt);
    EXPECT_TRUE(l.ok()) << l.status();
    Segment mseg{&st, absl::MakeConstSpan(t.data() + p + 1, n)};
    auto ml = m.ForwardMtp(0, {&mseg, 1}, streams.data(), false);
    EXPECT_TRUE(ml.ok()) << ml.status();
    std::vector<float> out = l.ok() ? *l : std::vector<float>{};
    if (ml.ok()) out.insert(out.end(), ml->begin(), ml->end());
    return out;
  };
  SequenceState st = m.NewState();
  std::vector<std::string> blocks;
  for (uint32_t k = 0; k < 6; ++k) {
    SCOPED_TRACE("block " + std::to_string(k));
    ASSERT_FALSE(step(st, kBlockTokens).empty());
    auto block = EncodeBlock(m.config(), fp, st, k,
                             std::span(t).subspan(k * kBlockTokens, kBlockTokens));
    ASSERT_TRUE(block.ok()) << block.status();
    EXPECT_EQ(static_cast<int64_t>(block->size()), BlockSize(m.config(), k).total());
    blocks.push_back(*block);
    SequenceState rebuilt = m.NewState();
    for (uint32_t j = 0; j <= k; ++j) {
      ASSERT_TRUE(ApplyBlock(m.config(), fp, blocks[j], &rebuilt).ok()) << j;
    }
    SequenceState ref = st;
    const std::vector<float> want = step(ref, 2);
    EXPECT_TRUE(SameBytes(step(rebuilt, 2), want)) << "logits after rebuilding 0.." << k;
  }
  // The 48-ratio layer carries rows at boundaries inside its windows (128 = 2*48 + 32).
  EXPECT_GT(BlockSize(m.config(), 0).pending, BlockSize(m.config(), 2).pending);
  std::filesystem::remove_all(dir);
}

TEST(BlockKeys, ChainIsScopedByTenantAndModel) {
  std::vector<int32_t> t(3 * kBlockTokens + 50);
  for (size_t i = 0; i < t.size(); ++i) {
    t[i] = static_cast<int32_t>(base::SplitMix64Hash(i) % 129280);
  }
  ModelConfig c = *model::PresetConfig("tiny");
  const uint64_t fp = ModelFingerprint(c, "tiny");
  const std::vector<uint64_t> h = BlockChainHashes("acme", fp, t);
  ASSERT_EQ(h.size(), 3u);  // full blocks only
  EXPECT_NE(h[0], h[1]);
  EXPECT_NE(h[1], h[2]);
  EXPECT_EQ(h[1], NextChainHash(h[0], std::span(t).subspan(kBlockTokens, kBlockTokens)));
  EXPECT_EQ(h[0], NextChainHash(ChainSeed("acme", fp), std::span(t).subspan(0, kBlockTokens)));

  // Same prefix, different continuation: the shared blocks hash the same, later ones do not.
  std::vector<int32_t> u = t;
  u[2 * kBlockTokens + 5] ^= 1;
  const std::vector<uint64_t> hu = BlockChainHashes("acme", fp, u);
  EXPECT_EQ(hu[0], h[0]);
  EXPECT_EQ(hu[1], h[1]);
  EXPECT_NE(hu[2], h[2]);
  // A change in block 0 changes every later key (the chain).
  u = t;
  u[0] ^= 1;
  const std::vector<uint64_t> h0 = BlockChainHashes("acme", fp, u);
  for (int i = 0; i < 3; ++i) EXPECT_NE(h0[i], h[i]) << i;

  // Another tenant, another model shape, other weights or numerics: no key in common.
  ModelConfig wider = c;
  wider.sliding_window = 256;
  ModelConfig other_theta = c;
  other_theta.compress_rope_theta *= 2;
  for (const std::vector<uint64_t>& other :
       {BlockChainHashes("acme2", fp, t), BlockChainHashes("", fp, t),
        BlockChainHashes("acme", ModelFingerprint(wider, "tiny"), t),
        BlockChainHashes("acme", ModelFingerprint(other_theta, "tiny"), t),
        BlockChainHashes("acme", ModelFingerprint(c, "tiny-b"), t)}) {
    ASSERT_EQ(other.size(), 3u);
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) EXPECT_NE(other[i], h[j]) << i << " " << j;
    }
  }
  EXPECT_EQ(ModelFingerprint(c, "tiny"), fp);
  // A tenant name cannot be stretched into another by trailing zero bytes.
  EXPECT_NE(ChainSeed(std::string_view("a\0", 2), fp), ChainSeed("a", fp));
}

// MODEL.md's V4 shapes; ratios: the given leading layers, then 4 and 128 alternating from 4,
// then the MTP layer's 0.
ModelConfig V4Config(int layers, std::vector<int> lead) {
  ModelConfig c = *model::PresetConfig("tiny");
  c.num_hidden_layers = layers;
  c.num_nextn_predict_layers = 1;
  c.head_dim = 512;
  c.qk_rope_head_dim = 64;
  c.sliding_window = 128;
  c.index_head_dim = 128;
  c.compress_ratios = lead;
  for (int l = static_cast<int>(lead.size()); l < layers; ++l) {
    c.compress_ratios.push_back((l - static_cast<int>(lead.size())) % 2 == 0 ? 4 : 128);
  }
  c.compress_ratios.push_back(0);
  return c;
}

// The figures of docs/state_format.md, printed; checked for the facts the doc states.
TEST(BlockSizes, V4FlashAndProAgainstMla) {
  struct Row {
    const char* name;
    ModelConfig c;
  };
  const Row rows[] = {{"V4-Flash", V4Config(43, {0, 0})}, {"V4-Pro", V4Config(61, {128, 128})}};
  const double kGiB = 1024.0 * 1024 * 1024;
  for (const Row& row : rows) {
    const ModelConfig& c = row.c;
    // V3.2-style MLA on the same depth: 512 FP8 latent + 64 BF16 rope + a 128-dim FP8 indexer
    // key per token per layer (scales ignored, in MLA's favour).
    const double mla = c.NumBlocks() * (512 * 1 + 64 * 2 + 128 * 1);
    for (int64_t T : {int64_t{128} << 10, int64_t{1} << 20}) {
      const uint32_t n = static_cast<uint32_t>(T / kBlockTokens);
      int64_t chain = 0, appended = 0;
      for (uint32_t k = 0; k < n; ++k) {
        const BlockBytes b = BlockSize(c, k);
        chain += b.total();
        appended += b.compressed + b.index_keys;
      }
      const BlockBytes last = BlockSize(c, n - 1);
      // One sequence's live state at T: every entry and key, the last window, the carried rows.
      const int64_t live = appended + last.window + last.pending;
      std::printf("%s T=%lld: block %lld B (window %lld, compressed %lld, keys %lld, carry %lld); "
                  "chain %.1f B/token, live state %.1f B/token, MLA %.0f B/token "
                  "(live/MLA %.3f, chain/MLA %.3f); 24 GiB holds %.2fM chain tokens, "
                  "%.2fM live tokens, %.2fM MLA tokens\n",
                  row.name, static_cast<long long>(T), static_cast<long long>(last.total()),
                  static_cast<long long>(last.window), static_cast<long long>(last.compressed),
                  static_cast<long long>(last.index_keys), static_cast<long long>(last.pending),
                  double(chain) / T, double(live) / T, mla, live / T / mla, chain / T / mla,
                  24 * kGiB / (double(chain) / T) / 1e6, 24 * kGiB / (double(live) / T) / 1e6,
                  24 * kGiB / mla / 1e6);
      // Per layer and token the window costs one KV vector: 711 bytes for V4.
      EXPECT_EQ(internal::KvBytes(512, 64), 711);
      EXPECT_LT(live, chain);
      EXPECT_LT(double(live) / T, 0.25 * mla);
    }
  }
}

}  // namespace
}  // namespace expertmesh::state
