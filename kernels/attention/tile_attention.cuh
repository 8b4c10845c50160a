// SPDX-License-Identifier: Apache-2.0
// Split-KV decode attention over tile blocks (format t1, kernels/common/tile_format.cuh) on the
// tensor cores: the dense kernel's structure (attention.cuh) with B fragments converted in
// registers from fixed-width codes instead of loaded as halves.
//
// A warp owns every kWarps-th unit (one K and one V tile block of T tokens, or up to T of the
// fp16/bf16 sink and tail rows) of its split; block 0's first sink_tokens tokens are masked, their
// uncompressed copies read instead. Per unit, with the group's query heads as the 16 rows of the
// MMA:
//   K: the block's per-channel steps and its permutation fold into the query, once per block
//      (q'[h][j] = q[h][perm[j]] * step[j], in shared memory as A fragments), and its centres
//      into one score offset per head (sum_j q'[h][j] * centre[j]); each 16-channel tile is one
//      k-step whose codes a lane loads with 16-byte loads and turns into half2 with the
//      magic-number trick (OR into the mantissa of 1024 or 128, subtract): S = Q' C^T + offset.
//   V: per-token steps fold into the probabilities (p' = p * step[t], the A fragment of P V)
//      and the centres into one output offset per head (sum_t p'[t] * centre[t]); each
//      16-token tile is one k-step: O += P' C_V, offset added at the end.
// Raw tiles (codes wider than 8 bits, or a block kept verbatim) hold the cache dtype itself and
// take the unscaled query or probability. Scores, softmax state and the output stay in
// registers; nothing is written back but the partial state per warp, merged by the combine
// kernel.
#pragma once

#include "kernels/attention/attention.cuh"
#include "kernels/attention/tile_convert.cuh"
#include "kernels/common/tile_format.cuh"

