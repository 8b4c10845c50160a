// SPDX-License-Identifier: Apache-2.0
// The CUDA tile codec (format t1) against the CPU reference: byte-identical blocks from the
// device encoder, equal decoded elements and verdicts from the device decoder (damaged blocks in
// allocations of exactly their size, so compute-sanitizer sees any stray read), non-finite
// input marked per block, graph capture and replay, large blocks through the shared-memory
// opt-in, and the calls a tile codec refuses.
#include <algorithm>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>

#include "codec_graph_case.hpp"
#include "gpu_test.hpp"
#include "test_support.hpp"

namespace kvc::test {
namespace {

kvc_codec_config tiles_config(kvc_kind kind, uint32_t tokens, uint32_t dim, bool relative,
                              float bound, bool permute, bool split) {
  kvc_codec_config c =
      make_config(kind, tokens, dim, relative ? KVC_BOUND_RELATIVE : KVC_BOUND_ABSOLUTE, bound);
  c.block_format = KVC_BLOCK_FORMAT_TILES;
  c.tile_permute_channels = permute ? 1 : 0;
  c.tile_split_widths = split ? 1 : 0;
  return c;
}

kvc_codec_config on_gpu(kvc_codec_config c) {
  c.backend = KVC_BACKEND_CUDA;
  return c;
}

// num_heads blocks of one [tokens, heads * dim] tensor; some channels (K) or tokens (V) scaled
// up so that tiles differ in width and the permutation has work.
struct Batch {
  kvc_dtype dtype;
  uint32_t heads, tokens, dim;
  Block tensor;
  const void* host_head(uint32_t h) const {
    return tensor.bytes.data() + size_t(h) * dim * format::dtype_bytes(dtype);
  }
};

Batch make_batch(const kvc_codec_config& c, kvc_dtype dtype, uint32_t heads, uint32_t seed,
                 bool outliers) {
  const uint32_t t = uint32_t(c.num_tokens), d = uint32_t(c.head_dim);
  const bool is_value = c.kind == KVC_KIND_VALUE;
  std::vector<float> x = bench::synthetic_kv(is_value, t, heads * d, seed);
  if (outliers) {
    std::mt19937 rng(seed);
    for (uint32_t h = 0; h < heads; ++h) {
      for (int o = 0; o < 3; ++o) {
        const float scale = float(4 << (rng() % 5));
        const uint32_t which = rng() % (is_value ? t : d);
        for (uint32_t i = 0; i < (is_value ? d : t); ++i) {
          const size_t row = is_value ? which : i, col = h * d + (is_value ? i : which);
          x[row * heads * d + col] *= scale;
        }
      }
    }
  }
  return {dtype, heads, t, d, make_block(dtype, t, heads * d, int64_t(heads) * d, x)};
}

class TileCodecGpu : public GpuTest {
 protected:
  void SetUp() override {
    GpuTest::SetUp();
    if (IsSkipped()) return;
    ASSERT_EQ(cudaStreamCreate(&stream_), cudaSuccess);
  }
  void TearDown() override {
    if (stream_) cudaStreamDestroy(stream_);
  }

