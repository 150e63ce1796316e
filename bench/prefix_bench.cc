// Prefix reuse (docs/performance.md, "Prefix reuse"): the time to the first token of a prompt
// whose prefix is in the kv-store against computing it, at 1K and 8K prompt tokens on the tiny
// default model, side by side in one run. Three ways through the attention worker's scheduler:
//   recompute: no store (chunks of --max-batch-tokens),
//   cold:      with the store, nothing stored yet (chunks end at 128-token block boundaries, and
//              every block is encoded and put: the cost of writing),
//   hit:       the same prompt again: LookupPrefix + GetBlock + ApplyBlock for all but the last
//              block (the prompt's last token is always computed), then prefill of the rest.
// The store is a real kv-store (BlockStore + KvStoreService, memory tier) on loopback gRPC in
// this process, reached through the worker's KvClient. Each round runs the three in turn; the
// medians are reported, with recompute / hit. The first token must be the same in all three.
//   prefix_bench [--model DIR] [--tokens 1024,8192] [--rounds 3] [--max-batch-tokens 512]
#include <unistd.h>

#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "attention-worker/kv_client.h"
#include "attention-worker/scheduler.h"
#include "bench/bench_util.h"
#include "core/base/flags.h"
#include "core/model/model.h"
#include "core/model/model_maker.h"
#include "core/state/block_codec.h"
#include "grpcpp/grpcpp.h"
#include "kv-store/block_store.h"
#include "kv-store/kv_store_service.h"

namespace expertmesh::bench {
namespace {

constexpr char kProgram[] = "prefix_bench";
namespace v1 = expertmesh::v1;

class Waiter : public attention_worker::SequenceSink {
 public:
  void Send(v1::SequenceTokens m) override {
    std::lock_guard<std::mutex> l(mu_);
    if (first_) {
      cached_ = m.cached_prompt_tokens();
      first_ = false;
    }
    for (uint32_t t : m.token_ids()) tokens_.push_back(static_cast<int32_t>(t));
  }
  void End(absl::Status s) override {
    std::lock_guard<std::mutex> l(mu_);
    status_ = s;
    done_ = true;
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return done_; });
  }
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false, first_ = true;
  uint32_t cached_ = 0;
  std::vector<int32_t> tokens_;
  absl::Status status_;
};

struct Timed {
  double seconds = 0;
  uint32_t cached = 0;
  int32_t first_token = -1;
};

absl::StatusOr<Timed> RunOnce(attention_worker::Scheduler& s, const std::string& id,
                              const std::vector<int32_t>& prompt) {
  v1::SequenceRequest r;
  r.set_sequence_id(id);
  r.set_tenant("bench");
  for (int32_t t : prompt) r.add_prompt_ids(static_cast<uint32_t>(t));
  r.mutable_sampling()->set_max_new_tokens(1);
  auto w = std::make_shared<Waiter>();
  const auto t0 = Clock::now();
  if (absl::Status st = s.Submit(r, w); !st.ok()) return st;
  w->Wait();
  Timed out;
  out.seconds = Seconds(t0, Clock::now());
  if (!w->status_.ok()) return w->status_;
  out.cached = w->cached_;
  out.first_token = w->tokens_.empty() ? -1 : w->tokens_[0];
  return out;
}

