// SPDX-License-Identifier: Apache-2.0
// Host-side launch helpers shared by the .cu launchers: CUDA errors as kvc::Error, and kernel
// launches that report their own status (never an earlier, unrelated error of the caller's).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "core/error.hpp"

namespace kvc::cuda {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    fail(KVC_ERROR_CUDA, what, " failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
  }
}

// A host-to-device copy that has landed when it returns, for every stream: a synchronous copy
// from pageable memory may return before the data arrive, and the legacy stream it runs on does
// not order non-blocking streams.
inline void copy_to_device(void* device, const void* host, size_t bytes, const char* what) {
  check_cuda(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice), what);
  check_cuda(cudaStreamSynchronize(nullptr), what);
}

inline int current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// Objects holding device memory belong to the device that was current at their creation.
inline void require_device(int device, const char* what) {
  const int now = current_device();
  require(now == device, KVC_ERROR_INVALID_ARGUMENT, what, " was created on device ", device,
          " but device ", now, " is current");
}

// Raises a kernel's dynamic shared-memory limit to everything the device allows, once per kernel:
// the limit is a property of the function, shared by every caller, so it is only ever raised
// (lowering it for one codec could break another's launch or captured graph).
template <class Kernel>
void allow_large_shared_memory(Kernel kernel) {
  static const cudaError_t raised = [&] {
    int optin = 0;
    cudaFuncAttributes attributes{};
    cudaError_t e =
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, current_device());
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&attributes, kernel);
    if (e == cudaSuccess) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               optin - int(attributes.sharedSizeBytes));
    }
    return e;
  }();
  check_cuda(raised, "raising the kernel's shared-memory limit");
}

// Runtime value -> compile-time constant: calls f(std::integral_constant<T, v>) for the one of
// Values that equals value; KVC_ERROR_NOT_SUPPORTED names `what` for any other.
template <class T, T... Values, class F>
void dispatch(T value, const char* what, F&& f) {
  bool done = false;
  ((value == Values ? (f(std::integral_constant<T, Values>{}), done = true) : false), ...);
  if (!done) fail(KVC_ERROR_NOT_SUPPORTED, what, " = ", uint64_t(value), " has no CUDA kernel");
}

template <class T>
struct Exactly {
  using type = T;
};

// Enqueues kernel<<<grid, threads, smem, stream>>>(args...) and checks the launch itself. The
// arguments are converted to the kernel's exact parameter types, which cudaLaunchKernel reads.
template <class... Params>
void launch(void (*kernel)(Params...), dim3 grid, uint32_t threads, size_t smem,
            cudaStream_t stream, typename Exactly<Params>::type... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (smem > 48 * 1024) allow_large_shared_memory(kernel);
  void* params[] = {&args...};
  check_cuda(cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, dim3(threads), params,
                              smem, stream),
             "kernel launch");
}

}  // namespace kvc::cuda
