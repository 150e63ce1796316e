#include "expert-worker/expert_worker_service.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/base/log.h"
#include "core/base/status_macros.h"
#include "core/kernels/matmul.h"
#include "core/model/moe.h"
#include "core/rpc/status.h"

namespace expertmesh::expert_worker {
namespace {

using expertmesh::v1::DispatchRequest;
using expertmesh::v1::DispatchResponse;

using kernels::MatrixBytes;

std::string ExpertName(int layer, int expert) {
  return absl::StrCat("(layer ", layer, ", expert ", expert, ")");
}

DispatchResponse ErrorReply(const DispatchRequest& request, const absl::Status& status) {
  DispatchResponse r;
  r.set_batch_id(request.batch_id());
  r.set_layer(request.layer());
  r.set_code(static_cast<int32_t>(status.code()));
  r.set_message(std::string(status.message()));
  return r;
}

prometheus::Histogram::BucketBoundaries SecondsBuckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
          0.025,  0.05,    0.1,    0.25,  0.5,    1,     2.5};
}

prometheus::Histogram::BucketBoundaries RowsBuckets() {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = 1; v <= 8192; v *= 2) b.push_back(v);
  return b;
}

}  // namespace

ExpertWorkerService::ExpertWorkerService(ExpertWorkerOptions options,
                                         prometheus::Registry& registry)
    : options_(std::move(options)),
      dispatches_(prometheus::BuildCounter()
                      .Name("expertmesh_expert_dispatches_total")
                      .Help("Dispatch batches answered, by result (ok, error).")
                      .Register(registry)),
      dispatches_ok_(dispatches_.Add({{"result", "ok"}})),
      dispatches_error_(dispatches_.Add({{"result", "error"}})),
      tokens_(prometheus::BuildCounter()
                  .Name("expertmesh_expert_tokens_total")
                  .Help("Rows computed per (layer, expert) on this worker.")
                  .Register(registry)),
      dispatch_seconds_(prometheus::BuildHistogram()
                            .Name("expertmesh_expert_dispatch_seconds")
                            .Help("Time to answer one Dispatch batch, from the start of its "
                                  "computation to its reply (including --inject-delay-ms).")
                            .Register(registry)
                            .Add({}, SecondsBuckets())),
      dispatch_rows_(prometheus::BuildHistogram()
                         .Name("expertmesh_expert_dispatch_rows")
                         .Help("Token rows per Dispatch batch (each row once, however many of "
                               "this worker's experts it goes to).")
                         .Register(registry)
                         .Add({}, RowsBuckets())),
      resident_gauge_(prometheus::BuildGauge()
                          .Name("expertmesh_expert_resident_weight_bytes")
                          .Help("Bytes of expert weights (codes and scales) loaded.")
                          .Register(registry)
                          .Add({})),
      loaded_gauge_(prometheus::BuildGauge()
                        .Name("expertmesh_expert_loaded_experts")
                        .Help("(layer, expert) pairs loaded.")
                        .Register(registry)
                        .Add({})),
      draining_gauge_(prometheus::BuildGauge()
                          .Name("expertmesh_expert_draining")
                          .Help("1 while the worker drains (Drain RPC or SIGTERM), else 0.")
                          .Register(registry)
                          .Add({})) {}

absl::StatusOr<std::unique_ptr<ExpertWorkerService>> ExpertWorkerService::Create(
    ExpertWorkerOptions options, prometheus::Registry& registry) {
  std::unique_ptr<ExpertWorkerService> s(new ExpertWorkerService(std::move(options), registry));
  if (!s->options_.model_dir.empty()) {
    auto ckpt = model::Checkpoint::Open(s->options_.model_dir);
    if (!ckpt.ok()) return base::Annotate(ckpt.status(), "--model " + s->options_.model_dir);
    s->checkpoint_ = std::move(*ckpt);
  }
  return s;
}

ExpertWorkerService::~ExpertWorkerService() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (drain_thread_.joinable()) drain_thread_.join();
}

