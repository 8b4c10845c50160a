// SPDX-License-Identifier: Apache-2.0
// The CUDA codec against the CPU reference: byte-identical blocks, equal decoded elements,
// equal verdicts on corrupt blocks, graph capture and replay, and the device histogram.
#include <algorithm>
#include <random>
#include <sstream>

#include "codec_graph_case.hpp"
#include "gpu_test.hpp"
#include "test_support.hpp"

namespace kvc::test {
namespace {

kvc_codec_config on_gpu(kvc_codec_config c) {
  c.backend = KVC_BACKEND_CUDA;
  return c;
}

// num_heads blocks of one [tokens, num_heads, dim] tensor, as an engine's cache holds them.
struct Batch {
  kvc_codec_config config;
  kvc_dtype dtype;
  uint32_t heads;
  Block tensor;  // [tokens, heads * dim]
  size_t elem_bytes() const { return format::dtype_bytes(dtype); }
  const void* head(uint32_t h) const {
    return tensor.bytes.data() + size_t(h) * uint32_t(config.head_dim) * elem_bytes();
  }
};

Batch make_batch(const kvc_codec_config& c, kvc_dtype dtype, uint32_t heads, uint32_t seed) {
  const uint32_t t = uint32_t(c.num_tokens), d = uint32_t(c.head_dim);
  const auto x = bench::synthetic_kv(c.kind == KVC_KIND_VALUE, t, heads * d, seed);
  return {c, dtype, heads, make_block(dtype, t, heads * d, int64_t(heads) * d, x)};
}

// Everything the GPU produced for a batch, downloaded.
struct GpuResult {
  std::vector<uint32_t> sizes;
  std::vector<std::vector<uint8_t>> blocks;
};

class CodecGpu : public GpuTest {
 protected:
  void SetUp() override {
    GpuTest::SetUp();
    if (IsSkipped()) return;
    ASSERT_EQ(cudaStreamCreate(&stream_), cudaSuccess);
  }
  void TearDown() override {
    if (stream_) cudaStreamDestroy(stream_);
  }

  // Encodes the batch on the GPU (on stream_, non-default) and downloads the blocks.
  GpuResult gpu_encode(const kvcomp::Codec& codec, const Batch& b) {
    const size_t cap = codec.max_block_bytes(b.dtype);
    DeviceBuffer d_tensor(b.tensor.bytes.size()), d_out(cap * b.heads);
    DeviceBuffer d_sizes(4 * b.heads), d_src_ptrs(8 * b.heads), d_dst_ptrs(8 * b.heads);
    d_tensor.upload(b.tensor.bytes.data(), b.tensor.bytes.size());
    std::vector<void*> src =
        strided_pointers(d_tensor.get(), b.heads, uint32_t(b.config.head_dim) * b.elem_bytes());
    std::vector<void*> dst = strided_pointers(d_out.get(), b.heads, cap);
    d_src_ptrs.upload(src.data(), 8 * b.heads);
    d_dst_ptrs.upload(dst.data(), 8 * b.heads);
    EXPECT_EQ(cudaMemset(d_out.get(), 0xEE, d_out.bytes()), cudaSuccess);
    EXPECT_EQ(kvc_codec_encode(codec.get(), int32_t(b.heads), d_src_ptrs.get<const void*>(),
                               b.tensor.stride, b.dtype, d_dst_ptrs.get<void*>(), cap,
                               d_sizes.get<uint32_t>(), stream_),
              KVC_SUCCESS)
        << kvc_last_error();
    EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    GpuResult r;
    r.sizes = d_sizes.download<uint32_t>(b.heads);
    const auto all = d_out.download<uint8_t>(cap * b.heads);
    for (uint32_t h = 0; h < b.heads; ++h) {
      r.blocks.emplace_back(all.begin() + long(h * cap),
                            all.begin() + long(h * cap + std::min<size_t>(r.sizes[h], cap)));
    }
    return r;
  }

