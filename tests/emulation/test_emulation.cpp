// SPDX-License-Identifier: Apache-2.0
// The host emulation of the device API itself: barriers and their reductions, exited threads,
// divergent barriers reported, warp shuffles, atomics, shared memory and the BlockScan stand-in.
#include "tests/emulation/device_emulation.hpp"
//
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "kernels/common/device_api.cuh"

namespace kvc::test {
namespace {

__global__ void barrier_reductions(uint32_t* out) {
  const uint32_t tid = threadIdx.x;
  __shared__ uint32_t total;
  if (tid == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, tid);
  const int any = __syncthreads_or(tid == 77);
  const int all = __syncthreads_and(tid < 1000);
  const int count = __syncthreads_count(tid % 3 == 0);
  if (tid == 0) {
    out[0] = uint32_t(any);
    out[1] = uint32_t(all);
    out[2] = uint32_t(count);
    out[3] = total;
  }
}

TEST(Emulation, BarrierReductionsAndSharedVariables) {
  std::vector<uint32_t> out(4);
  ASSERT_TRUE(emu::launch(barrier_reductions, 1, 256, 0, out.data()).ok());
  EXPECT_EQ(out, (std::vector<uint32_t>{1, 1, 86, 255 * 256 / 2}));
}

// Threads that return leave the barrier; the rest still meet.
__global__ void early_exit(uint32_t* out) {
  if (threadIdx.x >= 100) return;
  KVC_DYNAMIC_SHARED(uint32_t, words);
  words[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = words[99 - threadIdx.x];
}

TEST(Emulation, ExitedThreadsLeaveTheBarrier) {
  std::vector<uint32_t> out(100);
  ASSERT_TRUE(emu::launch(early_exit, 1, 256, 400, out.data()).ok());
  for (uint32_t i = 0; i < 100; ++i) EXPECT_EQ(out[i], 99 - i);
}

__global__ void divergent_barrier() {
  if (threadIdx.x < 128) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

TEST(Emulation, DivergentBarriersAreReported) {
  const emu::LaunchResult r = emu::launch(divergent_barrier, 2, 256, 0);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("divergent __syncthreads"), std::string::npos) << r.message();
}

__global__ void warp_sums(float* out, uint32_t* down) {
  const uint32_t lane = threadIdx.x % 32;
  float v = float(threadIdx.x);
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(~0u, v, off);
  out[threadIdx.x] = v;  // every lane: the warp's sum
  down[threadIdx.x] = __shfl_down_sync(~0u, lane, 1);
  __syncwarp();
  const unsigned ballot = __ballot_sync(~0u, lane % 2);
  if (lane == 0) down[blockDim.x + threadIdx.x / 32] = ballot;
}

TEST(Emulation, WarpShufflesExchangeBetweenLanes) {
  std::vector<float> out(64);
  std::vector<uint32_t> down(66);
  ASSERT_TRUE(emu::launch(warp_sums, 1, 64, 0, out.data(), down.data()).ok());
  for (uint32_t t = 0; t < 64; ++t) {
    const uint32_t first = t / 32 * 32;
    EXPECT_EQ(out[t], float(32 * first + 31 * 32 / 2)) << t;
    EXPECT_EQ(down[t], t % 32 == 31 ? 31u : t % 32 + 1) << t;  // no source: its own value
  }
  EXPECT_EQ(down[64], 0xAAAAAAAAu);
  EXPECT_EQ(down[65], 0xAAAAAAAAu);
}

__global__ void atomics(unsigned long long* sum, int* lo, unsigned* hi, int* cas) {
  const int v = int(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(sum, 1ull);
  atomicMin(lo, -v);
  atomicMax(hi, unsigned(v));
  atomicCAS(cas, 0, v + 1);  // only the first wins
}

TEST(Emulation, AtomicsAreIndivisible) {
  unsigned long long sum = 0;
  int lo = 0, cas = 0;
  unsigned hi = 0;
  ASSERT_TRUE(emu::launch(atomics, 3, 128, 0, &sum, &lo, &hi, &cas).ok());
  EXPECT_EQ(sum, 384u);
  EXPECT_EQ(lo, -383);
  EXPECT_EQ(hi, 383u);
  EXPECT_GE(cas, 1);
}

struct Pair {
  uint32_t restarted, bits;
};
struct SegmentedSum {
  Pair operator()(const Pair& a, const Pair& b) const {
    return b.restarted ? b : Pair{a.restarted, a.bits + b.bits};
  }
};

__global__ void scans(uint32_t* sums, uint32_t* aggregate, Pair* segmented) {
  using Sum = device::BlockScan<uint32_t, 256>;
  using Seg = device::BlockScan<Pair, 256>;
  __shared__ typename Sum::TempStorage sum_storage;
  __shared__ typename Seg::TempStorage seg_storage;
  const uint32_t tid = threadIdx.x;
  uint32_t before = 0, total = 0;
  Sum(sum_storage).ExclusiveSum(tid + 1, before, total);
  sums[tid] = before;
  if (tid == 0) *aggregate = total;
  Pair out;
  Seg(seg_storage).ExclusiveScan(Pair{tid % 100 == 0, 1}, out, Pair{0, 5}, SegmentedSum{});
  segmented[tid] = out;
}

TEST(Emulation, BlockScanHasCubsSemantics) {
  std::vector<uint32_t> sums(256);
  uint32_t aggregate = 0;
  std::vector<Pair> seg(256);
  ASSERT_TRUE(emu::launch(scans, 1, 256, 0, sums.data(), &aggregate, seg.data()).ok());
  for (uint32_t t = 0; t < 256; ++t) {
    EXPECT_EQ(sums[t], t * (t + 1) / 2);
    // Exclusive: thread t sees the elements before it, after the initial value {0, 5}; the
    // elements of threads 0, 100 and 200 restart the count.
    EXPECT_EQ(seg[t].bits, t == 0 ? 5u : (t - 1) % 100 + 1) << t;
  }
  EXPECT_EQ(aggregate, 256u * 257u / 2u);
}

TEST(Emulation, BlockScanOfTheWrongBlockSizeIsReported) {
  std::vector<uint32_t> sums(128);
  uint32_t aggregate = 0;
  std::vector<Pair> seg(128);
  EXPECT_FALSE(emu::launch(scans, 1, 128, 0, sums.data(), &aggregate, seg.data()).ok());
}

}  // namespace
}  // namespace kvc::test
