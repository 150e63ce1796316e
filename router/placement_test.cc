#include "router/placement.h"

#include <filesystem>
#include <map>
#include <mutex>
#include <set>

#include "core/base/mapped_file.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/model_config_json.h"

namespace expertmesh::router {
namespace {

using base::FakeClock;

// Records what the protocol asks of expert workers and holds what each has loaded. The
// manager loads on several workers at once, from one thread each, hence the lock.
class FakeLoader final : public ExpertLoader {
 public:
  absl::Status Load(uint64_t id, const std::string& address, const std::vector<ExpertKey>& experts,
                    uint64_t version) override {
    std::lock_guard<std::mutex> lock(mu);
    loads.push_back({id, experts, version});
    if (failing.count(address)) return absl::UnavailableError("fake load failure at " + address);
    loaded[id].insert(experts.begin(), experts.end());
    return absl::OkStatus();
  }
  absl::Status Unload(uint64_t id, const std::string& address,
                      const std::vector<ExpertKey>& experts) override {
    std::lock_guard<std::mutex> lock(mu);
    unloads.push_back({id, experts, 0});
    for (const ExpertKey& k : experts) loaded[id].erase(k);
    return absl::OkStatus();
  }
  struct Call {
    uint64_t worker;
    std::vector<ExpertKey> experts;
    uint64_t version;
  };
  std::vector<Call> loads, unloads;
  std::map<uint64_t, std::set<ExpertKey>> loaded;
  std::set<std::string> failing;
  std::mutex mu;
};

ModelShape Shape(int layers, int mtp, int experts) {
  ModelShape s;
  s.trunk_layers = layers;
  s.mtp_layers = mtp;
  s.experts = experts;
  s.expert_bytes = 1000;
  return s;
}

std::map<uint64_t, size_t> Loads(const Assignment& a) {
  std::map<uint64_t, size_t> n;
  for (const auto& [k, ids] : a) {
    for (uint64_t id : ids) n[id]++;
  }
  return n;
}

void ExpectBalanced(const Assignment& a, const std::vector<uint64_t>& workers) {
  auto n = Loads(a);
  size_t lo = SIZE_MAX, hi = 0;
  for (uint64_t w : workers) {
    lo = std::min(lo, n[w]);
    hi = std::max(hi, n[w]);
  }
  EXPECT_LE(hi - lo, 1u) << "loads between " << lo << " and " << hi;
}

PlacementInput Input(const ModelShape& shape, int replicas, std::vector<uint64_t> workers,
                     size_t cap = SIZE_MAX) {
  PlacementInput in;
  in.keys = shape.Keys();
  in.replicas = replicas;
  for (uint64_t w : workers) in.caps[w] = cap;
  return in;
}

TEST(ModelShapeTest, ReadsLayersExpertsAndMtpFromConfig) {
  auto shape = ParseModelShape(testing::SmallModelConfigJson(4, 1, 16));
  ASSERT_TRUE(shape.ok()) << shape.status();
  EXPECT_EQ(shape->total_layers(), 5);
  EXPECT_EQ(shape->experts, 16);
  auto keys = shape->Keys();
  ASSERT_EQ(keys.size(), 80u);
  // The MTP block's MoE is layer trunk_layers + i.
  EXPECT_EQ(keys.back(), (ExpertKey{4, 15}));
  // hidden 256, moe_intermediate 128 (SmallModelConfigJson's dimensions), FP4 with e8m0 scales.
  EXPECT_EQ(shape->expert_bytes, static_cast<uint64_t>(3.0 * 256 * 128 * (0.5 + 1.0 / 32)));
  auto fp8 = ParseModelShape(testing::SmallModelConfigJson(2, 0, 8, "fp8"));
  ASSERT_TRUE(fp8.ok()) << fp8.status();
  EXPECT_EQ(fp8->total_layers(), 2);
  EXPECT_EQ(fp8->expert_bytes, static_cast<uint64_t>(3 * 256 * 128));
}

TEST(ModelShapeTest, ErrorsNameTheKey) {
  // The router uses the model's parser, so a config the workers would reject is rejected here
  // too, not only one missing the three keys placement reads.
  auto missing = ParseModelShape(R"({"num_hidden_layers": 4})");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("config.json"), std::string::npos);
  nlohmann::json j = nlohmann::json::parse(testing::SmallModelConfigJson(4, 1, 16));
  j.erase("n_routed_experts");
  auto no_experts = ParseModelShape(j.dump());
  ASSERT_FALSE(no_experts.ok());
  EXPECT_NE(no_experts.status().message().find("n_routed_experts"), std::string::npos);
  j = nlohmann::json::parse(testing::SmallModelConfigJson(4, 1, 16));
  j["num_hidden_layers"] = "four";
  auto bad = ParseModelShape(j.dump());
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("num_hidden_layers"), std::string::npos);
  j = nlohmann::json::parse(testing::SmallModelConfigJson(4, 1, 16));
  j["num_experts_per_tok"] = 17;  // more than n_routed_experts: only the full parser sees it
  auto inconsistent = ParseModelShape(j.dump());
  ASSERT_FALSE(inconsistent.ok());
  EXPECT_NE(inconsistent.status().message().find("num_experts_per_tok"), std::string::npos);
  EXPECT_FALSE(ParseModelShape("not json").ok());
}

