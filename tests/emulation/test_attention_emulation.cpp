// SPDX-License-Identifier: Apache-2.0
// The tensor-core attention kernels (kernels/attention/attention.cuh, tile_attention.cuh: the
// sources nvcc compiles) run on the CPU under the host emulation, with mma.sync and ldmatrix
// emulated per lane from the PTX ISA's fragment layouts, the magic-number conversions as the
// bit operations they are, and the combine kernel after them, as attention.cu launches them:
//   - the tile kernel over the CPU oracle's tile blocks (every width, raw tiles, blocks too
//     large to stage, tails), against softmax attention in double over the oracle's decode;
//   - the dense kernel over a dense cache, against the same reference.
// Small shapes: each emulated warp instruction is a rendezvous of 32 host threads.
#include "tests/emulation/device_emulation.hpp"  // first: the kernels compile against it
//
#include <gtest/gtest.h>

#include <random>

#include "kernels/attention/tile_attention.cuh"
#include "tile_attention_case.hpp"

namespace kvc::test {
namespace {

namespace k = kvc::kernels;

// The workspace and parameters attention.cu's params_for makes, for `splits` splits (each
// sequence's units shared among them).
struct Launch {
  k::AttentionParams params;
  std::vector<float> workspace;
};
Launch make_launch(const TileCase& c, uint32_t splits, uint32_t block_tokens, const void* queries) {
  const uint32_t parts = splits * k::kWarps;
  const size_t rows = size_t(c.batch) * c.kv_heads * c.group * parts;
  Launch l;
  l.workspace.assign(rows * (c.dim + 2), std::nanf(""));  // poisoned
  l.params = {c.kv_heads,       c.group, block_tokens,       parts,
              softmax_scale(c), queries, l.workspace.data(), l.workspace.data() + rows * c.dim};
  return l;
}

template <kvc_dtype DT>
std::vector<uint16_t> combine(const TileCase& c, const k::AttentionParams& P) {
  std::vector<uint16_t> out(size_t(c.batch) * c.kv_heads * c.group * c.dim, 0xFFFF);
  const auto r =
      emu::launch(k::attention_combine_kernel<DT>, emu::Dim3(c.kv_heads * c.group, c.batch),
                  emu::Dim3(c.dim), 0, P, c.dim, static_cast<void*>(out.data()));
  EXPECT_TRUE(r.errors.empty()) << r.errors.front();
  return out;
}

// Runs the tile kernel on a case against the reference; returns how many of the cache's units
// (a K and a V block of one head) fit one stage.
template <kvc_dtype DT, uint32_t D, uint32_t T>
size_t run_tiles(TileCase c, uint32_t splits, std::mt19937& rng,
                 uint32_t stage = k::TileAttentionTraits<D, T>::kLargestCodedUnit) {
  const TileCacheImage im = build_tile_cache(c, rng);
  size_t stageable = 0;
  for (const auto& table : im.tables) {
    for (size_t i = 0; i + 1 < table.size(); i += 2) {
      stageable += table[i].bytes + table[i + 1].bytes <= stage ? 1 : 0;
    }
  }
  std::vector<kernels::SequenceView> views(c.batch);
  for (uint32_t b = 0; b < c.batch; ++b) {
    views[b] = {im.tables[b].data(), c.lengths[b] / T,     im.sinks[b],
                c.lengths[b] % T,    im.dense_k[b].data(), im.dense_v[b].data()};
  }
  Launch l = make_launch(c, splits, T, im.q.data());
  using Tr = k::TileAttentionTraits<D, T>;
  const auto r = emu::launch(k::upper_rows(c.group) ? k::attention_tiles_kernel<DT, D, T, true>
                                                    : k::attention_tiles_kernel<DT, D, T, false>,
                             emu::Dim3(splits, c.kv_heads, c.batch), emu::Dim3(k::kWarps * 32),
                             Tr::smem_bytes(stage), l.params,
                             static_cast<const kernels::SequenceView*>(views.data()),
                             static_cast<const uint8_t*>(im.pool.data()), im.pool.size(), stage);
  EXPECT_TRUE(r.errors.empty()) << r.errors.front();
  const auto out = combine<DT>(c, l.params);
  EXPECT_TRUE(outputs_match(c, im, out, l.params.scale, tile_tolerance(c)));
  return stageable;
}

TEST(AttentionEmulation, TileKernelMatchesTheReference) {
  std::mt19937 rng(5);
  // fp16, D 64, 64-token blocks: 2-4 bit tiles, a tail, group 4, two splits.
  run_tiles<KVC_DTYPE_FP16, 64, 64>(
      {2, 1, 4, 64, 64, KVC_DTYPE_FP16, 0.25f, 0.07f, 1.0f, {200, 64}}, 2, rng);
  // bf16, D 64, 128-token blocks, group 16, wide and raw tiles (an outlier channel).
  run_tiles<KVC_DTYPE_BF16, 64, 128>(
      {1, 2, 16, 64, 128, KVC_DTYPE_BF16, 0.25f, 0.07f, 40.0f, {300}}, 1, rng);
  // fp16, D 128, blocks too large to stage (V bound below 8 bits: raw V tiles), group 1.
  run_tiles<KVC_DTYPE_FP16, 128, 128>(
      {1, 1, 1, 128, 128, KVC_DTYPE_FP16, 0.25f, 0.0005f, 400.0f, {130}}, 1, rng);
  // fp16, D 64, one split of 14 units: every warp stages the next unit while it computes one.
  run_tiles<KVC_DTYPE_FP16, 64, 64>(
      {1, 1, 2, 64, 64, KVC_DTYPE_FP16, 0.25f, 0.07f, 1.0f, {64 * 13 + 5}}, 1, rng);
  // fp16, D 64: coarse bounds (0-, 2- and 3-bit tiles), empty and 1-token sequences.
  run_tiles<KVC_DTYPE_FP16, 64, 64>(
      {3, 1, 3, 64, 64, KVC_DTYPE_FP16, 1.0f, 0.3f, 1.0f, {0, 1, 150}}, 1, rng);
  // Groups at the edges of the two variants (8: every row of the lower half; 12 and 16: the
  // upper half, partly and wholly), with warps that take several block units each, so that a
  // unit's query fold follows the last one's probability fold in the same fragments.
  for (const uint32_t group : {8u, 12u, 16u}) {
    run_tiles<KVC_DTYPE_FP16, 64, 64>(
        {1, 1, group, 64, 64, KVC_DTYPE_FP16, 0.25f, 0.07f, 1.0f, {64 * 9 + 5}}, 1, rng);
  }
  run_tiles<KVC_DTYPE_BF16, 128, 64>(
      {1, 2, 12, 128, 64, KVC_DTYPE_BF16, 0.25f, 0.07f, 1.0f, {64 * 9 + 5}, 3}, 1, rng);
  // The store's default K bound, relative to each channel's range (a step per channel), with an
  // outlier channel: sharp softmax, where bf16's rounding shows most.
  run_tiles<KVC_DTYPE_BF16, 128, 64>(
      {1, 2, 4, 128, 64, KVC_DTYPE_BF16, 0.05f, 0.05f, 40.0f, {64 * 6 + 9}, 0, KVC_BOUND_RELATIVE},
      1, rng);
  run_tiles<KVC_DTYPE_FP16, 128, 64>(
      {1, 2, 4, 128, 64, KVC_DTYPE_FP16, 0.05f, 0.05f, 10.0f, {64 * 6 + 9}, 0, KVC_BOUND_RELATIVE},
      1, rng);
}

// fp16 folds past fp16's range: products |q| x step (K) and p x step (V) of 65504 or more, which
// the kernel folds scaled by a power of two and scales back in fp32 (without: wrong or NaN
// outputs). One head of each group has the large query (the bound must take every row), a
// softmax scale keeps its scores of order 1 (a wrong scale-back shows), and each warp takes
// several units (a scaled unit must leave nothing behind for the next).
TEST(AttentionEmulation, TileKernelFoldsLargeQueryStepProductsInFp16) {
  std::mt19937 rng(11);
  for (const uint32_t group : {4u, 12u}) {
    // Queries up to about 8000, an absolute K bound of 8 (steps near 16).
    TileCase c{1, 2, group, 64, 64, KVC_DTYPE_FP16, 8.0f, 0.07f, 40.0f, {64 * 9 + 7}};
    c.query_scale = 2000.0f;
    c.softmax_scale = 1e-5f;
    run_tiles<KVC_DTYPE_FP16, 64, 64>(c, 1, rng);
  }
  // A step per channel (the store's default relative K bound): the outlier channel's steps.
  TileCase c{1, 2, 4, 64, 64, KVC_DTYPE_FP16, 0.05f, 0.07f, 400.0f, {64 * 9 + 7}};
  c.k_mode = KVC_BOUND_RELATIVE;
  c.query_scale = 2000.0f;
  c.softmax_scale = 1e-6f;
  run_tiles<KVC_DTYPE_FP16, 64, 64>(c, 1, rng);
}
// An inf in one head's query leaves the other heads of its group as they were (the fold's bound
// takes finite queries only; an inf bound would scale every head's products to zero).
TEST(AttentionEmulation, TileKernelIsolatesAnInfQueryHeadInFp16) {
  std::mt19937 rng(13);
  TileCase c{2, 1, 4, 64, 64, KVC_DTYPE_FP16, 0.25f, 0.07f, 1.0f, {64 * 5 + 7, 200}};
  c.inf_query = true;
  run_tiles<KVC_DTYPE_FP16, 64, 64>(c, 1, rng);
}
TEST(AttentionEmulation, TileKernelFoldsLargeValueStepsInFp16) {
  std::mt19937 rng(12);
  // Values near +-65000, a relative V bound of 0.4 (steps of 0.8 x the token's range).
  TileCase c{1, 2, 4, 64, 64, KVC_DTYPE_FP16, 0.25f, 0.4f, 1.0f, {64 * 9 + 7}};
  c.value_scale = 20000.0f;
  run_tiles<KVC_DTYPE_FP16, 64, 64>(c, 1, rng);
}

// Compact stages (10 KiB, two thread blocks per multiprocessor): units of narrow codes are
// staged, units past 10 KiB (V bound below 8 bits: raw V tiles) read where they lie.
TEST(AttentionEmulation, TileKernelWithCompactStages) {
  std::mt19937 rng(9);
  EXPECT_EQ((run_tiles<KVC_DTYPE_FP16, 128, 64>(
                {2, 1, 4, 128, 64, KVC_DTYPE_FP16, 0.25f, 0.07f, 1.0f, {64 * 6 + 9, 130}, 4}, 2,
                rng, k::kCompactStageBytes)),
            8u);  // every block: 6 + 2
  EXPECT_EQ((run_tiles<KVC_DTYPE_BF16, 128, 64>(
                {1, 1, 2, 128, 64, KVC_DTYPE_BF16, 0.25f, 0.0005f, 1.0f, {64 * 3 + 1}}, 1, rng,
                k::kCompactStageBytes)),
            0u);
}

// Attention sinks: block 0's first tokens masked and read from the uncompressed rows, which span
// two units where sinks and tail together pass T; before the first block there are none.
TEST(AttentionEmulation, TileKernelReadsSinksInsteadOfTheirBlockRows) {
  std::mt19937 rng(7);
  run_tiles<KVC_DTYPE_FP16, 64, 64>(
      {4, 1, 4, 64, 64, KVC_DTYPE_FP16, 0.25f, 0.07f, 1.0f, {30, 64, 127, 64 * 5 + 10}, 4}, 2, rng);
  run_tiles<KVC_DTYPE_BF16, 64, 128>(
      {1, 2, 16, 64, 128, KVC_DTYPE_BF16, 0.25f, 0.07f, 40.0f, {255}, 127}, 1, rng);
}

template <kvc_dtype DT, uint32_t D>
void run_dense(TileCase c, uint32_t splits, std::mt19937& rng) {
  const uint32_t H = c.kv_heads, Hq = H * c.group;
  const uint32_t max_len = *std::max_element(c.lengths.begin(), c.lengths.end());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t n = size_t(c.batch) * max_len * H * D;
  std::vector<uint16_t> kc(n), vc(n);
  for (auto& x : kc) x = to_bits(DT, normal(rng));
  for (auto& x : vc) x = to_bits(DT, normal(rng));
  TileCacheImage im;  // the reference's view of the same cache
  im.ref_k.assign(c.batch, std::vector<std::vector<float>>(H));
  im.ref_v.assign(c.batch, std::vector<std::vector<float>>(H));
  for (uint32_t b = 0; b < c.batch; ++b) {
    for (uint32_t t = 0; t < c.lengths[b]; ++t) {
      for (uint32_t h = 0; h < H; ++h) {
        for (uint32_t d = 0; d < D; ++d) {
          const size_t i = ((size_t(b) * max_len + t) * H + h) * D + d;
          im.ref_k[b][h].push_back(from_bits(DT, kc[i]));
          im.ref_v[b][h].push_back(from_bits(DT, vc[i]));
        }
      }
    }
  }
  im.q.resize(size_t(c.batch) * Hq * D);
  for (auto& x : im.q) x = to_bits(DT, normal(rng));
  constexpr uint32_t U = k::DenseMmaTraits<D>::kUnit;
  Launch l = make_launch(c, splits, U, im.q.data());
  const auto r = emu::launch(
      k::upper_rows(c.group) ? k::attention_dense_kernel<DT, D, true>
                             : k::attention_dense_kernel<DT, D, false>,
      emu::Dim3(splits, H, c.batch), emu::Dim3(k::kWarps * 32), k::DenseMmaTraits<D>::smem_bytes(),
      l.params, max_len, static_cast<const uint32_t*>(c.lengths.data()),
      static_cast<const void*>(kc.data()), static_cast<const void*>(vc.data()));
  ASSERT_TRUE(r.errors.empty()) << r.errors.front();
  EXPECT_TRUE(outputs_match(c, im, combine<DT>(c, l.params), l.params.scale,
                            DT == KVC_DTYPE_BF16 ? 4e-3 : 1e-3));
}

TEST(AttentionEmulation, DenseKernelMatchesTheReference) {
  std::mt19937 rng(6);
  run_dense<KVC_DTYPE_FP16, 64>({2, 2, 4, 64, 0, KVC_DTYPE_FP16, 0, 0, 0, {100, 33}}, 2, rng);
  run_dense<KVC_DTYPE_BF16, 128>({1, 1, 9, 128, 0, KVC_DTYPE_BF16, 0, 0, 0, {70}}, 2, rng);
  // One split of 13 units: every warp stages the next unit while it computes one.
  run_dense<KVC_DTYPE_FP16, 64>({1, 1, 2, 64, 0, KVC_DTYPE_FP16, 0, 0, 0, {64 * 13}}, 1, rng);
  // Groups at the edges of the two variants.
  for (const uint32_t group : {8u, 12u, 16u}) {
    run_dense<KVC_DTYPE_FP16, 64>({1, 1, group, 64, 0, KVC_DTYPE_FP16, 0, 0, 0, {64 * 9}}, 1, rng);
  }
}

}  // namespace
}  // namespace kvc::test
