// Network namespaces for `expertmesh up --hosts N`: N "hosts" on one machine, each a network
// namespace with one veth link to a bridge in the root namespace, each with its own IPv4 address
// from a subnet (default 198.18.0.0/15, the benchmarking range, so that it never collides with a
// real network). The bridge itself gets the subnet's first address, so that the machine's own
// processes (the supervisor's health checks, a user's curl) reach every host.
//
// The links are made with iproute2's `ip`, run with fork/exec: a 3-host network takes ~20 short
// commands (tens of milliseconds, measured), so netlink code of our own would buy nothing.
//
// Names carry the pid of the `up` that made them (namespaces em-<pid>-h<i>, bridge em-<pid>-br,
// host-side veths em-<pid>-v<i>), so that a later `up` removes what a killed one left behind
// (RemoveStale) without touching the objects of one still running.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace expertmesh::cli {

struct Ipv4Subnet {
  uint32_t base = 0;  // host byte order, host bits zero
  int prefix = 0;
};
// "a.b.c.d/p" with p in 8..30. Errors: InvalidArgument naming `field`.
absl::StatusOr<Ipv4Subnet> ParseIpv4Subnet(const std::string& text,
                                           const std::string& field = "--hosts-subnet");
std::string FormatIpv4(uint32_t address);
// Address `index` of the plan: 0 = the bridge (base+1), 1 + i = host i. Errors: OutOfRange when
// the subnet has no room for it (the broadcast address is never handed out).
absl::StatusOr<std::string> SubnetAddress(const Ipv4Subnet& subnet, int index);

// The owning pid of an object named em-<pid>-..., nullopt for other names.
std::optional<pid_t> OwnerPidOfName(const std::string& name);

// Whether this process holds CAP_SYS_ADMIN and CAP_NET_ADMIN (what `ip netns add`, `ip link add`
// and setns need).
bool HasNetnsPrivilege();

class HostNetwork {
 public:
  struct Host {
    std::string netns;    // em-<pid>-h<i>
    std::string address;  // IPv4, no prefix
    std::string veth;     // host-side end, on the bridge
  };
  // Removes stale objects of dead `up`s, then creates `hosts` namespaces on a fresh bridge.
  // Errors: PermissionDenied (saying which privilege is missing), InvalidArgument (subnet),
  // FailedPrecondition (ip missing, the subnet's bridge address already in use), Internal (an
  // ip command failed; its output is in the message). On error, what was made is removed.
  static absl::StatusOr<std::unique_ptr<HostNetwork>> Create(
      int hosts, const std::string& subnet,
      const std::function<void(const std::string&)>& say = nullptr);
  ~HostNetwork();  // Remove()
  HostNetwork(const HostNetwork&) = delete;
  HostNetwork& operator=(const HostNetwork&) = delete;

  const std::vector<Host>& hosts() const { return hosts_; }
  const std::string& bridge() const { return bridge_; }
  const std::string& bridge_address() const { return bridge_address_; }
  int prefix() const { return prefix_; }
  // Deletes the namespaces, veths and bridge. Processes still inside a namespace keep it alive
  // (the kernel frees it with its last process), so stop them first. Idempotent.
  void Remove();

  // Removes namespaces and links named em-<pid>-... whose pid is not alive. Returns how many.
  static int RemoveStale();

 private:
  HostNetwork() = default;
  std::vector<Host> hosts_;
  std::string bridge_;
  std::string bridge_address_;
  int prefix_ = 0;
  bool removed_ = false;
};

// Opens the namespace's file (/run/netns/<name>) for setns; -1 with errno on failure.
int OpenNetns(const std::string& name);

// Runs `ip` with `args`; its stdout and stderr are returned. Errors: FailedPrecondition when ip
// is not installed, PermissionDenied when it says "Operation not permitted", Internal otherwise.
absl::StatusOr<std::string> RunIp(const std::vector<std::string>& args);

}  // namespace expertmesh::cli
