// `expertmesh up`: starts the local cluster on loopback (cli/local_cluster.h) and keeps it up
// until Ctrl-C or SIGTERM. If a service dies unexpectedly, `up` reports it and stops the rest:
// a half cluster would only hide the failure.
#include <limits.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/local_cluster.h"
#include "core/model/model_maker.h"
#include "core/rpc/service_flags.h"
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
  int64_t base_port = options.base_port;
  int64_t ready_timeout_s = 60;
  std::string bin_dir;
  const std::string repo = EM_REPO_DIR;
  std::string model_dir = repo + "/var/models/tiny";
  std::string log_dir = repo + "/var/log/up";
  rpc::FlagSet flags("expertmesh up",
                     "Starts router, kv-store, one attention worker, two expert workers and the "
                     "gateway on loopback; stops them all on Ctrl-C or SIGTERM.");
  flags.AddInt("http-port", &http_port, "gateway HTTP API port (0 = pick a free port)");
  flags.AddInt("base-port", &base_port,
               "gRPC ports are base..base+5 (router, kv-store, attention-worker, expert-worker-0, "
               "expert-worker-1, gateway), metrics ports base+10..base+15 (0 = all picked freely)");
  flags.AddString("host", &options.host, "loopback address the services bind");
  flags.AddString("model", &model_dir,
                  "model directory; the default is created (preset tiny, seed 0) if absent");
  flags.AddString("log-dir", &log_dir, "directory for <service>.log and ready files");
  flags.AddString("log-level", &options.log_level, "services' log level");
  flags.AddInt("lease-ms", &options.lease_ms, "router lease TTL in milliseconds");
  flags.AddInt("ready-timeout-s", &ready_timeout_s,
               "how long to wait for all services to be healthy");
  flags.AddString("bin-dir", &bin_dir,
                  "build tree with the service binaries (default: the tree of this expertmesh)");
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv, "expertmesh up: "); rc >= 0) return rc;
  if (http_port < 0 || http_port > 65535 || base_port < 0 || base_port > 65535 - 15) {
    std::fprintf(stderr, "expertmesh up: --http-port or --base-port out of range\n");
    return 2;
  }
  if (bin_dir.empty()) {
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n <= 0) {
      std::fprintf(stderr, "expertmesh up: cannot resolve /proc/self/exe; pass --bin-dir\n");
      return 1;
    }
    exe[n] = '\0';
    bin_dir = Dirname(Dirname(exe));  // <build>/cli/expertmesh -> <build>
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
  options.http_port = static_cast<int>(http_port);
  options.base_port = static_cast<int>(base_port);
  options.bin_dir = bin_dir;
  options.model_dir = model_dir;
  options.log_dir = log_dir;
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
    if (auto dead = (*cluster)->ReapExited()) {
      std::fprintf(stderr,
                   "expertmesh up: %s (pid %d) stopped unexpectedly (wait status %d); stopping "
                   "the cluster. Last lines of %s:\n%s",
                   dead->name.c_str(), static_cast<int>(dead->pid), dead->wait_status,
                   dead->log_path.c_str(), TailFile(dead->log_path, 20).c_str());
      exit_code = 1;
      break;
    }
  }
  (*cluster)->Stop();
  std::fprintf(stderr, "up: all services stopped\n");
  return exit_code;
}

}  // namespace expertmesh::cli
