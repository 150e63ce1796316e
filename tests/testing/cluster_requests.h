// Generation requests for cluster tests: a deterministic mix of greedy and seeded-sampling
// requests, running one through an attention worker's Generate stream, and the single-process
// engine's answer for the same request (what every cluster output must equal, byte for byte);
// also the router's member list and placement table, as tests poll them after a fault.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "core/engine/engine.h"
#include "core/model/model.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"

namespace expertmesh::testing {

struct GenRequest {
  std::vector<int32_t> prompt;
  engine::SamplingParams sampling;  // temperature 0 = greedy
  int max_new = 0;
};

// What MakeGenRequests draws from: prompts of [min_prompt, max_prompt] tokens below `vocab`,
// [min_new, max_new] new tokens, greedy and seeded sampling alternating; `salt` picks the stream.
struct GenRequestSpec {
  int vocab = 1024;
  int min_prompt = 3, max_prompt = 62;
  int min_new = 4, max_new = 15;
  uint64_t salt = 12345;
};
std::vector<GenRequest> MakeGenRequests(int count, const GenRequestSpec& spec);
// The default spec with another vocabulary, minimum of new tokens (max = min + 11) and salt.
std::vector<GenRequest> MakeGenRequests(int count, int vocab, int min_new = 4,
                                        uint64_t salt = 12345);

// What one Generate call returned.
struct GenResult {
  std::vector<int32_t> tokens;
  absl::Status status;  // the RPC's final status
  uint64_t seed = 0;    // the seed the worker reported
};

// Runs `r` as sequence `id` on the attention worker and collects its stream.
GenResult RunGenerate(expertmesh::v1::AttentionWorker::Stub& stub, const std::string& id,
                      const GenRequest& r, absl::Duration deadline = absl::Seconds(120));

// The single-process engine's tokens for `r`, run alone.
absl::StatusOr<std::vector<int32_t>> EngineTokens(model::Model& model, const GenRequest& r);

// The router at `router` (host:port) asked over a fresh channel with a 2 s deadline; Unavailable
// naming the call when it does not answer.
absl::StatusOr<expertmesh::v1::ListMembersResponse> ListMembers(const std::string& router);
absl::StatusOr<expertmesh::v1::PlacementTable> GetPlacement(const std::string& router);

}  // namespace expertmesh::testing
