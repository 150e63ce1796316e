// A strict parser of the Prometheus text exposition format (version 0.0.4) for tests: HELP and
// TYPE lines, samples with labels and values. Every line must parse; a sample's family must have
// been declared by TYPE before it (as prometheus-cpp and the Go client write it).
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh::testing {

struct PromSample {
  std::string name;                           // sample name (may carry _bucket/_sum/_count)
  std::map<std::string, std::string> labels;  // unescaped label values
  double value = 0;
};

struct PromFamily {
  std::string name;
  std::string type;  // counter, gauge, histogram, summary, untyped
  std::string help;
};

struct PromScrape {
  std::map<std::string, PromFamily> families;
  std::vector<PromSample> samples;

  // Samples with this exact name (and, if given, these labels among theirs).
  std::vector<PromSample> Find(std::string_view name,
                               const std::map<std::string, std::string>& labels = {}) const;
};

// Errors: InvalidArgument naming the line number and what is wrong.
absl::StatusOr<PromScrape> ParsePromText(std::string_view text);

}  // namespace expertmesh::testing
