// SPDX-License-Identifier: Apache-2.0
// How the paged store lays out one sequence of one layer in device memory: the descriptors the
// host side builds (src/cuda/) and the attention and store kernels read as they are.
#pragma once

#include <cstdint>

namespace kvc::kernels {

// Where one compressed block lives: the store's BlockRef.
struct BlockLocation {
  uint32_t page;
  uint32_t offset;
  uint32_t bytes;
};

// One sequence of one layer, device pointers: blocks [num_blocks, kv_heads, 2 (K, V)], and a tail
// [tail_tokens, kv_heads, head_dim] of the cache dtype.
struct SequenceView {
  const BlockLocation* blocks;
  uint32_t num_blocks;
  uint32_t tail_tokens;
  const void* tail_keys;
  const void* tail_values;
};

}  // namespace kvc::kernels
