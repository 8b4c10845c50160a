// SPDX-License-Identifier: Apache-2.0
// Split-KV decode attention (flash-decoding) over compressed or dense K/V. The compressed kernel
// below is the scalar reading of format v1 blocks; the dense kernel (further down) is the
// tensor-core structure.
//
// Grid: (split, kv-head, sequence); kWarps warps per thread block, each warp an independent
// partial softmax over every kWarps-th unit (a T-token block, or up to T of the uncompressed
// sink and tail rows: attention_units) of its split, written to the workspace; a combine kernel
// merges the partials per query head. Block 0's first sink_tokens tokens are skipped: their
// uncompressed copies (the sinks) are read instead.
//
// Inside a warp of the compressed kernel, lane s owns the tokens of K sub-stream s (tokens [s*TK,
// (s+1)*TK) of a block) and the channels of V sub-stream s, so a block is decoded with no exchange
// between lanes: each lane computes whole q.k dot products for its tokens, and accumulates p*v for
// its channels over all tokens. All query heads of the group share each decoded element.
#pragma once

#include <cfloat>
#include <type_traits>

#include "kernels/codec/device_common.cuh"
#include "kernels/common/mma.cuh"
#include "kernels/common/sequence_view.cuh"

namespace kvc::kernels {

constexpr uint32_t kWarps = 4;
constexpr uint32_t kLanes = 32;
constexpr uint32_t kMaxTokensPerLane = 4;      // T <= 128
constexpr float kLog2e = 1.4426950408889634f;  // scores in base 2: exp2 is one MUFU

struct AttentionParams {
  uint32_t kv_heads, group, block_tokens, num_parts;
  float scale;
  const void* queries;  // [B, kv_heads * group, D]
  float* part_acc;      // [B, kv_heads * group, num_parts, D]
  float* part_ml;       // [B, kv_heads * group, num_parts, 2]: running max and sum
};

// Whether a GQA group of `group` query heads reaches rows 8-15 of the MMA (the A operand's 16
// rows are the group's heads): the kernels' UPPER variant. Rows past the group may hold any
// finite values; MMA rows are independent and nothing reads their products.
constexpr bool upper_rows(uint32_t group) { return group > 8; }

// The units split `split` of `splits` covers: an equal share of this sequence's own units, not
// of the longest one's, so that a short sequence of a batch (or of a store planned for its
// capacity, as graph capture needs) still spreads over every split.
struct UnitRange {
  uint32_t begin, end;
};
__device__ __forceinline__ UnitRange split_units(uint32_t units, uint32_t split, uint32_t splits) {
  const uint32_t per = (units + splits - 1) / splits;
  const uint32_t begin = min(units, split * per);
  return {begin, min(units, begin + per)};
}

// The warp's largest x, in every lane.
__device__ __forceinline__ float warp_max(float x) {
  for (uint32_t off = 16; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(~0u, x, off));
  return x;
}

// ---- Element access -------------------------------------------------------------------------

// An fp16/bf16 element as a float, with the hardware's conversion (attention does not carry
// NaN payloads, which is all the format's portable conversion would add).
template <kvc_dtype DT>
__device__ __forceinline__ float load_elem(const void* base, size_t i) {
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  return DT == KVC_DTYPE_BF16 ? f::bf16_to_float(h) : device::half_to_float(h);
}

// The channel that V sub-stream `lane` holds in its k-th slot (slots: D / 32 per lane).
__device__ __forceinline__ uint32_t v_channel(uint32_t lane, uint32_t k, uint32_t group_size) {
  const uint32_t per = group_size / kLanes;  // positions of a group per sub-stream
  return (k / per) * group_size + lane * per + k % per;
}

// ---- One warp's online softmax ---------------------------------------------------------------
// Everything indexed by token, channel or query head lives in the warp's shared memory: indices
// that depend on the data (or on the runtime group) would otherwise put register arrays into
// local memory. Each lane touches only its own tokens and channels.

template <uint32_t GMAX>
struct WarpState {
  float* p;    // [T, GMAX]: a unit's scores, then its probabilities
  float* acc;  // [D, GMAX]: sum of p * v
  float* m;    // [GMAX]: running max
  float* l;    // [GMAX]: running sum