  // Decodes blocks on the GPU into poisoned [tokens, dim] outputs; returns bytes and statuses.
  std::vector<std::vector<uint8_t>> gpu_decode(const kvcomp::Codec& codec,
                                               const std::vector<std::vector<uint8_t>>& blocks,
                                               const std::vector<uint32_t>& avail, kvc_dtype out,
                                               uint32_t tokens, uint32_t dim,
                                               std::vector<kvc_status_t>& status) {
    const size_t n = blocks.size(), es = format::dtype_bytes(out);
    DeviceBuffer d_out(n * tokens * dim * es), d_avail(4 * n), d_status(4 * n);
    DeviceBuffer d_src_ptrs(8 * n), d_dst_ptrs(8 * n);
    // Each block in an allocation of exactly the bytes it claims to have, so that any read past
    // them is an out-of-bounds access compute-sanitizer reports.
    std::vector<std::unique_ptr<DeviceBuffer>> inputs;
    std::vector<void*> src(n);
    for (size_t i = 0; i < n; ++i) {
      inputs.push_back(std::make_unique<DeviceBuffer>(std::max<size_t>(avail[i], 1)));
      src[i] = inputs.back()->get();
      const size_t copy = std::min<size_t>(avail[i], blocks[i].size());
      if (copy) inputs.back()->upload(blocks[i].data(), copy);
    }
    std::vector<void*> dst = strided_pointers(d_out.get(), n, tokens * dim * es);
    d_src_ptrs.upload(src.data(), 8 * n);
    d_dst_ptrs.upload(dst.data(), 8 * n);
    d_avail.upload(avail.data(), 4 * n);
    EXPECT_EQ(cudaMemset(d_out.get(), 0xFF, d_out.bytes()), cudaSuccess);  // poison
    EXPECT_EQ(kvc_codec_decode(codec.get(), int32_t(n), d_src_ptrs.get<const void*>(),
                               d_avail.get<uint32_t>(), out, d_dst_ptrs.get<void*>(), int64_t(dim),
                               d_status.get<kvc_status_t>(), stream_),
              KVC_SUCCESS)
        << kvc_last_error();
    EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    status = d_status.download<kvc_status_t>(n);
    const auto flat = d_out.download<uint8_t>(n * tokens * dim * es);
    std::vector<std::vector<uint8_t>> outs;
    for (size_t i = 0; i < n; ++i) {
      outs.emplace_back(flat.begin() + long(i * tokens * dim * es),
                        flat.begin() + long((i + 1) * tokens * dim * es));
    }
    return outs;
  }

