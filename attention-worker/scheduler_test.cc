// The attention worker's scheduler in-process (tiny-a, every expert local): outputs equal the
// engine's whatever else runs, stop ids and max tokens end sequences with the right reason,
// logprobs are the engine's, cancellation and the budgets work, bad requests name the field.
#include "attention-worker/scheduler.h"

#include <algorithm>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/engine/engine.h"
#include "core/model/model.h"
#include "gtest/gtest.h"

namespace expertmesh::attention_worker {
namespace {

namespace v1 = expertmesh::v1;

const std::string kModel = std::string(EM_SHARED_DIR) + "/golden/tiny-a";

// Collects a sequence's messages; Wait blocks until End.
class Collector : public SequenceSink {
 public:
  void Send(v1::SequenceTokens m) override {
    std::lock_guard<std::mutex> l(mu_);
    messages_.push_back(std::move(m));
  }
  void End(absl::Status s) override {
    std::lock_guard<std::mutex> l(mu_);
    status_ = std::move(s);
    ended_ = true;
    cv_.notify_all();
  }
  bool Wait(absl::Duration timeout = absl::Seconds(60)) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, absl::ToChronoNanoseconds(timeout), [&] { return ended_; });
  }
  std::vector<int32_t> tokens() const {
    std::lock_guard<std::mutex> l(mu_);
    std::vector<int32_t> out;
    for (const auto& m : messages_) {
      for (uint32_t t : m.token_ids()) out.push_back(static_cast<int32_t>(t));
    }
    return out;
  }
  v1::FinishReason reason() const {
    std::lock_guard<std::mutex> l(mu_);
    return messages_.empty() ? v1::FINISH_REASON_UNSPECIFIED : messages_.back().finish_reason();
  }
  std::vector<v1::SequenceTokens> messages() const {
    std::lock_guard<std::mutex> l(mu_);
    return messages_;
  }
  absl::Status status() const {
    std::lock_guard<std::mutex> l(mu_);
    return status_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<v1::SequenceTokens> messages_;
  absl::Status status_;
  bool ended_ = false;
};

class SchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = model::Model::Load(kModel);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
  }

  v1::SequenceRequest Request(const std::string& id, std::vector<uint32_t> prompt, int max_new,
                              float temperature = 0, uint64_t seed = 0) {
    v1::SequenceRequest r;
    r.set_sequence_id(id);
    for (uint32_t t : prompt) r.add_prompt_ids(t);
    r.mutable_sampling()->set_max_new_tokens(static_cast<uint32_t>(max_new));
    r.mutable_sampling()->set_temperature(temperature);
    if (temperature > 0) r.mutable_sampling()->set_seed(seed);
    return r;
  }

  std::vector<int32_t> EngineTokens(const v1::SequenceRequest& r) {
    engine::SamplingParams p;
    p.temperature = r.sampling().temperature();
    p.seed = r.sampling().seed();
    std::vector<int32_t> prompt(r.prompt_ids().begin(), r.prompt_ids().end());
    auto g = engine::Generate(*model_, prompt, r.sampling().max_new_tokens(), p);
    EXPECT_TRUE(g.ok()) << g.status();
    return g.ok() ? g->ids : std::vector<int32_t>{};
  }

  std::unique_ptr<model::Model> model_;
};

TEST_F(SchedulerTest, BatchedSequencesEqualTheEngineAloneWithSmallBudgets) {
  SchedulerOptions o;
  o.max_batch_tokens = 7;  // prefill in chunks mixed with decode tokens
  o.max_running_sequences = 3;  // the rest queue
  Scheduler s(model_.get(), o, nullptr);
  std::vector<v1::SequenceRequest> reqs;
  for (int i = 0; i < 6; ++i) {
    std::vector<uint32_t> prompt;
    for (int j = 0; j < 5 + 3 * i; ++j) prompt.push_back(static_cast<uint32_t>((i * 131 + j * 17) % 1024));
    reqs.push_back(Request(absl::StrCat("s", i), prompt, 5 + i, i % 2 ? 0.9f : 0.0f, 40 + i));
  }
  std::vector<std::shared_ptr<Collector>> sinks;
  for (const auto& r : reqs) {
    sinks.push_back(std::make_shared<Collector>());
    ASSERT_TRUE(s.Submit(r, sinks.back()).ok());
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(sinks[i]->Wait()) << i;
    EXPECT_TRUE(sinks[i]->status().ok()) << sinks[i]->status();
    EXPECT_EQ(sinks[i]->tokens(), EngineTokens(reqs[i])) << "sequence " << i;
    EXPECT_EQ(sinks[i]->reason(), v1::FINISH_REASON_LENGTH);
  }
  EXPECT_GT(s.steps(), 6);
}

