// `expertmesh up`: starts the local cluster on loopback (cli/local_cluster.h), writes
// <run-dir>/cluster.json for tests and tools, and keeps the cluster up until Ctrl-C or SIGTERM.
// A service that dies is restarted (with backoff, a bounded number of times a minute, its log
// tail printed); with --exit-on-failure, or past the restart limit, `up` stops everything and
// exits 1 instead.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/local_cluster.h"
#include "core/model/model_maker.h"
#include "core/base/flags.h"
#include "core/rpc/service_process.h"
#include "core/rpc/termination.h"

#ifndef EM_REPO_DIR
#error "EM_REPO_DIR must be defined by the build"
#endif

namespace expertmesh::cli {
namespace {

std::string Dirname(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos || slash == 0 ? std::string("/") : path.substr(0, slash);
}

bool Exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

// mkdir -p
bool MakeDirs(const std::string& path) {
  if (path.empty() || Exists(path)) return true;
  if (!MakeDirs(Dirname(path))) return false;
  return mkdir(path.c_str(), 0755) == 0 || errno == EEXIST;
}

int g_signal = 0;

// Takes a pending SIGTERM/SIGINT without blocking (they are blocked and taken synchronously).
bool SignalPending() {
  if (g_signal == 0) g_signal = rpc::WaitForTerminationSignalFor(0);
  return g_signal != 0;
}

}  // namespace

int RunUp(int argc, char** argv) {
  // Before any thread exists, so that every thread inherits the mask (see termination.h).
  rpc::BlockTerminationSignals();
  LocalClusterOptions options;
  int64_t http_port = options.http_port;
  int64_t admin_port = options.admin_port;
  int64_t base_port = options.base_port;
  int64_t ready_timeout_s = 60;
  int64_t attention_workers = options.attention_workers;
  int64_t expert_workers = options.expert_workers;
  int64_t expert_replicas = options.expert_replicas;
  int64_t max_restarts = options.max_restarts_per_minute;
  int64_t hosts = options.hosts;
  bool exit_on_failure = false;
  std::string bin_dir;
  const std::string repo = EM_REPO_DIR;
  std::string model_dir = repo + "/var/models/tiny";
  std::string log_dir = repo + "/var/log/up";
  std::string run_dir = repo + "/var/run";
  std::vector<std::string> api_keys;
  std::vector<std::string> model_aliases;
  std::string api_keys_file;
  int64_t max_concurrent_per_key = 64;
  base::FlagSet flags("expertmesh up",
                     "Starts router, kv-store, A attention workers, E expert workers and the "
                     "gateway on loopback (or across --hosts network namespaces), writes "
                     "<run-dir>/cluster.json, restarts services that "
                     "die, and stops them all on Ctrl-C or SIGTERM.");
  flags.AddInt("http-port", &http_port, "gateway HTTP API port (0 = pick a free port)");
  flags.AddInt("admin-port", &admin_port,
               "port of the gateway's cluster page (loopback; 0 = pick a free port; `up` prints "
               "its URL and cluster.json has it as admin_url)");
  flags.AddInt("base-port", &base_port,
               "service i (router, kv-store, attention-worker-0.., expert-worker-0.., gateway) "
               "gets gRPC port base+i and metrics port base+i+max(10, services) (0 = all ports "
               "picked freely)");
  flags.AddInt("attention-workers", &attention_workers, "number of attention workers (A)");
  flags.AddInt("expert-workers", &expert_workers, "number of expert workers (E)");
  flags.AddInt("expert-replicas", &expert_replicas,
               "replicas per expert, passed to the router (needs a router with the flag)");
  flags.AddString("run-dir", &run_dir, "directory for cluster.json");
  flags.AddBool("exit-on-failure", &exit_on_failure,
                "stop the cluster and exit 1 when a service dies instead of restarting it");
  flags.AddInt("max-restarts-per-minute", &max_restarts,
               "restarts allowed per service within a minute before `up` gives up");
  flags.AddString("host", &options.host, "loopback address the services bind");
  flags.AddInt("hosts", &hosts,
               "run the services across N network namespaces (N > 1 needs root): router, "
               "kv-store and gateway on host 0, workers round-robin; removed on exit");
  flags.AddString("hosts-subnet", &options.hosts_subnet,
                  "IPv4 subnet of --hosts: the machine's bridge gets its first address, host i "
                  "the (i+2)th");
  flags.AddString("model", &model_dir,
                  "model directory; the default is created (preset tiny, seed 0) if absent");
  flags.AddString("log-dir", &log_dir, "directory for <service>.log and ready files");
  flags.AddString("log-level", &options.log_level, "services' log level");
  flags.AddInt("lease-ms", &options.lease_ms, "router lease TTL in milliseconds");
  flags.AddInt("ready-timeout-s", &ready_timeout_s,
               "how long to wait for all services to be healthy");
  flags.AddString("bin-dir", &bin_dir,
                  "build tree with the service binaries (default: the tree of this expertmesh)");
  flags.AddStringList("api-key", &api_keys,
                      "KEY[:TENANT]: the gateway accepts only these keys (and those of "
                      "--api-keys-file); none = open");
  flags.AddString("api-keys-file", &api_keys_file,
                  "gateway keys file, `KEY [TENANT]` per line; re-read when the gateway gets "
                  "SIGHUP");
  flags.AddInt("max-concurrent-per-key", &max_concurrent_per_key,
               "generation requests one API key may run at once in the gateway (0 = "
               "unlimited)");
  flags.AddStringList("model-alias", &model_aliases,
                      "NAME=MODEL: the gateway serves requests naming NAME (* = any name) with "
                      "the model");
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv, "expertmesh up: "); rc >= 0) return rc;
  for (const std::string& k : api_keys) options.extra_gateway_args.push_back("--api-key=" + k);
  for (const std::string& a : model_aliases) {
    options.extra_gateway_args.push_back("--model-alias=" + a);
  }
  if (!api_keys_file.empty()) {
    if (!Exists(api_keys_file)) {
      std::fprintf(stderr, "expertmesh up: --api-keys-file %s does not exist\n",
                   api_keys_file.c_str());
      return 2;
    }
    options.extra_gateway_args.push_back("--api-keys-file=" + api_keys_file);
  }
  if (max_concurrent_per_key < 0) {
    std::fprintf(stderr, "expertmesh up: --max-concurrent-per-key must be >= 0\n");
    return 2;
  }
  options.extra_gateway_args.push_back("--max-concurrent-per-key=" +
                                       std::to_string(max_concurrent_per_key));
  if (attention_workers < 1 || attention_workers > 1000 || expert_workers < 1 ||
      expert_workers > 1000) {
    std::fprintf(stderr,
                 "expertmesh up: --attention-workers and --expert-workers must be 1..1000\n");
    return 2;
  }
  if (expert_replicas < 1 || max_restarts < 0) {
    std::fprintf(stderr,
                 "expertmesh up: --expert-replicas must be >= 1, --max-restarts-per-minute "
                 ">= 0\n");
    return 2;
  }
  const int services = static_cast<int>(attention_workers + expert_workers) + 3;
  if (http_port < 0 || http_port > 65535 || base_port < 0 ||
      !PortRangeFits(static_cast<int>(std::min<int64_t>(base_port, 65535)), services)) {
    std::fprintf(stderr,
                 "expertmesh up: --http-port or --base-port out of range (%d services need "
                 "base..base+%d)\n",
                 services, services - 1 + std::max(10, services));
    return 2;
  }
  if (!Exists(model_dir + "/config.json")) {
    if (Exists(model_dir)) {
      std::fprintf(stderr, "expertmesh up: %s exists but has no config.json\n", model_dir.c_str());
      return 1;
    }
    std::fprintf(stderr, "up: creating the default model (preset tiny, seed 0) at %s\n",
                 model_dir.c_str());
    MakeDirs(Dirname(model_dir));
    absl::Status made = model::WriteModelPreset("tiny", 0, model_dir);
    if (!made.ok()) {
      std::fprintf(stderr, "expertmesh up: no model at %s and creating it failed: %s\n",
                   model_dir.c_str(), made.ToString().c_str());
      return 1;
    }
  }
  if (!MakeDirs(log_dir)) {
    std::fprintf(stderr, "expertmesh up: cannot create --log-dir %s\n", log_dir.c_str());
    return 1;
  }
  if (hosts < 1 || hosts > 250) {
    std::fprintf(stderr, "expertmesh up: --hosts must be 1..250\n");
    return 2;
  }
  options.hosts = static_cast<int>(hosts);
  options.http_port = static_cast<int>(http_port);
  if (admin_port < 0 || admin_port > 65535 || (admin_port != 0 && admin_port == http_port)) {
    std::fprintf(stderr, "expertmesh up: --admin-port must be 0..65535 and differ from "
                         "--http-port\n");
    return 2;
  }
  options.admin_port = static_cast<int>(admin_port);
  options.base_port = static_cast<int>(base_port);
  options.bin_dir = bin_dir;  // empty: LocalCluster resolves the tree of this executable
  options.model_dir = model_dir;
  options.log_dir = log_dir;
  options.run_dir = run_dir;
  options.attention_workers = static_cast<int>(attention_workers);
  options.expert_workers = static_cast<int>(expert_workers);
  options.expert_replicas = static_cast<int>(expert_replicas);
  options.restart_on_failure = !exit_on_failure;
  options.max_restarts_per_minute = static_cast<int>(max_restarts);
  options.ready_timeout = absl::Seconds(ready_timeout_s);
  options.should_abort = SignalPending;

  auto cluster = LocalCluster::Start(options);
  if (!cluster.ok()) {
    std::fprintf(stderr, "expertmesh up: %s\n", std::string(cluster.status().message()).c_str());
    return g_signal != 0 ? 130 : 1;
  }
  std::printf("expertmesh is up\n%s\nPress Ctrl-C to stop.\n", (*cluster)->Summary().c_str());
  std::fflush(stdout);
  int exit_code = 0;
  while (true) {
    if (g_signal == 0) g_signal = rpc::WaitForTerminationSignalFor(200);
    if (g_signal != 0) {
      std::fprintf(stderr, "up: %s received; stopping the cluster\n", strsignal(g_signal));
      break;
    }
    if (absl::Status s = (*cluster)->Supervise(); !s.ok()) {
      std::fprintf(stderr, "expertmesh up: %s\nexpertmesh up: stopping the cluster\n",
                   std::string(s.message()).c_str());
      exit_code = 1;
      break;
    }
  }
  (*cluster)->Stop();
  std::fprintf(stderr, "up: all services stopped\n");
  return exit_code;
}

}  // namespace expertmesh::cli
