// SPDX-License-Identifier: Apache-2.0
// kvc::cuda::launch and its shared-memory opt-in: every kernel (each template instantiation is
// its own) gets its limit raised, static shared memory counts toward the 48 KiB default, and a
// failed launch leaves no runtime error behind for the caller's next cudaGetLastError().
#include "cuda/launch.hpp"
#include "gpu_test.hpp"

namespace kvc::test {
namespace {

// Fills `words` words of dynamic shared memory, then writes them reversed (plus Salt) to out.
template <int Salt>
__global__ void reverse_through_shared(uint32_t* out, uint32_t words) {
  extern __shared__ uint32_t dynamic_words[];
  for (uint32_t i = threadIdx.x; i < words; i += blockDim.x) dynamic_words[i] = i;
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < words; i += blockDim.x) {
    out[i] = dynamic_words[words - 1 - i] + Salt;
  }
}

// The same with 4 KiB of static shared memory on top.
__global__ void reverse_with_static_shared(uint32_t* out, uint32_t words) {
  extern __shared__ uint32_t dynamic_words[];
  __shared__ uint32_t fixed[1024];
  for (uint32_t i = threadIdx.x; i < 1024; i += blockDim.x) fixed[i] = 1;
  for (uint32_t i = threadIdx.x; i < words; i += blockDim.x) dynamic_words[i] = i;
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < words; i += blockDim.x) {
    out[i] = dynamic_words[words - 1 - i] + fixed[i % 1024];
  }
}

void expect_reversed(const DeviceBuffer& out, uint32_t words, uint32_t salt) {
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = out.download<uint32_t>(words);
  for (uint32_t i = 0; i < words; ++i) ASSERT_EQ(got[i], words - 1 - i + salt) << "word " << i;
}

class LaunchGpu : public GpuTest {};

// Kernels of one signature share nothing: the opt-in of the first does not cover the others.
TEST_F(LaunchGpu, EveryInstantiationGetsItsOwnSharedMemoryOptIn) {
  const uint32_t words = 64 * 1024 / 4;  // 64 KiB: over the default
  DeviceBuffer out(words * 4);
  ASSERT_NO_THROW(cuda::launch(reverse_through_shared<0>, dim3(1), 256, words * 4, nullptr,
                               out.get<uint32_t>(), words));
  expect_reversed(out, words, 0);
  ASSERT_NO_THROW(cuda::launch(reverse_through_shared<1>, dim3(1), 256, words * 4, nullptr,
                               out.get<uint32_t>(), words));
  expect_reversed(out, words, 1);
  ASSERT_NO_THROW(cuda::launch(reverse_through_shared<2>, dim3(1), 256, words * 4, nullptr,
                               out.get<uint32_t>(), words));
  expect_reversed(out, words, 2);
}

// 46 KiB dynamic + 4 KiB static is over 48 KiB although the dynamic part alone is not.
TEST_F(LaunchGpu, StaticSharedMemoryCountsTowardTheDefaultLimit) {
  EXPECT_FALSE(cuda::needs_shared_memory_opt_in(46 * 1024, 0));
  EXPECT_TRUE(cuda::needs_shared_memory_opt_in(46 * 1024, 4 * 1024));
  const uint32_t words = 46 * 1024 / 4;
  DeviceBuffer out(words * 4);
  ASSERT_NO_THROW(cuda::launch(reverse_with_static_shared, dim3(1), 256, words * 4, nullptr,
                               out.get<uint32_t>(), words));
  expect_reversed(out, words, 1);
}

TEST_F(LaunchGpu, AFailedLaunchLeavesNoStickyRuntimeError) {
  int optin = 0;
  KVC_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
  DeviceBuffer out(4);
  const uint32_t too_many_words = uint32_t(optin) / 4 + 1024;
  try {
    cuda::launch(reverse_through_shared<3>, dim3(1), 256, size_t(too_many_words) * 4, nullptr,
                 out.get<uint32_t>(), 1u);
    FAIL() << "a launch over the device's shared-memory limit succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), KVC_ERROR_CUDA) << e.what();
  }
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
}  // namespace kvc::test
