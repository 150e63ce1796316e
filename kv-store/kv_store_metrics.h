// The kv-store's Prometheus families (docs/metrics.md, "KV store"), one series per tier
// (tier="memory" | "disk"), created up front so that dashboards show 0 rather than a gap.
#pragma once

#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace expertmesh::kv_store {

struct TierMetrics {
  prometheus::Gauge* bytes;
  prometheus::Gauge* blocks;
  prometheus::Gauge* capacity_bytes;
  prometheus::Counter* hits;
  prometheus::Counter* misses;
  prometheus::Counter* evictions;
  prometheus::Counter* corrupt;
  prometheus::Histogram* read_seconds;
  prometheus::Histogram* write_seconds;
};

class KvStoreMetrics {
 public:
  explicit KvStoreMetrics(prometheus::Registry& registry);

  TierMetrics memory;
  TierMetrics disk;
  prometheus::Gauge* referenced_blocks;
};

}  // namespace expertmesh::kv_store
