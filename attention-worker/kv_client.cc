#include "attention-worker/kv_client.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "core/base/log.h"
#include "core/rpc/channel.h"
#include "core/rpc/status.h"
#include "core/state/crc32c.h"

namespace expertmesh::attention_worker {

namespace v1 = expertmesh::v1;

namespace {

void ToProto(const KvBlockKey& k, v1::BlockKey* out) {
  out->set_tenant(k.tenant);
  out->set_chain_hash(k.chain_hash);
  out->set_end_position(k.end_position);
}

std::string SeqKey(const std::string& tenant, const std::string& id) {
  std::string k = tenant;
  k.push_back('\0');
  k += id;
  return k;
}

struct Fnv64 {
  uint64_t h = 14695981039346656037ull;
  void Add(std::string_view bytes) {
    for (unsigned char c : bytes) {
      h ^= c;
      h *= 1099511628211ull;
    }
    // A length marker, so that ("ab", "c") and ("a", "bc") differ.
    const uint64_t n = bytes.size();
    for (int i = 0; i < 8; ++i) {
      h ^= (n >> (8 * i)) & 0xff;
      h *= 1099511628211ull;
    }
  }
};

std::string ReadRange(std::ifstream& in, uint64_t offset, uint64_t n) {
  std::string out(n, '\0');
  in.clear();
  in.seekg(static_cast<std::streamoff>(offset));
  in.read(out.data(), static_cast<std::streamsize>(n));
  out.resize(static_cast<size_t>(std::max<std::streamsize>(0, in.gcount())));
  return out;
}

}  // namespace

absl::StatusOr<std::string> WeightsIdentity(const std::string& model_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(model_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name == "config.json" || name == "model.safetensors.index.json" ||
        e.path().extension() == ".safetensors") {
      files.push_back(e.path());
    }
  }
  if (ec) return absl::NotFoundError("model directory " + model_dir + ": " + ec.message());
  std::sort(files.begin(), files.end());
  Fnv64 h;
  for (const fs::path& f : files) {
    std::ifstream in(f, std::ios::binary);
    if (!in) return absl::NotFoundError("cannot read " + f.string());
    const uint64_t size = fs::file_size(f, ec);
    h.Add(f.filename().string());
    h.Add(std::to_string(size));
    if (f.extension() != ".safetensors") {
      h.Add(ReadRange(in, 0, size));
      continue;
    }
    const std::string len_bytes = ReadRange(in, 0, 8);
    uint64_t header = 0;
    for (size_t i = 0; i < len_bytes.size(); ++i) {
      header |= uint64_t{static_cast<unsigned char>(len_bytes[i])} << (8 * i);
    }
    header = std::min<uint64_t>(header, size);
    h.Add(ReadRange(in, 8, header));
    constexpr uint64_t kSample = 4096;
    const uint64_t data_begin = std::min(size, 8 + header);
    const uint64_t data = size - data_begin;
    for (int i = 0; i < 16; ++i) {
      h.Add(ReadRange(in, data_begin + data * i / 16, std::min(kSample, data)));
    }
  }
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(h.h));
  return std::string(hex);
}

KvClient::KvClient(const std::string& address, KvClientOptions options)
    : options_(std::move(options)), stub_(v1::KvStore::NewStub(rpc::MakeChannel(address))) {
  if (options_.registry != nullptr) {
    puts_ = &prometheus::BuildCounter()
                 .Name("expertmesh_attention_kv_block_puts_total")
                 .Help("State blocks handed to the kv-store writer, by result: stored, "
                       "duplicate (already stored), failed (the put failed), dropped (queue "
                       "full), skipped (an earlier block of the sequence was lost)")
                 .Register(*options_.registry);
    deletes_ = &prometheus::BuildCounter()
                    .Name("expertmesh_attention_kv_delete_sequence_total")
                    .Help("DeleteSequence calls to the kv-store at sequence end, by result "
                          "(ok, failed, dropped)")
                    .Register(*options_.registry);
    queue_gauge_ = &prometheus::BuildGauge()
                        .Name("expertmesh_attention_kv_put_queue_blocks")
                        .Help("Blocks and deletes waiting for the kv-store writer")
                        .Register(*options_.registry)
                        .Add({});
    // Every series up front, so that dashboards show 0 rather than a gap.
    for (const char* r : {"stored", "duplicate", "failed", "dropped", "skipped"}) {
      puts_->Add({{"result", r}});
    }
    for (const char* r : {"ok", "failed", "dropped"}) deletes_->Add({{"result", r}});
  }
  writer_ = std::thread([this] { WriterLoop(); });
}

