// Test helpers for real binaries: an RAII child process (SIGKILL + waitpid in the destructor, so
// a failing test never leaves a process behind), polling of a `--ready-file` or of any condition,
// and a small blocking HTTP client.
#pragma once

#include <sys/types.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace expertmesh::testing {

// The ports a service wrote to its --ready-file.
struct ReadyPorts {
  int grpc = 0;
  int metrics = 0;
  int http = 0;  // gateway only
};

class ChildProcess {
 public:
  // Starts `argv[0]` with `argv`, stdout+stderr appended to `log_path`. The child gets
  // PR_SET_PDEATHSIG(SIGKILL) so that it dies with the test. Errors: Internal (fork/exec).
  static absl::StatusOr<std::unique_ptr<ChildProcess>> Start(const std::vector<std::string>& argv,
                                                             const std::string& log_path);
  ~ChildProcess();  // SIGKILL (if running) and reap
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_path_; }
  void Signal(int sig);
  // Waits up to `timeout` for the child to exit; returns its wait status, or nullopt on timeout.
  std::optional<int> WaitForExit(absl::Duration timeout);
  bool exited() const { return exited_; }
  // The log so far.
  std::string Log() const;

 private:
  ChildProcess(pid_t pid, std::string log_path) : pid_(pid), log_path_(std::move(log_path)) {}
  pid_t pid_;
  std::string log_path_;
  bool exited_ = false;
  int status_ = 0;
};

// Polls `path` until it holds the JSON {"grpc":..,"metrics":..[,"http":..]} or `timeout`
// passes; also fails early if `child` has exited. Errors: DeadlineExceeded (with the log tail).
absl::StatusOr<ReadyPorts> WaitForReadyFile(const std::string& path, ChildProcess* child,
                                            absl::Duration timeout);

struct HttpResponse {
  int status = 0;
  std::string body;
  std::string content_type;
};
// One HTTP/1.1 request to 127.0.0.1:`port` with "Connection: close". Errors: Unavailable.
absl::StatusOr<HttpResponse> HttpRequest(int port, const std::string& method,
                                         const std::string& target, const std::string& body = "",
                                         absl::Duration timeout = absl::Seconds(10));

// A fresh empty directory under TEST_TMPDIR or /tmp.
std::string MakeTempDir(const std::string& prefix);

// Whether process `pid` exists (and is not a zombie we could still reap).
bool ProcessAlive(pid_t pid);

// Polls `done` every 50 ms until it holds or `timeout` passes; returns its last value.
bool WaitUntil(const std::function<bool()>& done, absl::Duration timeout);

}  // namespace expertmesh::testing
