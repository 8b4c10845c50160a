// SPDX-License-Identifier: Apache-2.0
// Tile decode kernel (format t1 -> dense rows): equal element for element to the CPU reference
// decoder (kvc::cpu::decode_tile_block), with the same verdicts on corrupt blocks. One thread
// block per compressed block: thread 0 parses and checks the block against the bytes available
// (tiles::parse_block, the function the CPU runs), the block stages the tile table, steps,
// centres and inverse permutation in shared memory, then each thread writes whole rows' worth of
// output elements (coalesced stores), reading each one's bits where the layout puts them. After
// a successful parse every tile lies inside the block, so no read leaves it.
#pragma once

#include "kernels/codec/tile_encode.cuh"

namespace kvc::kernels {

// A 32-bit little-endian word of the block: one load where the block is 4-byte aligned (tile
// words are: tiles start at multiples of 16), bytes otherwise.
__device__ inline uint32_t tile_word(const uint8_t* p, bool aligned) {
  return aligned ? load_word(p, 0) : f::load_u32(p);
}

__device__ inline kvc_status_t check_tile_block(const TileShape& sh, const uint8_t* src,
                                                uint32_t available, tl::TileLayout& b) {
  const tl::ParseError e = tl::parse_block(src, available, b);
  if (e == tl::ParseError::kBadVersion) return KVC_ERROR_FORMAT_VERSION;
  if (e != tl::ParseError::kNone) return KVC_ERROR_CORRUPT_DATA;
  if (b.is_value != (sh.is_value != 0) || b.num_tokens != sh.num_tokens ||
      b.head_dim != sh.head_dim) {
    return KVC_ERROR_CONFIG_MISMATCH;
  }
  return KVC_SUCCESS;
}

// Launch: one thread block of kThreads per compressed block, no dynamic shared memory.
template <kvc_dtype OUT>
__global__ void __launch_bounds__(kThreads)
    tile_decode_kernel(TileShape sh, const void* const* src_blocks, const uint32_t* src_bytes,
                       void* const* dst_blocks, int64_t stride, kvc_status_t* block_status) {
  constexpr uint32_t kMaxGroups = 1024, kMaxChannels = 256;
  __shared__ tl::TileLayout L;
  __shared__ kvc_status_t status;
  __shared__ float step[kMaxGroups];
  __shared__ uint32_t center[kMaxGroups];
  __shared__ uint32_t position_of[kMaxChannels];  // K: channel -> its permuted position
  __shared__ uint32_t width[kMaxTiles], tile_at[kMaxTiles];

  const uint32_t tid = threadIdx.x, block = blockIdx.x;
  const uint8_t* src = static_cast<const uint8_t*>(src_blocks[block]);
  void* dst = dst_blocks[block];
  if (tid == 0) {
    // Pointers live in device memory, so only the kernel can check them.
    const bool usable = src != nullptr && dst != nullptr &&
                        reinterpret_cast<uintptr_t>(dst) % (OUT == KVC_DTYPE_FP32 ? 4 : 2) == 0;
    status = usable ? check_tile_block(sh, src, src_bytes[block], L) : KVC_ERROR_INVALID_ARGUMENT;
    block_status[block] = status;
  }
  __syncthreads();
  if (status != KVC_SUCCESS) return;

  const uint32_t T = L.num_tokens, D = L.head_dim, G = L.num_groups, pairs = L.pairs_per_lane;
  const bool is_value = L.is_value;
  for (uint32_t i = tid; i < L.num_tiles; i += kThreads) {
    const uint32_t entry = tl::table_entry(src, L, i);
    width[i] = tl::entry_width(entry);
    tile_at[i] = tl::entry_offset(entry);
  }
  if (L.quantized) {
    for (uint32_t g = tid; g < G; g += kThreads) {
      step[g] = tl::group_step(src, L, g);
      center[g] = tl::group_center(src, L, g);  // modulo 2^32, as on the CPU
    }
  }
  if (!is_value) {
    for (uint32_t j = tid; j < D; j += kThreads) position_of[tl::channel_of(src, L, j)] = j;
  }
  __syncthreads();

  const bool aligned = reinterpret_cast<uintptr_t>(src) % 4 == 0;
  // The h-th element of pair p of `lane` in a plane of `bits` (<= 16) bits.
  auto field = [&](const uint8_t* plane, uint32_t bits, uint32_t lane, uint32_t p, uint32_t h) {
    if (bits == 0) return 0u;
    const tl::PairLocation loc = tl::pair_location(lane, p, bits, pairs);
    return (tile_word(plane + 4 * loc.word, aligned) >> (loc.shift + 16 * h)) &
           (bits == 16 ? 0xFFFFu : (1u << bits) - 1u);
  };
  // D divides kThreads: a thread keeps channel c (its position j: K's tile and B-operand row, V's
  // n-block and column) and steps kThreads / D tokens at a time.
  const uint32_t c = tid % D, j = is_value ? c : position_of[c];
  for (uint32_t t = tid / D; t < T; t += kThreads / D) {
    // The element's tile, B-operand row k and column n, then its lane, pair and half.
    const uint32_t tile = is_value ? t / 16 : j / 16, k = is_value ? t % 16 : j % 16;
    const uint32_t nblock = is_value ? c / 8 : t / 8, n = is_value ? c % 8 : t % 8;
    const uint32_t lane = 4 * n + (k & 7u) / 2, p = 2 * nblock + (k >= 8 ? 1u : 0u), h = k & 1u;
    const uint32_t w = width[tile];
    const uint8_t* at = src + tile_at[tile];
    float v;
    if (w == tl::kWRaw) {
      const uint32_t bits = tl::element_bits(w, L.raw_dtype);
      if (bits == 32) {
        const tl::PairLocation loc = tl::pair_location(lane, p, bits, pairs);
        const uint32_t word = h == 0 ? loc.word : tl::next_lane_word(loc.word, bits, pairs);
        v = f::bits_float(tile_word(at + 4 * word, aligned));
      } else {
        const uint32_t x = field(at, bits, lane, p, h);
        v = L.raw_dtype == KVC_DTYPE_BF16 ? f::bf16_to_float(uint16_t(x))
                                          : f::half_to_float(uint16_t(x));
      }
    } else {
      const uint32_t bits0 = tl::plane_bits(w, 0), bits1 = tl::plane_bits(w, 1);
      const uint32_t u = field(at, bits0, lane, p, h) |
                         (field(at + tl::plane1_offset(w, L.nblocks), bits1, lane, p, h) << bits0);
      const uint32_t g = is_value ? t : j;
      v = f::dequantize(int32_t(center[g] + u), step[g]);
    }
    store_output<OUT>(dst, size_t(t) * size_t(stride) + c, v);
  }
}

}  // namespace kvc::kernels
