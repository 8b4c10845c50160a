// SPDX-License-Identifier: Apache-2.0
// Decode attention on the GPU, as the host library sees it (no CUDA headers). Two kernels of
// the same split-KV schedule: one reads compressed blocks (decoding them in registers and
// shared memory, never writing K/V back to global memory), one reads a dense fp16/bf16 cache
// on the tensor cores (the baseline, and the structure the tile kernel shares). The inputs are
// descriptors in device memory laid out as the paged store keeps its sequences, so the store
// feeds the kernel without copies.
#pragma once

#include <kvcomp/kvcomp.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "codec/codebook.hpp"
#include "codec/codec_params.hpp"
#include "kernels/common/sequence_view.cuh"

namespace kvc::cuda {

using kernels::BlockLocation;
using kernels::SequenceView;

struct AttentionShape {
  uint32_t num_sequences;
  uint32_t kv_heads;
  uint32_t group;     // query heads per kv-head, 1..16
  uint32_t head_dim;  // 64, 128 or 256
  kvc_dtype dtype;    // fp16 or bf16: queries, outputs, tails, dense caches
  float scale;
};

// Device tables of the K and V codebooks of one layer; made once, like a codec's.
class DeviceCodebooks;
struct DeviceCodebooksDeleter {
  void operator()(DeviceCodebooks* d) const noexcept;
};
using DeviceCodebooksPtr = std::unique_ptr<DeviceCodebooks, DeviceCodebooksDeleter>;
DeviceCodebooksPtr upload_codebooks(const Codebook* key_book, const Codebook* value_book);

// KVC_ERROR_NOT_SUPPORTED unless the kernels cover this shape and these block parameters.
void require_attention_support(const AttentionShape& shape, const CodecParams& key,
                               const CodecParams& value);

// The split schedule: how many chunks each sequence's own units are cut into (flash-decoding;
// kernels::split_units), from the longest sequence and the GPU's multiprocessor count; and the
// workspace it needs.
struct AttentionPlan {
  uint32_t num_splits;
  size_t workspace_bytes;
};
// max_units: the units of the longest sequence, at most kernels::max_attention_units(its
// blocks, the store's sink_tokens).
AttentionPlan plan_attention(const AttentionShape& shape, uint32_t max_units);
// The workspace of every batch of at most shape.num_sequences sequences: fewer sequences may
// split into more parts, so a smaller batch does not always need less.
size_t attention_workspace_bound(const AttentionShape& shape, uint32_t max_units);

// out = softmax(scale q K^T) V for every sequence and query head. d_queries, d_out:
// [num_sequences, kv_heads * group, head_dim]; d_sequences: [num_sequences]. Enqueue only.
void attention_compressed(const AttentionShape& shape, const AttentionPlan& plan,
                          const CodecParams& key, const CodecParams& value,
                          const DeviceCodebooks& books, const uint8_t* d_pool, size_t page_bytes,
                          const SequenceView* d_sequences, const void* d_queries, void* d_out,
                          void* d_workspace, void* stream);

// Whether attention_tiles has a kernel for tile blocks of tokens_per_block tokens at head_dim:
// T of 64 or 128, head_dim 64, 128 or 256, and T * head_dim <= 128 * 128 (128-token blocks at
// head_dim 256 would spill: the output and the scores alone are 192 registers per thread).
constexpr bool tile_attention_covers(uint32_t tokens_per_block, uint32_t head_dim) {
  return (tokens_per_block == 64 || tokens_per_block == 128) &&
         (head_dim == 64 || head_dim == 128 || head_dim == 256) &&
         tokens_per_block * head_dim <= 128 * 128;
}

// How the tile kernel stages units in shared memory (kernels/attention/tile_attention.cuh):
// wide stages fit every unit of codes of at most 8 bits where the device's shared memory
// allows, with one thread block per multiprocessor at head_dim 128; compact ones (T = 64,
// head_dim 128 only) fit units of up to about 4.5 bits per element, and two blocks.
enum class TileStaging { kWide, kCompact };
// The largest unit (a K and a V block, in bytes) a stage holds on the current device; larger
// ones are read in place.
uint32_t tile_stage_bytes(TileStaging staging, uint32_t tokens_per_block, uint32_t head_dim);

// The same over tile blocks (format t1) of tokens_per_block tokens (64 or 128; 64 at head_dim
// 256), as the store writes them: 16-byte aligned in the pool, raw tiles in the cache dtype.
// plan from plan_attention. Enqueue only.
void attention_tiles(const AttentionShape& shape, const AttentionPlan& plan,
                     uint32_t tokens_per_block, const uint8_t* d_pool, size_t page_bytes,
                     const SequenceView* d_sequences, const void* d_queries, void* d_out,
                     void* d_workspace, void* stream, TileStaging staging = TileStaging::kWide);

// The baseline: a dense cache, d_keys/d_values [num_sequences, max_tokens, kv_heads, head_dim],
// d_lengths [num_sequences]. plan from plan_dense_attention. Enqueue only.
AttentionPlan plan_dense_attention(const AttentionShape& shape, uint32_t max_tokens);
void attention_dense(const AttentionShape& shape, const AttentionPlan& plan, uint32_t max_tokens,
                     const uint32_t* d_lengths, const void* d_keys, const void* d_values,
                     const void* d_queries, void* d_out, void* d_workspace, void* stream);

}  // namespace kvc::cuda
