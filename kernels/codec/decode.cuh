// SPDX-License-Identifier: Apache-2.0
// Decode kernel: one warp per compressed block, equal element for element to the CPU reference
// decoder. Lane 0 parses and checks the header against the bytes available; all reads after
// that stay inside the block (read_bits and BitReader bound every access).
#pragma once

#include <type_traits>

#include "kernels/codec/device_common.cuh"

namespace kvc::kernels {

// One warp per compressed block, so that every lane has work in a Huffman block too (a lane per
// sub-stream, at most 32); a thread block holds up to kThreads / 32 of them.
constexpr uint32_t kDecodeLanes = 32;
constexpr uint32_t kMaxDecodeWarps = kThreads / kDecodeLanes;

// Huffman key blocks stage each warp's decoded values here, 32 groups (channels) x 32 lanes
// (sub-streams, i.e. rows) at a time, so that they leave as whole row segments: written
// directly, every store of a warp would touch 32 rows. One padding column keeps both the
// writes (by lane) and the reads (by channel) free of bank conflicts.
constexpr uint32_t kStageWords = kDecodeLanes * (kDecodeLanes + 1);
constexpr size_t kDecodeStaticSmem = size_t(kMaxDecodeWarps) * kStageWords * 4 + 1024;

// A group's step and centre side by side: one 8-byte shared load per decoded element.
struct alignas(8) StepCenter {
  float step;
  uint32_t center;  // wraps like the CPU's
};

// Dynamic shared memory of one compressed block: per-group steps and centres.
__host__ __device__ inline size_t decode_smem_bytes(uint32_t g) {
  return size_t(g) * sizeof(StepCenter);
}

// Warps (compressed blocks) per thread block: as many as fit in `smem_limit` bytes of shared
// memory per thread block, less `reserve` for the kernel's static shared memory; 1 to 8.
__host__ __device__ inline uint32_t decode_warps(uint32_t g, size_t smem_limit,
                                                 size_t reserve = kDecodeStaticSmem + 4096) {
  const size_t per_block = decode_smem_bytes(g);
  const size_t fit = smem_limit > reserve + per_block ? (smem_limit - reserve) / per_block : 1;
  return fit < kMaxDecodeWarps ? uint32_t(fit) : kMaxDecodeWarps;
}

// hi:lo >> shift (shift < 32), the low 32 bits: one funnel shift.
__device__ __forceinline__ uint32_t funnel_right(uint32_t lo, uint32_t hi, uint32_t shift) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(lo, hi, shift);
#else
  return uint32_t(((uint64_t(hi) << 32) | lo) >> (shift & 31u));
#endif
}

// A Huffman sub-stream of a 4-byte-aligned payload, read a word at a time: the same bits, zeros
// past the stream's end and overrun() as f::BitReader (byte-wise on the device, kept for
// payloads that are not aligned), from two cached words. One load per 32 bits consumed; peek and
// read take at most 32 bits, and skip at most 32, so the window moves by at most one word. The
// position is word * 32 + off, so that a peek is one funnel shift and a skip one add and compare.
struct WordReader {
  const uint8_t* payload;
  uint32_t limit;  // bit position of the stream's end in the payload
  uint32_t word;   // index of w0
  uint32_t off;    // bits of w0 consumed, < 32
  uint32_t w0, w1;

  // Word i with the bits at or past the stream's end cleared. Every word that holds a bit
  // below `limit` lies inside the payload (the header check bounds the stream ends by it).
  __device__ __forceinline__ uint32_t load(uint32_t i) const {
    const uint32_t first = i * 32;
    if (first >= limit) return 0;
    const uint32_t w = load_word(payload, i);
    return limit - first >= 32 ? w : w & ((1u << (limit - first)) - 1u);
  }
  __device__ WordReader(const uint8_t* p, uint32_t start_byte, uint32_t end_byte)
      : payload(p), limit(end_byte * 8), word(start_byte / 4), off(start_byte % 4 * 8) {
    w0 = load(word);
    w1 = load(word + 1);
  }
  __device__ __forceinline__ uint32_t peek(uint32_t bits) const {
    const uint32_t v = funnel_right(w0, w1, off);
    return bits >= 32 ? v : v & ((1u << bits) - 1u);
  }
  __device__ __forceinline__ void skip(uint32_t bits) {
    off += bits;
    if (off >= 32) {
      off -= 32;
      ++word;
      w0 = w1;
      w1 = load(word + 1);
    }
  }
  __device__ __forceinline__ uint32_t read(uint32_t bits) {
    const uint32_t v = peek(bits);
    skip(bits);
    return v;
  }
  __device__ bool overrun() const { return word * 32 + off > limit; }
};