TEST(ModelShapeTest, ReadsTheModelDirectory) {
  const std::string dir = ::testing::TempDir() + "/router-shape-model";
  std::filesystem::create_directories(dir);
  ASSERT_TRUE(
      base::WriteFileAtomically(dir + "/config.json", testing::SmallModelConfigJson(3, 1, 8)).ok());
  auto shape = ReadModelShape(dir);
  ASSERT_TRUE(shape.ok()) << shape.status();
  EXPECT_EQ(shape->total_layers(), 4);
  EXPECT_EQ(shape->experts, 8);
  auto missing = ReadModelShape(dir + "/nowhere");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST(ComputePlacementTest, CoversEveryExpertBalancedAndSpreadsEachLayer) {
  const ModelShape shape = Shape(2, 1, 6);  // 18 experts
  Assignment a = ComputePlacement(Input(shape, 1, {10, 20, 30}));
  ASSERT_EQ(a.size(), 18u);
  for (const auto& [k, ids] : a) EXPECT_EQ(ids.size(), 1u) << KeyName(k);
  auto n = Loads(a);
  EXPECT_EQ(n[10], 6u);
  EXPECT_EQ(n[20], 6u);
  EXPECT_EQ(n[30], 6u);
  // Each layer's 6 experts are over all three workers, 2 each.
  for (uint32_t layer = 0; layer < 3; ++layer) {
    std::map<uint64_t, int> per;
    for (uint32_t e = 0; e < 6; ++e) per[a[{layer, e}][0]]++;
    EXPECT_EQ(per.size(), 3u) << "layer " << layer;
  }
}

TEST(ComputePlacementTest, ReplicasAreDistinctWorkersAndLimitedByWorkerCount) {
  const ModelShape shape = Shape(2, 0, 5);
  Assignment two = ComputePlacement(Input(shape, 2, {1, 2, 3}));
  for (const auto& [k, ids] : two) {
    ASSERT_EQ(ids.size(), 2u) << KeyName(k);
    EXPECT_NE(ids[0], ids[1]) << KeyName(k);
  }
  ExpectBalanced(two, {1, 2, 3});
  Assignment three_of_two = ComputePlacement(Input(shape, 3, {1, 2}));
  for (const auto& [k, ids] : three_of_two) EXPECT_EQ(ids.size(), 2u) << KeyName(k);
}

TEST(ComputePlacementTest, PreferredReplicaIsSpreadOverTheHolders) {
  // With every expert on both workers, each must still be first for half of every layer:
  // attention workers send an expert's rows to its first replica.
  const ModelShape shape = Shape(3, 0, 8);
  Assignment a = ComputePlacement(Input(shape, 2, {1, 2}));
  for (uint32_t layer = 0; layer < 3; ++layer) {
    std::map<uint64_t, int> per;
    for (uint32_t e = 0; e < 8; ++e) per[a[{layer, e}][0]]++;
    EXPECT_EQ(per[1], 4) << "layer " << layer;
    EXPECT_EQ(per[2], 4) << "layer " << layer;
  }
  // The same input gives the same order (placement is deterministic).
  EXPECT_EQ(ComputePlacement(Input(shape, 2, {1, 2})), a);
}

TEST(ComputePlacementTest, JoiningWorkerTakesAFairShareAndNothingElseMoves) {
  const ModelShape shape = Shape(3, 1, 8);  // 32 experts
  Assignment before = ComputePlacement(Input(shape, 1, {1, 2}));
  PlacementInput in = Input(shape, 1, {1, 2, 3});
  in.current = before;
  Assignment after = ComputePlacement(in);
  ExpectBalanced(after, {1, 2, 3});
  int moved = 0;
  for (const auto& [k, ids] : after) {
    if (ids != before[k]) {
      ++moved;
      EXPECT_EQ(ids, std::vector<uint64_t>{3}) << KeyName(k) << " moved between old workers";
    }
  }
  EXPECT_EQ(moved, static_cast<int>(Loads(after)[3]));
  EXPECT_GE(moved, 10);
  EXPECT_LE(moved, 11);
}

TEST(ComputePlacementTest, LeavingWorkersExpertsAloneMove) {
  const ModelShape shape = Shape(2, 0, 9);
  Assignment before = ComputePlacement(Input(shape, 1, {1, 2, 3}));
  PlacementInput in = Input(shape, 1, {1, 3});
  in.current = before;
  Assignment after = ComputePlacement(in);
  ExpectBalanced(after, {1, 3});
  for (const auto& [k, ids] : after) {
    ASSERT_EQ(ids.size(), 1u);
    if (before[k][0] != 2) {
      EXPECT_EQ(ids, before[k]) << KeyName(k);
    }
  }
}

TEST(ComputePlacementTest, CapsLimitWorkersAndLeaveTheRestUnplaced) {
  const ModelShape shape = Shape(1, 0, 10);
  PlacementInput in = Input(shape, 1, {1, 2}, /*cap=*/3);
  in.caps[2] = 4;
  Assignment a = ComputePlacement(in);
  auto n = Loads(a);
  EXPECT_EQ(n[1], 3u);
  EXPECT_EQ(n[2], 4u);
  int unplaced = 0;
  for (const auto& [k, ids] : a) unplaced += ids.empty();
  EXPECT_EQ(unplaced, 3);
}

TEST(ComputePlacementTest, HeldExpertsArePreferredForNewReplicas) {
  const ModelShape shape = Shape(1, 0, 4);
  PlacementInput in = Input(shape, 1, {1, 2});
  in.held[2] = {{0, 0}, {0, 1}, {0, 2}};
  in.held[1] = {{0, 3}};
  Assignment a = ComputePlacement(in);
  // 3 on worker 2 and 1 on worker 1 is within one of balanced... no: 3-1 = 2, so one moves.
  auto n = Loads(a);
  EXPECT_EQ(n[1], 2u);
  EXPECT_EQ(n[2], 2u);
  EXPECT_EQ(a[(ExpertKey{0, 3})], std::vector<uint64_t>{1});
  int kept = 0;
  for (uint32_t e = 0; e < 3; ++e) kept += a[(ExpertKey{0, e})] == std::vector<uint64_t>{2};
  EXPECT_EQ(kept, 2);
}

TEST(ComputePlacementTest, RejoiningWorkerGetsBackWhatItStillHolds) {
  const ModelShape shape = Shape(2, 0, 6);
  Assignment three = ComputePlacement(Input(shape, 1, {1, 2, 3}));
  PlacementInput two = Input(shape, 1, {1, 2});
  two.current = three;
  Assignment without = ComputePlacement(two);
  std::set<ExpertKey> had;
  for (const auto& [k, ids] : three) {
    if (ids[0] == 3) had.insert(k);
  }
  PlacementInput back = Input(shape, 1, {1, 2, 3});
  back.current = without;
  back.held[3] = had;
  Assignment again = ComputePlacement(back);
  std::set<ExpertKey> now;
  for (const auto& [k, ids] : again) {
    if (ids[0] == 3) now.insert(k);
  }
  EXPECT_EQ(now, had);
}

TEST(PinnedPlacementTest, ParsesAddressesOrdinalsStarLayersAndExpertLists) {
  const ModelShape shape = Shape(2, 1, 4);
  auto pinned = ParsePinnedPlacement(R"({"placement": [
      {"layer": 0, "expert": 3, "workers": ["127.0.0.1:7000", 1]},
      {"layer": "*", "experts": [0, 1], "workers": [0]}]})",
                                     shape);
  ASSERT_TRUE(pinned.ok()) << pinned.status();
  EXPECT_EQ(pinned->size(), 1u + 3 * 2);
  const auto& refs = pinned->at({0, 3});
  ASSERT_EQ(refs.size(), 2u);
  EXPECT_TRUE(refs[0].Matches("127.0.0.1:7000", 5));
  EXPECT_FALSE(refs[0].Matches("127.0.0.1:7001", 0));
  EXPECT_TRUE(refs[1].Matches("anything", 1));
  EXPECT_TRUE(pinned->count({2, 1}));  // the MTP layer is layer 2
}

