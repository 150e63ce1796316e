#include "core/engine/engine.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>

#include "core/engine/score.h"
#include "core/model/golden_contract.h"
#include "gtest/gtest.h"

namespace expertmesh::engine {
namespace {

SamplingParams Params(double temperature, double top_p, int top_k, uint64_t seed) {
  SamplingParams p;
  p.temperature = temperature;
  p.top_p = top_p;
  p.top_k = top_k;
  p.seed = seed;
  return p;
}

TEST(Sampler, GreedyIsArgMaxWithLowerIdOnTies) {
  std::vector<float> l = {0.5f, 2.0f, -1.0f, 2.0f};
  EXPECT_EQ(ArgMax(l), 1);
  for (int64_t pos : {0, 7, 1000}) EXPECT_EQ(SampleToken(l, {}, 0, pos), 1);
  Sampler s({});
  EXPECT_EQ(s.Sample(l, 3), 1);
}

TEST(Sampler, KeyedUniformIsInRangeAndSpread) {
  double sum = 0, lo = 1, hi = 0;
  for (int64_t pos = 0; pos < 4000; ++pos) {
    const double u = KeyedUniform(9, 0, pos);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
    lo = std::min(lo, u);
    hi = std::max(hi, u);
  }
  EXPECT_NEAR(sum / 4000, 0.5, 0.03);
  EXPECT_LT(lo, 0.01);
  EXPECT_GT(hi, 0.99);
  // Every key matters.
  EXPECT_NE(KeyedUniform(9, 0, 5), KeyedUniform(10, 0, 5));
  EXPECT_NE(KeyedUniform(9, 0, 5), KeyedUniform(9, 1, 5));
  EXPECT_NE(KeyedUniform(9, 0, 5), KeyedUniform(9, 0, 6));
  EXPECT_NE(KeyedUniform(1, 2, 3), KeyedUniform(3, 2, 1));
}

// The draws are part of what a seed means to users (a seeded request gives the same text in
// every release and on every worker), so their bits are pinned: a change here is a breaking
// change to be made on purpose. Values recorded when the keyed sampler was introduced.
TEST(Sampler, KeyedUniformBitsArePinned) {
  EXPECT_EQ(KeyedUniform(0, 0, 0), 0x1.b3bfdcba00737p-1);
  EXPECT_EQ(KeyedUniform(1, 0, 7), 0x1.3aa4cbd6a4914p-3);
  EXPECT_EQ(KeyedUniform(42, 3, 1000000), 0x1.3b55220554a8p-6);
  EXPECT_EQ(KeyedUniform(0xFFFFFFFFFFFFFFFFull, 1, 123), 0x1.4a9a3eb0380f4p-1);
}

// The draw for (seed, choice, position) does not depend on what was sampled before it.
TEST(Sampler, SameKeySameTokenInAnyCallOrder) {
  const std::vector<float> l = {0.3f, 0.1f, 0.0f, -0.2f, 0.25f, 0.05f};
  const SamplingParams p = Params(1.0, 1.0, 0, 77);
  const int64_t kPositions = 300;
  std::vector<int32_t> forward(kPositions);
  for (int64_t pos = 0; pos < kPositions; ++pos) forward[pos] = SampleToken(l, p, 0, pos);
  // Backwards, with draws for other choices, seeds and positions in between.
  std::vector<int32_t> backward(kPositions);
  for (int64_t pos = kPositions - 1; pos >= 0; --pos) {
    SampleToken(l, p, 1, pos);
    SampleToken(l, Params(1.0, 1.0, 0, 78), 0, pos + 1);
    backward[pos] = SampleToken(l, p, 0, pos);
  }
  EXPECT_EQ(forward, backward);
  // The wrapper's keyed overload is the same function.
  Sampler s(p);
  for (int64_t pos : {299, 0, 150}) EXPECT_EQ(s.Sample(l, pos), forward[pos]);
  // Not a constant: several tokens occur.
  std::set<int32_t> seen(forward.begin(), forward.end());
  EXPECT_GE(seen.size(), 4u);
}

TEST(Sampler, PositionsGiveIndependentUniformDraws) {
  const std::vector<float> l = {1.0f, 1.0f, 1.0f, 1.0f};  // uniform over 4 tokens
  const SamplingParams p = Params(0.7, 1.0, 0, 12345);
  const int kDraws = 2000;
  std::map<int32_t, int> counts;
  int same_as_choice1 = 0, same_as_next = 0;
  for (int64_t pos = 0; pos < kDraws; ++pos) {
    const int32_t t = SampleToken(l, p, 0, pos);
    counts[t]++;
    same_as_choice1 += t == SampleToken(l, p, 1, pos);
    same_as_next += t == SampleToken(l, p, 0, pos + 1);
  }
  ASSERT_EQ(counts.size(), 4u);
  for (const auto& [token, c] : counts) {
    EXPECT_GE(c, 375) << token;  // 500 expected; 25% margin
    EXPECT_LE(c, 625) << token;
  }
  // Independent 4-way draws agree a quarter of the time (500 of 2000).
  EXPECT_NEAR(same_as_choice1, 500, 125);
  EXPECT_NEAR(same_as_next, 500, 125);
}

TEST(Sampler, FollowsTheDistribution) {
  std::vector<float> l = {0.0f, std::log(3.0f), -100.0f};  // p ~ 1/4, 3/4, 0
  std::map<int, int> counts;
  for (int64_t pos = 0; pos < 4000; ++pos)
    counts[SampleToken(l, Params(1.0, 1.0, 0, 42), 0, pos)]++;
  EXPECT_EQ(counts[2], 0);
  EXPECT_NEAR(counts[1] / 4000.0, 0.75, 0.04);
}

TEST(Sampler, TopKAndTopPRestrictTheSupport) {
  const std::vector<float> l = {2.0f, 3.0f, 1.0f, 2.5f, 0.0f};  // order by logit: 1, 3, 0, 2, 4
  auto support = [&](const SamplingParams& p) {
    std::set<int32_t> s;
    for (int64_t pos = 0; pos < 2000; ++pos) s.insert(SampleToken(l, p, 0, pos));
    return s;
  };
  EXPECT_EQ(support(Params(1.0, 1.0, 0, 3)), (std::set<int32_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(support(Params(1.0, 1.0, 2, 3)), (std::set<int32_t>{1, 3}));
  EXPECT_EQ(support(Params(1.0, 1.0, 1, 3)), (std::set<int32_t>{1}));
  EXPECT_EQ(support(Params(1.0, 1e-6, 0, 3)), (std::set<int32_t>{1}));
  // Probabilities at temperature 1: about 0.49, 0.30, 0.18, 0.07, 0.02 (ids 1, 3, 0, 2, 4).
  EXPECT_EQ(support(Params(1.0, 0.7, 0, 3)), (std::set<int32_t>{1, 3}));
  EXPECT_EQ(support(Params(1.0, 0.9, 0, 3)), (std::set<int32_t>{0, 1, 3}));
  // top-k first, then top-p within the k kept (renormalized: 0.62, 0.38).
  EXPECT_EQ(support(Params(1.0, 0.6, 2, 3)), (std::set<int32_t>{1}));
  EXPECT_EQ(support(Params(1.0, 0.7, 2, 3)), (std::set<int32_t>{1, 3}));
}

TEST(Logprobs, TopLogprobsAndTokenLogprob) {
  const std::vector<float> l = {1.0f, 3.0f, -2.0f, 3.0f, 0.5f};
  double z = 0;
  for (float v : l) z += std::exp(static_cast<double>(v));
  const auto top = TopLogprobs(l, 3);
  ASSERT_EQ(top.size(), 3u);
  // Most likely first, equal logits by lower id.
  EXPECT_EQ(top[0].first, 1);
  EXPECT_EQ(top[1].first, 3);
  EXPECT_EQ(top[2].first, 0);
  for (const auto& [id, lp] : top) {
    EXPECT_NEAR(lp, std::log(std::exp(static_cast<double>(l[id])) / z), 1e-6) << id;
    EXPECT_EQ(lp, TokenLogprob(l, id)) << id;
  }
  EXPECT_TRUE(TopLogprobs(l, 0).empty());
  const auto all = TopLogprobs(l, 100);
  ASSERT_EQ(all.size(), l.size());
  double mass = 0;
  for (const auto& e : all) mass += std::exp(static_cast<double>(e.second));
  EXPECT_NEAR(mass, 1.0, 1e-6);
  EXPECT_EQ(all.back().first, 2);
  // Large logits do not overflow.
  const std::vector<float> big = {1000.0f, 1000.0f};
  EXPECT_NEAR(TokenLogprob(big, 0), -std::log(2.0), 1e-6);
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

// Generate samples the token at absolute position prompt + i with choice index 0: the same tokens
// as sampling the engine's logits by hand, and the same whatever chunking the prefill used.
TEST(Engine, GenerateSamplesByPosition) {
  auto m = model::Model::Load(model::testing::GoldenDir("tiny-a"));
  ASSERT_TRUE(m.ok()) << m.status();
  const std::vector<int32_t> prompt = {5, 17, 300, 2, 9};
  const SamplingParams p = Params(1.5, 0.95, 50, 2026);
  auto a = Generate(**m, prompt, 5, p, 0);
  auto b = Generate(**m, prompt, 5, p, 2);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(a->ids.size(), 5u);
  EXPECT_EQ(a->ids, b->ids);
  Engine e(m->get());
  const SequenceId id = e.AddSequence();
  auto logits = e.Prefill(id, prompt);
  ASSERT_TRUE(logits.ok()) << logits.status();
  std::vector<int32_t> want;
  for (int64_t i = 0; i < 5; ++i) {
    want.push_back(SampleToken(*logits, p, 0, static_cast<int64_t>(prompt.size()) + i));
    const SequenceId ids[1] = {id};
    const int32_t toks[1] = {want.back()};
    logits = e.Decode(ids, toks);
    ASSERT_TRUE(logits.ok()) << logits.status();
  }
  EXPECT_EQ(a->ids, want);
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
