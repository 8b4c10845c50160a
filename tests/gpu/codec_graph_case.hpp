// SPDX-License-Identifier: Apache-2.0
// A codec's encode and decode captured in one CUDA graph and replayed, against the CPU codec:
// shared by the format v1 and the tile codec GPU suites.
#pragma once

#include <algorithm>
#include <kvcomp/kvcomp.hpp>
#include <string>
#include <vector>

#include "gpu_test.hpp"
#include "test_support.hpp"

namespace kvc::test {

// The heads [tokens, dim] blocks of `tensor` ([tokens, heads * dim] fp16) through `gpu`: encode
// then decode captured on `stream`, decode reading each block's size straight from the encoder's
// output (no host round trip). Every one of two replays must give `cpu`'s bytes and decoded
// values. Call under ASSERT_NO_FATAL_FAILURE.
inline void expect_graph_replays_match_the_cpu(cudaStream_t stream, const kvcomp::Codec& cpu,
                                               const kvcomp::Codec& gpu, const Block& tensor,
                                               uint32_t heads, uint32_t tokens, uint32_t dim,
                                               const std::string& what) {
  const size_t cap = gpu.max_block_bytes(KVC_DTYPE_FP16), out_bytes = size_t(tokens) * dim * 2;
  DeviceBuffer d_tensor(tensor.bytes.size()), d_blocks(cap * heads), d_sizes(4 * heads);
  DeviceBuffer d_out(out_bytes * heads), d_status(4 * heads), d_src(8 * heads), d_dst(8 * heads);
  DeviceBuffer d_bdst(8 * heads);
  d_tensor.upload(tensor.bytes.data(), tensor.bytes.size());
  const auto src = strided_pointers(d_tensor.get(), heads, dim * 2);
  const auto blocks = strided_pointers(d_blocks.get(), heads, cap);
  const auto outs = strided_pointers(d_out.get(), heads, out_bytes);
  d_src.upload(src.data(), 8 * heads);
  d_dst.upload(blocks.data(), 8 * heads);
  d_bdst.upload(outs.data(), 8 * heads);

  Graph graph;
  KVC_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  ASSERT_EQ(
      kvc_codec_encode(gpu.get(), int32_t(heads), d_src.get<const void*>(), tensor.stride,
                       KVC_DTYPE_FP16, d_dst.get<void*>(), cap, d_sizes.get<uint32_t>(), stream),
      KVC_SUCCESS)
      << kvc_last_error();
  ASSERT_EQ(kvc_codec_decode(gpu.get(), int32_t(heads), d_dst.get<const void*>(),
                             d_sizes.get<uint32_t>(), KVC_DTYPE_FP16, d_bdst.get<void*>(), dim,
                             d_status.get<kvc_status_t>(), stream),
            KVC_SUCCESS)
      << kvc_last_error();
  KVC_CUDA_CHECK(cudaStreamEndCapture(stream, &graph.graph));
  KVC_CUDA_CHECK(cudaGraphInstantiate(&graph.exec, graph.graph, 0));
  for (int replay = 0; replay < 2; ++replay) {
    KVC_CUDA_CHECK(cudaMemsetAsync(d_out.get(), 0xFF, d_out.bytes(), stream));
    KVC_CUDA_CHECK(cudaGraphLaunch(graph.exec, stream));
    KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
    const auto sizes = d_sizes.download<uint32_t>(heads);
    const auto status = d_status.download<kvc_status_t>(heads);
    const auto all_blocks = d_blocks.download<uint8_t>(cap * heads);
    const auto all_out = d_out.download<uint8_t>(out_bytes * heads);
    for (uint32_t h = 0; h < heads; ++h) {
      const auto expected =
          cpu.encode(tensor.bytes.data() + size_t(h) * dim * 2, KVC_DTYPE_FP16, tensor.stride);
      ASSERT_EQ(sizes[h], expected.size());
      ASSERT_TRUE(std::equal(expected.begin(), expected.end(), all_blocks.begin() + long(h * cap)));
      ASSERT_EQ(status[h], KVC_SUCCESS);
      std::vector<uint8_t> want(out_bytes, 0xFF);
      const void* block = expected.data();
      void* dst = want.data();
      uint32_t bytes = sizes[h];
      kvc_codec_decode(cpu.get(), 1, &block, &bytes, KVC_DTYPE_FP16, &dst, dim, nullptr, nullptr);
      ASSERT_TRUE(std::equal(want.begin(), want.end(), all_out.begin() + long(h * out_bytes)))
          << what << " replay " << replay << " head " << h;
    }
  }
}

}  // namespace kvc::test