absl::Status ExpertWorkerService::CheckExpertId(const std::string& field, int64_t layer,
                                                int64_t expert) const {
  if (checkpoint_ == nullptr) {
    return absl::FailedPreconditionError(
        "this expert worker has no model (--model is empty): it hosts no experts");
  }
  const model::ModelConfig& c = checkpoint_->config();
  if (layer < 0 || layer >= c.NumBlocks()) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".layer ", layer, " out of range: the model has ", c.NumBlocks(), " blocks (",
        c.num_hidden_layers, " layers + ", c.num_nextn_predict_layers, " MTP)"));
  }
  if (expert < 0 || expert >= c.n_routed_experts) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".expert ", expert,
                                                   " out of range: the model has ",
                                                   c.n_routed_experts, " routed experts"));
  }
  return absl::OkStatus();
}

void ExpertWorkerService::UpdateGauges() {
  resident_gauge_.Set(static_cast<double>(resident_bytes_));
  loaded_gauge_.Set(static_cast<double>(experts_.size()));
}

grpc::Status ExpertWorkerService::LoadExperts(grpc::ServerContext*,
                                              const expertmesh::v1::LoadExpertsRequest* request,
                                              expertmesh::v1::LoadExpertsResponse* response) {
  // Whole request validated first: a bad entry loads nothing.
  for (int i = 0; i < request->experts_size(); ++i) {
    const auto& id = request->experts(i);
    absl::Status s = CheckExpertId(absl::StrCat("experts[", i, "]"), id.layer(), id.expert());
    if (!s.ok()) return rpc::ToGrpcStatus(s);
  }
  absl::MutexLock load_lock(&load_mu_);
  std::vector<Key> wanted;
  {
    absl::MutexLock lock(&mu_);
    if (draining_) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "this expert worker is draining: it loads no more experts");
    }
    for (const auto& id : request->experts()) {
      Key k{static_cast<int>(id.layer()), static_cast<int>(id.expert())};
      if (!experts_.contains(k) && std::find(wanted.begin(), wanted.end(), k) == wanted.end()) {
        wanted.push_back(k);
      }
    }
    if (options_.max_experts > 0 &&
        static_cast<int64_t>(experts_.size() + wanted.size()) > options_.max_experts) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          absl::StrCat("loading ", wanted.size(), " more experts onto the ",
                                       experts_.size(), " loaded would exceed --max-experts ",
                                       options_.max_experts));
    }
  }
  // Read outside mu_ so that dispatches go on while the pages come in.
  std::vector<std::pair<Key, std::shared_ptr<const Loaded>>> fresh;
  for (const Key& k : wanted) {
    auto w = model::LoadExpertWeights(*checkpoint_, k.first, k.second);
    if (!w.ok()) {
      return rpc::ToGrpcStatus(base::Annotate(w.status(), "loading " + ExpertName(k.first, k.second)));
    }
    auto loaded = std::make_shared<Loaded>();
    loaded->weights = *w;
    loaded->bytes = MatrixBytes(w->w1) + MatrixBytes(w->w3) + MatrixBytes(w->w2);
    loaded->tokens = &tokens_.Add(
        {{"layer", std::to_string(k.first)}, {"expert", std::to_string(k.second)}});
    fresh.emplace_back(k, std::move(loaded));
  }
  absl::MutexLock lock(&mu_);
  for (auto& [k, loaded] : fresh) {
    resident_bytes_ += loaded->bytes;
    experts_[k] = std::move(loaded);
  }
  // Versions only grow: a late, older LoadExperts must not make the worker look stale.
  placement_version_ = std::max(placement_version_, request->placement_version());
  UpdateGauges();
  for (const auto& id : request->experts()) *response->add_loaded() = id;
  response->set_resident_bytes(resident_bytes_);
  base::LogInfo("experts loaded", {{"new", static_cast<int64_t>(fresh.size())},
                                   {"loaded", static_cast<int64_t>(experts_.size())},
                                   {"resident_bytes", resident_bytes_},
                                   {"placement_version", placement_version_}});
  return grpc::Status::OK;
}

