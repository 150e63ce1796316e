// `expertmesh score`: teacher-forced logits for input ids in the golden's layout
// (core/engine/score.h).
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "core/engine/score.h"
#include "core/kernels/matmul.h"
#include "core/model/model.h"
#include "core/rpc/service_flags.h"
#include "core/rpc/service_process.h"

namespace expertmesh::cli {

int RunScore(int argc, char** argv) {
  std::string model_dir, input, out;
  int64_t prefill = 0, threads = 0, chunk = 0;
  bool mtp = false;
  rpc::FlagSet flags(
      "expertmesh score --model DIR --input IN.safetensors --prefill N --out OUT.safetensors "
      "[--mtp] [--threads T] [--chunk C]",
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
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv, "expertmesh score: "); rc >= 0) return rc;
  if (model_dir.empty() || input.empty() || out.empty() || prefill <= 0) {
    std::fprintf(stderr,
                 "expertmesh score: --model, --input, --out and --prefill N > 0 are "
                 "required; see --help\n");
    return 2;
  }
  kernels::SetKernelThreads(static_cast<int>(threads));
  auto m = model::Model::Load(model_dir);
  if (!m.ok()) {
    std::fprintf(stderr, "expertmesh score: %s\n", std::string(m.status().message()).c_str());
    return 1;
  }
  engine::ScoreOptions o;
  o.prefill = prefill;
  o.chunk = chunk;
  o.mtp = mtp;
  o.progress = [](const std::string& line) { std::fprintf(stderr, "score: %s\n", line.c_str()); };
  absl::Status s = engine::ScoreFile(**m, input, out, o);
  if (!s.ok()) {
    std::fprintf(stderr, "expertmesh score: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace expertmesh::cli