TEST(PinnedPlacementTest, ErrorsNameTheEntryAndField) {
  const ModelShape shape = Shape(2, 0, 4);
  struct Case {
    const char* text;
    const char* expect;
  } cases[] = {
      {R"({"placement": [{"layer": 2, "expert": 0, "workers": [0]}]})", "'layer'"},
      {R"({"placement": [{"layer": 0, "expert": 4, "workers": [0]}]})", "'expert'"},
      {R"({"placement": [{"layer": 0, "expert": 0, "workers": []}]})", "'workers'"},
      {R"({"placement": [{"layer": 0, "expert": 0, "workers": [-1]}]})", "'workers'"},
      {R"({"placement": [{"layer": 0, "expert": 0, "workers": [0], "x": 1}]})", "'x'"},
      {R"({"placement": [{"layer": 0, "expert": 1, "workers": [0]},
                         {"layer": 0, "experts": [1], "workers": [1]}]})",
       "entry 1: (layer 0, expert 1)"},
      {R"({"pins": []})", "placement"},
  };
  for (const Case& c : cases) {
    auto pinned = ParsePinnedPlacement(c.text, shape);
    ASSERT_FALSE(pinned.ok()) << c.text;
    EXPECT_NE(pinned.status().message().find(c.expect), std::string::npos)
        << pinned.status().message();
  }
}

