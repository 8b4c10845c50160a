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

// The block's parsed layout and the tables the decoder stages in shared memory.
struct TileTables {
  const float* step;            // per group
  const uint32_t* center;       // per group, modulo 2^32
  const uint32_t* position_of;  // K: channel -> its permuted position
  const uint32_t* width;        // per tile
  const uint32_t* tile_at;      // per tile, from the block start
};

// Writes every element of the block, V (kValue) or K, with the kind's index math resolved at
// compile time. D divides kThreads: a thread keeps channel c (its position j: K's tile,
// B-operand row and group; V's n-block and column) and steps kThreads / D tokens at a time, a
// tile at a time (K: its one tile), so that a tile's width, planes and layout are worked out
// once and each element costs its lane, pair, words and conversion.
template <bool kValue, kvc_dtype OUT>
__device__ void write_tile_elements(const tl::TileLayout& L, const uint8_t* src,
                                    const TileTables& tb, void* dst, int64_t stride) {
  const uint32_t tid = threadIdx.x, T = L.num_tokens, D = L.head_dim, pairs = L.pairs_per_lane;
  const uint32_t raw_dtype = L.raw_dtype, nblocks = L.nblocks;  // held, not reread per element
  const bool aligned = reinterpret_cast<uintptr_t>(src) % 4 == 0;
  const uint32_t c = tid % D, j = kValue ? c : tb.position_of[c];
  // This thread's elements of tile `tile`: tokens t_begin, t_begin + kThreads / D, ... < t_end.
  auto tile_elements = [&](uint32_t tile, uint32_t t_begin, uint32_t t_end) {
    const uint32_t w = tb.width[tile];
    const uint8_t* at = src + tb.tile_at[tile];
    const bool raw = w == tl::kWRaw;
    const uint32_t bits0 = raw ? tl::element_bits(w, raw_dtype) : tl::plane_bits(w, 0);
    const uint32_t bits1 = raw ? 0u : tl::plane_bits(w, 1);
    const tl::PlaneGeometry g0 = tl::plane_geometry(bits0, pairs);
    const tl::PlaneGeometry g1 = tl::plane_geometry(bits1, pairs);
    const uint8_t* plane1 = at + tl::plane1_offset(w, nblocks);
    // The h-th element of pair p of `lane` in a plane of at most 16 bits.
    auto field = [&](const uint8_t* plane, const tl::PlaneGeometry& g, uint32_t lane, uint32_t p,
                     uint32_t h) {
      if (g.bits == 0) return 0u;
      const tl::PairLocation loc = tl::locate_pair(g, lane, p);
      return (tile_word(plane + 4 * loc.word, aligned) >> (loc.shift + 16 * h)) &
             (g.bits == 16 ? 0xFFFFu : (1u << g.bits) - 1u);
    };
    for (uint32_t t = t_begin; t < t_end; t += kThreads / D) {
      // The element's B-operand row k and column n, then its lane, pair and half.
      const uint32_t k = kValue ? t % 16 : j % 16;
      const uint32_t nblock = kValue ? c / 8 : t / 8, n = kValue ? c % 8 : t % 8;
      const uint32_t lane = 4 * n + (k & 7u) / 2, p = 2 * nblock + (k >= 8 ? 1u : 0u), h = k & 1u;
      float v;
      if (raw && bits0 == 32) {
        const tl::PairLocation loc = tl::locate_pair(g0, lane, p);
        const uint32_t word = h == 0 ? loc.word : tl::next_lane_word(loc.word, 32, pairs);
        v = f::bits_float(tile_word(at + 4 * word, aligned));
      } else if (raw) {
        const uint32_t x = field(at, g0, lane, p, h);
        v = raw_dtype == KVC_DTYPE_BF16 ? f::bf16_to_float(uint16_t(x))
                                        : f::half_to_float(uint16_t(x));
      } else {
        const uint32_t u = field(at, g0, lane, p, h) | (field(plane1, g1, lane, p, h) << bits0);
        const uint32_t g = kValue ? t : j;
        v = f::dequantize(int32_t(tb.center[g] + u), tb.step[g]);
      }
      store_output<OUT>(dst, size_t(t) * size_t(stride) + c, v);
    }
  };
  if (kValue) {
    for (uint32_t tile = 0; tile < T / 16; ++tile) {
      tile_elements(tile, 16 * tile + tid / D, 16 * tile + 16);
    }
  } else {
    tile_elements(j / 16, tid / D, T);
  }
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

  const uint32_t D = L.head_dim, G = L.num_groups;
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

  const TileTables tables{step, center, position_of, width, tile_at};
  if (is_value) {
    write_tile_elements<true, OUT>(L, src, tables, dst, stride);
  } else {
    write_tile_elements<false, OUT>(L, src, tables, dst, stride);
  }
}

}  // namespace kvc::kernels
