// SPDX-License-Identifier: Apache-2.0
// Host-side launch helpers shared by the .cu launchers: CUDA errors as kvc::Error, and kernel
// launches that report their own status (never an earlier, unrelated error of the caller's).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "core/error.hpp"

namespace kvc::cuda {

// The status of a CUDA runtime call, reported as KVC_ERROR_CUDA and cleared from the runtime's
// last error, where the application's next cudaGetLastError() would otherwise find it against
// its own work (an error that ends the context stays: every later call reports it).
inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    fail(KVC_ERROR_CUDA, what, " failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
  }
}

// A copy from host memory that has landed when it returns, for every stream: a synchronous copy
// from pageable memory may return before the data arrive, and the legacy stream it runs on does
// not order non-blocking streams. `device`: memory the GPU reaches, which for a caller's output
// may be host memory too (pinned, or pageable where the GPU reads it): the runtime tells the
// direction from the addresses.
inline void copy_to_device(void* device, const void* host, size_t bytes, const char* what) {
  check_cuda(cudaMemcpy(device, host, bytes, cudaMemcpyDefault), what);
  check_cuda(cudaStreamSynchronize(nullptr), what);
}

inline int current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// Whether `stream` is being captured into a graph. (Queried on the legacy stream while another
// stream captures, the runtime fails with an error of its own.)
inline bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

// A pointer the caller passes as memory that kernels on `device` read or write. Refused where
// the runtime says they cannot reach it: pageable host memory on a GPU that cannot read it
// (cudaDevAttrPageableMemoryAccess: HMM or ATS systems such as Grace Hopper can), registered
// host memory mapped at another device address, or another device's memory (reachable only
// through peer access, which this library does not use). A kernel faulting on it would end
// the process's CUDA context. Pointers the runtime does not classify (NULL among them) are
// left to the other checks. A host-side check, so not made while capturing: a graph replays
// without it.
inline void require_device_memory(const void* p, int device, const char* name) {
  cudaPointerAttributes a{};
  if (p == nullptr) return;
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();  // an unclassified pointer is no sticky error: clear it
    return;
  }
  switch (a.type) {
    case cudaMemoryTypeDevice:
      require(a.device == device, KVC_ERROR_INVALID_ARGUMENT, name, " is memory of device ",
              a.device, ", not of device ", device, " where this runs");
      return;
    case cudaMemoryTypeHost:  // registered (pinned): read through its device address
      require(a.devicePointer == p, KVC_ERROR_INVALID_ARGUMENT, name,
              " is registered host memory mapped at another device address (pass that address)");
      return;
    case cudaMemoryTypeUnregistered: {
      int pageable = 0;
      check_cuda(cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, device),
                 "cudaDeviceGetAttribute");
      require(pageable != 0, KVC_ERROR_INVALID_ARGUMENT, name,
              " is host memory, which this GPU cannot read: the CUDA backend takes device "
              "pointers");
      return;
    }
    default:  // managed
      return;
  }
}

// Objects holding device memory belong to the device that was current at their creation.
inline void require_device(int device, const char* what) {
  const int now = current_device();
  require(now == device, KVC_ERROR_INVALID_ARGUMENT, what, " was created on device ", device,
          " but device ", now, " is current");
}

// Without the opt-in a thread block gets 48 KiB of shared memory, its static shared memory
// (__shared__ variables) included.
constexpr size_t kDefaultSharedMemoryBytes = 48 * 1024;

// The most shared memory (static and dynamic) a thread block of the current device may opt in to.
inline size_t shared_memory_optin() {
  int optin = 0;
  check_cuda(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, current_device()),
      "cudaDeviceGetAttribute");
  return size_t(optin);
}

// Whether a launch with `dynamic_bytes` of dynamic shared memory needs the kernel's limit raised.
constexpr bool needs_shared_memory_opt_in(size_t dynamic_bytes, size_t static_bytes) {
  return dynamic_bytes + static_bytes > kDefaultSharedMemoryBytes;
}

// Makes a launch of `kernel` with `dynamic_bytes` of dynamic shared memory legal on the current
// device: raises the kernel's limit to everything the device allows, once per (device, kernel).
// The limit is a property of the function on one device, shared by every caller, so it is only
// ever raised (lowering it for one codec could break another's launch or captured graph). The
// cache is keyed by the function's address: every template instantiation is its own kernel with
// its own limit. Failures are not cached. Calls made here are legal during stream capture.
inline void allow_shared_memory(const void* kernel, size_t dynamic_bytes) {
  struct Known {
    int device;
    const void* kernel;
    size_t static_bytes;
    bool raised;
  };
  static std::mutex mutex;
  static std::vector<Known> known;  // a few dozen kernels at most
  const int device = current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = std::find_if(known.begin(), known.end(),
                         [&](const Known& k) { return k.device == device && k.kernel == kernel; });
  if (it == known.end()) {
    cudaFuncAttributes attributes{};
    check_cuda(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
    known.push_back({device, kernel, attributes.sharedSizeBytes, false});
    it = known.end() - 1;
  }
  if (it->raised || !needs_shared_memory_opt_in(dynamic_bytes, it->static_bytes)) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  int(shared_memory_optin() - it->static_bytes)),
             "raising the kernel's shared-memory limit");
  // Kernels this large stage their data in shared memory rather than lean on L1: ask for the
  // largest shared-memory split, so that as many of their blocks as fit share a multiprocessor
  // (the carve-out is otherwise the driver's choice, which may fit only one).
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                  int(cudaSharedmemCarveoutMaxShared)),
             "preferring the largest shared-memory carve-out");
  it->raised = true;
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
  const void* function = reinterpret_cast<const void*>(kernel);
  if (smem > 0) allow_shared_memory(function, smem);
  void* params[] = {&args...};
  check_cuda(cudaLaunchKernel(function, grid, dim3(threads), params, smem, stream),
             "kernel launch");
}

}  // namespace kvc::cuda