grpc::Status ExpertWorkerService::UnloadExperts(
    grpc::ServerContext*, const expertmesh::v1::UnloadExpertsRequest* request,
    expertmesh::v1::UnloadExpertsResponse* response) {
  for (int i = 0; i < request->experts_size(); ++i) {
    const auto& id = request->experts(i);
    absl::Status s = CheckExpertId(absl::StrCat("experts[", i, "]"), id.layer(), id.expert());
    if (!s.ok()) return rpc::ToGrpcStatus(s);
  }
  absl::MutexLock lock(&mu_);
  for (const auto& id : request->experts()) {
    auto it = experts_.find(Key{static_cast<int>(id.layer()), static_cast<int>(id.expert())});
    if (it == experts_.end()) continue;  // idempotent
    resident_bytes_ -= it->second->bytes;
    // Dispatches computing with it hold their own reference.
    experts_.erase(it);
  }
  UpdateGauges();
  response->set_resident_bytes(resident_bytes_);
  return grpc::Status::OK;
}

absl::StatusOr<DispatchResponse> ExpertWorkerService::Compute(const DispatchRequest& request) {
  if (checkpoint_ == nullptr) {
    return absl::FailedPreconditionError(
        "this expert worker has no model (--model is empty): it hosts no experts");
  }
  const model::ModelConfig& c = checkpoint_->config();
  const int64_t hidden = c.hidden_size;
  const auto& t = request.tokens();
  if (t.dtype() != expertmesh::v1::DTYPE_F32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokens.dtype must be DTYPE_F32, got ", expertmesh::v1::DType_Name(t.dtype())));
  }
  if (t.shape_size() != 2 || t.shape(1) != hidden || t.shape(0) < 0) {
    std::string shape;
    for (int64_t d : t.shape()) absl::StrAppend(&shape, shape.empty() ? "" : ", ", d);
    return absl::InvalidArgumentError(
        absl::StrCat("tokens.shape must be [n, ", hidden, "], got [", shape, "]"));
  }
  const int64_t n = t.shape(0);
  // Compared by division: n comes off the wire and n * hidden could overflow.
  const uint64_t row_bytes = static_cast<uint64_t>(hidden) * sizeof(float);
  if (t.data().size() % row_bytes != 0 ||
      t.data().size() / row_bytes != static_cast<uint64_t>(n)) {
    return absl::InvalidArgumentError(absl::StrCat("tokens.data has ", t.data().size(),
                                                   " bytes; shape [", n, ", ", hidden,
                                                   "] F32 needs ", n * hidden * 4));
  }
  if (request.output_dtype() != expertmesh::v1::DTYPE_UNSPECIFIED &&
      request.output_dtype() != expertmesh::v1::DTYPE_F32) {
    return absl::InvalidArgumentError(
        absl::StrCat("output_dtype ", expertmesh::v1::DType_Name(request.output_dtype()),
                     " is not supported (F32 only)"));
  }
  if (static_cast<int64_t>(request.layer()) >= c.NumBlocks()) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", request.layer(),
                                                   " out of range: the model has ",
                                                   c.NumBlocks(), " blocks"));
  }
  const int layer = static_cast<int>(request.layer());
  for (int b = 0; b < request.experts_size(); ++b) {
    const auto& eb = request.experts(b);
    if (eb.rows_size() != eb.weights_size()) {
      return absl::InvalidArgumentError(absl::StrCat("experts[", b, "] (expert ", eb.expert(),
                                                     "): ", eb.rows_size(), " rows but ",
                                                     eb.weights_size(), " weights"));
    }
    if (static_cast<int64_t>(eb.expert()) >= c.n_routed_experts) {
      return absl::InvalidArgumentError(absl::StrCat("experts[", b, "].expert ", eb.expert(),
                                                     " out of range: the model has ",
                                                     c.n_routed_experts, " routed experts"));
    }
    for (int i = 0; i < eb.rows_size(); ++i) {
      if (static_cast<int64_t>(eb.rows(i)) >= n) {
        return absl::InvalidArgumentError(absl::StrCat("experts[", b, "] (expert ", eb.expert(),
                                                       ").rows[", i, "] = ", eb.rows(i),
                                                       " but tokens has ", n, " rows"));
      }
    }
  }
  // Snapshot of the experts: an unload during the computation does not pull them away.
  std::vector<std::shared_ptr<const Loaded>> weights(request.experts_size());
  {
    absl::MutexLock lock(&mu_);
    if (drained_) {
      return absl::UnavailableError(
          "this expert worker has drained and is leaving: route with the current placement");
    }
    for (int b = 0; b < request.experts_size(); ++b) {
      const int e = static_cast<int>(request.experts(b).expert());
      auto it = experts_.find(Key{layer, e});
      if (it == experts_.end()) {
        return absl::FailedPreconditionError(
            absl::StrCat("experts[", b, "]: ", ExpertName(layer, e),
                         " is not loaded on this worker (placement version ", placement_version_,
                         "); the batch was routed with placement version ",
                         request.placement_version()));
      }
      weights[b] = it->second;
    }
  }
  DispatchResponse r;
  r.set_batch_id(request.batch_id());
  r.set_layer(request.layer());
  const float* x = reinterpret_cast<const float*>(t.data().data());
  std::vector<float> gathered;
  for (int b = 0; b < request.experts_size(); ++b) {
    const auto& eb = request.experts(b);
    const int64_t m = eb.rows_size();
    auto* out = r.add_outputs();
    out->set_expert(eb.expert());
    out->mutable_outputs()->set_dtype(expertmesh::v1::DTYPE_F32);
    out->mutable_outputs()->add_shape(m);
    out->mutable_outputs()->add_shape(hidden);
    std::string* data = out->mutable_outputs()->mutable_data();
    data->resize(static_cast<size_t>(m * hidden) * sizeof(float));
    if (m == 0) continue;
    // All of an expert's rows in one RunExpert call, exactly as the local engine does.
    gathered.resize(static_cast<size_t>(m * hidden));
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(gathered.data() + i * hidden, x + static_cast<int64_t>(eb.rows(i)) * hidden,
                  hidden * sizeof(float));
    }
    model::RunExpert(weights[b]->weights, c.swiglu_limit, gathered.data(), m,
                     eb.weights().data(), reinterpret_cast<float*>(data->data()));
    weights[b]->tokens->Increment(static_cast<double>(m));
  }
  return r;
}