  static __host__ __device__ size_t floats(uint32_t tokens, uint32_t head_dim) {
    return size_t(tokens + head_dim + 2) * GMAX;
  }
  __device__ static WarpState carve(float* base, uint32_t tokens, uint32_t head_dim) {
    return {base, base + tokens * GMAX, base + (tokens + head_dim) * GMAX,
            base + (tokens + head_dim + 1) * GMAX};
  }

  __device__ void init(uint32_t head_dim) {
    const uint32_t lane = threadIdx.x % kLanes;
    for (uint32_t i = lane; i < head_dim * GMAX; i += kLanes) acc[i] = 0.0f;
    if (lane < GMAX) {
      m[lane] = -FLT_MAX;
      l[lane] = 0.0f;
    }
    __syncwarp();
  }

  // Zeroes the score slots of this lane's tokens [lane * tpl, (lane + 1) * tpl) below `valid`.
  __device__ void clear_scores(uint32_t tpl, uint32_t valid, uint32_t group) {
    const uint32_t lane = threadIdx.x % kLanes;
    for (uint32_t t = lane * tpl; t < (lane + 1) * tpl && t < valid; ++t) {
      for (uint32_t g = 0; g < group; ++g) p[t * GMAX + g] = 0.0f;
    }
  }

  // Folds in a unit's scores (tokens in [skip, valid)): new max, rescaled sums, and p turned
  // into probabilities for the V pass (0 below skip). Lanes rescale the accumulators of their
  // own channels. A unit has a token in range (skip < T only skips sinks, fewer than T).
  __device__ void absorb(uint32_t tpl, uint32_t skip, uint32_t valid, uint32_t group,
                         uint32_t head_dim, uint32_t group_size) {
    const uint32_t lane = threadIdx.x % kLanes;
    const uint32_t last = min((lane + 1) * tpl, valid);
    for (uint32_t t = lane * tpl; t < min(skip, last); ++t) {
      for (uint32_t g = 0; g < group; ++g) p[t * GMAX + g] = 0.0f;
    }
    const uint32_t first = max(lane * tpl, skip);
    __syncwarp();
    for (uint32_t g = 0; g < group; ++g) {
      float top = -FLT_MAX;
      for (uint32_t t = first; t < last; ++t) top = fmaxf(top, p[t * GMAX + g]);
      top = warp_max(top);
      const float m_old = m[g];
      const float m_new = fmaxf(m_old, top);
      const float alpha = __expf(m_old - m_new);
      float sum = 0.0f;
      for (uint32_t t = first; t < last; ++t) {
        const float e = __expf(p[t * GMAX + g] - m_new);
        p[t * GMAX + g] = e;
        sum += e;
      }
      for (uint32_t off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(~0u, sum, off);
      for (uint32_t k = 0; k < head_dim / kLanes; ++k) {
        acc[v_channel(lane, k, group_size) * GMAX + g] *= alpha;
      }
      __syncwarp();  // every lane has read m[g]
      if (lane == 0) {
        m[g] = m_new;
        l[g] = l[g] * alpha + sum;
      }
    }
    __syncwarp();
  }

  __device__ void write(const AttentionParams& P, uint32_t seq, uint32_t head, uint32_t part,
                        uint32_t head_dim) const {
    const uint32_t lane = threadIdx.x % kLanes;
    const uint32_t q_heads = P.kv_heads * P.group;
    __syncwarp();
    for (uint32_t g = 0; g < P.group; ++g) {
      const size_t row = (size_t(seq) * q_heads + head * P.group + g) * P.num_parts + part;
      for (uint32_t c = lane; c < head_dim; c += kLanes) {
        P.part_acc[row * head_dim + c] = acc[c * GMAX + g];
      }
      if (lane == 0) {
        P.part_ml[row * 2] = m[g];
        P.part_ml[row * 2 + 1] = l[g];
      }
    }
  }
};

// Queries of one kv-head's group, scaled, as floats in shared memory: q[c * GMAX + g].
template <kvc_dtype DT, uint32_t D, uint32_t GMAX>
__device__ void load_queries(const AttentionParams& P, uint32_t seq, uint32_t head, float* q) {
  const uint32_t q_heads = P.kv_heads * P.group;
  for (uint32_t i = threadIdx.x; i < D * P.group; i += blockDim.x) {
    const uint32_t g = i / D, c = i % D;
    q[c * GMAX + g] =
        P.scale * load_elem<DT>(P.queries, (size_t(seq) * q_heads + head * P.group + g) * D + c);
  }
  __syncthreads();
}

// ---- Compressed source ------------------------------------------------------------------------

// One compressed block's decoding state: its layout and per-group steps and centres, read into
// this warp's shared memory.
struct BlockParams {
  f::BlockLayout layout;
  const uint8_t* base;
};

__device__ inline void load_block_params(const uint8_t* base, uint32_t bytes, BlockParams& bp,
                                         float* step, uint32_t* center) {
  const uint32_t lane = threadIdx.x % kLanes;
  f::parse_block(base, bytes, bp.layout);  // every lane: the layout lives in registers
  bp.base = base;
  const f::BlockLayout& L = bp.layout;
  if (L.encoding != f::kRaw) {
    const uint32_t centers_bytes = L.stream_ends_offset - L.centers_offset;
    for (uint32_t g = lane; g < L.num_groups; g += kLanes) {
      step[g] = L.per_group_step ? f::bf16_to_float(f::load_u16(base + L.steps_offset + 2 * g))
                                 : f::bits_float(f::load_u32(base + L.steps_offset));
      center[g] = uint32_t(L.center_base) + read_bits(base + L.centers_offset, centers_bytes,
                                                      uint64_t(g) * L.center_bits, L.center_bits);
    }
  }
  __syncwarp();
}

// Decodes this lane's elements of a block in stream order, calling visit(group, position, x).
// Huffman: the lane's sub-stream front to back; fixed width: the same elements by offset; raw:
// the values themselves.
template <class Visit>
__device__ void decode_lane_elements(const BlockParams& bp, const BookView& book, const float* step,
                                     const uint32_t* center, Visit visit) {
  const f::BlockLayout& L = bp.layout;
  const uint32_t lane = threadIdx.x % kLanes;
  const uint32_t per = L.group_size / kLanes;
  const uint8_t* payload = bp.base + L.payload_offset;
  if (L.encoding == f::kHuffman) {
    const uint32_t start =
        lane == 0 ? 0u : f::load_u16(bp.base + L.stream_ends_offset + 2 * (lane - 1));
    const uint32_t end = f::load_u16(bp.base + L.stream_ends_offset + 2 * lane);
    f::BitReader in(payload + start, end - start);
    for (uint32_t e = lane * per; e < (lane + 1) * per; ++e) {
      for (uint32_t g = 0; g < L.num_groups; ++g) {
        const uint32_t entry = __ldg(&book.table[in.peek(book.max_code_length)]);
        in.skip(entry & 0xFFu);
        uint32_t symbol = uint32_t(book.first_symbol) + (entry >> 8);
        if ((entry >> 8) == book.num_symbols) {
          symbol = uint32_t(f::sign_extend(in.read(L.code_bits), L.code_bits));
        }
        visit(g, e, f::dequantize(int32_t(center[g] + symbol), step[g]));
      }
    }
  } else if (L.encoding == f::kFixed) {
    for (uint32_t e = lane * per; e < (lane + 1) * per; ++e) {
      for (uint32_t g = 0; g < L.num_groups; ++g) {
        const uint64_t j = uint64_t(e) * L.num_groups + g;
        const uint32_t u = read_bits(payload, L.payload_bytes, j * L.code_bits, L.code_bits);
        visit(g, e, f::dequantize(int32_t(center[g] + u), step[g]));
      }
    }
  } else {
    const uint32_t es = f::dtype_bytes(L.raw_dtype);
    for (uint32_t e = lane * per; e < (lane + 1) * per; ++e) {
      for (uint32_t g = 0; g < L.num_groups; ++g) {
        const f::Coord xy = f::element_coord(L.is_value, L.head_dim, L.group_size, g, e);
        const uint8_t* at = payload + (size_t(xy.token) * L.head_dim + xy.channel) * es;
        const float v = L.raw_dtype == KVC_DTYPE_FP32   ? f::bits_float(f::load_u32(at))
                        : L.raw_dtype == KVC_DTYPE_BF16 ? f::bf16_to_float(f::load_u16(at))
                                                        : f::half_to_float(f::load_u16(at));
        visit(g, e, v);
      }
    }
  }
}

template <kvc_dtype DT, uint32_t D, uint32_t GMAX>
__global__ void __launch_bounds__(kWarps* kLanes)
    attention_compressed_kernel(AttentionParams P, const SequenceView* sequences,
                                const uint8_t* pool, size_t page_bytes, BookView key_book,
                                BookView value_book, uint32_t value_group_size,
                                uint32_t max_groups) {
  KVC_DYNAMIC_SHARED(uint8_t, smem);
  const uint32_t split = blockIdx.x, head = blockIdx.y, seq = blockIdx.z;
  const uint32_t warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const uint32_t T = P.block_tokens, tpl = T / kLanes, group = P.group;
  const size_t per_warp = WarpState<GMAX>::floats(T, D) + 2 * max_groups;
  float* q = reinterpret_cast<float*>(smem);  // [D, GMAX]
  float* mine = q + D * GMAX + warp * per_warp;
  WarpState<GMAX> st = WarpState<GMAX>::carve(mine, T, D);
  float* step = mine + WarpState<GMAX>::floats(T, D);  // [max_groups]
  uint32_t* center = reinterpret_cast<uint32_t*>(step + max_groups);

  load_queries<DT, D, GMAX>(P, seq, head, q);
  const SequenceView sv = sequences[seq];
  const uint32_t units = attention_units(sv, T);
  st.init(D);
  const UnitRange range = split_units(units, split, gridDim.x);
  for (uint32_t u = range.begin + warp; u < range.end; u += kWarps) {
    if (u < sv.num_blocks) {
      const BlockLocation* loc = &sv.blocks[(size_t(u) * P.kv_heads + head) * 2];
      BlockParams bp;
      // K: lane owns tokens [lane * tpl, (lane + 1) * tpl); element (channel c, token t).
      load_block_params(pool + size_t(loc[0].page) * page_bytes + loc[0].offset, loc[0].bytes, bp,
                        step, center);
      st.clear_scores(tpl, T, group);
      decode_lane_elements(bp, key_book, step, center, [&](uint32_t c, uint32_t t, float x) {
        for (uint32_t g = 0; g < group; ++g) st.p[t * GMAX + g] += q[c * GMAX + g] * x;
      });
      st.absorb(tpl, u == 0 ? sv.sink_tokens : 0u, T, group, D, value_group_size);
      // V: lane owns the channels of its sub-stream; element (group = token segment, position).
      load_block_params(pool + size_t(loc[1].page) * page_bytes + loc[1].offset, loc[1].bytes, bp,
                        step, center);
      const uint32_t segments = D / value_group_size;
      decode_lane_elements(bp, value_book, step, center, [&](uint32_t g, uint32_t e, float x) {
        const uint32_t t = g / segments, c = (g % segments) * value_group_size + e;
        for (uint32_t h = 0; h < group; ++h) st.acc[c * GMAX + h] += st.p[t * GMAX + h] * x;
      });
    } else {
      // Up to T uncompressed rows (sinks, tail) from row r0; lane owns tokens lane * tpl + i.
      const uint32_t r0 = (u - sv.num_blocks) * T, n = min(T, dense_tokens(sv) - r0);
      st.clear_scores(tpl, n, group);
      for (uint32_t t = lane * tpl; t < (lane + 1) * tpl && t < n; ++t) {
        const size_t row = (size_t(r0 + t) * P.kv_heads + head) * D;
        for (uint32_t c = 0; c < D; ++c) {
          const float x = load_elem<DT>(sv.dense_keys, row + c);
          for (uint32_t g = 0; g < group; ++g) st.p[t * GMAX + g] += q[c * GMAX + g] * x;
        }
      }
      st.absorb(tpl, 0, n, group, D, value_group_size);
      for (uint32_t t = 0; t < n; ++t) {
        const size_t row = (size_t(r0 + t) * P.kv_heads + head) * D;
        for (uint32_t k = 0; k < D / kLanes; ++k) {
          const uint32_t c = v_channel(lane, k, value_group_size);
          const float x = load_elem<DT>(sv.dense_values, row + c);
          for (uint32_t h = 0; h < group; ++h) st.acc[c * GMAX + h] += st.p[t * GMAX + h] * x;
        }
      }
    }
    __syncwarp();  // the next unit reuses p, step and centre
  }
  st.write(P, seq, head, split * kWarps + warp, D);
}

// ---- Dense baseline: tensor cores -------------------------------------------------------------
// A dense cache [B, max_tokens, kv_heads, D] through the structure the tile kernel shares:
// each warp owns every kWarps-th unit of U tokens of its split, stages the unit's K and V with
// cp.async (two stages, XOR-swizzled rows), and computes, with the group's query heads as the
// 16 rows of the MMA (zero rows beyond the group),
//   S = Q K^T  (A = Q from shared memory in fragment order, B = K through ldmatrix),
//   online softmax on S's accumulator registers (base 2, a quad of lanes per row),
//   O += P V   (A = P converted in registers from S's accumulators, B = V through ldmatrix.trans),
// with S, O, the running max and sum in registers. Scores stay fp32; P, Q, K and V are the
// cache dtype; accumulation is fp32.

template <uint32_t D>
struct DenseMmaTraits {
  static constexpr uint32_t kUnit = 4096 / D;  // tokens per stage: 8 KiB of K and 8 of V
  static constexpr uint32_t kStages = 2;
  static constexpr uint32_t kRowBytes = D * 2;
  static constexpr size_t kStageBytes = size_t(2) * kUnit * kRowBytes;
  static constexpr size_t kQueryBytes = size_t(D / 16) * kLanes * 16;  // A fragments
  static constexpr size_t smem_bytes() {
    return kQueryBytes + size_t(kWarps) * kStages * kStageBytes;
  }
  static_assert(kUnit % 16 == 0 && D % 64 == 0, "units of whole k-steps, rows of 8+ chunks");
  static_assert(kUnit * D / 8 % kLanes == 0, "a unit is whole 16-byte chunks per lane");
};

// The group's queries as A fragments [D / 16 k-steps][32 lanes], rows beyond the group zero.
template <uint32_t D>
__device__ void store_query_fragments(const AttentionParams& P, uint32_t seq, uint32_t head,
                                      uint4* frags) {
  const uint16_t* q = static_cast<const uint16_t*>(P.queries) +
                      (size_t(seq) * P.kv_heads * P.group + size_t(head) * P.group) * D;
  for (uint32_t i = threadIdx.x; i < D / 16 * kLanes; i += blockDim.x) {
    const uint32_t ks = i / kLanes, lane = i % kLanes;
    uint32_t w[4];
    for (uint32_t r = 0; r < 4; ++r) {
      uint32_t halves[2];
      for (uint32_t h = 0; h < 2; ++h) {
        const mma::Coord c = mma::a_coord(lane, 2 * r + h);
        halves[h] = c.row < P.group ? q[size_t(c.row) * D + ks * 16 + c.col] : 0u;
      }
      w[r] = halves[0] | halves[1] << 16;
    }
    frags[i] = make_uint4(w[0], w[1], w[2], w[3]);
  }
  __syncthreads();
}

// One warp's softmax state in registers, for the 16 rows of an MMA (the group's query heads;
// lane l holds rows l / 4 and l / 4 + 8): the output accumulators (C fragments of D / 8
// n-tiles), the running max (base 2), this lane's share of the row sums, and an output offset
// per row added to every channel at the end (the tile kernel's sum of p' * centre).
template <uint32_t D>
struct MmaSoftmax {
  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
  float bias[2] = {0.0f, 0.0f};

