// SPDX-License-Identifier: Apache-2.0
// A decode-attention problem over tile blocks (format t1), built on the host as the store keeps
// it: one pool of 16-byte aligned K/V blocks encoded by the CPU oracle, a block table and the
// fp16/bf16 sinks and tail per sequence, queries; and the check of the kernel's output against
// softmax attention in double over the oracle's reconstruction. Shared by the GPU test and the
// kernel emulation test, which run the same kernel on the same bytes.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "attention_reference.hpp"
#include "cpu/tile_codec_cpu.hpp"
#include "cuda/cuda_attention.hpp"
#include "test_support.hpp"

namespace kvc::test {

struct TileCase {
  uint32_t batch, kv_heads, group, dim, tokens;
  kvc_dtype dtype;
  float k_bound, v_bound;  // K in k_mode, V relative
  float outlier;           // scale of K channel 5 (wide codes, raw tiles)
  std::vector<uint32_t> lengths;
  uint32_t sinks = 0;  // sink_tokens: block 0's first rows also kept uncompressed
  kvc_bound_mode k_mode = KVC_BOUND_ABSOLUTE;  // the store's default is relative
  float query_scale = 1.0f;    // the last query head of each group: normal times this
  float value_scale = 1.0f;    // values times this (clamped to +-65000, finite in fp16)
  float softmax_scale = 0.0f;  // 0: 1 / sqrt(dim)
  bool inf_query = false;      // the first query head of each sequence holds an inf
};

inline float softmax_scale(const TileCase& c) {
  return c.softmax_scale > 0.0f ? c.softmax_scale : 1.0f / std::sqrt(float(c.dim));
}

struct TileCacheImage {
  std::vector<uint8_t> pool;
  std::vector<std::vector<kernels::BlockLocation>> tables;    // [b][block, head, K|V]
  std::vector<std::vector<uint16_t>> dense_k, dense_v;        // [b][sinks + tail, head, dim]
  std::vector<uint32_t> sinks;                                // [b]: sink rows held
  std::vector<std::vector<std::vector<float>>> ref_k, ref_v;  // [b][head][token, dim]
  std::vector<uint16_t> q;                                    // [b, q_heads, dim]
  uint32_t max_blocks = 0;
};

// Fills c.lengths up to c.batch with random lengths below 1500, then builds the image.
inline TileCacheImage build_tile_cache(TileCase& c, std::mt19937& rng) {
  while (c.lengths.size() < c.batch) c.lengths.push_back(rng() % 1500);
  const uint32_t T = c.tokens, H = c.kv_heads, D = c.dim;
  kvc_codec_config kc = make_config(KVC_KIND_KEY, T, D, c.k_mode, c.k_bound);
  kvc_codec_config vc = make_config(KVC_KIND_VALUE, T, D, KVC_BOUND_RELATIVE, c.v_bound);
  kc.block_format = vc.block_format = KVC_BLOCK_FORMAT_TILES;
  const CodecParams key = CodecParams::from_config(kc, true);
  const CodecParams value = CodecParams::from_config(vc, true);

  TileCacheImage im;
  im.tables.resize(c.batch);
  im.dense_k.resize(c.batch);
  im.dense_v.resize(c.batch);
  im.sinks.resize(c.batch);
  im.ref_k.assign(c.batch, std::vector<std::vector<float>>(H));
  im.ref_v.assign(c.batch, std::vector<std::vector<float>>(H));
  std::vector<uint8_t> scratch(key.max_block_bytes(c.dtype) + value.max_block_bytes(c.dtype));
  for (uint32_t b = 0; b < c.batch; ++b) {
    const uint32_t len = c.lengths[b], rows = std::max(len, 1u), blocks = len / T;
    std::vector<float> xk = bench::synthetic_kv(false, rows, H * D, 300 + b);
    std::vector<float> xv = bench::synthetic_kv(true, rows, H * D, 400 + b);
    for (uint32_t t = 0; t < rows; ++t) {
      for (uint32_t h = 0; h < H; ++h) xk[(size_t(t) * H + h) * D + 5] *= c.outlier;
    }
    for (float& x : xv) x = std::clamp(x * c.value_scale, -65000.0f, 65000.0f);
    const Block bk = make_block(c.dtype, rows, H * D, H * D, xk);
    const Block bv = make_block(c.dtype, rows, H * D, H * D, xv);
    for (uint32_t blk = 0; blk < blocks; ++blk) {
      for (uint32_t h = 0; h < H; ++h) {
        for (uint32_t kind = 0; kind < 2; ++kind) {
          const Block& src = kind ? bv : bk;
          const CodecParams& cp = kind ? value : key;
          const uint8_t* at = src.bytes.data() + (size_t(blk) * T * H * D + h * D) * 2;
          const uint32_t n = cpu::encode_tile_block(cp, at, H * D, c.dtype, scratch.data());
          EXPECT_EQ(n % 16, 0u);
          im.tables[b].push_back({0, uint32_t(im.pool.size()), n});
          std::vector<float> dec(size_t(T) * D);
          cpu::decode_tile_block(cp, scratch.data(), n, KVC_DTYPE_FP32, dec.data(), D);
          auto& ref = kind ? im.ref_v[b][h] : im.ref_k[b][h];
          ref.insert(ref.end(), dec.begin(), dec.end());
          im.pool.insert(im.pool.end(), scratch.begin(), scratch.begin() + n);
        }
      }
    }
    im.sinks[b] = blocks > 0 ? c.sinks : 0;
    keep_uncompressed_rows(c.dtype, H, D, T, len, blocks, c.sinks, bk.values, bv.values,
                           im.dense_k[b], im.dense_v[b], im.ref_k[b], im.ref_v[b]);
    im.max_blocks = std::max(im.max_blocks, blocks);
  }
  im.pool.resize(std::max<size_t>(im.pool.size(), 16));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  im.q.resize(size_t(c.batch) * H * c.group * D);
  for (size_t i = 0; i < im.q.size(); ++i) {
    const bool last_of_group = i / D % c.group == c.group - 1;
    im.q[i] = to_bits(c.dtype, normal(rng) * (last_of_group ? c.query_scale : 1.0f));
  }
  for (uint32_t b = 0; c.inf_query && b < c.batch; ++b) {
    im.q[size_t(b) * H * c.group * D + 3] = to_bits(c.dtype, INFINITY);
  }
  return im;
}

// softmax attention over the cache rounded to `dtype` (what a dense cache of that dtype holds).
inline std::vector<double> rounded_reference(kvc_dtype dtype, const float* q, std::vector<float> k,
                                             std::vector<float> v, uint32_t dim, float scale) {
  for (auto* rows : {&k, &v}) {
    for (float& x : *rows) x = from_bits(dtype, to_bits(dtype, x));
  }
  return reference(q, k, v, dim, scale);
}

// Every output row [b, q_head, dim] written (the caller poisons with 0xFFFF) and, in relative L2
// norm, within `tolerance` of the reference or within 3x the error of the same attention over
// the cache rounded to the dtype, whichever is larger: where softmax is sharp (large scores,
// as outlier channels give) rounding the folds' products to the dtype moves the output about
// as rounding the cache itself would.
inline ::testing::AssertionResult outputs_match(const TileCase& c, const TileCacheImage& im,
                                                const std::vector<uint16_t>& out, float scale,
                                                double tolerance) {
  const uint32_t D = c.dim, Hq = c.kv_heads * c.group;
  for (uint32_t b = 0; b < c.batch; ++b) {
    for (uint32_t qh = 0; qh < Hq; ++qh) {
      const size_t row = (size_t(b) * Hq + qh) * D;
      std::vector<float> q(D);
      for (uint32_t d = 0; d < D; ++d) q[d] = from_bits(c.dtype, im.q[row + d]);
      if (!std::all_of(q.begin(), q.end(), [](float x) { return std::isfinite(x); })) {
        continue;  // no reference for a query that is not finite; the other heads must match
      }
      const auto& k = im.ref_k[b][qh / c.group];
      const auto& v = im.ref_v[b][qh / c.group];
      const auto ref = reference(q.data(), k, v, D, scale);
      const auto rounded = rounded_reference(c.dtype, q.data(), k, v, D, scale);
      double num = 0, rounding = 0, den = 0;
      for (uint32_t d = 0; d < D; ++d) {
        if (out[row + d] == 0xFFFF) {
          return ::testing::AssertionFailure() << "output not written: seq " << b << " head " << qh;
        }
        const double e = from_bits(c.dtype, out[row + d]) - ref[d];
        num += e * e;
        rounding += (rounded[d] - ref[d]) * (rounded[d] - ref[d]);
        den += ref[d] * ref[d];
      }
      const double err = std::sqrt(num / std::max(den, 1e-30));
      const double allowed = std::max(tolerance, 3 * std::sqrt(rounding / std::max(den, 1e-30)));
      if (!(err <= allowed)) {
        return ::testing::AssertionFailure()
               << "relative error " << err << " > " << allowed << ": B=" << c.batch
               << " H=" << c.kv_heads << " group=" << c.group << " D=" << D << " T=" << c.tokens
               << " dtype=" << c.dtype << " K bound mode=" << c.k_mode << " sinks=" << c.sinks
               << " seq " << b << " (length " << c.lengths[b] << ") head " << qh;
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// The kernel rounds the step-scaled query and the probabilities to the cache dtype (the MMA's
// inputs): fp16 keeps 11 significant bits, bf16 8. With a K bound relative to each channel's
// range, the steps of outlier and ordinary channels differ by their ranges, and in bf16 the
// rounded products q * step moved the output by up to 1.9% (the GPU test's relative case over
// 14 query seeds, in the emulation; 0.14% from rounding the keys alone in the worst row).
inline double tile_tolerance(const TileCase& c) {
  if (c.dtype != KVC_DTYPE_BF16) return 2e-3;
  return c.k_mode == KVC_BOUND_RELATIVE ? 3e-2 : 1e-2;
}

}  // namespace kvc::test