DispatchResponse ExpertWorkerService::Serve(const DispatchRequest& request, absl::Time received,
                                            const std::function<bool()>& cancelled) {
  const absl::Time start = absl::Now();
  absl::StatusOr<DispatchResponse> r = Compute(request);
  if (options_.inject_delay > absl::ZeroDuration()) {
    const absl::Time until = received + options_.inject_delay;
    while (absl::Now() < until && !(cancelled && cancelled())) {
      absl::SleepFor(std::min(until - absl::Now(), absl::Milliseconds(5)));
    }
  }
  const absl::Duration took = absl::Now() - start;
  if (!r.ok()) {
    dispatches_error_.Increment();
    return ErrorReply(request, r.status());
  }
  dispatches_ok_.Increment();
  dispatch_seconds_.Observe(absl::ToDoubleSeconds(took));
  dispatch_rows_.Observe(request.tokens().shape_size() == 2
                             ? static_cast<double>(request.tokens().shape(0))
                             : 0.0);
  r->set_compute_us(static_cast<uint64_t>(absl::ToInt64Microseconds(took)));
  return *std::move(r);
}

grpc::Status ExpertWorkerService::Dispatch(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<DispatchResponse, DispatchRequest>* stream) {
  // This thread reads while a second one computes and writes, so that the next request is
  // taken in while one computes and injected delays of pipelined requests overlap. gRPC allows
  // one reader and one writer at a time on a stream.
  struct Pending {
    DispatchRequest request;
    absl::Time received;
  };
  absl::Mutex mu;
  std::deque<Pending> queue;
  bool reading_done = false;
  std::thread writer([&] {
    auto cancelled = [context] { return context->IsCancelled(); };
    while (true) {
      Pending p;
      {
        absl::MutexLock lock(&mu);
        auto ready = [&]() { return !queue.empty() || reading_done; };
        mu.Await(absl::Condition(&ready));
        if (queue.empty()) return;
        p = std::move(queue.front());
        queue.pop_front();
      }
      DispatchResponse r = Serve(p.request, p.received, cancelled);
      // A failed write means the call is over; the reader sees that too and ends the loop.
      stream->Write(r);
    }
  });
  DispatchRequest request;
  while (stream->Read(&request)) {
    absl::MutexLock lock(&mu);
    queue.push_back(Pending{std::move(request), absl::Now()});
    request = DispatchRequest();
  }
  {
    absl::MutexLock lock(&mu);
    reading_done = true;
  }
  writer.join();
  return grpc::Status::OK;
}

