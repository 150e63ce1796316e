// `expertmesh score`: teacher-forced logits for input ids in the golden's layout
// (core/engine/score.h).
#include <cstdio>
#include <string>

#include "cli/cluster_experts.h"
#include "cli/commands.h"
#include "core/engine/score.h"
#include "core/kernels/matmul.h"
#include "core/model/model.h"
#include "core/base/flags.h"
#include "core/rpc/service_process.h"

namespace expertmesh::cli {

int RunScore(int argc, char** argv) {
  std::string model_dir, input, out;
  int64_t prefill = 0, threads = 0, chunk = 0;
  bool mtp = false, batch_sequences = false;
  int64_t cluster = 0;
  base::FlagSet flags(
      "expertmesh score --model DIR --input IN.safetensors --prefill N --out OUT.safetensors "
      "[--mtp] [--threads T] [--chunk C] [--batch-sequences] [--cluster N]",
      "Reads input_ids (I32 [batch, tokens]) and writes logits (F32 [batch, tokens, vocab]): one "
      "prefill of the first N tokens from position 0, then one-token decode steps (teacher "
      "forcing). With --mtp also mtp_logits [batch, N-1, vocab] (a fresh trunk over the first "
      "N-1 tokens, then MTP block 0 with the next tokens).");
  flags.AddString("model", &model_dir, "checkpoint directory (config.json + safetensors)");
  flags.AddString("input", &input, "safetensors file with input_ids");
  flags.AddString("out", &out, "output safetensors file");
  flags.AddInt("prefill", &prefill, "tokens in the prefill (N)");
  flags.AddBool("mtp", &mtp, "also write mtp_logits");
  flags.AddInt("threads", &threads, "kernel threads (0 = EM_THREADS or all cores)");
  flags.AddInt("chunk", &chunk, "prefill chunk size (0 = one piece)");
  flags.AddBool("batch-sequences", &batch_sequences,
                "run all input sequences together in every forward pass (one batch)");
  flags.AddInt("cluster", &cluster,
                "compute the routed experts on a local cluster of a router and N expert "
                "workers that the command starts and stops (0 = all in this process)");
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv, "expertmesh score: "); rc >= 0) return rc;
  if (model_dir.empty() || input.empty() || out.empty() || prefill <= 0) {
    std::fprintf(stderr,
                 "expertmesh score: --model, --input, --out and --prefill N > 0 are "
                 "required; see --help\n");
    return 2;
  }
  kernels::SetKernelThreads(static_cast<int>(threads));
  auto m = model::Model::Load(model_dir,
                              cluster > 0 ? WithoutRoutedExperts() : model::LoadOptions{});
  if (!m.ok()) {
    std::fprintf(stderr, "expertmesh score: %s\n", std::string(m.status().message()).c_str());
    return 1;
  }
  std::unique_ptr<ClusterExperts> experts;
  if (cluster > 0) {
    auto started = ClusterExperts::Start(**m, model_dir, static_cast<int>(cluster));
    if (!started.ok()) {
      std::fprintf(stderr, "expertmesh score: --cluster: %s\n",
                   std::string(started.status().message()).c_str());
      return 1;
    }
    experts = std::move(*started);
  }
  engine::ScoreOptions o;
  o.batch_sequences = batch_sequences;
  o.prefill = prefill;
  o.chunk = chunk;
  o.mtp = mtp;
  o.progress = [](const std::string& line) { std::fprintf(stderr, "score: %s\n", line.c_str()); };
  absl::Status s = engine::ScoreFile(**m, input, out, o);
  if (!s.ok()) {
    std::fprintf(stderr, "expertmesh score: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  if (experts) {
    // What crossing process boundaries cost: the wire bytes of every expert dispatch, per token
    // scored (teacher forcing feeds each input token once; MTP rows count too).
    const attention_worker::ExpertDispatcherStats st = experts->dispatcher().stats();
    std::fprintf(stderr,
                 "score: cluster: %lld dispatches, %lld retries, %lld bytes sent, %lld bytes "
                 "received\n",
                 static_cast<long long>(st.dispatches_sent), static_cast<long long>(st.retries),
                 static_cast<long long>(st.wire_bytes_sent),
                 static_cast<long long>(st.wire_bytes_received));
  }
  return 0;
}

}  // namespace expertmesh::cli
