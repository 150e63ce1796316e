#include "gateway/admin_api.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <future>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/rpc/channel.h"
#include "expertmesh/v1/kv_store.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace expertmesh::gateway {
namespace {

using nlohmann::json;

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

// Parses `{a="x",b="y"}` from s (at '{'); returns the position after '}' or npos.
size_t ParseLabels(std::string_view s, std::map<std::string, std::string>* labels) {
  size_t i = 1;
  while (i < s.size()) {
    while (i < s.size() && (s[i] == ',' || s[i] == ' ')) ++i;
    if (i < s.size() && s[i] == '}') return i + 1;
    size_t eq = s.find('=', i);
    if (eq == std::string_view::npos || eq + 1 >= s.size() || s[eq + 1] != '"') {
      return std::string_view::npos;
    }
    std::string name(Trim(s.substr(i, eq - i)));
    std::string value;
    size_t j = eq + 2;
    for (; j < s.size() && s[j] != '"'; ++j) {
      if (s[j] == '\\' && j + 1 < s.size()) {
        ++j;
        value.push_back(s[j] == 'n' ? '\n' : s[j]);
      } else {
        value.push_back(s[j]);
      }
    }
    if (j >= s.size()) return std::string_view::npos;
    (*labels)[name] = std::move(value);
    i = j + 1;
  }
  return std::string_view::npos;
}

int64_t MillisLeft(absl::Time deadline) {
  return std::max<int64_t>(0, absl::ToInt64Milliseconds(deadline - absl::Now()));
}

const char* KindName(expertmesh::v1::WorkerKind kind) {
  switch (kind) {
    case expertmesh::v1::WORKER_KIND_GATEWAY: return "gateway";
    case expertmesh::v1::WORKER_KIND_ATTENTION: return "attention";
    case expertmesh::v1::WORKER_KIND_EXPERT: return "expert";
    case expertmesh::v1::WORKER_KIND_KV_STORE: return "kv_store";
    default: return "unknown";
  }
}

const char* StateName(expertmesh::v1::MemberState state) {
  switch (state) {
    case expertmesh::v1::MEMBER_STATE_ALIVE: return "alive";
    case expertmesh::v1::MEMBER_STATE_SUSPECT: return "suspect";
    default: return "unknown";
  }
}

// Counters and histogram sums the page turns into rates and mean latencies; summed over labels.
constexpr std::string_view kSummed[] = {
    "expertmesh_expert_tokens_total",
    "expertmesh_expert_dispatches_total",
    "expertmesh_expert_dispatch_seconds_sum",
    "expertmesh_expert_dispatch_seconds_count",
    "expertmesh_gateway_prompt_tokens_total",
    "expertmesh_gateway_generation_tokens_total",
    "expertmesh_gateway_request_duration_seconds_sum",
    "expertmesh_gateway_request_duration_seconds_count",
    "expertmesh_gateway_time_to_first_token_seconds_sum",
    "expertmesh_gateway_time_to_first_token_seconds_count",
    "expertmesh_gateway_active_streams",
};

struct MemberLive {
  bool reachable = false;
  std::string error;
  json metrics = json::object();
  json expert_tokens = json::array();  // [layer, expert, tokens]
  json kv_tiers;                       // null unless a kv-store answered Stats
};

MemberLive Scrape(const std::string& metrics_address, absl::Duration timeout) {
  MemberLive live;
  if (metrics_address.empty()) {
    live.error = "no metrics address";
    return live;
  }
  absl::StatusOr<std::string> text = HttpGet(metrics_address, "/metrics", timeout);
  if (!text.ok()) {
    live.error = text.status().ToString();
    return live;
  }
  live.reachable = true;
  for (const MetricSample& s : ParsePrometheusText(*text)) {
    for (std::string_view name : kSummed) {
      if (s.name == name) {
        live.metrics[s.name] = live.metrics.value(s.name, 0.0) + s.value;
        break;
      }
    }
    if (s.name == "expertmesh_expert_tokens_total") {
      auto l = s.labels.find("layer");
      auto e = s.labels.find("expert");
      int layer = 0, expert = 0;
      if (l != s.labels.end() && e != s.labels.end() && absl::SimpleAtoi(l->second, &layer) &&
          absl::SimpleAtoi(e->second, &expert)) {
        live.expert_tokens.push_back({layer, expert, static_cast<uint64_t>(s.value)});
      }
    }
  }
  return live;
}

json KvTiers(const std::string& address, absl::Duration timeout, std::string* error) {
  auto stub = expertmesh::v1::KvStore::NewStub(rpc::MakeChannel(address));
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  expertmesh::v1::KvStatsResponse resp;
  grpc::Status st = stub->Stats(&ctx, expertmesh::v1::KvStatsRequest(), &resp);
  if (!st.ok()) {
    *error = absl::StrCat("kv-store Stats: ", st.error_message());
    return nullptr;
  }
  json tiers = json::array();
  for (const auto& t : resp.tiers()) {
    tiers.push_back({{"tier", t.tier()},
                     {"blocks", t.blocks()},
                     {"bytes", t.bytes()},
                     {"capacity_bytes", t.capacity_bytes()},
                     {"hits", t.hits()},
                     {"misses", t.misses()},
                     {"evictions", t.evictions()}});
  }
  return tiers;
}

}  // namespace

