// SPDX-License-Identifier: Apache-2.0
// A host emulation of the CUDA device API the kernels use, so that the real kernel sources
// (kernels/**/*.cuh) compile with a plain C++20 compiler and run on the CPU: one std::thread per
// CUDA thread, thread blocks one after another. Include this before any kernel header; it
// defines KVC_DEVICE_EMULATION, which kernels/common/device_api.cuh checks.
//
//   - __shared__ variables are function-local statics: shared by the block's threads, and
//     reused by the next block (blocks never run at the same time), uninitialised in spirit;
//     dynamic shared memory is a fresh allocation of exactly the launch's size per block,
//     filled with a poison byte, so AddressSanitizer sees any access past it.
//   - __syncthreads is a std::barrier over the block's threads; a thread that returns drops out
//     of it, as an exited thread does on the GPU. Every barrier also checks that all threads
//     arrived from the same source line (a divergent __syncthreads is reported as an error).
//   - __syncthreads_or/_and/_count reduce at the barrier.
//   - Warp collectives (__syncwarp, __shfl*_sync, __ballot_sync) run on a per-warp barrier: each
//     lane publishes its value, the warp meets, each lane reads its source lane, the warp meets
//     again. Every lane of the mask must take part (the kernels only use full warps).
//   - Integer intrinsics the kernels use (__popc) are the bit operations they are.
//   - atomics go through std::atomic_ref (sequentially consistent: stronger than CUDA's).
//   - kvc::device::BlockScan: a stand-in with CUB's documented semantics, including the rule
//     that its temporary storage needs a barrier before reuse (it adds none after its result).
//
// What it cannot show: the GPU's memory model (weak ordering, visibility without fences),
// real warp scheduling and independent thread scheduling hazards inside a warp, timing, bank
// conflicts, occupancy and resource limits, device floating-point code paths selected by
// __CUDA_ARCH__ (format.cuh's device branches), and anything in the host launchers. See
// docs/emulation.md.
#pragma once

