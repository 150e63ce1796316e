#include "gateway/model_info.h"

#include <sys/stat.h>

#include <algorithm>
#include <limits>

#include "core/base/status_macros.h"

namespace expertmesh::gateway {

absl::StatusOr<ModelInfo> LoadModelInfo(const std::string& dir, const std::string& name) {
  EM_ASSIGN_OR_RETURN(model::ModelConfig config, model::LoadModelConfig(dir));
  ModelInfo info;
  info.dir = dir;
  info.id = name;
  if (info.id.empty()) {
    std::string trimmed = dir;
    while (trimmed.size() > 1 && trimmed.back() == '/') trimmed.pop_back();
    size_t slash = trimmed.rfind('/');
    info.id = slash == std::string::npos ? trimmed : trimmed.substr(slash + 1);
  }
  // The API fields are 32-bit; a larger value cannot be meant literally, so it saturates.
  auto u32 = [](int64_t v) {
    return static_cast<uint32_t>(
        std::clamp<int64_t>(v, 0, std::numeric_limits<uint32_t>::max()));
  };
  info.context_length = u32(config.max_position_embeddings);
  info.vocab_size = u32(config.vocab_size);
  info.config = std::move(config);
  const std::string path = dir + "/config.json";
  struct stat st;
  if (stat(path.c_str(), &st) == 0) info.created = static_cast<int64_t>(st.st_mtime);
  return info;
}

absl::Status AddModelAliases(const std::vector<std::string>& flags, ModelInfo* model) {
  for (const std::string& f : flags) {
    const size_t eq = f.find('=');
    if (eq == std::string::npos || eq == 0) {
      return absl::InvalidArgumentError("--model-alias '" + f + "': expected NAME=MODEL");
    }
    const std::string target = f.substr(eq + 1);
    if (target != model->id) {
      return absl::InvalidArgumentError("--model-alias '" + f + "': '" + target +
                                        "' is not the served model '" + model->id + "'");
    }
    model->aliases.push_back(f.substr(0, eq));
  }
  return absl::OkStatus();
}

}  // namespace expertmesh::gateway
