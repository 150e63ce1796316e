#include "core/kernels/thread_pool.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>

#include "core/kernels/matmul.h"

namespace expertmesh::kernels {
namespace {

// How long an idle worker spins (tens of microseconds) before sleeping on a condition variable.
// Decode issues dozens of kernel calls per layer back to back; a spinning worker picks the next
// one up in well under a microsecond, a sleeping one takes several. The bound keeps idle
// workers from taking a shared core away from other work for long.
constexpr int kSpinIterations = 4000;

inline void CpuRelax() { _mm_pause(); }

constexpr uint64_t Pack(int64_t tasks, int64_t next) {
  return (static_cast<uint64_t>(tasks) << 32) | static_cast<uint64_t>(next);
}

}  // namespace

ThreadPool::ThreadPool(int threads) : threads_(std::max(1, threads)) {
  workers_.reserve(threads_ - 1);
  for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true, std::memory_order_release);
  Publish();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::Publish() {
  // seq_cst on both sides (here: generation_ then sleepers_; in WorkerLoop: sleepers_ then
  // generation_) guarantees that either we see the sleeper or it sees the new generation.
  generation_.fetch_add(1, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    { std::lock_guard<std::mutex> lock(sleep_mu_); }
    sleep_cv_.notify_all();
  }
}

void ThreadPool::Drain() {
  uint64_t v = claim_.load(std::memory_order_acquire);
  for (;;) {
    const int64_t tasks = static_cast<int64_t>(v >> 32);
    const int64_t next = static_cast<int64_t>(v & 0xFFFFFFFFu);
    if (next >= tasks) return;
    if (!claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
      continue;
    }
    // A successful claim of an unfinished job's task: fn_/ctx_ cannot change until it is done.
    fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), next);
    unfinished_.fetch_sub(1, std::memory_order_acq_rel);
    v = claim_.load(std::memory_order_acquire);
  }
}

void ThreadPool::WorkerLoop() {
  // Start from the generation at construction, not at thread start: a job (or the shutdown)
  // published before this thread got scheduled must still be seen.
  uint32_t seen = 0;
  for (;;) {
    int spins = 0;
    uint32_t now;
    while ((now = generation_.load(std::memory_order_acquire)) == seen) {
      if (++spins < kSpinIterations) {
        CpuRelax();
        continue;
      }
      std::unique_lock<std::mutex> lock(sleep_mu_);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      while (generation_.load(std::memory_order_seq_cst) == seen) sleep_cv_.wait(lock);
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
    }
    seen = now;
    if (stop_.load(std::memory_order_acquire)) return;
    Drain();
  }
}

void ThreadPool::Run(int64_t tasks, void (*fn)(void*, int64_t), void* ctx) {
  if (tasks <= 0) return;
  bool expected = false;
  if (threads_ == 1 || tasks == 1 ||
      !busy_.compare_exchange_strong(expected, true, std::memory_order_acquire)) {
    for (int64_t t = 0; t < tasks; ++t) fn(ctx, t);
    return;
  }
  fn_.store(fn, std::memory_order_relaxed);
  ctx_.store(ctx, std::memory_order_relaxed);
  unfinished_.store(tasks, std::memory_order_relaxed);
  claim_.store(Pack(tasks, 0), std::memory_order_release);
  Publish();
  Drain();
  // The remaining tasks are running on workers; if one of them was preempted, yield the core.
  for (int spins = 0; unfinished_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < kSpinIterations) {
      CpuRelax();
    } else {
      std::this_thread::yield();
    }
  }
  busy_.store(false, std::memory_order_release);
}

namespace {

int DefaultThreads() {
  if (const char* env = std::getenv("EM_THREADS"); env != nullptr && *env != '\0') {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

struct PoolRegistry {
  std::mutex mu;
  int threads = 0;
  std::atomic<ThreadPool*> current{nullptr};
  // Pools replaced by SetKernelThreads stay alive (idle) until exit, so a kernel that is still
  // running on one, or a reference someone kept, never dangles.
  std::vector<std::unique_ptr<ThreadPool>> all;
};

PoolRegistry& Registry() {
  static PoolRegistry* registry = new PoolRegistry();  // never destroyed: used until exit
  return *registry;
}

ThreadPool* InstallLocked(PoolRegistry& r, int threads) {
  r.threads = threads;
  for (auto& p : r.all) {
    if (p->threads() == threads) {
      r.current.store(p.get(), std::memory_order_release);
      return p.get();
    }
  }
  r.all.push_back(std::make_unique<ThreadPool>(threads));
  r.current.store(r.all.back().get(), std::memory_order_release);
  return r.all.back().get();
}

}  // namespace

ThreadPool& KernelPool() {
  PoolRegistry& r = Registry();
  if (ThreadPool* p = r.current.load(std::memory_order_acquire)) return *p;
  std::lock_guard<std::mutex> lock(r.mu);
  if (ThreadPool* p = r.current.load(std::memory_order_acquire)) return *p;
  return *InstallLocked(r, r.threads > 0 ? r.threads : DefaultThreads());
}

void SetKernelThreads(int threads) {
  PoolRegistry& r = Registry();
  std::lock_guard<std::mutex> lock(r.mu);
  InstallLocked(r, threads > 0 ? threads : DefaultThreads());
}

int KernelThreads() { return KernelPool().threads(); }

namespace {

struct ParallelForJob {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t count;
  int64_t parts;
};

void RunParallelForPart(void* ctx, int64_t part) {
  const auto* job = static_cast<const ParallelForJob*>(ctx);
  const int64_t begin = job->count * part / job->parts;
  const int64_t end = job->count * (part + 1) / job->parts;
  if (begin < end) (*job->fn)(begin, end);
}

}  // namespace

void ParallelFor(int64_t count, int64_t min_grain,
                 const std::function<void(int64_t begin, int64_t end)>& fn) {
  if (count <= 0) return;
  ThreadPool& pool = KernelPool();
  const int64_t grain = std::max<int64_t>(1, min_grain);
  const int64_t parts = std::min<int64_t>(pool.threads(), count / grain);
  if (parts <= 1) {
    fn(0, count);
    return;
  }
  ParallelForJob job{&fn, count, parts};
  pool.Run(parts, &RunParallelForPart, &job);
}

}  // namespace expertmesh::kernels