rpc::HostedExperts ExpertWorkerService::Hosted() const {
  rpc::HostedExperts h;
  absl::MutexLock lock(&mu_);
  std::vector<Key> keys;
  keys.reserve(experts_.size());
  for (const auto& [k, v] : experts_) keys.push_back(k);
  std::sort(keys.begin(), keys.end());
  for (const Key& k : keys) {
    expertmesh::v1::ExpertId id;
    id.set_layer(k.first);
    id.set_expert(k.second);
    h.experts.push_back(std::move(id));
  }
  h.placement_version = placement_version_;
  return h;
}

uint64_t ExpertWorkerService::resident_bytes() const {
  absl::MutexLock lock(&mu_);
  return resident_bytes_;
}

bool ExpertWorkerService::draining() const {
  absl::MutexLock lock(&mu_);
  return draining_;
}

bool ExpertWorkerService::drained() const {
  absl::MutexLock lock(&mu_);
  return drained_;
}

int ExpertWorkerService::StartDrain(absl::Duration grace) {
  if (grace <= absl::ZeroDuration()) grace = options_.drain_timeout;
  int loaded = 0;
  {
    absl::MutexLock lock(&mu_);
    loaded = static_cast<int>(experts_.size());
    if (draining_) return loaded;
    draining_ = true;
    draining_gauge_.Set(1);
    drain_thread_ = std::thread([this, grace] { DrainLoop(grace); });
  }
  base::LogInfo("draining", {{"loaded_experts", loaded},
                             {"grace_ms", absl::ToInt64Milliseconds(grace)}});
  if (options_.announce_draining) options_.announce_draining(true);
  return loaded;
}

void ExpertWorkerService::DrainLoop(absl::Duration grace) {
  const absl::Time deadline = absl::Now() + grace;
  std::string why = "timeout";
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      // Holding nothing, nobody can be routing here.
      if (experts_.empty()) {
        why = "nothing loaded";
        break;
      }
    }
    if (!options_.router_drained) {
      why = "no router to wait for";
      break;
    }
    if (options_.router_drained()) {
      why = "router reports no attention worker routes here";
      break;
    }
    if (absl::Now() >= deadline) break;
    absl::MutexLock lock(&mu_);
    auto stop = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stopping_; };
    mu_.AwaitWithTimeout(absl::Condition(&stop), absl::Milliseconds(20));
  }
  {
    absl::MutexLock lock(&mu_);
    experts_.clear();
    resident_bytes_ = 0;
    drained_ = true;
    UpdateGauges();
  }
  base::LogInfo("drained; experts unloaded", {{"why", why}});
  if (options_.on_drained) options_.on_drained();
}

void ExpertWorkerService::DrainAndWait() {
  StartDrain();
  absl::MutexLock lock(&mu_);
  auto over = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return drained_ || stopping_; };
  mu_.Await(absl::Condition(&over));
}

grpc::Status ExpertWorkerService::Drain(grpc::ServerContext*,
                                        const expertmesh::v1::ExpertDrainRequest* request,
                                        expertmesh::v1::ExpertDrainResponse* response) {
  response->set_loaded_experts(
      static_cast<uint32_t>(StartDrain(absl::Milliseconds(request->grace_ms()))));
  return grpc::Status::OK;
}

grpc::Status ExpertWorkerService::GetStatus(grpc::ServerContext*,
                                            const expertmesh::v1::ExpertStatusRequest*,
                                            expertmesh::v1::ExpertStatusResponse* response) {
  rpc::HostedExperts h = Hosted();
  response->set_worker_id(worker_id());
  for (auto& e : h.experts) *response->add_experts() = std::move(e);
  response->set_placement_version(h.placement_version);
  response->set_resident_bytes(resident_bytes());
  response->set_model_dir(options_.model_dir);
  response->set_draining(draining());
  response->set_kernel_target(std::string(kernels::ActiveKernelTargetName()));
  return grpc::Status::OK;
}

}  // namespace expertmesh::expert_worker
