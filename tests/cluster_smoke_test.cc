// The cluster smoke test, the one end-to-end test the sanitizer pass runs: a router, one
// attention worker and two expert workers on loopback (tiny-a), four concurrent Generate
// streams, each equal to the single-process engine's answer.
#include <string>
#include <thread>
#include <vector>

#include "cli/local_cluster.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/testing/cluster_requests.h"

namespace expertmesh {
namespace {

TEST(ClusterSmokeTest, FourStreamsEqualTheEngine) {
  const std::string model_dir = std::string(EM_SHARED_DIR) + "/golden/tiny-a";
  cli::LocalClusterOptions o = cli::SmallClusterOptions(model_dir, 1, 2);
  o.bin_dir = EM_BINARY_DIR;
  o.ready_timeout = absl::Seconds(120);
  auto cluster = cli::LocalCluster::Start(o);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto stub = expertmesh::v1::AttentionWorker::NewStub(grpc::CreateChannel(
      (*cluster)->attention_worker_addresses().at(0), grpc::InsecureChannelCredentials()));

  auto m = model::Model::Load(model_dir);
  ASSERT_TRUE(m.ok()) << m.status();
  const std::vector<testing::GenRequest> reqs = testing::MakeGenRequests(4, 1024, 3, 777);
  std::vector<testing::GenResult> got(reqs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < reqs.size(); ++i) {
    threads.emplace_back([&, i] {
      got[i] = testing::RunGenerate(*stub, "smoke-" + std::to_string(i), reqs[i],
                                    absl::Seconds(240));
    });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto want = testing::EngineTokens(**m, reqs[i]);
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_TRUE(got[i].status.ok()) << "request " << i << ": " << got[i].status;
    EXPECT_EQ(got[i].tokens, *want) << "request " << i;
    EXPECT_FALSE(got[i].tokens.empty());
  }
}

}  // namespace
}  // namespace expertmesh