#define KVC_DEVICE_EMULATION 1

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <source_location>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ---- CUDA keywords ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Dynamic shared memory (device_api.cuh's KVC_DYNAMIC_SHARED under nvcc).
#define KVC_DYNAMIC_SHARED(type, name) \
  type* const name = reinterpret_cast<type*>(::kvc::emu::dynamic_shared_memory())

namespace kvc::emu {

struct Dim3 {
  uint32_t x = 1, y = 1, z = 1;
  constexpr Dim3() = default;
  constexpr Dim3(uint32_t x_, uint32_t y_ = 1, uint32_t z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr uint32_t count() const { return x * y * z; }
};

constexpr uint32_t kWarpSize = 32;

// One warp's rendezvous: a barrier over its live lanes and one exchange slot per lane.
struct Warp {
  explicit Warp(uint32_t lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  uint64_t slot[kWarpSize] = {};
};

class Block;

// The block-wide barrier's completion step: runs once per phase, after every live thread has
// arrived and before any is released.
struct BarrierPhase {
  Block* block;
  void operator()() noexcept;
};

class Block {
 public:
  Block(Dim3 dim, size_t dynamic_bytes)
      : threads_(dim.count()),
        barrier_(std::ptrdiff_t(dim.count()), BarrierPhase{this}),
        sites_(dim.count()),
        alive_(dim.count(), 1),
        dynamic_(std::max<size_t>(dynamic_bytes, 1), uint8_t(0xA5)) {
    for (uint32_t first = 0; first < threads_; first += kWarpSize) {
      warps_.push_back(std::make_unique<Warp>(std::min(kWarpSize, threads_ - first)));
    }
  }

  uint8_t* dynamic_shared_memory() { return dynamic_.data(); }
  uint32_t threads() const { return threads_; }
  Warp& warp(uint32_t tid) { return *warps_[tid / kWarpSize]; }

  // __syncthreads and its reductions: `count` of the live threads had a true predicate.
  uint32_t sync(uint32_t tid, bool predicate, const std::source_location& where) {
    sites_[tid] = &where;
    if (predicate) pending_.fetch_add(1, std::memory_order_relaxed);
    barrier_.arrive_and_wait();
    return result_;  // stable until every thread has arrived at the next barrier
  }
  uint32_t live() const { return live_; }

  // A returning thread leaves every barrier, as an exited GPU thread does.
  void exit(uint32_t tid) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      alive_[tid] = 0;
    }
    warp(tid).barrier.arrive_and_drop();
    barrier_.arrive_and_drop();
  }

  void report(std::string message) {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (errors_.size() < 8) errors_.push_back(std::move(message));
  }
  std::vector<std::string> errors() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return errors_;
  }

 private:
  friend struct BarrierPhase;
  void complete_phase() noexcept {
    result_ = pending_.exchange(0, std::memory_order_relaxed);
    const std::source_location* first = nullptr;
    uint32_t arrived = 0;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (uint32_t t = 0; t < threads_; ++t) {
        if (!alive_[t] || sites_[t] == nullptr) continue;
        ++arrived;
        if (first == nullptr) {
          first = sites_[t];
        } else if (first->line() != sites_[t]->line() ||
                   std::strcmp(first->file_name(), sites_[t]->file_name()) != 0) {
          if (errors_.size() < 8) {
            errors_.push_back(std::string("divergent __syncthreads: ") + first->file_name() + ":" +
                              std::to_string(first->line()) + " and " + sites_[t]->file_name() +
                              ":" + std::to_string(sites_[t]->line()));
          }
        }
        sites_[t] = nullptr;
      }
    }
    live_ = arrived;
  }

  uint32_t threads_;
  std::barrier<BarrierPhase> barrier_;
  std::vector<const std::source_location*> sites_;
  std::vector<uint8_t> alive_;
  std::vector<std::unique_ptr<Warp>> warps_;
  std::vector<uint8_t> dynamic_;
  std::atomic<uint32_t> pending_{0};
  uint32_t result_ = 0, live_ = 0;
  std::mutex mutex_;
  std::vector<std::string> errors_;
};

inline void BarrierPhase::operator()() noexcept { block->complete_phase(); }

// The emulated thread's identity.
struct ThreadContext {
  Block* block = nullptr;
  uint32_t linear = 0;  // x + y * dim.x + z * dim.x * dim.y
};
inline thread_local ThreadContext t_context;

// This thread's cp.async copies not yet waited for, by commit group; the last group is open.
// Reset at every launch.
struct AsyncCopy {
  void* dst;
  const void* src;  // nullptr: zero-fill
};
inline thread_local std::vector<std::vector<AsyncCopy>> t_async_groups{{}};

inline Block& current_block() { return *t_context.block; }
inline uint8_t* dynamic_shared_memory() { return current_block().dynamic_shared_memory(); }

// A device-side failure (a trap, an unsupported use of the emulation): recorded for the launch.
inline void device_error(const std::string& message) { current_block().report(message); }

}  // namespace kvc::emu

// ---- Built-in variables -------------------------------------------------------------------------
inline thread_local kvc::emu::Dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

// ---- Vector types (the subset the kernels use) --------------------------------------------------
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

// ---- Barriers and warp collectives --------------------------------------------------------------
inline void __syncthreads(std::source_location where = std::source_location::current()) {
  auto& c = kvc::emu::t_context;
  c.block->sync(c.linear, false, where);
}
inline int __syncthreads_or(int predicate,
                            std::source_location where = std::source_location::current()) {
  auto& c = kvc::emu::t_context;
  return c.block->sync(c.linear, predicate != 0, where) != 0;
}
inline int __syncthreads_and(int predicate,
                             std::source_location where = std::source_location::current()) {
  auto& c = kvc::emu::t_context;
  return c.block->sync(c.linear, predicate != 0, where) == c.block->live();
}
inline int __syncthreads_count(int predicate,
                               std::source_location where = std::source_location::current()) {
  auto& c = kvc::emu::t_context;
  return int(c.block->sync(c.linear, predicate != 0, where));
}

