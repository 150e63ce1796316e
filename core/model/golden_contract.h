// Test helper: the acceptance rule of MODEL.md (Numerics contract) for logits, and access to
// the golden vectors in EM_SHARED_DIR/golden/<name>. Used by the model, state and engine tests.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/model/safetensors.h"

namespace expertmesh::model::testing {

struct ContractFigures {
  int64_t positions = 0;
  double median = 0, p90 = 0, p99 = 0;  // of p = per-position max|dlogit|
  double argmax_agreement = 0;          // fraction of positions with the same argmax
  // median <= 1e-3, p90 <= 0.02, p99 <= 0.25, argmax >= 0.98.
  bool Meets() const;
  std::string ToString() const;
};

// got and want are [positions, vocab].
ContractFigures CompareLogits(const float* got, const float* want, int64_t positions,
                              int64_t vocab);

// The golden directory (EM_SHARED_DIR "/golden/" name).
std::string GoldenDir(const std::string& name);

// Float32 / int32 contents of a tensor of the golden file (aborts the test on error).
std::vector<float> ReadF32(const SafetensorsFile& f, const std::string& name);
std::vector<int32_t> ReadI32(const SafetensorsFile& f, const std::string& name);

}  // namespace expertmesh::model::testing
