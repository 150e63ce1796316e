// expertmesh-kv-store: per-sequence state blocks and the prefix index; registers with the router.
#include "absl/strings/str_cat.h"
#include "core/base/flags.h"
#include "core/base/log.h"
#include "core/rpc/service_process.h"
#include "core/rpc/termination.h"
#include "core/rpc/worker_capacity.h"
#include "kv-store/block_store.h"
#include "kv-store/kv_store_metrics.h"
#include "kv-store/kv_store_service.h"

int main(int argc, char** argv) {
  using namespace expertmesh;
  rpc::BlockTerminationSignals();
  rpc::CommonFlags common;
  rpc::CapacityFlags capacity;
  kv_store::StoreOptions store_options;
  int64_t memory_capacity = static_cast<int64_t>(store_options.memory_capacity_bytes);
  int64_t disk_capacity = static_cast<int64_t>(store_options.disk_capacity_bytes);
  base::FlagSet flags("expertmesh-kv-store",
                     "Stores per-sequence model state in 128-token blocks with a prefix index.");
  common.Register(flags, /*with_router=*/true);
  capacity.Register(flags, /*with_max_experts=*/false);
  flags.AddInt("memory-capacity-bytes", &memory_capacity,
               "Bytes of block data the memory tier (LRU) holds");
  flags.AddString("disk-dir", &store_options.disk_dir,
                  "Directory of the disk tier (append-only segment files; the index is rebuilt "
                  "from them at start, so a restarted store serves what it had). Empty: memory "
                  "tier only");
  flags.AddInt("disk-capacity-bytes", &disk_capacity,
               "Bytes of block records (header + data) the disk tier holds before it evicts");
  flags.AddBool("disk-fsync", &store_options.disk_fsync,
                "fdatasync the segment after each append, before the block is published (survives "
                "a power loss, costs write throughput; a process crash never loses a published "
                "block)");
  if (int rc = rpc::ParseFlagsOrExit(flags, argc, argv); rc >= 0) return rc;
  if (memory_capacity <= 0) {
    return rpc::ReportSetupError("expertmesh-kv-store",
                                 absl::InvalidArgumentError(absl::StrCat(
                                     "--memory-capacity-bytes must be positive, got ",
                                     memory_capacity)));
  }
  if (disk_capacity <= 0) {
    return rpc::ReportSetupError("expertmesh-kv-store",
                                 absl::InvalidArgumentError(absl::StrCat(
                                     "--disk-capacity-bytes must be positive, got ",
                                     disk_capacity)));
  }
  store_options.memory_capacity_bytes = static_cast<uint64_t>(memory_capacity);
  store_options.disk_capacity_bytes = static_cast<uint64_t>(disk_capacity);
  auto process = rpc::ServiceProcess::Create("kv-store", common);
  if (!process.ok()) return rpc::ReportSetupError("expertmesh-kv-store", process.status());
  kv_store::KvStoreMetrics metrics((*process)->registry());
  auto store = kv_store::BlockStore::Open(store_options, &metrics);
  if (!store.ok()) return rpc::ServiceProcess::ReportStartError(store.status());
  base::LogInfo("tiers", {{"memory_capacity_bytes", store_options.memory_capacity_bytes},
                          {"disk_dir", store_options.disk_dir.empty() ? std::string("(none)")
                                                                      : store_options.disk_dir},
                          {"disk_capacity_bytes", store_options.disk_capacity_bytes}});
  kv_store::KvStoreService service(**store);
  (*process)->AddService(&service);
  return (*process)->ServeUntilTerminated(
      rpc::Membership{expertmesh::v1::WORKER_KIND_KV_STORE, capacity.ToProto()});
}
