// SPDX-License-Identifier: Apache-2.0
// GPU decode attention against a double-precision CPU reference: the compressed kernel over
// blocks laid out as the store keeps them (pool pages, block tables, tails), and the dense
// baseline kernel. Every output element is poisoned first and must be written.
#include <cmath>
#include <random>

#include "attention_reference.hpp"
#include "compressed_attention_case.hpp"
#include "cuda/cuda_attention.hpp"
#include "gpu_test.hpp"
#include "test_support.hpp"

namespace kvc::test {
namespace {

struct Case {
  uint32_t batch, kv_heads, group, dim;
  kvc_dtype dtype;
  std::vector<uint32_t> lengths;
  uint32_t sinks = 0;  // sink_tokens
};

class AttentionGpu : public GpuTest {};

TEST_F(AttentionGpu, CompressedKernelMatchesTheCpuReference) {
  std::mt19937 rng(77);
  const std::vector<Case> cases = {
      {1, 2, 1, 128, KVC_DTYPE_FP16, {1}},
      {3, 2, 4, 128, KVC_DTYPE_FP16, {0, 63, 1000}},
      {4, 1, 16, 64, KVC_DTYPE_BF16, {64, 65, 129, 777}},
      {2, 4, 8, 256, KVC_DTYPE_FP16, {300, 2049}},
      {17, 2, 2, 128, KVC_DTYPE_BF16, {}},
      {1, 2, 4, 128, KVC_DTYPE_FP16, {131072}},
      {64, 1, 4, 128, KVC_DTYPE_FP16, {}},
      {4, 2, 4, 128, KVC_DTYPE_FP16, {20, 64, 127, 1000}, 4},  // sinks
      {2, 1, 8, 64, KVC_DTYPE_BF16, {127, 500}, 63},           // sinks + tail: two units
  };
  for (Case c : cases) {
    while (c.lengths.size() < c.batch) c.lengths.push_back(rng() % 1500);
    const uint32_t T = 64, H = c.kv_heads, D = c.dim, Hq = H * c.group;
    kvc_codec_config kc = make_config(KVC_KIND_KEY, T, D, KVC_BOUND_RELATIVE, 0.05f);
    kvc_codec_config vc = make_config(KVC_KIND_VALUE, T, D, KVC_BOUND_RELATIVE, 0.05f);
    const CodecParams key = CodecParams::from_config(kc, true);
    const CodecParams value = CodecParams::from_config(vc, true);
    const kvcomp::Codebook kbook = train(kc, c.dtype, 5), vbook = train(vc, c.dtype, 6);
    const Codebook* books[2] = {nullptr, nullptr};
    // The wrapper's handles own the internal codebooks: rebuild them internally from bytes.
    const auto kb = kbook.serialize(), vb = vbook.serialize();
    const Codebook key_book = Codebook::parse(kb.data(), kb.size());
    const Codebook value_book = Codebook::parse(vb.data(), vb.size());
    books[0] = &key_book;
    books[1] = &value_book;

    // Host image of the store: one pool, per-sequence block tables, sinks and tails; and the
    // fp32 reconstruction of every token for the reference.
    auto [pool, tables, dense_k, dense_v, ref_k, ref_v] =
        build_compressed_cache(c.dtype, H, D, T, c.lengths, key, value, books, c.sinks);
    pool.resize(std::max<size_t>(pool.size(), 4));

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
      views[b].sink_tokens = views[b].num_blocks > 0 ? c.sinks : 0;
      views[b].tail_tokens = c.lengths[b] % T;
      views[b].dense_keys = upload(dense_k[b].data(), dense_k[b].size() * 2);
      views[b].dense_values = upload(dense_v[b].data(), dense_v[b].size() * 2);
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
    const cuda::AttentionPlan plan =
        cuda::plan_attention(shape, kernels::max_attention_units(max_blocks, c.sinks));
    DeviceBuffer d_ws(plan.workspace_bytes);
    KVC_CUDA_CHECK(cudaMemset(d_ws.get(), 0x7F, d_ws.bytes()));  // poisoned workspace
    const auto device_books = cuda::upload_codebooks(&key_book, &value_book);
    cuda::attention_compressed(shape, plan, key, value, *device_books, d_pool.get<uint8_t>(),
                               pool.size(), d_views.get<cuda::SequenceView>(), d_q.get(),
                               d_out.get(), d_ws.get(), nullptr);
    KVC_CUDA_CHECK(cudaDeviceSynchronize());
    const auto out = d_out.download<uint16_t>(q.size());
    for (uint32_t b = 0; b < c.batch; ++b) {
      for (uint32_t qh = 0; qh < Hq; ++qh) {
        const size_t row = (size_t(b) * Hq + qh) * D;
        const auto ref =
            reference(&qf[row], ref_k[b][qh / c.group], ref_v[b][qh / c.group], D, scale);
        ASSERT_LE(row_error(&out[row], ref, c.dtype), row_tolerance(ref, c.dtype))
            << "B=" << c.batch << " H=" << H << " group=" << c.group << " D=" << D
            << " dtype=" << c.dtype << " seq " << b << " (length " << c.lengths[b] << ") head "
            << qh;
      }
    }
  }
}

TEST_F(AttentionGpu, DenseBaselineMatchesTheCpuReference) {
  std::mt19937 rng(78);
  for (const Case& c : std::vector<Case>{{5, 2, 4, 128, KVC_DTYPE_FP16, {0, 1, 64, 100, 4097}},
                                         {2, 8, 1, 64, KVC_DTYPE_BF16, {333, 1024}},
                                         {1, 1, 16, 256, KVC_DTYPE_FP16, {2000}}}) {
    const uint32_t H = c.kv_heads, D = c.dim, Hq = H * c.group;
    const uint32_t max_len = *std::max_element(c.lengths.begin(), c.lengths.end());
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const size_t n = size_t(c.batch) * max_len * H * D;
    std::vector<uint16_t> k(n), v(n), q(size_t(c.batch) * Hq * D);
    for (auto& x : k) x = to_bits(c.dtype, normal(rng));
    for (auto& x : v) x = to_bits(c.dtype, normal(rng));
    for (auto& x : q) x = to_bits(c.dtype, normal(rng));
    DeviceBuffer d_k(n * 2 + 16), d_v(n * 2 + 16), d_q(q.size() * 2), d_out(q.size() * 2),
        d_len(4 * c.batch);
    d_k.upload(k.data(), n * 2);
    d_v.upload(v.data(), n * 2);
    d_q.upload(q.data(), q.size() * 2);
    d_len.upload(c.lengths.data(), 4 * c.batch);
    KVC_CUDA_CHECK(cudaMemset(d_out.get(), 0xFF, d_out.bytes()));
    const float scale = 0.125f;
    const cuda::AttentionShape shape{c.batch, H, c.group, D, c.dtype, scale};
    const cuda::AttentionPlan plan = cuda::plan_dense_attention(shape, max_len);
    DeviceBuffer d_ws(plan.workspace_bytes);
    cuda::attention_dense(shape, plan, max_len, d_len.get<uint32_t>(), d_k.get(), d_v.get(),
                          d_q.get(), d_out.get(), d_ws.get(), nullptr);
    KVC_CUDA_CHECK(cudaDeviceSynchronize());
    const auto out = d_out.download<uint16_t>(q.size());
    for (uint32_t b = 0; b < c.batch; ++b) {
      for (uint32_t qh = 0; qh < Hq; ++qh) {
        const uint32_t h = qh / c.group, len = c.lengths[b];
        std::vector<float> kf(size_t(len) * D), vf(size_t(len) * D), qf(D);
        for (uint32_t t = 0; t < len; ++t) {
          for (uint32_t d = 0; d < D; ++d) {
            const size_t i = ((size_t(b) * max_len + t) * H + h) * D + d;
            kf[size_t(t) * D + d] = from_bits(c.dtype, k[i]);
            vf[size_t(t) * D + d] = from_bits(c.dtype, v[i]);
          }
        }
        for (uint32_t d = 0; d < D; ++d)
          qf[d] = from_bits(c.dtype, q[(size_t(b) * Hq + qh) * D + d]);
        const auto ref = reference(qf.data(), kf, vf, D, scale);
        // The tensor-core kernel also rounds the probabilities to the cache dtype (P is an MMA
        // input): bf16 keeps 8 significant bits.
        ASSERT_LE(row_error(&out[(size_t(b) * Hq + qh) * D], ref, c.dtype),
                  row_tolerance(ref, c.dtype) + (c.dtype == KVC_DTYPE_BF16 ? 3e-3 : 0.0))
            << "dense B=" << c.batch << " seq " << b << " head " << qh;
      }
    }
  }
}

}  // namespace
}  // namespace kvc::test
