#include "core/model/golden_contract.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace expertmesh::model::testing {

namespace {

// Percentile with linear interpolation between the closest ranks, as numpy.percentile computes
// it by default: the noise floor's figures were computed that way by the Python reference, so the
// engine's figures must be too (nearest rank would compare a different statistic).
double Percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  const double at = q * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(at));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  const double frac = at - static_cast<double>(lo);
  if (std::isinf(sorted[hi])) return frac > 0 ? sorted[hi] : sorted[lo];
  return sorted[lo] + (sorted[hi] - sorted[lo]) * frac;
}

// p for one position: NaN anywhere counts as infinitely far, so it can never pass.
double MaxAbsDiff(const float* g, const float* w, int64_t vocab) {
  double m = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    double d = std::fabs(static_cast<double>(g[v]) - w[v]);
    if (std::isnan(d)) d = INFINITY;
    m = std::max(m, d);
  }
  return m;
}

absl::StatusOr<double> Number(const nlohmann::json& obj, const std::string& where,
                              const char* key) {
  auto it = obj.find(key);
  if (it == obj.end() || !it->is_number()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ".", key, ": missing or not a number"));
  }
  return it->get<double>();
}

}  // namespace

absl::StatusOr<NoiseFloor> LoadNoiseFloor(const std::string& golden_dir,
                                          const std::string& output) {
  const std::string path = golden_dir + "/noise_floor.json";
  EM_ASSIGN_OR_RETURN(std::string text, base::ReadFileToString(path));
  nlohmann::json doc = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  auto it = doc.find(output);
  if (it == doc.end() || !it->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no object \"", output, "\""));
  }
  const nlohmann::json& o = *it;
  const std::string where = absl::StrCat(path, ": ", output);
  NoiseFloor f;
  EM_ASSIGN_OR_RETURN(f.median, Number(o, where, "median"));
  EM_ASSIGN_OR_RETURN(f.p90, Number(o, where, "p90"));
  EM_ASSIGN_OR_RETURN(f.p99, Number(o, where, "p99"));
  EM_ASSIGN_OR_RETURN(f.argmax, Number(o, where, "argmax"));
  auto sp = o.find("stable_positions");
  if (sp == o.end() || !sp->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ".stable_positions: missing or not an array"));
  }
  for (size_t i = 0; i < sp->size(); ++i) {
    const nlohmann::json& e = (*sp)[i];
    if (!e.is_array() || e.size() != 2 || !e[0].is_number_integer() || !e[1].is_number_integer() ||
        e[0].get<int64_t>() < 0 || e[1].get<int64_t>() < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ".stable_positions[", i, "]: not a [sequence, position] pair: ", e.dump()));
    }
    f.stable_positions.emplace_back(e[0].get<int64_t>(), e[1].get<int64_t>());
  }
  return f;
}

ContractBounds ContractBounds::From(const NoiseFloor& ref) {
  ContractBounds b;
  b.median = std::max(1e-3, 1.5 * ref.median);
  b.p90 = std::max(0.02, 1.5 * ref.p90);
  b.p99 = std::max(0.25, 1.5 * ref.p99);
  b.argmax = std::min(0.98, ref.argmax - 0.005);
  return b;
}

std::string ContractBounds::ToString() const {
  std::ostringstream s;
  s << "median<=" << median << " p90<=" << p90 << " p99<=" << p99 << " argmax>=" << argmax;
  return s.str();
}

bool ContractFigures::Meets() const {
  const ContractBounds b = ContractBounds::From(NoiseFloor{});
  return positions > 0 && median <= b.median && p90 <= b.p90 && p99 <= b.p99 &&
         argmax_agreement >= b.argmax;
}

std::string ContractFigures::ToString() const {
  std::ostringstream s;
  s << "positions=" << positions << " median=" << median << " p90=" << p90 << " p99=" << p99
    << " argmax=" << argmax_agreement;
  return s.str();
}

ContractFigures CompareLogits(const float* got, const float* want, int64_t positions,
                              int64_t vocab) {
  ContractFigures f;
  f.positions = positions;
  std::vector<double> p(positions);
  int64_t agree = 0;
  for (int64_t i = 0; i < positions; ++i) {
    const float* g = got + i * vocab;
    const float* w = want + i * vocab;
    p[i] = MaxAbsDiff(g, w, vocab);
    agree += (std::max_element(g, g + vocab) - g) == (std::max_element(w, w + vocab) - w);
  }
  std::sort(p.begin(), p.end());
  f.median = Percentile(p, 0.5);
  f.p90 = Percentile(p, 0.9);
  f.p99 = Percentile(p, 0.99);
  f.argmax_agreement = positions ? static_cast<double>(agree) / positions : 0;
  return f;
}

