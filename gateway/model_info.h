// The model the gateway serves, as listed by /v1/models and Gateway.Models: its id and what
// config.json says about it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/config.h"

namespace expertmesh::gateway {

struct ModelInfo {
  std::string id;               // name clients use in requests
  std::string dir;              // model directory
  int64_t created = 0;          // config.json's modification time (unix seconds)
  uint32_t context_length = 0;  // max_position_embeddings (0 if absent)
  uint32_t vocab_size = 0;      // vocab_size
  model::ModelConfig config;    // the whole parsed config.json
  // Other names requests may use for this model (`--model-alias`); "*" = any name.
  std::vector<std::string> aliases;
};

// Adds `--model-alias` values (`NAME=MODEL`, MODEL being the served id; NAME `*` = any name) to
// `model`. Errors: InvalidArgument naming the value at fault.
absl::Status AddModelAliases(const std::vector<std::string>& flags, ModelInfo* model);

// Reads `dir`/config.json with the model's parser (em_config; no kernels), so the gateway
// refuses at start a config the workers would refuse. `name` empty = the directory's base name.
// Errors: NotFound (no config.json), InvalidArgument naming the file and the key at fault.
absl::StatusOr<ModelInfo> LoadModelInfo(const std::string& dir, const std::string& name);

}  // namespace expertmesh::gateway
