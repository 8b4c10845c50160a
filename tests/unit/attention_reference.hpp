// SPDX-License-Identifier: Apache-2.0
// The attention tests' reference: softmax attention in double for one query row, and how far a
// kernel's output row (fp16/bf16 bits) may be from it. Shared by the GPU tests and the kernel
// emulation tests.
#pragma once

#include <kvcomp/kvcomp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/common/format.cuh"

namespace kvc::test {

inline uint16_t to_bits(kvc_dtype dt, float v) {
  return dt == KVC_DTYPE_BF16 ? format::float_to_bf16(v) : format::float_to_half(v);
}
inline float from_bits(kvc_dtype dt, uint16_t h) {
  return dt == KVC_DTYPE_BF16 ? format::bf16_to_float(h) : format::half_to_float(h);
}

// A sequence's uncompressed rows as the store keeps them: its first `sinks` tokens (block 0's,
// which attention reads from here instead; none without a block), then the tokens past its
// `blocks` T-token blocks. xk, xv: the sequence's values [len, heads, dim]; dense_k, dense_v get
// their bits, and ref_k, ref_v ([head][token, dim], the blocks' reconstruction so far) the
// values attention should see.
inline void keep_uncompressed_rows(kvc_dtype dt, uint32_t heads, uint32_t dim, uint32_t T,
                                   uint32_t len, uint32_t blocks, uint32_t sinks,
                                   const std::vector<float>& xk, const std::vector<float>& xv,
                                   std::vector<uint16_t>& dense_k, std::vector<uint16_t>& dense_v,
                                   std::vector<std::vector<float>>& ref_k,
                                   std::vector<std::vector<float>>& ref_v) {
  auto keep = [&](uint32_t t) {
    for (uint32_t h = 0; h < heads; ++h) {
      for (uint32_t d = 0; d < dim; ++d) {
        const size_t i = (size_t(t) * heads + h) * dim + d;
        dense_k.push_back(to_bits(dt, xk[i]));
        dense_v.push_back(to_bits(dt, xv[i]));
        if (t < blocks * T) {  // a sink: replaces block 0's row
          ref_k[h][size_t(t) * dim + d] = xk[i];
          ref_v[h][size_t(t) * dim + d] = xv[i];
        } else {
          ref_k[h].push_back(xk[i]);
          ref_v[h].push_back(xv[i]);
        }
      }
    }
  };
  for (uint32_t t = 0; t < (blocks > 0 ? sinks : 0); ++t) keep(t);
  for (uint32_t t = blocks * T; t < len; ++t) keep(t);
}

// softmax(scale q.K^T) V in double for one query row; k, v: [len, dim] floats.
inline std::vector<double> reference(const float* q, const std::vector<float>& k,
                                     const std::vector<float>& v, uint32_t dim, float scale) {
  const size_t len = k.size() / dim;
  std::vector<double> w(len), out(dim, 0.0);
  double top = -INFINITY, sum = 0;
  for (size_t t = 0; t < len; ++t) {
    double dot = 0;
    for (uint32_t c = 0; c < dim; ++c) dot += double(q[c]) * k[t * dim + c];
    w[t] = double(scale) * dot;
    top = std::max(top, w[t]);
  }
  for (double& x : w) sum += (x = std::exp(x - top));
  for (size_t t = 0; t < len; ++t) {
    for (uint32_t c = 0; c < dim; ++c) out[c] += w[t] * v[t * dim + c];
  }
  for (double& o : out) o = len ? o / sum : 0.0;
  return out;
}

// ||out - ref|| / ||ref|| over one row; every element must have been written (no poison).
inline double row_error(const uint16_t* out, const std::vector<double>& ref, kvc_dtype dt) {
  double num = 0, den = 0;
  for (size_t c = 0; c < ref.size(); ++c) {
    if (out[c] == 0xFFFF) return INFINITY;  // poison survived
    const double d = from_bits(dt, out[c]) - ref[c];
    num += d * d;
    den += ref[c] * ref[c];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// The error a row must stay within: 1e-3 beyond what rounding the exact result to the output
// dtype costs (bf16's 8-bit mantissa alone gives about 1.5e-3).
inline double row_tolerance(const std::vector<double>& ref, kvc_dtype dt) {
  std::vector<uint16_t> rounded(ref.size());
  for (size_t c = 0; c < ref.size(); ++c) rounded[c] = to_bits(dt, float(ref[c]));
  return row_error(rounded.data(), ref, dt) + 1e-3;
}

}  // namespace kvc::test
