#include "core/model/golden_contract.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "gtest/gtest.h"

namespace expertmesh::model::testing {

bool ContractFigures::Meets() const {
  return positions > 0 && median <= 1e-3 && p90 <= 0.02 && p99 <= 0.25 && argmax_agreement >= 0.98;
}

std::string ContractFigures::ToString() const {
  std::ostringstream s;
  s << "positions=" << positions << " median=" << median << " p90=" << p90 << " p99=" << p99
    << " argmax=" << argmax_agreement;
  return s.str();
}

namespace {

// Nearest-rank percentile of sorted values.
double Percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  size_t rank = static_cast<size_t>(std::ceil(q * sorted.size()));
  rank = std::clamp<size_t>(rank, 1, sorted.size());
  return sorted[rank - 1];
}

}  // namespace

ContractFigures CompareLogits(const float* got, const float* want, int64_t positions,
                              int64_t vocab) {
  ContractFigures f;
  f.positions = positions;
  std::vector<double> p(positions);
  int64_t agree = 0;
  for (int64_t i = 0; i < positions; ++i) {
    const float* g = got + i * vocab;
    const float* w = want + i * vocab;
    double m = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      double d = std::fabs(static_cast<double>(g[v]) - w[v]);
      if (std::isnan(d)) d = INFINITY;
      m = std::max(m, d);
    }
    p[i] = m;
    agree += (std::max_element(g, g + vocab) - g) == (std::max_element(w, w + vocab) - w);
  }
  std::sort(p.begin(), p.end());
  f.median = Percentile(p, 0.5);
  f.p90 = Percentile(p, 0.9);
  f.p99 = Percentile(p, 0.99);
  f.argmax_agreement = positions ? static_cast<double>(agree) / positions : 0;
  return f;
}

std::string GoldenDir(const std::string& name) {
  return std::string(EM_SHARED_DIR) + "/golden/" + name;
}

std::vector<float> ReadF32(const SafetensorsFile& f, const std::string& name) {
  auto t = f.Get(name);
  EXPECT_TRUE(t.ok()) << t.status();
  if (!t.ok() || t->dtype != DType::kF32) {
    ADD_FAILURE() << name << " is not F32";
    return {};
  }
  std::vector<float> v(t->nbytes / 4);
  std::memcpy(v.data(), t->data, t->nbytes);
  return v;
}

std::vector<int32_t> ReadI32(const SafetensorsFile& f, const std::string& name) {
  auto t = f.Get(name);
  EXPECT_TRUE(t.ok()) << t.status();
  if (!t.ok() || t->dtype != DType::kI32) {
    ADD_FAILURE() << name << " is not I32";
    return {};
  }
  std::vector<int32_t> v(t->nbytes / 4);
  std::memcpy(v.data(), t->data, t->nbytes);
  return v;
}

}  // namespace expertmesh::model::testing
