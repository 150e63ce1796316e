// Capacity flags of a worker binary (--devices, --memory-bytes, --max-experts), turned into the
// Capacity the worker registers with, and the check of a --model directory.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "core/rpc/service_flags.h"
#include "expertmesh/v1/common.pb.h"

namespace expertmesh::rpc {

struct CapacityFlags {
  int64_t devices = 1;
  int64_t memory_bytes = 0;  // 0 = the machine's physical memory
  int64_t max_experts = 0;   // 0 = no limit

  void Register(FlagSet& flags, bool with_max_experts);
  expertmesh::v1::Capacity ToProto() const;
};

// OK for an empty `dir` (no model configured) or a directory holding config.json.
// Errors: NotFound naming the directory or the missing file.
absl::Status CheckModelDir(const std::string& dir);

}  // namespace expertmesh::rpc
