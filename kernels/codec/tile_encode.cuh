// SPDX-License-Identifier: Apache-2.0
// Tile encode kernel (format t1, docs/format.md "Tile format (t1)"): byte-identical to the CPU
// reference encoder (src/cpu/tile_codec_cpu.cpp), one thread block per KV block, batched over
// any number of blocks in one launch, enqueue only.
//
// Why a thread block per KV block (not a warp): a block is T x D = 1K to 64K elements, each one
// quantized with an IEEE division and an exact bound check, and no tile can be written before
// the whole block's widths are known; 256 threads share the codes in shared memory, and a
// decode step's batch (heads x sequences) still fills the GPU.
//
// Passes, each over shared memory after one coalesced load of the input:
//   1. load + finite check + |x| maximum (absolute mode's step);
//   2. relative mode only: each group's float range, then its step;
//   3. quantize every element, and each group's code range (centre and width class);
//   4. plan: tile widths (natural order and, for K, channels stably sorted by width class with
//      ballots), the CPU's choice between them and the all-raw block, tile offsets;
//   5. write: metadata, then every 32-bit word of the tiles, each gathered by one thread from
//      the elements the layout puts in it and stored once at its final offset (no atomics).
// Group ranges are reduced in parallel: V (a group per token) by sub-warps with shuffles; K (a
// group per channel) by a slice of tokens per thread, combined through shared memory.
#pragma once

#include "kernels/codec/device_common.cuh"
#include "kernels/common/tile_format.cuh"

