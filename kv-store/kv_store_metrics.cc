#include "kv-store/kv_store_metrics.h"

#include <string>

namespace expertmesh::kv_store {
namespace {

// 10 us (a memory hit of a small block) to 2.5 s (a multi-megabyte block on a slow disk).
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
          0.005,   0.01,     0.025,   0.05,   0.1,     0.25,   0.5,   1,     2.5};
}

}  // namespace

KvStoreMetrics::KvStoreMetrics(prometheus::Registry& registry) {
  auto& bytes = prometheus::BuildGauge()
                    .Name("expertmesh_kv_store_bytes")
                    .Help("Bytes of blocks held by the tier (disk: whole files, headers included).")
                    .Register(registry);
  auto& blocks = prometheus::BuildGauge()
                     .Name("expertmesh_kv_store_blocks")
                     .Help("Blocks held by the tier.")
                     .Register(registry);
  auto& capacity = prometheus::BuildGauge()
                       .Name("expertmesh_kv_store_capacity_bytes")
                       .Help("Capacity of the tier in bytes (0: tier not configured).")
                       .Register(registry);
  auto& hits = prometheus::BuildCounter()
                   .Name("expertmesh_kv_store_hits_total")
                   .Help("GetBlock calls served from the tier.")
                   .Register(registry);
  auto& misses = prometheus::BuildCounter()
                     .Name("expertmesh_kv_store_misses_total")
                     .Help("GetBlock calls the tier could not serve (disk: asked after a memory "
                           "miss and missed too).")
                     .Register(registry);
  auto& evictions = prometheus::BuildCounter()
                        .Name("expertmesh_kv_store_evictions_total")
                        .Help("Blocks the tier evicted to make room.")
                        .Register(registry);
  auto& corrupt = prometheus::BuildCounter()
                      .Name("expertmesh_kv_store_corrupt_blocks_total")
                      .Help("Blocks of the tier that failed their CRC32C or header check (at "
                            "read or at start) and were dropped.")
                      .Register(registry);
  auto& reads = prometheus::BuildHistogram()
                    .Name("expertmesh_kv_store_read_seconds")
                    .Help("Time to read one block from the tier, CRC check included.")
                    .Register(registry);
  auto& writes = prometheus::BuildHistogram()
                     .Name("expertmesh_kv_store_write_seconds")
                     .Help("Time to write one block into the tier.")
                     .Register(registry);
  for (TierMetrics* t : {&memory, &disk}) {
    const std::string tier = t == &memory ? "memory" : "disk";
    const prometheus::Labels labels{{"tier", tier}};
    t->bytes = &bytes.Add(labels);
    t->blocks = &blocks.Add(labels);
    t->capacity_bytes = &capacity.Add(labels);
    t->hits = &hits.Add(labels);
    t->misses = &misses.Add(labels);
    t->evictions = &evictions.Add(labels);
    t->corrupt = &corrupt.Add(labels);
    t->read_seconds = &reads.Add(labels, LatencyBuckets());
    t->write_seconds = &writes.Add(labels, LatencyBuckets());
  }
  referenced_blocks = &prometheus::BuildGauge()
                           .Name("expertmesh_kv_store_referenced_blocks")
                           .Help("Blocks referenced by a live sequence (never evicted).")
                           .Register(registry)
                           .Add({});
}

}  // namespace expertmesh::kv_store
