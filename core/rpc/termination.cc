#include "core/rpc/termination.h"

#include <signal.h>
#include <time.h>

#include <cerrno>

namespace expertmesh::rpc {
namespace {
sigset_t TerminationSet() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  return set;
}
}  // namespace

void BlockTerminationSignals() {
  sigset_t set = TerminationSet();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int WaitForTerminationSignal() {
  sigset_t set = TerminationSet();
  int sig = 0;
  while (sigwait(&set, &sig) != 0) {
  }
  return sig;
}

int WaitForTerminationSignalFor(int timeout_ms) {
  sigset_t set = TerminationSet();
  timespec ts{timeout_ms / 1000, (timeout_ms % 1000) * 1000000L};
  while (true) {
    int sig = sigtimedwait(&set, nullptr, &ts);
    if (sig > 0) return sig;
    if (errno == EAGAIN) return 0;
    // EINTR: another signal interrupted the wait; wait again (the remaining time restarts,
    // which only lengthens one poll period).
  }
}

}  // namespace expertmesh::rpc
