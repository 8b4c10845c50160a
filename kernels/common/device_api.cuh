// SPDX-License-Identifier: Apache-2.0
// The few device facilities the kernels reach through a name of kvcomp's own, so that the same
// kernel sources compile under nvcc and under the host emulation of the tests
// (tests/emulation/device_emulation.hpp, which must be included first and defines
// KVC_DEVICE_EMULATION along with CUDA's keywords, built-in variables, barriers, warp
// collectives and atomics). Everything else in the kernels is plain CUDA C++.
//
//   KVC_DYNAMIC_SHARED(type, name)   the block's dynamic shared memory as `type* name`
//   kvc::device::BlockScan<T, N>     CUB's BlockScan (kvcomp's wrapped namespace)
//   kvc::device::mma_16816<BF16>     mma.sync.aligned.m16n8k16, fp16/bf16 in, fp32 accumulate
//   kvc::device::ldmatrix_x4<Trans>  four 8x8 matrices of 16-bit elements from shared memory
//   kvc::device::cp_async_16, cp_async_commit, cp_async_wait<N>   16-byte async copies
//   kvc::device::pack2<BF16>         two floats to a rounded fp16x2/bf16x2 (cvt.rn)
//   kvc::device::lop3_and_or         (a & b) | c in one LOP3
//   kvc::device::fma2<BF16>          a * b + c on fp16x2/bf16x2, rounded once
//   kvc::device::half_rn<BF16>       one float to fp16/bf16 bits, nearest even (cvt.rn); a NaN
//                                    gives the canonical NaN 0x7FFF (callers that must keep the
//                                    CPU's NaN bits test for NaN themselves)
//   kvc::device::half_to_float       fp16 bits to float (cvt.f32.f16), exact for every
//                                    non-NaN value
//   kvc::device::exp2_approx         2^x by the hardware's approximation (ex2.approx.ftz.f32:
//                                    one MUFU, a few ulp, results below 2^-126 flushed to 0)
//
// Adding a facility: name it here, with the CUDA definition below and the emulation's in the
// test header; see docs/emulation.md.
#pragma once

#if !defined(KVC_DEVICE_EMULATION)

#include <cub/block/block_scan.cuh>

#define KVC_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]

namespace kvc::device {

template <class T, int kThreads>
using BlockScan = CUB_NS_QUALIFIER::BlockScan<T, kThreads>;  // kvcomp's wrapped CUB

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kvcomp's kernels need sm_80 or newer (bf16 mma, cp.async)"
#endif

// D += A * B: A 16x16 (four registers), B 16x8 (two), D 16x8 fp32; fragment layouts in
// kernels/common/mma.cuh.
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Lane 8j + r passes the address of row r of matrix j; register j is the lane's part of it.
template <bool Trans>
__device__ __forceinline__ uint4 ldmatrix_x4(const void* row) {
  uint4 r;
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "r"(shared_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "r"(shared_address(row)));
  }
  return r;
}

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// lo in the low half, hi in the high half, each rounded to nearest even.
template <bool BF16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (BF16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

// Written out because the compiler spends two LOP3 on (a & imm) | imm. Table 0xF0 & 0xCC | 0xAA.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

template <bool BF16>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  if constexpr (BF16) {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  }
  return r;
}

template <bool BF16>
__device__ __forceinline__ uint16_t half_rn(float v) {
  uint16_t r;
  if constexpr (BF16) {
    asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r) : "f"(v));
  } else {
    asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(r) : "f"(v));
  }
  return r;
}

__device__ __forceinline__ float half_to_float(uint16_t h) {
  float r;
  asm("cvt.f32.f16 %0, %1;\n" : "=f"(r) : "h"(h));
  return r;
}

// The softmax's exponential: exp2f adds a range check and two multiplies around the MUFU to keep
// subnormal results, and a probability under 2^-126 adds nothing to a sum that holds a 1.
__device__ __forceinline__ float exp2_approx(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}

}  // namespace kvc::device

#endif
