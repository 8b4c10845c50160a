// SPDX-License-Identifier: Apache-2.0
// Pieces the codec kernels share: the block shape, the codebook view, element access, and the
// block-level quantization that encode and histogram both start with. One CUDA thread block
// works on one KV block; per-element logic comes from kernels/common/format.cuh, the same
// functions the CPU reference runs.
#pragma once

#include <kvcomp/kvcomp.h>

#include <climits>
#include <cstdint>

#include "kernels/common/device_api.cuh"
#include "kernels/common/format.cuh"

namespace kvc::kernels {
namespace f = kvc::format;

constexpr int kThreads = 256;

struct Shape {
  uint32_t is_value;
  uint32_t num_tokens, head_dim, group_size, num_groups, num_substreams;
  uint32_t relative;
  float error_bound;
  uint32_t entropy;  // kvc_entropy
  __device__ uint32_t num_elements() const { return num_tokens * head_dim; }
  // Row-major index of element e of group g (f::element_coord without its division: a value
  // group's elements are group_size consecutive elements of a row).
  __device__ uint32_t element_index(uint32_t g, uint32_t e) const {
    return is_value ? g * group_size + e : e * head_dim + g;
  }
};

// Walks the row-major elements i, i + stride, ... of a block without a division per element:
// channel c = seg * unit + pos, with unit the value group size (keys: head_dim, so seg = 0 and
// pos = c), so that group and position come out of it as well. Divides once, at construction.
struct ElementWalk {
  uint32_t t, seg, pos;                     // element (t, seg * unit + pos)
  uint32_t unit, segments, dt, dseg, dpos;  // stride = dt * head_dim + dseg * unit + dpos
  __device__ ElementWalk(const Shape& sh, uint32_t i, uint32_t stride) {
    unit = sh.is_value ? sh.group_size : sh.head_dim;
    segments = sh.head_dim / unit;
    t = i / sh.head_dim;
    const uint32_t c = i % sh.head_dim;
    seg = c / unit;
    pos = c % unit;
    dt = stride / sh.head_dim;
    const uint32_t dc = stride % sh.head_dim;
    dseg = dc / unit;
    dpos = dc % unit;
  }
  __device__ __forceinline__ uint32_t channel() const { return seg * unit + pos; }
  // Group and position of the element (f::group_of, f::position_of).
  __device__ __forceinline__ uint32_t group(bool is_value) const {
    return is_value ? t * segments + seg : pos;
  }
  __device__ __forceinline__ uint32_t position(bool is_value) const { return is_value ? pos : t; }
  __device__ __forceinline__ void advance() {
    pos += dpos;
    seg += dseg;
    if (pos >= unit) {
      pos -= unit;
      ++seg;
    }
    t += dt;
    if (seg >= segments) {
      seg -= segments;
      ++t;
    }
  }
};

// Lanes that share one group in the per-group passes: value groups are consecutive elements of
// a row, so a power of two of lanes (up to 32, at most the group size) read them side by side,
// free of bank conflicts, and combine with shuffles. Key groups are channels (a column, element
// stride head_dim), so one thread per group already reads consecutive words across a warp.
__device__ __forceinline__ uint32_t lanes_per_group(const Shape& sh) {
  if (!sh.is_value) return 1;
  uint32_t w = 1;
  while (w < 32 && 2 * w <= sh.group_size) w *= 2;
  return w;
}

// One 32-bit word of a 4-byte-aligned byte array.
__device__ __forceinline__ uint32_t load_word(const uint8_t* base, uint32_t i) {
#if defined(__CUDA_ARCH__)
  return reinterpret_cast<const uint32_t*>(base)[i];
#else
  uint32_t w;
  __builtin_memcpy(&w, base + size_t(i) * 4, 4);  // the host emulation: no aliasing through casts
  return w;
#endif
}

// A codebook in device memory. codes[i] = reversed code | length << 24; table as in
// kvc::Codebook::decode_table(). table == nullptr: no codebook.
struct BookView {
  const uint32_t* table;
  const uint32_t* codes;
  int32_t first_symbol;
  uint32_t num_symbols;  // also the escape index
  uint32_t max_code_length;
  uint32_t id;