// The manager with fakes: every published table is checked against what the workers loaded.
class PlacementManagerTest : public ::testing::Test {
 protected:
  void Make(PlacementOptions options) {
    manager_ = std::make_unique<PlacementManager>(std::move(options), clock_, loader_);
    manager_->SetListener([this](std::shared_ptr<const expertmesh::v1::PlacementTable> t) {
      if (!tables_.empty()) {
        EXPECT_EQ(t->version(), tables_.back()->version() + 1);
      }
      // Loads happen before publication: every listed worker holds the expert already.
      for (const auto& p : t->experts()) {
        for (uint64_t id : p.worker_ids()) {
          EXPECT_TRUE(loader_.loaded[id].count({p.layer(), p.expert()}) ||
                      hosted_[id].count({p.layer(), p.expert()}))
              << "version " << t->version() << " lists worker " << id << " for "
              << KeyName({p.layer(), p.expert()}) << " before it loaded it";
        }
      }
      tables_.push_back(t);
    });
  }
  void Make(int layers = 2, int experts = 6, int replicas = 1) {
    PlacementOptions o;
    o.shape = Shape(layers, 0, experts);
    o.replicas = replicas;
    o.settle = absl::Seconds(3);
    Make(std::move(o));
  }
  void AddExpert(uint64_t id, std::string target = "avx2", std::vector<ExpertKey> hosted = {},
                 uint64_t hosted_version = 0) {
    PlacementManager::WorkerSpec s;
    s.id = id;
    s.kind = expertmesh::v1::WORKER_KIND_EXPERT;
    s.address = "127.0.0.1:" + std::to_string(7000 + id);
    s.kernel_target = std::move(target);
    s.hosted = hosted;
    s.hosted_version = hosted_version;
    hosted_[id].insert(hosted.begin(), hosted.end());
    manager_->AddWorker(s);
  }
  void AddAttention(uint64_t id) {
    PlacementManager::WorkerSpec s;
    s.id = id;
    s.kind = expertmesh::v1::WORKER_KIND_ATTENTION;
    s.address = "127.0.0.1:" + std::to_string(8000 + id);
    manager_->AddWorker(s);
  }
  std::map<uint64_t, int> TableLoads() const {
    std::map<uint64_t, int> n;
    for (const auto& p : manager_->table()->experts()) {
      for (uint64_t id : p.worker_ids()) n[id]++;
    }
    return n;
  }
  std::set<ExpertKey> ListedOn(uint64_t worker) const {
    std::set<ExpertKey> out;
    for (const auto& p : manager_->table()->experts()) {
      for (uint64_t id : p.worker_ids()) {
        if (id == worker) out.insert({p.layer(), p.expert()});
      }
    }
    return out;
  }