KvClient::~KvClient() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (writer_.joinable()) writer_.join();
}

void KvClient::CountPut(const char* result) {
  if (puts_ != nullptr) puts_->Add({{"result", result}}).Increment();
}

void KvClient::PutAsync(KvPut put) {
  {
    std::lock_guard<std::mutex> l(mu_);
    const std::string sk = SeqKey(put.key.tenant, put.sequence_id);
    if (broken_.count(sk) != 0) {
      CountPut("skipped");
      return;
    }
    if (queue_.size() >= options_.max_queued_blocks ||
        queued_bytes_ + put.data.size() > options_.max_queued_bytes) {
      broken_.insert(sk);
      CountPut("dropped");
      return;
    }
    queued_bytes_ += put.data.size();
    queue_.push_back(Item{false, std::move(put)});
    if (queue_gauge_) queue_gauge_->Set(static_cast<double>(queue_.size()));
  }
  cv_.notify_all();
}

void KvClient::DeleteSequenceAsync(std::string tenant, std::string sequence_id) {
  {
    std::lock_guard<std::mutex> l(mu_);
    // A delete is tiny; it may exceed the block bound so that references are not leaked.
    if (queue_.size() >= 2 * options_.max_queued_blocks) {
      broken_.erase(SeqKey(tenant, sequence_id));
      if (deletes_) deletes_->Add({{"result", "dropped"}}).Increment();
      return;
    }
    Item it;
    it.is_delete = true;
    it.put.key.tenant = std::move(tenant);
    it.put.sequence_id = std::move(sequence_id);
    queue_.push_back(std::move(it));
    if (queue_gauge_) queue_gauge_->Set(static_cast<double>(queue_.size()));
  }
  cv_.notify_all();
}

void KvClient::WriterLoop() {
  std::unique_lock<std::mutex> l(mu_);
  while (true) {
    cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
    if (stop_) break;
    Item item = std::move(queue_.front());
    queue_.pop_front();
    queued_bytes_ -= item.put.data.size();
    if (queue_gauge_) queue_gauge_->Set(static_cast<double>(queue_.size()));
    const std::string sk = SeqKey(item.put.key.tenant, item.put.sequence_id);
    if (item.is_delete) {
      broken_.erase(sk);
    } else if (broken_.count(sk) != 0) {
      CountPut("skipped");
      continue;
    }
    busy_ = true;
    l.unlock();
    grpc::ClientContext ctx;
    grpc::Status st;
    const char* result = nullptr;
    if (item.is_delete) {
      rpc::SetTimeout(ctx, options_.put_deadline);
      v1::DeleteSequenceRequest req;
      req.set_tenant(item.put.key.tenant);
      req.set_sequence_id(item.put.sequence_id);
      v1::DeleteSequenceResponse resp;
      st = stub_->DeleteSequence(&ctx, req, &resp);
      if (deletes_) deletes_->Add({{"result", st.ok() ? "ok" : "failed"}}).Increment();
    } else {
      rpc::SetTimeout(ctx, options_.put_deadline);
      v1::PutBlockRequest req;
      ToProto(item.put.key, req.mutable_key());
      if (item.put.parent) ToProto(*item.put.parent, req.mutable_parent());
      req.set_sequence_id(item.put.sequence_id);
      req.set_crc32c(state::Crc32c(item.put.data));
      req.set_data(std::move(item.put.data));
      v1::PutBlockResponse resp;
      st = stub_->PutBlock(&ctx, req, &resp);
      result = !st.ok() ? "failed" : resp.stored() ? "stored" : "duplicate";
    }
    l.lock();
    busy_ = false;
    if (result != nullptr) {
      CountPut(result);
      if (!st.ok()) {
        broken_.insert(sk);
        // A store that is down fails every put; one line per 10 s says so.
        const absl::Time now = absl::Now();
        if (now - last_warning_ >= absl::Seconds(10)) {
          last_warning_ = now;
          base::LogWarning("kv-store PutBlock failed (the block is dropped, the sequence's "
                         "later blocks are not stored): " +
                           rpc::FromGrpcStatus(st).ToString());
        }
      }
    }
    cv_.notify_all();
  }
  // Stopping: what is still queued is dropped (the blocks are a cache).
  for (const Item& it : queue_) {
    if (it.is_delete) {
      if (deletes_) deletes_->Add({{"result", "dropped"}}).Increment();
    } else {
      CountPut("dropped");
    }
  }
  queue_.clear();
  queued_bytes_ = 0;
}

