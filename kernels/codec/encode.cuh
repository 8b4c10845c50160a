// SPDX-License-Identifier: Apache-2.0
// Encode kernel: one thread block per KV block, byte-identical to the CPU reference encoder
// (src/cpu/codec_cpu.cpp). Quantization and the choice of encoding use the shared format.cuh
// functions; bit fields are placed either by gathering whole output words (fixed width,
// centres) or by atomicOr at offsets from a CUB block scan (Huffman), so that the bytes never
// depend on thread scheduling.
#pragma once

#include "kernels/codec/device_common.cuh"

namespace kvc::kernels {

// Segmented-scan element: the bits since the last sub-stream start, and whether one occurred.
struct StreamBits {
  uint32_t restarted;
  uint32_t bits;
};
struct StreamBitsOp {
  __device__ StreamBits operator()(const StreamBits& a, const StreamBits& b) const {
    return b.restarted ? b : StreamBits{a.restarted, a.bits + b.bits};
  }
};

struct EncodeState {
  QuantSummary sum;
  uint32_t escape_bits;
  f::BlockLayout layout;
};

// Dynamic shared memory: the quantization arrays, then one 32-bit counter per sub-stream.
__host__ __device__ inline size_t encode_smem_bytes(uint32_t n, uint32_t g, uint32_t s) {
  return QuantSmem::bytes(n, g) + size_t(s) * 4;
}

// Writes `count` values of `bits` bits (value(i) gives the i-th) as an LSB-first bit field
// starting at word `words`, one output word per thread iteration.
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
  const void* src = src_blocks[blockIdx.x];
  uint8_t* dst = static_cast<uint8_t*>(dst_blocks[blockIdx.x]);
  // Pointers live in device memory, so the host could not check them: a missing or misaligned
  // one gets size 0 (no block) rather than a fault that would take down the context.
  if (src == nullptr || dst == nullptr || reinterpret_cast<uintptr_t>(dst) % 4 != 0) {
    if (tid == 0) block_bytes[blockIdx.x] = 0;
    return;
  }

  if (tid == 0) st.escape_bits = 0;
  for (uint32_t s = tid; s < sh.num_substreams; s += blockDim.x) stream_bits[s] = 0;
  quantize_block<DT>(sh, src, stride, q, st.sum);
  if (st.sum.nonfinite) {
    if (tid == 0) block_bytes[blockIdx.x] = 0;
    return;
  }

  const bool try_huffman =
      st.sum.quantized && book.table != nullptr && sh.entropy != KVC_ENTROPY_FIXED;
  const uint32_t per_stream = sh.group_size / sh.num_substreams;
  auto symbol = [&](uint32_t g, uint32_t e) { return q.vals[sh.element_index(g, e)] - q.cmean[g]; };
  // Bits of element j in position-major order (j = e * groups + g).
  auto huffman_bits = [&](uint32_t j) {
    const int32_t s = symbol(j % groups, j / groups);
    const uint32_t index = book.index_of(s);
    return (book.codes[index] >> 24) + (index == book.num_symbols ? st.escape_bits : 0u);
  };
  if (try_huffman) {
    uint32_t escape = 0;
    for (uint32_t i = tid; i < n; i += blockDim.x) {
      const uint32_t g = i % groups, e = i / groups;
      const int32_t s = symbol(g, e);
      if (book.index_of(s) == book.num_symbols) {
        const uint32_t w = f::signed_bit_width(s);
        escape = w > escape ? w : escape;
      }
    }
    atomicMax(&st.escape_bits, escape);
    __syncthreads();
    for (uint32_t j = tid; j < n; j += blockDim.x) {
      atomicAdd(&stream_bits[(j / groups) / per_stream], huffman_bits(j));  // integer sum
    }
    __syncthreads();
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
      uint64_t end = 0;
      for (uint32_t k = 0; k < sh.num_substreams; ++k) {
        end += (stream_bits[k] + 7u) / 8u;
        stream_bits[k] = uint32_t(end < 0xFFFFFFFFu ? end : 0xFFFFFFFFu);  // now the end offsets
      }
      const f::BlockLayout h = f::make_layout(
          sh.is_value, sh.num_tokens, sh.head_dim, sh.group_size, f::kHuffman, sh.relative,
          st.escape_bits, s.mean_lo, f::bit_width(uint32_t(int64_t(s.mean_hi) - s.mean_lo)),
          sh.num_substreams, book.id, 0, end);
      if (end <= f::kMaxStreamEnd && (!have || h.block_bytes < best.block_bytes)) {
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
    for (uint32_t i = tid; i < n; i += blockDim.x) {
      const size_t from = size_t(i / sh.head_dim) * size_t(stride) + i % sh.head_dim;
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

  if (L.encoding == f::kFixed) {
    if (L.code_bits > 0) {
      gather_bits(words + L.payload_offset / 4, n, L.code_bits, [&](uint32_t j) {
        const uint32_t g = j % groups, e = j / groups;
        return uint64_t(uint32_t(q.vals[sh.element_index(g, e)] - q.cmin[g]));
      });
    }
    return;
  }

  // Huffman: stream ends, then each element's bits at its offset inside its sub-stream. The
  // offsets come from a segmented exclusive scan over contiguous per-thread chunks of the
  // position-major order (sub-streams are consecutive runs of it).
  for (uint32_t k = tid; k < sh.num_substreams; k += blockDim.x) {
    reinterpret_cast<uint16_t*>(dst + L.stream_ends_offset)[k] = uint16_t(stream_bits[k]);
  }
  const uint32_t stream_len = per_stream * groups;
  // An odd chunk: for keys, position-major order is row-major, so thread t reads vals[t * chunk
  // + k], and an even stride (32 for 64 x 128 blocks) would put a warp's reads into one bank.
  // Any partition gives the same offsets, hence the same bytes.
  const uint32_t chunk = ((n + kThreads - 1) / kThreads) | 1u;
  const uint32_t begin = min(n, tid * chunk), end = min(n, begin + chunk);
  StreamBits mine{0, 0};
  for (uint32_t j = begin; j < end; ++j) {
    if (j % stream_len == 0) mine = {1, 0};
    mine.bits += huffman_bits(j);
  }
  StreamBits before;
  Scan(scan_storage).ExclusiveScan(mine, before, StreamBits{0, 0}, StreamBitsOp{});
  uint32_t offset = before.bits;
  for (uint32_t j = begin; j < end; ++j) {
    if (j % stream_len == 0) offset = 0;
    const uint32_t stream = j / stream_len;
    const uint64_t start =
        uint64_t(L.payload_offset + (stream == 0 ? 0u : stream_bits[stream - 1])) * 8;
    const int32_t s = symbol(j % groups, j / groups);
    const uint32_t index = book.index_of(s);
    const uint32_t entry = book.codes[index];
    const uint32_t length = entry >> 24;
    or_bits(words, start + offset, entry & 0xFFFFFFu, length);
    if (index == book.num_symbols) {
      or_bits(words, start + offset + length, uint32_t(s), st.escape_bits);
    }
    offset += length + (index == book.num_symbols ? st.escape_bits : 0u);
  }
}

}  // namespace kvc::kernels