  FakeClock clock_;
  FakeLoader loader_;
  std::map<uint64_t, std::set<ExpertKey>> hosted_;
  std::unique_ptr<PlacementManager> manager_;
  std::vector<std::shared_ptr<const expertmesh::v1::PlacementTable>> tables_;
};

TEST_F(PlacementManagerTest, JoiningWorkersLoadBeforeEachVersionIsPublished) {
  Make();
  EXPECT_FALSE(manager_->Reconcile());  // no worker, nothing to publish
  EXPECT_EQ(manager_->version(), 0u);
  AddExpert(1);
  EXPECT_TRUE(manager_->Reconcile());
  EXPECT_EQ(manager_->version(), 1u);
  EXPECT_EQ(manager_->table()->experts_size(), 12);
  EXPECT_EQ(manager_->table()->unplaced_size(), 0);
  EXPECT_EQ(manager_->table()->kernel_target(), "avx2");
  ASSERT_EQ(loader_.loads.size(), 1u);
  EXPECT_EQ(loader_.loads[0].experts.size(), 12u);
  EXPECT_EQ(loader_.loads[0].version, 1u);

  AddExpert(2);
  EXPECT_TRUE(manager_->Reconcile());
  EXPECT_EQ(manager_->version(), 2u);
  EXPECT_EQ(TableLoads(), (std::map<uint64_t, int>{{1, 6}, {2, 6}}));
  ASSERT_EQ(loader_.loads.size(), 2u);
  EXPECT_EQ(loader_.loads[1].worker, 2u);
  EXPECT_EQ(loader_.loads[1].experts.size(), 6u);
  // No attention worker: nobody can route to the moved experts, so worker 1 unloads them.
  ASSERT_EQ(loader_.unloads.size(), 1u);
  EXPECT_EQ(loader_.unloads[0].worker, 1u);
  EXPECT_EQ(loader_.unloads[0].experts.size(), 6u);
  EXPECT_FALSE(manager_->Reconcile());  // stable
  EXPECT_EQ(tables_.size(), 2u);
}