  __device__ uint32_t index_of(int32_t symbol) const {
    const int64_t i = int64_t(symbol) - first_symbol;
    return (i >= 0 && i < int64_t(num_symbols) && (codes[i] >> 24) != 0) ? uint32_t(i)
                                                                         : num_symbols;
  }
};

// fp16 goes through the hardware conversion (exact; a NaN stays a NaN, which is all the
// encoder asks of it: such a block is rejected as non-finite).
template <kvc_dtype DT>
__device__ float load_input(const void* base, size_t i) {
  if constexpr (DT == KVC_DTYPE_FP32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (DT == KVC_DTYPE_BF16) {
    return f::bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return device::half_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

// The bits f::float_to_half_saturate / f::float_to_bf16_saturate give, through the hardware's
// round-to-nearest-even conversion: the same clamp first, and a NaN (only a corrupt step makes
// one) given the CPU's bits, since the hardware's canonical NaN differs.
template <kvc_dtype DT>
__device__ __forceinline__ uint16_t to_half_saturate(float v) {
  constexpr bool kBF16 = DT == KVC_DTYPE_BF16;
  const float m = kBF16 ? 3.38953139e38f : 65504.0f;
  const float c = v > m ? m : (v < -m ? -m : v);
  if (c != c) {
    const uint32_t u = f::float_bits(c);
    return kBF16 ? uint16_t((u >> 16) | 0x40u) : uint16_t(((u >> 16) & 0x8000u) | 0x7E00u);
  }
  return device::half_rn<kBF16>(c);
}

template <kvc_dtype DT>
__device__ void store_output(void* base, size_t i, float v) {
  if constexpr (DT == KVC_DTYPE_FP32) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = to_half_saturate<DT>(v);
  }
}

// Output conversion where no value can be a NaN: every step of the block is finite, so a
// dequantized value is finite or an overflow to +-inf, and the clamp of to_half_saturate
// (fminf/fmaxf, which keep finite values and infinities as that clamp does) and the hardware's
// round-to-nearest-even give its bits without its NaN test. Pairs of adjacent elements of a row
// leave in one 4-byte (fp32: 8-byte) store; `i` even, the destination aligned for it.
template <kvc_dtype OUT>
__device__ __forceinline__ float clamp_finite(float v) {
  constexpr float m = OUT == KVC_DTYPE_BF16 ? 3.38953139e38f : 65504.0f;
  return fminf(fmaxf(v, -m), m);
}
template <kvc_dtype OUT>
__device__ __forceinline__ void store_output_finite(void* base, size_t i, float v) {
  if constexpr (OUT == KVC_DTYPE_FP32) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = device::half_rn<OUT == KVC_DTYPE_BF16>(clamp_finite<OUT>(v));
  }
}
template <kvc_dtype OUT>
__device__ __forceinline__ void store_pair_finite(void* base, size_t i, float a, float b) {
  if constexpr (OUT == KVC_DTYPE_FP32) {
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<float2*>(static_cast<float*>(base) + i) = make_float2(a, b);
#else
    const float v[2] = {a, b};
    __builtin_memcpy(static_cast<float*>(base) + i, v, 8);
#endif
  } else {
    const uint32_t v =
        device::pack2<OUT == KVC_DTYPE_BF16>(clamp_finite<OUT>(a), clamp_finite<OUT>(b));
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(base) + i) = v;
#else
    __builtin_memcpy(static_cast<uint16_t*>(base) + i, &v, 4);
#endif
  }
}

// Loads 16 bytes (global or shared memory) at a 16-byte-aligned address.
__device__ __forceinline__ uint4 load_16(const void* p) {
#if defined(__CUDA_ARCH__)
  return *static_cast<const uint4*>(p);
#else
  uint4 v;
  __builtin_memcpy(&v, p, 16);  // the host emulation: no aliasing through casts
  return v;
#endif
}

// Stores 16 bytes at a 16-byte-aligned address.
__device__ __forceinline__ void store_16(void* p, uint32_t x, uint32_t y, uint32_t z, uint32_t w) {
#if defined(__CUDA_ARCH__)
  *static_cast<uint4*>(p) = make_uint4(x, y, z, w);
#else
  const uint32_t v[4] = {x, y, z, w};
  __builtin_memcpy(p, v, 16);
#endif
}

// A 16-bit input element's float (load_input's conversion).
template <kvc_dtype DT>
__device__ __forceinline__ float half_bits_to_float(uint16_t h) {
  if constexpr (DT == KVC_DTYPE_BF16) {
    return f::bf16_to_float(h);
  } else {
    return device::half_to_float(h);
  }
}

// Two 16-bit lanes' unsigned maxima (__vmaxu2).
__device__ __forceinline__ uint32_t max_u16x2(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __vmaxu2(a, b);
#else
  const uint32_t lo = (a & 0xFFFFu) > (b & 0xFFFFu) ? a & 0xFFFFu : b & 0xFFFFu;
  const uint32_t hi = (a >> 16) > (b >> 16) ? a >> 16 : b >> 16;
  return lo | hi << 16;
#endif
}

// Loads a block's elements (rows `stride` elements apart) as float bits into vals (row-major)
// and returns the float bits of the largest |x| (0x7F800000 or above: an inf or a NaN). Where
// rows, the stride and the source allow, 16-byte loads of 8 (fp32: 4) consecutive elements of a
// row; 16-bit inputs take their maximum on the |x| bits of the input type (its order is the
// order of the values, and the conversion to float keeps it), two lanes per instruction. Else
// one element at a time. All threads of the block call it; it does not synchronize.
template <kvc_dtype DT>
__device__ uint32_t load_block(const Shape& sh, const void* src, int64_t stride, int32_t* vals) {
  const uint32_t n = sh.num_elements(), tid = threadIdx.x;
  constexpr uint32_t V = DT == KVC_DTYPE_FP32 ? 4 : 8;  // elements per 16 bytes
  constexpr uint32_t kBytes = DT == KVC_DTYPE_FP32 ? 4 : 2;
  const bool vector =
      sh.head_dim % V == 0 && stride % V == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (!vector) {
    uint32_t local_max = 0;
    ElementWalk at(sh, tid, blockDim.x);
    for (uint32_t i = tid; i < n; i += blockDim.x, at.advance()) {
      const float x = load_input<DT>(src, size_t(at.t) * size_t(stride) + at.channel());
      const uint32_t a = f::float_bits(x) & 0x7FFFFFFFu;
      local_max = a > local_max ? a : local_max;
      vals[i] = int32_t(f::float_bits(x));
    }
    return local_max;
  }
  // Units of V elements: unit u is element u * V, row t = u / row_units, column cu.
  const uint32_t units = n / V, row_units = sh.head_dim / V;
  const uint32_t dt = blockDim.x / row_units, dcu = blockDim.x % row_units;
  uint32_t cu = tid % row_units;
  uint64_t off = uint64_t(tid / row_units) * uint64_t(stride) + cu * V;  // input element
  const uint64_t inc = uint64_t(dt) * uint64_t(stride) + dcu * V;
  const uint64_t wrap = uint64_t(stride) - sh.head_dim;  // to the next row's start
  const uint8_t* base = static_cast<const uint8_t*>(src);
  uint32_t m = 0;  // fp32: |x| bits; 16-bit inputs: two lanes of |x| bits of the input type
  for (uint32_t u = tid; u < units; u += blockDim.x) {
    const uint4 w = load_16(base + off * kBytes);
    const uint32_t in[4] = {w.x, w.y, w.z, w.w};
    uint32_t out[8];
    if constexpr (DT == KVC_DTYPE_FP32) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        out[k] = in[k];
        const uint32_t a = in[k] & 0x7FFFFFFFu;
        m = a > m ? a : m;
      }
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        m = max_u16x2(m, in[k] & 0x7FFF7FFFu);
        out[2 * k] = f::float_bits(half_bits_to_float<DT>(uint16_t(in[k] & 0xFFFFu)));
        out[2 * k + 1] = f::float_bits(half_bits_to_float<DT>(uint16_t(in[k] >> 16)));
      }
    }
    int32_t* to = vals + size_t(u) * V;
