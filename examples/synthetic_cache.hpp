// SPDX-License-Identifier: Apache-2.0
// One layer's synthetic K or V cache with the statistics that matter to the codec, as floats
// [tokens, heads, dim]: shared by codec_demo and the CPU benchmark, so they report on the same
// data. Standard C++ only (no kvcomp header), as an example must build against the install.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace synthetic {

// Seeded and portable: std::mt19937's output is fixed by the standard, its distributions are not.
struct Random {
  std::mt19937 engine;
  float uniform() { return float(engine() >> 8) * (1.0f / 16777216.0f); }  // [0, 1)
  float normal() {                                                         // Box-Muller
    const float u = 1.0f - uniform(), v = uniform();
    return std::sqrt(-2.0f * std::log(u)) * std::cos(6.2831853f * v);
  }
};

inline std::vector<float> make_cache(bool is_value, uint32_t seed, int tokens, int heads, int dim) {
  Random rng{std::mt19937(seed)};
  const size_t stride = size_t(heads) * dim;
  std::vector<float> x(size_t(tokens) * stride);
  if (!is_value) {
    // Keys: per-channel offsets and spreads; 4 fixed outlier channels per head with a large
    // offset and spread (as keys have, before and after RoPE).
    std::vector<float> offset(stride), spread(stride);
    for (size_t i = 0; i < stride; ++i) {
      const bool outlier = (i % size_t(dim)) % 32 == 5;
      offset[i] = outlier ? (rng.uniform() < 0.5f ? -1.0f : 1.0f) * (4.0f + 4.0f * rng.uniform())
                          : 0.5f * rng.normal();
      spread[i] = outlier ? 2.0f + 2.0f * rng.uniform() : 0.3f + 1.2f * rng.uniform();
    }
    for (size_t i = 0; i < x.size(); ++i)
      x[i] = offset[i % stride] + spread[i % stride] * rng.normal();
  } else {
    // Values: per-token scales spread log-normally (some tokens 5x louder than others), small
    // per-channel biases.
    std::vector<float> bias(stride);
    for (float& b : bias) b = 0.05f * rng.normal();
    for (size_t row = 0; row < size_t(tokens) * heads; ++row) {
      const float scale = 0.3f * std::exp(0.6f * rng.normal());
      for (int c = 0; c < dim; ++c) {
        const size_t i = row * dim + c;
        x[i] = bias[i % stride] + scale * rng.normal();
      }
    }
  }
  return x;
}

}  // namespace synthetic