  // Folds in a unit's scores sc (element i of an n-tile is the lane's row half i / 2: row
  // lane / 4 + 8 (i / 2)): sc * scale + offset * scale, tokens outside [skip, valid) masked (the
  // range is never empty); sc becomes the unnormalised probabilities. The upper half (rows 8-15)
  // only where `upper`, i.e. a group of more than 8 query heads: else those rows hold no query
  // and the warp skips them (their sc stays as the MMA left it, and write() never reads them).
  // The branches are uniform over the warp: skip and valid are the warp's own, and a vote asks
  // whether any lane's running max grew (when none did, every rescale would be by exactly 1).
  template <uint32_t NS>
  __device__ __forceinline__ void absorb(float (&sc)[NS][4], const float (&offset)[2], float scale,
                                         uint32_t skip, uint32_t valid, uint32_t quad, bool upper) {
    const bool masked = skip > 0 || valid < 8 * NS;
#pragma unroll
    for (uint32_t r = 0; r < 2; ++r) {
      if (r == 1 && !upper) break;
      const float shift = offset[r] * scale;
#pragma unroll
      for (uint32_t n = 0; n < NS; ++n) {
        sc[n][2 * r] = fmaf(sc[n][2 * r], scale, shift);
        sc[n][2 * r + 1] = fmaf(sc[n][2 * r + 1], scale, shift);
      }
      if (masked) {
#pragma unroll
        for (uint32_t n = 0; n < NS; ++n) {
#pragma unroll
          for (uint32_t h = 0; h < 2; ++h) {
            const uint32_t token = 8 * n + 2 * quad + h;
            if (token < skip || token >= valid) sc[n][2 * r + h] = -INFINITY;
          }
        }
      }
      float top = -INFINITY;
#pragma unroll
      for (uint32_t n = 0; n < NS; ++n) top = fmaxf(top, fmaxf(sc[n][2 * r], sc[n][2 * r + 1]));
      top = fmaxf(top, __shfl_xor_sync(~0u, top, 1));
      top = fmaxf(top, __shfl_xor_sync(~0u, top, 2));
      const float m_new = fmaxf(m[r], top);
      if (__ballot_sync(~0u, m_new != m[r]) != 0) {
        const float alpha = device::exp2_approx(m[r] - m_new);
        m[r] = m_new;
        l[r] *= alpha;
        bias[r] *= alpha;
#pragma unroll
        for (uint32_t n = 0; n < D / 8; ++n) {
          o[n][2 * r] *= alpha;
          o[n][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
      for (uint32_t n = 0; n < NS; ++n) {
#pragma unroll
        for (uint32_t h = 0; h < 2; ++h) {
          sc[n][2 * r + h] = device::exp2_approx(sc[n][2 * r + h] - m[r]);
          l[r] += sc[n][2 * r + h];
        }
      }
    }
  }

  // The output accumulator and its offset times f (a power of two: exact but for values that
  // fall below fp32's normal range, about 1e-38). A unit whose probability fold was scaled by f
  // adds its products at that scale between two such calls.
  __device__ __forceinline__ void scale_output(float f) {
#pragma unroll
    for (uint32_t r = 0; r < 2; ++r) bias[r] *= f;
#pragma unroll
    for (uint32_t n = 0; n < D / 8; ++n) {
#pragma unroll
      for (uint32_t i = 0; i < 4; ++i) o[n][i] *= f;
    }
  }

  // The partial state of part `part`: rows of the group only; max in natural-log units.
  __device__ __forceinline__ void write(const AttentionParams& P, uint32_t seq, uint32_t head,
                                        uint32_t part, uint32_t lane) {
    const uint32_t quad = lane % 4, q_heads = P.kv_heads * P.group;
#pragma unroll
    for (uint32_t r = 0; r < 2; ++r) {
      l[r] += __shfl_xor_sync(~0u, l[r], 1);
      l[r] += __shfl_xor_sync(~0u, l[r], 2);
      float off = bias[r] + __shfl_xor_sync(~0u, bias[r], 1);
      off += __shfl_xor_sync(~0u, off, 2);
      const uint32_t g = lane / 4 + 8 * r;
      if (g >= P.group) continue;
      const size_t row = (size_t(seq) * q_heads + head * P.group + g) * P.num_parts + part;
#pragma unroll
      for (uint32_t n = 0; n < D / 8; ++n) {
        *reinterpret_cast<float2*>(&P.part_acc[row * D + n * 8 + 2 * quad]) =
            make_float2(o[n][2 * r] + off, o[n][2 * r + 1] + off);
      }
      if (quad == 0) {
        P.part_ml[row * 2] = m[r] / kLog2e;
        P.part_ml[row * 2 + 1] = l[r];
      }
    }
  }
};

// UPPER: a group of more than 8 query heads (rows 8-15 of the MMA), as for the tile kernel.
template <kvc_dtype DT, uint32_t D, bool UPPER>
__global__ void __launch_bounds__(kWarps* kLanes)
    attention_dense_kernel(AttentionParams P, uint32_t max_tokens, const uint32_t* lengths,
                           const void* keys, const void* values) {
  using Tr = DenseMmaTraits<D>;
  constexpr uint32_t U = Tr::kUnit, kChunks = D / 8;
  constexpr bool kBf16 = DT == KVC_DTYPE_BF16;
  KVC_DYNAMIC_SHARED(uint8_t, smem);
  const uint32_t split = blockIdx.x, head = blockIdx.y, seq = blockIdx.z;
  const uint32_t warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const uint32_t quad = lane % 4;
  const uint4* qfrag = reinterpret_cast<const uint4*>(smem);
  uint8_t* stages = smem + Tr::kQueryBytes + size_t(warp) * Tr::kStages * Tr::kStageBytes;
  store_query_fragments<D>(P, seq, head, reinterpret_cast<uint4*>(smem));

  const uint32_t len = lengths[seq];
  const uint32_t units = (len + U - 1) / U;
  const UnitRange range = split_units(units, split, gridDim.x);
  const uint32_t end = range.end;
  const size_t row_stride = size_t(P.kv_heads) * D;  // elements between tokens
  const size_t first = (size_t(seq) * max_tokens * P.kv_heads + head) * D;
  const uint16_t* k_rows = static_cast<const uint16_t*>(keys) + first;
  const uint16_t* v_rows = static_cast<const uint16_t*>(values) + first;

  // [sass stage] K then V of unit u into stage s; rows beyond the sequence are zeros. A lane
  // copies chunk `chunk` of rows r0, r0 + R, ... (R = rows per warp instruction); row R i + r0
  // swizzles as row r0 XOR a constant (R i % 8 is a multiple of R, r0 < R), so past the first
  // row each copy is an address add. A unit wholly inside the sequence needs no row checks.
  constexpr uint32_t R = kLanes / kChunks;
  const uint32_t r0 = lane / kChunks, chunk = lane % kChunks;
  const uint32_t lane_offset = mma::swizzled_offset(r0, chunk, Tr::kRowBytes);
  auto stage_rows = [&](uint32_t u, uint32_t s, auto whole) {
    uint8_t* k_dst = stages + s * Tr::kStageBytes;
    uint8_t* v_dst = k_dst + U * Tr::kRowBytes;
    const uint32_t token0 = u * U + r0;
    const size_t first = size_t(token0) * row_stride + chunk * 8;
    const uint16_t *k_src = k_rows + first, *v_src = v_rows + first;
#pragma unroll
    for (uint32_t i = 0; i < U / R; ++i) {
      const uint32_t row = R * i;
      const bool valid = decltype(whole)::value || token0 + row < len;
      const uint32_t off = (lane_offset ^ (row % 8 * 16)) + row * Tr::kRowBytes;
      device::cp_async_16(k_dst + off, valid ? k_src : k_rows, valid);
      device::cp_async_16(v_dst + off, valid ? v_src : v_rows, valid);
      k_src += R * row_stride;
      v_src += R * row_stride;
    }
    device::cp_async_commit();
  };
  auto stage_unit = [&](uint32_t u, uint32_t s) {
    if ((u + 1) * U <= len) {
      stage_rows(u, s, std::true_type{});
    } else {
      stage_rows(u, s, std::false_type{});
    }
  };

  MmaSoftmax<D> st;
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
    const uint8_t* k_tile = stages + s * Tr::kStageBytes;
    const uint8_t* v_tile = k_tile + U * Tr::kRowBytes;
    const uint32_t valid = min(U, len - u * U);

    // [sass K] S = Q K^T: ldmatrix matrix j of lane 8j + r is token r of the n-tile, channels
    // 8j..8j+7 of a 32-channel pair of k-steps: registers (x, y) feed k-step 2p, (z, w) k-step 2p
    // + 1.
    float sc[U / 8][4] = {};
#pragma unroll
    for (uint32_t kp = 0; kp < D / 32; ++kp) {
      const uint4 qa = qfrag[(2 * kp) * kLanes + lane], qb = qfrag[(2 * kp + 1) * kLanes + lane];
#pragma unroll
      for (uint32_t nt = 0; nt < U / 8; ++nt) {
        const uint32_t row = nt * 8 + lane % 8;
        const uint4 b = device::ldmatrix_x4<false>(
            k_tile + mma::swizzled_offset(row, kp * 4 + lane / 8, Tr::kRowBytes));
        device::mma_16816<kBf16>(sc[nt], qa, b.x, b.y);
        device::mma_16816<kBf16>(sc[nt], qb, b.z, b.w);
      }
    }

    // [sass softmax] Online softmax, base 2.
    st.absorb(sc, {0.0f, 0.0f}, P.scale * kLog2e, 0, valid, quad, UPPER);

    // [sass V] O += P V: the accumulators of n-tiles 2kk and 2kk + 1 are the A fragment of k-step
    // kk. ldmatrix.trans matrix j of lane 8j + r is token 8 (j % 2) + r of the k-step, channels of
    // n-tile 2p + j / 2: registers (x, y) feed n-tile 2p, (z, w) n-tile 2p + 1.
#pragma unroll
    for (uint32_t kk = 0; kk < U / 16; ++kk) {
      const uint4 a = make_uint4(device::pack2<kBf16>(sc[2 * kk][0], sc[2 * kk][1]),
                                 device::pack2<kBf16>(sc[2 * kk][2], sc[2 * kk][3]),
                                 device::pack2<kBf16>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                 device::pack2<kBf16>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]));
      const uint32_t row = kk * 16 + (lane / 8 % 2) * 8 + lane % 8;
#pragma unroll
      for (uint32_t np = 0; np < D / 16; ++np) {
        const uint4 b = device::ldmatrix_x4<true>(
            v_tile + mma::swizzled_offset(row, 2 * np + lane / 16, Tr::kRowBytes));
        device::mma_16816<kBf16>(st.o[2 * np], a, b.x, b.y);
        device::mma_16816<kBf16>(st.o[2 * np + 1], a, b.z, b.w);
      }
    }
    __syncwarp();  // every lane is done with stage s before it is refilled
    // [sass other]
  }

