// `expertmesh generate`: single-process generation with the reference engine
// (core/engine/engine.h), printing the new ids and prefill/decode speeds.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "cli/cluster_experts.h"
#include "cli/commands.h"
#include "core/engine/engine.h"
#include "core/kernels/matmul.h"
#include "core/model/model.h"
#include "core/base/flags.h"
#include "core/rpc/service_process.h"

namespace expertmesh::cli {

int RunGenerate(int argc, char** argv) {
  std::string model_dir, ids_text, temperature = "0", top_p = "1";
  int64_t max_new = 16, seed = 0, top_k = 0, threads = 0, chunk = 0, stop = -1, cluster = 0;
  base::FlagSet flags(
      "expertmesh generate --model DIR --ids 1,2,3 --max-new N [--temperature T --seed S "
      "--top-p P --top-k K] [--threads T] [--chunk C] [--stop ID] [--cluster N]",
      "Prefills the prompt ids, then samples up to N new tokens (greedy when --temperature is "
      "0). Prints the new ids and the prefill and decode speeds.");
  flags.AddString("model", &model_dir, "checkpoint directory");
  flags.AddString("ids", &ids_text, "prompt token ids, comma-separated");
  flags.AddInt("max-new", &max_new, "tokens to generate");
  flags.AddString("temperature", &temperature, "sampling temperature (0 = greedy)");
  flags.AddInt("seed", &seed, "random seed for sampling");
  flags.AddString("top-p", &top_p, "nucleus sampling mass (1 = off)");
  flags.AddInt("top-k", &top_k, "sample among the K most likely tokens (0 = off)");
  flags.AddInt("threads", &threads, "kernel threads (0 = EM_THREADS or all cores)");
  flags.AddInt("chunk", &chunk, "prefill chunk size (0 = one piece)");
  flags.AddInt("stop", &stop, "stop after this token id (-1 = never)");
  flags.AddInt("cluster", &cluster,
               "compute the routed experts on a local cluster of a router and N expert "
               "workers that the command starts and stops (0 = all in this process)");
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv, "expertmesh generate: "); rc >= 0)
    return rc;
  std::vector<int32_t> ids;
  for (absl::string_view part : absl::StrSplit(ids_text, ',', absl::SkipWhitespace())) {
    int32_t v = 0;
    if (!absl::SimpleAtoi(std::string(part), &v)) {
      std::fprintf(stderr, "expertmesh generate: --ids: '%s' is not an integer\n",
                   std::string(part).c_str());
      return 2;
    }
    ids.push_back(v);
  }
  engine::SamplingParams sp;
  sp.top_k = static_cast<int>(top_k);
  sp.seed = static_cast<uint64_t>(seed);
  if (!absl::SimpleAtod(temperature, &sp.temperature) || !absl::SimpleAtod(top_p, &sp.top_p) ||
      sp.top_p <= 0 || sp.top_p > 1 || top_k < 0) {
    std::fprintf(stderr, "expertmesh generate: bad --temperature, --top-p (0, 1] or --top-k\n");
    return 2;
  }
  if (model_dir.empty() || ids.empty() || max_new <= 0) {
    std::fprintf(stderr,
                 "expertmesh generate: --model, --ids and --max-new N > 0 are "
                 "required; see --help\n");
    return 2;
  }
  kernels::SetKernelThreads(static_cast<int>(threads));
  auto m = model::Model::Load(model_dir,
                              cluster > 0 ? WithoutRoutedExperts() : model::LoadOptions{});
  if (!m.ok()) {
    std::fprintf(stderr, "expertmesh generate: %s\n", std::string(m.status().message()).c_str());
    return 1;
  }
  std::unique_ptr<ClusterExperts> experts;
  if (m.ok() && cluster > 0) {
    auto started = ClusterExperts::Start(**m, model_dir, static_cast<int>(cluster));
    if (!started.ok()) {
      std::fprintf(stderr, "expertmesh generate: --cluster: %s\n",
                   std::string(started.status().message()).c_str());
      return 1;
    }
    experts = std::move(*started);
  }
  auto g = engine::Generate(**m, ids, max_new, sp, chunk, static_cast<int32_t>(stop));
  if (!g.ok()) {
    std::fprintf(stderr, "expertmesh generate: %s\n", std::string(g.status().message()).c_str());
    return 1;
  }
  std::string out;
  for (size_t i = 0; i < g->ids.size(); ++i) {
    if (i) out.push_back(',');
    out.append(std::to_string(g->ids[i]));
  }
  std::printf("%s\n", out.c_str());
  const int64_t decoded = static_cast<int64_t>(g->ids.size()) - 1;
  std::printf(
      "prefill: %lld tokens in %.3f s (%.1f tok/s); decode: %lld tokens in %.3f s (%.1f tok/s)\n",
      static_cast<long long>(g->prompt_tokens), g->prefill_seconds,
      g->prompt_tokens / std::max(g->prefill_seconds, 1e-9), static_cast<long long>(decoded),
      g->decode_seconds, decoded > 0 ? decoded / std::max(g->decode_seconds, 1e-9) : 0.0);
  return 0;
}

}  // namespace expertmesh::cli