TEST_F(PlacementManagerTest, UnloadWaitsUntilEveryAttentionWorkerUsesTheVersionWithout) {
  Make();
  AddAttention(100);
  AddAttention(101);
  AddExpert(1);
  ASSERT_TRUE(manager_->Reconcile());
  AddExpert(2);
  ASSERT_TRUE(manager_->Reconcile());
  ASSERT_EQ(manager_->version(), 2u);
  EXPECT_TRUE(loader_.unloads.empty());
  manager_->Heartbeat(100, 2, false);
  manager_->Heartbeat(101, 1, false);
  manager_->Reconcile();
  EXPECT_TRUE(loader_.unloads.empty()) << "attention worker 101 still routes with version 1";
  manager_->Heartbeat(101, 2, false);
  manager_->Reconcile();
  ASSERT_EQ(loader_.unloads.size(), 1u);
  EXPECT_EQ(loader_.unloads[0].worker, 1u);
  for (const ExpertKey& k : loader_.unloads[0].experts) EXPECT_FALSE(ListedOn(1).count(k));
}

TEST_F(PlacementManagerTest, FailedLoadIsNotPublishedAndRetriedAfterBackoff) {
  Make();
  AddExpert(1);
  ASSERT_TRUE(manager_->Reconcile());
  loader_.failing.insert("127.0.0.1:7002");
  AddExpert(2);
  EXPECT_FALSE(manager_->Reconcile());
  EXPECT_EQ(manager_->version(), 1u);
  EXPECT_TRUE(ListedOn(2).empty());
  EXPECT_FALSE(manager_->Reconcile());  // in backoff: no new load attempt
  EXPECT_EQ(loader_.loads.size(), 2u);
  loader_.failing.clear();
  clock_.Advance(absl::Seconds(2));
  EXPECT_TRUE(manager_->Reconcile());
  EXPECT_EQ(ListedOn(2).size(), 6u);
}

TEST_F(PlacementManagerTest, DrainMovesExpertsFirstThenReportsDrainedOnceAttentionFollows) {
  Make();
  AddAttention(100);
  AddExpert(1);
  AddExpert(2);
  ASSERT_TRUE(manager_->Reconcile());
  const uint64_t v1 = manager_->version();
  manager_->Heartbeat(100, v1, false);
  const std::set<ExpertKey> leaving = ListedOn(2);
  ASSERT_FALSE(leaving.empty());

  auto beat = manager_->Heartbeat(2, 0, /*draining=*/true);
  EXPECT_FALSE(beat.drained);
  ASSERT_TRUE(manager_->Reconcile());
  const uint64_t v2 = manager_->version();
  EXPECT_EQ(v2, v1 + 1);
  EXPECT_TRUE(ListedOn(2).empty());
  EXPECT_EQ(ListedOn(1).size(), 12u);
  // The other worker loaded the leaving experts before v2.
  EXPECT_EQ(loader_.loads.back().worker, 1u);
  EXPECT_EQ(std::set<ExpertKey>(loader_.loads.back().experts.begin(),
                                loader_.loads.back().experts.end()),
            leaving);
  EXPECT_FALSE(manager_->Heartbeat(2, 0, true).drained) << "attention still on " << v1;
  manager_->Heartbeat(100, v2, false);
  EXPECT_TRUE(manager_->Heartbeat(2, 0, true).drained);
  manager_->Reconcile();
  for (const auto& u : loader_.unloads) EXPECT_NE(u.worker, 2u) << "a draining worker unloads itself";
}

TEST_F(PlacementManagerTest, DrainWithoutAttentionWorkersIsImmediateAfterPublishing) {
  Make();
  AddExpert(1);
  AddExpert(2);
  ASSERT_TRUE(manager_->Reconcile());
  EXPECT_FALSE(manager_->Heartbeat(1, 0, true).drained);
  ASSERT_TRUE(manager_->Reconcile());
  EXPECT_TRUE(manager_->Heartbeat(1, 0, true).drained);
}

