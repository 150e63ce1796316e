#include "core/engine/engine.h"

#include <unistd.h>

#include <cstdio>
#include <map>

#include "core/engine/score.h"
#include "core/model/golden_contract.h"
#include "gtest/gtest.h"

namespace expertmesh::engine {
namespace {

TEST(Sampler, GreedyIsArgMaxWithLowerIdOnTies) {
  std::vector<float> l = {0.5f, 2.0f, -1.0f, 2.0f};
  Sampler s({});
  EXPECT_EQ(s.Sample(l), 1);
  EXPECT_EQ(ArgMax(l), 1);
}

TEST(Sampler, TopKOneAndTinyTopPAreGreedy) {
  std::vector<float> l = {0.1f, 0.3f, 3.0f, 0.2f};
  Sampler k1({1.0, 1.0, 1, 7});
  Sampler p0({1.0, 1e-6, 0, 7});
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(k1.Sample(l), 2);
    EXPECT_EQ(p0.Sample(l), 2);
  }
}

TEST(Sampler, SeededAndFollowsTheDistribution) {
  std::vector<float> l = {0.0f, std::log(3.0f), -100.0f};  // p ~ 1/4, 3/4, 0
  Sampler a({1.0, 1.0, 0, 42}), b({1.0, 1.0, 0, 42});
  std::map<int, int> counts;
  for (int i = 0; i < 4000; ++i) {
    int32_t x = a.Sample(l);
    EXPECT_EQ(x, b.Sample(l));
    counts[x]++;
  }
  EXPECT_EQ(counts[2], 0);
  EXPECT_NEAR(counts[1] / 4000.0, 0.75, 0.04);
  // top_p = 0.5 keeps only the most likely token.
  Sampler c({1.0, 0.5, 0, 1});
  for (int i = 0; i < 20; ++i) EXPECT_EQ(c.Sample(l), 1);
}

// The engine's batched decode (two sequences at different positions in one step) against the
// golden logits.
TEST(Engine, BatchedDecodeMatchesGolden) {
  const std::string dir = model::testing::GoldenDir("tiny-a");
  auto m = model::Model::Load(dir);
  ASSERT_TRUE(m.ok()) << m.status();
  auto g = model::SafetensorsFile::Open(dir + "/golden.safetensors");
  ASSERT_TRUE(g.ok()) << g.status();
  const auto ids = model::testing::ReadI32(**g, "input_ids");
  const auto want = model::testing::ReadF32(**g, "logits");
  const int64_t tokens = (*g)->Get("input_ids")->shape[1];
  const int64_t V = (*m)->config().vocab_size;
  Engine e(m->get());
  const SequenceId s0 = e.AddSequence(), s1 = e.AddSequence();
  const int64_t start0 = 150, start1 = 190;  // different positions in every decode step
  ASSERT_TRUE(e.Prefill(s0, absl::MakeConstSpan(ids.data(), start0), 64).ok());
  ASSERT_TRUE(e.Prefill(s1, absl::MakeConstSpan(ids.data() + tokens, start1), 0).ok());
  std::vector<float> got, ref;
  for (int64_t i = 0; start1 + i < tokens; ++i) {
    const SequenceId batch[2] = {s0, s1};
    const int32_t toks[2] = {ids[start0 + i], ids[tokens + start1 + i]};
    auto l = e.Decode(batch, toks);
    ASSERT_TRUE(l.ok()) << l.status();
    got.insert(got.end(), l->begin(), l->end());
    ref.insert(ref.end(), want.begin() + (start0 + i) * V, want.begin() + (start0 + i + 1) * V);
    ref.insert(ref.end(), want.begin() + ((tokens + start1 + i) * V),
               want.begin() + (tokens + start1 + i + 1) * V);
  }
  auto f = model::testing::CompareLogits(got.data(), ref.data(),
                                         static_cast<int64_t>(got.size()) / V, V);
  std::printf("[contract] engine batched decode: %s\n", f.ToString().c_str());
  EXPECT_TRUE(f.Meets()) << f.ToString();
  // A prefill chunk of a new sequence and a decode token of another in one step.
  const SequenceId s2 = e.AddSequence();
  auto s0_state = e.State(s0);
  ASSERT_TRUE(s0_state.ok());
  const int64_t pos0 = (*s0_state)->position;
  const SequenceId mixed[2] = {s2, s0};
  const absl::Span<const int32_t> runs[2] = {absl::MakeConstSpan(ids.data(), 30),
                                             absl::MakeConstSpan(ids.data() + pos0, 1)};
  auto lm = e.Step(mixed, runs);
  ASSERT_TRUE(lm.ok()) << lm.status();
  ASSERT_EQ(static_cast<int64_t>(lm->size()), 2 * V);
  auto fm = model::testing::CompareLogits(lm->data(), want.data() + 29 * V, 1, V);
  EXPECT_LE(fm.p99, 1e-3) << fm.ToString();
  fm = model::testing::CompareLogits(lm->data() + V, want.data() + pos0 * V, 1, V);
  EXPECT_LE(fm.p99, 0.25) << fm.ToString();
  const SequenceId dup[2] = {s0, s0};
  const int32_t toks[2] = {1, 2};
  EXPECT_FALSE(e.Decode(dup, toks).ok());
  EXPECT_TRUE(e.RemoveSequence(s1).ok());
  EXPECT_EQ(e.RemoveSequence(s1).code(), absl::StatusCode::kNotFound);
}

TEST(Engine, GenerateGreedyIsDeterministic) {
  auto m = model::Model::Load(model::testing::GoldenDir("tiny-a"));
  ASSERT_TRUE(m.ok()) << m.status();
  const std::vector<int32_t> prompt = {5, 17, 300, 2};
  auto a = Generate(**m, prompt, 6, {}, 0);
  auto b = Generate(**m, prompt, 6, {}, 1);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->ids.size(), 6u);
  EXPECT_EQ(a->ids, b->ids);
}

