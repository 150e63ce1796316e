// The cluster the gateway's end-to-end tests run against: the tiny model made fresh by the CLI
// and a local cluster with a gateway on it.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cli/local_cluster.h"

namespace expertmesh::testing {

// Makes the tiny model (`expertmesh make-model --preset tiny --seed 0`) as `dir`/tiny, its log in
// `dir`/make-model.log; returns the model's directory.
absl::StatusOr<std::string> MakeTinyModel(const std::string& dir);

// One attention worker, one expert worker, the kv-store and a gateway on `model_dir`, every port
// picked freely, quiet.
cli::LocalClusterOptions TinyGatewayClusterOptions(const std::string& model_dir);

// Both: the tiny model under `dir` and that cluster on it; `extra_gateway_args` go to the
// gateway.
absl::StatusOr<std::unique_ptr<cli::LocalCluster>> StartTinyGatewayCluster(
    const std::string& dir, const std::vector<std::string>& extra_gateway_args = {});

}  // namespace expertmesh::testing
