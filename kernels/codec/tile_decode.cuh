// SPDX-License-Identifier: Apache-2.0
// Tile decode kernel (format t1 -> dense rows): equal element for element to the CPU reference
// decoder (kvc::cpu::decode_tile_block), with the same verdicts on corrupt blocks. One thread
// block per compressed block: thread 0 parses and checks the block against the bytes available
// (tiles::parse_block, the function the CPU runs), the block stages the tile table, steps,
// centres and permutation in shared memory, then its warps decode tiles a word of each plane at a
// time into rows staged in shared memory, which leave in whole rows (16-byte stores where the
// output allows). After a successful parse every tile lies inside the block, so no read leaves
// it.
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
  const float* step;           // per group
  const uint32_t* center;      // per group, modulo 2^32
  const uint32_t* channel_at;  // K: position -> its channel
  const uint32_t* width;       // per tile
  const uint32_t* tile_at;     // per tile, from the block start
};

// Decoded elements pass through shared memory a chunk of tokens at a time, so that they leave
// in whole rows: at most kDecodeStageBytes of elements (and kDecodeStageMaxTokens tokens) per
// chunk, each staged row kDecodeStagePad bytes longer than a row of output, which keeps rows
// 16-byte aligned and moves each row four banks on from the last.
constexpr uint32_t kDecodeStageBytes = 32768, kDecodeStageMaxTokens = 128, kDecodeStagePad = 16;
constexpr uint32_t kDecodeStageBufferBytes =
    kDecodeStageBytes + kDecodeStageMaxTokens * kDecodeStagePad;
static_assert(kDecodeStageBytes / (256 * 4) >= 32, "chunks of at least 32 tokens at D 256, fp32");

// The tokens of one chunk: a power of two, and since D * element bytes <= 1024, at least 32 or
// the whole block: every run below (at most 4 n-blocks, 32 tokens of a K tile) and every V tile
// (16 tokens) lies inside one chunk.
KVC_HD uint32_t stage_tokens(uint32_t num_tokens, uint32_t head_dim, uint32_t element_bytes) {
  const uint32_t fit = kDecodeStageBytes / (head_dim * element_bytes);
  const uint32_t most = fit < kDecodeStageMaxTokens ? fit : kDecodeStageMaxTokens;
  return num_tokens < most ? num_tokens : most;
}

// A lane's four rows of a tile (i = 2r + h: B-operand row k = 2 (lane % 4) + 8r + h): their
// steps and centres, and where their elements of the chunk's first n-block go in the stage.
struct LaneRows {
  float step[4];
  uint32_t center[4];
  uint8_t* at[4];
};

// The fast path: a run of `run_pairs` of a lane's pairs of a coded tile, from an even pair, in
// one word of each plane (a plane-0 word holds 16 / kBits0 pairs, a plane-1 word twice as many),
// both words already shifted to the run's first slot; steps finite, so that no element is a NaN
// (store_output_finite). Widths are template arguments, so every shift and mask is a constant.
// Pair 2m + r of the run is register r of the run's n-block m, `nblock_bytes` further on in the
// stage. A run is at most run_slots(kBits0) pairs: a plane-0 word's (width 0: 8).
KVC_HD constexpr uint32_t run_slots(uint32_t bits0) { return bits0 == 0 ? 8u : 16u / bits0; }
template <uint32_t kBits0, bool kSplit, kvc_dtype OUT>
__device__ __forceinline__ void decode_run(uint32_t w0, uint32_t w1, uint32_t run_pairs,
                                           const LaneRows& rows, uint32_t nblock_bytes) {
  constexpr uint32_t kBits1 = kSplit ? kBits0 / 2 : 0u, kSlots = run_slots(kBits0);
  constexpr uint32_t kMask0 = (1u << kBits0) - 1u, kMask1 = (1u << kBits1) - 1u;
  // A lane has at least 4 pairs, so only a run of 8 slots can be cut short (to 4).
  const bool whole = run_pairs == kSlots;
#pragma unroll
  for (uint32_t q = 0; q < kSlots; ++q) {
    if (q < 4 || whole) {
#pragma unroll
      for (uint32_t h = 0; h < 2; ++h) {
        const uint32_t i = 2 * (q % 2) + h;
        uint32_t u = (w0 >> (q * kBits0 + 16 * h)) & kMask0;
        if (kSplit) u |= ((w1 >> (q * kBits1 + 16 * h)) & kMask1) << kBits0;
        store_output_finite<OUT>(rows.at[i] + (q / 2) * nblock_bytes, 0,
                                 f::dequantize(int32_t(rows.center[i] + u), rows.step[i]));
      }
    }
  }
}

