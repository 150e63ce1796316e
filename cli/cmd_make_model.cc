// `expertmesh make-model`: writes a DeepSeek-V4-shaped checkpoint (config.json +
// model.safetensors) from a preset and a seed, deterministically (core/model/model_maker.h).
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "core/model/model_maker.h"
#include "core/base/flags.h"
#include "core/rpc/service_process.h"

namespace expertmesh::cli {
namespace {

namespace fs = std::filesystem;

void PrintProgress(std::string_view line) {
  std::fprintf(stderr, "make-model: %s\n", std::string(line).c_str());
}

// --force replaces only what looks like a model directory (or an empty one): a mistyped --out
// must never delete unrelated data.
bool LooksLikeModelDir(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return false;
  if (fs::is_empty(dir, ec)) return true;
  for (const char* name : {"config.json", "model.safetensors", "model.safetensors.index.json"}) {
    if (fs::exists(dir + "/" + name, ec)) return true;
  }
  return false;
}

}  // namespace

int RunMakeModel(int argc, char** argv) {
  std::string preset = "tiny";
  std::string out;
  int64_t seed = 0;
  bool force = false;
  std::string summary =
      "Writes a DeepSeek-V4-shaped checkpoint (config.json + model.safetensors, FP8/FP4 weights "
      "in the released format) from a preset and a seed. The same preset and seed always give "
      "the same bytes. The weights are random, not trained.\n\npresets:";
  for (const model::ModelPreset& p : model::ListModelPresets()) {
    absl::StrAppend(&summary, "\n  ", p.name, ": ", p.summary);
  }
  base::FlagSet flags("expertmesh make-model --out DIR [--preset NAME] [--seed N] [--force]",
                     summary);
  flags.AddString("preset", &preset, "model preset (see the list above)");
  flags.AddInt("seed", &seed, "random seed (>= 0)");
  flags.AddString("out", &out, "output directory (created; must not exist unless --force)");
  flags.AddBool("force", &force, "replace an existing model directory at --out");
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv, "expertmesh make-model: "); rc >= 0)
    return rc;
  if (out.empty()) {
    std::fprintf(stderr, "expertmesh make-model: --out DIR is required; see --help\n");
    return 2;
  }
  if (seed < 0) {
    std::fprintf(stderr, "expertmesh make-model: --seed must be >= 0\n");
    return 2;
  }
  if (auto config = model::PresetConfig(preset); !config.ok()) {
    std::fprintf(stderr, "expertmesh make-model: %s\n",
                 std::string(config.status().message()).c_str());
    return 2;
  }
  while (out.size() > 1 && out.back() == '/') out.pop_back();

  std::error_code ec;
  const bool exists = fs::exists(out, ec);
  if (exists && !force) {
    std::fprintf(stderr, "expertmesh make-model: %s already exists; pass --force to replace it\n",
                 out.c_str());
    return 1;
  }
  if (exists && !LooksLikeModelDir(out)) {
    std::fprintf(stderr,
                 "expertmesh make-model: %s is not a model directory (no config.json or "
                 "model.safetensors) and not empty; refusing to replace it even with --force\n",
                 out.c_str());
    return 1;
  }

  // Without --force the maker writes straight to `out` (atomically). With it, the new model is
  // written beside the old one and swapped in, so a failure keeps the old model.
  const std::string target = exists ? absl::StrCat(out, ".new-", ::getpid()) : out;
  absl::Status made =
      model::WriteModelPreset(preset, static_cast<uint64_t>(seed), target, PrintProgress);
  if (!made.ok()) {
    std::fprintf(stderr, "expertmesh make-model: %s\n", std::string(made.message()).c_str());
    return 1;
  }
  if (exists) {
    const std::string old = absl::StrCat(out, ".old-", ::getpid());
    fs::rename(out, old, ec);
    if (!ec) fs::rename(target, out, ec);
    if (ec) {
      std::fprintf(stderr, "expertmesh make-model: replacing %s: %s (new model left at %s)\n",
                   out.c_str(), ec.message().c_str(), target.c_str());
      return 1;
    }
    fs::remove_all(old, ec);
  }
  const auto bytes = fs::file_size(out + "/model.safetensors", ec);
  std::printf("wrote %s (preset %s, seed %lld, model.safetensors %.1f MiB)\n", out.c_str(),
              preset.c_str(), static_cast<long long>(seed),
              ec ? 0.0 : static_cast<double>(bytes) / (1 << 20));
  return 0;
}

}  // namespace expertmesh::cli
