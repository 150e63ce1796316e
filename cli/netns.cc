#include "cli/netns.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace expertmesh::cli {
namespace {

constexpr const char* kNetnsDir = "/run/netns";
// Capability bit numbers from <linux/capability.h>.
constexpr int kCapNetAdmin = 12;
constexpr int kCapSysAdmin = 21;

std::string IpBinary() {
  for (const char* p : {"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"}) {
    if (access(p, X_OK) == 0) return p;
  }
  return "";
}

bool PidAlive(pid_t pid) { return kill(pid, 0) == 0 || errno == EPERM; }

std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") out.push_back(name);
  }
  closedir(d);
  return out;
}

std::string PrivilegeMessage() {
  return "--hosts N > 1 creates network namespaces, veth links and a bridge, which needs "
         "CAP_SYS_ADMIN and CAP_NET_ADMIN (run `expertmesh up` as root, e.g. with sudo); without "
         "them use --hosts 1 (every service on loopback)";
}

}  // namespace

absl::StatusOr<Ipv4Subnet> ParseIpv4Subnet(const std::string& text, const std::string& field) {
  const size_t slash = text.find('/');
  if (slash == std::string::npos) {
    return absl::InvalidArgumentError(field + " must be a.b.c.d/prefix, got '" + text + "'");
  }
  in_addr addr;
  if (inet_pton(AF_INET, text.substr(0, slash).c_str(), &addr) != 1) {
    return absl::InvalidArgumentError(field + ": '" + text.substr(0, slash) +
                                      "' is not an IPv4 address");
  }
  const std::string p = text.substr(slash + 1);
  char* end = nullptr;
  const long prefix = std::strtol(p.c_str(), &end, 10);
  if (p.empty() || *end != '\0' || prefix < 8 || prefix > 30) {
    return absl::InvalidArgumentError(field + ": prefix '" + p + "' must be 8..30");
  }
  Ipv4Subnet s;
  s.prefix = static_cast<int>(prefix);
  const uint32_t mask = ~uint32_t{0} << (32 - s.prefix);
  s.base = ntohl(addr.s_addr) & mask;
  return s;
}

std::string FormatIpv4(uint32_t address) {
  in_addr a;
  a.s_addr = htonl(address);
  char text[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &a, text, sizeof(text));
  return text;
}

absl::StatusOr<std::string> SubnetAddress(const Ipv4Subnet& subnet, int index) {
  const uint64_t size = uint64_t{1} << (32 - subnet.prefix);
  // Offsets 1..size-2: neither the network nor the broadcast address.
  const uint64_t offset = static_cast<uint64_t>(index) + 1;
  if (index < 0 || offset > size - 2) {
    return absl::OutOfRangeError("--hosts-subnet /" + std::to_string(subnet.prefix) +
                                 " has no room for address " + std::to_string(index));
  }
  return FormatIpv4(subnet.base + static_cast<uint32_t>(offset));
}

std::optional<pid_t> OwnerPidOfName(const std::string& name) {
  if (name.rfind("em-", 0) != 0) return std::nullopt;
  size_t i = 3;
  pid_t pid = 0;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9' && i < 13) {
    pid = pid * 10 + (name[i] - '0');
    ++i;
  }
  if (i == 3 || i >= name.size() || name[i] != '-' || pid <= 0) return std::nullopt;
  return pid;
}

bool HasNetnsPrivilege() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("CapEff:", 0) != 0) continue;
    const uint64_t caps = std::strtoull(line.c_str() + 7, nullptr, 16);
    return (caps >> kCapNetAdmin & 1) && (caps >> kCapSysAdmin & 1);
  }
  return false;
}

int OpenNetns(const std::string& name) {
  return open((std::string(kNetnsDir) + "/" + name).c_str(), O_RDONLY | O_CLOEXEC);
}