  cudaStream_t stream_ = nullptr;
};

// CPU decode of one block into [tokens, dim] bytes, with its status.
std::vector<uint8_t> cpu_decode(const kvcomp::Codec& codec, const std::vector<uint8_t>& block,
                                uint32_t avail, kvc_dtype out, uint32_t tokens, uint32_t dim,
                                kvc_status_t* status = nullptr) {
  const size_t es = format::dtype_bytes(out);
  std::vector<uint8_t> dst(size_t(tokens) * dim * es, 0xFF);
  const void* src = block.data();
  void* d = dst.data();
  kvc_codec_decode(codec.get(), 1, &src, &avail, out, &d, dim, status, nullptr);
  return dst;
}

TEST_F(CodecGpu, EncodeIsByteIdenticalAndDecodeEqualsTheCpu) {
  uint32_t seed = 100;
  int compared = 0;
  for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
    for (uint32_t tokens : {16u, 64u, 128u}) {
      for (uint32_t dim : {64u, 128u, 256u}) {
        for (kvc_dtype dtype : {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32}) {
          ++seed;
          const bool relative = seed % 2;
          const float bound = relative ? (seed % 3 == 0 ? 0.02f : 0.08f) : 0.03f;
          kvc_codec_config c = make_config(
              kind, tokens, dim, relative ? KVC_BOUND_RELATIVE : KVC_BOUND_ABSOLUTE, bound,
              kvc_entropy(seed % 3), kind == KVC_KIND_VALUE && seed % 4 == 0 ? 32 : 0);
          if (tokens * dim > 16384) continue;  // larger blocks: see LargeBlocks below
          const kvcomp::Codebook book = train(c, dtype, seed);
          const kvcomp::Codec cpu(c, &book), gpu(on_gpu(c), &book);
          const Batch batch = make_batch(c, dtype, 6, seed);
          const GpuResult r = gpu_encode(gpu, batch);
          std::ostringstream where;
          where << "kind " << kind << " T " << tokens << " D " << dim << " dtype " << dtype
                << " seed " << seed;
          for (uint32_t h = 0; h < batch.heads; ++h) {
            const auto expected = cpu.encode(batch.head(h), dtype, batch.tensor.stride);
            ASSERT_EQ(r.sizes[h], expected.size()) << where.str() << " head " << h;
            ASSERT_EQ(r.blocks[h], expected) << where.str() << " head " << h;
          }
          for (kvc_dtype out : {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32}) {
            std::vector<kvc_status_t> status;
            const auto outs = gpu_decode(gpu, r.blocks, r.sizes, out, tokens, dim, status);
            for (uint32_t h = 0; h < batch.heads; ++h) {
              const auto want = cpu_decode(cpu, r.blocks[h], r.sizes[h], out, tokens, dim);
              ASSERT_EQ(status[h], KVC_SUCCESS) << where.str();
              ASSERT_EQ(outs[h], want) << where.str() << " out " << out << " head " << h;
            }
          }
          ++compared;
        }
      }
    }
  }
  EXPECT_GT(compared, 30);
}

TEST_F(CodecGpu, LargeBlocksUseOptInSharedMemory) {
  const kvc_codec_config c = make_config(KVC_KIND_KEY, 128, 256, KVC_BOUND_RELATIVE, 0.05f);
  const kvcomp::Codebook book = train(c, KVC_DTYPE_FP16, 5);
  const kvcomp::Codec cpu(c, &book), gpu(on_gpu(c), &book);
  const Batch batch = make_batch(c, KVC_DTYPE_FP16, 3, 7);
  const GpuResult r = gpu_encode(gpu, batch);
  for (uint32_t h = 0; h < batch.heads; ++h) {
    EXPECT_EQ(r.blocks[h], cpu.encode(batch.head(h), KVC_DTYPE_FP16, batch.tensor.stride));
  }
}

// Every dtype's kernel needs its own shared-memory opt-in (each instantiation is a kernel), and
// static shared memory counts toward the 48 KiB default: these shapes need 46.1 to 48 KiB of
// dynamic shared memory, under the default but over it with encode's static state.
TEST_F(CodecGpu, EveryDtypeEncodesBlocksNearTheDefaultSharedMemoryLimit) {
  const kvc_codec_config configs[] = {
      make_config(KVC_KIND_KEY, 42, 256, KVC_BOUND_RELATIVE, 0.05f),
      make_config(KVC_KIND_KEY, 87, 128, KVC_BOUND_ABSOLUTE, 0.03f),
      make_config(KVC_KIND_VALUE, 64, 160, KVC_BOUND_RELATIVE, 0.05f, KVC_ENTROPY_AUTO, 32),
      make_config(KVC_KIND_KEY, 128, 128, KVC_BOUND_RELATIVE, 0.05f)};
  for (const kvc_codec_config& c : configs) {
    for (kvc_dtype dtype : {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32}) {
      const kvcomp::Codebook book = train(c, dtype, 41);
      const kvcomp::Codec cpu(c, &book), gpu(on_gpu(c), &book);
      const Batch batch = make_batch(c, dtype, 2, 43);
      const GpuResult r = gpu_encode(gpu, batch);
      for (uint32_t h = 0; h < batch.heads; ++h) {
        ASSERT_EQ(r.blocks[h], cpu.encode(batch.head(h), dtype, batch.tensor.stride))
            << "T " << c.num_tokens << " D " << c.head_dim << " dtype " << dtype;
      }
    }
  }
}

TEST_F(CodecGpu, CorruptBlocksGetTheCpusVerdict) {
  const kvc_codec_config c = make_config(KVC_KIND_VALUE, 32, 64, KVC_BOUND_RELATIVE, 0.05f);
  const kvcomp::Codebook book = train(c, KVC_DTYPE_FP16, 9);
  const kvcomp::Codec cpu(c, &book), gpu(on_gpu(c), &book);
  const Block b = make_block(KVC_DTYPE_FP16, 32, 64, 64, bench::synthetic_kv(true, 32, 64, 3));
  kvc_codec_config fixed_only = c;
  fixed_only.entropy = KVC_ENTROPY_FIXED;
  const std::vector<std::vector<uint8_t>> sources = {
      cpu.encode(b.data(), KVC_DTYPE_FP16, 64),
      kvcomp::Codec(fixed_only, &book).encode(b.data(), KVC_DTYPE_FP16, 64)};
  std::mt19937 rng(11);
  std::vector<std::vector<uint8_t>> blocks;
  std::vector<uint32_t> avail;
  for (int i = 0; i < 600; ++i) {
    std::vector<uint8_t> bad = sources[size_t(i) % 2];
    uint32_t n = uint32_t(bad.size());
    if (i % 5 == 0) {
      n = uint32_t(rng() % bad.size());  // truncated
    } else {
      for (int f = 0; f < 1 + i % 3; ++f) {
        const size_t at = rng() % 2 ? rng() % 64 : rng() % bad.size();
        bad[at] ^= uint8_t(1u << (rng() % 8));
      }
    }
    blocks.push_back(bad);
    avail.push_back(n);
  }
  std::vector<kvc_status_t> status;
  const auto outs = gpu_decode(gpu, blocks, avail, KVC_DTYPE_FP32, 32, 64, status);
  int rejected = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    kvc_status_t want;
    const auto expected = cpu_decode(cpu, blocks[i], avail[i], KVC_DTYPE_FP32, 32, 64, &want);
    ASSERT_EQ(status[i], want) << "block " << i;
    if (want == KVC_SUCCESS) ASSERT_EQ(outs[i], expected) << "block " << i;
    rejected += want != KVC_SUCCESS;
  }
  EXPECT_GT(rejected, 100);
}