int Main(int argc, char** argv) {
  std::string dir, tokens_text = "1024,8192";
  int64_t rounds = 3, max_batch_tokens = 512;
  base::FlagSet flags(kProgram, "Prefix reuse: time to first token, hit vs recompute.");
  flags.AddString("model", &dir, "Model directory (default: the tiny preset, seed 0, written "
                                 "to a temporary directory)");
  flags.AddString("tokens", &tokens_text, "Comma-separated prompt lengths");
  flags.AddInt("rounds", &rounds, "Rounds (medians reported)");
  flags.AddInt("max-batch-tokens", &max_batch_tokens, "Scheduler token budget per step");
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(kProgram, s);
  std::vector<int> lengths;
  for (absl::string_view p : absl::StrSplit(tokens_text, ',')) {
    int n = 0;
    if (!absl::SimpleAtoi(p, &n) || n < 2) {
      return Fail(kProgram, absl::InvalidArgumentError("--tokens: bad length"));
    }
    lengths.push_back(n);
  }
  std::string tmp;
  if (dir.empty()) {
    tmp = std::filesystem::temp_directory_path() / ("em_prefix_bench_" + std::to_string(getpid()));
    if (auto s = model::WriteModelPreset("tiny", 0, tmp); !s.ok()) return Fail(kProgram, s);
    dir = tmp;
  }
  auto loaded = model::Model::Load(dir);
  if (!loaded.ok()) return Fail(kProgram, loaded.status());
  std::unique_ptr<model::Model> m = std::move(*loaded);

  // The kv-store, in process, on loopback.
  kv_store::StoreOptions so;
  so.memory_capacity_bytes = uint64_t{8} << 30;
  auto store = kv_store::BlockStore::Open(so, nullptr);
  if (!store.ok()) return Fail(kProgram, store.status());
  kv_store::KvStoreService service(**store);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(256 << 20);
  builder.SetMaxSendMessageSize(256 << 20);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return Fail(kProgram, absl::UnavailableError("cannot start the kv-store server"));
  }
  attention_worker::KvClientOptions ko;
  ko.lookup_deadline = absl::Seconds(5);
  ko.get_deadline = absl::Seconds(10);
  attention_worker::KvClient client("127.0.0.1:" + std::to_string(port), ko);

  attention_worker::SchedulerOptions plain_opts;
  plain_opts.max_batch_tokens = max_batch_tokens;
  attention_worker::SchedulerOptions store_opts = plain_opts;
  store_opts.prefix_store = &client;
  attention_worker::Scheduler plain(m.get(), plain_opts, nullptr);
  attention_worker::Scheduler cached(m.get(), store_opts, nullptr);

  const int64_t block_bytes = state::BlockSize(m->config(), 1, false).total();
  std::printf("prefix reuse on %s: %lld bytes per 128-token block (trunk), %lld rounds, "
              "max_batch_tokens %lld\n",
              dir.c_str(), static_cast<long long>(block_bytes), static_cast<long long>(rounds),
              static_cast<long long>(max_batch_tokens));
  std::printf("%8s %8s %12s %12s %12s %12s\n", "prompt", "hit", "recompute_s", "cold_s", "hit_s",
              "recompute/hit");
  uint64_t salt = 1;
  for (int n : lengths) {
    std::vector<double> rec, cold, hit;
    uint32_t hit_tokens = 0;
    for (int64_t round = 0; round < rounds; ++round) {
      // A fresh prompt each round: the cold run stores it, the hit run loads it.
      std::vector<int32_t> prompt(n);
      uint64_t x = 0x9E3779B97F4A7C15ull * ++salt;
      for (int32_t& t : prompt) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        t = static_cast<int32_t>(x % static_cast<uint64_t>(m->config().vocab_size));
      }
      const std::string tag = std::to_string(n) + "-" + std::to_string(round);
      auto r = RunOnce(plain, "rec-" + tag, prompt);
      if (!r.ok()) return Fail(kProgram, r.status());
      auto c = RunOnce(cached, "cold-" + tag, prompt);
      if (!c.ok()) return Fail(kProgram, c.status());
      if (!client.WaitIdle(absl::Seconds(60))) {
        return Fail(kProgram, absl::DeadlineExceededError("puts did not finish"));
      }
      auto h = RunOnce(cached, "hit-" + tag, prompt);
      if (!h.ok()) return Fail(kProgram, h.status());
      if (r->first_token != c->first_token || r->first_token != h->first_token) {
        return Fail(kProgram, absl::InternalError("the first token differs between the runs"));
      }
      if (c->cached != 0 || h->cached == 0) {
        return Fail(kProgram, absl::InternalError("expected a miss, then a hit"));
      }
      hit_tokens = h->cached;
      rec.push_back(r->seconds);
      cold.push_back(c->seconds);
      hit.push_back(h->seconds);
    }
    const double mr = Median(rec), mc = Median(cold), mh = Median(hit);
    std::printf("%8d %8u %12.4f %12.4f %12.4f %12.1fx\n", n, hit_tokens, mr, mc, mh, mr / mh);
  }
  server->Shutdown();
  if (!tmp.empty()) std::filesystem::remove_all(tmp);
  return 0;
}

}  // namespace
}  // namespace expertmesh::bench

int main(int argc, char** argv) { return expertmesh::bench::Main(argc, argv); }