namespace kvc::emu {

inline void check_full_mask(unsigned mask) {
  if (mask != 0xFFFFFFFFu) device_error("warp collective with a partial mask (not emulated)");
}

// Every lane publishes `value`; returns the value lane `source(lane)` published.
template <class T, class Source>
T warp_exchange(T value, Source source) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  const uint32_t lane = t_context.linear % kWarpSize;
  Warp& w = t_context.block->warp(t_context.linear);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  w.slot[lane] = bits;
  w.barrier.arrive_and_wait();
  const uint32_t from = source(lane);
  T out = value;  // a source outside the warp returns the caller's own value, as CUDA does
  if (from < kWarpSize) std::memcpy(&out, &w.slot[from], sizeof(T));
  w.barrier.arrive_and_wait();  // the slots may be overwritten only after everyone has read
  return out;
}

}  // namespace kvc::emu

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  kvc::emu::check_full_mask(mask);
  kvc::emu::t_context.block->warp(kvc::emu::t_context.linear).barrier.arrive_and_wait();
}
template <class T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize) {
  kvc::emu::check_full_mask(mask);
  return kvc::emu::warp_exchange(value, [&](uint32_t lane) {
    return (lane & ~uint32_t(width - 1)) + (uint32_t(src_lane) & uint32_t(width - 1));
  });
}
template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize) {
  kvc::emu::check_full_mask(mask);
  return kvc::emu::warp_exchange(value, [&](uint32_t lane) {
    const uint32_t to = lane ^ uint32_t(lane_mask);
    return (to & ~uint32_t(width - 1)) == (lane & ~uint32_t(width - 1)) ? to : lane;
  });
}
template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  kvc::emu::check_full_mask(mask);
  return kvc::emu::warp_exchange(value, [&](uint32_t lane) {
    const uint32_t to = lane + delta;
    return (to & ~uint32_t(width - 1)) == (lane & ~uint32_t(width - 1)) ? to : lane;
  });
}
template <class T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  kvc::emu::check_full_mask(mask);
  return kvc::emu::warp_exchange(value, [&](uint32_t lane) {
    return (lane % uint32_t(width)) >= delta ? lane - delta : lane;
  });
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  kvc::emu::check_full_mask(mask);
  unsigned out = 0;
  for (uint32_t from = 0; from < kvc::emu::kWarpSize; ++from) {
    const int p = kvc::emu::warp_exchange(predicate != 0 ? 1 : 0, [&](uint32_t) { return from; });
    out |= unsigned(p) << from;
  }
  return out;
}

// ---- Atomics (return the old value, as CUDA's do) -----------------------------------------------
namespace kvc::emu {
template <class T, class F>
T atomic_update(T* address, F f) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (!a.compare_exchange_weak(old, f(old))) {
  }
  return old;
}
}  // namespace kvc::emu

#define KVC_EMU_ATOMICS(T)                                                       \
  inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }  \
  inline T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }  \
  inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }  \
  inline T atomicMin(T* p, T v) {                                                \
    return kvc::emu::atomic_update(p, [v](T old) { return v < old ? v : old; }); \
  }                                                                              \
  inline T atomicMax(T* p, T v) {                                                \
    return kvc::emu::atomic_update(p, [v](T old) { return v > old ? v : old; }); \
  }                                                                              \
  inline T atomicAnd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_and(v); }  \
  inline T atomicOr(T* p, T v) { return std::atomic_ref<T>(*p).fetch_or(v); }    \
  inline T atomicXor(T* p, T v) { return std::atomic_ref<T>(*p).fetch_xor(v); }  \
  inline T atomicCAS(T* p, T compare, T v) {                                     \
    std::atomic_ref<T>(*p).compare_exchange_strong(compare, v);                  \
    return compare;                                                              \
  }
KVC_EMU_ATOMICS(int)
KVC_EMU_ATOMICS(unsigned int)
KVC_EMU_ATOMICS(unsigned long long)
KVC_EMU_ATOMICS(long long)
#undef KVC_EMU_ATOMICS
inline float atomicAdd(float* p, float v) {
  return kvc::emu::atomic_update(p, [v](float old) { return old + v; });
}

