#include "core/rpc/worker_capacity.h"

#include <sys/stat.h>
#include <unistd.h>

namespace expertmesh::rpc {

void CapacityFlags::Register(FlagSet& flags, bool with_max_experts) {
  flags.AddInt("devices", &devices, "compute devices reported to the router");
  flags.AddInt("memory-bytes", &memory_bytes,
               "memory this worker may fill, reported to the router (0 = physical memory)");
  if (with_max_experts) {
    flags.AddInt("max-experts", &max_experts,
                 "most (layer, expert) pairs this worker will host (0 = no limit)");
  }
}

expertmesh::v1::Capacity CapacityFlags::ToProto() const {
  expertmesh::v1::Capacity c;
  c.set_devices(static_cast<uint32_t>(std::max<int64_t>(0, devices)));
  int64_t memory = memory_bytes;
  if (memory <= 0) {
    memory =
        static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
  }
  c.set_memory_bytes(static_cast<uint64_t>(memory));
  c.set_max_experts(static_cast<uint32_t>(std::max<int64_t>(0, max_experts)));
  return c;
}

absl::Status CheckModelDir(const std::string& dir) {
  if (dir.empty()) return absl::OkStatus();
  struct stat st;
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::NotFoundError("--model " + dir + " is not a directory");
  }
  if (stat((dir + "/config.json").c_str(), &st) != 0) {
    return absl::NotFoundError("--model " + dir + " has no config.json");
  }
  return absl::OkStatus();
}

}  // namespace expertmesh::rpc