absl::StatusOr<std::string> RunIp(const std::vector<std::string>& args) {
  const std::string ip = IpBinary();
  if (ip.empty()) {
    return absl::FailedPreconditionError(
        "--hosts needs iproute2's `ip` (apt-get install iproute2; scripts/setup.sh installs it)");
  }
  std::vector<std::string> strings = {ip};
  strings.insert(strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& s : strings) argv.push_back(s.data());
  argv.push_back(nullptr);
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    return absl::InternalError("pipe: " + std::string(strerror(errno)));
  }
  int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  sigset_t none;
  sigemptyset(&none);
  const pid_t pid = fork();
  if (pid == 0) {
    sigprocmask(SIG_SETMASK, &none, nullptr);
    if (null_fd >= 0) dup2(null_fd, 0);
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(fds[1]);
  if (null_fd >= 0) close(null_fd);
  if (pid < 0) {
    close(fds[0]);
    return absl::InternalError("fork for ip: " + std::string(strerror(errno)));
  }
  std::string out;
  // ip commands return in milliseconds; the bound only keeps a wedged one from hanging `up`.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  char buf[4096];
  while (true) {
    const int left = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
    if (left <= 0) break;
    pollfd p = {fds[0], POLLIN, 0};
    if (poll(&p, 1, left) <= 0) break;
    const ssize_t n = read(fds[0], buf, sizeof(buf));
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  close(fds[0]);
  int status = 0;
  // The pipe closes a moment before the process can be reaped.
  pid_t reaped = 0;
  while ((reaped = waitpid(pid, &status, WNOHANG)) == 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  if (reaped == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return absl::InternalError("`ip " + strings[1] + " ...` did not finish within 10 s");
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return out;
  std::string command = "ip";
  for (const std::string& a : args) command += " " + a;
  if (out.find("Operation not permitted") != std::string::npos) {
    return absl::PermissionDeniedError("`" + command + "` failed: " + out + PrivilegeMessage());
  }
  return absl::InternalError("`" + command + "` failed: " + out);
}

int HostNetwork::RemoveStale() {
  int removed = 0;
  std::set<pid_t> owners;
  for (const std::string& ns : ListDir(kNetnsDir)) {
    auto pid = OwnerPidOfName(ns);
    if (!pid || PidAlive(*pid)) continue;
    if (RunIp({"netns", "delete", ns}).ok()) ++removed;
  }
  // Deleting a namespace destroys its veth ends and so their host-side peers; the bridge (and
  // any veth whose namespace went first) is removed here.
  for (const std::string& link : ListDir("/sys/class/net")) {
    auto pid = OwnerPidOfName(link);
    if (!pid || PidAlive(*pid)) continue;
    if (RunIp({"link", "delete", link}).ok()) ++removed;
  }
  return removed;
}

absl::StatusOr<std::unique_ptr<HostNetwork>> HostNetwork::Create(
    int hosts, const std::string& subnet_text,
    const std::function<void(const std::string&)>& say) {
  if (hosts < 1 || hosts > 250) {
    return absl::InvalidArgumentError("--hosts must be 1..250, got " + std::to_string(hosts));
  }
  absl::StatusOr<Ipv4Subnet> subnet = ParseIpv4Subnet(subnet_text);
  if (!subnet.ok()) return subnet.status();
  if (absl::StatusOr<std::string> last = SubnetAddress(*subnet, hosts); !last.ok()) {
    return absl::InvalidArgumentError("--hosts-subnet " + subnet_text + " is too small for " +
                                      std::to_string(hosts) + " hosts and the bridge");
  }
  if (!HasNetnsPrivilege()) return absl::PermissionDeniedError(PrivilegeMessage());
  if (IpBinary().empty()) return RunIp({}).status();
  if (const int stale = RemoveStale(); stale > 0 && say) {
    say("up: removed " + std::to_string(stale) +
        " namespace(s)/link(s) left by an `up` that was killed");
  }
  std::unique_ptr<HostNetwork> net(new HostNetwork());
  const std::string tag = "em-" + std::to_string(getpid());
  net->bridge_ = tag + "-br";
  net->bridge_address_ = *SubnetAddress(*subnet, 0);
  net->prefix_ = subnet->prefix;
  std::string prefix = "/";
  prefix += std::to_string(subnet->prefix);
  // Two bridges with one address would make the subnet unroutable from the host: refuse.
  absl::StatusOr<std::string> addrs = RunIp({"-o", "-4", "addr", "show"});
  if (!addrs.ok()) return addrs.status();
  if (addrs->find(" " + net->bridge_address_ + "/") != std::string::npos) {
    return absl::FailedPreconditionError(
        "--hosts-subnet " + subnet_text + ": its first address " + net->bridge_address_ +
        " is already on an interface of this machine (another `up --hosts` running?); pick "
        "another --hosts-subnet");
  }
  // From here on the destructor removes whatever was made if a step fails.
  auto step = [](const std::vector<std::string>& args) { return RunIp(args).status(); };
  absl::Status s = step({"link", "add", net->bridge_, "type", "bridge"});
  if (s.ok()) s = step({"addr", "add", net->bridge_address_ + prefix, "dev", net->bridge_});
  if (s.ok()) s = step({"link", "set", net->bridge_, "up"});
  for (int i = 0; i < hosts && s.ok(); ++i) {
    Host h;
    h.netns = tag + "-h" + std::to_string(i);
    h.veth = tag + "-v" + std::to_string(i);
    h.address = *SubnetAddress(*subnet, 1 + i);
    net->hosts_.push_back(h);
    s = step({"netns", "add", h.netns});
    if (s.ok()) s = step({"link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns",
                          h.netns});
    if (s.ok()) s = step({"link", "set", h.veth, "master", net->bridge_, "up"});
    if (s.ok()) s = step({"-n", h.netns, "addr", "add", h.address + prefix, "dev", "eth0"});
    if (s.ok()) s = step({"-n", h.netns, "link", "set", "eth0", "up"});
    if (s.ok()) s = step({"-n", h.netns, "link", "set", "lo", "up"});
  }
  if (!s.ok()) return s;
  return net;
}

HostNetwork::~HostNetwork() { Remove(); }

void HostNetwork::Remove() {
  if (removed_) return;
  removed_ = true;
  // Errors are ignored: an object may never have been made (a failed Create), and a leftover is
  // removed by the next `up` anyway (RemoveStale).
  for (const Host& h : hosts_) {
    (void)RunIp({"netns", "delete", h.netns});
    (void)RunIp({"link", "delete", h.veth});
  }
  if (!bridge_.empty()) (void)RunIp({"link", "delete", bridge_});
}

}  // namespace expertmesh::cli
