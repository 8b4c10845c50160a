// SPDX-License-Identifier: Apache-2.0
// Histogram kernel: the Huffman symbols (code minus group mean) of each block, counted into a
// window of 2^16 bins around 0; symbols outside it count only toward the escape.
#pragma once

#include "kernels/codec/device_common.cuh"

namespace kvc::kernels {

constexpr int32_t kHistogramHalf = 1 << 15;

struct HistogramCounts {
  unsigned long long bins[2 * kHistogramHalf];  // symbol s at bins[s + kHistogramHalf]
  unsigned long long unbinned;
  unsigned int nonfinite;  // some block had inf/NaN input
};

template <kvc_dtype DT>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(Shape sh, const void* const* src_blocks, int64_t stride,
                     HistogramCounts* counts) {
  KVC_DYNAMIC_SHARED(uint8_t, smem);
  __shared__ QuantSummary sum;
  const uint32_t n = sh.num_elements(), groups = sh.num_groups;
  const QuantSmem q = QuantSmem::carve(smem, n, groups);
  if (src_blocks[blockIdx.x] == nullptr) return;  // as in encode: no block, nothing counted
  quantize_block<DT>(sh, src_blocks[blockIdx.x], stride, q, sum);
  if (sum.nonfinite) {
    if (threadIdx.x == 0) atomicOr(&counts->nonfinite, 1u);
    return;
  }
  if (!sum.quantized) return;  // stored verbatim: no symbols, as on the CPU
  ElementWalk at(sh, threadIdx.x, blockDim.x);
  for (uint32_t i = threadIdx.x; i < n; i += blockDim.x, at.advance()) {
    const int32_t s = q.vals[i] - q.cmean[at.group(sh.is_value != 0)];
    if (s >= -kHistogramHalf && s < kHistogramHalf) {
      atomicAdd(&counts->bins[s + kHistogramHalf], 1ull);
    } else {
      atomicAdd(&counts->unbinned, 1ull);
    }
  }
}

}  // namespace kvc::kernels