// The byte-wise reader over the same stream, for payloads that are not 4-byte aligned.
struct ByteReader : f::BitReader {
  __device__ ByteReader(const uint8_t* p, uint32_t start_byte, uint32_t end_byte)
      : f::BitReader(p + start_byte, end_byte - start_byte) {}
};

// A fixed-width field of a 4-byte-aligned payload of `num_words` words that holds it whole
// (the header check guarantees it): two words, the second only where it exists.
__device__ __forceinline__ uint32_t read_field(const uint8_t* payload, uint32_t num_words,
                                               uint32_t pos, uint32_t bits) {
  const uint32_t w = pos >> 5;
  const uint32_t lo = load_word(payload, w);
  const uint32_t hi = w + 1 < num_words ? load_word(payload, w + 1) : 0u;
  const uint32_t v = funnel_right(lo, hi, pos & 31u);
  return bits >= 32 ? v : v & ((1u << bits) - 1u);
}

// Decodes one symbol of a sub-stream with the codebook's table (`table`, `first_symbol`, and
// `escape` = the escape's index, the number of symbols). `failed` becomes 1 where the bits are
// no code, or an escape in a block without escape bits (the CPU's corrupt-block verdicts), and
// is never cleared. Called again after that, it goes on reading (inside the stream's bounds)
// and the caller keeps the first verdict, so that lanes that decode in step need no branch
// around it. Escapes and missing codes (entry 0) share one rarely taken branch.
template <class Reader>
__device__ __forceinline__ uint32_t decode_symbol(Reader& in, const uint32_t* table,
                                                  uint32_t max_code_length, uint32_t first_symbol,
                                                  uint32_t escape, uint32_t code_bits,
                                                  uint32_t& failed) {
  const uint32_t entry = table[in.peek(max_code_length)];
  const uint32_t length = entry & 0xFFu, index = entry >> 8;
  in.skip(length);
  uint32_t symbol = first_symbol + index;
  if (index == escape || length == 0) {
    if (length == 0 || code_bits == 0) {
      failed = 1;
    } else {
      symbol = uint32_t(f::sign_extend(in.read(code_bits), code_bits));
    }
  }
  return symbol;
}

__device__ inline kvc_status_t check_block(const Shape& sh, const BookView& book,
                                           const uint8_t* src, uint32_t available,
                                           f::BlockLayout& b) {
  const f::ParseError e = f::parse_block(src, available, b);
  if (e == f::ParseError::kBadVersion) return KVC_ERROR_FORMAT_VERSION;
  if (e != f::ParseError::kNone) return KVC_ERROR_CORRUPT_DATA;
  if (b.is_value != (sh.is_value != 0) || b.num_tokens != sh.num_tokens ||
      b.head_dim != sh.head_dim || b.group_size != sh.group_size) {
    return KVC_ERROR_CONFIG_MISMATCH;
  }
  if (b.encoding == f::kHuffman && (book.table == nullptr || book.id != b.codebook_id)) {
    return KVC_ERROR_CODEBOOK_MISMATCH;
  }
  return KVC_SUCCESS;
}

