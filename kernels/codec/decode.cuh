// SPDX-License-Identifier: Apache-2.0
// Decode kernel: one thread block per compressed block, equal element for element to the CPU
// reference decoder. Thread 0 parses and checks the header against the bytes available; all
// reads after that stay inside the block (read_bits and BitReader bound every access).
#pragma once

#include "kernels/codec/device_common.cuh"

namespace kvc::kernels {

// Dynamic shared memory: per-group steps and centres.
__host__ __device__ inline size_t decode_smem_bytes(uint32_t g) { return size_t(g) * 8; }

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

template <kvc_dtype OUT>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(Shape sh, BookView book, const void* const* src_blocks, const uint32_t* src_bytes,
                  void* const* dst_blocks, int64_t stride, kvc_status_t* block_status) {
  KVC_DYNAMIC_SHARED(uint8_t, smem);
  __shared__ f::BlockLayout L;
  __shared__ kvc_status_t status;
  __shared__ uint32_t corrupt;

  const uint32_t tid = threadIdx.x, n = sh.num_elements(), groups = sh.num_groups;
  const uint8_t* src = static_cast<const uint8_t*>(src_blocks[blockIdx.x]);
  void* dst = dst_blocks[blockIdx.x];
  if (tid == 0) {
    // Pointers live in device memory, so only the kernel can check them.
    const bool usable = src != nullptr && dst != nullptr &&
                        reinterpret_cast<uintptr_t>(dst) % (OUT == KVC_DTYPE_FP32 ? 4 : 2) == 0;
    status =
        usable ? check_block(sh, book, src, src_bytes[blockIdx.x], L) : KVC_ERROR_INVALID_ARGUMENT;
    corrupt = 0;
  }
  __syncthreads();
  if (status != KVC_SUCCESS) {
    if (tid == 0) block_status[blockIdx.x] = status;
    return;
  }
  const uint8_t* payload = src + L.payload_offset;
  auto out_index = [&](uint32_t t, uint32_t c) { return size_t(t) * size_t(stride) + c; };

  if (L.encoding == f::kRaw) {
    const uint32_t es = f::dtype_bytes(L.raw_dtype);
    for (uint32_t i = tid; i < n; i += blockDim.x) {
      const uint8_t* at = payload + size_t(i) * es;
      const float v = L.raw_dtype == KVC_DTYPE_FP32   ? f::bits_float(f::load_u32(at))
                      : L.raw_dtype == KVC_DTYPE_BF16 ? f::bf16_to_float(f::load_u16(at))
                                                      : f::half_to_float(f::load_u16(at));
      store_output<OUT>(dst, out_index(i / sh.head_dim, i % sh.head_dim), v);
    }
    if (tid == 0) block_status[blockIdx.x] = KVC_SUCCESS;
    return;
  }

  float* step = reinterpret_cast<float*>(smem);
  uint32_t* center = reinterpret_cast<uint32_t*>(step + groups);  // wraps like the CPU's
  const uint32_t centers_bytes = L.stream_ends_offset - L.centers_offset;
  for (uint32_t g = tid; g < groups; g += blockDim.x) {
    step[g] = L.per_group_step ? f::bf16_to_float(f::load_u16(src + L.steps_offset + 2 * g))
                               : f::bits_float(f::load_u32(src + L.steps_offset));
    center[g] = uint32_t(L.center_base) + read_bits(src + L.centers_offset, centers_bytes,
                                                    uint64_t(g) * L.center_bits, L.center_bits);
  }
  __syncthreads();

  if (L.encoding == f::kFixed) {
    // Output order (coalesced stores); each element's bits found at its position-major index.
    for (uint32_t i = tid; i < n; i += blockDim.x) {
      const uint32_t t = i / sh.head_dim, c = i % sh.head_dim;
      const uint32_t g = f::group_of(L.is_value, sh.head_dim, sh.group_size, t, c);
      const uint32_t e = f::position_of(L.is_value, sh.group_size, t, c);
      const uint64_t j = uint64_t(e) * groups + g;
      const uint32_t u = read_bits(payload, L.payload_bytes, j * L.code_bits, L.code_bits);
      store_output<OUT>(dst, out_index(t, c), f::dequantize(int32_t(center[g] + u), step[g]));
    }
  } else {
    // One thread per sub-stream, decoding it front to back with the codebook's table.
    const uint32_t per_stream = sh.group_size / L.num_substreams;
    for (uint32_t s = tid; s < L.num_substreams; s += blockDim.x) {
      const uint32_t start = s == 0 ? 0u : f::load_u16(src + L.stream_ends_offset + 2 * (s - 1));
      const uint32_t end = f::load_u16(src + L.stream_ends_offset + 2 * s);
      f::BitReader in(payload + start, end - start);
      bool bad = false;
      for (uint32_t e = s * per_stream; e < (s + 1) * per_stream && !bad; ++e) {
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
          const f::Coord xy = f::element_coord(L.is_value, sh.head_dim, sh.group_size, g, e);
          store_output<OUT>(dst, out_index(xy.token, xy.channel),
                            f::dequantize(int32_t(center[g] + symbol), step[g]));
        }
      }
      if (bad || in.overrun()) atomicOr(&corrupt, 1u);
    }
  }
  __syncthreads();
  if (tid == 0) block_status[blockIdx.x] = corrupt ? KVC_ERROR_CORRUPT_DATA : KVC_SUCCESS;
}

}  // namespace kvc::kernels
