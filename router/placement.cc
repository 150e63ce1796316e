#include "router/placement.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <sstream>
#include <thread>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "core/base/log.h"
#include "core/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace expertmesh::router {
namespace {

using nlohmann::json;

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Parses one worker reference of the placement file.
absl::StatusOr<WorkerRef> ParseWorkerRef(const json& v, const std::string& where) {
  WorkerRef ref;
  if (v.is_string() && !v.get<std::string>().empty()) {
    ref.address = v.get<std::string>();
  } else if (v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() < (1 << 20)) {
    ref.ordinal = static_cast<int>(v.get<int64_t>());
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": each of 'workers' must be an address string or an expert worker ordinal >= 0, got ",
        v.dump()));
  }
  return ref;
}

absl::StatusOr<std::vector<int>> ParseIndexList(const json& entry, const char* one,
                                                const char* many, int limit, bool star_ok,
                                                const std::string& where) {
  std::vector<int> out;
  auto add = [&](const json& v, const char* field) -> absl::Status {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= limit) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": '", field, "' must be an integer in [0, ",
                                                     limit, "), got ", v.dump()));
    }
    out.push_back(static_cast<int>(v.get<int64_t>()));
    return absl::OkStatus();
  };
  const bool has_one = entry.contains(one), has_many = many != nullptr && entry.contains(many);
  if (has_one == has_many) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": give exactly one of '", one, "'",
                                                   many ? absl::StrCat(" or '", many, "'") : ""));
  }
  if (has_one) {
    const json& v = entry.at(one);
    if (star_ok && v.is_string() && v.get<std::string>() == "*") {
      for (int i = 0; i < limit; ++i) out.push_back(i);
      return out;
    }
    if (absl::Status s = add(v, one); !s.ok()) return s;
    return out;
  }
  const json& list = entry.at(many);
  if (!list.is_array() || list.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": '", many, "' must be a non-empty array"));
  }
  for (const json& v : list) {
    if (absl::Status s = add(v, many); !s.ok()) return s;
  }
  return out;
}

}  // namespace

std::string KeyName(const ExpertKey& key) {
  return absl::StrCat("(layer ", key.layer, ", expert ", key.expert, ")");
}

std::vector<ExpertKey> ModelShape::Keys() const {
  std::vector<ExpertKey> keys;
  keys.reserve(static_cast<size_t>(total_layers()) * static_cast<size_t>(experts));
  for (int l = 0; l < total_layers(); ++l) {
    for (int e = 0; e < experts; ++e) keys.push_back({static_cast<uint32_t>(l), static_cast<uint32_t>(e)});
  }
  return keys;
}

ModelShape ShapeFromConfig(const model::ModelConfig& config) {
  ModelShape shape;
  shape.trunk_layers = config.num_hidden_layers;
  shape.mtp_layers = config.num_nextn_predict_layers;
  shape.experts = config.n_routed_experts;
  // Three [hidden x inter] matrices per expert; fp4 weights carry one e8m0 scale per 32, fp8
  // ones a block scale per 128x128 (negligible). Only used to turn memory into a count cap.
  const double bytes_per_weight =
      config.expert_dtype == model::ExpertDType::kFP4 ? 0.5 + 1.0 / 32 : 1.0;
  shape.expert_bytes = static_cast<uint64_t>(3.0 * static_cast<double>(config.hidden_size) *
                                             static_cast<double>(config.moe_intermediate_size) *
                                             bytes_per_weight);
  return shape;
}

absl::StatusOr<ModelShape> ParseModelShape(std::string_view config_json) {
  absl::StatusOr<model::ModelConfig> config = model::ParseModelConfig(config_json);
  if (!config.ok()) return base::Annotate(config.status(), "config.json");
  return ShapeFromConfig(*config);
}

absl::StatusOr<ModelShape> ReadModelShape(const std::string& model_dir) {
  EM_ASSIGN_OR_RETURN(model::ModelConfig config, model::LoadModelConfig(model_dir));
  return ShapeFromConfig(config);
}

bool WorkerRef::Matches(std::string_view worker_address, int worker_ordinal) const {
  return address.empty() ? ordinal == worker_ordinal : address == worker_address;
}

