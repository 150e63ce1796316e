// expertmesh-gateway: the HTTP API (Boost.Beast) and the public gRPC API of the cluster.
#include <cstdio>

#include "core/base/flags.h"
#include "core/base/log.h"
#include "core/base/status_macros.h"
#include "core/rpc/channel.h"
#include "core/rpc/service_process.h"
#include "core/rpc/termination.h"
#include "core/tokenizer/tokenizer.h"
#include "gateway/admin_api.h"
#include "gateway/api_keys.h"
#include "gateway/generation.h"
#include "gateway/gateway_metrics.h"
#include "gateway/gateway_service.h"
#include "gateway/http_api.h"
#include "gateway/http_server.h"

int main(int argc, char** argv) {
  using namespace expertmesh;
  rpc::BlockTerminationSignals();
  rpc::CommonFlags common;
  std::string http_host = "127.0.0.1";
  int64_t http_port = 8000;
  int64_t http_threads = 1;
  std::string model_dir;
  std::string model_name;
  bool register_with_router = true;
  std::string tokenizer_path;
  std::string attention_worker;
  std::vector<std::string> model_aliases;
  int64_t generate_timeout_ms = 30 * 60 * 1000;
  int64_t drain_timeout_ms = 30000;
  std::vector<std::string> api_keys;
  std::string api_keys_file;
  int64_t max_concurrent_per_key = 64;
  std::string admin_host = "127.0.0.1";
  int64_t admin_port = 0;
  std::string admin_port_file;
  base::FlagSet flags("expertmesh-gateway",
                      "The cluster's HTTP API (OpenAI / Anthropic shaped) and public gRPC API.");
  common.Register(flags, /*with_router=*/true);
  flags.AddString("http-host", &http_host, "IP address the HTTP API listens on");
  flags.AddInt("http-port", &http_port, "HTTP API port (0 = pick a free port)");
  flags.AddInt("http-threads", &http_threads, "threads serving HTTP");
  flags.AddString("model", &model_dir, "model directory (config.json) to serve; may be empty");
  flags.AddString("model-name", &model_name, "model id in the API (default: the directory name)");
  flags.AddBool("register", &register_with_router,
                "register with --router as a gateway member (reachability shows on /health)");
  flags.AddString("tokenizer", &tokenizer_path,
                  "tokenizer.json (default: the DeepSeek-V4 tokenizer, $EXPERTMESH_TOKENIZER or "
                  "the one scripts/setup.sh installs)");
  flags.AddString("attention-worker", &attention_worker,
                  "send every sequence to this attention worker (host:port) instead of asking "
                  "--router to pick one");
  flags.AddStringList("model-alias", &model_aliases,
                      "NAME=MODEL: requests naming NAME are served by MODEL (the served model; "
                      "NAME * = any name), for clients configured with model names of their own");
  flags.AddInt("generate-timeout-ms", &generate_timeout_ms,
               "deadline of one Generate call to an attention worker");
  flags.AddInt("drain-timeout-ms", &drain_timeout_ms,
               "on SIGTERM: stop accepting, give running generations this long to finish, then "
               "cancel the rest with an error and exit");
  flags.AddStringList("api-key", &api_keys,
                      "KEY[:TENANT]: accept this API key (Authorization: Bearer KEY or x-api-key); "
                      "the tenant defaults to a fingerprint of the key. No key and no "
                      "--api-keys-file = open");
  flags.AddString("api-keys-file", &api_keys_file,
                  "file of `KEY [TENANT]` lines (# comments), re-read on SIGHUP");
  flags.AddInt("max-concurrent-per-key", &max_concurrent_per_key,
               "generation requests one key may run at once; more get 429 (0 = unlimited)");
  flags.AddString("admin-host", &admin_host,
                  "IP address of the admin listener (the cluster page and /api/cluster); it shows "
                  "the cluster's layout, so keep it on loopback unless the network is trusted");
  flags.AddInt("admin-port", &admin_port,
               "admin listener port (0 = pick a free port, -1 = no admin listener); never the "
               "HTTP API port");
  flags.AddString("admin-port-file", &admin_port_file,
                  "write the admin listener's port to this file before the ready file (for "
                  "supervisors that pass --admin-port=0)");
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv); rc >= 0) return rc;
  if (admin_port < -1 || admin_port > 65535) {
    std::fprintf(stderr, "--admin-port must be -1..65535\n");
    return 2;
  }
  if (admin_port > 0 && admin_port == http_port) {
    std::fprintf(stderr, "--admin-port must differ from --http-port (the page shows the cluster's "
                         "layout; the public API port must not serve it)\n");
    return 2;
  }
  auto keys = gateway::ApiKeys::Create(api_keys, api_keys_file, max_concurrent_per_key);
  if (!keys.ok()) return rpc::ReportSetupError("expertmesh-gateway", keys.status());
  std::shared_ptr<gateway::ApiKeys> key_set = std::move(*keys);
  if (http_port < 0 || http_port > 65535) {
    std::fprintf(stderr, "--http-port must be 0..65535\n");
    return 2;
  }
  auto process = rpc::ServiceProcess::Create("gateway", common);
  if (!process.ok()) return rpc::ReportSetupError("expertmesh-gateway", process.status());
  rpc::ServiceProcess* p = process->get();
  std::optional<gateway::ModelInfo> model;
  if (!model_dir.empty()) {
    auto info = gateway::LoadModelInfo(model_dir, model_name);
    if (!info.ok()) return rpc::ReportSetupError("expertmesh-gateway: --model", info.status());
    model = *info;
    if (absl::Status s = gateway::AddModelAliases(model_aliases, &*model); !s.ok()) {
      return rpc::ReportSetupError("expertmesh-gateway", s);
    }
  } else if (!model_aliases.empty()) {
    std::fprintf(stderr, "expertmesh-gateway: --model-alias needs --model\n");
    return 2;
  }
  // Generation needs the model and a tokenizer; without them the routes answer 501.
  std::unique_ptr<tokenizer::Tokenizer> tok;
  // Before the generator, which reports to it: always registered, so /metrics lists every
  // gateway family even without a tokenizer.
  gateway::GatewayMetrics gateway_metrics(p->registry());
  std::shared_ptr<gateway::Generator> chat;
  if (model) {
    auto loaded = tokenizer::LoadTokenizer(tokenizer_path);
    if (!loaded.ok() && !tokenizer_path.empty()) {
      return rpc::ReportSetupError("expertmesh-gateway: --tokenizer", loaded.status());
    }
    if (loaded.ok()) tok = std::move(*loaded);
  }
  if (tok == nullptr && model) {
    // The default tokenizer is not installed: serve /health and /v1/models, 501 on generation.
    std::fprintf(stderr,
                 "expertmesh-gateway: no tokenizer (run scripts/setup.sh or pass --tokenizer); "
                 "generation routes answer 501\n");
  } else if (model) {
    gateway::GenerationOptions gen;
    gen.router = common.router;
    gen.attention_worker = attention_worker;
    gen.generate_timeout = absl::Milliseconds(generate_timeout_ms);
    gen.metrics = &gateway_metrics;
    chat = std::make_shared<gateway::Generator>(*model, tok.get(), gen);
  }
  gateway::GatewayService service(model);
  p->AddService(&service);
  absl::Status status = p->StartGrpc();
  if (status.ok() && register_with_router) {
    expertmesh::v1::Capacity none;
    p->StartRegistration(expertmesh::v1::WORKER_KIND_GATEWAY, none);
  }
  const std::string router = common.router;
  gateway::HttpApi api(
      model,
      [p, router, register_with_router]() {
        gateway::RouterHealth h;
        h.configured = !router.empty();
        h.address = router;
        if (rpc::RouterRegistration* r = p->registration()) {
          rpc::RouterRegistration::State s = r->state();
          h.registered = s.registered;
          h.worker_id = s.worker_id;
          h.last_error = s.last_error;
          h.reachable = s.last_error.empty() &&
                        absl::Now() - s.last_success < absl::Milliseconds(s.lease_ttl_ms);
        } else if (h.configured && !register_with_router) {
          h.reachable = rpc::CheckHealth(router, absl::Milliseconds(500)).ok();
        }
        return h;
      },
      p->registry(), chat);
  api.SetApiKeys(key_set);
  p->OnHangup([key_set] {
    // A bad file keeps the keys in use: a typo must not lock every client out (or let all in).
    if (absl::Status s = key_set->Reload(); !s.ok()) {
      base::LogError("api keys not reloaded; keeping the previous ones", {{"error", s.ToString()}});
    } else {
      base::LogInfo("api keys reloaded", {{"keys", static_cast<int64_t>(key_set->size())}});
    }
  });
  std::unique_ptr<gateway::HttpServer> http;
  if (status.ok()) {
    auto started = gateway::HttpServer::Start(
        http_host, static_cast<int>(http_port),
        [&api](const gateway::HttpRequest& r) { return api.Handle(r); },
        static_cast<int>(http_threads));
    if (started.ok()) {
      http = std::move(*started);
    } else {
      status = started.status();
    }
  }
  // Its own server and threads: a slow /api/cluster (one RPC deadline per member at most) never
  // holds up the public API.
  gateway::AdminOptions admin_options;
  admin_options.router = common.router;
  if (model) {
    admin_options.layers = model->config.NumBlocks();
    admin_options.experts = model->config.n_routed_experts;
  }
  gateway::AdminApi admin(admin_options);
  std::unique_ptr<gateway::HttpServer> admin_http;
  if (status.ok() && admin_port >= 0) {
    auto started = gateway::HttpServer::Start(
        admin_host, static_cast<int>(admin_port),
        [&admin](const gateway::HttpRequest& r) { return admin.Handle(r); }, 2);
    if (started.ok()) {
      admin_http = std::move(*started);
      base::LogInfo("cluster page", {{"url", "http://" + admin_host + ":" +
                                                 std::to_string(admin_http->port()) + "/"}});
      if (!admin_port_file.empty()) {
        const std::string tmp = admin_port_file + ".tmp";
        FILE* f = std::fopen(tmp.c_str(), "w");
        if (f == nullptr || std::fprintf(f, "%d\n", admin_http->port()) < 0 || std::fclose(f) != 0 ||
            std::rename(tmp.c_str(), admin_port_file.c_str()) != 0) {
          status = absl::FailedPreconditionError("--admin-port-file: cannot write " + admin_port_file);
        }
      }
    } else {
      status = base::Annotate(started.status(), "--admin-port");
    }
  }
  if (status.ok()) status = p->AnnounceReady(http->port());
  if (!status.ok()) return rpc::ServiceProcess::ReportStartError(status);
  return p->WaitForTerminationAndShutdown([&http, &admin_http, &chat, drain_timeout_ms] {
    // Drain: no new connections; requests on open ones get 503 from the generator; running
    // generations finish (or are cancelled with an error at the deadline) before the server
    // stops, so no stream is cut silently.
    http->StopAccepting();
    if (chat != nullptr) chat->Drain(absl::Milliseconds(drain_timeout_ms));
    http->Stop();
    if (admin_http != nullptr) admin_http->Stop();
  });
}
