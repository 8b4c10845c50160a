// SPDX-License-Identifier: Apache-2.0
// A decode-attention problem over format v1 blocks, built on the host as the store keeps it: one
// pool of K/V blocks encoded by the CPU oracle with the given codebooks, a block table and the
// fp16/bf16 sinks and tail per sequence, and the fp32 reconstruction of every token for the
// reference.
// Shared by the GPU test and the kernel emulation test, which run the same kernel on the same
// bytes.
#pragma once

#include <algorithm>
#include <vector>

#include "attention_reference.hpp"
#include "cpu/codec_cpu.hpp"
#include "kernels/common/sequence_view.cuh"
#include "test_support.hpp"

namespace kvc::test {

struct CompressedCacheImage {
  std::vector<uint8_t> pool;
  std::vector<std::vector<kernels::BlockLocation>> tables;    // [b][block, head, K|V]
  std::vector<std::vector<uint16_t>> dense_k, dense_v;        // [b][sinks + tail, head, dim]
  std::vector<std::vector<std::vector<float>>> ref_k, ref_v;  // [b][head][token, dim]
};

// Sequences of `lengths` tokens of synthetic K/V ([token, kv_heads, dim]), T-token blocks, the
// first `sinks` tokens also kept uncompressed where a sequence has a block.
inline CompressedCacheImage build_compressed_cache(kvc_dtype dtype, uint32_t H, uint32_t D,
                                                   uint32_t T, const std::vector<uint32_t>& lengths,
                                                   const CodecParams& key, const CodecParams& value,
                                                   const Codebook* const books[2],
                                                   uint32_t sinks = 0) {
  const uint32_t batch = uint32_t(lengths.size());
  std::vector<uint8_t> pool;
  std::vector<std::vector<kernels::BlockLocation>> tables(batch);
  std::vector<std::vector<uint16_t>> dense_k(batch), dense_v(batch);
  std::vector<std::vector<std::vector<float>>> ref_k(batch), ref_v(batch);  // [b][h]
  std::vector<uint8_t> scratch(key.max_block_bytes(dtype) + value.max_block_bytes(dtype));
  for (uint32_t b = 0; b < batch; ++b) {
    const uint32_t len = lengths[b], blocks = len / T;
    ref_k[b].assign(H, {});
    ref_v[b].assign(H, {});
    const std::vector<float> xk = bench::synthetic_kv(false, std::max(len, 1u), H * D, 100 + b);
    const std::vector<float> xv = bench::synthetic_kv(true, std::max(len, 1u), H * D, 200 + b);
    const Block bk = make_block(dtype, std::max(len, 1u), H * D, H * D, xk);
    const Block bv = make_block(dtype, std::max(len, 1u), H * D, H * D, xv);
    for (uint32_t blk = 0; blk < blocks; ++blk) {
      for (uint32_t h = 0; h < H; ++h) {
        for (uint32_t kind = 0; kind < 2; ++kind) {
          const Block& src = kind ? bv : bk;
          const CodecParams& cp = kind ? value : key;
          const uint8_t* at = src.bytes.data() + (size_t(blk) * T * H * D + h * D) * 2;
          const uint32_t n = cpu::encode_block(cp, books[kind], at, H * D, dtype, scratch.data());
          tables[b].push_back({0, uint32_t(pool.size()), n});
          std::vector<float> dec(size_t(T) * D);
          cpu::decode_block(cp, books[kind], scratch.data(), n, KVC_DTYPE_FP32, dec.data(), D);
          auto& ref = kind ? ref_v[b][h] : ref_k[b][h];
          ref.insert(ref.end(), dec.begin(), dec.end());
          pool.insert(pool.end(), scratch.begin(), scratch.begin() + n);
        }
      }
    }
    keep_uncompressed_rows(dtype, H, D, T, len, blocks, sinks, bk.values, bv.values, dense_k[b],
                           dense_v[b], ref_k[b], ref_v[b]);
  }
  return {std::move(pool),    std::move(tables), std::move(dense_k),
          std::move(dense_v), std::move(ref_k),  std::move(ref_v)};
}

}  // namespace kvc::test