// The Huffman payload: one lane per sub-stream (rounds of 32 where there are more), each
// decoding its stream front to back with the codebook's table. Key blocks: the lanes advance
// in step through positions and groups, and every 32 groups the warp stores the staged values
// as row segments: with `pairs` (finite steps, an even number of groups, a destination aligned
// for it), lanes 0-15 and 16-31 take two rows at a time, each lane two adjacent channels in one
// store; else lane = channel. Value blocks: each lane stores its values directly (lanes'
// channels are P apart in one row). A lane that meets a corrupt stream stops decoding it and
// the block is reported corrupt, as on the CPU (which stops at the first error).
template <kvc_dtype OUT, class Reader>
__device__ void decode_streams(const Shape& sh, const BookView& book, const f::BlockLayout& L,
                               const uint8_t* src, void* dst, int64_t stride,
                               const StepCenter* groups_sc, bool finite, bool pairs, uint32_t lane,
                               float (&stage)[kStageWords], uint32_t& corrupt) {
  const uint8_t* payload = src + L.payload_offset;
  const uint32_t groups = sh.num_groups, streams = L.num_substreams;
  const uint32_t per_stream = sh.group_size / streams, code_bits = L.code_bits;
  const uint32_t* table = book.table;
  const uint32_t max_length = book.max_code_length, first = uint32_t(book.first_symbol);
  const uint32_t escape = book.num_symbols;
  auto stream_end = [&](uint32_t s) { return f::load_u16(src + L.stream_ends_offset + 2 * s); };
  bool bad = false;
  if (!L.is_value) {
    constexpr uint32_t kPitch = kDecodeLanes + 1;
    const uint32_t pair = lane % 16, half = lane / 16;  // pairs: channels 2 * pair + {0, 1}
    for (uint32_t s0 = 0; s0 < streams; s0 += kDecodeLanes) {
      const uint32_t s = s0 + lane, rows = min(kDecodeLanes, streams - s0);
      const bool active = s < streams;
      Reader in(payload, active && s > 0 ? stream_end(s - 1) : 0u, active ? stream_end(s) : 0u);
      uint32_t failed = active ? 0u : 1u;
      for (uint32_t k = 0; k < per_stream; ++k) {
        for (uint32_t g0 = 0; g0 < groups; g0 += kDecodeLanes) {
          const uint32_t count = min(kDecodeLanes, groups - g0);
          const StepCenter* sc = groups_sc + g0;
          float* to = stage + lane;
#pragma unroll 4
          for (uint32_t i = 0; i < count; ++i, to += kPitch) {
            const uint32_t symbol =
                decode_symbol(in, table, max_length, first, escape, code_bits, failed);
            const StepCenter g = sc[i];
            *to = f::dequantize(int32_t(g.center + symbol), g.step);
          }
          __syncwarp();
          // Rows (s0 + r) * per_stream + k.
          const size_t next = size_t(per_stream) * size_t(stride);
          if (pairs) {
            if (2 * pair < count) {
              const float* from = stage + 2 * pair * kPitch;
              size_t at = size_t(s0 * per_stream + k) * size_t(stride) + g0 + 2 * pair;
              at += half * next;
              for (uint32_t r = half; r < rows; r += 2, at += 2 * next) {
                store_pair_finite<OUT>(dst, at, from[r], from[kPitch + r]);
              }
            }
          } else if (lane < count) {  // channel g0 + lane
            size_t at = size_t(s0 * per_stream + k) * size_t(stride) + g0 + lane;
            for (uint32_t r = 0; r < rows; ++r, at += next) {
              store_output<OUT>(dst, at, stage[lane * kPitch + r]);
            }
          }
          __syncwarp();
        }
      }
      bad |= active && (failed || in.overrun());
    }
  } else {
    const uint32_t G = sh.group_size, segments = sh.head_dim / G;
    for (uint32_t s = lane; s < streams; s += kDecodeLanes) {
      Reader in(payload, s > 0 ? stream_end(s - 1) : 0u, stream_end(s));
      uint32_t failed = 0;
      for (uint32_t e = s * per_stream; e < (s + 1) * per_stream && !failed; ++e) {
        uint32_t token = 0, seg = 0;  // of group g
        for (uint32_t g = 0; g < groups && !failed; ++g) {
          const uint32_t symbol =
              decode_symbol(in, table, max_length, first, escape, code_bits, failed);
          if (!failed) {
            const size_t at = size_t(token) * size_t(stride) + seg * G + e;
            const StepCenter p = groups_sc[g];
            const float v = f::dequantize(int32_t(p.center + symbol), p.step);
            if (finite) {
              store_output_finite<OUT>(dst, at, v);
            } else {
              store_output<OUT>(dst, at, v);
            }
          }
          if (++seg == segments) {
            seg = 0;
            ++token;
          }
        }
      }
      bad |= failed || in.overrun();
    }
  }
  if (bad) atomicOr(&corrupt, 1u);
}