ContractCheck CheckContract(const float* got, const float* want, int64_t sequences,
                            int64_t positions, int64_t vocab, const NoiseFloor& ref) {
  ContractCheck c;
  c.figures = CompareLogits(got, want, sequences * positions, vocab);
  c.bounds = ContractBounds::From(ref);
  const ContractFigures& f = c.figures;
  const ContractBounds& b = c.bounds;
  if (f.positions <= 0) c.violations.push_back("no positions compared");
  if (!(f.median <= b.median))
    c.violations.push_back(absl::StrCat("median ", f.median, " > ", b.median));
  if (!(f.p90 <= b.p90)) c.violations.push_back(absl::StrCat("p90 ", f.p90, " > ", b.p90));
  if (!(f.p99 <= b.p99)) c.violations.push_back(absl::StrCat("p99 ", f.p99, " > ", b.p99));
  if (!(f.argmax_agreement >= b.argmax)) {
    c.violations.push_back(absl::StrCat("argmax ", f.argmax_agreement, " < ", b.argmax));
  }
  constexpr double kStable = 1e-4;
  for (const auto& [s, t] : ref.stable_positions) {
    if (s >= sequences || t >= positions) {
      c.violations.push_back(absl::StrCat("stable position [", s, ", ", t, "] is outside the ",
                                          sequences, "x", positions, " compared"));
      continue;
    }
    const int64_t row = s * positions + t;
    const double p = MaxAbsDiff(got + row * vocab, want + row * vocab, vocab);
    ++c.stable_count;
    if (c.stable_worst.first < 0 || !(p <= c.stable_max)) {
      c.stable_max = p;
      c.stable_worst = {s, t};
    }
    if (!(p <= kStable)) {
      c.violations.push_back(
          absl::StrCat("stable position [", s, ", ", t, "]: ", p, " > ", kStable));
    }
  }
  return c;
}

std::string ContractCheck::ToString() const {
  std::ostringstream s;
  s << figures.ToString() << " stable=" << stable_count << " stable_max=" << stable_max;
  if (stable_worst.first >= 0)
    s << " at [" << stable_worst.first << ", " << stable_worst.second << "]";
  s << " (bounds " << bounds.ToString() << " stable<=1e-4)";
  for (const std::string& v : violations) s << "\n  violated: " << v;
  return s.str();
}

std::string GoldenDir(const std::string& name) {
  return std::string(EM_SHARED_DIR) + "/golden/" + name;
}

namespace {

template <typename T>
absl::StatusOr<std::vector<T>> Tensor(const SafetensorsFile& f, const std::string& name,
                                      DType dtype) {
  EM_ASSIGN_OR_RETURN(TensorView t, f.Get(name));
  if (t.dtype != dtype) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " is ",
                                                   std::string(DTypeName(t.dtype)), ", expected ",
                                                   std::string(DTypeName(dtype))));
  }
  std::vector<T> v(t.nbytes / sizeof(T));
  std::memcpy(v.data(), t.data, v.size() * sizeof(T));
  return v;
}

absl::Status ExpectShape(const SafetensorsFile& f, const std::string& name,
                         const std::vector<int64_t>& want) {
  EM_ASSIGN_OR_RETURN(TensorView t, f.Get(name));
  if (t.shape != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor ", name, " has shape ", ShapeString(t.shape), ", expected ", ShapeString(want)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<float>> TensorF32(const SafetensorsFile& f, const std::string& name) {
  return Tensor<float>(f, name, DType::kF32);
}

absl::StatusOr<std::vector<int32_t>> TensorI32(const SafetensorsFile& f, const std::string& name) {
  return Tensor<int32_t>(f, name, DType::kI32);
}

absl::StatusOr<std::unique_ptr<Golden>> LoadGolden(const std::string& name) {
  auto g = std::make_unique<Golden>();
  g->dir = GoldenDir(name);
  EM_ASSIGN_OR_RETURN(g->file, SafetensorsFile::Open(g->dir + "/golden.safetensors"));
  EM_ASSIGN_OR_RETURN(TensorView ids, g->file->Get("input_ids"));
  if (ids.shape.size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor input_ids has shape ", ShapeString(ids.shape), ", expected 2-D"));
  }
  g->batch = ids.shape[0];
  g->tokens = ids.shape[1];
  EM_ASSIGN_OR_RETURN(TensorView layer0, g->file->Get("prefill_layer_out.0"));
  if (layer0.shape.empty()) return absl::InvalidArgumentError("prefill_layer_out.0 is a scalar");
  g->prefill = layer0.shape[0];
  EM_ASSIGN_OR_RETURN(TensorView logits, g->file->Get("logits"));
  if (logits.shape.size() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor logits has shape ", ShapeString(logits.shape), ", expected 3-D"));
  }
  const int64_t vocab = logits.shape[2];
  EM_RETURN_IF_ERROR(ExpectShape(*g->file, "logits", {g->batch, g->tokens, vocab}));
  EM_RETURN_IF_ERROR(ExpectShape(*g->file, "mtp_logits", {g->batch, g->prefill - 1, vocab}));
  EM_ASSIGN_OR_RETURN(g->input_ids, TensorI32(*g->file, "input_ids"));
  EM_ASSIGN_OR_RETURN(g->logits, TensorF32(*g->file, "logits"));
  EM_ASSIGN_OR_RETURN(g->mtp_logits, TensorF32(*g->file, "mtp_logits"));
  EM_ASSIGN_OR_RETURN(g->logits_floor, LoadNoiseFloor(g->dir, "logits"));
  EM_ASSIGN_OR_RETURN(g->mtp_floor, LoadNoiseFloor(g->dir, "mtp_logits"));
  return g;
}

std::vector<float> ReadF32(const SafetensorsFile& f, const std::string& name) {
  auto v = TensorF32(f, name);
  if (!v.ok()) {
    ADD_FAILURE() << v.status();
    return {};
  }
  return *std::move(v);
}

std::vector<int32_t> ReadI32(const SafetensorsFile& f, const std::string& name) {
  auto v = TensorI32(f, name);
  if (!v.ok()) {
    ADD_FAILURE() << v.status();
    return {};
  }
  return *std::move(v);
}

}  // namespace expertmesh::model::testing
