// SPDX-License-Identifier: Apache-2.0
// The CUDA codec as the host library sees it: plain C++ declarations, no CUDA headers, so that
// src/ compiles with the host compiler. Implemented in codec.cu. Every function throws
// kvc::Error (KVC_ERROR_CUDA naming the CUDA error, KVC_ERROR_NO_DEVICE, ...) on failure.
#pragma once

#include <kvcomp/kvcomp.h>

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <utility>

#include "codec/codebook.hpp"
#include "codec/codec_params.hpp"

namespace kvc::cuda {

// Device copies of a codec's codebook tables (made once per codec) and its histogram scratch
// (made by the first histogram call).
class DeviceCodec;
struct DeviceCodecDeleter {
  void operator()(DeviceCodec* d) const noexcept;
};
using DeviceCodecPtr = std::unique_ptr<DeviceCodec, DeviceCodecDeleter>;

// Checks that a GPU is usable and the block shape fits the kernels, then uploads the tables
// (cudaMalloc + cudaMemcpy: creation time, never on the encode/decode path).
DeviceCodecPtr create_device_codec(const CodecParams& p, const Codebook* codebook);

// The public calls' arrays (pointer, argument name), which must be memory the codec's device
// reaches: require_device_memory for each, unless `stream` is capturing. The store's own
// buffers need no check.
void require_device_arrays(const DeviceCodec& d, void* stream,
                           std::initializer_list<std::pair<const void*, const char*>> arrays);

// Enqueue only: no host synchronisation. d_block_bytes[i] = 0 marks a block whose input was
// not finite (no block written). dst_capacity_bytes must be >= max_block_bytes(dtype).
void encode(const DeviceCodec& d, int32_t num_blocks, const void* const* d_src_blocks,
            int64_t src_token_stride, kvc_dtype src_dtype, void* const* d_dst_blocks,
            uint32_t* d_block_bytes, void* stream);

// Enqueue only. d_block_status[i] receives each block's status.
void decode(const DeviceCodec& d, int32_t num_blocks, const void* const* d_src_blocks,
            const uint32_t* d_src_bytes, kvc_dtype dst_dtype, void* const* d_dst_blocks,
            int64_t dst_token_stride, kvc_status_t* d_block_status, void* stream);

// Counts the blocks' Huffman symbols on the GPU and adds them to a host histogram: copies the
// counts back and synchronises `stream` (a prefill-time call, not graph-capturable). A NULL
// block pointer counts nothing.
void histogram(const DeviceCodec& d, int32_t num_blocks, const void* const* d_src_blocks,
               int64_t src_token_stride, kvc_dtype src_dtype, Histogram& histogram, void* stream);

}  // namespace kvc::cuda
