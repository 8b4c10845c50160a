// SPDX-License-Identifier: Apache-2.0
// Encode kernel: one thread block per KV block, byte-identical to the CPU reference encoder
// (src/cpu/codec_cpu.cpp). Quantization and the choice of encoding use the shared format.cuh
// functions. Payload bits are written by each thread for a contiguous chunk of the
// position-major order, a word at a time (WordWriter), at offsets known in advance (fixed
// width) or from a CUB block scan (Huffman); only the words at chunk and sub-stream edges are
// ORed atomically, so the bytes never depend on thread scheduling. Centres are placed by
// gathering whole output words.
#pragma once

#include "kernels/codec/device_common.cuh"

namespace kvc::kernels {

// Segmented-scan element: the code bits and escapes since the last sub-stream start, and
// whether one occurred. Escapes are counted, not sized, so that one pass finds the escape
// payload's width (the block's widest escaped symbol) and the sizes together.
struct StreamBits {
  uint32_t restarted;
  uint32_t bits;
  uint32_t escapes;
};
struct StreamBitsOp {
  __device__ StreamBits operator()(const StreamBits& a, const StreamBits& b) const {
    return b.restarted ? b : StreamBits{a.restarted, a.bits + b.bits, a.escapes + b.escapes};
  }
};

struct EncodeState {
  QuantSummary sum;
  uint32_t escape_bits;
  f::BlockLayout layout;
};

// Dynamic shared memory: the quantization arrays, then two 32-bit counters per sub-stream.
__host__ __device__ inline size_t encode_smem_bytes(uint32_t n, uint32_t g, uint32_t s) {
  return QuantSmem::bytes(n, g) + size_t(s) * 8;
}

// Writes `count` values of `bits` bits (value(i) gives the i-th) as an LSB-first bit field
// starting at word `words`, one output word per thread iteration (the centres: few words).
template <class Value>
__device__ void gather_bits(uint32_t* words, uint32_t count, uint32_t bits, Value value) {
  const uint64_t total_bits = uint64_t(count) * bits;
  const uint32_t num_words = uint32_t((total_bits + 31) / 32);
  for (uint32_t w = threadIdx.x; w < num_words; w += blockDim.x) {
    const uint64_t lo = uint64_t(w) * 32;
    const uint32_t first = uint32_t(lo / bits);
    const uint64_t reach = (lo + 31) / bits;
    const uint32_t last = uint32_t(reach < count - 1 ? reach : count - 1);
    uint32_t word = 0;
    for (uint32_t i = first; i <= last; ++i) {
      const int64_t shift = int64_t(uint64_t(i) * bits) - int64_t(lo);
      const uint64_t v = value(i) & ((uint64_t(1) << bits) - 1u);
      word |= shift >= 0 ? uint32_t(v << shift) : uint32_t(v >> -shift);
    }
    words[w] = word;
  }
}

// One thread's run of consecutive bits of a zeroed block, written a word at a time from a
// 32-bit accumulator. Words that lie wholly inside the run belong to this thread alone and get
// a plain store; the run's first word (where it starts inside one) and its last, partial word
// may hold a neighbour's bits and are ORed in atomically. So the bytes never depend on the
// order in which threads write, and there is one atomic per run end instead of one per field.
static_assert(KVC_MAX_CODE_LENGTH < 32 && f::kMaxEscapeBits < 32 && f::kMaxCodeBits < 32);
struct WordWriter {
  uint32_t* words;
  uint32_t word;  // index of the word the accumulator's bit 0 is
  uint32_t fill;  // bits in the accumulator, < 32
  uint32_t acc;
  bool shared;  // the current word may hold bits of another run