TEST_F(CodecGpu, NonFiniteBlocksAreMarkedWithSizeZero) {
  const kvc_codec_config c = make_config(KVC_KIND_KEY, 16, 64, KVC_BOUND_ABSOLUTE, 0.01f);
  const kvcomp::Codec gpu(on_gpu(c));
  Batch batch = make_batch(c, KVC_DTYPE_FP32, 3, 1);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(batch.tensor.bytes.data() + (5 * batch.tensor.stride + 64 + 7) * 4, &nan, 4);
  const GpuResult r = gpu_encode(gpu, batch);
  EXPECT_NE(r.sizes[0], 0u);
  EXPECT_EQ(r.sizes[1], 0u);  // head 1 holds the NaN
  EXPECT_NE(r.sizes[2], 0u);
}

TEST_F(CodecGpu, DeviceHistogramBuildsTheSameCodebook) {
  const kvc_codec_config c = make_config(KVC_KIND_KEY, 64, 128, KVC_BOUND_RELATIVE, 0.05f);
  const kvcomp::Codec cpu(c), gpu(on_gpu(c));
  const Batch batch = make_batch(c, KVC_DTYPE_BF16, 8, 21);
  kvcomp::Histogram from_cpu, from_gpu;
  for (uint32_t h = 0; h < batch.heads; ++h) {
    cpu.add_to_histogram(batch.head(h), KVC_DTYPE_BF16, batch.tensor.stride, from_cpu);
  }
  DeviceBuffer d_tensor(batch.tensor.bytes.size()), d_ptrs(8 * batch.heads);
  d_tensor.upload(batch.tensor.bytes.data(), batch.tensor.bytes.size());
  const auto ptrs = strided_pointers(d_tensor.get(), batch.heads, 128 * 2);
  d_ptrs.upload(ptrs.data(), 8 * batch.heads);
  ASSERT_EQ(kvc_codec_histogram(gpu.get(), int32_t(batch.heads), d_ptrs.get<const void*>(),
                                batch.tensor.stride, KVC_DTYPE_BF16, from_gpu.get(), stream_),
            KVC_SUCCESS)
      << kvc_last_error();
  EXPECT_EQ(from_gpu.total(), from_cpu.total());
  EXPECT_EQ(kvcomp::Codebook::build(from_gpu).serialize(),
            kvcomp::Codebook::build(from_cpu).serialize());
}