#pragma unroll
    for (uint32_t k = 0; k < V; k += 4)
      store_16(to + k, out[k], out[k + 1], out[k + 2], out[k + 3]);
    off += inc;
    cu += dcu;
    if (cu >= row_units) {
      cu -= row_units;
      off += wrap;
    }
  }
  if constexpr (DT == KVC_DTYPE_FP32) {
    return m;
  } else {
    const uint32_t h = (m & 0xFFFFu) > (m >> 16) ? m & 0xFFFFu : m >> 16;
    return f::float_bits(half_bits_to_float<DT>(uint16_t(h)));
  }
}

// Shared-memory arrays of one block's quantization, carved from dynamic shared memory.
struct QuantSmem {
  int32_t* vals;   // [N]: input float bits, then codes (row-major)
  float* step;     // [G]
  float* bound;    // [G]
  int32_t* cmin;   // [G] smallest code: the fixed-width centre
  int32_t* cmax;   // [G]
  int32_t* cmean;  // [G] rounded mean code: the Huffman centre

  static __host__ __device__ size_t bytes(uint32_t n, uint32_t g) {
    return size_t(n) * 4 + size_t(g) * 4 * 5;
  }
  __device__ static QuantSmem carve(uint8_t* smem, uint32_t n, uint32_t g) {
    QuantSmem q;
    q.vals = reinterpret_cast<int32_t*>(smem);
    q.step = reinterpret_cast<float*>(q.vals + n);
    q.bound = q.step + g;
    q.cmin = reinterpret_cast<int32_t*>(q.bound + g);
    q.cmax = q.cmin + g;
    q.cmean = q.cmax + g;
    return q;
  }
};