  // Encodes the batch on the GPU (on stream_, non-default) into poisoned worst-case slots;
  // returns each slot whole (so bytes past the block are compared too) and the sizes.
  std::vector<std::vector<uint8_t>> gpu_encode(const kvcomp::Codec& codec, const Batch& b,
                                               std::vector<uint32_t>& sizes) {
    const size_t cap = codec.max_block_bytes(b.dtype), es = format::dtype_bytes(b.dtype);
    DeviceBuffer d_tensor(b.tensor.bytes.size()), d_out(cap * b.heads);
    DeviceBuffer d_sizes(4 * b.heads), d_src(8 * b.heads), d_dst(8 * b.heads);
    d_tensor.upload(b.tensor.bytes.data(), b.tensor.bytes.size());
    const auto src = strided_pointers(d_tensor.get(), b.heads, b.dim * es);
    const auto dst = strided_pointers(d_out.get(), b.heads, cap);
    d_src.upload(src.data(), 8 * b.heads);
    d_dst.upload(dst.data(), 8 * b.heads);
    EXPECT_EQ(cudaMemset(d_out.get(), 0xEE, d_out.bytes()), cudaSuccess);
    EXPECT_EQ(
        kvc_codec_encode(codec.get(), int32_t(b.heads), d_src.get<const void*>(), b.tensor.stride,
                         b.dtype, d_dst.get<void*>(), cap, d_sizes.get<uint32_t>(), stream_),
        KVC_SUCCESS)
        << kvc_last_error();
    EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    sizes = d_sizes.download<uint32_t>(b.heads);
    const auto all = d_out.download<uint8_t>(cap * b.heads);
    std::vector<std::vector<uint8_t>> slots;
    for (uint32_t h = 0; h < b.heads; ++h) {
      slots.emplace_back(all.begin() + long(h * cap), all.begin() + long((h + 1) * cap));
    }
    return slots;
  }

  // Decodes blocks, each in a device allocation of exactly `avail` bytes, into poisoned
  // [tokens, dim] outputs.
  std::vector<std::vector<uint8_t>> gpu_decode(const kvcomp::Codec& codec,
                                               const std::vector<std::vector<uint8_t>>& blocks,
                                               const std::vector<uint32_t>& avail, kvc_dtype out,
                                               uint32_t tokens, uint32_t dim,
                                               std::vector<kvc_status_t>& status) {
    const size_t n = blocks.size(), bytes = size_t(tokens) * dim * format::dtype_bytes(out);
    DeviceBuffer d_out(n * bytes), d_avail(4 * n), d_status(4 * n), d_src(8 * n), d_dst(8 * n);
    std::vector<std::unique_ptr<DeviceBuffer>> inputs;
    std::vector<void*> src(n);
    for (size_t i = 0; i < n; ++i) {
      inputs.push_back(std::make_unique<DeviceBuffer>(std::max<size_t>(avail[i], 1)));
      src[i] = inputs.back()->get();
      const size_t copy = std::min<size_t>(avail[i], blocks[i].size());
      if (copy) inputs.back()->upload(blocks[i].data(), copy);
    }
    const auto dst = strided_pointers(d_out.get(), n, bytes);
    d_src.upload(src.data(), 8 * n);
    d_dst.upload(dst.data(), 8 * n);
    d_avail.upload(avail.data(), 4 * n);
    EXPECT_EQ(cudaMemset(d_out.get(), 0xFF, d_out.bytes()), cudaSuccess);
    EXPECT_EQ(kvc_codec_decode(codec.get(), int32_t(n), d_src.get<const void*>(),
                               d_avail.get<uint32_t>(), out, d_dst.get<void*>(), int64_t(dim),
                               d_status.get<kvc_status_t>(), stream_),
              KVC_SUCCESS)
        << kvc_last_error();
    EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    status = d_status.download<kvc_status_t>(n);
    const auto flat = d_out.download<uint8_t>(n * bytes);
    std::vector<std::vector<uint8_t>> outs;
    for (size_t i = 0; i < n; ++i) {
      outs.emplace_back(flat.begin() + long(i * bytes), flat.begin() + long((i + 1) * bytes));
    }
    return outs;
  }

