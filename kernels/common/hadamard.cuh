// SPDX-License-Identifier: Apache-2.0
// The orthonormal Hadamard rotation of a store row (kvc_store_config.rotation): x' = H x / sqrt(n)
// with H the n x n Sylvester Hadamard matrix (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]), n a
// power of two. H / sqrt(n) is symmetric and orthogonal, so the rotation is its own inverse.
//
// Computed as the fast Walsh-Hadamard transform in fp32: log2(n) stages of n/2 butterflies
// (a, b) -> (a + b, a - b), then one multiplication by 1/sqrt(n). Every element of every stage
// is a single rounded add or subtract of two values of the previous stage, so the result does
// not depend on how the butterflies of a stage are spread over threads: the serial loop (host:
// the CPU store and the tests) and a thread block running the same butterflies stage by stage
// (the CUDA store's kernels) give the same bits.
#pragma once

#include <cstdint>

#include "kernels/common/format.cuh"  // KVC_HD

namespace kvc::hadamard {

// Whether n is a dimension the rotation covers: a power of two.
KVC_HD bool valid_dim(uint32_t n) { return n != 0 && (n & (n - 1)) == 0; }

// 1/sqrt(n) for n = 2^k, the same float everywhere: a power of two times 1 or 1/sqrt(2) (the
// float nearest it), so no sqrt or division whose rounding could differ between compilers.
KVC_HD float scale(uint32_t n) {
  uint32_t k = 0;
  while ((1u << k) < n) ++k;
  float s = (k & 1u) ? 0.70710678118654752440f : 1.0f;
  for (uint32_t i = 0; i < k / 2; ++i) s *= 0.5f;  // exact: a power of two
  return s;
}

// Butterfly i (0 <= i < n/2) of the stage of span h (1, 2, 4, ..., n/2) on x[0, n).
KVC_HD void butterfly(float* x, uint32_t h, uint32_t i) {
  const uint32_t j = (i / h) * 2 * h + i % h;
  const float a = x[j], b = x[j + h];
  x[j] = a + b;
  x[j + h] = a - b;
}

// x[0, n) <- H x / sqrt(n), in place; n a power of two (valid_dim).
KVC_HD void rotate(float* x, uint32_t n) {
  for (uint32_t h = 1; h < n; h *= 2) {
    for (uint32_t i = 0; i < n / 2; ++i) butterfly(x, h, i);
  }
  const float s = scale(n);
  for (uint32_t i = 0; i < n; ++i) x[i] *= s;
}

// A 16-bit element (fp16, or bf16 where bf16) to float, and back rounded to nearest even
// (overflow gives inf: a rotated row that leaves the dtype's range is caught as non-finite).
KVC_HD float load16(uint16_t v, bool bf16) {
  return bf16 ? format::bf16_to_float(v) : format::half_to_float(v);
}
KVC_HD uint16_t store16(float x, bool bf16) {
  return bf16 ? format::float_to_bf16(x) : format::float_to_half(x);
}

#if defined(__CUDACC__) || defined(KVC_DEVICE_EMULATION)
// The same on one row in shared memory, by the whole thread block (every thread calls it; it
// synchronizes the block before and after).
__device__ inline void rotate_block(float* x, uint32_t n) {
  __syncthreads();
  for (uint32_t h = 1; h < n; h *= 2) {
    for (uint32_t i = threadIdx.x; i < n / 2; i += blockDim.x) butterfly(x, h, i);
    __syncthreads();
  }
  const float s = scale(n);
  for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) x[i] *= s;
  __syncthreads();
}
#endif

}  // namespace kvc::hadamard
