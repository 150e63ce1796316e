#include "gateway/model_info.h"

#include <sys/stat.h>

#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace expertmesh::gateway {

absl::StatusOr<ModelInfo> LoadModelInfo(const std::string& dir, const std::string& name) {
  const std::string path = dir + "/config.json";
  EM_ASSIGN_OR_RETURN(std::string text, base::ReadFileToString(path));
  nlohmann::json config = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!config.is_object()) return absl::InvalidArgumentError(path + " is not a JSON object");
  ModelInfo info;
  info.dir = dir;
  info.id = name;
  if (info.id.empty()) {
    std::string trimmed = dir;
    while (trimmed.size() > 1 && trimmed.back() == '/') trimmed.pop_back();
    size_t slash = trimmed.rfind('/');
    info.id = slash == std::string::npos ? trimmed : trimmed.substr(slash + 1);
  }
  auto u32 = [&](const char* key) -> uint32_t {
    auto it = config.find(key);
    return it != config.end() && it->is_number_unsigned() ? it->get<uint32_t>() : 0;
  };
  info.context_length = u32("max_position_embeddings");
  info.vocab_size = u32("vocab_size");
  struct stat st;
  if (stat(path.c_str(), &st) == 0) info.created = static_cast<int64_t>(st.st_mtime);
  return info;
}

}  // namespace expertmesh::gateway