absl::StatusOr<PinnedPlacement> ParsePinnedPlacement(std::string_view text,
                                                     const ModelShape& shape) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("placement") ||
      !j["placement"].is_array()) {
    return absl::InvalidArgumentError(
        "placement file: expected a JSON object {\"placement\": [ ... ]}");
  }
  PinnedPlacement pinned;
  const json& entries = j["placement"];
  for (size_t i = 0; i < entries.size(); ++i) {
    const json& entry = entries[i];
    const std::string where = absl::StrCat("placement file: entry ", i);
    if (!entry.is_object()) return absl::InvalidArgumentError(where + ": not an object");
    for (auto it = entry.begin(); it != entry.end(); ++it) {
      if (it.key() != "layer" && it.key() != "expert" && it.key() != "experts" &&
          it.key() != "workers") {
        return absl::InvalidArgumentError(absl::StrCat(where, ": unknown key '", it.key(), "'"));
      }
    }
    auto layers = ParseIndexList(entry, "layer", nullptr, shape.total_layers(), true, where);
    if (!layers.ok()) return layers.status();
    auto experts = ParseIndexList(entry, "expert", "experts", shape.experts, false, where);
    if (!experts.ok()) return experts.status();
    if (!entry.contains("workers") || !entry["workers"].is_array() || entry["workers"].empty()) {
      return absl::InvalidArgumentError(where + ": 'workers' must be a non-empty array");
    }
    std::vector<WorkerRef> refs;
    for (const json& w : entry["workers"]) {
      auto ref = ParseWorkerRef(w, where);
      if (!ref.ok()) return ref.status();
      refs.push_back(*ref);
    }
    for (int l : *layers) {
      for (int e : *experts) {
        ExpertKey key{static_cast<uint32_t>(l), static_cast<uint32_t>(e)};
        if (!pinned.emplace(key, refs).second) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, ": ", KeyName(key), " is pinned by an earlier entry too"));
        }
      }
    }
  }
  return pinned;
}