// The fixed-width payload: rows in order, lanes along the channels (coalesced stores); each
// element's bits found at its position-major index (bit positions fit 32 bits: at most 2^20
// fields of 26 bits). Aligned payloads read two words per field; others byte-wise. The block's
// constants (kind, width, whether every step is finite) are template arguments and locals, so
// that the loop holds neither their branches nor reloads of the shared-memory layout.
template <kvc_dtype OUT, bool kAligned, bool kFinite, bool kValue, bool kBits>
__device__ void decode_fixed_rows(const Shape& sh, uint32_t bits, uint32_t payload_bytes,
                                  const uint8_t* payload, void* dst, int64_t stride,
                                  const StepCenter* groups_sc, uint32_t lane) {
  const uint32_t D = sh.head_dim, G = sh.group_size, groups = sh.num_groups;
  const uint32_t segments = kValue ? D / G : 1;
  const uint32_t seg0 = lane / G, pos0 = lane % G;  // value blocks: lane's channel
  const uint32_t seg_step = kDecodeLanes / G, pos_step = kDecodeLanes % G;
  const uint32_t num_words = payload_bytes / 4;
  for (uint32_t t = 0; t < sh.num_tokens; ++t) {
    uint32_t seg = seg0, pos = pos0;
    size_t at_out = size_t(t) * size_t(stride) + lane;
    for (uint32_t c = lane; c < D; c += kDecodeLanes, at_out += kDecodeLanes) {
      const uint32_t g = kValue ? t * segments + seg : c;
      const uint32_t e = kValue ? pos : t;
      uint32_t u = 0;
      if constexpr (kBits) {
        const uint32_t at = (e * groups + g) * bits;
        u = kAligned ? read_field(payload, num_words, at, bits)
                     : read_bits(payload, payload_bytes, at, bits);
      }
      const StepCenter p = groups_sc[g];
      const float v = f::dequantize(int32_t(p.center + u), p.step);
      if constexpr (kFinite) {
        store_output_finite<OUT>(dst, at_out, v);
      } else {
        store_output<OUT>(dst, at_out, v);
      }
      if constexpr (kValue) {
        seg += seg_step;
        pos += pos_step;
        if (pos >= G) {
          pos -= G;
          ++seg;
        }
      }
    }
  }
}

template <kvc_dtype OUT, bool kAligned>
__device__ void decode_fixed(const Shape& sh, const f::BlockLayout& L, const uint8_t* payload,
                             void* dst, int64_t stride, const StepCenter* groups_sc, bool finite,
                             uint32_t lane) {
  const uint32_t bits = L.code_bits, bytes = L.payload_bytes;
  auto rows = [&](auto finite_c, auto value_c) {
    constexpr bool kFinite = decltype(finite_c)::value, kValue = decltype(value_c)::value;
    if (bits == 0) {
      decode_fixed_rows<OUT, kAligned, kFinite, kValue, false>(sh, bits, bytes, payload, dst,
                                                               stride, groups_sc, lane);
    } else {
      decode_fixed_rows<OUT, kAligned, kFinite, kValue, true>(sh, bits, bytes, payload, dst, stride,
                                                              groups_sc, lane);
    }
  };
  using T = std::true_type;
  using F = std::false_type;
  if (finite) {
    if (L.is_value)
      rows(T{}, T{});
    else
      rows(T{}, F{});
  } else {
    if (L.is_value)
      rows(F{}, T{});
    else
      rows(F{}, F{});
  }
}

