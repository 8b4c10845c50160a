// SPDX-License-Identifier: Apache-2.0
// Shared by the GPU suites: a fixture that skips without a usable GPU, checked CUDA calls, and
// device buffers that free themselves.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <vector>

namespace kvc::test {

bool gpu_available();  // from gpu_main.cpp

#define KVC_CUDA_CHECK(call)                                               \
  do {                                                                     \
    const cudaError_t e_ = (call);                                         \
    ASSERT_EQ(e_, cudaSuccess) << #call << ": " << cudaGetErrorString(e_); \
  } while (0)

class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu_available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  }
};

// Whether the current GPU reads pageable host memory (HMM, or ATS as on Grace Hopper): there
// host pointers are valid device arguments.
inline bool reads_pageable_memory() {
  int device = 0, pageable = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, device) ==
             cudaSuccess &&
         pageable != 0;
}

// A device allocation of n bytes, freed on scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (cudaMalloc(&ptr_, bytes ? bytes : 1) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }
  // Done when it returns, for every stream: a copy from pageable memory may otherwise still be
  // in flight on the legacy stream, which non-blocking streams do not wait for.
  void upload(const void* host, size_t n) {
    EXPECT_EQ(cudaMemcpy(ptr_, host, n, cudaMemcpyHostToDevice), cudaSuccess);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }
  template <class T>
  std::vector<T> download(size_t count) const {
    std::vector<T> out(count);
    EXPECT_EQ(cudaMemcpy(out.data(), ptr_, count * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

// A captured graph and its executable, destroyed on scope exit.
struct Graph {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  Graph() = default;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph() {
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
  }
};

// A device array of pointers base + i * stride_bytes.
inline std::vector<void*> strided_pointers(void* base, size_t count, size_t stride_bytes) {
  std::vector<void*> p(count);
  for (size_t i = 0; i < count; ++i) p[i] = static_cast<char*>(base) + i * stride_bytes;
  return p;
}

}  // namespace kvc::test