std::vector<MetricSample> ParsePrometheusText(std::string_view text) {
  std::vector<MetricSample> out;
  while (!text.empty()) {
    size_t nl = text.find('\n');
    std::string_view line = Trim(text.substr(0, nl));
    text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    if (line.empty() || line.front() == '#') continue;
    MetricSample s;
    size_t name_end = line.find_first_of("{ ");
    if (name_end == std::string_view::npos) continue;
    s.name = std::string(line.substr(0, name_end));
    std::string_view rest = line.substr(name_end);
    if (rest.front() == '{') {
      size_t after = ParseLabels(rest, &s.labels);
      if (after == std::string_view::npos) continue;
      rest = rest.substr(after);
    }
    rest = Trim(rest);
    // A timestamp may follow the value.
    std::string value(rest.substr(0, rest.find(' ')));
    if (value == "+Inf") {
      s.value = HUGE_VAL;
    } else if (value == "-Inf") {
      s.value = -HUGE_VAL;
    } else if (value == "NaN") {
      s.value = std::nan("");
    } else if (!absl::SimpleAtod(value, &s.value)) {
      continue;
    }
    out.push_back(std::move(s));
  }
  return out;
}

absl::StatusOr<std::string> HttpGet(const std::string& address, const std::string& path,
                                    absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError("address: want host:port, got \"" + address + "\"");
  }
  std::string host = address.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  const std::string port = address.substr(colon + 1);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  // Numeric only: a name lookup could block past the deadline.
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) {
    return absl::InvalidArgumentError("address: \"" + address + "\" is not a numeric host:port");
  }
  int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    freeaddrinfo(res);
    return absl::UnavailableError(absl::StrCat("socket: ", std::strerror(errno)));
  }
  int rc = connect(fd, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
  auto fail = [fd](absl::Status s) {
    close(fd);
    return s;
  };
  if (rc != 0 && errno != EINPROGRESS) {
    return fail(absl::UnavailableError(absl::StrCat("connect ", address, ": ", std::strerror(errno))));
  }
  auto wait_for = [&](short events) -> absl::Status {
    pollfd p{fd, events, 0};
    int n = poll(&p, 1, static_cast<int>(MillisLeft(deadline)));
    if (n == 0) return absl::DeadlineExceededError("GET " + address + path + ": timed out");
    if (n < 0) return absl::UnavailableError(absl::StrCat("poll: ", std::strerror(errno)));
    return absl::OkStatus();
  };
  if (rc != 0) {
    if (absl::Status s = wait_for(POLLOUT); !s.ok()) return fail(s);
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      return fail(absl::UnavailableError(absl::StrCat("connect ", address, ": ", std::strerror(err))));
    }
  }
  const std::string request =
      absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ", address, "\r\nConnection: close\r\n\r\n");
  size_t sent = 0;
  while (sent < request.size()) {
    if (absl::Status s = wait_for(POLLOUT); !s.ok()) return fail(s);
    ssize_t n = send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno != EAGAIN && errno != EINTR) {
      return fail(absl::UnavailableError(absl::StrCat("send: ", std::strerror(errno))));
    }
    if (n > 0) sent += static_cast<size_t>(n);
  }
  std::string response;
  char buf[16384];
  while (true) {
    if (absl::Status s = wait_for(POLLIN); !s.ok()) return fail(s);
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      return fail(absl::UnavailableError(absl::StrCat("recv: ", std::strerror(errno))));
    }
    response.append(buf, static_cast<size_t>(n));
    // Bounds memory if a port answers with something endless.
    if (response.size() > (64u << 20)) return fail(absl::ResourceExhaustedError("response over 64 MiB"));
  }
  close(fd);
  size_t header_end = response.find("\r\n\r\n");
  if (header_end == std::string::npos) return absl::UnavailableError("GET " + address + path + ": no HTTP header");
  size_t sp = response.find(' ');
  if (sp == std::string::npos || response.compare(sp + 1, 3, "200") != 0) {
    return absl::InternalError("GET " + address + path + ": " + response.substr(0, response.find("\r\n")));
  }
  return response.substr(header_end + 4);
}

