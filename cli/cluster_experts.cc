#include "cli/cluster_experts.h"

#include "core/base/status_macros.h"

namespace expertmesh::cli {

model::LoadOptions WithoutRoutedExperts() {
  model::LoadOptions lo;
  lo.load_expert = [](int, int) { return false; };
  return lo;
}

absl::StatusOr<std::unique_ptr<ClusterExperts>> ClusterExperts::Start(
    model::Model& model, const std::string& model_dir, int expert_workers,
    std::vector<std::string> extra_expert_worker_args) {
  if (expert_workers < 1) {
    return absl::InvalidArgumentError("--cluster: need at least 1 expert worker");
  }
  std::unique_ptr<ClusterExperts> c(new ClusterExperts());
  LocalClusterOptions o = SmallClusterOptions(model_dir, 0, expert_workers);
  o.extra_expert_worker_args = std::move(extra_expert_worker_args);
  EM_ASSIGN_OR_RETURN(c->cluster_, LocalCluster::Start(o));
  c->placement_ = std::make_unique<attention_worker::PlacementClient>(c->cluster_->router_address());
  std::vector<attention_worker::ExpertKey> needed;
  const model::ModelConfig& cfg = model.config();
  for (const model::BlockWeights& b : model.weights().layers) {
    for (int e = 0; e < cfg.n_routed_experts; ++e) needed.push_back({b.block, e});
  }
  for (const model::MtpWeights& m : model.weights().mtp) {
    for (int e = 0; e < cfg.n_routed_experts; ++e) needed.push_back({m.block.block, e});
  }
  EM_RETURN_IF_ERROR(c->placement_->WaitForPlacement(absl::Seconds(120), needed));
  c->dispatcher_ = std::make_unique<attention_worker::RemoteExpertDispatcher>(c->placement_.get());
  c->model_ = &model;
  model.set_expert_dispatcher(c->dispatcher_.get());
  return c;
}

ClusterExperts::~ClusterExperts() {
  if (model_ != nullptr) model_->set_expert_dispatcher(nullptr);
  dispatcher_.reset();
  placement_.reset();
  cluster_.reset();
}

}  // namespace expertmesh::cli