class CodecGraph : public CodecGpu, public ::testing::WithParamInterface<uint32_t> {};

// head_dim 256 needs more than 48 KiB of shared memory: the launch raises the kernel's limit,
// inside the capture.
INSTANTIATE_TEST_SUITE_P(HeadDims, CodecGraph, ::testing::Values(128u, 256u));

TEST_P(CodecGraph, EncodeAndDecodeReplayFromACapturedGraph) {
  const uint32_t dim = GetParam();
  const kvc_codec_config c = make_config(KVC_KIND_KEY, 64, dim, KVC_BOUND_RELATIVE, 0.05f);
  const kvcomp::Codebook book = train(c, KVC_DTYPE_FP16, 31);
  const kvcomp::Codec cpu(c, &book), gpu(on_gpu(c), &book);
  const uint32_t heads = 8;
  const Batch batch = make_batch(c, KVC_DTYPE_FP16, heads, 32);
  expect_graph_replays_match_the_cpu(stream_, cpu, gpu, batch.tensor, heads, 64, dim,
                                     "head_dim " + std::to_string(dim));
}

TEST_F(CodecGpu, UndersizedCapacityAndMissingStatusAreRejected) {
  const kvc_codec_config c = make_config(KVC_KIND_KEY, 16, 64, KVC_BOUND_ABSOLUTE, 0.01f);
  const kvcomp::Codec gpu(on_gpu(c));
  DeviceBuffer d(4096), ptrs(8), sizes(4);
  const void* p = d.get();
  ptrs.upload(&p, 8);
  EXPECT_EQ(kvc_codec_encode(gpu.get(), 1, ptrs.get<const void*>(), 64, KVC_DTYPE_FP16,
                             ptrs.get<void*>(), 100, sizes.get<uint32_t>(), stream_),
            KVC_ERROR_BUFFER_TOO_SMALL);
  EXPECT_EQ(kvc_codec_decode(gpu.get(), 1, ptrs.get<const void*>(), sizes.get<uint32_t>(),
                             KVC_DTYPE_FP16, ptrs.get<void*>(), 64, nullptr, stream_),
            KVC_ERROR_NULL_POINTER);
}

// Pageable host arrays where the codec takes device ones are refused before any launch on a GPU
// that cannot read them (a kernel faulting on them would end the process's CUDA context).
TEST_F(CodecGpu, HostArraysAreRefused) {
  if (reads_pageable_memory()) GTEST_SKIP() << "this GPU reads pageable host memory";
  const kvc_codec_config c = make_config(KVC_KIND_KEY, 16, 64, KVC_BOUND_ABSOLUTE, 0.01f);
  const kvcomp::Codec gpu(on_gpu(c));
  size_t cap = 0;
  ASSERT_EQ(kvc_codec_max_block_bytes(gpu.get(), KVC_DTYPE_FP16, &cap), KVC_SUCCESS);
  DeviceBuffer d(cap), ptrs(8), sizes(4), status(4);
  const void* p = d.get();
  ptrs.upload(&p, 8);
  const void* host_ptrs[1] = {p};
  uint32_t host_sizes[1] = {0};
  EXPECT_EQ(kvc_codec_encode(gpu.get(), 1, host_ptrs, 64, KVC_DTYPE_FP16, ptrs.get<void*>(), cap,
                             sizes.get<uint32_t>(), stream_),
            KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(last_error_names("src_blocks is host memory")) << kvc_last_error();
  EXPECT_EQ(kvc_codec_encode(gpu.get(), 1, ptrs.get<const void*>(), 64, KVC_DTYPE_FP16,
                             ptrs.get<void*>(), cap, host_sizes, stream_),
            KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(last_error_names("block_bytes is host memory")) << kvc_last_error();
  kvc_status_t host_status[1];
  EXPECT_EQ(kvc_codec_decode(gpu.get(), 1, ptrs.get<const void*>(), sizes.get<uint32_t>(),
                             KVC_DTYPE_FP16, ptrs.get<void*>(), 64, host_status, stream_),
            KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(last_error_names("block_status is host memory")) << kvc_last_error();
  EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
}  // namespace kvc::test