bool KvClient::WaitIdle(absl::Duration timeout) {
  std::unique_lock<std::mutex> l(mu_);
  return cv_.wait_for(l, absl::ToChronoNanoseconds(timeout),
                      [&] { return queue_.empty() && !busy_; });
}

PrefixFetch KvClient::FetchPrefix(const std::string& tenant,
                                  const std::vector<uint64_t>& chain_hashes) {
  PrefixFetch out;
  if (chain_hashes.empty()) return out;
  v1::LookupPrefixRequest req;
  req.set_tenant(tenant);
  for (uint64_t h : chain_hashes) req.add_chain_hashes(h);
  v1::LookupPrefixResponse resp;
  {
    grpc::ClientContext ctx;
    rpc::SetTimeout(ctx, options_.lookup_deadline);
    grpc::Status st = stub_->LookupPrefix(&ctx, req, &resp);
    if (!st.ok()) {
      out.lookup_status = rpc::FromGrpcStatus(st);
      return out;
    }
  }
  const int n = std::min<int>(resp.keys_size(),
                              std::min<int>(static_cast<int>(resp.matched_blocks()),
                                            static_cast<int>(chain_hashes.size())));
  out.matched_blocks = static_cast<uint32_t>(n);
  if (n == 0) return out;
  // All gets at once: the prefix costs one round trip, not one per block.
  struct Call {
    grpc::ClientContext ctx;
    v1::GetBlockRequest req;
    v1::GetBlockResponse resp;
    grpc::Status status;
  };
  std::vector<std::unique_ptr<Call>> calls(n);
  std::mutex mu;
  std::condition_variable cv;
  int pending = n;
  for (int i = 0; i < n; ++i) {
    calls[i] = std::make_unique<Call>();
    Call* c = calls[i].get();
    *c->req.mutable_key() = resp.keys(i);
    rpc::SetTimeout(c->ctx, options_.get_deadline);
    stub_->async()->GetBlock(&c->ctx, &c->req, &c->resp, [c, &mu, &cv, &pending](grpc::Status s) {
      std::lock_guard<std::mutex> l(mu);
      c->status = std::move(s);
      if (--pending == 0) cv.notify_all();
    });
  }
  {
    // Every call has a deadline, so this ends.
    std::unique_lock<std::mutex> l(mu);
    cv.wait(l, [&] { return pending == 0; });
  }
  for (int i = 0; i < n; ++i) {
    Call& c = *calls[i];
    if (!c.status.ok()) {
      out.get_status = rpc::FromGrpcStatus(c.status);
      break;
    }
    if (state::Crc32c(c.resp.data()) != c.resp.crc32c()) {
      out.get_status = absl::DataLossError("kv-store block " + std::to_string(i) +
                                           ": CRC32C mismatch after transfer");
      break;
    }
    out.blocks.push_back(std::move(*c.resp.mutable_data()));
  }
  return out;
}

}  // namespace expertmesh::attention_worker
