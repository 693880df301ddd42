// How the CPU kernels split a call over threads, torch-free.
//
// One OpenMP region per call (the team torch's own ops use, so no second pool competes for the cores), with
// the work cut into items that threads claim one at a time from a shared counter: a thread that starts late
// (woken late, or descheduled) takes fewer items instead of holding a fixed share that everyone waits for.
// The calling thread does everything that must precede the split (table builds) before the region, so there
// is no barrier inside it.
//
// The region still ends with a join, and a thread that claimed an item and was then descheduled stalls that
// join for a scheduler time slice (milliseconds, against tens of microseconds of work). That happens when
// another process keeps every core busy. So the caller times its own wait at the join: a wait longer than
// its own work (and than kStallNs) means the cores are contended, and the next calls run on the calling
// thread alone, for a stretch that doubles each time a probe with threads stalls again (kSoloFirst up to
// kSoloMax calls) and resets after a clean probe. Without contention the wait is a few microseconds and
// every call uses the team.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ptqtp_cpu {

constexpr int64_t kStallNs = 40000;   // a join wait above this (and above the caller's own work) is a stall
constexpr int kSoloFirst = 256;       // calls run single-threaded after the first stall (about a token of a
constexpr int kSoloMax = 1 << 15;     // small model), doubling per stalled probe up to this

struct Contention {
  std::atomic<int> solo_left{0};  // calls still to run on the calling thread alone
  std::atomic<int> solo_len{kSoloFirst};
  std::atomic<int64_t> stalls{0};  // stalled calls seen so far (reported to Python for the benchmarks)
};
inline Contention& contention() {
  static Contention c;  // one per process: the cores are shared by every layer
  return c;
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// body(begin, end) over [0, items) in pieces of at most `grain`, on up to `threads` threads (1: inline).
template <class F>
void parallel_items(int64_t items, int64_t grain, int threads, F&& body) {
  grain = std::max<int64_t>(1, grain);
  const int64_t pieces = (items + grain - 1) / grain;
  threads = static_cast<int>(std::min<int64_t>(threads, pieces));
  Contention& c = contention();
  if (threads > 1 && c.solo_left.load(std::memory_order_relaxed) > 0) {
    c.solo_left.fetch_sub(1, std::memory_order_relaxed);
    threads = 1;
  }
#ifdef _OPENMP
  if (threads > 1) {
    std::atomic<int64_t> next{0};
    const int64_t start = now_ns();
    int64_t own_done = 0;
#pragma omp parallel num_threads(threads)
    {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < pieces;)
        body(i * grain, std::min(items, (i + 1) * grain));
      if (omp_get_thread_num() == 0) own_done = now_ns();
    }
    const int64_t wait = now_ns() - own_done, work = own_done - start;
    if (wait > kStallNs && wait > work) {
      const int len = c.solo_len.load(std::memory_order_relaxed);
      c.solo_left.store(len, std::memory_order_relaxed);
      c.solo_len.store(std::min(kSoloMax, 2 * len), std::memory_order_relaxed);
      c.stalls.fetch_add(1, std::memory_order_relaxed);
    } else {
      c.solo_len.store(kSoloFirst, std::memory_order_relaxed);
    }
    return;
  }
#endif
  body(0, items);
}

}  // namespace ptqtp_cpu