namespace kvc::kernels {
namespace tl = kvc::tiles;

// What the tile kernels need of a codec's configuration (CodecParams, device-side).
struct TileShape {
  uint32_t is_value;
  uint32_t num_tokens, head_dim;
  uint32_t relative;
  float error_bound;
  uint32_t permute_channels;  // K: sort channels by width class
  uint32_t split_widths;      // 3- and 6-bit two-plane tiles allowed
  __host__ __device__ uint32_t num_groups() const { return is_value ? num_tokens : head_dim; }
  __host__ __device__ uint32_t num_tiles() const {
    return tl::num_tiles(is_value != 0, num_tokens, head_dim);
  }
};

constexpr uint32_t kMaxTiles = 64;  // 1024 tokens / 16 (V) or 256 channels / 16 (K)

// ---- Group range accumulators ----------------------------------------------------------------
// The float range of a group. Which of equal values is kept (-0 or +0) does not change the step
// or the bound (relative_group_step), so no order needs tracking (as in the v1 encoder and the
// CPU codec).
struct FloatRange {
  float lo;
  float hi;
  __device__ static FloatRange empty() {
    return {f::bits_float(0x7F800000u), f::bits_float(0xFF800000u)};
  }
  __device__ void add(float x) { merge({x, x}); }
  __device__ void merge(const FloatRange& o) {
    lo = o.lo < lo ? o.lo : lo;
    hi = hi < o.hi ? o.hi : hi;
  }
  __device__ FloatRange shfl_xor(int lane_mask) const {
    return {__shfl_xor_sync(0xFFFFFFFFu, lo, lane_mask),
            __shfl_xor_sync(0xFFFFFFFFu, hi, lane_mask)};
  }
};

// The code range of a group.
struct CodeRange {
  int32_t lo;
  int32_t hi;
  __device__ static CodeRange empty() { return {INT_MAX, INT_MIN}; }
  __device__ void add(int32_t c) {
    lo = c < lo ? c : lo;
    hi = c > hi ? c : hi;
  }
  __device__ void merge(const CodeRange& o) {
    lo = o.lo < lo ? o.lo : lo;
    hi = o.hi > hi ? o.hi : hi;
  }
  __device__ CodeRange shfl_xor(int lane_mask) const {
    const unsigned long long a = (unsigned long long)uint32_t(lo) | (unsigned long long)uint32_t(hi)
                                                                        << 32;
    const unsigned long long o = __shfl_xor_sync(0xFFFFFFFFu, a, lane_mask);
    return {int32_t(uint32_t(o)), int32_t(uint32_t(o >> 32))};
  }
};

// Scratch for combining K's per-thread partial ranges: one FloatRange per thread.
union TileReduceScratch {
  FloatRange f[kThreads];
  CodeRange c[kThreads];
};

// Reduces every group of the block: visit(acc, token, channel) for each element (every element
// exactly once, by one thread), then done(group, acc) once per group, by one thread. Ends with
// a barrier. All threads of the block must call it.
//  - V (group = token): a sub-warp of min(32, D) lanes per token, lanes along the channels,
//    a shuffle reduction (conflict-free shared reads).
//  - K (group = channel): thread (s, c) takes channel c = tid % D and tokens s, s + S, ...
//    (S = 256 / D), so a warp reads consecutive channels of a row; the S partials of a channel
//    are merged by one thread through shared memory.
template <class Acc, class Visit, class Done>
__device__ void reduce_groups(const TileShape& sh, Acc* scratch, Visit visit, Done done) {
  const uint32_t tid = threadIdx.x, T = sh.num_tokens, D = sh.head_dim;
  if (sh.is_value) {
    const uint32_t width = D < 32u ? D : 32u, per_pass = kThreads / width;
    const uint32_t lane = tid % width, row = tid / width;
    for (uint32_t base = 0; base < T; base += per_pass) {  // uniform: T % per_pass == 0
      const uint32_t t = base + row;
      Acc a = Acc::empty();
      for (uint32_t c = lane; c < D; c += width) visit(a, t, c);
      for (uint32_t m = width / 2; m > 0; m /= 2) a.merge(a.shfl_xor(int(m)));
      if (lane == 0) done(t, a);
    }
    __syncthreads();
    return;
  }
  const uint32_t slices = kThreads / D, c = tid % D, s = tid / D;
  Acc a = Acc::empty();
  for (uint32_t t = s; t < T; t += slices) visit(a, t, c);
  scratch[tid] = a;
  __syncthreads();
  if (tid < D) {
    Acc r = scratch[tid];
    for (uint32_t k = 1; k < slices; ++k) r.merge(scratch[k * D + tid]);
    done(tid, r);
  }
  __syncthreads();
}

// ---- Shared memory ---------------------------------------------------------------------------
// Dynamic: the block's values, then codes (row-major), and per group its step, bound, smallest
// code, width class and (K) the group at each sorted position.
struct TileEncodeSmem {
  int32_t* vals;    // [N]
  float* step;      // [G]
  float* bound;     // [G]
  int32_t* cmin;    // [G]
  uint32_t* cls;    // [G]
  uint32_t* order;  // [G] position -> group when the block is permuted
  static __host__ __device__ size_t bytes(uint32_t n, uint32_t g) {
    return size_t(n) * 4 + size_t(g) * 4 * 5;
  }
  __device__ static TileEncodeSmem carve(uint8_t* smem, uint32_t n, uint32_t g) {
    TileEncodeSmem s;
    s.vals = reinterpret_cast<int32_t*>(smem);
    s.step = reinterpret_cast<float*>(s.vals + n);
    s.bound = s.step + g;
    s.cmin = reinterpret_cast<int32_t*>(s.bound + g);
    s.cls = reinterpret_cast<uint32_t*>(s.cmin + g);
    s.order = s.cls + g;
    return s;
  }
};

__host__ __device__ inline size_t tile_encode_smem_bytes(uint32_t n, uint32_t g) {
  return TileEncodeSmem::bytes(n, g);
}

// Block-wide decisions, in static shared memory.
struct TileEncodeState {
  uint32_t identity, permuted_plan;
  uint32_t warp_max[kThreads / 32];
  int32_t center_lo, center_hi;
  tl::TileLayout layout;
  uint32_t widths[kMaxTiles];           // natural order, then the chosen plan's
  uint32_t sorted_widths[kMaxTiles];    // K, channels sorted by width class
  uint32_t tile_offset[kMaxTiles + 1];  // the chosen plan's, from the block start
  uint32_t class_count[kThreads / 32][8];
};

// Bytes of a block's tiles from the layout's tiles_offset on.
__device__ inline uint32_t tiles_end(const tl::TileLayout& b, const uint32_t* widths) {
  uint32_t at = b.tiles_offset;
  for (uint32_t i = 0; i < b.num_tiles; ++i) {
    at += tl::tile_bytes(tl::element_bits(widths[i], b.raw_dtype), b.nblocks);
  }
  return at;
}

__device__ inline bool all_raw(const uint32_t* widths, uint32_t n) {
  for (uint32_t i = 0; i < n; ++i) {
    if (widths[i] != tl::kWRaw) return false;
  }
  return true;
}

// ---- The tile words ---------------------------------------------------------------------------
// The lane and lane word of tile word `word` where lanes do not share words (the inverse of
// tiles::locate_pair's word): runs of U = 2^log_u words, the 32 lanes side by side in each.
__device__ inline void lane_word_of(uint32_t word, const tl::PlaneGeometry& g, uint32_t& lane,
                                    uint32_t& w) {
  const uint32_t log_run = 5u + g.log_u;  // a run: 32 lanes x U words
  lane = (word & ((1u << log_run) - 1u)) >> g.log_u;
  w = ((word >> log_run) << g.log_u) + (word & ((1u << g.log_u) - 1u));
}

// Calls f(lane, pair, shift) for each pair a plane word of at most 8 bits holds (tile word
// `word`): the inverse of tiles::locate_pair.
template <class F>
__device__ void pairs_of_word(uint32_t word, const tl::PlaneGeometry& g, F f) {
  if (g.shared) {
    const uint32_t sharing = 1u << g.log_sharing, pairs = 1u << g.log_pairs;
    for (uint32_t k = 0; k < sharing; ++k) {
      for (uint32_t p = 0; p < pairs; ++p) {
        f((word << g.log_sharing) + k, p, ((k << g.log_pairs) + p) * g.bits);
      }
    }
    return;
  }
  uint32_t lane, w;
  lane_word_of(word, g, lane, w);
  for (uint32_t s = 0; s < (1u << g.log_per_word); ++s) {
    f(lane, (w << g.log_per_word) + s, s * g.bits);
  }
}

template <kvc_dtype DT>
__device__ uint32_t input_bits(const void* src, size_t i) {
  if constexpr (DT == KVC_DTYPE_FP32) {
    return static_cast<const uint32_t*>(src)[i];
  } else {
    return static_cast<const uint16_t*>(src)[i];
  }
}

// Launch: one thread block of kThreads per KV block, tile_encode_smem_bytes(T * D, G) bytes of
// dynamic shared memory. block_bytes[i] = 0 where the input is not finite (nothing written) or
// a pointer is missing or misaligned.
template <kvc_dtype DT>
__global__ void __launch_bounds__(kThreads)
    tile_encode_kernel(TileShape sh, const void* const* src_blocks, int64_t stride,
                       void* const* dst_blocks, uint32_t* block_bytes) {
  KVC_DYNAMIC_SHARED(uint8_t, smem);
  __shared__ TileEncodeState st;
  __shared__ TileReduceScratch scratch;

  const uint32_t tid = threadIdx.x, T = sh.num_tokens, D = sh.head_dim, n = T * D;
  const uint32_t G = sh.num_groups(), NT = sh.num_tiles();
  const bool is_value = sh.is_value != 0;
  const TileEncodeSmem q = TileEncodeSmem::carve(smem, n, G);
  const void* src = src_blocks[blockIdx.x];
  uint8_t* dst = static_cast<uint8_t*>(dst_blocks[blockIdx.x]);
  if (src == nullptr || dst == nullptr || reinterpret_cast<uintptr_t>(dst) % 4 != 0) {
    if (tid == 0) block_bytes[blockIdx.x] = 0;
    return;
  }
  if (tid == 0) {
    st.center_lo = INT_MAX;  // first used after the barrier below
    st.center_hi = INT_MIN;
  }

  // 1. Load (the v1 encoder's loader: row-major, 16-byte loads where the rows allow), finite
  // check, largest magnitude. As keys, its walk is plain row-major order.
  Shape rows{};
  rows.num_tokens = T;
  rows.head_dim = D;
  uint32_t local_max = load_block<DT>(rows, src, stride, q.vals);
  const bool bad = local_max >= 0x7F800000u;  // an inf or a NaN: |x|'s bits are the largest
  for (uint32_t m = 16; m > 0; m /= 2) {
    const uint32_t o = __shfl_xor_sync(0xFFFFFFFFu, local_max, int(m));
    local_max = o > local_max ? o : local_max;
  }
  if (tid % 32 == 0) st.warp_max[tid / 32] = local_max;
  if (__syncthreads_or(bad)) {
    if (tid == 0) block_bytes[blockIdx.x] = 0;
    return;
  }
  uint32_t max_abs_bits = 0;  // of non-negative floats: their bits order as they do
  for (uint32_t w = 0; w < kThreads / 32; ++w) {
    max_abs_bits = st.warp_max[w] > max_abs_bits ? st.warp_max[w] : max_abs_bits;
  }
  const float block_step = f::step_for_bound(sh.error_bound, f::bits_float(max_abs_bits));

  // 2. Relative mode: each group's float range, then its step (rounded to bf16) and bound.
  if (sh.relative) {
    reduce_groups<FloatRange>(
        sh, scratch.f,
        [&](FloatRange& a, uint32_t t, uint32_t c) {
          a.add(f::bits_float(uint32_t(q.vals[t * D + c])));
        },
        [&](uint32_t g, const FloatRange& a) {
          const f::GroupStep gs = f::relative_group_step(sh.error_bound, a.lo, a.hi);
          q.step[g] = gs.step;
          q.bound[g] = gs.bound;
        });
  }

  // 3. Quantize; each group's code range gives its centre (smallest code) and width class.
  bool failed = false;
  reduce_groups<CodeRange>(
      sh, scratch.c,
      [&](CodeRange& a, uint32_t t, uint32_t c) {
        const uint32_t g = is_value ? t : c;
        const float step = sh.relative ? q.step[g] : block_step;
        const float bound = sh.relative ? q.bound[g] : sh.error_bound;
        int32_t code = 0;
        failed |=
            !f::quantize_element(f::bits_float(uint32_t(q.vals[t * D + c])), step, bound, code);
        q.vals[t * D + c] = code;
        a.add(code);
      },
      [&](uint32_t g, const CodeRange& a) {
        q.cmin[g] = a.lo;
        q.cls[g] =
            tl::width_code_for(f::bit_width(uint32_t(int64_t(a.hi) - a.lo)), sh.split_widths != 0);
        atomicMin(&st.center_lo, a.lo);  // shared, order-free
        atomicMax(&st.center_hi, a.lo);
      });
  const bool quantized = !__syncthreads_or(failed);

  // 4. Plan. Natural order: a tile's width is the widest class of its 16 groups.
  const bool try_sorted = quantized && !is_value && sh.permute_channels;
  if (quantized) {
    for (uint32_t i = tid; i < NT; i += kThreads) {
      uint32_t w = tl::kW0;
      for (uint32_t k = 0; k < 16; ++k) w = max(w, q.cls[16 * i + k]);
      st.widths[i] = w;
    }
  }
  if (try_sorted) {
    // K: a stable counting sort of the channels (G = D <= kThreads) by width class, so that
    // wide channels share tiles: per warp a ballot per class, then class and warp offsets.
    const uint32_t warp = tid / 32, lane = tid % 32;
    const uint32_t mine = tid < G ? q.cls[tid] : tl::kNumWidthCodes;
    uint32_t before = 0;
    for (uint32_t c = 0; c < tl::kNumWidthCodes; ++c) {
      const uint32_t ballot = __ballot_sync(0xFFFFFFFFu, mine == c);
      if (lane == 0) st.class_count[warp][c] = uint32_t(__popc(ballot));
      if (mine == c) before = uint32_t(__popc(ballot & ((1u << lane) - 1u)));
    }
    __syncthreads();
    if (tid < G) {
      for (uint32_t c = 0; c < tl::kNumWidthCodes; ++c) {
        for (uint32_t w = 0; w < kThreads / 32; ++w) {
          if (c < mine || (c == mine && w < warp)) before += st.class_count[w][c];
        }
      }
      q.order[before] = tid;
    }
    __syncthreads();
    for (uint32_t i = tid; i < NT; i += kThreads) {
      uint32_t w = tl::kW0;
      for (uint32_t k = 0; k < 16; ++k) w = max(w, q.cls[q.order[16 * i + k]]);
      st.sorted_widths[i] = w;
    }
    const bool identity = __syncthreads_and(tid >= G || q.order[tid] == tid);
    if (tid == 0) st.identity = identity;
  } else {
    __syncthreads();
  }

  if (tid == 0) {
    // The CPU's choice: the natural plan; the sorted one if strictly smaller; the all-raw block
    // unless a quantized plan is no larger.
    tl::TileLayout raw = tl::make_layout(is_value, T, D, DT, false, false, false, 0, 0, 0);
    raw.block_bytes = raw.tiles_offset + NT * tl::tile_bytes(8u * f::dtype_bytes(DT), raw.nblocks);
    tl::TileLayout best{};
    bool have = false, sorted = false;
    if (quantized) {
      const int64_t spread = int64_t(st.center_hi) - st.center_lo;
      const uint32_t center_bytes = spread < 256 ? 1u : spread < 65536 ? 2u : 4u;
      const uint32_t step_bits = sh.relative ? 0u : f::float_bits(block_step);
      if (!all_raw(st.widths, NT)) {
        best = tl::make_layout(is_value, T, D, DT, true, sh.relative != 0, false, center_bytes,
                               st.center_lo, step_bits);
        best.block_bytes = tiles_end(best, st.widths);
        have = true;
      }
      if (try_sorted && !all_raw(st.sorted_widths, NT)) {
        tl::TileLayout s = tl::make_layout(is_value, T, D, DT, true, sh.relative != 0, !st.identity,
                                           center_bytes, st.center_lo, step_bits);
        s.block_bytes = tiles_end(s, st.sorted_widths);
        if (!have || s.block_bytes < best.block_bytes) {
          best = s;
          have = sorted = true;
        }
      }
    }
    if (!have || best.block_bytes > raw.block_bytes) {
      best = raw;
      sorted = false;
    }
    st.layout = best;
    st.permuted_plan = sorted;
    uint32_t at = best.tiles_offset;
    for (uint32_t i = 0; i < NT; ++i) {
      const uint32_t w = !best.quantized ? tl::kWRaw : sorted ? st.sorted_widths[i] : st.widths[i];
      st.widths[i] = w;
      st.tile_offset[i] = at;
      at += tl::tile_bytes(tl::element_bits(w, best.raw_dtype), best.nblocks);
    }
    st.tile_offset[NT] = at;
    block_bytes[blockIdx.x] = best.block_bytes;
  }
  __syncthreads();
  const tl::TileLayout L = st.layout;
  const bool sorted = st.permuted_plan != 0;
  // The group at position j (K: channel perm[j]; V: token j).
  auto group_at = [&](uint32_t j) { return sorted ? q.order[j] : j; };

  // 5. Write. Metadata: zero words up to the tiles, then the fields.
  uint32_t* words = reinterpret_cast<uint32_t*>(dst);
  for (uint32_t w = tid; w < L.tiles_offset / 4; w += kThreads) words[w] = 0;
  __syncthreads();
  if (tid == 0) tl::write_header(L, dst);
  for (uint32_t i = tid; i < NT; i += kThreads) {
    words[L.table_offset / 4 + i] = st.tile_offset[i] | st.widths[i];
  }
  if (L.quantized) {
    for (uint32_t j = tid; j < G; j += kThreads) {
      const uint32_t g = group_at(j);
      if (L.permuted) f::store_u8(dst + L.perm_offset + j, g);
      if (L.per_group_step) {
        f::store_u16(dst + L.steps_offset + 2 * j, f::float_to_bf16_down(q.step[g]));
      }
      const uint32_t off = uint32_t(int64_t(q.cmin[g]) - L.center_base);
      uint8_t* c = dst + L.centers_offset + L.center_bytes * j;
      if (L.center_bytes == 1) f::store_u8(c, off);
      if (L.center_bytes == 2) f::store_u16(c, off);
      if (L.center_bytes == 4) f::store_u32(c, off);
    }
  }

  // Tiles: every word of [tiles_offset, block_bytes) gathered and stored by one thread.
  const uint32_t pairs = L.pairs_per_lane;
  // Element h of pair p of `lane` in tile i: its input bits (raw tiles) or code offset.
  auto raw_bits = [&](uint32_t i, uint32_t lane, uint32_t p, uint32_t h) {
    const tl::BlockCoord c = tl::tile_element(is_value, i, tl::pair_element(lane, p, h));
    const uint32_t channel = is_value ? c.position : group_at(c.position);
    return input_bits<DT>(src, size_t(c.token) * size_t(stride) + channel);
  };
  auto code_offset = [&](uint32_t i, uint32_t lane, uint32_t p, uint32_t h) {
    const tl::BlockCoord c = tl::tile_element(is_value, i, tl::pair_element(lane, p, h));
    const uint32_t g = is_value ? c.token : group_at(c.position);
    const uint32_t channel = is_value ? c.position : g;
    return uint32_t(q.vals[c.token * D + channel] - q.cmin[g]);
  };
  for (uint32_t at = L.tiles_offset + 4 * tid; at < L.block_bytes; at += 4 * kThreads) {
    uint32_t i = 0;  // the tile holding byte `at`: the last one starting at or before it
    for (uint32_t span = kMaxTiles / 2; span > 0; span /= 2) {
      if (i + span < NT && st.tile_offset[i + span] <= at) i += span;
    }
    const uint32_t wcode = st.widths[i];
    uint32_t local = at - st.tile_offset[i], word = 0;
    if (wcode == tl::kWRaw) {
      const uint32_t bits = tl::element_bits(wcode, L.raw_dtype);
      uint32_t lane, w;
      lane_word_of(local / 4, tl::plane_geometry(bits, pairs), lane, w);
      if (bits == 32) {
        word = raw_bits(i, lane, w / 2, w % 2);
      } else {
        word = raw_bits(i, lane, w, 0) | (raw_bits(i, lane, w, 1) << 16);
      }
    } else {
      const uint32_t p1 = tl::plane1_offset(wcode, L.nblocks);
      const uint32_t plane = local >= p1 ? 1u : 0u;
      const uint32_t bits = tl::plane_bits(wcode, plane);
      const uint32_t shift = plane == 0 ? 0u : tl::plane_bits(wcode, 0);
      const uint32_t mask = (1u << bits) - 1u;
      local -= plane == 0 ? 0u : p1;
      pairs_of_word(local / 4, tl::plane_geometry(bits, pairs),
                    [&](uint32_t lane, uint32_t p, uint32_t slot) {
                      const uint32_t lo = (code_offset(i, lane, p, 0) >> shift) & mask;
                      const uint32_t hi = (code_offset(i, lane, p, 1) >> shift) & mask;
                      word |= (lo << slot) | (hi << (slot + 16u));
                    });
    }
    words[at / 4] = word;
  }
}

}  // namespace kvc::kernels
