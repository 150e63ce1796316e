// `--cluster N` for the CLI's model commands (score, generate): starts a local cluster of a
// router and N expert workers, waits for a placement covering every expert, and hands the
// model a remote expert dispatcher, so that this process runs the attention side (as an
// attention worker does) and every routed expert crosses a process boundary.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "attention-worker/expert_dispatcher.h"
#include "attention-worker/placement_client.h"
#include "cli/local_cluster.h"
#include "core/model/model.h"

namespace expertmesh::cli {

class ClusterExperts {
 public:
  // Starts the cluster for `model_dir` and attaches its experts to `model` (which should be
  // loaded without routed experts). Errors: the cluster's start errors; DeadlineExceeded when
  // no full placement arrives in time.
  static absl::StatusOr<std::unique_ptr<ClusterExperts>> Start(
      model::Model& model, const std::string& model_dir, int expert_workers,
      std::vector<std::string> extra_expert_worker_args = {});
  ~ClusterExperts();  // detaches from the model and stops the cluster

  attention_worker::RemoteExpertDispatcher& dispatcher() { return *dispatcher_; }

 private:
  ClusterExperts() = default;
  model::Model* model_ = nullptr;
  std::unique_ptr<LocalCluster> cluster_;
  std::unique_ptr<attention_worker::PlacementClient> placement_;
  std::unique_ptr<attention_worker::RemoteExpertDispatcher> dispatcher_;
};

// LoadOptions that map no routed expert (the cluster hosts them).
model::LoadOptions WithoutRoutedExperts();

}  // namespace expertmesh::cli
