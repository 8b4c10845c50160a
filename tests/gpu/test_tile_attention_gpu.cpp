// SPDX-License-Identifier: Apache-2.0
// The tensor-core tile attention kernel against a double-precision CPU reference over the same
// tile blocks (format t1) decoded by the CPU oracle: blocks placed in a pool as the store
// places them (16-byte aligned), fp16/bf16 tails, every width (0, 2, 3, 4, 6, 8 bits and raw
// tiles, blocks too large to stage), GQA groups 1..16, head_dim 64/128/256, 64- and 128-token
// blocks. Outputs are poisoned first and must all be written.
#include <cmath>
#include <random>

#include "core/error.hpp"
#include "cpu/tile_codec_cpu.hpp"
#include "gpu_test.hpp"
#include "kernels/attention/cuda_attention.hpp"
#include "test_support.hpp"

namespace kvc::test {
namespace {

struct TileCase {
  uint32_t batch, kv_heads, group, dim, tokens;
  kvc_dtype dtype;
  float k_bound, v_bound;  // K absolute, V relative
  float outlier;           // scale of K channel 5 (wide codes, raw tiles)
  std::vector<uint32_t> lengths;
};

uint16_t to_bits(kvc_dtype dt, float v) {
  return dt == KVC_DTYPE_BF16 ? format::float_to_bf16(v) : format::float_to_half(v);
}
float from_bits(kvc_dtype dt, uint16_t h) {
  return dt == KVC_DTYPE_BF16 ? format::bf16_to_float(h) : format::half_to_float(h);
}

// softmax(scale q.K^T) V in double for one query row; k, v: [len, dim].
std::vector<double> reference(const float* q, const std::vector<float>& k,
                              const std::vector<float>& v, uint32_t dim, float scale) {
  const size_t len = k.size() / dim;
  std::vector<double> w(len), out(dim, 0.0);
  double top = -INFINITY, sum = 0;
  for (size_t t = 0; t < len; ++t) {
    double dot = 0;
    for (uint32_t c = 0; c < dim; ++c) dot += double(q[c]) * k[t * dim + c];
    top = std::max(top, w[t] = double(scale) * dot);
  }
  for (double& x : w) sum += (x = std::exp(x - top));
  for (size_t t = 0; t < len; ++t) {
    for (uint32_t c = 0; c < dim; ++c) out[c] += w[t] * v[t * dim + c];
  }
  for (double& o : out) o = len ? o / sum : 0.0;
  return out;
}

class TileAttentionGpu : public GpuTest {};

TEST_F(TileAttentionGpu, MatchesTheCpuReferenceOverTheOraclesBlocks) {
  std::mt19937 rng(91);
  const std::vector<TileCase> cases = {
      {1, 2, 1, 128, 64, KVC_DTYPE_FP16, 0.25f, 0.07f, 1.0f, {1}},
      {3, 2, 4, 128, 64, KVC_DTYPE_FP16, 0.25f, 0.07f, 1.0f, {0, 63, 1000}},
      {4, 1, 16, 64, 128, KVC_DTYPE_BF16, 0.1f, 0.02f, 1.0f, {128, 129, 300, 777}},
      {2, 4, 8, 256, 64, KVC_DTYPE_FP16, 0.5f, 0.15f, 1.0f, {300, 2049}},
      {2, 2, 2, 128, 128, KVC_DTYPE_BF16, 0.25f, 0.07f, 40.0f, {640, 1000}},  // 8-bit, raw
      {1, 1, 4, 128, 128, KVC_DTYPE_FP16, 0.25f, 0.0005f, 400.0f, {512}},     // unstageable
      {8, 2, 3, 64, 64, KVC_DTYPE_FP16, 1.0f, 0.3f, 1.0f, {}},                // 2-3 bits, zeros
  };
  for (TileCase c : cases) {
    while (c.lengths.size() < c.batch) c.lengths.push_back(rng() % 1500);
    const uint32_t T = c.tokens, H = c.kv_heads, D = c.dim, Hq = H * c.group;
    kvc_codec_config kc = make_config(KVC_KIND_KEY, T, D, KVC_BOUND_ABSOLUTE, c.k_bound);
    kvc_codec_config vc = make_config(KVC_KIND_VALUE, T, D, KVC_BOUND_RELATIVE, c.v_bound);
    kc.block_format = vc.block_format = KVC_BLOCK_FORMAT_TILES;
    const CodecParams key = CodecParams::from_config(kc, true);
    const CodecParams value = CodecParams::from_config(vc, true);

    // Host image of the store: one pool (blocks 16-byte aligned), block tables, tails; and the
    // oracle's reconstruction of every token for the reference.
    std::vector<uint8_t> pool;
    std::vector<std::vector<cuda::BlockLocation>> tables(c.batch);
    std::vector<std::vector<uint16_t>> tails_k(c.batch), tails_v(c.batch);
    std::vector<std::vector<std::vector<float>>> ref_k(c.batch), ref_v(c.batch);  // [b][h]
    std::vector<uint8_t> scratch(key.max_block_bytes(c.dtype) + value.max_block_bytes(c.dtype));
    for (uint32_t b = 0; b < c.batch; ++b) {
      const uint32_t len = c.lengths[b], blocks = len / T;
      ref_k[b].assign(H, {});
      ref_v[b].assign(H, {});
      std::vector<float> xk = bench::synthetic_kv(false, std::max(len, 1u), H * D, 300 + b);
      std::vector<float> xv = bench::synthetic_kv(true, std::max(len, 1u), H * D, 400 + b);
      for (uint32_t t = 0; t < std::max(len, 1u); ++t) {
        for (uint32_t h = 0; h < H; ++h) xk[(size_t(t) * H + h) * D + 5] *= c.outlier;
      }
      const Block bk = make_block(c.dtype, std::max(len, 1u), H * D, H * D, xk);
      const Block bv = make_block(c.dtype, std::max(len, 1u), H * D, H * D, xv);
      for (uint32_t blk = 0; blk < blocks; ++blk) {
        for (uint32_t h = 0; h < H; ++h) {
          for (uint32_t kind = 0; kind < 2; ++kind) {
            const Block& src = kind ? bv : bk;
            const CodecParams& cp = kind ? value : key;
            const uint8_t* at = src.bytes.data() + (size_t(blk) * T * H * D + h * D) * 2;
            const uint32_t n = cpu::encode_tile_block(cp, at, H * D, c.dtype, scratch.data());
            ASSERT_EQ(n % 16, 0u);
            tables[b].push_back({0, uint32_t(pool.size()), n});
            std::vector<float> dec(size_t(T) * D);
            cpu::decode_tile_block(cp, scratch.data(), n, KVC_DTYPE_FP32, dec.data(), D);
            auto& ref = kind ? ref_v[b][h] : ref_k[b][h];
            ref.insert(ref.end(), dec.begin(), dec.end());
            pool.insert(pool.end(), scratch.begin(), scratch.begin() + n);
          }
        }
      }
      for (uint32_t t = blocks * T; t < len; ++t) {
        for (uint32_t h = 0; h < H; ++h) {
          for (uint32_t d = 0; d < D; ++d) {
            const size_t i = (size_t(t) * H + h) * D + d;
            tails_k[b].push_back(to_bits(c.dtype, bk.values[i]));
            tails_v[b].push_back(to_bits(c.dtype, bv.values[i]));
            ref_k[b][h].push_back(bk.values[i]);
            ref_v[b][h].push_back(bv.values[i]);
          }
        }
      }
    }
    pool.resize(std::max<size_t>(pool.size(), 16));

    DeviceBuffer d_pool(pool.size());
    d_pool.upload(pool.data(), pool.size());
    std::vector<std::unique_ptr<DeviceBuffer>> keep;
    std::vector<cuda::SequenceView> views(c.batch);
    uint32_t max_blocks = 0;
    for (uint32_t b = 0; b < c.batch; ++b) {
      auto upload = [&](const void* p, size_t n) {
        keep.push_back(std::make_unique<DeviceBuffer>(std::max<size_t>(n, 4)));
        if (n) keep.back()->upload(p, n);
        return keep.back()->get();
      };
      views[b].blocks = static_cast<const cuda::BlockLocation*>(
          upload(tables[b].data(), tables[b].size() * sizeof(cuda::BlockLocation)));
      views[b].num_blocks = c.lengths[b] / T;
      views[b].tail_tokens = c.lengths[b] % T;
      views[b].tail_keys = upload(tails_k[b].data(), tails_k[b].size() * 2);
      views[b].tail_values = upload(tails_v[b].data(), tails_v[b].size() * 2);
      max_blocks = std::max(max_blocks, views[b].num_blocks);
    }
    DeviceBuffer d_views(views.size() * sizeof(cuda::SequenceView));
    d_views.upload(views.data(), views.size() * sizeof(cuda::SequenceView));

    std::vector<uint16_t> q(size_t(c.batch) * Hq * D);
    std::vector<float> qf(q.size());
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (size_t i = 0; i < q.size(); ++i) {
      q[i] = to_bits(c.dtype, normal(rng));
      qf[i] = from_bits(c.dtype, q[i]);
    }
    DeviceBuffer d_q(q.size() * 2), d_out(q.size() * 2);
    d_q.upload(q.data(), q.size() * 2);
    KVC_CUDA_CHECK(cudaMemset(d_out.get(), 0xFF, d_out.bytes()));

    const float scale = 1.0f / std::sqrt(float(D));
    const cuda::AttentionShape shape{c.batch, H, c.group, D, c.dtype, scale};
    const cuda::AttentionPlan plan = cuda::plan_attention(shape, max_blocks);
    DeviceBuffer d_ws(plan.workspace_bytes);
    KVC_CUDA_CHECK(cudaMemset(d_ws.get(), 0x7F, d_ws.bytes()));  // poisoned workspace
    cuda::attention_tiles(shape, plan, T, d_pool.get<uint8_t>(), pool.size(),
                          d_views.get<cuda::SequenceView>(), d_q.get(), d_out.get(), d_ws.get(),
                          nullptr);
    KVC_CUDA_CHECK(cudaDeviceSynchronize());
    const auto out = d_out.download<uint16_t>(q.size());
    // The kernel rounds the step-scaled query and probabilities to the cache dtype (the MMA's
    // inputs): fp16 keeps 11 significant bits, bf16 8.
    const double tolerance = c.dtype == KVC_DTYPE_BF16 ? 1e-2 : 2e-3;
    for (uint32_t b = 0; b < c.batch; ++b) {
      for (uint32_t qh = 0; qh < Hq; ++qh) {
        const size_t row = (size_t(b) * Hq + qh) * D;
        const auto ref =
            reference(&qf[row], ref_k[b][qh / c.group], ref_v[b][qh / c.group], D, scale);
        double num = 0, den = 0;
        for (uint32_t d = 0; d < D; ++d) {
          ASSERT_NE(out[row + d], 0xFFFF) << "output not written: seq " << b << " head " << qh;
          const double e = from_bits(c.dtype, out[row + d]) - ref[d];
          num += e * e;
          den += ref[d] * ref[d];
        }
        ASSERT_LE(std::sqrt(num / std::max(den, 1e-30)), tolerance)
            << "B=" << c.batch << " H=" << H << " group=" << c.group << " D=" << D << " T=" << T
            << " dtype=" << c.dtype << " seq " << b << " (length " << c.lengths[b] << ") head "
            << qh;
      }
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
}

}  // namespace
}  // namespace kvc::test
