// SPDX-License-Identifier: Apache-2.0
// Shared by the unit tests: realistic synthetic KV blocks and element-wise bound checks.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <kvcomp/kvcomp.hpp>
#include <random>
#include <string>
#include <vector>

#include "bench/synthetic_kv.hpp"
#include "kernels/common/format.cuh"

namespace kvc::test {

// Whether the calling thread's last error message contains `what`.
inline bool last_error_names(const char* what) {
  return std::string(kvc_last_error()).find(what) != std::string::npos;
}

// A block in every input dtype: the fp32 values are exactly representable in `dtype`.
struct Block {
  kvc_dtype dtype;
  uint32_t tokens, dim;
  int64_t stride;              // elements between rows
  std::vector<float> values;   // [tokens, stride], the exact input values
  std::vector<uint8_t> bytes;  // the same, stored as dtype
  const void* data() const { return bytes.data(); }
};

inline float round_to(kvc_dtype dtype, float v) {
  namespace f = kvc::format;
  if (dtype == KVC_DTYPE_FP16) return f::half_to_float(f::float_to_half(v));
  if (dtype == KVC_DTYPE_BF16) return f::bf16_to_float(f::float_to_bf16(v));
  return v;
}

inline Block make_block(kvc_dtype dtype, uint32_t tokens, uint32_t dim, int64_t stride,
                        const std::vector<float>& dense /* [tokens, dim] */) {
  namespace f = kvc::format;
  Block b{dtype, tokens, dim, stride, std::vector<float>(size_t(tokens) * size_t(stride), 0.0f),
          {}};
  const size_t es = format::dtype_bytes(dtype);
  b.bytes.assign(b.values.size() * es, 0);
  for (uint32_t t = 0; t < tokens; ++t) {
    for (uint32_t c = 0; c < dim; ++c) {
      const size_t i = size_t(t) * size_t(stride) + c;
      const float v = round_to(dtype, dense[size_t(t) * dim + c]);
      b.values[i] = v;
      if (dtype == KVC_DTYPE_FP32) {
        std::memcpy(&b.bytes[i * 4], &v, 4);
      } else {
        const uint16_t h = dtype == KVC_DTYPE_FP16 ? f::float_to_half(v) : f::float_to_bf16(v);
        std::memcpy(&b.bytes[i * 2], &h, 2);
      }
    }
  }
  return b;
}

inline std::vector<float> uniform_kv(uint32_t tokens, uint32_t dim, float lo, float hi,
                                     uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> x(size_t(tokens) * dim);
  for (float& v : x) v = u(rng);
  return x;
}

// The bound each element must meet: the config's absolute bound, or rel * (max - min) of the
// element's group, computed as the format defines it (fp32).
inline std::vector<float> element_bounds(const kvc_codec_config& c, const Block& b) {
  std::vector<float> bound(size_t(b.tokens) * b.dim, c.error_bound);
  if (c.bound_mode != KVC_BOUND_RELATIVE) return bound;
  const bool is_value = c.kind == KVC_KIND_VALUE;
  const uint32_t group =
      is_value ? (c.value_group_size ? uint32_t(c.value_group_size) : b.dim) : b.tokens;
  const uint32_t groups = b.tokens * b.dim / group;
  for (uint32_t g = 0; g < groups; ++g) {
    float lo = INFINITY, hi = -INFINITY;
    for (uint32_t e = 0; e < group; ++e) {
      const auto xy = kvc::format::element_coord(is_value, b.dim, group, g, e);
      const float v = b.values[size_t(xy.token) * size_t(b.stride) + xy.channel];
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    for (uint32_t e = 0; e < group; ++e) {
      const auto xy = kvc::format::element_coord(is_value, b.dim, group, g, e);
      bound[size_t(xy.token) * b.dim + xy.channel] = c.error_bound * (hi - lo);
    }
  }
  return bound;
}

// Half an ulp of the output type at v: the only slack conversion to that type may add.
inline double output_half_ulp(kvc_dtype dtype, float v) {
  if (dtype == KVC_DTYPE_FP32 || v == 0.0f) return 0.0;
  const int mantissa = dtype == KVC_DTYPE_FP16 ? 10 : 7;
  const int min_exp = dtype == KVC_DTYPE_FP16 ? -14 : -126;
  int e = 0;
  std::frexp(v, &e);  // v = m * 2^e, m in [0.5, 1)
  return std::ldexp(1.0, std::max(e - 1, min_exp) - mantissa - 1);
}

inline kvc_codec_config make_config(kvc_kind kind, uint32_t tokens, uint32_t dim,
                                    kvc_bound_mode mode, float bound,
                                    kvc_entropy entropy = KVC_ENTROPY_AUTO,
                                    int32_t value_group = 0) {
  kvc_codec_config c = KVC_CODEC_CONFIG_INIT;
  c.kind = kind;
  c.num_tokens = int32_t(tokens);
  c.head_dim = int32_t(dim);
  c.bound_mode = mode;
  c.error_bound = bound;
  c.entropy = entropy;
  c.value_group_size = value_group;
  return c;
}

// A codebook trained on a few blocks of the same distribution, as a prefill would.
inline kvcomp::Codebook train(const kvc_codec_config& c, kvc_dtype dtype, uint32_t seed,
                              int blocks = 4) {
  kvc_codec_config plain = c;
  plain.entropy = KVC_ENTROPY_AUTO;  // histograms need no codebook
  kvcomp::Codec codec(plain);
  kvcomp::Histogram histogram;
  for (int i = 0; i < blocks; ++i) {
    const auto x = bench::synthetic_kv(c.kind == KVC_KIND_VALUE, uint32_t(c.num_tokens),
                                       uint32_t(c.head_dim), seed + 1000u * uint32_t(i));
    const Block b = make_block(dtype, uint32_t(c.num_tokens), uint32_t(c.head_dim), c.head_dim, x);
    codec.add_to_histogram(b.data(), dtype, b.stride, histogram);
  }
  return kvcomp::Codebook::build(histogram);
}

}  // namespace kvc::test