json AdminApi::ClusterSnapshot() const {
  json out = {{"time_ms", absl::ToUnixMillis(absl::Now())}};
  out["model"] = options_.layers > 0
                     ? json{{"layers", options_.layers}, {"experts", options_.experts}}
                     : json(nullptr);
  json router = {{"address", options_.router}, {"ok", false}};
  out["members"] = json::array();
  out["placement"] = nullptr;
  if (options_.router.empty()) {
    router["error"] = "the gateway has no --router";
    out["router"] = router;
    return out;
  }
  auto stub = expertmesh::v1::Router::NewStub(rpc::MakeChannel(options_.router));
  expertmesh::v1::ListMembersResponse members;
  expertmesh::v1::PlacementTable table;
  grpc::Status members_status, placement_status;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_timeout));
    members_status = stub->ListMembers(&ctx, expertmesh::v1::ListMembersRequest(), &members);
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_timeout));
    placement_status = stub->GetPlacement(&ctx, expertmesh::v1::GetPlacementRequest(), &table);
  }
  if (!members_status.ok() || !placement_status.ok()) {
    const grpc::Status& bad = members_status.ok() ? placement_status : members_status;
    router["error"] = absl::StrCat(members_status.ok() ? "GetPlacement: " : "ListMembers: ",
                                   bad.error_message());
  } else {
    router["ok"] = true;
  }
  out["router"] = router;
  if (placement_status.ok()) {
    json experts = json::array();
    for (const auto& p : table.experts()) {
      json ids = json::array();
      for (uint64_t id : p.worker_ids()) ids.push_back(id);
      experts.push_back({p.layer(), p.expert(), std::move(ids)});
    }
    json workers = json::object();
    for (const auto& [id, addr] : table.worker_addresses()) workers[std::to_string(id)] = addr;
    json unplaced = json::array();
    for (const auto& u : table.unplaced()) unplaced.push_back({u.layer(), u.expert()});
    out["placement"] = {{"version", table.version()},
                        {"experts", std::move(experts)},
                        {"workers", std::move(workers)},
                        {"unplaced", std::move(unplaced)}};
  }
  if (!members_status.ok()) return out;
  // Every member at once: a dead one costs one timeout, not one per member.
  std::vector<std::future<MemberLive>> live;
  for (const auto& m : members.members()) {
    live.push_back(std::async(std::launch::async, [m, this] {
      MemberLive l = Scrape(m.metrics_address(), options_.scrape_timeout);
      if (m.kind() == expertmesh::v1::WORKER_KIND_KV_STORE) {
        std::string error;
        l.kv_tiers = KvTiers(m.address(), options_.rpc_timeout, &error);
        if (!error.empty()) l.error = l.error.empty() ? error : l.error + "; " + error;
      }
      return l;
    }));
  }
  for (int i = 0; i < members.members_size(); ++i) {
    const auto& m = members.members(i);
    MemberLive l = live[i].get();
    json j = {{"worker_id", m.worker_id()},
              {"kind", KindName(m.kind())},
              {"address", m.address()},
              {"metrics_address", m.metrics_address()},
              {"state", StateName(m.state())},
              {"ms_since_heartbeat", m.ms_since_heartbeat()},
              {"lease_remaining_ms", m.lease_remaining_ms()},
              {"version", m.version()},
              {"reachable", l.reachable},
              {"metrics", std::move(l.metrics)},
              {"expert_tokens", std::move(l.expert_tokens)},
              {"kv_tiers", std::move(l.kv_tiers)},
              {"active_sequences", m.load().active_sequences()},
              {"queued_sequences", m.load().queued_sequences()}};
    if (!l.error.empty()) j["error"] = l.error;
    out["members"].push_back(std::move(j));
  }
  return out;
}

HttpResponse AdminApi::Handle(const HttpRequest& request) const {
  HttpResponse r;
  std::string path = request.target.substr(0, request.target.find('?'));
  if (request.method != "GET" && request.method != "HEAD") {
    r.status = 405;
    r.body = R"({"error":"method: only GET is served here"})";
    r.headers.push_back({"Allow", "GET"});
    return r;
  }
  if (path == "/api/cluster") {
    r.body = ClusterSnapshot().dump();
    r.headers.push_back({"Cache-Control", "no-store"});
    return r;
  }
  if (path == "/favicon.ico") {
    r.status = 204;
    r.content_type = "image/x-icon";
    return r;
  }
  std::string type;
  if (const std::string* asset = AdminPageAsset(path == "/" ? "/index.html" : path, &type)) {
    r.content_type = type;
    r.body = *asset;
    return r;
  }
  r.status = 404;
  r.body = R"({"error":"path: not found"})";
  return r;
}

}  // namespace expertmesh::gateway
