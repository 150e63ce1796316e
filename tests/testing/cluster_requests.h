// Generation requests for cluster tests: a deterministic mix of greedy and seeded-sampling
// requests, running one through an attention worker's Generate stream, and the single-process
// engine's answer for the same request (what every cluster output must equal, byte for byte).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "core/engine/engine.h"
#include "core/model/model.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"

namespace expertmesh::testing {

struct GenRequest {
  std::vector<int32_t> prompt;
  engine::SamplingParams sampling;  // temperature 0 = greedy
  int max_new = 0;
};

// `count` requests with prompts of 3..62 tokens below `vocab`, every other one sampled with a
// seed, max_new in [min_new, min_new + 11].
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

}  // namespace expertmesh::testing