// Block-wide results of quantize_block.
struct QuantSummary {
  uint32_t nonfinite;        // some input is inf or NaN
  uint32_t quantized;        // every element met its bound with a code
  uint32_t max_abs_bits;     // float bits of the largest |x|
  uint32_t fixed_width;      // widest (max - min) code range of a group, in bits
  int32_t min_lo, min_hi;    // range of the groups' smallest codes
  int32_t mean_lo, mean_hi;  // range of the groups' mean codes
};

// Loads the block (rows `stride` elements apart), quantizes it exactly as the CPU reference
// does, and fills the per-group centres. All threads of the block must call it, with blockDim.x
// a multiple of 32.
template <kvc_dtype DT>
__device__ void quantize_block(const Shape& sh, const void* src, int64_t stride, const QuantSmem& q,
                               QuantSummary& sum) {
  const uint32_t n = sh.num_elements();
  const uint32_t tid = threadIdx.x;
  const bool is_value = sh.is_value != 0;
  if (tid == 0) {
    sum.max_abs_bits = 0;
    sum.fixed_width = 0;
    sum.min_lo = sum.mean_lo = INT_MAX;
    sum.min_hi = sum.mean_hi = INT_MIN;
  }
  const uint32_t local_max = load_block<DT>(sh, src, stride, q.vals);
  const bool bad = local_max >= 0x7F800000u;  // an inf or a NaN: |x|'s bits are the largest
  const bool nonfinite = __syncthreads_or(bad);
  if (tid == 0) sum.nonfinite = nonfinite;
  if (nonfinite) {
    if (tid == 0) sum.quantized = 0;
    __syncthreads();
    return;
  }
  atomicMax(&sum.max_abs_bits, local_max);  // max of non-negative floats: order-free
  __syncthreads();

  // Per-group passes: `w` lanes per group (lanes_per_group), each over every w-th position,
  // combined with shuffles. Every lane runs the same trips, so the shuffles see whole warps.
  const uint32_t w = lanes_per_group(sh), r = tid % w, per_pass = blockDim.x / w;
  const uint32_t G = sh.group_size;
  const float max_abs = f::bits_float(sum.max_abs_bits);
  for (uint32_t base = 0; base < sh.num_groups; base += per_pass) {
    const uint32_t g = base + tid / w;
    const bool valid = g < sh.num_groups;
    f::GroupStep gs{f::step_for_bound(sh.error_bound, max_abs), sh.error_bound};
    if (sh.relative) {
      // The group's minimum and maximum. Which of equal values is taken (-0 or +0) does not
      // change the step or the bound (relative_group_step), so any order of comparison will do.
      float lo = 3.4028235e38f, hi = -3.4028235e38f;
      for (uint32_t p = r; valid && p < G; p += w) {
        const float x = f::bits_float(uint32_t(q.vals[sh.element_index(g, p)]));
        lo = x < lo ? x : lo;
        hi = x < hi ? hi : x;
      }
      for (uint32_t o = w / 2; o > 0; o /= 2) {
        const float olo = __shfl_xor_sync(0xFFFFFFFFu, lo, o);
        const float ohi = __shfl_xor_sync(0xFFFFFFFFu, hi, o);
        lo = olo < lo ? olo : lo;
        hi = ohi < hi ? hi : ohi;
      }
      gs = f::relative_group_step(sh.error_bound, lo, hi);
    }
    if (valid && r == 0) {
      q.step[g] = gs.step;
      q.bound[g] = gs.bound;
    }
  }
  __syncthreads();

  bool failed = false;
  {
    // Element i's group: i / G for values (a value group is G consecutive elements of a row),
    // i % head_dim for keys, kept as quotient and remainder of one unit.
    const uint32_t unit = is_value ? G : sh.head_dim;
    const uint32_t dq = blockDim.x / unit, dr = blockDim.x % unit;
    uint32_t quot = tid / unit, rem = tid % unit;
    for (uint32_t i = tid; i < n; i += blockDim.x) {
      const uint32_t g = is_value ? quot : rem;
      int32_t code = 0;
      failed |=
          !f::quantize_element(f::bits_float(uint32_t(q.vals[i])), q.step[g], q.bound[g], code);
      q.vals[i] = code;
      quot += dq;
      rem += dr;
      if (rem >= unit) {
        rem -= unit;
        ++quot;
      }
    }
  }
  const bool quantized = !__syncthreads_or(failed);
  if (tid == 0) sum.quantized = quantized;
  if (!quantized) {
    __syncthreads();
    return;
  }

  for (uint32_t base = 0; base < sh.num_groups; base += per_pass) {
    const uint32_t g = base + tid / w;
    const bool valid = g < sh.num_groups;
    int32_t lo = INT_MAX, hi = INT_MIN;
    long long total = 0;
    for (uint32_t p = r; valid && p < G; p += w) {
      const int32_t v = q.vals[sh.element_index(g, p)];
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
      total += v;
    }
    for (uint32_t o = w / 2; o > 0; o /= 2) {
      const int32_t olo = __shfl_xor_sync(0xFFFFFFFFu, lo, o);
      const int32_t ohi = __shfl_xor_sync(0xFFFFFFFFu, hi, o);
      total += __shfl_xor_sync(0xFFFFFFFFu, total, o);
      lo = olo < lo ? olo : lo;
      hi = ohi > hi ? ohi : hi;
    }
    if (valid && r == 0) {
      const int32_t mean = f::mean_center(total, G);
      q.cmin[g] = lo;
      q.cmax[g] = hi;
      q.cmean[g] = mean;
      atomicMax(&sum.fixed_width, f::bit_width(uint32_t(int64_t(hi) - lo)));
      atomicMin(&sum.min_lo, lo);
      atomicMax(&sum.min_hi, lo);
      atomicMin(&sum.mean_lo, mean);
      atomicMax(&sum.mean_hi, mean);
    }
  }
  __syncthreads();
}

