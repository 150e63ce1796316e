// Test helper: the acceptance rule of MODEL.md (Numerics contract) for logits, and access to
// the golden vectors in EM_SHARED_DIR/golden/<name>. Used by the model, state and engine tests.
//
// The rule per output (`logits`, `mtp_logits`), with p = per-position max|dlogit| over all
// golden positions and the reference's own figures from the golden's noise_floor.json:
//   median p <= max(1e-3, 1.5 median_ref), p90 <= max(0.02, 1.5 p90_ref),
//   p99 <= max(0.25, 1.5 p99_ref), argmax agreement >= min(0.98, argmax_ref - 0.005),
//   and p <= 1e-4 at every [sequence, position] in stable_positions.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/safetensors.h"

namespace expertmesh::model::testing {

// How far the official reference moves from itself under float32-sized nudges, for one output.
// The default (all zero, argmax 1, no stable positions) is a perfect reference: the bounds are
// then the contract's floors.
struct NoiseFloor {
  double median = 0, p90 = 0, p99 = 0;
  double argmax = 1;
  std::vector<std::pair<int64_t, int64_t>> stable_positions;  // [sequence, position]
};

// `output` is "logits" or "mtp_logits". Errors name the file and the missing or malformed field.
absl::StatusOr<NoiseFloor> LoadNoiseFloor(const std::string& golden_dir, const std::string& output);

// The bounds the rule derives from a noise floor.
struct ContractBounds {
  double median = 0, p90 = 0, p99 = 0, argmax = 0;
  static ContractBounds From(const NoiseFloor& ref);
  std::string ToString() const;
};

struct ContractFigures {
  int64_t positions = 0;
  double median = 0, p90 = 0, p99 = 0;  // of p = per-position max|dlogit|
  double argmax_agreement = 0;          // fraction of positions with the same argmax
  // The contract's floors (ContractBounds::From(NoiseFloor{})): median <= 1e-3, p90 <= 0.02,
  // p99 <= 0.25, argmax >= 0.98. For comparisons that have no noise floor of their own (a subset
  // of the golden positions, or the engine against itself); the golden tests use CheckContract.
  bool Meets() const;
  std::string ToString() const;
};

// got and want are [positions, vocab].
ContractFigures CompareLogits(const float* got, const float* want, int64_t positions,
                              int64_t vocab);

// The full rule for one output. got and want are in the golden's layout,
// [sequences, positions, vocab].
struct ContractCheck {
  ContractFigures figures;
  ContractBounds bounds;
  int64_t stable_count = 0;  // stable positions checked
  double stable_max = 0;     // max p over them
  std::pair<int64_t, int64_t> stable_worst = {-1, -1};
  std::vector<std::string> violations;  // empty when the rule holds
  bool Meets() const { return violations.empty(); }
  std::string ToString() const;
};
ContractCheck CheckContract(const float* got, const float* want, int64_t sequences,
                            int64_t positions, int64_t vocab, const NoiseFloor& ref);

// The golden directory (EM_SHARED_DIR "/golden/" name).
std::string GoldenDir(const std::string& name);

// One golden folder's vectors and noise floors. Loading fails (with the file and field named)
// rather than leaving anything empty, so a fixture can fail every test that needs it.
struct Golden {
  std::string dir;
  std::unique_ptr<SafetensorsFile> file;  // golden.safetensors
  int64_t batch = 0, tokens = 0, prefill = 0;
  std::vector<int32_t> input_ids;  // [batch, tokens]
  std::vector<float> logits;       // [batch, tokens, vocab]
  std::vector<float> mtp_logits;   // [batch, prefill - 1, vocab]
  NoiseFloor logits_floor, mtp_floor;
};
absl::StatusOr<std::unique_ptr<Golden>> LoadGolden(const std::string& name);

// Typed contents of one tensor, with errors naming it.
absl::StatusOr<std::vector<float>> TensorF32(const SafetensorsFile& f, const std::string& name);
absl::StatusOr<std::vector<int32_t>> TensorI32(const SafetensorsFile& f, const std::string& name);

// Float32 / int32 contents of a tensor of the golden file (adds a test failure and returns an
// empty vector on error).
std::vector<float> ReadF32(const SafetensorsFile& f, const std::string& name);
std::vector<int32_t> ReadI32(const SafetensorsFile& f, const std::string& name);

}  // namespace expertmesh::model::testing
