// SPDX-License-Identifier: Apache-2.0
// Synthetic KV blocks with the statistics that matter to the codec, shared by the tests and the
// benchmarks. Keys: per-channel offsets and scales, with about one channel in sixteen an order
// of magnitude larger (the fixed outlier channels of real K caches). Values: per-token scales
// spread log-normally around zero-mean channels. Real data lives in tests/data.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/common/format.cuh"

namespace kvc::bench {

// One block [tokens, dim] of floats.
inline std::vector<float> synthetic_kv(bool is_value, uint32_t tokens, uint32_t dim,
                                       uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(size_t(tokens) * dim);
  if (!is_value) {
    std::vector<float> mean(dim), scale(dim);
    for (uint32_t c = 0; c < dim; ++c) {
      const bool outlier = rng() % 16 == 0;
      mean[c] = normal(rng) * (outlier ? 8.0f : 0.5f);
      scale[c] = std::exp(0.5f * normal(rng)) * (outlier ? 4.0f : 0.7f);
    }
    for (uint32_t t = 0; t < tokens; ++t) {
      for (uint32_t c = 0; c < dim; ++c) x[size_t(t) * dim + c] = mean[c] + scale[c] * normal(rng);
    }
  } else {
    for (uint32_t t = 0; t < tokens; ++t) {
      const float scale = std::exp(0.8f * normal(rng)) * 0.3f;
      for (uint32_t c = 0; c < dim; ++c) x[size_t(t) * dim + c] = scale * normal(rng);
    }
  }
  return x;
}

// `blocks` independent blocks [blocks, tokens, dim] as fp16 bits.
inline std::vector<uint16_t> synthetic_fp16_blocks(bool is_value, size_t blocks, uint32_t tokens,
                                                   uint32_t dim, uint32_t seed) {
  std::vector<uint16_t> out;
  out.reserve(blocks * tokens * dim);
  for (size_t b = 0; b < blocks; ++b) {
    for (float v : synthetic_kv(is_value, tokens, dim, seed + uint32_t(b))) {
      out.push_back(format::float_to_half(v));
    }
  }
  return out;
}

// Largest |x - y| over the range of the element's quantization group (K: channel over the
// block's tokens; V: the token's channels), for fp16 blocks laid out as above.
inline double worst_relative_error(bool is_value, const std::vector<uint16_t>& x,
                                   const std::vector<uint16_t>& y, size_t blocks, uint32_t tokens,
                                   uint32_t dim) {
  double worst = 0;
  const uint32_t groups = is_value ? tokens : dim, size = is_value ? dim : tokens;
  for (size_t b = 0; b < blocks; ++b) {
    const size_t base = b * tokens * dim;
    for (uint32_t g = 0; g < groups; ++g) {
      auto at = [&](uint32_t e) {
        return base + (is_value ? size_t(g) * dim + e : size_t(e) * dim + g);
      };
      float lo = INFINITY, hi = -INFINITY;
      for (uint32_t e = 0; e < size; ++e) {
        const float v = format::half_to_float(x[at(e)]);
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
      for (uint32_t e = 0; e < size; ++e) {
        const double err = std::fabs(double(format::half_to_float(x[at(e)])) -
                                     double(format::half_to_float(y[at(e)])));
        worst = std::max(worst, hi > lo ? err / (hi - lo) : err);
      }
    }
  }
  return worst;
}

}  // namespace kvc::bench
