// SPDX-License-Identifier: Apache-2.0
// How the paged store lays out one sequence of one layer in device memory: the descriptors the
// host side builds (src/cuda/) and the attention and store kernels read as they are.
#pragma once

#include <cstdint>

#include "kernels/common/format.cuh"  // KVC_HD

namespace kvc::kernels {

// Where one compressed block lives: the store's BlockRef.
struct BlockLocation {
  uint32_t page;
  uint32_t offset;
  uint32_t bytes;
};

// One sequence of one layer, device pointers: blocks [num_blocks, kv_heads, 2 (K, V)], and the
// uncompressed rows [sink_tokens + tail_tokens, kv_heads, head_dim] of the cache dtype: the
// sinks, a copy of block 0's first sink_tokens rows that attention reads instead of them (none
// until block 0 exists), then the tail.
struct SequenceView {
  const BlockLocation* blocks;
  uint32_t num_blocks;
  uint32_t sink_tokens;
  uint32_t tail_tokens;
  const void* dense_keys;
  const void* dense_values;
};

// Attention's units of work over a sequence: its blocks, then the uncompressed rows cut in
// pieces of at most T tokens (unit num_blocks + i holds rows [i T, (i + 1) T)).
KVC_HD uint32_t dense_tokens(const SequenceView& s) { return s.sink_tokens + s.tail_tokens; }
KVC_HD uint32_t attention_units(const SequenceView& s, uint32_t T) {
  return s.num_blocks + (dense_tokens(s) + T - 1) / T;
}
// The most units a sequence of at most max_blocks blocks has: sinks (< T) and tail (< T) take
// at most two.
KVC_HD uint32_t max_attention_units(uint32_t max_blocks, uint32_t sink_tokens) {
  return max_blocks + (sink_tokens > 0 ? 2u : 1u);
}

}  // namespace kvc::kernels