// ---- Math and loads -----------------------------------------------------------------------------
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
// The device's fast exponential has its own rounding; the host's expf stands in for it.
inline float __expf(float x) { return std::exp(x); }
template <class T>
T __ldg(const T* p) {
  return *p;
}
[[noreturn]] inline void __trap() {
  kvc::emu::device_error("__trap()");
  throw std::runtime_error("__trap()");
}

// ---- Block-wide collectives ---------------------------------------------------------------------
namespace kvc::device {

// CUB's BlockScan, as documented: exclusive scans with an initial value or a sum with the
// block aggregate. The block must have exactly kThreads threads. TempStorage must not be reused
// before a __syncthreads (CUB's rule): this stand-in adds no barrier after reading it, so a
// kernel that breaks the rule gets wrong results here too (and ThreadSanitizer reports a race).
template <class T, int kThreads>
class BlockScan {
 public:
  struct TempStorage {
    T inputs[kThreads];
  };
  explicit BlockScan(TempStorage& storage) : storage_(storage) {}

  template <class Op>
  void ExclusiveScan(T input, T& output, T initial, Op op) {
    T aggregate;
    scan(input, output, initial, op, aggregate);
  }
  template <class Op>
  void ExclusiveScan(T input, T& output, T initial, Op op, T& aggregate) {
    scan(input, output, initial, op, aggregate);
  }
  void ExclusiveSum(T input, T& output) {
    T aggregate;
    scan(input, output, T{}, std::plus<>{}, aggregate);
  }
  void ExclusiveSum(T input, T& output, T& aggregate) {
    scan(input, output, T{}, std::plus<>{}, aggregate);
  }
  void InclusiveSum(T input, T& output) {
    T aggregate;
    scan(input, output, T{}, std::plus<>{}, aggregate);
    output = output + input;
  }

 private:
  template <class Op>
  void scan(T input, T& output, T initial, Op op, T& aggregate) {
    const uint32_t tid = emu::t_context.linear;
    if (emu::current_block().threads() != uint32_t(kThreads)) {
      emu::device_error("BlockScan<" + std::to_string(kThreads) + "> in a block of " +
                        std::to_string(emu::current_block().threads()) + " threads");
    }
    storage_.inputs[tid] = input;
    __syncthreads();
    T before = initial;
    for (uint32_t i = 0; i < tid; ++i) before = op(before, storage_.inputs[i]);
    output = before;
    // The aggregate of the inputs alone (CUB: the initial value is not part of it).
    T all = storage_.inputs[0];
    for (uint32_t i = 1; i < uint32_t(kThreads); ++i) all = op(all, storage_.inputs[i]);
    aggregate = all;
  }

  TempStorage& storage_;
};

}  // namespace kvc::device