TEST_F(SchedulerTest, StopTokenEndsWithStopAndIncludesIt) {
  Scheduler s(model_.get(), {}, nullptr);
  v1::SequenceRequest r = Request("a", {1, 2, 3, 4}, 12);
  const std::vector<int32_t> want = EngineTokens(r);
  ASSERT_GE(want.size(), 3u);
  r.mutable_sampling()->add_stop_token_ids(static_cast<uint32_t>(want[2]));
  auto sink = std::make_shared<Collector>();
  ASSERT_TRUE(s.Submit(r, sink).ok());
  ASSERT_TRUE(sink->Wait());
  // The first occurrence of the stop id ends the sequence.
  std::vector<int32_t> expect;
  for (int32_t t : want) {
    expect.push_back(t);
    if (t == want[2]) break;
  }
  EXPECT_EQ(sink->tokens(), expect);
  EXPECT_EQ(sink->reason(), v1::FINISH_REASON_STOP);
}

TEST_F(SchedulerTest, LogprobsAreTheEnginesAndTheSeedIsReported) {
  Scheduler s(model_.get(), {}, nullptr);
  v1::SequenceRequest r = Request("a", {5, 6, 7}, 3);
  r.mutable_sampling()->set_logprobs(true);
  r.mutable_sampling()->set_top_logprobs(3);
  auto sink = std::make_shared<Collector>();
  ASSERT_TRUE(s.Submit(r, sink).ok());
  ASSERT_TRUE(sink->Wait());
  const auto msgs = sink->messages();
  ASSERT_EQ(msgs.size(), 3u);
  EXPECT_NE(msgs[0].seed(), 0u);  // chosen by the system and reported
  EXPECT_EQ(msgs[0].prompt_tokens(), 3u);
  // Recompute the first token's logprobs with the engine.
  model::SequenceState st = model_->NewState();
  std::vector<int32_t> prompt = {5, 6, 7};
  model::Segment seg{&st, prompt};
  auto logits = model_->Forward({&seg, 1}, {});
  ASSERT_TRUE(logits.ok());
  const auto top = engine::TopLogprobs(*logits, 3);
  ASSERT_EQ(msgs[0].logprobs_size(), 1);
  const v1::TokenLogprob& lp = msgs[0].logprobs(0);
  EXPECT_EQ(lp.token_id(), static_cast<uint32_t>(top[0].first));  // greedy = most likely
  EXPECT_EQ(lp.logprob(), top[0].second);
  ASSERT_EQ(lp.top_size(), 3);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(lp.top(i).token_id(), static_cast<uint32_t>(top[i].first));
    EXPECT_EQ(lp.top(i).logprob(), top[i].second);
  }
}

