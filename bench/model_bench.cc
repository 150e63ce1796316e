// Benchmark (1) of issue 4, and the cost of batch invariance: single-process prefill and decode
// tokens/s of the reference engine on the tiny default model, with the batch-invariant kernels
// (the default) and the legacy ones (kernels::KernelVariant::kLegacy: the earlier FP8 GEMV)
// measured side by side in one run. The measurements alternate A B, B A, A B, ... round by round,
// so slow drift and other processes on this shared machine hit both variants alike; each
// workload reports the median over rounds per variant and the median of the per-round ratios.
// Not a test.
//
//   model_bench [--model DIR] [--prompt P] [--decode N] [--batch B] [--chunk C] [--threads T]
//               [--rounds R]
// Without --model it writes the `tiny` preset (seed 0) to a temporary directory first.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "core/kernels/matmul.h"
#include "bench/bench_util.h"
#include "core/model/model.h"
#include "core/model/model_maker.h"

namespace {

using namespace expertmesh;
using bench::Clock;

using bench::Median;
using bench::Seconds;

int Fail(const absl::Status& s) { return bench::Fail("model_bench", s); }

}  // namespace

int main(int argc, char** argv) {
  std::string dir;
  int64_t prompt = 256, decode = 32, batch = 8, threads = 0, chunk = 64, rounds = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const char* v = argv[i + 1];
    if (k == "--model")
      dir = v;
    else if (k == "--prompt")
      prompt = std::atoll(v);
    else if (k == "--decode")
      decode = std::atoll(v);
    else if (k == "--batch")
      batch = std::atoll(v);
    else if (k == "--threads")
      threads = std::atoll(v);
    else if (k == "--chunk")
      chunk = std::atoll(v);
    else if (k == "--rounds")
      rounds = std::max<int64_t>(1, std::atoll(v));
    else {
      std::fprintf(stderr, "model_bench: unknown flag %s\n", k.c_str());
      return 2;
    }
  }
  std::string tmp;
  if (dir.empty()) {
    tmp = std::filesystem::temp_directory_path() / ("em_model_bench_" + std::to_string(getpid()));
    std::fprintf(stderr, "writing the tiny preset to %s\n", tmp.c_str());
    if (auto s = model::WriteModelPreset("tiny", 0, tmp); !s.ok()) return Fail(s);
    dir = tmp;
  }
  kernels::SetKernelThreads(static_cast<int>(threads));
  auto m = model::Model::Load(dir);
  if (!m.ok()) return Fail(m.status());
  model::Model& model = **m;
  const model::ModelConfig& c = model.config();
  std::vector<int32_t> ids(prompt + decode);
  uint64_t x = 12345;
  for (auto& id : ids) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    id = static_cast<int32_t>((x >> 33) % static_cast<uint64_t>(c.vocab_size));
  }
  std::printf("model %s: V=%lld D=%lld L=%d experts=%d top-%d; kernel threads %d\n", dir.c_str(),
              static_cast<long long>(c.vocab_size), static_cast<long long>(c.hidden_size),
              c.num_hidden_layers, c.n_routed_experts, c.num_experts_per_tok,
              kernels::KernelThreads());

  std::printf("kernel target %s; %lld rounds, variants alternating\n",
              std::string(kernels::ActiveKernelTargetName()).c_str(),
              static_cast<long long>(rounds));

  // Prefill of `prompt` tokens in pieces of `ch` into a fresh state: tokens/s.
  auto prefill = [&](int64_t ch) -> absl::StatusOr<double> {
    model::SequenceState st = model.NewState();
    auto t0 = Clock::now();
    for (int64_t p = 0; p < prompt; p += ch) {
      model::Segment s{&st, absl::MakeConstSpan(ids.data() + p, std::min(ch, prompt - p))};
      auto l = model.Forward({&s, 1}, {});
      if (!l.ok()) return l.status();
    }
    return prompt / Seconds(t0, Clock::now());
  };
  // Every decode run starts from copies of one state that has consumed the prompt.
  model::SequenceState after_prompt = model.NewState();
  {
    model::Segment s{&after_prompt, absl::MakeConstSpan(ids.data(), prompt)};
    auto l = model.Forward({&s, 1}, {});  // also pages in the weights
    if (!l.ok()) return Fail(l.status());
  }
  // `decode` steps of `b` sequences at position `prompt`, one token each per step: tokens/s.
  auto run_decode = [&](int64_t b) -> absl::StatusOr<double> {
    std::vector<model::SequenceState> st(b, after_prompt);
    auto t0 = Clock::now();
    for (int64_t step = 0; step < decode; ++step) {
      std::vector<model::Segment> segs;
      for (int64_t i = 0; i < b; ++i) {
        segs.push_back({&st[i], absl::MakeConstSpan(ids.data() + prompt + step, 1)});
      }
      auto l = model.Forward(segs, {});
      if (!l.ok()) return l.status();
    }
    return b * decode / Seconds(t0, Clock::now());
  };

  struct Workload {
    std::string name;
    std::function<absl::StatusOr<double>()> run;
    std::vector<double> rate[2];  // tokens/s per round: [0] invariant, [1] legacy
    std::vector<double> ratio;    // invariant / legacy per round
  };
  std::vector<Workload> work;
  work.push_back({"prefill " + std::to_string(prompt) + " tokens, one piece",
                  [&] { return prefill(prompt); }});
  work.push_back(
      {"prefill " + std::to_string(prompt) + " tokens, chunks of " + std::to_string(chunk),
       [&] { return prefill(chunk); }});
  work.push_back(
      {"decode batch 1 at position " + std::to_string(prompt), [&] { return run_decode(1); }});
  work.push_back(
      {"decode batch " + std::to_string(batch) + " at position " + std::to_string(prompt),
       [&] { return run_decode(batch); }});
  const kernels::KernelVariant kVariants[2] = {kernels::KernelVariant::kInvariant,
                                               kernels::KernelVariant::kLegacy};
  for (int64_t r = 0; r < rounds; ++r) {
    for (Workload& wl : work) {
      double rate[2];
      for (int k = 0; k < 2; ++k) {
        const int v = (r % 2 == 0) ? k : 1 - k;  // A B, then B A
        kernels::SetKernelVariantForBench(kVariants[v]);
        auto got = wl.run();
        if (!got.ok()) return Fail(got.status());
        rate[v] = *got;
      }
      wl.rate[0].push_back(rate[0]);
      wl.rate[1].push_back(rate[1]);
      wl.ratio.push_back(rate[0] / rate[1]);
    }
  }
  kernels::SetKernelVariantForBench(kernels::KernelVariant::kInvariant);

  std::printf("%-40s %14s %14s %8s %14s\n", "tokens/s (median of rounds)", "invariant", "legacy",
              "ratio", "ratio range");
  for (const Workload& wl : work) {
    std::printf("%-40s %14.1f %14.1f %8.3f %6.3f-%-6.3f\n", wl.name.c_str(), Median(wl.rate[0]),
                Median(wl.rate[1]), Median(wl.ratio),
                *std::min_element(wl.ratio.begin(), wl.ratio.end()),
                *std::max_element(wl.ratio.begin(), wl.ratio.end()));
  }
  std::printf(
      "(ratio: invariant / legacy tokens/s, the median of the per-round ratios; >= 0.9 "
      "is the goal)\n");
  if (!tmp.empty()) std::filesystem::remove_all(tmp);
  return 0;
}