// ---- Launching ----------------------------------------------------------------------------------
namespace kvc::emu {

struct LaunchResult {
  std::vector<std::string> errors;  // empty: the launch ran cleanly
  bool ok() const { return errors.empty(); }
  std::string message() const {
    std::string m;
    for (const auto& e : errors) m += e + "\n";
    return m;
  }
};

// The host threads that play CUDA threads, kept between blocks and launches (creating 256
// threads costs more than running most blocks). run(n, f) calls f(0..n-1) on n of them at once
// and returns when all have returned.
class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool pool;
    return pool;
  }
  void run(uint32_t n, const std::function<void(uint32_t)>& f) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_.size() < n) {
      const uint32_t index = uint32_t(workers_.size());
      workers_.emplace_back([this, index] { work(index); });
    }
    job_ = &f;
    active_ = n;
    remaining_ = n;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }
  ~ThreadPool() {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& w : workers_) w.join();
  }

 private:
  void work(uint32_t index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (index >= active_) continue;
      const std::function<void(uint32_t)>* job = job_;
      lock.unlock();
      (*job)(index);
      lock.lock();
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(uint32_t)>* job_ = nullptr;
  uint32_t active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

// Runs kernel<<<grid, block, dynamic_bytes>>>(args...) to completion: the thread blocks one
// after another, each with block.count() threads. Arguments are converted to the kernel's
// parameter types once and copied to each thread, as kernel parameters are. Launches from
// several host threads at once are serialised.
template <class... Params, class... Args>
LaunchResult launch(void (*kernel)(Params...), Dim3 grid, Dim3 block, size_t dynamic_bytes,
                    Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "argument count");
  static std::mutex one_launch_at_a_time;  // __shared__ statics are per kernel, not per launch
  const std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  LaunchResult result;
  for (uint32_t bz = 0; bz < grid.z; ++bz) {
    for (uint32_t by = 0; by < grid.y; ++by) {
      for (uint32_t bx = 0; bx < grid.x; ++bx) {
        Block b(block, dynamic_bytes);
        ThreadPool::instance().run(block.count(), [&](uint32_t t) {
          threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          blockIdx = {bx, by, bz};
          blockDim = block;
          gridDim = grid;
          t_context = {&b, t};
          t_async_groups = {{}};
          try {
            std::apply(kernel, params);
          } catch (const std::exception& e) {
            b.report(std::string("exception in a device thread: ") + e.what());
          }
          b.exit(t);
          t_context = {};
        });
        for (auto& e : b.errors()) {
          result.errors.push_back("block (" + std::to_string(bx) + "," + std::to_string(by) + "," +
                                  std::to_string(bz) + "): " + e);
        }
      }
    }
  }
  return result;
}

}  // namespace kvc::emu

// ---- Warp-level matrix facilities (device_api.cuh) ----------------------------------------------
#include "kernels/common/mma.cuh"  // the fragment layouts, host-callable

// mma.sync and ldmatrix are warp collectives: every lane publishes its operands (three rounds of
// the exchange slots), then computes its own part from everyone's. The products and sums of
// mma run in double and are rounded once to fp32 (the tensor core's internal order and width
// are not specified; the attention tests allow for fp32 accumulation). cp.async copies land at
// the wait that covers them (poison until then); conversions round to nearest even as cvt.rn
// and fma.rn do (fma2 is exact whenever its result is representable, as in every kernel use).
namespace kvc::emu {

inline std::array<uint64_t, kWarpSize> warp_gather(uint64_t mine) {
  const uint32_t lane = t_context.linear % kWarpSize;
  Warp& w = t_context.block->warp(t_context.linear);
  w.slot[lane] = mine;
  w.barrier.arrive_and_wait();
  std::array<uint64_t, kWarpSize> all;
  std::copy(std::begin(w.slot), std::end(w.slot), all.begin());
  w.barrier.arrive_and_wait();
  return all;
}

inline float half_value(uint32_t bits16, bool bf16) {
  return bf16 ? format::bf16_to_float(uint16_t(bits16)) : format::half_to_float(uint16_t(bits16));
}
inline uint32_t round_half(double v, bool bf16) {
  return bf16 ? format::float_to_bf16(float(v)) : format::float_to_half(float(v));
}

}  // namespace kvc::emu

