// SPDX-License-Identifier: Apache-2.0
// The decode-attention kernels over compressed blocks (kernels/attention/attention.cuh), run on
// the CPU under the host emulation as src/cuda/attention.cu launches them (a split
// schedule, the per-warp partial softmax, the combine), against a double-precision reference on
// the decoded blocks: blocks laid out as the store keeps them (one pool, block tables, tails).
// Every output element is poisoned first and must be written.
#include "tests/emulation/emulated_codec.hpp"
//
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "attention_reference.hpp"
#include "compressed_attention_case.hpp"
#include "kernels/attention/attention.cuh"
#include "test_support.hpp"

namespace kvc::test {
namespace {

struct Case {
  uint32_t batch, kv_heads, group, dim, tokens;
  kvc_dtype dtype;
  std::vector<uint32_t> lengths;
  uint32_t sms;        // the multiprocessor count the split schedule is made for
  uint32_t sinks = 0;  // sink_tokens
};

// attention.cu's make_plan and params_for, for `sms` multiprocessors.
struct Plan {
  uint32_t splits;
  size_t workspace_floats;
};
Plan make_plan(uint32_t batch, uint32_t kv_heads, uint32_t group, uint32_t dim, uint32_t units,
               uint32_t sms) {
  const uint64_t want = uint64_t(sms) * 4, per_split_grid = uint64_t(kv_heads) * batch;
  uint32_t splits = uint32_t(
      std::clamp<uint64_t>((want + per_split_grid - 1) / per_split_grid, 1, std::max(1u, units)));
  const uint32_t per = std::max(1u, (units + splits - 1) / splits);
  splits = std::max(1u, (units + per - 1) / per);
  const uint64_t rows = uint64_t(batch) * kv_heads * group * splits * kernels::kWarps;
  return {splits, size_t(rows * (dim + 2))};
}

template <kvc_dtype DT, uint32_t D, uint32_t G>
emu::LaunchResult emulated_attention(const Case& c, const Plan& plan, const CodecParams& key,
                                     const CodecParams& value, const kernels::BookView& kbook,
                                     const kernels::BookView& vbook, const uint8_t* pool,
                                     const kernels::SequenceView* views, const uint16_t* queries,
                                     std::vector<float>& workspace, uint16_t* out) {
  const uint32_t T = c.tokens, parts = plan.splits * kernels::kWarps;
  const size_t rows = size_t(c.batch) * c.kv_heads * c.group * parts;
  const kernels::AttentionParams P{c.kv_heads,
                                   c.group,
                                   T,
                                   parts,
                                   1.0f / std::sqrt(float(D)),
                                   queries,
                                   workspace.data(),
                                   workspace.data() + rows * D};
  const uint32_t max_groups = std::max(key.num_groups, value.num_groups);
  const size_t per_warp = kernels::WarpState<G>::floats(T, D) + 2 * max_groups;
  const size_t smem = (D * G + kernels::kWarps * per_warp) * sizeof(float);
  emu::LaunchResult r =
      emu::launch(kernels::attention_compressed_kernel<DT, D, G>,
                  emu::Dim3(plan.splits, c.kv_heads, c.batch), kernels::kWarps * kernels::kLanes,
                  smem, P, views, pool, size_t(0), kbook, vbook, value.group_size, max_groups);
  if (!r.ok()) return r;
  return emu::launch(kernels::attention_combine_kernel<DT>,
                     emu::Dim3(c.kv_heads * c.group, c.batch), D, 0, P, D, static_cast<void*>(out));
}

void run_case(const Case& c) {
  const uint32_t T = c.tokens, H = c.kv_heads, D = c.dim, Hq = H * c.group;
  const kvc_codec_config kc = make_config(KVC_KIND_KEY, T, D, KVC_BOUND_RELATIVE, 0.05f);
  const kvc_codec_config vc = make_config(KVC_KIND_VALUE, T, D, KVC_BOUND_RELATIVE, 0.05f);
  const CodecParams key = CodecParams::from_config(kc, true);
  const CodecParams value = CodecParams::from_config(vc, true);
  const auto parse = [](const kvcomp::Codebook& b) {
    const auto bytes = b.serialize();
    return Codebook::parse(bytes.data(), bytes.size());
  };
  const Codebook key_book = parse(train(kc, c.dtype, 5)), value_book = parse(train(vc, c.dtype, 6));
  const Codebook* books[2] = {&key_book, &value_book};

  auto [pool, tables, dense_k, dense_v, ref_k, ref_v] =
      build_compressed_cache(c.dtype, H, D, T, c.lengths, key, value, books, c.sinks);
  std::vector<kernels::SequenceView> views(c.batch);
  uint32_t max_blocks = 0;
  for (uint32_t b = 0; b < c.batch; ++b) {
    const uint32_t blocks = c.lengths[b] / T;
    views[b] = {tables[b].data(),  blocks,           blocks > 0 ? c.sinks : 0u, c.lengths[b] % T,
                dense_k[b].data(), dense_v[b].data()};
    max_blocks = std::max(max_blocks, views[b].num_blocks);
  }
  std::vector<uint16_t> q(size_t(c.batch) * Hq * D), out(q.size(), 0xFFFF);
  std::vector<float> qf(q.size());
  std::mt19937 rng(c.batch * 31 + D);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t i = 0; i < q.size(); ++i) {
    q[i] = to_bits(c.dtype, normal(rng));
    qf[i] = from_bits(c.dtype, q[i]);
  }
  const Plan plan =
      make_plan(c.batch, H, c.group, D, kernels::max_attention_units(max_blocks, c.sinks), c.sms);
  std::vector<float> workspace(plan.workspace_floats, 1e30f);  // poisoned
  const EmulatedBook kdev(&key_book), vdev(&value_book);
  emu::LaunchResult r;
  const auto run = [&](auto dt, auto d, auto g) {
    r = emulated_attention<decltype(dt)::value, decltype(d)::value, decltype(g)::value>(
        c, plan, key, value, kdev.view(), vdev.view(), pool.data(), views.data(), q.data(),
        workspace, out.data());
  };
  const auto with_dim = [&](auto dt) {
    using D64 = std::integral_constant<uint32_t, 64>;
    using D128 = std::integral_constant<uint32_t, 128>;
    using G4 = std::integral_constant<uint32_t, 4>;
    using G16 = std::integral_constant<uint32_t, 16>;
    if (D == 64) {
      c.group <= 4 ? run(dt, D64{}, G4{}) : run(dt, D64{}, G16{});
    } else {
      c.group <= 4 ? run(dt, D128{}, G4{}) : run(dt, D128{}, G16{});
    }
  };
  ASSERT_TRUE(D == 64 || D == 128);
  if (c.dtype == KVC_DTYPE_FP16) {
    with_dim(std::integral_constant<kvc_dtype, KVC_DTYPE_FP16>{});
  } else {
    with_dim(std::integral_constant<kvc_dtype, KVC_DTYPE_BF16>{});
  }
  ASSERT_TRUE(r.ok()) << r.message();
  for (uint32_t b = 0; b < c.batch; ++b) {
    for (uint32_t qh = 0; qh < Hq; ++qh) {
      const size_t row = (size_t(b) * Hq + qh) * D;
      const auto ref = reference(&qf[row], ref_k[b][qh / c.group], ref_v[b][qh / c.group], D,
                                 1.0f / std::sqrt(float(D)));
      ASSERT_LE(row_error(&out[row], ref, c.dtype), row_tolerance(ref, c.dtype))
          << "B=" << c.batch << " H=" << H << " group=" << c.group << " T=" << T
          << " dtype=" << c.dtype << " sinks=" << c.sinks << " seq " << b << " (length "
          << c.lengths[b] << ") head " << qh;
    }
  }
}

// Small shapes: empty sequences, tails only, whole blocks only, several splits and warps.
TEST(AttentionEmulation, CompressedKernelMatchesTheCpuReference) {
  run_case({1, 1, 1, 64, 32, KVC_DTYPE_FP16, {1}, 1});
  run_case({3, 2, 4, 64, 32, KVC_DTYPE_FP16, {0, 64, 101}, 2});
  run_case({2, 1, 6, 64, 64, KVC_DTYPE_BF16, {129, 40}, 1});
  run_case({4, 1, 16, 64, 32, KVC_DTYPE_FP16, {31, 32, 33, 300}, 3});
  run_case({2, 2, 8, 128, 64, KVC_DTYPE_BF16, {200, 64}, 4});
}

// Attention sinks: block 0's first tokens read from the uncompressed rows, which then span two
// units where sinks and tail together pass T (lengths 32k + 31); before the first block the
// sinks are still tail rows.
TEST(AttentionEmulation, CompressedKernelReadsSinksInsteadOfTheirBlockRows) {
  run_case({4, 1, 4, 64, 32, KVC_DTYPE_FP16, {20, 32, 63, 95}, 2, 4});
  run_case({2, 2, 16, 64, 64, KVC_DTYPE_BF16, {127, 300}, 1, 63});
}

}  // namespace
}  // namespace kvc::test
