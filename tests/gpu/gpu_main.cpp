// SPDX-License-Identifier: Apache-2.0
// The one main of the GPU suites: decides once whether a GPU is usable; every GPU test skips
// with a clear message where none is.
#include <gtest/gtest.h>

#include <cstdio>

#include "gpu_test.hpp"

namespace kvc::test {
namespace {
bool g_gpu = false;
}
bool gpu_available() { return g_gpu; }
}  // namespace kvc::test

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  int count = 0;
  kvc::test::g_gpu = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  if (!kvc::test::g_gpu) {
    cudaGetLastError();
    std::printf("No CUDA device found: every GPU test will be skipped.\n");
  } else {
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    std::printf("GPU: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  }
  return RUN_ALL_TESTS();
}
