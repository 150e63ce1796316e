// Teacher-forced scoring in the golden's layout (golden/README.md, golden.json): for every
// sequence, one prefill of the first N tokens from position 0, then one-token decode steps;
// optionally the MTP block's logits over the prefill. Backs `expertmesh score`.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model/model.h"

namespace expertmesh::engine {

struct ScoreOptions {
  int64_t prefill = 0;  // N: tokens in the prefill (0 < N <= tokens)
  int64_t chunk = 0;    // prefill chunk size (0 = one piece; the result is the same)
  bool mtp = false;     // also compute mtp_logits [batch, N-1, V]
  // Run all sequences in every forward pass (one batch) instead of one after another.
  bool batch_sequences = false;
  // Progress lines (e.g. to stderr); may be empty.
  std::function<void(const std::string&)> progress;
};

struct ScoreResult {
  int64_t batch = 0, tokens = 0, vocab = 0;
  std::vector<float> logits;      // [batch, tokens, vocab]
  std::vector<float> mtp_logits;  // [batch, prefill-1, vocab] when requested
};

// ids: [batch, tokens] row-major. Errors: InvalidArgument for bad sizes or token ids; the
// model's errors; FailedPrecondition for mtp without MTP layers.
absl::StatusOr<ScoreResult> Score(model::Model& model, const std::vector<int32_t>& ids,
                                  int64_t batch, int64_t tokens, const ScoreOptions& options);

// Reads `input_ids` (I32 [batch, tokens]) from `input`, scores, and writes `logits` (and
// `mtp_logits`) as F32 to `out`. Errors: the file's (naming the path and tensor), Score's.
absl::Status ScoreFile(model::Model& model, const std::string& input, const std::string& out,
                       const ScoreOptions& options);

}  // namespace expertmesh::engine
