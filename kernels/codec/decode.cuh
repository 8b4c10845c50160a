// SPDX-License-Identifier: Apache-2.0
// Decode kernel: one warp per compressed block, equal element for element to the CPU reference
// decoder. Lane 0 parses and checks the header against the bytes available; all reads after
// that stay inside the block (read_bits and BitReader bound every access).
#pragma once

#include "kernels/codec/device_common.cuh"

namespace kvc::kernels {

// One warp per compressed block, so that every lane has work in a Huffman block too (a lane per
// sub-stream, at most 32); a thread block holds up to kThreads / 32 of them.
constexpr uint32_t kDecodeLanes = 32;
constexpr uint32_t kMaxDecodeWarps = kThreads / kDecodeLanes;

// Dynamic shared memory of one compressed block: per-group steps and centres.
__host__ __device__ inline size_t decode_smem_bytes(uint32_t g) { return size_t(g) * 8; }

// Warps (compressed blocks) per thread block: as many as fit in `smem_limit` bytes of shared
// memory per thread block, less `reserve` for the kernel's static shared memory; 1 to 8.
__host__ __device__ inline uint32_t decode_warps(uint32_t g, size_t smem_limit,
                                                 size_t reserve = 4096) {
  const size_t per_block = decode_smem_bytes(g);
  const size_t fit = smem_limit > reserve + per_block ? (smem_limit - reserve) / per_block : 1;
  return fit < kMaxDecodeWarps ? uint32_t(fit) : kMaxDecodeWarps;
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

  float* step = reinterpret_cast<float*>(smem + warp * decode_smem_bytes(groups));
  uint32_t* center = reinterpret_cast<uint32_t*>(step + groups);  // wraps like the CPU's
  const uint32_t centers_bytes = L.stream_ends_offset - L.centers_offset;
  for (uint32_t g = lane; g < groups; g += kDecodeLanes) {
    step[g] = L.per_group_step ? f::bf16_to_float(f::load_u16(src + L.steps_offset + 2 * g))
                               : f::bits_float(f::load_u32(src + L.steps_offset));
    center[g] = uint32_t(L.center_base) + read_bits(src + L.centers_offset, centers_bytes,
                                                    uint64_t(g) * L.center_bits, L.center_bits);
  }
  __syncwarp();

  // Groups and positions advance with the loops below instead of being divided out per element:
  // a value block's group g is (token, segment) = (g / segments, g % segments), and its element
  // at position p is channel segment * group_size + p; a key block's group is its channel.
  const uint32_t D = sh.head_dim, G = sh.group_size, segments = L.is_value ? D / G : 1;
  if (L.encoding == f::kFixed) {
    // Rows in order, lanes along the channels (coalesced stores); each element's bits found at
    // its position-major index.
    const uint32_t seg0 = lane / G, pos0 = lane % G;  // value blocks: lane's channel
    const uint32_t seg_step = kDecodeLanes / G, pos_step = kDecodeLanes % G;
    for (uint32_t t = 0; t < sh.num_tokens; ++t) {
      uint32_t seg = seg0, pos = pos0;
      for (uint32_t c = lane; c < D; c += kDecodeLanes) {
        const uint32_t g = L.is_value ? t * segments + seg : c;
        const uint32_t e = L.is_value ? pos : t;
        const uint64_t j = uint64_t(e) * groups + g;
        const uint32_t u = read_bits(payload, L.payload_bytes, j * L.code_bits, L.code_bits);
        store_output<OUT>(dst, out_index(t, c), f::dequantize(int32_t(center[g] + u), step[g]));
        seg += seg_step;
        pos += pos_step;
        if (pos >= G) {
          pos -= G;
          ++seg;
        }
      }
    }
  } else {
    // One lane per sub-stream, decoding it front to back with the codebook's table.
    const uint32_t per_stream = sh.group_size / L.num_substreams;
    for (uint32_t s = lane; s < L.num_substreams; s += kDecodeLanes) {
      const uint32_t start = s == 0 ? 0u : f::load_u16(src + L.stream_ends_offset + 2 * (s - 1));
      const uint32_t end = f::load_u16(src + L.stream_ends_offset + 2 * s);
      f::BitReader in(payload + start, end - start);
      bool bad = false;
      for (uint32_t e = s * per_stream; e < (s + 1) * per_stream && !bad; ++e) {
        uint32_t token = 0, seg = 0;  // value blocks: of group g
        for (uint32_t g = 0; g < groups; ++g) {
          const uint32_t entry = book.table[in.peek(book.max_code_length)];
          const uint32_t length = entry & 0xFFu;
          if (length == 0) {
            bad = true;
            break;
          }
          in.skip(length);
          uint32_t symbol = uint32_t(book.first_symbol) + (entry >> 8);
          if ((entry >> 8) == book.num_symbols) {
            if (L.code_bits == 0) {
              bad = true;
              break;
            }
            symbol = uint32_t(f::sign_extend(in.read(L.code_bits), L.code_bits));
          }
          const size_t at = L.is_value ? out_index(token, seg * G + e) : out_index(e, g);
          store_output<OUT>(dst, at, f::dequantize(int32_t(center[g] + symbol), step[g]));
          if (++seg == segments) {
            seg = 0;
            ++token;
          }
        }
      }
      if (bad || in.overrun()) atomicOr(&corrupt, 1u);
    }
  }
  __syncwarp();
  if (lane == 0) block_status[block] = corrupt ? KVC_ERROR_CORRUPT_DATA : KVC_SUCCESS;
}

}  // namespace kvc::kernels