  cudaStream_t stream_ = nullptr;
};

// CPU decode of one block into poisoned [tokens, dim] bytes, with its status.
std::vector<uint8_t> cpu_decode(const kvcomp::Codec& codec, const std::vector<uint8_t>& block,
                                uint32_t avail, kvc_dtype out, uint32_t tokens, uint32_t dim,
                                kvc_status_t& status) {
  std::vector<uint8_t> dst(size_t(tokens) * dim * format::dtype_bytes(out), 0xFF);
  const void* src = block.data();
  void* d = dst.data();
  status = kvc_codec_decode(codec.get(), 1, &src, &avail, out, &d, dim, nullptr, nullptr);
  return dst;
}

TEST_F(TileCodecGpu, EncodeIsByteIdenticalAndDecodeEqualsTheCpu) {
  uint32_t seed = 500;
  int compared = 0;
  for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
    for (uint32_t tokens : {16u, 64u, 128u}) {
      for (uint32_t dim : {16u, 64u, 128u, 256u}) {
        for (kvc_dtype dtype : {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32}) {
          ++seed;
          const bool relative = seed % 2;
          const float bounds[] = {0.03f, 0.002f, 0.25f, 0.08f};
          const kvc_codec_config c = tiles_config(kind, tokens, dim, relative, bounds[seed / 2 % 4],
                                                  seed / 3 % 2 == 0, seed / 5 % 3 != 2);
          const kvcomp::Codec cpu(c), gpu(on_gpu(c));
          const Batch batch = make_batch(c, dtype, 6, seed, seed % 4 < 2);
          std::vector<uint32_t> sizes;
          const auto slots = gpu_encode(gpu, batch, sizes);
          std::ostringstream where;
          where << "kind " << kind << " T " << tokens << " D " << dim << " dtype " << dtype
                << " seed " << seed;
          std::vector<std::vector<uint8_t>> blocks;
          for (uint32_t h = 0; h < batch.heads; ++h) {
            std::vector<uint8_t> want(slots[h].size(), 0xEE);
            const size_t n = cpu.encode(batch.host_head(h), dtype, batch.tensor.stride, want);
            ASSERT_EQ(sizes[h], n) << where.str() << " head " << h;
            ASSERT_EQ(slots[h], want) << where.str() << " head " << h;
            blocks.emplace_back(want.begin(), want.begin() + long(n));
          }
          for (kvc_dtype out : {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32}) {
            std::vector<kvc_status_t> status;
            const auto outs = gpu_decode(gpu, blocks, sizes, out, tokens, dim, status);
            for (uint32_t h = 0; h < batch.heads; ++h) {
              kvc_status_t s;
              const auto want = cpu_decode(cpu, blocks[h], sizes[h], out, tokens, dim, s);
              ASSERT_EQ(s, KVC_SUCCESS);
              ASSERT_EQ(status[h], KVC_SUCCESS) << where.str();
              ASSERT_EQ(outs[h], want) << where.str() << " out " << out << " head " << h;
            }
          }
          ++compared;
        }
      }
    }
  }
  EXPECT_EQ(compared, 72);
}

TEST_F(TileCodecGpu, DamagedBlocksGetTheCpuVerdicts) {
  const kvc_codec_config c = tiles_config(KVC_KIND_KEY, 64, 128, true, 0.05f, true, true);
  const kvcomp::Codec cpu(c), gpu(on_gpu(c));
  const Batch batch = make_batch(c, KVC_DTYPE_FP16, 4, 9, true);
  std::vector<std::vector<uint8_t>> good;
  for (uint32_t h = 0; h < batch.heads; ++h) {
    good.push_back(cpu.encode(batch.host_head(h), KVC_DTYPE_FP16, batch.tensor.stride));
  }
  std::mt19937 rng(11);
  std::vector<std::vector<uint8_t>> bad;
  std::vector<uint32_t> avail;
  for (int i = 0; i < 200; ++i) {
    std::vector<uint8_t> b = good[size_t(i) % good.size()];
    uint32_t n = uint32_t(b.size());
    if (i % 5 == 0) {
      n = uint32_t(rng() % b.size());
    } else {
      for (int f = 0; f < 1 + i % 3; ++f) {
        const size_t at = rng() % 2 ? rng() % std::min<size_t>(512, b.size()) : rng() % b.size();
        b[at] ^= uint8_t(1u << (rng() % 8));
      }
    }
    bad.push_back(b);
    avail.push_back(n);
  }
  std::vector<kvc_status_t> status;
  const auto outs = gpu_decode(gpu, bad, avail, KVC_DTYPE_FP32, 64, 128, status);
  int rejected = 0;
  for (size_t i = 0; i < bad.size(); ++i) {
    kvc_status_t s;
    const auto want = cpu_decode(cpu, bad[i], avail[i], KVC_DTYPE_FP32, 64, 128, s);
    ASSERT_EQ(status[i], s) << "copy " << i;
    if (s == KVC_SUCCESS) ASSERT_EQ(outs[i], want) << "copy " << i;
    rejected += s != KVC_SUCCESS;
  }
  EXPECT_GE(rejected, 40);
}

TEST_F(TileCodecGpu, NonFiniteBlocksGetSizeZero) {
  const kvc_codec_config c = tiles_config(KVC_KIND_VALUE, 32, 64, false, 0.03f, true, true);
  const kvcomp::Codec cpu(c), gpu(on_gpu(c));
  Batch batch = make_batch(c, KVC_DTYPE_BF16, 3, 4, false);
  const uint16_t inf = 0x7F80;  // bf16 +inf, in head 1
  std::memcpy(batch.tensor.bytes.data() + (5 * 3 * 64 + 64 + 9) * 2, &inf, 2);
  std::vector<uint32_t> sizes;
  const auto slots = gpu_encode(gpu, batch, sizes);
  EXPECT_EQ(sizes[1], 0u);
  EXPECT_EQ(slots[1], std::vector<uint8_t>(slots[1].size(), 0xEE));  // nothing written
  for (uint32_t h : {0u, 2u}) {
    const auto want = cpu.encode(batch.host_head(h), KVC_DTYPE_BF16, batch.tensor.stride);
    ASSERT_EQ(sizes[h], want.size());
    EXPECT_TRUE(std::equal(want.begin(), want.end(), slots[h].begin()));
  }
}

// 256 x 128 needs 133 KiB of shared memory (the opt-in, raised inside the capture); 1024 x 256
// cannot fit and is refused at creation.
TEST_F(TileCodecGpu, EncodeAndDecodeReplayFromACapturedGraph) {
  for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
    const uint32_t tokens = 256, dim = 128, heads = 4;
    const kvc_codec_config c = tiles_config(kind, tokens, dim, true, 0.05f, true, true);
    const kvcomp::Codec cpu(c), gpu(on_gpu(c));
    const Batch batch = make_batch(c, KVC_DTYPE_FP16, heads, 32, true);
    ASSERT_NO_FATAL_FAILURE(expect_graph_replays_match_the_cpu(
        stream_, cpu, gpu, batch.tensor, heads, tokens, dim, "kind " + std::to_string(kind)));
  }
  const kvc_codec_config huge = tiles_config(KVC_KIND_KEY, 1024, 256, false, 0.03f, true, true);
  const kvc_codec_config g = on_gpu(huge);
  kvc_codec_t codec = nullptr;
  EXPECT_EQ(kvc_codec_create(&g, nullptr, &codec), KVC_ERROR_NOT_SUPPORTED);
  EXPECT_TRUE(last_error_names("shared memory"));
  kvc_codec_destroy(codec);
}

TEST_F(TileCodecGpu, HistogramIsRefused) {
  const kvc_codec_config c = tiles_config(KVC_KIND_KEY, 16, 64, false, 0.03f, true, true);
  const kvcomp::Codec gpu(on_gpu(c));
  kvc_histogram_t histogram = nullptr;
  ASSERT_EQ(kvc_histogram_create(&histogram), KVC_SUCCESS);
  DeviceBuffer d(16 * 64 * 2), ptrs(8);
  const void* p = d.get();
  ptrs.upload(&p, 8);
  EXPECT_EQ(kvc_codec_histogram(gpu.get(), 1, ptrs.get<const void*>(), 64, KVC_DTYPE_FP16,
                                histogram, stream_),
            KVC_ERROR_NOT_SUPPORTED);
  kvc_histogram_destroy(histogram);
}

}  // namespace
}  // namespace kvc::test
