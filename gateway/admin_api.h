// The gateway's admin listener: the live cluster page (static files compiled into the binary)
// and GET /api/cluster, a JSON snapshot built from the router (members, placement) and the
// members themselves (their /metrics, the kv-store's Stats). It shows the cluster's layout, so
// main.cc binds it to loopback by default and never to the public API port.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "gateway/http_server.h"
#include "nlohmann/json.hpp"

namespace expertmesh::gateway {

// One sample of Prometheus text format (histogram buckets included, as `_bucket` samples).
struct MetricSample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

// Parses Prometheus text exposition; comment lines and lines that do not parse are skipped (a
// page must show what it can, not fail on one odd series).
std::vector<MetricSample> ParsePrometheusText(std::string_view text);

// Blocking HTTP/1.0 GET of http://`address``path` (address = host:port) with one overall
// deadline for connect, send and receive. Errors: InvalidArgument (address), Unavailable
// (connect or read failed), DeadlineExceeded, Internal (non-200 status).
absl::StatusOr<std::string> HttpGet(const std::string& address, const std::string& path,
                                    absl::Duration timeout);

// The page's static files; nullptr for an unknown path. Content type in `content_type`.
const std::string* AdminPageAsset(std::string_view path, std::string* content_type);

struct AdminOptions {
  std::string router;  // host:port; empty = no cluster (the JSON says so)
  int layers = 0;      // model blocks with routed experts (trunk + MTP); 0 = no model
  int experts = 0;     // routed experts per layer
  absl::Duration rpc_timeout = absl::Milliseconds(800);
  absl::Duration scrape_timeout = absl::Milliseconds(600);
};

class AdminApi {
 public:
  explicit AdminApi(AdminOptions options) : options_(std::move(options)) {}
  // GET / and the page's files, GET /api/cluster; 404 otherwise, 405 for non-GET.
  HttpResponse Handle(const HttpRequest& request) const;
  // The /api/cluster document. Never fails: an unreachable router or member is reported in it.
  nlohmann::json ClusterSnapshot() const;

 private:
  AdminOptions options_;
};

}  // namespace expertmesh::gateway
