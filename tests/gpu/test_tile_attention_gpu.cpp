// SPDX-License-Identifier: Apache-2.0
// The tensor-core tile attention kernel against a double-precision CPU reference over the same
// tile blocks (format t1) decoded by the CPU oracle: blocks placed in a pool as the store
// places them (16-byte aligned), fp16/bf16 sinks and tails, every width (0, 2, 3, 4, 6, 8 bits and
// raw tiles, blocks too large to stage), GQA groups 1..16, head_dim 64/128/256, 64- and 128-token
// blocks; wide and compact stages; fp16 folds past fp16's range. Outputs are poisoned first and
// must all be written.
#include "core/error.hpp"
#include "gpu_test.hpp"
#include "tile_attention_case.hpp"

namespace kvc::test {
namespace {

class TileAttentionGpu : public GpuTest {};

TEST_F(TileAttentionGpu, MatchesTheCpuReferenceOverTheOraclesBlocks) {
  std::mt19937 rng(91);
  std::vector<TileCase> cases = {
      {1, 2, 1, 128, 64, KVC_DTYPE_FP16, 0.25f, 0.07f, 1.0f, {1}},
      {3, 2, 4, 128, 64, KVC_DTYPE_FP16, 0.25f, 0.07f, 1.0f, {0, 63, 1000}},
      {4, 1, 16, 64, 128, KVC_DTYPE_BF16, 0.1f, 0.02f, 1.0f, {128, 129, 300, 777}},
      {2, 4, 8, 256, 64, KVC_DTYPE_FP16, 0.5f, 0.15f, 1.0f, {300, 2049}},
      {2, 2, 2, 128, 128, KVC_DTYPE_BF16, 0.25f, 0.07f, 40.0f, {640, 1000}},  // 8-bit, raw
      {1, 1, 4, 128, 128, KVC_DTYPE_FP16, 0.25f, 0.0005f, 400.0f, {512}},     // unstageable
      {8, 2, 3, 64, 64, KVC_DTYPE_FP16, 1.0f, 0.3f, 1.0f, {}},                // 2-3 bits, zeros
      {4, 2, 4, 128, 128, KVC_DTYPE_FP16, 0.3f, 0.072f, 1.0f, {20, 128, 255, 1000}, 4},  // sinks
      {2, 1, 8, 128, 64, KVC_DTYPE_BF16, 0.25f, 0.07f, 1.0f, {127, 640}, 63},  // two units
      // The store's default K bound (a step per channel), outlier channels: sharp softmax.
      {2, 2, 4, 128, 64, KVC_DTYPE_BF16, 0.05f, 0.05f, 40.0f, {300, 1000}, 0, KVC_BOUND_RELATIVE},
      {2, 2, 4, 128, 128, KVC_DTYPE_FP16, 0.05f, 0.05f, 10.0f, {300, 1000}, 4, KVC_BOUND_RELATIVE},
  };
  // fp16 folds past fp16's range (|q| x step, p x step of 65504 or more), scaled back.
  TileCase large_q{2,     2,     4,      128,         64, KVC_DTYPE_FP16,
                   0.05f, 0.07f, 400.0f, {300, 1000}, 0,  KVC_BOUND_RELATIVE};
  large_q.query_scale = 2000.0f;
  large_q.softmax_scale = 1e-6f;
  TileCase large_v{2, 2, 4, 128, 64, KVC_DTYPE_FP16, 0.25f, 0.4f, 1.0f, {300, 1000}};
  large_v.value_scale = 20000.0f;
  cases.push_back(large_q);
  cases.push_back(large_v);
  for (TileCase c : cases) {
    const TileCacheImage im = build_tile_cache(c, rng);
    DeviceBuffer d_pool(im.pool.size());
    d_pool.upload(im.pool.data(), im.pool.size());
    std::vector<std::unique_ptr<DeviceBuffer>> keep;
    auto upload = [&](const void* p, size_t n) {
      keep.push_back(std::make_unique<DeviceBuffer>(std::max<size_t>(n, 4)));
      if (n) keep.back()->upload(p, n);
      return keep.back()->get();
    };
    std::vector<cuda::SequenceView> views(c.batch);
    for (uint32_t b = 0; b < c.batch; ++b) {
      views[b].blocks = static_cast<const cuda::BlockLocation*>(
          upload(im.tables[b].data(), im.tables[b].size() * sizeof(cuda::BlockLocation)));
      views[b].num_blocks = c.lengths[b] / c.tokens;
      views[b].sink_tokens = im.sinks[b];
      views[b].tail_tokens = c.lengths[b] % c.tokens;
      views[b].dense_keys = upload(im.dense_k[b].data(), im.dense_k[b].size() * 2);
      views[b].dense_values = upload(im.dense_v[b].data(), im.dense_v[b].size() * 2);
    }
    DeviceBuffer d_views(views.size() * sizeof(cuda::SequenceView));
    d_views.upload(views.data(), views.size() * sizeof(cuda::SequenceView));
    DeviceBuffer d_q(im.q.size() * 2), d_out(im.q.size() * 2);
    d_q.upload(im.q.data(), im.q.size() * 2);

    const float scale = softmax_scale(c);
    const cuda::AttentionShape shape{c.batch, c.kv_heads, c.group, c.dim, c.dtype, scale};
    const cuda::AttentionPlan plan =
        cuda::plan_attention(shape, kernels::max_attention_units(im.max_blocks, c.sinks));
    DeviceBuffer d_ws(plan.workspace_bytes);
    // Compact stages where they exist (64-token blocks at head_dim 128), wide ones everywhere.
    std::vector<cuda::TileStaging> stagings = {cuda::TileStaging::kWide};
    if (c.tokens == 64 && c.dim == 128) stagings.push_back(cuda::TileStaging::kCompact);
    for (cuda::TileStaging staging : stagings) {
      KVC_CUDA_CHECK(cudaMemset(d_out.get(), 0xFF, d_out.bytes()));
      KVC_CUDA_CHECK(cudaMemset(d_ws.get(), 0x7F, d_ws.bytes()));  // poisoned workspace
      cuda::attention_tiles(shape, plan, c.tokens, d_pool.get<uint8_t>(), im.pool.size(),
                            d_views.get<cuda::SequenceView>(), d_q.get(), d_out.get(), d_ws.get(),
                            nullptr, staging);
      KVC_CUDA_CHECK(cudaDeviceSynchronize());
      EXPECT_TRUE(
          outputs_match(c, im, d_out.download<uint16_t>(im.q.size()), scale, tile_tolerance(c)))
          << (staging == cuda::TileStaging::kCompact ? "compact" : "wide") << " stages";
    }
  }
}

// Shapes the kernel does not cover are refused before any launch.
TEST_F(TileAttentionGpu, UnsupportedShapesAreRefused) {
  const cuda::AttentionShape shape{1, 1, 4, 256, KVC_DTYPE_FP16, 0.0625f};
  const cuda::AttentionPlan plan = cuda::plan_attention(shape, 1);
  try {
    cuda::attention_tiles(shape, plan, 128, nullptr, 0, nullptr, nullptr, nullptr, nullptr,
                          nullptr);
    FAIL() << "head_dim 256 with 128-token blocks was accepted";
  } catch (const kvc::Error& e) {
    EXPECT_EQ(e.status(), KVC_ERROR_NOT_SUPPORTED);
  }
  const cuda::AttentionShape d64{1, 1, 4, 64, KVC_DTYPE_FP16, 0.125f};
  try {
    cuda::attention_tiles(d64, cuda::plan_attention(d64, 1), 64, nullptr, 0, nullptr, nullptr,
                          nullptr, nullptr, nullptr, cuda::TileStaging::kCompact);
    FAIL() << "compact stages at head_dim 64 were accepted";
  } catch (const kvc::Error& e) {
    EXPECT_EQ(e.status(), KVC_ERROR_NOT_SUPPORTED);
  }
}

}  // namespace
}  // namespace kvc::test
