#include "tests/testing/tiny_cluster.h"

#include <cstdlib>

#include "absl/status/status.h"

namespace expertmesh::testing {

absl::StatusOr<std::string> MakeTinyModel(const std::string& dir) {
  const std::string model = dir + "/tiny";
  const std::string cmd = std::string(EM_BINARY_DIR) + "/cli/expertmesh make-model --preset tiny " +
                          "--seed 0 --out '" + model + "' > '" + dir + "/make-model.log' 2>&1";
  if (std::system(cmd.c_str()) != 0) return absl::InternalError("failed: " + cmd);
  return model;
}

cli::LocalClusterOptions TinyGatewayClusterOptions(const std::string& model_dir) {
  cli::LocalClusterOptions o;
  o.model_dir = model_dir;
  o.attention_workers = 1;
  o.expert_workers = 1;
  o.with_gateway = true;
  o.http_port = 0;
  o.base_port = 0;
  o.quiet = true;
  return o;
}

absl::StatusOr<std::unique_ptr<cli::LocalCluster>> StartTinyGatewayCluster(
    const std::string& dir, const std::vector<std::string>& extra_gateway_args) {
  absl::StatusOr<std::string> model = MakeTinyModel(dir);
  if (!model.ok()) return model.status();
  cli::LocalClusterOptions o = TinyGatewayClusterOptions(*model);
  o.extra_gateway_args = extra_gateway_args;
  return cli::LocalCluster::Start(o);
}

}  // namespace expertmesh::testing
