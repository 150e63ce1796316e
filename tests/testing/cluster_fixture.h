// A gtest fixture for tests that start one local cluster per test in a temporary directory: the
// start that fails the test when the cluster does not come up, and the cleanup.
#pragma once

#include <cstdlib>
#include <memory>
#include <string>
#include <utility>

#include "cli/local_cluster.h"
#include "gtest/gtest.h"

namespace expertmesh::testing {

class LocalClusterTest : public ::testing::Test {
 protected:
  // Fails the test (fatally, in this function only) when `o`'s cluster does not start.
  void StartCluster(const cli::LocalClusterOptions& o) {
    auto c = cli::LocalCluster::Start(o);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = std::move(*c);
  }

  // The cluster stops before its directory goes: its services still write logs there.
  void TearDown() override {
    cluster_.reset();
    std::system(("rm -rf '" + dir_ + "'").c_str());
  }

  std::string dir_;  // made by the subclass's SetUp
  std::unique_ptr<cli::LocalCluster> cluster_;
};

}  // namespace expertmesh::testing