namespace kvc::kernels {

// Stages. A warp stages its next unit (a K and a V block) with cp.async into one of two stages
// while it computes on the other; a unit larger than a stage is read from global memory where
// it lies. The stage size is a launch argument (a multiple of 16 bytes), chosen by the host
// (cuda::tile_stage_bytes): wide stages hold every unit of codes of at most 8 bits where the
// device's shared memory allows (kLargestCodedUnit below; one thread block per multiprocessor
// at D = 128), compact ones of kCompactStageBytes (T = 64, D = 128) hold units of up to about
// 4.5 bits per element, metadata included (3.5x and beyond), and let two thread blocks share a
// multiprocessor: twice the warps to hide latency with. Which is faster is for a GPU to say
// (bench/gpu_bench times both).
constexpr uint32_t kCompactStageBytes = 10 * 1024;

template <uint32_t D, uint32_t T>
struct TileAttentionTraits {
  static constexpr uint32_t kKSteps = D / 16;  // K tiles
  static constexpr uint32_t kVSteps = T / 16;  // V tiles
  // The group's queries channel-major, [D][kQueryPitch] floats. The query fold reads one head
  // of 32 channels 2 apart per instruction (lane l: channel 2 l, unpermuted), at most 2 to a bank
  // at a pitch of 21 (42 l mod 32 takes 16 values; at 16 or 20, 8 lanes share a bank); the
  // tail's A fragments (8 heads x 4 channel pairs) are at most 2-way too, and filling it by
  // consecutive channels is conflict-free (21 is odd).
  static constexpr uint32_t kQueryPitch = 21;
  static constexpr size_t kQueryBytes = size_t(D) * kQueryPitch * sizeof(float);
  static constexpr uint32_t kSteps = kKSteps > kVSteps ? kKSteps : kVSteps;
  static constexpr size_t kWarpBytes = size_t(kSteps) * kLanes * sizeof(uint4);  // A frags
  static constexpr size_t kTokenBytes = size_t(T) * 2 * sizeof(float);           // V step, centre
  static constexpr size_t kStages = 2;
  // The largest unit of codes of at most 8 bits: both blocks with every section at its largest
  // (a permutation, a bf16 step and a 4-byte centre per group; docs/format.md, section 17.3)
  // and 8 bits per element.
  static constexpr size_t kLargestCodedUnit = (32 + 4 * (D / 16) + D + 6 * D + 15) / 16 * 16 +
                                              (32 + 4 * (T / 16) + 6 * T + 15) / 16 * 16 +
                                              2 * size_t(T) * D;
  static constexpr size_t smem_bytes(size_t stage_bytes) {
    return kQueryBytes + size_t(kWarps) * (kWarpBytes + kTokenBytes + kStages * stage_bytes);
  }
  static_assert(T % 16 == 0 && T >= 32 && D % 16 == 0 && D >= 64, "whole k-steps and n-tiles");
};

// The header fields and section offsets of a tile block the store wrote and checked: the
// kernel trusts blocks as the store's own attention trusts them (restore validates them).
__device__ __forceinline__ tiles::TileLayout tile_layout(const uint8_t* p, uint32_t T, uint32_t D) {
  tiles::TileLayout b{};
  const uint32_t flags = p[tiles::offset::kFlags];
  b.is_value = (flags & tiles::flag::kValue) != 0;
  b.per_group_step = (flags & tiles::flag::kPerGroupStep) != 0;
  b.permuted = (flags & tiles::flag::kPermuted) != 0;
  b.quantized = (flags & tiles::flag::kQuantized) != 0;
  b.raw_dtype = (flags >> tiles::flag::kRawDtypeShift) & 3u;
  b.center_bytes = p[tiles::offset::kCenterBytes];
  b.num_tokens = T;
  b.head_dim = D;
  b.num_tiles = tiles::num_tiles(b.is_value, T, D);
  b.num_groups = tiles::num_groups(b.is_value, T, D);
  b.nblocks = tiles::num_nblocks(b.is_value, T, D);
  b.pairs_per_lane = 2u * b.nblocks;
  b.center_base = int32_t(format::load_u32(p + tiles::offset::kCenterBase));
  b.step_bits = format::load_u32(p + tiles::offset::kStep);
  tiles::place_sections(b);
  return b;
}

// Aligned reads of a block's sections (the format aligns them; the kernel reads shared or
// global memory alike through generic pointers).
__device__ __forceinline__ uint32_t tile_entry(const uint8_t* p, const tiles::TileLayout& b,
                                               uint32_t i) {
  return reinterpret_cast<const uint32_t*>(p + b.table_offset)[i];
}
__device__ __forceinline__ float tile_step(const uint8_t* p, const tiles::TileLayout& b,
                                           uint32_t g) {
  return b.per_group_step
             ? format::bf16_to_float(reinterpret_cast<const uint16_t*>(p + b.steps_offset)[g])
             : format::bits_float(b.step_bits);
}
// A centre offset (1, 2 or 4 bytes at a multiple of its size, from a 4-byte-aligned section)
// lies in one aligned word: one load, a shift and a mask, no branch on the width. The word
// ends within the section's last aligned word, so inside the block.
__device__ __forceinline__ float tile_center(const uint8_t* p, const tiles::TileLayout& b,
                                             uint32_t g) {
  const uint32_t at = b.centers_offset + g * b.center_bytes;
  const uint32_t word = *reinterpret_cast<const uint32_t*>(p + (at & ~3u));
  const uint32_t mask = b.center_bytes == 4 ? ~0u : (1u << (8 * b.center_bytes)) - 1u;
  const uint32_t off = (word >> (8 * (at & 3u))) & mask;
  return float(int32_t(uint32_t(b.center_base) + off));
}

// The steps of K positions pos and pos + 1 (pos even): a pair of bf16 steps in one aligned word,
// or the block's one step.
__device__ __forceinline__ float2 tile_step_pair(const uint8_t* p, const tiles::TileLayout& b,
                                                 uint32_t pos) {
  if (!b.per_group_step) {
    const float step = format::bits_float(b.step_bits);
    return make_float2(step, step);
  }
  const uint32_t w = *reinterpret_cast<const uint32_t*>(p + b.steps_offset + 2 * pos);
  return make_float2(format::bits_float(w << 16), format::bits_float(w & 0xFFFF0000u));
}

// The channels, steps and centres of K positions pos and pos + 1 (pos even): a pair of
// channels, of bf16 steps and of 1- or 2-byte centres lies in one aligned word of its section
// (4-byte centres: two), so a section costs one load instead of two.
struct PairMeta {
  uint32_t channel[2];
  float step[2], centre[2];
};
__device__ __forceinline__ PairMeta tile_pair_meta(const uint8_t* p, const tiles::TileLayout& b,
                                                   uint32_t pos) {
  PairMeta m;
  const uint32_t chs = b.permuted ? *reinterpret_cast<const uint16_t*>(p + b.perm_offset + pos)
                                  : pos | (pos + 1) << 8;
  m.channel[0] = chs & 0xFFu;
  m.channel[1] = chs >> 8;
  const float2 steps = tile_step_pair(p, b, pos);
  m.step[0] = steps.x;
  m.step[1] = steps.y;
  const uint32_t at = b.centers_offset + pos * b.center_bytes;
  const uint32_t mask = b.center_bytes == 4 ? ~0u : (1u << (8 * b.center_bytes)) - 1u;
  const uint32_t w0 = *reinterpret_cast<const uint32_t*>(p + (at & ~3u));
  const uint32_t w1 = b.center_bytes == 4 ? *reinterpret_cast<const uint32_t*>(p + at + 4)
                                          : w0 >> (8 * b.center_bytes);
  m.centre[0] = float(int32_t(uint32_t(b.center_base) + ((w0 >> (8 * (at & 3u))) & mask)));
  m.centre[1] = float(int32_t(uint32_t(b.center_base) + ((w1 >> (8 * (at & 3u))) & mask)));
  return m;
}

// The largest of a K block's steps at the positions a lane folds (pairs lane, lane + 32, ...;
// raw tiles included, which only overstates it): one load per pair of bf16 steps.
__device__ __forceinline__ float lane_step_max(const uint8_t* p, const tiles::TileLayout& b,
                                               uint32_t lane) {
  if (!b.per_group_step) return format::bits_float(b.step_bits);
  float m = 0.0f;
  for (uint32_t pos = 2 * lane; pos < b.head_dim; pos += 2 * kLanes) {
    const float2 steps = tile_step_pair(p, b, pos);
    m = fmaxf(m, fmaxf(steps.x, steps.y));
  }
  return m;
}

// A unit's scores and score offsets times f (a power of two: exact above fp32's normal range).
template <uint32_t NS>
__device__ __forceinline__ void scale_scores(float (&sc)[NS][4], float (&offset)[2], float f) {
#pragma unroll
  for (uint32_t n = 0; n < NS; ++n) {
#pragma unroll
    for (uint32_t i = 0; i < 4; ++i) sc[n][i] *= f;
  }
  offset[0] *= f;
  offset[1] *= f;
}

// Two integers (bits <= 8) in slot `slot` of w as the cache dtype's pair of halves, exactly:
// through the magic number (tile_convert.cuh), or for 8-bit codes in bf16, whose mantissa is
// too short, through fp32.
template <kvc_dtype DT, uint32_t BITS>
__device__ __forceinline__ uint32_t codes_to_pair(uint32_t w, uint32_t slot) {
  constexpr bool kBf16 = DT == KVC_DTYPE_BF16;
  if constexpr (tile_convert::magic_fits(BITS, kBf16)) {
    return tile_convert::pair<kBf16, BITS>(w, slot);
  } else {
    return device::pack2<kBf16>(float(tiles::pair_low(w, slot * BITS, BITS)),
                                float(tiles::pair_high(w, slot * BITS, BITS)));
  }
}

// lo and hi rounded to the cache dtype as one fragment register (returned), and set to the
// rounded values as floats: one conversion for the pair and two back (rounding each on its own,
// then packing, takes two more).
template <kvc_dtype DT>
__device__ __forceinline__ uint32_t round_pair(float& lo, float& hi) {
  constexpr bool kBf16 = DT == KVC_DTYPE_BF16;
  const uint32_t pair = device::pack2<kBf16>(lo, hi);
  const auto back = [](uint16_t h) {
    return kBf16 ? format::bf16_to_float(h) : device::half_to_float(h);
  };
  lo = back(uint16_t(pair));
  hi = back(uint16_t(pair >> 16));
  return pair;
}

// v[0..7]: a lane's shares of the sums of MMA rows 0-7 -> the warp's sum for row lane / 4, the
// row the lane's C fragments hold (equal in the four lanes of a quad). The first three exchanges
// halve the values a lane carries (over lane bits 4, 3, 2, i.e. row bits 2, 1, 0): 16 shuffles
// for the 8 rows instead of 5 per row.
__device__ __forceinline__ float row_sums(const float* v, uint32_t lane) {
  float w4[4], w2[2];
  const bool b4 = (lane & 16) != 0, b3 = (lane & 8) != 0, b2 = (lane & 4) != 0;
#pragma unroll
  for (uint32_t j = 0; j < 4; ++j) {
    w4[j] = (b4 ? v[j + 4] : v[j]) + __shfl_xor_sync(~0u, b4 ? v[j] : v[j + 4], 16);
  }
#pragma unroll
  for (uint32_t j = 0; j < 2; ++j) {
    w2[j] = (b3 ? w4[j + 2] : w4[j]) + __shfl_xor_sync(~0u, b3 ? w4[j] : w4[j + 2], 8);
  }
  float s = (b2 ? w2[1] : w2[0]) + __shfl_xor_sync(~0u, b2 ? w2[0] : w2[1], 4);
  s += __shfl_xor_sync(~0u, s, 2);
  return s + __shfl_xor_sync(~0u, s, 1);
}

// N consecutive words (N = 1, 2 or 4) at `at` in one load: the format aligns a lane's runs.
template <uint32_t N>
__device__ __forceinline__ void load_words(uint32_t (&w)[N], const uint32_t* at) {
  if constexpr (N == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(at);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (N == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(at);
    w[0] = v.x, w[1] = v.y;
  } else {
    static_assert(N == 1, "runs of 1, 2 or 4 words");
    w[0] = at[0];
  }
}

// acc[n] += A * B_n for the n-tiles of one tile of BITS-bit elements (16 = raw halves) with
// NT n-tiles (2 NT pairs per lane). A lane reads its words in runs of U = min(4, words): pair p
// = 2 n + r (register r of n-tile n's B fragment) lies where tiles::pair_location says, the
// runs' first words 16-byte (or the run's size) aligned.
template <kvc_dtype DT, uint32_t BITS, uint32_t NT>
__device__ __forceinline__ void tile_products(float (&acc)[NT][4], const uint4& a,
                                              const uint8_t* tile, uint32_t lane) {
  constexpr uint32_t kPerWord = 16 / BITS;  // pairs per word
  constexpr uint32_t kWords = 2 * NT / kPerWord;
  constexpr uint32_t kUnit = kWords < 4 ? kWords : 4;
  constexpr uint32_t kTilesPerUnit = kUnit * kPerWord / 2;
  static_assert(kWords * kPerWord == 2 * NT, "a lane's pairs fill whole words");
#pragma unroll
  for (uint32_t u = 0; u < kWords / kUnit; ++u) {
    uint32_t w[kUnit];
    load_words(w, reinterpret_cast<const uint32_t*>(tile) +
                      tiles::pair_location(lane, u * kUnit * kPerWord, BITS, 2 * NT).word);
#pragma unroll
    for (uint32_t j = 0; j < kTilesPerUnit; ++j) {
      uint32_t b[2];
#pragma unroll
      for (uint32_t r = 0; r < 2; ++r) {
        const uint32_t p = 2 * j + r;  // pair within the unit
        if constexpr (BITS == 16) {
          b[r] = w[p];
        } else {
          b[r] = codes_to_pair<DT, BITS>(w[p / kPerWord], p % kPerWord);
        }
      }
      device::mma_16816<DT == KVC_DTYPE_BF16>(acc[u * kTilesPerUnit + j], a, b[0], b[1]);
    }
  }
}

// tile_products for a two-plane tile (3 = 2 + 1 or 6 = 4 + 2 bits): plane 0 holds the low LOW
// bits of every element, plane 1 (right after it) the high bits; a pair is lo + 2^LOW * hi, merged
// from the two planes' slots in two LOP3 and one HFMA2 (tile_convert::plane_pair, exact). A run
// of the low plane's words (as in tile_products) and the high plane's words of the same pairs
// (half as many, consecutive in its runs) are loaded and used up before the next run.
template <kvc_dtype DT, uint32_t LOW, uint32_t HIGH, uint32_t NT>
__device__ __forceinline__ void plane_products(float (&acc)[NT][4], const uint4& a,
                                               const uint8_t* tile, uint32_t lane) {
  constexpr bool kBf16 = DT == KVC_DTYPE_BF16;
  constexpr uint32_t kPairs = 2 * NT, kLowPerWord = 16 / LOW, kHighPerWord = 16 / HIGH;
  constexpr uint32_t kLowWords = kPairs / kLowPerWord;
  constexpr uint32_t kLowUnit = kLowWords < 4 ? kLowWords : 4;
  constexpr uint32_t kRunPairs = kLowUnit * kLowPerWord;
  constexpr uint32_t kHighUnit = kRunPairs / kHighPerWord;
  static_assert(kLowWords * kLowPerWord == kPairs && kHighUnit * kHighPerWord == kRunPairs,
                "a lane's pairs fill whole words of both planes");
  const uint32_t* low_plane = reinterpret_cast<const uint32_t*>(tile);
  const uint32_t* high_plane = reinterpret_cast<const uint32_t*>(tile + tiles::tile_bytes(LOW, NT));
#pragma unroll
  for (uint32_t u = 0; u < kPairs / kRunPairs; ++u) {
    uint32_t lo[kLowUnit], hi[kHighUnit];
    load_words(lo, low_plane + tiles::pair_location(lane, u * kRunPairs, LOW, kPairs).word);
    load_words(hi, high_plane + tiles::pair_location(lane, u * kRunPairs, HIGH, kPairs).word);
#pragma unroll
    for (uint32_t j = 0; j < kRunPairs / 2; ++j) {
      uint32_t b[2];
#pragma unroll
      for (uint32_t r = 0; r < 2; ++r) {
        const uint32_t p = 2 * j + r;  // pair within the run
        b[r] = tile_convert::plane_pair<kBf16, LOW, HIGH>(lo[p / kLowPerWord], p % kLowPerWord,
                                                          hi[p / kHighPerWord], p % kHighPerWord);
      }
      device::mma_16816<kBf16>(acc[u * kRunPairs / 2 + j], a, b[0], b[1]);
    }
  }
}

// One tile's products by its width code; a zero-width tile adds nothing (every code is 0).
template <kvc_dtype DT, uint32_t NT>
__device__ __forceinline__ void tile_products_any(float (&acc)[NT][4], const uint4& a,
                                                  const uint8_t* tile, uint32_t wcode,
                                                  uint32_t lane) {
  switch (wcode) {
    case tiles::kW2:
      tile_products<DT, 2>(acc, a, tile, lane);
      break;
    case tiles::kW3:
      plane_products<DT, 2, 1>(acc, a, tile, lane);
      break;
    case tiles::kW4:
      tile_products<DT, 4>(acc, a, tile, lane);
      break;
    case tiles::kW6:
      plane_products<DT, 4, 2>(acc, a, tile, lane);
      break;
    case tiles::kW8:
      tile_products<DT, 8>(acc, a, tile, lane);
      break;
    case tiles::kWRaw:
      tile_products<DT, 16>(acc, a, tile, lane);
      break;
    default:
      break;
  }
}

// stage_bytes: each of a warp's two stages, a multiple of 16; dynamic shared memory
// TileAttentionTraits<D, T>::smem_bytes(stage_bytes). UPPER: a group of more than 8 query heads,
// whose heads 9-16 are rows 8-15 of the MMA; below that the kernel never touches those rows.
template <kvc_dtype DT, uint32_t D, uint32_t T, bool UPPER>
__global__ void __launch_bounds__(kWarps* kLanes)
    attention_tiles_kernel(AttentionParams P, const SequenceView* sequences, const uint8_t* pool,
                           size_t page_bytes, uint32_t stage_bytes) {
  using Tr = TileAttentionTraits<D, T>;
  constexpr bool kBf16 = DT == KVC_DTYPE_BF16;
  KVC_DYNAMIC_SHARED(uint8_t, smem);
  const uint32_t split = blockIdx.x, head = blockIdx.y, seq = blockIdx.z;
  const uint32_t warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes, quad = lane % 4;
  float* qf = reinterpret_cast<float*>(smem);  // [D][kQueryPitch]: rows past the group zero
  uint8_t* mine = smem + Tr::kQueryBytes +
                  warp * (Tr::kWarpBytes + Tr::kTokenBytes + Tr::kStages * stage_bytes);
  uint4* qfrag = reinterpret_cast<uint4*>(mine);
  float2* token_meta = reinterpret_cast<float2*>(mine + Tr::kWarpBytes);  // [T]: step, centre
  uint8_t* stages = mine + Tr::kWarpBytes + Tr::kTokenBytes;

  const uint32_t q_heads = P.kv_heads * P.group;
  // The A fragments start at 0. The query fold writes only the group's rows; past them a row
  // holds 0 or the last probability fold's finite values, and nothing reads its products.
  for (uint32_t ks = 0; ks < Tr::kSteps; ++ks) qfrag[ks * kLanes + lane] = make_uint4(0, 0, 0, 0);
  for (uint32_t i = threadIdx.x; i < 16 * D; i += blockDim.x) {
    const uint32_t row = i / D, c = i % D;
    qf[c * Tr::kQueryPitch + row] =
        row < P.group
            ? load_elem<DT>(P.queries, (size_t(seq) * q_heads + head * P.group + row) * D + c)
            : 0.0f;
  }
  __syncthreads();
  // fp16: the group's largest finite |q|, which bounds each K fold's products with the block's
  // largest step (tile_convert::fold_shift); an inf or NaN in one head's query spoils that
  // head's row only, not the others' scaling. Kept in the warp's own word of the queries'
  // padding (row 16 of channel `warp`), not in a register across the loop.
  if constexpr (!kBf16) {
    float q_max = 0.0f;
    for (uint32_t c = lane; c < D; c += kLanes) {
      for (uint32_t row = 0; row < P.group; ++row) {
        const float a = fabsf(qf[c * Tr::kQueryPitch + row]);
        if (a <= FLT_MAX) q_max = fmaxf(q_max, a);
      }
    }
    q_max = warp_max(q_max);
    if (lane == 0) qf[warp * Tr::kQueryPitch + 16] = q_max;
    __syncwarp();
  }

  // Read where used (L1 hits), not held: at D = 256 every register counts.
  const SequenceView& sv = sequences[seq];
  const uint32_t units = attention_units(sv, T);
  const UnitRange range = split_units(units, split, gridDim.x);
  const uint32_t end = range.end;
  const float scale = P.scale * kLog2e;
  constexpr uint32_t kRows = UPPER ? 16 : 8;  // MMA rows that can hold a query head

  MmaSoftmax<D> st;  // its bias: the sum of p' * centre

  // Where unit u's K and V blocks lie in the pool (16-byte aligned, as the store places them),
  // and whether they fit one stage together.
  auto block_of = [&](uint32_t u, uint32_t kind) {
    const BlockLocation loc = sv.blocks[(size_t(u) * P.kv_heads + head) * 2 + kind];
    return pool + size_t(loc.page) * page_bytes + loc.offset;
  };
  auto stageable = [&](uint32_t u) {
    if (u >= sv.num_blocks) return false;
    const BlockLocation* loc = &sv.blocks[(size_t(u) * P.kv_heads + head) * 2];
    return size_t(loc[0].bytes) + loc[1].bytes <= stage_bytes;
  };
  // [sass stage] cp.async of unit u's K then V block into stage s (a group, committed even when
  // empty so that the wait counts stay uniform).
  auto stage_unit = [&](uint32_t u, uint32_t s) {
    if (stageable(u)) {
      const BlockLocation* loc = &sv.blocks[(size_t(u) * P.kv_heads + head) * 2];
      uint8_t* dst = stages + s * stage_bytes;
      for (uint32_t kind = 0; kind < 2; ++kind) {
        const uint8_t* src = block_of(u, kind);
        for (uint32_t c = lane; c < loc[kind].bytes / 16; c += kLanes) {
          device::cp_async_16(dst + 16 * c, src + 16 * c, true);
        }
        dst += loc[0].bytes;
      }
    }
    device::cp_async_commit();
  };

  uint32_t u = range.begin + warp;
  if (u < end) stage_unit(u, 0);
  for (uint32_t s = 0; u < end; u += kWarps, s ^= 1) {
    if (u + kWarps < end) {
      stage_unit(u + kWarps, s ^ 1);
      device::cp_async_wait<1>();
    } else {
      device::cp_async_wait<0>();
    }
    __syncwarp();
    float sc[T / 8][4] = {};
    float s_off[2] = {0.0f, 0.0f};  // sum of q' * centre for the lane's rows
    uint32_t valid = T;
    const uint8_t* vb = nullptr;
    tiles::TileLayout vl{};
    if (u < sv.num_blocks) {
      const uint8_t* kb = block_of(u, 0);
      vb = block_of(u, 1);
      if (stageable(u)) {
        const uint32_t k_bytes = sv.blocks[(size_t(u) * P.kv_heads + head) * 2].bytes;
        kb = stages + s * stage_bytes;
        vb = kb + k_bytes;
      }
      const tiles::TileLayout kl = tile_layout(kb, T, D);
      vl = tile_layout(vb, T, D);

      // [sass Kprep] q' = q * step as A fragments of the warp's own (qfrag), and the score
      // offsets sum q' * centre per head. The warp shares the work: a lane takes pairs of
      // positions (2 pp, 2 pp + 1), reads their channels, steps and centres once, and for every
      // head of the group stores the pair's two elements as the register of the A fragment that
      // holds them (row, columns c and c + 1 of k-step ks: lane 4 (row % 8) + (c % 8) / 2,
      // register 2 (c / 8) + row / 8). Rows past the group keep what they hold (0, or the last
      // probability fold's P'): their products are never read.
      // fp16: q_max times the block's largest step bounds every product q * step; where that
      // reaches fp16's limit, every step is taken times 2^-e and the scores (products and
      // offsets alike) are scaled back by 2^e after the products: powers of two, exact above
      // fp32's normal range. Rare: |q| x step of 65504 or more.
      int32_t k_shift = 0;
      if constexpr (!kBf16) {
        const float q_max = qf[warp * Tr::kQueryPitch + 16];
        const float bound = q_max * lane_step_max(kb, kl, lane);
        if (__ballot_sync(~0u, bound >= tile_convert::kFp16FoldLimit) != 0) {
          k_shift = tile_convert::fold_shift(warp_max(bound));
        }
      }
      {
        const float factor = tile_convert::pow2(-k_shift);
        uint32_t* frag = reinterpret_cast<uint32_t*>(qfrag);
        float part[kRows] = {};  // this lane's share of sum q' * centre, per head
        for (uint32_t pp = lane; pp < D / 2; pp += kLanes) {
          const uint32_t pos = 2 * pp, ks = pos / 16, c = pos % 16;
          const bool coded =
              kl.quantized && tiles::entry_width(tile_entry(kb, kl, ks)) != tiles::kWRaw;
          const PairMeta m = tile_pair_meta(kb, kl, pos);
          const uint32_t ch0 = m.channel[0], ch1 = m.channel[1];
          const float step0 = (coded ? m.step[0] : 1.0f) * factor;
          const float step1 = (coded ? m.step[1] : 1.0f) * factor;
          const float centre0 = coded ? m.centre[0] : 0.0f, centre1 = coded ? m.centre[1] : 0.0f;
          uint32_t* at = frag + (ks * kLanes + (c % 8) / 2) * 4 + 2 * (c / 8);
#pragma unroll
          for (uint32_t row = 0; row < kRows; ++row) {
            if (row >= P.group) break;
            float a = qf[ch0 * Tr::kQueryPitch + row] * step0;
            float b = qf[ch1 * Tr::kQueryPitch + row] * step1;
            at[16 * (row % 8) + row / 8] = round_pair<DT>(a, b);
            part[row] = fmaf(b, centre1, fmaf(a, centre0, part[row]));
          }
        }
        // The lane's rows' sums (rows lane / 4 and lane / 4 + 8); rows past the group sum zeros.
        s_off[0] = row_sums(part, lane);
        if constexpr (UPPER) s_off[1] = row_sums(part + 8, lane);
      }
      __syncwarp();  // the fragments hold other lanes' stores

      // [sass K] S = Q' C^T, one k-step per 16-channel tile.
      for (uint32_t ks = 0; ks < Tr::kKSteps; ++ks) {
        const uint32_t entry = tile_entry(kb, kl, ks);
        tile_products_any<DT>(sc, qfrag[ks * kLanes + lane], kb + tiles::entry_offset(entry),
                              tiles::entry_width(entry), lane);
      }
      if constexpr (!kBf16) {
        if (k_shift != 0) scale_scores(sc, s_off, tile_convert::pow2(k_shift));
      }
    } else {
      // [sass tail] Up to T fp16/bf16 rows of the sinks and tail [tokens, kv_heads, D] from row
      // r0: B fragments loaded straight from global memory (one or two units per sequence).
      const uint32_t r0 = (u - sv.num_blocks) * T;
      valid = min(T, dense_tokens(sv) - r0);
      const size_t stride = size_t(P.kv_heads) * D;
      const uint16_t* keys =
          static_cast<const uint16_t*>(sv.dense_keys) + r0 * stride + size_t(head) * D;
      for (uint32_t ks = 0; ks < Tr::kKSteps; ++ks) {
        float q[8];
#pragma unroll
        for (uint32_t i = 0; i < 8; ++i) {
          const mma::Coord c = mma::a_coord(lane, i);
          q[i] = qf[(16 * ks + c.col) * Tr::kQueryPitch + c.row];
        }
        const uint4 a =
            make_uint4(device::pack2<kBf16>(q[0], q[1]), device::pack2<kBf16>(q[2], q[3]),
                       device::pack2<kBf16>(q[4], q[5]), device::pack2<kBf16>(q[6], q[7]));
#pragma unroll
        for (uint32_t n = 0; n < T / 8; ++n) {
          const uint32_t token = 8 * n + lane / 4;
          const uint32_t* row =
              reinterpret_cast<const uint32_t*>(keys + token * stride + 16 * ks + 2 * quad);
          const uint32_t b0 = token < valid ? row[0] : 0u, b1 = token < valid ? row[4] : 0u;
          device::mma_16816<kBf16>(sc[n], a, b0, b1);
        }
      }
    }

    // [sass softmax] Online softmax, base 2, over this unit's scores plus the block's offsets.
    // Block 0 skips its first sink_tokens tokens, read as uncompressed rows (a sequence without
    // blocks has no sinks: unit 0 is then uncompressed rows, sink_tokens 0).
    st.absorb(sc, s_off, scale, u == 0 ? sv.sink_tokens : 0u, valid, quad, UPPER);

    if (vb != nullptr) {
      // [sass Vprep] P' = P * step[t] for coded tiles as A fragments (n-tiles 2 kk, 2 kk + 1
      // of S are k-step kk), and the output offsets sum p' * centre. Each token's step and
      // centre are read once by the warp (raw tiles: 1 and 0), not by the 8 lanes that hold it.
      float step_max = 0.0f;
      for (uint32_t t = lane; t < T; t += kLanes) {
        const bool coded =
            vl.quantized && tiles::entry_width(tile_entry(vb, vl, t / 16)) != tiles::kWRaw;
        const float2 m = coded ? make_float2(tile_step(vb, vl, t), tile_center(vb, vl, t))
                               : make_float2(1.0f, 0.0f);
        token_meta[t] = m;
        step_max = fmaxf(step_max, m.x);
      }
      // fp16: p <= 1, so a step of 65504 or more may put p' past fp16's range. Rare; the unit's
      // steps are then scaled by 2^-e and the output state with them, and the state is scaled
      // back after the unit's products (powers of two: exact above fp32's normal range).
      int32_t v_shift = 0;
      if constexpr (!kBf16) {
        if (__ballot_sync(~0u, step_max >= tile_convert::kFp16FoldLimit) != 0) {
          v_shift = tile_convert::fold_shift(warp_max(step_max));
          for (uint32_t t = lane; t < T; t += kLanes) {
            token_meta[t].x *= tile_convert::pow2(-v_shift);
          }
          st.scale_output(tile_convert::pow2(-v_shift));
        }
      }
      __syncwarp();
#pragma unroll
      for (uint32_t kk = 0; kk < Tr::kVSteps; ++kk) {
        float step[4], centre[4];
#pragma unroll
        for (uint32_t e = 0; e < 4; ++e) {  // token 16 kk + 2 quad + e % 2 + 8 (e / 2)
          const float2 m = token_meta[16 * kk + 2 * quad + e % 2 + 8 * (e / 2)];
          step[e] = m.x;
          centre[e] = m.y;
        }
        uint32_t a[4] = {};  // register 2 (e / 2) + r: tokens e, e + 1 of row r's pair
#pragma unroll
        for (uint32_t r = 0; r < 2; ++r) {
          if (r == 1 && !UPPER) break;
#pragma unroll
          for (uint32_t e = 0; e < 4; e += 2) {
            const uint32_t i = 4 * (e / 2) + 2 * r;
            float lo = sc[2 * kk + i / 4][i % 4] * step[e];
            float hi = sc[2 * kk + i / 4][i % 4 + 1] * step[e + 1];
            a[2 * (e / 2) + r] = round_pair<DT>(lo, hi);
            st.bias[r] = fmaf(hi, centre[e + 1], fmaf(lo, centre[e], st.bias[r]));
          }
        }
        qfrag[kk * kLanes + lane] = make_uint4(a[0], a[1], a[2], a[3]);
      }
      // [sass V] O += P' C_V, one k-step per 16-token tile.
      for (uint32_t kk = 0; kk < Tr::kVSteps; ++kk) {
        const uint32_t entry = tile_entry(vb, vl, kk);
        tile_products_any<DT>(st.o, qfrag[kk * kLanes + lane], vb + tiles::entry_offset(entry),
                              tiles::entry_width(entry), lane);
      }
      if constexpr (!kBf16) {
        if (v_shift != 0) st.scale_output(tile_convert::pow2(v_shift));
      }
    } else {
      // [sass tail] P V over those rows, B fragments from global memory, tokens past them zero.
      const size_t stride = size_t(P.kv_heads) * D;
      const uint16_t* values = static_cast<const uint16_t*>(sv.dense_values) +
                               (u - sv.num_blocks) * T * stride + size_t(head) * D;
#pragma unroll
      for (uint32_t kk = 0; kk < Tr::kVSteps; ++kk) {
        const uint4 a = make_uint4(device::pack2<kBf16>(sc[2 * kk][0], sc[2 * kk][1]),
                                   device::pack2<kBf16>(sc[2 * kk][2], sc[2 * kk][3]),
                                   device::pack2<kBf16>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                   device::pack2<kBf16>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]));
        const uint32_t t0 = 16 * kk + 2 * quad;
#pragma unroll
        for (uint32_t n = 0; n < D / 8; ++n) {
          const uint32_t c = 8 * n + lane / 4;
          uint32_t b[2];
#pragma unroll
          for (uint32_t r = 0; r < 2; ++r) {
            const uint32_t t = t0 + 8 * r;
            const uint32_t lo = t < valid ? values[t * stride + c] : 0u;
            const uint32_t hi = t + 1 < valid ? values[(t + 1) * stride + c] : 0u;
            b[r] = lo | hi << 16;
          }
          device::mma_16816<kBf16>(st.o[n], a, b[0], b[1]);
        }
      }
    }
    __syncwarp();  // every lane is done with stage s before it is refilled
    // [sass other]
  }

  st.write(P, seq, head, split * kWarps + warp, lane);
}

}  // namespace kvc::kernels
