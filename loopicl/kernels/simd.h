// What the two kernel sources share (looped_attention.cc, candidates.cc): the SIMD lane vector
// and the parallel loop over blocks on XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace loopicl {

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

inline vec splat(float x) { return vec{} + x; }

// Runs body(block, worker) for every block, on the caller and on up to workers − 1 pool threads.
// The caller never waits for a pool task that has not started (the pool may be busy with other
// work, possibly another call like this one): a task that starts after the caller has finished
// finds the call closed and returns without touching it.
struct Join {
  std::mutex mutex;
  std::condition_variable done;
  int64_t active = 0;
  bool closed = false;
};

template <class Body>
void ParallelBlocks(ffi::ThreadPool& pool, int64_t blocks, int64_t workers, Body body) {
  workers = std::max<int64_t>(1, std::min(blocks, workers));
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t worker) {
    for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1)) body(b, worker);
  };
  auto join = std::make_shared<Join>();
  std::function<void(int64_t)> run = work;
  for (int64_t w = 1; w < workers; ++w)
    pool.Schedule([join, &run, w] {
      {
        std::lock_guard<std::mutex> lock(join->mutex);
        if (join->closed) return;
        ++join->active;
      }
      run(w);
      std::lock_guard<std::mutex> lock(join->mutex);
      if (--join->active == 0) join->done.notify_all();
    });
  work(0);
  std::unique_lock<std::mutex> lock(join->mutex);
  join->closed = true;
  join->done.wait(lock, [&] { return join->active == 0; });
}

// Workers of a call: the `threads` attribute, or (0) XLA's intra-op pool plus the caller thread.
inline int64_t Workers(ffi::ThreadPool& pool, int64_t threads) {
  return std::max<int64_t>(1, threads > 0 ? threads : pool.num_threads() + 1);
}

}  // namespace loopicl