  __device__ void start(uint32_t* w, uint32_t bit) {
    words = w;
    word = bit >> 5;
    fill = bit & 31u;
    acc = 0;
    shared = fill != 0;
  }
  // value < 2^bits, bits < 32: codes take at most KVC_MAX_CODE_LENGTH (15) bits, escape
  // payloads f::kMaxEscapeBits (27), fixed fields f::kMaxCodeBits (26).
  // A field that completes the word leaves its upper bits, value >> (32 - fill), behind: fill
  // is at least 1 there, since fill + bits >= 32 with bits < 32.
  __device__ __forceinline__ void put(uint32_t value, uint32_t bits) {
    acc |= value << fill;
    const uint32_t end = fill + bits;
    if (end >= 32) {
      if (shared) {
        atomicOr(&words[word], acc);
      } else {
        words[word] = acc;
      }
      shared = false;
      ++word;
      acc = value >> (32 - fill);
      fill = end - 32;
    } else {
      fill = end;
    }
  }
  __device__ void finish() {
    if (fill > 0) atomicOr(&words[word], acc);
    fill = 0;
  }
};

__device__ __forceinline__ uint32_t low_bits(uint32_t v, uint32_t bits) {
  return bits >= 32 ? v : v & ((1u << bits) - 1u);
}

// A thread's chunk of the position-major order j = e * groups + g (the order of the fixed
// payload and of the Huffman sub-streams), walked without a division per element: group g,
// position e, and the row-major index of the element in the quantization arrays (keys: j
// itself; values: g * group_size + e).
struct ChunkWalk {
  uint32_t g, e, index;
  uint32_t groups, step;
  bool is_value;
  __device__ ChunkWalk(const Shape& sh, uint32_t j)
      : g(j % sh.num_groups),
        e(j / sh.num_groups),
        groups(sh.num_groups),
        step(sh.is_value ? sh.group_size : 1u),
        is_value(sh.is_value != 0) {
    index = is_value ? g * sh.group_size + e : j;
  }
  __device__ __forceinline__ void advance() {
    index += step;
    if (++g == groups) {
      g = 0;
      ++e;
      if (is_value) index = e;
    }
  }
};

// A symbol's codebook entry (reversed code | length << 24); length 0: the symbol is escaped.
// The callers handle escapes in a rarely taken branch of their own.
__device__ __forceinline__ uint32_t entry_of(const BookView& book, int32_t symbol) {
  const uint32_t i = uint32_t(symbol) - uint32_t(book.first_symbol);  // wraps below the first
  return i < book.num_symbols ? book.codes[i] : 0u;
}

template <kvc_dtype DT>
__global__ void __launch_bounds__(kThreads)
    encode_kernel(Shape sh, BookView book, const void* const* src_blocks, int64_t stride,
                  void* const* dst_blocks, uint32_t* block_bytes) {
  KVC_DYNAMIC_SHARED(uint8_t, smem);
  __shared__ EncodeState st;
  using Scan = device::BlockScan<StreamBits, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;

  const uint32_t n = sh.num_elements(), groups = sh.num_groups, tid = threadIdx.x;
  const QuantSmem q = QuantSmem::carve(smem, n, groups);
  uint32_t* stream_bits = reinterpret_cast<uint32_t*>(smem + QuantSmem::bytes(n, groups));
  uint32_t* stream_escapes = stream_bits + sh.num_substreams;
  const void* src = src_blocks[blockIdx.x];
  uint8_t* dst = static_cast<uint8_t*>(dst_blocks[blockIdx.x]);
  // Pointers live in device memory, so the host could not check them: a missing or misaligned
  // one gets size 0 (no block) rather than a fault that would take down the context.
  if (src == nullptr || dst == nullptr || reinterpret_cast<uintptr_t>(dst) % 4 != 0) {
    if (tid == 0) block_bytes[blockIdx.x] = 0;
    return;
  }

  if (tid == 0) st.escape_bits = 0;
  quantize_block<DT>(sh, src, stride, q, st.sum);
  if (st.sum.nonfinite) {
    if (tid == 0) block_bytes[blockIdx.x] = 0;
    return;
  }

  // Each thread takes a contiguous chunk of the position-major order. The chunk is odd: for
  // keys that order is row-major, so thread t reads vals[t * chunk + k], and an even stride
  // (32 for 64 x 128 blocks) would put a warp's reads into one bank. Any partition gives the
  // same offsets, hence the same bytes.
  const uint32_t chunk = ((n + kThreads - 1) / kThreads) | 1u;
  const uint32_t begin = min(n, tid * chunk), end = min(n, begin + chunk);
  const bool try_huffman =
      st.sum.quantized && book.table != nullptr && sh.entropy != KVC_ENTROPY_FIXED;
  const uint32_t per_stream = sh.group_size / sh.num_substreams;
  const uint32_t stream_len = per_stream * groups;  // elements of a sub-stream
  const uint32_t escape_entry = book.table != nullptr ? book.codes[book.num_symbols] : 0u;
  StreamBits before{0, 0, 0};
  uint32_t before_bits = 0;  // the chunk's offset in its sub-stream, once the escape width is known
  if (try_huffman) {
    // Code bits and escapes of the chunk, and of every sub-stream that ends in it: a sub-stream
    // that also starts in it is complete here; the one that started before needs the scan's
    // prefix. The escape payload's width is the widest escaped symbol of the block.
    StreamBits mine{0, 0, 0};
    uint32_t escape = 0, pending_stream = UINT32_MAX;
    StreamBits pending{0, 0, 0};
    if (begin < end) {
      // One inner loop per sub-stream the chunk touches.
      ChunkWalk at(sh, begin);
      uint32_t j = begin, stream = begin / stream_len;
      bool started = begin % stream_len == 0;
      while (j < end) {
        const uint32_t stream_end = (stream + 1) * stream_len, stop = min(end, stream_end);
        if (started) mine = {1, 0, 0};
        uint32_t bits = 0, escapes = 0;
        for (; j < stop; ++j, at.advance()) {
          const int32_t s = q.vals[at.index] - q.cmean[at.g];
          const uint32_t length = entry_of(book, s) >> 24;
          bits += length;
          if (length == 0) {
            ++escapes;
            const uint32_t w = f::signed_bit_width(s);
            escape = w > escape ? w : escape;
          }
        }
        mine.bits += bits + escapes * (escape_entry >> 24);  // escapes' codes
        mine.escapes += escapes;
        if (stop == stream_end) {
          if (started) {
            stream_bits[stream] = mine.bits;
            stream_escapes[stream] = mine.escapes;
          } else {
            pending = mine;
            pending_stream = stream;
          }
        }
        ++stream;
        started = true;
      }
    }
    atomicMax(&st.escape_bits, escape);
    Scan(scan_storage).ExclusiveScan(mine, before, StreamBits{0, 0, 0}, StreamBitsOp{});
    if (pending_stream != UINT32_MAX) {
      stream_bits[pending_stream] = before.bits + pending.bits;
      stream_escapes[pending_stream] = before.escapes + pending.escapes;
    }
    __syncthreads();
    before_bits = before.bits + before.escapes * st.escape_bits;
  }

  if (tid == 0) {
    // Candidates in order of preference on equal size: fixed, Huffman, verbatim (as on the CPU).
    const QuantSummary& s = st.sum;
    f::BlockLayout best{};
    bool have = false;
    if (s.quantized && sh.entropy != KVC_ENTROPY_HUFFMAN) {
      best = f::make_layout(sh.is_value, sh.num_tokens, sh.head_dim, sh.group_size, f::kFixed,
                            sh.relative, s.fixed_width, s.min_lo,
                            f::bit_width(uint32_t(int64_t(s.min_hi) - s.min_lo)), sh.num_substreams,
                            0, 0, (uint64_t(n) * s.fixed_width + 7) / 8);
      have = true;
    }
    if (try_huffman) {
      uint64_t end_bytes = 0;
      for (uint32_t k = 0; k < sh.num_substreams; ++k) {
        end_bytes +=
            (uint64_t(stream_bits[k]) + uint64_t(stream_escapes[k]) * st.escape_bits + 7u) / 8u;
        stream_bits[k] = uint32_t(end_bytes < 0xFFFFFFFFu ? end_bytes : 0xFFFFFFFFu);  // ends
      }
      const f::BlockLayout h = f::make_layout(
          sh.is_value, sh.num_tokens, sh.head_dim, sh.group_size, f::kHuffman, sh.relative,
          st.escape_bits, s.mean_lo, f::bit_width(uint32_t(int64_t(s.mean_hi) - s.mean_lo)),
          sh.num_substreams, book.id, 0, end_bytes);
      if (end_bytes <= f::kMaxStreamEnd && (!have || h.block_bytes < best.block_bytes)) {
        best = h;
        have = true;
      }
    }
    const f::BlockLayout raw =
        f::make_layout(sh.is_value, sh.num_tokens, sh.head_dim, sh.group_size, f::kRaw, sh.relative,
                       0, 0, 0, 0, 0, DT, uint64_t(n) * f::dtype_bytes(DT));
    if (!have || raw.block_bytes < best.block_bytes) best = raw;
    st.layout = best;
  }
  __syncthreads();
  const f::BlockLayout L = st.layout;

  uint32_t* words = reinterpret_cast<uint32_t*>(dst);  // blocks are 4-byte aligned
  for (uint32_t w = tid; w < L.block_bytes / 4; w += blockDim.x) words[w] = 0;
  __syncthreads();
  if (tid == 0) {
    f::write_header(L, dst);
    block_bytes[blockIdx.x] = L.block_bytes;
  }

  if (L.encoding == f::kRaw) {
    // Row-major [num_tokens, head_dim] of the input's own bytes.
    ElementWalk at(sh, tid, blockDim.x);
    for (uint32_t i = tid; i < n; i += blockDim.x, at.advance()) {
      const size_t from = size_t(at.t) * size_t(stride) + at.channel();
      if constexpr (DT == KVC_DTYPE_FP32) {
        reinterpret_cast<uint32_t*>(dst + L.payload_offset)[i] =
            static_cast<const uint32_t*>(src)[from];
      } else {
        reinterpret_cast<uint16_t*>(dst + L.payload_offset)[i] =
            static_cast<const uint16_t*>(src)[from];
      }
    }
    return;
  }

  if (L.per_group_step) {
    for (uint32_t g = tid; g < groups; g += blockDim.x) {
      reinterpret_cast<uint16_t*>(dst + L.steps_offset)[g] = f::float_to_bf16_down(q.step[g]);
    }
  } else if (tid == 0) {
    words[L.steps_offset / 4] = f::float_bits(q.step[0]);
  }
  const int32_t* centers = L.encoding == f::kFixed ? q.cmin : q.cmean;
  if (L.center_bits > 0) {
    gather_bits(words + L.centers_offset / 4, groups, L.center_bits, [&](uint32_t g) {
      return uint64_t(uint32_t(int64_t(centers[g]) - L.center_base));
    });
  }
  if (begin >= end) return;

  WordWriter out;
  ChunkWalk at(sh, begin);
  if (L.encoding == f::kFixed) {
    // The chunk's fields are one run: field j at bit payload_offset * 8 + j * code_bits.
    if (L.code_bits == 0) return;
    out.start(words, L.payload_offset * 8 + begin * L.code_bits);
    for (uint32_t j = begin; j < end; ++j, at.advance()) {
      out.put(low_bits(uint32_t(q.vals[at.index] - q.cmin[at.g]), L.code_bits), L.code_bits);
    }
    out.finish();
    return;
  }

  // Huffman: stream ends, then the chunk's codes, one run per sub-stream it touches, from the
  // scan's offsets (a sub-stream starts at its byte offset in the payload).
  for (uint32_t k = tid; k < sh.num_substreams; k += blockDim.x) {
    reinterpret_cast<uint16_t*>(dst + L.stream_ends_offset)[k] = uint16_t(stream_bits[k]);
  }
  auto stream_start = [&](uint32_t k) {
    return (L.payload_offset + (k == 0 ? 0u : stream_bits[k - 1])) * 8;
  };
  uint32_t j = begin, stream = begin / stream_len;
  uint32_t bit = stream_start(stream) + (begin % stream_len == 0 ? 0u : before_bits);
  while (j < end) {
    const uint32_t stop = min(end, (stream + 1) * stream_len);
    out.start(words, bit);
    for (; j < stop; ++j, at.advance()) {
      const int32_t s = q.vals[at.index] - q.cmean[at.g];
      const uint32_t entry = entry_of(book, s);
      uint32_t value = entry & 0xFFFFFFu, bits = entry >> 24;
      if (bits == 0) {  // the escape's code, then the symbol's own bits
        out.put(escape_entry & 0xFFFFFFu, escape_entry >> 24);
        value = low_bits(uint32_t(s), L.code_bits);
        bits = L.code_bits;
      }
      out.put(value, bits);
    }
    out.finish();
    if (++stream < sh.num_substreams) bit = stream_start(stream);
  }
}

}  // namespace kvc::kernels
