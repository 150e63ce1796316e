// The kernels' persistent worker pool: a fixed set of threads that run the index range of one
// job at a time, the calling thread taking part. Kernels split their output rows into tasks and
// hand them here, so a decode step pays a wake-up, never a thread creation.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace expertmesh::kernels {

class ThreadPool {
 public:
  // `threads` counts the caller: a pool of 1 starts no thread and runs everything inline.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return threads_; }

  // Calls fn(ctx, task) once for every task in [0, tasks), spread over the workers and the
  // caller, and returns when all calls have finished. Thread-safe: when another job is running
  // (another caller, or a call from inside a task) this one runs inline on the caller, so it
  // never waits for the pool and never deadlocks. REQUIRES: tasks < 2^30.
  void Run(int64_t tasks, void (*fn)(void* ctx, int64_t task), void* ctx);

 private:
  void WorkerLoop();
  // Claims and runs tasks of the current job until none is left.
  void Drain();
  // Bumps generation_ and wakes sleeping workers.
  void Publish();

  const int threads_;
  std::vector<std::thread> workers_;
  // Job description; written by the caller only while no task of the previous job is pending.
  std::atomic<void (*)(void*, int64_t)> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  // (tasks << 32) | next unclaimed task: one word, so a claim (CAS) sees a consistent pair.
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> unfinished_{0};   // tasks claimed or not, not yet finished
  std::atomic<uint32_t> generation_{0};  // bumped per job (and at shutdown)
  // Idle workers that stopped spinning sleep here.
  std::mutex sleep_mu_;
  std::condition_variable sleep_cv_;
  std::atomic<int> sleepers_{0};
  std::atomic<bool> busy_{false};
  std::atomic<bool> stop_{false};
};

// The process-wide pool the kernels use, sized by KernelThreads() (matmul.h). The reference
// stays valid until the next SetKernelThreads call with a different count.
ThreadPool& KernelPool();

// Splits [0, count) into at most KernelThreads() contiguous ranges of at least `min_grain`
// items and calls fn(begin, end) for each on the kernel pool. Runs inline when the range is
// too small to split. fn must be safe to call concurrently on disjoint ranges.
void ParallelFor(int64_t count, int64_t min_grain,
                 const std::function<void(int64_t begin, int64_t end)>& fn);

}  // namespace expertmesh::kernels
