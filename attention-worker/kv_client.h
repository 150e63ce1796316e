// The attention worker's side of the kv-store (docs/kv_store.md, Prefix reuse): completed
// 128-token blocks go out through a bounded queue drained by a writer thread, so a step never
// waits on the store; a full queue or a failed put drops the block (counted) and the chain of
// that sequence ends there. Admission fetches the longest stored prefix with short deadlines,
// from a thread that is not the step loop.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "expertmesh/v1/kv_store.grpc.pb.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"

namespace expertmesh::attention_worker {

struct KvBlockKey {
  std::string tenant;
  uint64_t chain_hash = 0;
  uint32_t end_position = 0;  // tokens from position 0 to the block's end
};

struct KvPut {
  KvBlockKey key;
  std::optional<KvBlockKey> parent;  // unset for block 0
  std::string sequence_id;
  std::string data;  // an EncodeBlock block
};

// What admission got from the store for a prompt's chain.
struct PrefixFetch {
  // Leading blocks the store reported as one stored chain.
  uint32_t matched_blocks = 0;
  // Bytes of the leading blocks fetched, in order (a prefix of the matched ones: fetching stops
  // at the first block that failed).
  std::vector<std::string> blocks;
  // LookupPrefix's error (OK if it answered) and the first failed GetBlock's.
  absl::Status lookup_status;
  absl::Status get_status;
};

// Names the weights in `model_dir` for state::ModelFingerprint, cheaply enough for any
// checkpoint size: a 64-bit FNV-1a over config.json, the safetensors index (if any), and for
// each *.safetensors file its name, size, header (tensor names, dtypes, shapes, offsets) and 16
// evenly spaced 4 KiB samples of its data. Two checkpoints of one shape differ in the samples
// unless they agree on all of them (then pass --weights-id). Errors: the directory's files
// cannot be read.
absl::StatusOr<std::string> WeightsIdentity(const std::string& model_dir);

// The scheduler's view of a block store; tests plug in an in-memory one.
class PrefixStore {
 public:
  virtual ~PrefixStore() = default;
  // Never waits on the network.
  virtual void PutAsync(KvPut put) = 0;
  // Queued behind the sequence's puts, so the references it drops are all there.
  virtual void DeleteSequenceAsync(std::string tenant, std::string sequence_id) = 0;
  // Blocks the calling thread for at most about the lookup deadline plus one get deadline;
  // never call it on the step loop.
  virtual PrefixFetch FetchPrefix(const std::string& tenant,
                                  const std::vector<uint64_t>& chain_hashes) = 0;
};

struct KvClientOptions {
  absl::Duration lookup_deadline = absl::Milliseconds(200);
  // Gets run in parallel; each has this deadline.
  absl::Duration get_deadline = absl::Milliseconds(1000);
  absl::Duration put_deadline = absl::Seconds(2);
  // Bounds of the put queue: beyond either a new block is dropped.
  size_t max_queued_blocks = 1024;
  size_t max_queued_bytes = size_t{256} << 20;
  prometheus::Registry* registry = nullptr;
};

// PrefixStore over gRPC to one kv-store.
class KvClient final : public PrefixStore {
 public:
  KvClient(const std::string& address, KvClientOptions options);
  ~KvClient() override;  // drops what is still queued after the call in flight

  void PutAsync(KvPut put) override;
  void DeleteSequenceAsync(std::string tenant, std::string sequence_id) override;
  PrefixFetch FetchPrefix(const std::string& tenant,
                          const std::vector<uint64_t>& chain_hashes) override;

  // Tests and benchmarks: waits until the queue is empty and no put is in flight.
  bool WaitIdle(absl::Duration timeout);

 private:
  struct Item {
    bool is_delete = false;
    KvPut put;  // for a delete: key.tenant and sequence_id only
  };
  void WriterLoop();
  void CountPut(const char* result);

  const KvClientOptions options_;
  std::unique_ptr<expertmesh::v1::KvStore::Stub> stub_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  size_t queued_bytes_ = 0;
  bool busy_ = false;
  bool stop_ = false;
  // Sequences (tenant + '\0' + id) that lost a block: their later blocks would have no stored
  // parent, so they are not sent.
  std::set<std::string> broken_;
  absl::Time last_warning_ = absl::InfinitePast();
  std::thread writer_;

  prometheus::Family<prometheus::Counter>* puts_ = nullptr;
  prometheus::Family<prometheus::Counter>* deletes_ = nullptr;
  prometheus::Gauge* queue_gauge_ = nullptr;
};

}  // namespace expertmesh::attention_worker