TEST_F(SchedulerTest, CancelEndsTheSequenceWithCancelled) {
  Scheduler s(model_.get(), {}, nullptr);
  auto sink = std::make_shared<Collector>();
  ASSERT_TRUE(s.Submit(Request("long", {1, 2, 3}, 100000), sink).ok());
  while (sink->tokens().size() < 2) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_TRUE(s.Cancel("long"));
  ASSERT_TRUE(sink->Wait());
  EXPECT_EQ(sink->reason(), v1::FINISH_REASON_CANCELLED);
  EXPECT_LT(sink->tokens().size(), 100000u);
  EXPECT_FALSE(s.Cancel("nobody"));
  // The id is free again once the sequence has left.
  for (int i = 0; i < 200 && s.running() + s.queued() > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  auto again = std::make_shared<Collector>();
  EXPECT_TRUE(s.Submit(Request("long", {1, 2, 3}, 2), again).ok());
  ASSERT_TRUE(again->Wait());
}

// The thinking budget: at exactly max_thinking_tokens generated tokens without the end id, the
// end id is the next token, and what follows is what the model samples after it (draws keyed by
// position), whatever else shares the batch.
TEST_F(SchedulerTest, ThinkingBudgetForcesTheEndIdAtTheBudget) {
  SchedulerOptions o;
  o.max_batch_tokens = 5;  // the companion's prefill shares steps with the budgeted decode
  Scheduler s(model_.get(), o, nullptr);
  const std::vector<uint32_t> prompt = {1, 2, 3, 4};
  constexpr int kMaxNew = 10;
  constexpr int kBudget = 3;
  v1::SequenceRequest plain = Request("plain", prompt, kMaxNew, 0.9f, 7);
  const std::vector<int32_t> free_run = EngineTokens(plain);
  ASSERT_EQ(free_run.size(), static_cast<size_t>(kMaxNew));
  // An end id the free run does not produce within the budget.
  int32_t end = 0;
  while (std::find(free_run.begin(), free_run.begin() + kBudget, end) !=
         free_run.begin() + kBudget) {
    ++end;
  }
  v1::SequenceRequest r = plain;
  r.set_sequence_id("budget");
  r.mutable_sampling()->set_max_thinking_tokens(kBudget);
  r.mutable_sampling()->set_end_thinking_token_id(static_cast<uint32_t>(end));

  // Expected: the free run up to the budget, the end id, then the engine's continuation of
  // that text (same seed, same absolute positions).
  std::vector<int32_t> expect(free_run.begin(), free_run.begin() + kBudget);
  expect.push_back(end);
  std::vector<int32_t> forced_prompt(prompt.begin(), prompt.end());
  forced_prompt.insert(forced_prompt.end(), expect.begin(), expect.end());
  engine::SamplingParams p;
  p.temperature = 0.9f;
  p.seed = 7;
  auto rest = engine::Generate(*model_, forced_prompt, kMaxNew - kBudget - 1, p);
  ASSERT_TRUE(rest.ok()) << rest.status();
  expect.insert(expect.end(), rest->ids.begin(), rest->ids.end());

  auto budgeted = std::make_shared<Collector>();
  auto companion = std::make_shared<Collector>();
  ASSERT_TRUE(s.Submit(r, budgeted).ok());
  ASSERT_TRUE(s.Submit(Request("other", {9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8}, 6), companion).ok());
  ASSERT_TRUE(budgeted->Wait());
  ASSERT_TRUE(companion->Wait());
  EXPECT_TRUE(budgeted->status().ok()) << budgeted->status();
  EXPECT_EQ(budgeted->tokens(), expect);
  ASSERT_GT(budgeted->tokens().size(), static_cast<size_t>(kBudget));
  EXPECT_EQ(budgeted->tokens()[kBudget], end);

  // The end id generated before the budget: nothing is forced, the run is the free one.
  v1::SequenceRequest early = plain;
  early.set_sequence_id("early");
  early.mutable_sampling()->set_max_thinking_tokens(kBudget);
  early.mutable_sampling()->set_end_thinking_token_id(static_cast<uint32_t>(free_run[1]));
  auto early_sink = std::make_shared<Collector>();
  ASSERT_TRUE(s.Submit(early, early_sink).ok());
  ASSERT_TRUE(early_sink->Wait());
  EXPECT_EQ(early_sink->tokens(), free_run);

  // No budget (an end id alone changes nothing).
  v1::SequenceRequest none = plain;
  none.set_sequence_id("none");
  none.mutable_sampling()->set_end_thinking_token_id(static_cast<uint32_t>(end));
  auto none_sink = std::make_shared<Collector>();
  ASSERT_TRUE(s.Submit(none, none_sink).ok());
  ASSERT_TRUE(none_sink->Wait());
  EXPECT_EQ(none_sink->tokens(), free_run);
}

TEST_F(SchedulerTest, BadRequestsNameTheField) {
  Scheduler s(model_.get(), {}, nullptr);
  auto sink = std::make_shared<Collector>();
  auto err = [&](const v1::SequenceRequest& r) { return s.Submit(r, sink); };
  EXPECT_NE(err(Request("", {1}, 1)).message().find("sequence_id"), std::string::npos);
  EXPECT_NE(err(Request("x", {}, 1)).message().find("prompt_ids"), std::string::npos);
  EXPECT_NE(err(Request("x", {1, 5000}, 1)).message().find("prompt_ids[1]"), std::string::npos);
  v1::SequenceRequest bad_t = Request("x", {1}, 1);
  bad_t.mutable_sampling()->set_temperature(-1);
  EXPECT_NE(err(bad_t).message().find("sampling.temperature"), std::string::npos);
  v1::SequenceRequest bad_p = Request("x", {1}, 1);
  bad_p.mutable_sampling()->set_top_p(1.5f);
  EXPECT_NE(err(bad_p).message().find("sampling.top_p"), std::string::npos);
  v1::SequenceRequest bad_stop = Request("x", {1}, 1);
  bad_stop.mutable_sampling()->add_stop_token_ids(99999);
  EXPECT_NE(err(bad_stop).message().find("sampling.stop_token_ids"), std::string::npos);
  v1::SequenceRequest bad_end = Request("x", {1}, 4);
  bad_end.mutable_sampling()->set_max_thinking_tokens(2);
  bad_end.mutable_sampling()->set_end_thinking_token_id(99999);
  EXPECT_NE(err(bad_end).message().find("sampling.end_thinking_token_id"), std::string::npos);

  SchedulerOptions tiny;
  tiny.state_memory_bytes = 1000;
  Scheduler small(model_.get(), tiny, nullptr);
  absl::Status st = small.Submit(Request("big", {1, 2, 3}, 100), sink);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;

  auto first = std::make_shared<Collector>();
  ASSERT_TRUE(s.Submit(Request("dup", {1, 2}, 50), first).ok());
  EXPECT_EQ(s.Submit(Request("dup", {1, 2}, 1), sink).code(), absl::StatusCode::kAlreadyExists);
  s.Drain();
  EXPECT_EQ(s.Submit(Request("late", {1}, 1), sink).code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(first->Wait());  // running sequences finish while draining
  EXPECT_TRUE(first->status().ok());
}

// An in-memory PrefixStore: puts land at once, so a later sequence sees every earlier block.
// `fail_lookups` answers like a store that is down; `corrupt` flips a byte of each block whose
// end position it holds, on the way out.
class MemoryStore : public PrefixStore {
 public:
  void PutAsync(KvPut put) override {
    std::lock_guard<std::mutex> l(mu_);
    if (put.key.end_position > 128 && !put.parent) return;  // contract: parent after block 0
    blocks_[{put.key.tenant, put.key.chain_hash, put.key.end_position}] = std::move(put.data);
  }
  void DeleteSequenceAsync(std::string, std::string) override {}
  PrefixFetch FetchPrefix(const std::string& tenant,
                          const std::vector<uint64_t>& hashes) override {
    std::lock_guard<std::mutex> l(mu_);
    PrefixFetch f;
    if (fail_lookups) {
      f.lookup_status = absl::UnavailableError("store down");
      return f;
    }
    for (size_t i = 0; i < hashes.size(); ++i) {
      auto it = blocks_.find({tenant, hashes[i], static_cast<uint32_t>(128 * (i + 1))});
      if (it == blocks_.end()) break;
      ++f.matched_blocks;
      std::string data = it->second;
      if (corrupt.count(static_cast<uint32_t>(128 * (i + 1))) != 0) data[data.size() / 2] ^= 1;
      f.blocks.push_back(std::move(data));
    }
    return f;
  }
  size_t size() const {
    std::lock_guard<std::mutex> l(mu_);
    return blocks_.size();
  }
  bool fail_lookups = false;
  std::set<uint32_t> corrupt;

 private:
  mutable std::mutex mu_;
  std::map<std::tuple<std::string, uint64_t, uint32_t>, std::string> blocks_;
};

struct RunResult {
  std::vector<int32_t> tokens;
  std::vector<std::string> logprob_bytes;  // each message's logprobs, serialized
  uint32_t cached = 0;
};

RunResult RunOne(Scheduler& s, v1::SequenceRequest r) {
  auto sink = std::make_shared<Collector>();
  EXPECT_TRUE(s.Submit(r, sink).ok());
  EXPECT_TRUE(sink->Wait());
  EXPECT_TRUE(sink->status().ok()) << sink->status();
  RunResult out;
  out.tokens = sink->tokens();
  const auto msgs = sink->messages();
  if (!msgs.empty()) out.cached = msgs.front().cached_prompt_tokens();
  for (const auto& m : msgs) {
    for (const auto& lp : m.logprobs()) out.logprob_bytes.push_back(lp.SerializeAsString());
  }
  return out;
}

TEST_F(SchedulerTest, StateRebuiltFromStoredBlocksContinuesBitIdentically) {
  std::vector<uint32_t> prompt;
  for (int j = 0; j < 3 * 128 + 50; ++j) prompt.push_back(static_cast<uint32_t>((j * 37 + 11) % 1024));
  auto request = [&](const std::string& id, const std::string& tenant,
                     const std::vector<uint32_t>& p) {
    v1::SequenceRequest r = Request(id, p, 12, 0.8f, 99);
    r.set_tenant(tenant);
    r.mutable_sampling()->set_top_logprobs(20);
    return r;
  };
  // The reference: no store at all.
  RunResult plain;
  {
    Scheduler s(model_.get(), SchedulerOptions{}, nullptr);
    plain = RunOne(s, request("plain", "t1", prompt));
  }
  EXPECT_EQ(plain.tokens, EngineTokens(request("e", "t1", prompt)));

  MemoryStore store;
  SchedulerOptions o;
  o.prefix_store = &store;
  o.max_batch_tokens = 100;  // chunks end at block boundaries and at the budget
  prometheus::Registry registry;
  Scheduler s(model_.get(), o, &registry);
  RunResult first = RunOne(s, request("first", "t1", prompt));
  EXPECT_EQ(first.cached, 0u);
  EXPECT_EQ(store.size(), 3u);  // the prompt's 3 full blocks (434 + 12 tokens fed < 512)
  RunResult second = RunOne(s, request("second", "t1", prompt));
  EXPECT_EQ(second.cached, 3u * 128);
  for (const RunResult* r : {&first, &second}) {
    EXPECT_EQ(r->tokens, plain.tokens);
    ASSERT_EQ(r->logprob_bytes.size(), plain.logprob_bytes.size());
    for (size_t i = 0; i < plain.logprob_bytes.size(); ++i) {
      EXPECT_EQ(r->logprob_bytes[i], plain.logprob_bytes[i]) << "token " << i;
    }
  }
  // Another tenant never hits.
  RunResult other = RunOne(s, request("other", "t2", prompt));
  EXPECT_EQ(other.cached, 0u);
  EXPECT_EQ(other.tokens, plain.tokens);

  // A shared 256-token prefix with another tail hits its two blocks.
  std::vector<uint32_t> forked(prompt.begin(), prompt.begin() + 256);
  for (int j = 0; j < 40; ++j) forked.push_back(static_cast<uint32_t>((j * 7 + 500) % 1024));
  RunResult fork_plain;
  {
    Scheduler alone(model_.get(), SchedulerOptions{}, nullptr);
    fork_plain = RunOne(alone, request("fp", "t1", forked));
  }
  RunResult fork = RunOne(s, request("fork", "t1", forked));
  EXPECT_EQ(fork.cached, 256u);
  EXPECT_EQ(fork.tokens, fork_plain.tokens);
  EXPECT_EQ(fork.logprob_bytes, fork_plain.logprob_bytes);

  // A corrupted block is not used: the chain stops before it and the rest is computed.
  store.corrupt = {256};
  RunResult corrupted = RunOne(s, request("corrupted", "t1", prompt));
  EXPECT_EQ(corrupted.cached, 128u);
  EXPECT_EQ(corrupted.tokens, plain.tokens);
  EXPECT_EQ(corrupted.logprob_bytes, plain.logprob_bytes);
  // A store that is down only costs the reuse.
  store.corrupt.clear();
  store.fail_lookups = true;
  RunResult down = RunOne(s, request("down", "t1", prompt));
  EXPECT_EQ(down.cached, 0u);
  EXPECT_EQ(down.tokens, plain.tokens);
  EXPECT_EQ(down.logprob_bytes, plain.logprob_bytes);
}

TEST_F(SchedulerTest, BlocksCompletedDuringDecodeAreStoredAndReused) {
  // 100 prompt tokens + 40 generated cross the first boundary while decoding.
  std::vector<uint32_t> prompt;
  for (int j = 0; j < 100; ++j) prompt.push_back(static_cast<uint32_t>((j * 53 + 3) % 1024));
  MemoryStore store;
  SchedulerOptions o;
  o.prefix_store = &store;
  Scheduler s(model_.get(), o, nullptr);
  v1::SequenceRequest r = Request("gen", prompt, 40);
  r.set_tenant("t");
  RunResult gen = RunOne(s, r);
  ASSERT_EQ(gen.tokens.size(), 40u);
  EXPECT_EQ(store.size(), 1u);
  // The conversation continues: prompt + answer + a new turn; its first block is a hit.
  std::vector<uint32_t> next = prompt;
  for (int32_t t : gen.tokens) next.push_back(static_cast<uint32_t>(t));
  for (int j = 0; j < 10; ++j) next.push_back(static_cast<uint32_t>(j + 1));
  v1::SequenceRequest turn = Request("turn", next, 8);
  turn.set_tenant("t");
  RunResult cont = RunOne(s, turn);
  EXPECT_EQ(cont.cached, 128u);
  EXPECT_EQ(cont.tokens, EngineTokens(turn));
}

}  // namespace
}  // namespace expertmesh::attention_worker