  st.write(P, seq, head, split * kWarps + warp, lane);
}

// ---- Combine ----------------------------------------------------------------------------------

// One thread block per (query head, sequence), one thread per channel: merges the partial
// softmax states of all parts.
template <kvc_dtype DT>
__global__ void attention_combine_kernel(AttentionParams P, uint32_t head_dim, void* out) {
  const uint32_t qh = blockIdx.x, seq = blockIdx.y, c = threadIdx.x;
  const uint32_t q_heads = P.kv_heads * P.group;
  const size_t row0 = (size_t(seq) * q_heads + qh) * P.num_parts;
  float top = -FLT_MAX;
  for (uint32_t k = 0; k < P.num_parts; ++k) top = fmaxf(top, P.part_ml[(row0 + k) * 2]);
  float num = 0.0f, den = 0.0f;
  for (uint32_t k = 0; k < P.num_parts; ++k) {
    const float l = P.part_ml[(row0 + k) * 2 + 1];
    if (l == 0.0f) continue;  // a part that saw no tokens
    const float w = __expf(P.part_ml[(row0 + k) * 2] - top);
    num += w * P.part_acc[(row0 + k) * head_dim + c];
    den += w * l;
  }
  store_output<DT>(out, (size_t(seq) * q_heads + qh) * head_dim + c, den > 0.0f ? num / den : 0.0f);
}

}  // namespace kvc::kernels
