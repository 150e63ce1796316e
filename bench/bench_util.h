// Small helpers shared by the benchmarks: wall time, medians, and reporting a failed step.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace expertmesh::bench {

using Clock = std::chrono::steady_clock;

inline double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// The median (mean of the two middle values for an even count). REQUIRES: v not empty.
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Prints "<program>: <status>" to stderr and returns 1, the exit code for main.
inline int Fail(const char* program, const absl::Status& s) {
  std::fprintf(stderr, "%s: %s\n", program, std::string(s.message()).c_str());
  return 1;
}

}  // namespace expertmesh::bench
