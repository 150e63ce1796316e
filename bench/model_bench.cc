// Benchmark (1) of issue 4: single-process prefill and decode tokens/s of the reference engine
// on the tiny default model, measured side by side in one run (prefill in one piece and in
// chunks; decode at batch 1 and batch B). Not a test.
//
//   model_bench [--model DIR] [--prompt P] [--decode N] [--batch B] [--threads T]
// Without --model it writes the `tiny` preset (seed 0) to a temporary directory first.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "core/kernels/matmul.h"
#include "core/model/model.h"
#include "core/model/model_maker.h"

namespace {

using namespace expertmesh;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "model_bench: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir;
  int64_t prompt = 256, decode = 32, batch = 8, threads = 0, chunk = 64;
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

  // Prefill: one piece and chunked (the same tokens; separate fresh states).
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
  auto warm = prefill(prompt);  // page in the weights
  if (!warm.ok()) return Fail(warm.status());
  auto whole = prefill(prompt);
  auto chunked = prefill(chunk);
  if (!whole.ok() || !chunked.ok()) return Fail(whole.ok() ? chunked.status() : whole.status());

  // Decode: `batch` sequences after the prompt, each step one token per sequence.
  auto run_decode = [&](int64_t b) -> absl::StatusOr<double> {
    std::vector<model::SequenceState> st;
    for (int64_t i = 0; i < b; ++i) {
      st.push_back(model.NewState());
      model::Segment s{&st.back(), absl::MakeConstSpan(ids.data(), prompt)};
      auto l = model.Forward({&s, 1}, {});
      if (!l.ok()) return l.status();
    }
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
  auto d1 = run_decode(1);
  auto db = run_decode(batch);
  if (!d1.ok() || !db.ok()) return Fail(d1.ok() ? db.status() : d1.status());

  std::printf("prefill %lld tokens, one piece:      %10.1f tok/s\n", static_cast<long long>(prompt),
              *whole);
  std::printf("prefill %lld tokens, chunks of %lld:  %10.1f tok/s\n",
              static_cast<long long>(prompt), static_cast<long long>(chunk), *chunked);
  std::printf("decode batch 1 (at position %lld):   %10.1f tok/s\n", static_cast<long long>(prompt),
              *d1);
  std::printf("decode batch %lld (at position %lld):   %10.1f tok/s (%.2fx batch 1)\n",
              static_cast<long long>(batch), static_cast<long long>(prompt), *db, *db / *d1);
  if (!tmp.empty()) std::filesystem::remove_all(tmp);
  return 0;
}