TEST_F(PlacementManagerTest, LastExpertWorkerDrainsWithItsExpertsUnplaced) {
  // Nowhere to move its experts: a version lists them as unplaced, and the drain completes once
  // the attention worker follows (instead of the worker waiting out its drain timeout).
  Make();
  AddAttention(100);
  AddExpert(1);
  ASSERT_TRUE(manager_->Reconcile());
  const uint64_t v1 = manager_->version();
  manager_->Heartbeat(100, v1, false);
  EXPECT_FALSE(manager_->Heartbeat(1, 0, /*draining=*/true).drained);
  ASSERT_TRUE(manager_->Reconcile());
  const uint64_t v2 = manager_->version();
  EXPECT_EQ(v2, v1 + 1);
  EXPECT_TRUE(ListedOn(1).empty());
  EXPECT_EQ(manager_->table()->unplaced_size(), 12);
  EXPECT_FALSE(manager_->Heartbeat(1, 0, true).drained) << "attention still on " << v1;
  manager_->Heartbeat(100, v2, false);
  EXPECT_TRUE(manager_->Heartbeat(1, 0, true).drained);
}

TEST_F(PlacementManagerTest, ExpiredWorkerIsRemovedAtOnceThenItsExpertsRePlaced) {
  Make();
  AddExpert(1);
  AddExpert(2);
  ASSERT_TRUE(manager_->Reconcile());
  const uint64_t v = manager_->version();
  const size_t lost = ListedOn(2).size();
  manager_->RemoveWorker(2);
  EXPECT_EQ(manager_->version(), v + 1);
  EXPECT_EQ(static_cast<size_t>(manager_->table()->unplaced_size()), lost);
  EXPECT_EQ(manager_->table()->worker_addresses().count(2), 0u);
  ASSERT_TRUE(manager_->Reconcile());
  EXPECT_EQ(manager_->version(), v + 2);
  EXPECT_EQ(manager_->table()->unplaced_size(), 0);
  EXPECT_EQ(ListedOn(1).size(), 12u);
  manager_->RemoveWorker(2);  // unknown now: no new version
  EXPECT_EQ(manager_->version(), v + 2);
}

TEST_F(PlacementManagerTest, ReplicasSurviveALossWithoutUnplacedExperts) {
  Make(2, 6, /*replicas=*/2);
  AddExpert(1);
  AddExpert(2);
  AddExpert(3);
  ASSERT_TRUE(manager_->Reconcile());
  for (const auto& p : manager_->table()->experts()) EXPECT_EQ(p.worker_ids_size(), 2);
  manager_->RemoveWorker(3);
  EXPECT_EQ(manager_->table()->unplaced_size(), 0);
  ASSERT_TRUE(manager_->Reconcile());
  for (const auto& p : manager_->table()->experts()) {
    EXPECT_EQ(p.worker_ids_size(), 2);
    EXPECT_NE(p.worker_ids(0), p.worker_ids(1));
  }
}

TEST_F(PlacementManagerTest, WorkerOfAnotherKernelTargetGetsNothing) {
  Make();
  AddExpert(1, "avx2");
  AddExpert(2, "avx512");
  ASSERT_TRUE(manager_->Reconcile());
  EXPECT_TRUE(ListedOn(2).empty());
  EXPECT_EQ(ListedOn(1).size(), 12u);
  EXPECT_EQ(manager_->table()->kernel_target(), "avx2");
  for (const auto& l : loader_.loads) EXPECT_NE(l.worker, 2u);
  EXPECT_TRUE(manager_->Heartbeat(2, 0, true).drained);  // never listed, nothing to wait for
}

