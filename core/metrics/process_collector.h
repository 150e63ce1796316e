// Process metrics in the Prometheus client convention (process_cpu_seconds_total,
// process_resident_memory_bytes, process_start_time_seconds, process_open_fds, ...), read from
// /proc/self at scrape time so that they cost nothing between scrapes.
#pragma once

#include <vector>

#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"

namespace expertmesh::metrics {

// A prometheus-cpp Collectable; register it on the Exposer. Thread-safe (stateless).
class ProcessCollector final : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override;
};

}  // namespace expertmesh::metrics