// `expertmesh score`'s core: the written file holds logits and mtp_logits in the golden layout.
TEST(Score, WritesGoldenLayout) {
  const std::string dir = model::testing::GoldenDir("tiny-a");
  auto m = model::Model::Load(dir);
  ASSERT_TRUE(m.ok()) << m.status();
  auto g = model::SafetensorsFile::Open(dir + "/golden.safetensors");
  ASSERT_TRUE(g.ok()) << g.status();
  const int64_t prefill = (*g)->Get("prefill_layer_out.0")->shape[0];
  const std::string out = ::testing::TempDir() + "/score_" + std::to_string(getpid()) + ".st";
  ScoreOptions o;
  o.prefill = prefill;
  o.chunk = 50;
  o.mtp = true;
  ASSERT_TRUE(ScoreFile(**m, dir + "/golden.safetensors", out, o).ok());
  auto f = model::SafetensorsFile::Open(out);
  ASSERT_TRUE(f.ok()) << f.status();
  for (const char* name : {"logits", "mtp_logits"}) {
    auto got = (*f)->Get(name);
    auto want = (*g)->Get(name);
    ASSERT_TRUE(got.ok() && want.ok()) << name;
    EXPECT_EQ(got->shape, want->shape) << name;
    const int64_t V = want->shape[2];
    auto c = model::testing::CompareLogits(reinterpret_cast<const float*>(got->data),
                                           reinterpret_cast<const float*>(want->data),
                                           want->shape[0] * want->shape[1], V);
    std::printf("[contract] score %s: %s\n", name, c.ToString().c_str());
    EXPECT_LE(c.p99, 0.25) << name;
    EXPECT_GE(c.argmax_agreement, 0.98) << name;
  }
  std::remove(out.c_str());
  o.prefill = 0;
  EXPECT_FALSE(ScoreFile(**m, dir + "/golden.safetensors", out, o).ok());
}

}  // namespace
}  // namespace expertmesh::engine
