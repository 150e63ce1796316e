// The gateway's Prometheus metrics (docs/metrics.md, "Gateway"): token counters, latency
// histograms, active streams and client disconnects, plus a ResponseWriter wrapper that counts a
// deferred answer under the status it really ended with.
#pragma once

#include <functional>
#include <memory>

#include "gateway/http_server.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace expertmesh::gateway {

struct GatewayMetrics {
  // Registers the families in `registry` (which must outlive this).
  explicit GatewayMetrics(prometheus::Registry& registry);

  prometheus::Counter& prompt_tokens;      // prompt ids sent to attention workers
  prometheus::Counter& generation_tokens;  // ids the workers generated
  prometheus::Counter& client_disconnects;
  prometheus::Counter& resubmits;  // failover: Generate calls moved to another attention worker
  prometheus::Gauge& active_streams;
  prometheus::Histogram& time_to_first_token;
  prometheus::Histogram& time_per_output_token;
  prometheus::Histogram& request_duration;
  prometheus::Histogram& queue_time;
};

// The status a deferred answer is counted under when its client left before any answer (nginx's
// convention for "client closed request").
inline constexpr int kClientGoneStatus = 499;

// Wraps `inner` so that `on_final_status` runs once, when the wrapper is dropped, with the
// status the answer had: Respond's or BeginStream's status, kClientGoneStatus when the client
// left first, 500 when the producer dropped it without an answer (the server then answers 500).
std::shared_ptr<ResponseWriter> CountFinalStatus(std::shared_ptr<ResponseWriter> inner,
                                                 std::function<void(int)> on_final_status);

}  // namespace expertmesh::gateway