// Decodes the block's tiles into staged rows, one chunk of tokens at a time, and writes each
// chunk's rows out. A warp decodes a tile's part of the chunk (several warps share a tile where a
// chunk has fewer tiles than warps); each lane owns the four B-operand rows of the tile (K: four
// channel positions, V: four tokens), whose steps, centres and places it loads once per tile.
// Coded tiles of blocks with finite steps at 4-byte-aligned addresses take decode_run, a word
// of each plane at a time; raw tiles and the rest go pair by pair, each pair located on its own
// and converted with to_half_saturate's NaN test.
template <bool kValue, kvc_dtype OUT>
__device__ void write_tile_elements(const tl::TileLayout& L, const uint8_t* src,
                                    const TileTables& tb, bool finite_steps, uint8_t* stage,
                                    void* dst, int64_t stride) {
  constexpr uint32_t kWarps = kThreads / 32, es = OUT == KVC_DTYPE_FP32 ? 4u : 2u;
  const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32, n = lane / 4;
  const uint32_t T = L.num_tokens, D = L.head_dim, pairs = L.pairs_per_lane;
  const uint32_t raw_dtype = L.raw_dtype;  // held, not reread per element
  const bool aligned = reinterpret_cast<uintptr_t>(src) % 4 == 0;
  const bool fast = aligned && finite_steps;
  const uint32_t pitch = D * es + kDecodeStagePad, chunk = stage_tokens(T, D, es);
  // A chunk holds K: every tile, chunk / 8 of its n-blocks; V: chunk / 16 tiles, every n-block.
  // The lane's pairs of a tile in the chunk: from 2 * (first n-block), 2 * (n-blocks) of them.
  const uint32_t chunk_tiles = kValue ? chunk / 16 : L.num_tiles;
  const uint32_t chunk_nblocks = kValue ? L.nblocks : chunk / 8;
  // Warps per tile and their stride over the chunk's tiles, powers of two (as shifts).
  const uint32_t log_warps_per_tile =
      chunk_tiles >= kWarps ? 0u : tl::log2_pow2(kWarps) - tl::log2_pow2(chunk_tiles);
  const uint32_t warps_per_tile = 1u << log_warps_per_tile,
                 warp_in_tile = warp & (warps_per_tile - 1);
  // The stage's step from one n-block to the next: K 8 rows, V 8 columns.
  const uint32_t nblock_bytes = kValue ? 8 * es : 8 * pitch;
  // Row-wise copy-out: 16 bytes at a time where the output's rows allow, else by element.
  const bool wide = reinterpret_cast<uintptr_t>(dst) % 16 == 0 && (uint64_t(stride) * es) % 16 == 0;
  const uint32_t log_row_units = tl::log2_pow2(wide ? D * es / 16 : D);
  uint8_t* const out = static_cast<uint8_t*>(dst);

  for (uint32_t t0 = 0; t0 < T; t0 += chunk) {
    const uint32_t first_nblock = kValue ? 0u : t0 / 8;
    for (uint32_t ct = warp >> log_warps_per_tile; ct < chunk_tiles;
         ct += kWarps >> log_warps_per_tile) {
      const uint32_t tile = kValue ? t0 / 16 + ct : ct;
      const uint32_t w = tb.width[tile];
      const uint8_t* at = src + tb.tile_at[tile];
      const bool raw = w == tl::kWRaw;
      const uint32_t bits0 = raw ? tl::element_bits(w, raw_dtype) : tl::plane_bits(w, 0);
      const uint32_t bits1 = raw ? 0u : tl::plane_bits(w, 1);
      const tl::PlaneGeometry g0 = tl::plane_geometry(bits0, pairs);
      const tl::PlaneGeometry g1 = tl::plane_geometry(bits1, pairs);
      const uint8_t* plane1 = at + tl::plane1_offset(w, L.nblocks);
      LaneRows rows;
#pragma unroll
      for (uint32_t i = 0; i < 4; ++i) {
        const uint32_t group = 16 * tile + 2 * (lane % 4) + 8 * (i / 2) + i % 2;
        rows.step[i] = raw ? 0.0f : tb.step[group];
        rows.center[i] = raw ? 0u : tb.center[group];
        // K: the row of the lane's token in the chunk's first n-block, the group's channel;
        // V: the group's (token's) row, the lane's channel in n-block 0.
        rows.at[i] = stage + (kValue ? (group - t0) * pitch + n * es
                                     : n * pitch + tb.channel_at[group] * es);
      }
      if (fast && !raw) {
        // Runs of as many pairs as a plane-0 word holds (width 0: 8), or all of a lane's pairs
        // where lanes share a word; a warp's runs are spread over the warps sharing the tile.
        tl::with_coded_width(w, [&](auto width) {
          constexpr uint32_t kBits0 = tl::plane_bits(decltype(width)::value, 0);
          constexpr bool kSplit = tl::plane_bits(decltype(width)::value, 1) != 0;
          constexpr uint32_t kSlots = run_slots(kBits0);
          const uint32_t run_pairs = kSlots < pairs ? kSlots : pairs;
          const uint32_t runs = (2 * chunk_nblocks) >> tl::log2_pow2(run_pairs);
          for (uint32_t run = warp_in_tile; run < runs; run += warps_per_tile) {
            const uint32_t p = 2 * first_nblock + run * run_pairs;
            const tl::PairLocation l0 = tl::locate_pair(g0, lane, p);
            const tl::PairLocation l1 = tl::locate_pair(g1, lane, p);
            const uint32_t w0 = bits0 == 0 ? 0u : load_word(at, l0.word) >> l0.shift;
            const uint32_t w1 = bits1 == 0 ? 0u : load_word(plane1, l1.word) >> l1.shift;
            LaneRows here = rows;
#pragma unroll
            for (uint32_t i = 0; i < 4; ++i) here.at[i] += (run * run_pairs / 2) * nblock_bytes;
            decode_run<kBits0, kSplit, OUT>(w0, w1, run_pairs, here, nblock_bytes);
          }
        });
        continue;
      }
      for (uint32_t cn = warp_in_tile; cn < chunk_nblocks; cn += warps_per_tile) {
        // n-block nb: the lane's pairs 2 nb (r = 0) and 2 nb + 1 (r = 1).
        const uint32_t p = 2 * (first_nblock + cn), offset = cn * nblock_bytes;
#pragma unroll
        for (uint32_t i = 0; i < 4; ++i) {
          const uint32_t r = i / 2, h = i % 2;
          float v;
          if (raw && bits0 == 32) {
            const tl::PairLocation loc = tl::locate_pair(g0, lane, p + r);
            const uint32_t word = h == 0 ? loc.word : tl::next_lane_word(loc.word, 32, pairs);
            v = f::bits_float(tile_word(at + 4 * word, aligned));
          } else if (raw) {
            const tl::PairLocation loc = tl::locate_pair(g0, lane, p + r);
            const uint16_t x = uint16_t(tile_word(at + 4 * loc.word, aligned) >> (16 * h));
            v = raw_dtype == KVC_DTYPE_BF16 ? f::bf16_to_float(x) : f::half_to_float(x);
          } else {
            auto field = [&](const uint8_t* plane, const tl::PlaneGeometry& g) {
              if (g.bits == 0) return 0u;
              const tl::PairLocation loc = tl::locate_pair(g, lane, p + r);
              return (tile_word(plane + 4 * loc.word, aligned) >> (loc.shift + 16 * h)) &
                     ((1u << g.bits) - 1u);
            };
            const uint32_t u = field(at, g0) | (field(plane1, g1) << bits0);
            v = f::dequantize(int32_t(rows.center[i] + u), rows.step[i]);
          }
          store_output<OUT>(rows.at[i] + offset, 0, v);
        }
      }
    }
    __syncthreads();
    // The chunk's rows, from the stage to the output.
    const uint32_t units = chunk << log_row_units;
    for (uint32_t i = tid; i < units; i += kThreads) {
      const uint32_t row = i >> log_row_units, col = i & ((1u << log_row_units) - 1u);
      const uint8_t* from = stage + row * pitch;
      uint8_t* to = out + (uint64_t(t0 + row) * uint64_t(stride)) * es;
      if (wide) {
        const uint4 x = load_16(from + 16 * col);
        store_16(to + 16 * col, x.x, x.y, x.z, x.w);
      } else if (es == 4) {
        reinterpret_cast<uint32_t*>(to)[col] = reinterpret_cast<const uint32_t*>(from)[col];
      } else {
        reinterpret_cast<uint16_t*>(to)[col] = reinterpret_cast<const uint16_t*>(from)[col];
      }
    }
    __syncthreads();
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
  __shared__ uint32_t channel_at[kMaxChannels];  // K: position -> channel
  __shared__ uint32_t width[kMaxTiles], tile_at[kMaxTiles];
  __shared__ uint4 stage[kDecodeStageBufferBytes / 16];

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
  bool nonfinite = false;
  if (L.quantized) {
    for (uint32_t g = tid; g < G; g += kThreads) {
      step[g] = tl::group_step(src, L, g);
      center[g] = tl::group_center(src, L, g);  // modulo 2^32, as on the CPU
      nonfinite |= !f::is_finite(step[g]);
    }
  }
  if (!is_value) {
    for (uint32_t j = tid; j < D; j += kThreads) channel_at[j] = tl::channel_of(src, L, j);
  }
  const bool finite_steps = !__syncthreads_or(nonfinite);

  const TileTables tables{step, center, channel_at, width, tile_at};
  uint8_t* const staged = reinterpret_cast<uint8_t*>(stage);
  if (is_value) {
    write_tile_elements<true, OUT>(L, src, tables, finite_steps, staged, dst, stride);
  } else {
    write_tile_elements<false, OUT>(L, src, tables, finite_steps, staged, dst, stride);
  }
}

}  // namespace kvc::kernels