// Launch: blockDim.x = 32 * warps, ceil(num_blocks / warps) thread blocks, and
// warps * decode_smem_bytes(groups) bytes of dynamic shared memory.
template <kvc_dtype OUT>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(Shape sh, BookView book, const void* const* src_blocks, const uint32_t* src_bytes,
                  void* const* dst_blocks, int64_t stride, kvc_status_t* block_status,
                  uint32_t num_blocks) {
  KVC_DYNAMIC_SHARED(uint8_t, smem);
  __shared__ f::BlockLayout layouts[kMaxDecodeWarps];
  __shared__ kvc_status_t statuses[kMaxDecodeWarps];
  __shared__ uint32_t corrupts[kMaxDecodeWarps];
  __shared__ float stages[kMaxDecodeWarps][kStageWords];

  const uint32_t warp = threadIdx.x / kDecodeLanes, lane = threadIdx.x % kDecodeLanes;
  const uint32_t block = blockIdx.x * (blockDim.x / kDecodeLanes) + warp;
  if (block >= num_blocks) return;  // the whole warp
  const uint32_t n = sh.num_elements(), groups = sh.num_groups;
  f::BlockLayout& L = layouts[warp];
  kvc_status_t& status = statuses[warp];
  uint32_t& corrupt = corrupts[warp];
  const uint8_t* src = static_cast<const uint8_t*>(src_blocks[block]);
  void* dst = dst_blocks[block];
  if (lane == 0) {
    // Pointers live in device memory, so only the kernel can check them.
    const bool usable = src != nullptr && dst != nullptr &&
                        reinterpret_cast<uintptr_t>(dst) % (OUT == KVC_DTYPE_FP32 ? 4 : 2) == 0;
    status = usable ? check_block(sh, book, src, src_bytes[block], L) : KVC_ERROR_INVALID_ARGUMENT;
    corrupt = 0;
  }
  __syncwarp();
  if (status != KVC_SUCCESS) {
    if (lane == 0) block_status[block] = status;
    return;
  }
  const uint8_t* payload = src + L.payload_offset;
  auto out_index = [&](uint32_t t, uint32_t c) { return size_t(t) * size_t(stride) + c; };

  if (L.encoding == f::kRaw) {
    const uint32_t es = f::dtype_bytes(L.raw_dtype);
    for (uint32_t i = lane; i < n; i += kDecodeLanes) {
      const uint8_t* at = payload + size_t(i) * es;
      const float v = L.raw_dtype == KVC_DTYPE_FP32   ? f::bits_float(f::load_u32(at))
                      : L.raw_dtype == KVC_DTYPE_BF16 ? f::bf16_to_float(f::load_u16(at))
                                                      : f::half_to_float(f::load_u16(at));
      store_output<OUT>(dst, out_index(i / sh.head_dim, i % sh.head_dim), v);
    }
    if (lane == 0) block_status[block] = KVC_SUCCESS;
    return;
  }

  StepCenter* groups_sc = reinterpret_cast<StepCenter*>(smem + warp * decode_smem_bytes(groups));
  const uint32_t centers_bytes = L.stream_ends_offset - L.centers_offset;
  bool finite = true;
  for (uint32_t g = lane; g < groups; g += kDecodeLanes) {
    const float step = L.per_group_step
                           ? f::bf16_to_float(f::load_u16(src + L.steps_offset + 2 * g))
                           : f::bits_float(f::load_u32(src + L.steps_offset));
    groups_sc[g] = {
        step, uint32_t(L.center_base) + read_bits(src + L.centers_offset, centers_bytes,
                                                  uint64_t(g) * L.center_bits, L.center_bits)};
    finite &= f::is_finite(step);
  }
  // Every step finite: no decoded value is a NaN (store_output_finite).
  finite = __ballot_sync(0xFFFFFFFFu, !finite) == 0;
  __syncwarp();

  // Groups and positions advance with the loops of decode_fixed and decode_streams instead of
  // being divided out per element: a value block's group g is (token, segment) = (g / segments,
  // g % segments), and its element at position p is channel segment * group_size + p; a key
  // block's group is its channel.
  // Blocks are 4-byte aligned wherever the library wrote them; a caller's unaligned copy takes
  // the byte-wise paths (the same bits). Uniform across the warp.
  const bool aligned = reinterpret_cast<uintptr_t>(src) % 4 == 0;
  if (L.encoding == f::kFixed) {
    if (aligned) {
      decode_fixed<OUT, true>(sh, L, payload, dst, stride, groups_sc, finite, lane);
    } else {
      decode_fixed<OUT, false>(sh, L, payload, dst, stride, groups_sc, finite, lane);
    }
  } else {
    // Key blocks store pairs of channels: 2 elements' alignment at the destination, every row.
    constexpr uint32_t kPairBytes = OUT == KVC_DTYPE_FP32 ? 8 : 4;
    const bool pairs = finite && groups % 2 == 0 && stride % 2 == 0 &&
                       reinterpret_cast<uintptr_t>(dst) % kPairBytes == 0;
    if (aligned) {
      decode_streams<OUT, WordReader>(sh, book, L, src, dst, stride, groups_sc, finite, pairs, lane,
                                      stages[warp], corrupt);
    } else {
      decode_streams<OUT, ByteReader>(sh, book, L, src, dst, stride, groups_sc, finite, pairs, lane,
                                      stages[warp], corrupt);
    }
  }
  __syncwarp();
  if (lane == 0) block_status[block] = corrupt ? KVC_ERROR_CORRUPT_DATA : KVC_SUCCESS;
}

}  // namespace kvc::kernels