absl::StatusOr<PinnedPlacement> ReadPinnedPlacement(const std::string& path,
                                                    const ModelShape& shape) {
  auto text = ReadWholeFile(path);
  if (!text.ok()) return text.status();
  auto pinned = ParsePinnedPlacement(*text, shape);
  if (!pinned.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", pinned.status().message()));
  return pinned;
}

Assignment ComputePlacement(const PlacementInput& in) {
  Assignment out;
  std::map<uint64_t, size_t> load;
  std::map<uint64_t, std::map<uint32_t, size_t>> layer_load;
  std::map<uint64_t, std::set<ExpertKey>> movable;
  for (const auto& [id, cap] : in.caps) load[id] = 0;
  const size_t r = std::min(static_cast<size_t>(std::max(in.replicas, 1)), in.caps.size());
  auto eligible = [&](uint64_t id) { return in.caps.count(id) > 0; };
  auto holds = [](const std::vector<uint64_t>& ids, uint64_t id) {
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  };
  auto add = [&](const ExpertKey& key, uint64_t id, bool is_movable) {
    out[key].push_back(id);
    load[id]++;
    layer_load[id][key.layer]++;
    if (is_movable) movable[id].insert(key);
  };

  // Keep what is pinned and what is placed already.
  for (const ExpertKey& key : in.keys) {
    out[key];
    if (auto p = in.pinned.find(key); p != in.pinned.end()) {
      for (uint64_t id : p->second) {
        if (eligible(id) && !holds(out[key], id)) add(key, id, /*is_movable=*/false);
      }
      continue;
    }
    auto c = in.current.find(key);
    if (c == in.current.end()) continue;
    for (uint64_t id : c->second) {
      if (out[key].size() >= r) break;
      if (eligible(id) && !holds(out[key], id) && load[id] < in.caps.at(id)) add(key, id, true);
    }
  }

  // Missing replicas: a worker that holds the expert already costs no load; then the least
  // loaded, and the one with the fewest experts of this layer so that a layer's experts spread
  // over workers (one dispatch per worker per layer runs them in parallel).
  for (const ExpertKey& key : in.keys) {
    if (in.pinned.count(key)) continue;
    while (out[key].size() < r) {
      std::optional<std::tuple<int, size_t, size_t, uint64_t>> best;
      for (const auto& [id, cap] : in.caps) {
        if (load[id] >= cap || holds(out[key], id)) continue;
        auto h = in.held.find(id);
        const bool cached = h != in.held.end() && h->second.count(key) > 0;
        auto candidate = std::make_tuple(cached ? 0 : 1, load[id], layer_load[id][key.layer], id);
        if (!best || candidate < *best) best = candidate;
      }
      if (!best) break;  // every worker is full or holds it: under-replicated
      add(key, std::get<3>(*best), true);
    }
  }

  // Balance: move one expert at a time from the most to the least loaded worker until every
  // worker is within one of the others, so that a joining worker takes a fair share and nothing
  // else moves.
  while (true) {
    std::vector<uint64_t> by_load;
    for (const auto& [id, n] : load) by_load.push_back(id);
    std::stable_sort(by_load.begin(), by_load.end(),
                     [&](uint64_t a, uint64_t b) { return load[a] < load[b]; });
    bool moved = false;
    for (auto donor = by_load.rbegin(); donor != by_load.rend() && !moved; ++donor) {
      for (uint64_t receiver : by_load) {
        if (load[receiver] + 1 >= load[*donor]) break;
        if (load[receiver] >= in.caps.at(receiver)) continue;
        // The layer where the donor has the most more than the receiver first.
        std::vector<std::pair<int64_t, uint32_t>> layers;
        for (const auto& [layer, n] : layer_load[*donor]) {
          layers.push_back({static_cast<int64_t>(layer_load[receiver][layer]) - static_cast<int64_t>(n), layer});
        }
        std::sort(layers.begin(), layers.end());
        std::optional<ExpertKey> pick;
        // An expert the receiver still holds moves without a load.
        if (auto h = in.held.find(receiver); h != in.held.end()) {
          for (const ExpertKey& key : h->second) {
            if (movable[*donor].count(key) && !holds(out[key], receiver)) {
              pick = key;
              break;
            }
          }
        }
        for (const auto& [diff, layer] : layers) {
          if (pick) break;
          const std::set<ExpertKey>& mine = movable[*donor];
          for (auto it = mine.lower_bound({layer, 0}); it != mine.end() && it->layer == layer; ++it) {
            if (!holds(out[*it], receiver)) {
              pick = *it;
              break;
            }
          }
          if (pick) break;
        }
        if (!pick) continue;
        std::vector<uint64_t>& ids = out[*pick];
        *std::find(ids.begin(), ids.end(), *donor) = receiver;
        load[*donor]--;
        layer_load[*donor][pick->layer]--;
        movable[*donor].erase(*pick);
        load[receiver]++;
        layer_load[receiver][pick->layer]++;
        movable[receiver].insert(*pick);
        moved = true;
        break;
      }
    }
    if (!moved) break;
  }

  // Preferred replica first. An attention worker sends an expert's rows to the first listed
  // replica, so if every list started with the same worker (the fill above picks the lowest
  // id on ties) the other replicas would only ever serve retries. Spread the first place over
  // the holders, per layer first (one dispatch per worker per layer runs in parallel), then
  // overall. Pinned lists keep the order their file gave.
  std::map<uint64_t, std::map<uint32_t, size_t>> first_in_layer;
  std::map<uint64_t, size_t> first;
  for (const ExpertKey& key : in.keys) {
    std::vector<uint64_t>& ids = out[key];
    if (ids.empty()) continue;
    if (ids.size() > 1 && !in.pinned.count(key)) {
      size_t best = 0;
      for (size_t i = 1; i < ids.size(); ++i) {
        const auto rank = [&](uint64_t id) {
          return std::make_pair(first_in_layer[id][key.layer], first[id]);
        };
        if (rank(ids[i]) < rank(ids[best])) best = i;
      }
      std::rotate(ids.begin(), ids.begin() + best, ids.begin() + best + 1);
    }
    first_in_layer[ids[0]][key.layer]++;
    first[ids[0]]++;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

PlacementManager::PlacementManager(PlacementOptions options, const base::Clock& clock,
                                   ExpertLoader& loader)
    : options_(std::move(options)),
      keys_(options_.shape.Keys()),
      clock_(clock),
      loader_(loader),
      started_(clock.Now()) {
  version_floor_ = options_.restored_version;
  restarted_ = options_.restored_version > 0;
  for (const ExpertKey& key : keys_) assignment_[key];
  table_ = std::make_shared<expertmesh::v1::PlacementTable>();
}

void PlacementManager::SetListener(Listener listener) {
  absl::MutexLock lock(&mu_);
  listener_ = std::move(listener);
}

std::shared_ptr<const expertmesh::v1::PlacementTable> PlacementManager::table() const {
  absl::MutexLock lock(&mu_);
  return table_;
}

uint64_t PlacementManager::version() const {
  absl::MutexLock lock(&mu_);
  return table_->version();
}

void PlacementManager::Wake() {
  absl::MutexLock lock(&mu_);
  work_ = true;
}

void PlacementManager::WaitForWork(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&work_), timeout);
}

void PlacementManager::AddWorker(const WorkerSpec& spec) {
  absl::MutexLock lock(&mu_);
  Worker w;
  w.kind = spec.kind;
  w.address = spec.address;
  if (spec.kind == expertmesh::v1::WORKER_KIND_ATTENTION) {
    workers_[spec.id] = std::move(w);
    work_ = true;
    return;
  }
  if (spec.kind != expertmesh::v1::WORKER_KIND_EXPERT) return;
  w.ordinal = ordinals_.emplace(spec.address, static_cast<int>(ordinals_.size())).first->second;
  last_expert_registration_ = clock_.Now();
  size_t cap = std::numeric_limits<size_t>::max();
  if (spec.capacity.max_experts() > 0) cap = spec.capacity.max_experts();
  if (spec.capacity.memory_bytes() > 0 && options_.shape.expert_bytes > 0) {
    cap = std::min<size_t>(cap, spec.capacity.memory_bytes() / options_.shape.expert_bytes);
  }
  w.cap = cap;
  w.kernel_target = spec.kernel_target;
  if (!cluster_target_) cluster_target_ = spec.kernel_target;
  w.target_ok = spec.kernel_target == *cluster_target_;
  if (!w.target_ok) {
    base::LogWarning(
        "expert worker's kernel target differs from the cluster's; no experts are placed on it",
        {{"worker_id", spec.id},
         {"address", spec.address},
         {"kernel_target", spec.kernel_target},
         {"cluster_kernel_target", *cluster_target_}});
  }
  for (const ExpertKey& key : spec.hosted) {
    if (key.layer >= static_cast<uint32_t>(options_.shape.total_layers()) ||
        key.expert >= static_cast<uint32_t>(options_.shape.experts)) {
      base::LogWarning("worker reports a hosted expert outside the model; ignored",
                       {{"worker_id", spec.id}, {"expert", KeyName(key)}});
      continue;
    }
    w.held.insert(key);
  }
  if ((!w.held.empty() || spec.hosted_version > 0) && published_ == 0) restarted_ = true;
  version_floor_ = std::max(version_floor_, spec.hosted_version);
  workers_[spec.id] = std::move(w);
  work_ = true;
}

void PlacementManager::RemoveWorker(uint64_t id) {
  absl::MutexLock lock(&mu_);
  if (workers_.erase(id) == 0) return;
  work_ = true;
  for (auto it = pending_unloads_.begin(); it != pending_unloads_.end();) {
    it = it->first.first == id ? pending_unloads_.erase(it) : std::next(it);
  }
  bool listed = false;
  Assignment next = assignment_;
  for (auto& [key, ids] : next) {
    auto it = std::find(ids.begin(), ids.end(), id);
    if (it != ids.end()) {
      ids.erase(it);
      listed = true;
    }
  }
  if (listed) PublishLocked(std::move(next));
}

PlacementManager::HeartbeatResult PlacementManager::Heartbeat(uint64_t id,
                                                              uint64_t reported_version,
                                                              bool draining) {
  absl::MutexLock lock(&mu_);
  HeartbeatResult result;
  auto it = workers_.find(id);
  if (it != workers_.end()) {
    Worker& w = it->second;
    if (w.kind == expertmesh::v1::WORKER_KIND_ATTENTION) {
      if (w.reported_version != reported_version) work_ = true;
      w.reported_version = reported_version;
      version_floor_ = std::max(version_floor_, reported_version);
      if (reported_version > 0 && published_ == 0) restarted_ = true;
    } else if (draining) {
      if (!w.draining) {
        w.draining = true;
        work_ = true;
        base::LogInfo("expert worker draining", {{"worker_id", id}, {"address", w.address}});
      }
      if (w.drain_version == 0) {
        bool listed = false;
        for (const auto& [key, ids] : assignment_) {
          listed = listed || std::find(ids.begin(), ids.end(), id) != ids.end();
        }
        // Not in the current table: older tables may still list it, hence the current version.
        if (!listed) w.drain_version = std::max<uint64_t>(table_->version(), 1);
      }
      result.drained = w.drain_version != 0 && MinAttentionVersionLocked() >= w.drain_version;
    }
  }
  result.placement_version = table_->version();
  return result;
}

uint64_t PlacementManager::MinAttentionVersionLocked() const {
  uint64_t min = std::numeric_limits<uint64_t>::max();
  for (const auto& [id, w] : workers_) {
    if (w.kind != expertmesh::v1::WORKER_KIND_ATTENTION) continue;
    min = std::min(min, w.reported_version.value_or(0));
  }
  return min;
}

bool PlacementManager::SettlingLocked() const {
  if (published_ > 0) return false;
  const absl::Time now = clock_.Now();
  return (restarted_ && now < started_ + options_.settle) ||
         now < last_expert_registration_ + options_.gather;
}

PlacementInput PlacementManager::InputLocked() const {
  PlacementInput in;
  in.keys = keys_;
  in.replicas = options_.replicas;
  in.current = assignment_;
  const absl::Time now = clock_.Now();
  for (const auto& [id, w] : workers_) {
    if (w.kind != expertmesh::v1::WORKER_KIND_EXPERT || w.draining || !w.target_ok ||
        now < w.backoff_until) {
      continue;
    }
    in.caps[id] = w.cap;
    in.held[id] = w.held;
  }
  for (const auto& [key, refs] : options_.pinned) {
    std::vector<uint64_t> ids;
    for (const WorkerRef& ref : refs) {
      for (const auto& [id, cap] : in.caps) {
        const Worker& w = workers_.at(id);
        if (ref.Matches(w.address, w.ordinal) &&
            std::find(ids.begin(), ids.end(), id) == ids.end()) {
          ids.push_back(id);
        }
      }
    }
    if (!ids.empty()) in.pinned[key] = std::move(ids);
  }
  return in;
}

bool PlacementManager::Reconcile() {
  Assignment target;
  std::map<uint64_t, std::vector<ExpertKey>> gains;
  std::map<uint64_t, std::string> addresses;
  uint64_t load_version = 0;
  {
    absl::MutexLock lock(&mu_);
    work_ = false;
    if (SettlingLocked()) return false;
    target = ComputePlacement(InputLocked());
    if (target == assignment_) {
      target.clear();
    } else {
      for (const auto& [key, ids] : target) {
        for (uint64_t id : ids) {
          if (!workers_.at(id).held.count(key)) gains[id].push_back(key);
        }
      }
      for (const auto& [id, keys] : gains) addresses[id] = workers_.at(id).address;
      load_version = std::max(table_->version(), version_floor_) + 1;
    }
  }
  bool published = false;
  if (!target.empty()) {
    // Loads run in parallel: each worker reads its own experts from the checkpoint.
    std::map<uint64_t, absl::Status> results;
    for (const auto& [id, keys] : gains) results[id] = absl::OkStatus();
    {
      std::vector<std::thread> threads;
      for (const auto& [id, keys] : gains) {
        // Each thread writes only its own, already present, entry of `results`.
        absl::Status* result = &results.at(id);
        threads.emplace_back([&, id = id, result, &keys = keys] {
          *result = loader_.Load(id, addresses.at(id), keys, load_version);
        });
      }
      for (std::thread& t : threads) t.join();
    }
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_.Now();
    std::set<std::pair<uint64_t, ExpertKey>> failed;
    for (const auto& [id, status] : results) {
      auto w = workers_.find(id);
      if (status.ok()) {
        if (w != workers_.end()) {
          w->second.held.insert(gains[id].begin(), gains[id].end());
          w->second.load_failures = 0;
        }
        continue;
      }
      for (const ExpertKey& key : gains[id]) failed.insert({id, key});
      if (w == workers_.end()) continue;
      const int failures = ++w->second.load_failures;
      w->second.backoff_until = now + options_.load_failure_backoff * (1 << std::min(failures - 1, 5));
      base::LogWarning("expert worker failed to load its experts; left out of placement for now",
                       {{"worker_id", id},
                        {"address", addresses[id]},
                        {"experts", static_cast<int64_t>(gains[id].size())},
                        {"error", status.ToString()}});
    }
    // Only workers that hold an expert may be listed for it: drop failed loads and workers that
    // left meanwhile, falling back to the current holders. A draining holder is no fallback: its
    // experts with nowhere else to go are unplaced, or it would never be drained (the last
    // expert worker of a stopping cluster waited out its whole drain timeout).
    for (auto& [key, ids] : target) {
      std::erase_if(ids, [&](uint64_t id) {
        return failed.count({id, key}) > 0 || workers_.count(id) == 0;
      });
      if (ids.empty()) {
        for (uint64_t id : assignment_[key]) {
          auto w = workers_.find(id);
          if (w != workers_.end() && !w->second.draining) ids.push_back(id);
        }
      }
    }
    if (target != assignment_) {
      PublishLocked(std::move(target));
      published = true;
    }
  }
  RunUnloads();
  return published;
}

void PlacementManager::PublishLocked(Assignment next) {
  const uint64_t version = std::max(table_->version(), version_floor_) + 1;
  version_floor_ = version;
  auto table = std::make_shared<expertmesh::v1::PlacementTable>();
  table->set_version(version);
  table->set_kernel_target(cluster_target_.value_or(""));
  std::map<uint64_t, std::set<ExpertKey>> listed;
  int unplaced = 0;
  for (const auto& [key, ids] : next) {
    if (ids.empty()) {
      expertmesh::v1::ExpertId* u = table->add_unplaced();
      u->set_layer(key.layer);
      u->set_expert(key.expert);
      ++unplaced;
      continue;
    }
    expertmesh::v1::ExpertPlacement* p = table->add_experts();
    p->set_layer(key.layer);
    p->set_expert(key.expert);
    for (uint64_t id : ids) {
      p->add_worker_ids(id);
      listed[id].insert(key);
      (*table->mutable_worker_addresses())[id] = workers_.at(id).address;
    }
  }
  for (auto& [id, w] : workers_) {
    if (w.kind != expertmesh::v1::WORKER_KIND_EXPERT) continue;
    const std::set<ExpertKey>& mine = listed[id];
    for (const ExpertKey& key : mine) pending_unloads_.erase({id, key});
    if (w.draining) {
      if (w.drain_version == 0 && mine.empty()) w.drain_version = version;
      continue;  // a draining worker unloads by itself once drained
    }
    for (const ExpertKey& key : w.held) {
      if (!mine.count(key)) pending_unloads_.emplace(std::make_pair(id, key), version);
    }
  }
  assignment_ = std::move(next);
  table_ = std::move(table);
  ++published_;
  base::LogInfo("placement published", {{"version", version},
                                        {"placed", table_->experts_size()},
                                        {"unplaced", unplaced},
                                        {"workers", table_->worker_addresses_size()}});
  if (listener_) listener_(table_);
}

void PlacementManager::RunUnloads() {
  std::map<uint64_t, std::vector<ExpertKey>> due;
  std::map<uint64_t, std::string> addresses;
  {
    absl::MutexLock lock(&mu_);
    const uint64_t min_version = MinAttentionVersionLocked();
    const absl::Time now = clock_.Now();
    for (const auto& [entry, version] : pending_unloads_) {
      if (version > min_version) continue;
      const Worker& w = workers_.at(entry.first);
      if (now < w.backoff_until) continue;
      due[entry.first].push_back(entry.second);
      addresses[entry.first] = w.address;
    }
  }
  for (const auto& [id, keys] : due) {
    absl::Status status = loader_.Unload(id, addresses[id], keys);
    absl::MutexLock lock(&mu_);
    auto w = workers_.find(id);
    if (w == workers_.end()) continue;
    if (!status.ok()) {
      w->second.backoff_until = clock_.Now() + options_.load_failure_backoff;
      base::LogWarning("expert worker failed to unload experts; retrying later",
                       {{"worker_id", id}, {"address", addresses[id]}, {"error", status.ToString()}});
      continue;
    }
    for (const ExpertKey& key : keys) {
      pending_unloads_.erase({id, key});
      w->second.held.erase(key);
    }
  }
}

}  // namespace expertmesh::router