// Reads `bits` (<= 32) bits at bit position `pos` of an LSB-first stream of `size` bytes;
// bytes past the end read as zero, so corrupt offsets can never reach outside. Where the stream
// is 4-byte aligned (blocks and their sections are) and the two words holding the field lie
// inside it, two word loads replace five byte loads; the bits are the same.
__device__ inline uint32_t read_bits(const uint8_t* data, uint32_t size, uint64_t pos,
                                     uint32_t bits) {
  if (bits == 0) return 0;
  uint64_t window = 0;
  const uint64_t word = pos >> 5;
  if (reinterpret_cast<uintptr_t>(data) % 4 == 0 && (word + 2) * 4 <= size) {
    // Bits [32 * word, 32 * word + 64) hold [pos, pos + bits): (pos & 31) + bits <= 63.
    uint32_t w[2];
#if defined(__CUDA_ARCH__)
    w[0] = reinterpret_cast<const uint32_t*>(data)[word];
    w[1] = reinterpret_cast<const uint32_t*>(data)[word + 1];
#else
    __builtin_memcpy(w, data + word * 4, 8);  // the host emulation: no aliasing through casts
#endif
    window = (uint64_t(w[0]) | (uint64_t(w[1]) << 32)) >> (pos & 31u);
  } else {
    const uint64_t first = pos >> 3;
    for (uint32_t k = 0; k < 5; ++k) {
      const uint64_t at = first + k;
      if (at < size) window |= uint64_t(data[at]) << (8 * k);
    }
    window >>= (pos & 7u);
  }
  return bits >= 32 ? uint32_t(window) : uint32_t(window & ((uint64_t(1) << bits) - 1u));
}

// ORs `bits` (<= 32) bits of value into LSB-first words at bit position pos. atomicOr makes the
// result independent of the order in which threads write neighbouring fields.
__device__ inline void or_bits(uint32_t* words, uint64_t pos, uint32_t value, uint32_t bits) {
  if (bits == 0) return;
  const uint64_t v = bits >= 32 ? value : (value & ((1u << bits) - 1u));
  const uint32_t w = uint32_t(pos >> 5), shift = uint32_t(pos & 31u);
  atomicOr(&words[w], uint32_t(v << shift));
  if (shift + bits > 32) atomicOr(&words[w + 1], uint32_t(v >> (32 - shift)));
}

}  // namespace kvc::kernels
