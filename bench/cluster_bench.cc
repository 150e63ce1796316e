// Cluster decode throughput against the single-process engine on the same model (issue 8):
// B sequences decode together, every routed expert on expert worker processes (started here on
// loopback, as `score --cluster` does) or all in this process; the two alternate round by round
// so that this shared machine's noise hits both alike. Prints tokens/s, the ratio, and the share
// of step time spent waiting on expert RPCs (after the shared expert and the other micro-batch
// have run). A second part injects a delay into every expert dispatch and shows that with two
// micro-batches in ping-pong a step costs about the larger of attention and expert time, not
// their sum. Not a test.
//
//   cluster_bench [--model DIR] [--expert-workers E] [--batches 1,8,32] [--prompt P]
//                 [--decode N] [--rounds R] [--micro-batches M] [--delay-ms D] [--threads T]
// --delay-ms: -1 (default) = about the attention time per layer; 0 = skip the overlap part.
// Without --model it writes the `tiny` preset (seed 0) to a temporary directory first.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "cli/cluster_experts.h"
#include "core/kernels/matmul.h"
#include "bench/bench_util.h"
#include "core/model/model.h"
#include "core/model/model_maker.h"

namespace {

using namespace expertmesh;
using bench::Clock;

using bench::Median;
using bench::Seconds;

int Fail(const absl::Status& s) { return bench::Fail("cluster_bench", s); }

// B sequences with a prefilled prompt each, decoding greedily in steps of `micro` micro-batches
// that ping-pong at the MoE (as the attention worker's scheduler does).
struct Decoder {
  model::Model* m;
  std::vector<model::SequenceState> states;
  std::vector<int32_t> next;

  absl::Status Prefill(int64_t batch, int64_t prompt) {
    states.clear();
    next.clear();
    for (int64_t b = 0; b < batch; ++b) {
      states.push_back(m->NewState());
      std::vector<int32_t> ids;
      for (int64_t i = 0; i < prompt; ++i) {
        ids.push_back(static_cast<int32_t>((b * 7919 + i * 104729) % m->config().vocab_size));
      }
      model::Segment s{&states.back(), ids};
      auto l = m->Forward({&s, 1}, {});
      if (!l.ok()) return l.status();
      next.push_back(static_cast<int32_t>(std::max_element(l->begin(), l->end()) - l->begin()));
    }
    return absl::OkStatus();
  }

