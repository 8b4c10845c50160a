// SPDX-License-Identifier: Apache-2.0
// What the GPU benchmark programs share: failing fast on a CUDA error, the --json argument,
// and a clean exit where there is no GPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#define CHECK_CUDA(call)                                                                          \
  do {                                                                                            \
    const cudaError_t e_ = (call);                                                                \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

namespace kvc::bench {

// The FILE of `--json FILE`, or nullptr.
inline const char* json_path(int argc, char** argv) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--json") return argv[i + 1];
  }
  return nullptr;
}

// Whether `flag` (say "--quick") is among the arguments.
inline bool has_flag(int argc, char** argv, const char* flag) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == flag) return true;
  }
  return false;
}

// Whether a GPU is usable; if not, says so for `program` (which then measures nothing).
inline bool have_gpu(const char* program) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) return true;
  std::printf("%s: no CUDA device, nothing measured\n", program);
  return false;
}

}  // namespace kvc::bench
