// Writes synthetic DeepSeek-V4-shaped checkpoints (`expertmesh make-model`): config.json and
// model.safetensors in exactly the released format (FP8 e4m3 linear layers with E8M0 128x128
// block scales, I8-packed FP4 routed experts with E8M0 per-32 scales, BF16/F32 where the
// reference keeps them; see golden/tiny-a), from a preset and a seed, deterministically.
// The weights are random (scaled so activations stay in range), not trained.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model/config.h"

namespace expertmesh::model {

// Preset names WriteModelPreset accepts ("tiny", "tiny-a-shape", ...), with a one-line summary.
struct ModelPreset {
  std::string name;
  std::string summary;
};
std::vector<ModelPreset> ListModelPresets();

// The config of a preset. Errors: InvalidArgument for an unknown preset (lists the known ones).
absl::StatusOr<ModelConfig> PresetConfig(std::string_view preset);

// Writes `out_dir`/config.json and `out_dir`/model.safetensors for `preset` and `seed`. Same
// preset and seed give byte-identical files on every platform (own splitmix64 PRNG, no std::
// distributions). Atomic: written into a temporary sibling directory and renamed, so a crash
// never leaves a half model at `out_dir`. Errors: unknown preset; AlreadyExists if `out_dir`
// exists (the caller decides about --force and removes it first); file-system errors.
// `progress`, if set, receives one line per written part (for big presets).
absl::Status WriteModelPreset(std::string_view preset, uint64_t seed, const std::string& out_dir,
                              void (*progress)(std::string_view line) = nullptr);

// As WriteModelPreset but from an explicit config (tests build odd shapes with it).
absl::Status WriteModel(const ModelConfig& config, uint64_t seed, const std::string& out_dir,
                        void (*progress)(std::string_view line) = nullptr);

}  // namespace expertmesh::model