  absl::Status Step(int micro) {
    const int64_t batch = static_cast<int64_t>(states.size());
    const int groups = static_cast<int>(std::min<int64_t>(micro, batch));
    std::vector<std::unique_ptr<model::ForwardPass>> passes;
    std::vector<int64_t> first;
    for (int g = 0; g < groups; ++g) {
      const int64_t b0 = batch * g / groups, b1 = batch * (g + 1) / groups;
      std::vector<model::Segment> segs;
      for (int64_t b = b0; b < b1; ++b) segs.push_back({&states[b], {&next[b], 1}});
      auto p = m->BeginForward(segs, {});
      if (!p.ok()) return p.status();
      passes.push_back(std::move(*p));
      first.push_back(b0);
    }
    for (bool more = true; more;) {
      more = false;
      for (auto& p : passes) {
        if (p->done()) continue;
        if (absl::Status s = p->Advance(); !s.ok()) return s;
        more = more || !p->done();
      }
    }
    const int64_t V = m->config().vocab_size;
    for (size_t g = 0; g < passes.size(); ++g) {
      const std::vector<float>& l = passes[g]->logits();
      for (int64_t i = 0; i * V < static_cast<int64_t>(l.size()); ++i) {
        next[first[g] + i] = static_cast<int32_t>(
            std::max_element(l.begin() + i * V, l.begin() + (i + 1) * V) - (l.begin() + i * V));
      }
    }
    return absl::OkStatus();
  }
};

struct Timing {
  double seconds = 0;
  double wait = 0;  // blocked on remote experts
};

absl::StatusOr<Timing> TimeDecode(model::Model& m, int64_t batch, int64_t prompt, int64_t steps,
                                  int micro) {
  Decoder d{&m, {}, {}};
  if (absl::Status s = d.Prefill(batch, prompt); !s.ok()) return s;
  const double w0 = m.expert_wait_seconds();
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < steps; ++i) {
    if (absl::Status s = d.Step(micro); !s.ok()) return s;
  }
  return Timing{Seconds(t0, Clock::now()), m.expert_wait_seconds() - w0};
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir, batches_text = "1,8,32";
  int64_t experts = 2, prompt = 32, decode = 16, rounds = 3, micro = 2, delay_ms = -1,
          threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const std::string v = argv[i + 1];
    int64_t n = 0;
    const bool num = absl::SimpleAtoi(v, &n);  // --delay-ms -1 = auto, 0 = skip
    if (k == "--model") {
      dir = v;
    } else if (k == "--batches") {
      batches_text = v;
    } else if (num && k == "--expert-workers") {
      experts = n;
    } else if (num && k == "--prompt") {
      prompt = n;
    } else if (num && k == "--decode") {
      decode = n;
    } else if (num && k == "--rounds") {
      rounds = n;
    } else if (num && k == "--micro-batches") {
      micro = n;
    } else if (num && k == "--delay-ms") {
      delay_ms = n;
    } else if (num && k == "--threads") {
      threads = n;
    } else {
      std::fprintf(stderr, "cluster_bench: bad flag %s %s (see the header of cluster_bench.cc)\n",
                   k.c_str(), v.c_str());
      return 2;
    }
  }
  std::vector<int64_t> batches;
  for (absl::string_view part : absl::StrSplit(batches_text, ',')) {
    int64_t b = 0;
    if (!absl::SimpleAtoi(part, &b) || b < 1) {
      std::fprintf(stderr, "cluster_bench: --batches: bad entry '%s'\n", std::string(part).c_str());
      return 2;
    }
    batches.push_back(b);
  }
  kernels::SetKernelThreads(static_cast<int>(threads));
  std::string tmp;
  if (dir.empty()) {
    char tmpl[] = "/tmp/em-cluster-bench-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) return Fail(absl::InternalError("mkdtemp failed"));
    tmp = dir = tmpl;
    std::fprintf(stderr, "cluster_bench: writing the tiny model to %s\n", dir.c_str());
    if (absl::Status s = model::WriteModelPreset("tiny", 0, dir); !s.ok()) return Fail(s);
  }
  auto single = model::Model::Load(dir);
  if (!single.ok()) return Fail(single.status());
  auto attn = model::Model::Load(dir, cli::WithoutRoutedExperts());
  if (!attn.ok()) return Fail(attn.status());
  int rc = 0;
  {
    auto cluster = cli::ClusterExperts::Start(**attn, dir, static_cast<int>(experts));
    if (!cluster.ok()) return Fail(cluster.status());
    std::printf("cluster_bench: %s, %lld expert workers, prompt %lld, %lld decode steps, %lld "
                "rounds, %lld micro-batches, kernels %s\n",
                dir.c_str(), static_cast<long long>(experts), static_cast<long long>(prompt),
                static_cast<long long>(decode), static_cast<long long>(rounds),
                static_cast<long long>(micro),
                std::string(kernels::ActiveKernelTargetName()).c_str());
    // Columns: the single process; the cluster with one micro-batch per step; the cluster with
    // `micro` micro-batches in ping-pong (what the attention worker runs by default).
    std::printf("%6s %12s | %12s %6s %6s | %12s %6s %6s\n", "batch", "single tok/s",
                "cluster(1)", "ratio", "wait", ("cluster(" + std::to_string(micro) + ")").c_str(),
                "ratio", "wait");
    for (int64_t b : batches) {
      std::vector<double> st, c1, r1, w1, cm, rm, wm;
      for (int64_t r = 0; r < rounds && rc == 0; ++r) {
        // Rotate which runs first so that drift hits all three alike.
        Timing t[3];
        for (int k = 0; k < 3; ++k) {
          const int which = static_cast<int>((k + r) % 3);
          auto got = which == 0   ? TimeDecode(**single, b, prompt, decode, 1)
                     : which == 1 ? TimeDecode(**attn, b, prompt, decode, 1)
                                  : TimeDecode(**attn, b, prompt, decode, static_cast<int>(micro));
          if (!got.ok()) return Fail(got.status());
          t[which] = *got;
        }
        st.push_back(b * decode / t[0].seconds);
        c1.push_back(b * decode / t[1].seconds);
        r1.push_back(t[0].seconds / t[1].seconds);
        w1.push_back(t[1].wait / t[1].seconds);
        cm.push_back(b * decode / t[2].seconds);
        rm.push_back(t[0].seconds / t[2].seconds);
        wm.push_back(t[2].wait / t[2].seconds);
      }
      std::printf("%6lld %12.1f | %12.1f %6.3f %5.1f%% | %12.1f %6.3f %5.1f%%\n",
                  static_cast<long long>(b), Median(st), Median(c1), Median(r1), 100 * Median(w1),
                  Median(cm), Median(rm), 100 * Median(wm));
      std::fflush(stdout);
    }
  }
  if (delay_ms != 0) {
    // Overlap: every dispatch delayed by D; one micro-batch (no ping-pong) against `micro`.
    // Attention time A = the undelayed cluster step. With M micro-batches a layer makes M
    // dispatches, so the experts' time per step is L x M x D; the default D (--delay-ms -1) makes
    // it equal to A, where overlapping matters most: without overlap a step would take their sum.
    const int64_t b = batches.back();
    const int layers = static_cast<int>((*attn)->weights().layers.size());
    double attention_ms = 0;
    {
      auto base = cli::ClusterExperts::Start(**attn, dir, static_cast<int>(experts));
      if (!base.ok()) return Fail(base.status());
      auto undelayed = TimeDecode(**attn, b, prompt, decode, static_cast<int>(micro));
      if (!undelayed.ok()) return Fail(undelayed.status());
      attention_ms = 1e3 * undelayed->seconds / decode;
    }
    if (delay_ms < 0) {
      delay_ms = std::max<int64_t>(1, std::llround(attention_ms / (layers * micro)));
    }
    auto delayed = cli::ClusterExperts::Start(**attn, dir, static_cast<int>(experts),
                                              {"--inject-delay-ms", std::to_string(delay_ms)});
    if (!delayed.ok()) return Fail(delayed.status());
    std::printf("\noverlap at batch %lld, %d MoE layers, %lld ms injected per dispatch:\n",
                static_cast<long long>(b), layers, static_cast<long long>(delay_ms));
    auto one = TimeDecode(**attn, b, prompt, decode, 1);
    auto two = TimeDecode(**attn, b, prompt, decode, static_cast<int>(micro));
    if (!one.ok() || !two.ok()) return Fail(!one.ok() ? one.status() : two.status());
    const double expert1 = static_cast<double>(layers * delay_ms);
    const double expertm = expert1 * static_cast<double>(micro);
    std::printf("  attention A (undelayed step)          %8.1f ms/step\n", attention_ms);
    std::printf("  1 micro-batch:  experts %6.1f, A + experts %6.1f, max %6.1f, measured %6.1f\n",
                expert1, attention_ms + expert1, std::max(attention_ms, expert1),
                1e3 * one->seconds / decode);
    std::printf("  %lld micro-batches: experts %6.1f, A + experts %6.1f, max %6.1f, measured %6.1f\n",
                static_cast<long long>(micro), expertm, attention_ms + expertm,
                std::max(attention_ms, expertm), 1e3 * two->seconds / decode);
  }
  if (!tmp.empty()) std::filesystem::remove_all(tmp);
  return rc;
}