TEST_F(PlacementManagerTest, PinnedExpertsGoToTheirWorkersAndFallBackWhenTheyAreGone) {
  PlacementOptions o;
  o.shape = Shape(1, 0, 4);
  auto pinned = ParsePinnedPlacement(
      R"({"placement": [{"layer": 0, "experts": [0, 1, 2], "workers": ["127.0.0.1:7002"]}]})",
      o.shape);
  ASSERT_TRUE(pinned.ok()) << pinned.status();
  o.pinned = *pinned;
  Make(std::move(o));
  AddExpert(1);
  AddExpert(2);
  ASSERT_TRUE(manager_->Reconcile());
  EXPECT_EQ(ListedOn(2), (std::set<ExpertKey>{{0, 0}, {0, 1}, {0, 2}}));
  EXPECT_EQ(ListedOn(1), (std::set<ExpertKey>{{0, 3}}));
  manager_->RemoveWorker(2);
  ASSERT_TRUE(manager_->Reconcile());
  EXPECT_EQ(ListedOn(1).size(), 4u);
  EXPECT_EQ(manager_->table()->unplaced_size(), 0);
}

TEST_F(PlacementManagerTest, RestartedRouterRebuildsFromHostedExpertsWithoutLoadsAndAboveTheirVersion) {
  Make();
  std::vector<ExpertKey> a, b;
  for (uint32_t l = 0; l < 2; ++l) {
    for (uint32_t e = 0; e < 6; ++e) (e % 2 ? a : b).push_back({l, e});
  }
  AddExpert(1, "avx2", a, 7);
  EXPECT_FALSE(manager_->Reconcile()) << "waits for the other workers to register again";
  AddExpert(2, "avx2", b, 7);
  clock_.Advance(absl::Seconds(1));
  EXPECT_FALSE(manager_->Reconcile());
  clock_.Advance(absl::Seconds(3));
  ASSERT_TRUE(manager_->Reconcile());
  EXPECT_EQ(manager_->version(), 8u);
  EXPECT_TRUE(loader_.loads.empty());
  EXPECT_TRUE(loader_.unloads.empty());
  EXPECT_EQ(ListedOn(1), std::set<ExpertKey>(a.begin(), a.end()));
  EXPECT_EQ(ListedOn(2), std::set<ExpertKey>(b.begin(), b.end()));
}

TEST_F(PlacementManagerTest, FirstTableWaitsForWorkersStartingTogether) {
  PlacementOptions o;
  o.shape = Shape(1, 0, 4);
  o.gather = absl::Milliseconds(300);
  Make(std::move(o));
  AddExpert(1);
  EXPECT_FALSE(manager_->Reconcile());
  clock_.Advance(absl::Milliseconds(200));
  AddExpert(2);
  clock_.Advance(absl::Milliseconds(200));
  EXPECT_FALSE(manager_->Reconcile());
  clock_.Advance(absl::Milliseconds(200));
  ASSERT_TRUE(manager_->Reconcile());
  EXPECT_EQ(manager_->version(), 1u);
  ASSERT_EQ(loader_.loads.size(), 2u);
  EXPECT_EQ(loader_.loads[0].experts.size(), 2u);
  EXPECT_EQ(loader_.loads[1].experts.size(), 2u);
  EXPECT_TRUE(loader_.unloads.empty());
  // Later joiners are not held back.
  AddExpert(3);
  EXPECT_TRUE(manager_->Reconcile());
}

TEST_F(PlacementManagerTest, VersionContinuesAboveTheRestoredOneAndAttentionReports) {
  PlacementOptions o;
  o.shape = Shape(1, 0, 2);
  o.restored_version = 12;
  o.settle = absl::Seconds(3);
  Make(std::move(o));
  AddAttention(100);
  manager_->Heartbeat(100, 15, false);  // it used a version of an older router
  AddExpert(1);
  EXPECT_FALSE(manager_->Reconcile());
  clock_.Advance(absl::Seconds(3));
  ASSERT_TRUE(manager_->Reconcile());
  EXPECT_EQ(manager_->version(), 16u);
}

}  // namespace
}  // namespace expertmesh::router