namespace kvc::device {

template <bool BF16>
void mma_16816(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  using kvc::kernels::mma::a_coord, kvc::kernels::mma::b_coord, kvc::kernels::mma::c_coord;
  const auto a01 = emu::warp_gather(uint64_t(a.x) | uint64_t(a.y) << 32);
  const auto a23 = emu::warp_gather(uint64_t(a.z) | uint64_t(a.w) << 32);
  const auto b = emu::warp_gather(uint64_t(b0) | uint64_t(b1) << 32);
  double A[16][16], B[16][8];
  for (uint32_t lane = 0; lane < emu::kWarpSize; ++lane) {
    const uint64_t regs[2] = {a01[lane], a23[lane]};
    for (uint32_t i = 0; i < 8; ++i) {
      const uint32_t h = uint32_t(regs[i / 4] >> (16 * (i % 4))) & 0xFFFFu;
      const auto c = a_coord(lane, i);
      A[c.row][c.col] = emu::half_value(h, BF16);
    }
    for (uint32_t i = 0; i < 4; ++i) {
      const auto c = b_coord(lane, i);
      B[c.row][c.col] = emu::half_value(uint32_t(b[lane] >> (16 * i)) & 0xFFFFu, BF16);
    }
  }
  const uint32_t lane = emu::t_context.linear % emu::kWarpSize;
  for (uint32_t i = 0; i < 4; ++i) {
    const auto c = c_coord(lane, i);
    double sum = d[i];
    for (uint32_t k = 0; k < 16; ++k) sum += A[c.row][k] * B[k][c.col];
    d[i] = float(sum);
  }
}

template <bool Trans>
uint4 ldmatrix_x4(const void* row) {
  const auto rows = emu::warp_gather(reinterpret_cast<uintptr_t>(row));
  const uint32_t lane = emu::t_context.linear % emu::kWarpSize;
  uint32_t r[4];
  for (uint32_t j = 0; j < 4; ++j) {
    uint32_t halves[2];
    for (uint32_t h = 0; h < 2; ++h) {
      const auto c = kvc::kernels::mma::ldmatrix_coord(lane, h, Trans);  // (row, col) as stored
      const auto* src = reinterpret_cast<const uint16_t*>(uintptr_t(rows[8 * j + c.row]));
      halves[h] = src[c.col];
    }
    r[j] = halves[0] | halves[1] << 16;
  }
  return {r[0], r[1], r[2], r[3]};
}

// cp.async lands at the wait that covers it, and the destination holds poison until then, so a
// kernel that reads staged data before waiting for it reads garbage here too.
inline void cp_async_16(void* dst, const void* src, bool valid) {
  std::memset(dst, 0xCD, 16);
  emu::t_async_groups.back().push_back({dst, valid ? src : nullptr});
}
inline void cp_async_commit() { emu::t_async_groups.emplace_back(); }
template <int N>
void cp_async_wait() {
  // Committed groups are all but the open last one; all but the newest N of them complete.
  const size_t committed = emu::t_async_groups.size() - 1;
  const size_t complete = committed > size_t(N) ? committed - N : 0;
  for (size_t g = 0; g < complete; ++g) {
    for (const emu::AsyncCopy& c : emu::t_async_groups[g]) {
      if (c.src != nullptr) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
    }
  }
  emu::t_async_groups.erase(emu::t_async_groups.begin(),
                            emu::t_async_groups.begin() + long(complete));
}

template <bool BF16>
uint32_t pack2(float lo, float hi) {
  return emu::round_half(lo, BF16) | emu::round_half(hi, BF16) << 16;
}
inline uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) { return (a & b) | c; }
// cvt.rn.f16.f32 / cvt.rn.bf16.f32: nearest even, and a NaN becomes the canonical 0x7FFF (the
// CPU's conversions keep the sign and set the quiet bit instead, so a kernel that stores a NaN
// without handling it differs from the CPU here too).
template <bool BF16>
uint16_t half_rn(float v) {
  if (std::isnan(v)) return 0x7FFF;
  return uint16_t(BF16 ? format::float_to_bf16(v) : format::float_to_half(v));
}
// ex2.approx.ftz.f32: the exact value stands in for the approximation (a few ulp), which the
// attention tests' tolerance covers.
inline float exp2_approx(float x) { return std::exp2(x); }
// cvt.f32.f16: exact for every non-NaN half; a NaN stays a NaN (its payload is not relied on).
inline float half_to_float(uint16_t h) { return format::half_to_float(h); }
template <bool BF16>
uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r = 0;
  for (uint32_t h = 0; h < 2; ++h) {
    const auto part = [&](uint32_t x) { return double(emu::half_value(x >> (16 * h), BF16)); };
    r |= emu::round_half(part(a) * part(b) + part(c), BF16) << (16 * h);
  }
  return r;
}

}  // namespace kvc::device
