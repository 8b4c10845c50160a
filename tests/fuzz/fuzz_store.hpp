// SPDX-License-Identifier: Apache-2.0
// Shared by the store fuzzers and the seed generator: small store configurations (so that each
// iteration is fast) that between them cover both dtypes, absolute and relative bounds, grouped
// values, every entropy mode, tile blocks (format t1) in both dtypes, with and without permuted
// channels and 3/6-bit tiles, rotated rows, attention sinks, per-layer bounds (of either block
// format), tiles serialized as format v1 (with sinks, in bf16) and both store limits, several
// of these together; the codebooks they hold; their input
// rows; and a snapshot of a store (stats and every live sequence's bytes) to compare before and
// after a call. Public API only.
#pragma once

#include <kvcomp/kvcomp.h>

#include <cstdint>
#include <map>
#include <vector>

#include "fuzz_common.hpp"

namespace kvc_fuzz {

inline constexpr int kNumStoreConfigs = 8;

// The configuration a fuzzer input's first byte selects: bits 0-1, and bit 3 for the fifth to
// eighth (bit 2 and bits 4-7 are the fuzzers' own flags); and the byte (flags clear) that selects
// one.
inline int config_of_selector(uint8_t b) { return ((b & 3) | ((b & 8) >> 1)) % kNumStoreConfigs; }
inline uint8_t selector_of_config(int which) { return uint8_t((which & 3) | ((which & 4) << 1)); }

inline kvc_store_config store_config(int which) {
  kvc_store_config c = KVC_STORE_CONFIG_INIT;
  switch (which) {
    default:  // two layers, fp16, absolute bounds, AUTO; blocks <= 288 bytes
      c.num_layers = 2;
      c.num_kv_heads = 1;
      c.head_dim = 16;
      c.block_tokens = 8;
      c.dtype = KVC_DTYPE_FP16;
      c.key_bound_mode = KVC_BOUND_ABSOLUTE;
      c.key_error_bound = 0.05f;
      c.value_bound_mode = KVC_BOUND_ABSOLUTE;
      c.value_error_bound = 0.02f;
      c.entropy = KVC_ENTROPY_AUTO;
      c.page_bytes = 512;
      c.capacity_bytes = 8 * 512;
      break;
    case 1:  // bf16, relative bounds, V groups of 8, HUFFMAN, at most 40 tokens per layer
      c.num_layers = 1;
      c.num_kv_heads = 2;
      c.head_dim = 32;
      c.block_tokens = 4;
      c.dtype = KVC_DTYPE_BF16;
      c.key_bound_mode = KVC_BOUND_RELATIVE;
      c.key_error_bound = 0.05f;
      c.value_bound_mode = KVC_BOUND_RELATIVE;
      c.value_error_bound = 0.1f;
      c.value_group_size = 8;
      c.entropy = KVC_ENTROPY_HUFFMAN;
      c.max_sequence_tokens = 40;
      c.page_bytes = 512;
      c.capacity_bytes = 10 * 512;
      break;
    case 2: {  // FIXED (no codebooks), 16-token blocks, at most 3 live sequences, a per-layer
               // bound (serialized version 5)
      static const float key_scale = 2.0f, value_scale = 0.5f;
      c.key_layer_scales = &key_scale;
      c.value_layer_scales = &value_scale;
      c.num_layers = 1;
      c.num_kv_heads = 1;
      c.head_dim = 16;
      c.block_tokens = 16;
      c.dtype = KVC_DTYPE_FP16;
      c.key_bound_mode = KVC_BOUND_ABSOLUTE;
      c.key_error_bound = 0.01f;
      c.value_bound_mode = KVC_BOUND_ABSOLUTE;
      c.value_error_bound = 0.01f;
      c.entropy = KVC_ENTROPY_FIXED;
      c.max_sequences = 3;
      c.page_bytes = 768;
      c.capacity_bytes = 6 * 768;
      break;
    }
    case 3:  // tile blocks: two layers, 16 x 32 (two K tiles: permutations pay), relative K
             // bound (per-group steps), absolute V bound; blocks <= 48 + 1024 bytes
      c.num_layers = 2;
      c.num_kv_heads = 1;
      c.head_dim = 32;
      c.block_tokens = 16;
      c.dtype = KVC_DTYPE_FP16;
      c.key_bound_mode = KVC_BOUND_RELATIVE;
      c.key_error_bound = 0.05f;
      c.value_bound_mode = KVC_BOUND_ABSOLUTE;
      c.value_error_bound = 0.02f;
      c.block_format = KVC_BLOCK_FORMAT_TILES;
      c.page_bytes = 1280;
      c.capacity_bytes = 14 * 1280;
      break;
    case 4:  // rotated rows (KVC_ROTATION_HADAMARD): config 0's shape, fp16, AUTO; blocks of
             // rotated rows, serialized version 3
      c = store_config(0);
      c.rotation = KVC_ROTATION_HADAMARD;
      break;
    case 5:  // attention sinks: config 3's tile blocks with 5 sink tokens, of rotated rows, K
             // channels never permuted; serialized version 4
      c = store_config(3);
      c.sink_tokens = 5;
      c.rotation = KVC_ROTATION_HADAMARD;
      c.tile_permute_channels = 0;
      break;
    case 6: {  // per-layer bounds on tile blocks: config 3 in bf16, no 3- or 6-bit tiles,
               // serialized version 5
      static const float key_scales[2] = {0.5f, 2.0f}, value_scales[2] = {1.0f, 0.25f};
      c = store_config(3);
      c.dtype = KVC_DTYPE_BF16;
      c.tile_split_widths = 0;
      c.key_layer_scales = key_scales;
      c.value_layer_scales = value_scales;
      break;
    }
    case 7:  // config 3's tile blocks serialized as format v1 (serialized version 6), in bf16,
             // absolute K and relative V bounds, 3 sink tokens
      c = store_config(3);
      c.serialized_block_format = KVC_BLOCK_FORMAT_V1;
      c.dtype = KVC_DTYPE_BF16;
      c.key_bound_mode = KVC_BOUND_ABSOLUTE;
      c.key_error_bound = 0.05f;
      c.value_bound_mode = KVC_BOUND_RELATIVE;
      c.value_error_bound = 0.05f;
      c.sink_tokens = 3;
      break;
  }
  return c;
}

// Sets the decoder fuzzer's codebook (make_fixed_codebook) on every (layer, kind) of a store that
// uses codebooks, so that seeds written by one store restore into another. (A tiles store uses
// none, and refuses them.)
inline void set_store_codebooks(kvc_store_t s, const kvc_store_config& c, kvc_codebook_t book) {
  if (c.entropy == KVC_ENTROPY_FIXED || c.block_format == KVC_BLOCK_FORMAT_TILES) return;
  for (int32_t l = 0; l < c.num_layers; ++l) {
    KVC_FUZZ_CHECK(kvc_store_set_codebook(s, l, KVC_KIND_KEY, book) == KVC_SUCCESS);
    KVC_FUZZ_CHECK(kvc_store_set_codebook(s, l, KVC_KIND_VALUE, book) == KVC_SUCCESS);
  }
}

inline size_t row_elements(const kvc_store_config& c) {
  return size_t(c.num_kv_heads) * size_t(c.head_dim);
}

// Rows [count, heads, dim] of the store's dtype: smooth values with outlier channels (pattern 0),
// a constant (1: zero-width fixed codes), or a range too wide for the bound (2: raw blocks).
inline std::vector<uint8_t> store_rows(const kvc_store_config& c, size_t count, uint32_t seed,
                                       int pattern) {
  Shape shape{int32_t(count), int32_t(row_elements(c)), 0, 0};
  std::vector<float> x;
  fill_block(x, shape, seed, pattern);
  return to_dtype(x, kvc_dtype(c.dtype));
}

// Adds a sequence to s and prefills n tokens of every layer; returns its id.
inline int32_t prefilled_sequence(kvc_store_t s, const kvc_store_config& c, int32_t n,
                                  uint32_t seed, int pattern) {
  int32_t id = -1;
  KVC_FUZZ_CHECK(kvc_store_add_sequence(s, &id) == KVC_SUCCESS);
  if (n == 0) return id;
  const size_t count = size_t(n) * size_t(c.num_layers);
  const std::vector<uint8_t> k = store_rows(c, count, seed, pattern);
  const std::vector<uint8_t> v = store_rows(c, count, seed + 1000, pattern);
  KVC_FUZZ_CHECK(kvc_store_prefill(s, id, 0, c.num_layers, n, k.data(), v.data(), nullptr) ==
                 KVC_SUCCESS);
  return id;
}

inline std::vector<uint8_t> serialized(kvc_store_t s, int32_t id) {
  size_t n = 0, written = 0;
  KVC_FUZZ_CHECK(kvc_store_serialized_size(s, id, &n) == KVC_SUCCESS);
  std::vector<uint8_t> bytes(n);
  KVC_FUZZ_CHECK(kvc_store_serialize(s, id, bytes.data(), n, &written) == KVC_SUCCESS);
  KVC_FUZZ_CHECK(written == n);
  return bytes;
}

// What an unchanged store keeps: its stats (but the append record, which a failed prefill or
// append updates by design) and the bytes of each of the given live sequences.
struct StoreSnapshot {
  kvc_store_stats stats;
  std::map<int32_t, std::vector<uint8_t>> sequences;
  bool operator==(const StoreSnapshot& o) const {
    return stats.num_sequences == o.stats.num_sequences && stats.num_blocks == o.stats.num_blocks &&
           stats.block_bytes == o.stats.block_bytes && stats.page_bytes == o.stats.page_bytes &&
           stats.tail_bytes == o.stats.tail_bytes && stats.table_bytes == o.stats.table_bytes &&
           stats.codebook_bytes == o.stats.codebook_bytes &&
           stats.dense_bytes == o.stats.dense_bytes && stats.pages_in_use == o.stats.pages_in_use &&
           stats.pages_total == o.stats.pages_total && sequences == o.sequences;
  }
};

inline kvc_store_stats store_stats(kvc_store_t s) {
  kvc_store_stats st = KVC_STORE_STATS_INIT;
  KVC_FUZZ_CHECK(kvc_store_get_stats(s, &st) == KVC_SUCCESS);
  return st;
}

inline StoreSnapshot snapshot(kvc_store_t s, const std::vector<int32_t>& live) {
  StoreSnapshot snap{store_stats(s), {}};
  for (int32_t id : live) snap.sequences[id] = serialized(s, id);
  return snap;
}

}  // namespace kvc_fuzz
