// SPDX-License-Identifier: Apache-2.0
// The compressed block format (docs/format.md), defined once for the CPU backend and the CUDA
// kernels. Everything here is __host__ __device__ so that the CPU tests exercise the exact
// per-element logic the kernels run.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define KVC_HD __host__ __device__ __forceinline__
#else
#define KVC_HD inline
#endif

namespace kvc::format {

// ---- Block header: 32 bytes, little-endian -------------------------------------------------
constexpr uint32_t kBlockMagic = 0x6263766Bu;  // bytes "kvcb"
constexpr uint32_t kVersion = 1;
constexpr uint32_t kHeaderBytes = 32;

namespace offset {
constexpr uint32_t kMagic = 0;        // u32
constexpr uint32_t kVersion = 4;      // u8
constexpr uint32_t kEncoding = 5;     // u8: 0 raw, 1 fixed, 2 huffman
constexpr uint32_t kFlags = 6;        // u8: see flag::
constexpr uint32_t kCodeBits = 7;     // u8: fixed code width, or Huffman escape payload width
constexpr uint32_t kNumTokens = 8;    // u16
constexpr uint32_t kHeadDim = 10;     // u16
constexpr uint32_t kGroupSize = 12;   // u16
constexpr uint32_t kSubstreams = 14;  // u16: Huffman sub-streams; 0 otherwise
constexpr uint32_t kBlockBytes = 16;  // u32: whole block, a multiple of 4
constexpr uint32_t kCodebookId = 20;  // u32: Huffman blocks; 0 otherwise
constexpr uint32_t kCenterBase = 24;  // i32
constexpr uint32_t kCenterBits = 28;  // u8; bytes 29..31 are zero
}  // namespace offset

namespace flag {
constexpr uint32_t kValue = 1u << 0;         // kind: 0 K, 1 V
constexpr uint32_t kPerGroupStep = 1u << 1;  // bf16 step per group, else one f32 step
constexpr uint32_t kRawDtypeShift = 2;       // 2 bits: raw blocks' element dtype (kvc_dtype)
constexpr uint32_t kKnown = 0x0Fu;
}  // namespace flag

enum Encoding : uint32_t { kRaw = 0, kFixed = 1, kHuffman = 2 };

constexpr uint32_t kMaxCodeBits = 26;  // fixed widths and centre offsets never need more
constexpr uint32_t kMaxEscapeBits = 27;
constexpr int32_t kMaxAbsCode = 1 << 24;  // |code| < 2^24: codes convert to float exactly

KVC_HD uint32_t align4(uint32_t bytes) { return (bytes + 3u) & ~3u; }

// Number of bits needed for an unsigned value (0 for 0).
KVC_HD uint32_t bit_width(uint32_t v) {
  uint32_t n = 0;
  while (v != 0) {
    ++n;
    v >>= 1;
  }
  return n;
}

// ---- Little-endian field access ------------------------------------------------------------
KVC_HD uint32_t load_u8(const uint8_t* p) { return p[0]; }
KVC_HD uint32_t load_u16(const uint8_t* p) { return uint32_t(p[0]) | (uint32_t(p[1]) << 8); }
KVC_HD uint32_t load_u32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}
KVC_HD void store_u8(uint8_t* p, uint32_t v) { p[0] = uint8_t(v); }
KVC_HD void store_u16(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v);
  p[1] = uint8_t(v >> 8);
}
KVC_HD void store_u32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v);
  p[1] = uint8_t(v >> 8);
  p[2] = uint8_t(v >> 16);
  p[3] = uint8_t(v >> 24);
}

// ---- Floating point, bit-exact on host and device -------------------------------------------
KVC_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}
KVC_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}
// Neither an infinity nor a NaN, read from the bits (no dependence on fast-math flags).
KVC_HD bool is_finite(float v) { return (float_bits(v) & 0x7F800000u) != 0x7F800000u; }

KVC_HD float half_to_float(uint16_t h) {
  // Exponent and mantissa move into a float's fields, rebiased by 127 - 15 = 112; inf and NaN
  // (exponent 31) by 112 more, to 255. A subnormal half m * 2^-24 is read as the normal
  // 2^-14 * (1 + m / 1024) and 2^-14 taken off, exactly (zero included). No branch: host loops
  // over halves vectorize.
  const uint32_t fields = uint32_t(h & 0x7FFFu) << 13;
  const uint32_t exp = fields & 0x0F800000u;
  const uint32_t normal = fields + (112u << 23);
  const uint32_t subnormal = float_bits(bits_float(normal + (1u << 23)) - bits_float(113u << 23));
  const uint32_t is_special = 0u - uint32_t(exp == 0x0F800000u);
  const uint32_t is_subnormal = 0u - uint32_t(exp == 0);
  const uint32_t magnitude =
      ((normal + (is_special & (112u << 23))) & ~is_subnormal) | (subnormal & is_subnormal);
  return bits_float(magnitude | (uint32_t(h & 0x8000u) << 16));
}

// Round to nearest even; overflow gives inf, NaN stays NaN (quiet, payload dropped). Normal
// halves round by adding 0xFFF plus the kept mantissa's last bit; a subnormal half is the sum
// 0.5 + |f| rounded to a multiple of 2^-24, which is 0.5's ulp. Every case is computed and the
// result chosen by masks, without a branch: host loops vectorize. The sum assumes rounding to
// nearest, which the device always does and every CPU entry point sets (src/core/float_env.hpp).
KVC_HD uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t abs = u & 0x7FFFFFFFu;
  const uint32_t normal = (abs - 0x38000000u + 0xFFFu + ((abs >> 13) & 1u)) >> 13;
  const uint32_t subnormal = float_bits(bits_float(abs) + 0.5f) - 0x3F000000u;
  const uint32_t is_subnormal = 0u - uint32_t(abs < 0x38800000u);  // below 2^-14
  const uint32_t is_inf = 0u - uint32_t(abs >= 0x477FF000u);       // rounds to 65520 or more
  const uint32_t is_nan = 0u - uint32_t(abs > 0x7F800000u);
  const uint32_t finite = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  const uint32_t h = (((finite & ~is_inf) | (0x7C00u & is_inf)) & ~is_nan) | (0x7E00u & is_nan);
  return uint16_t(((u >> 16) & 0x8000u) | h);
}

KVC_HD float bf16_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

// Round to nearest even; NaN stays NaN.
KVC_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Largest bf16 not above a non-negative float (steps are rounded down so the bound holds).
KVC_HD uint16_t float_to_bf16_down(float f) { return uint16_t(float_bits(f) >> 16); }

// Decoders convert with saturation: a reconstruction within the bound of a representable input
// may lie past the type's largest finite value, and clamping only brings it closer. Every value
// that rounds to an infinity becomes the largest finite value of its sign (the infinity's bits
// less one); NaN stays NaN.
KVC_HD uint16_t float_to_half_saturate(float f) {
  const uint16_t h = float_to_half(f);
  return uint16_t(h - ((h & 0x7FFFu) == 0x7C00u ? 1u : 0u));
}
KVC_HD uint16_t float_to_bf16_saturate(float f) {
  const uint16_t b = float_to_bf16(f);
  return uint16_t(b - ((b & 0x7FFFu) == 0x7F80u ? 1u : 0u));
}

// ---- Quantization ----------------------------------------------------------------------------
// A code q stands for the value fl(float(q) * step): one IEEE product, so every backend
// reconstructs the same float. |q| < kMaxAbsCode keeps float(q) exact.
KVC_HD float dequantize(int32_t code, float step) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__int2float_rn(code), step);
#else
  return float(code) * step;
#endif
}

// Nearest code to x / step (ties to even); the caller checks the bound with within_bound.
KVC_HD float quantize_ratio(float x, float step) {
#if defined(__CUDA_ARCH__)
  // __fdiv_rn's instruction, written out: the compiler takes the intrinsic as free to recompute
  // and divided again at later uses of the code (10 divisions in the v1 encoder's PTX, not 2).
  float r;
  asm("div.rn.f32 %0, %1, %2;\n" : "=f"(r) : "f"(x), "f"(step));
  return rintf(r);
#else
  return __builtin_rintf(x / step);
#endif
}

// |x - x_hat| <= bound, decided exactly: doubles hold the difference of two floats exactly
// whenever it is close enough to the bound to matter.
KVC_HD bool within_bound_double(float x, float x_hat, float bound) {
  const double d = double(x) - double(x_hat);
  return (d < 0 ? -d : d) <= double(bound);
}

// fl(|x - y|): the float difference, rounded once.
KVC_HD float abs_difference(float x, float y) {
#if defined(__CUDA_ARCH__)
  return fabsf(__fsub_rn(x, y));
#else
  const float d = x - y;
  return d < 0 ? -d : d;
#endif
}

// within_bound_double's verdict, mostly from floats. a = fl(|x - x_hat|) decides wherever it
// differs from the bound: rounding to nearest is monotone and fixes every float, bound included,
// and fl(-v) = -fl(v), so |x - x_hat| <= bound (exactly) gives a <= bound, and |x - x_hat| >
// bound gives a >= bound (an overflow to inf included). Hence a < bound means within and
// a > bound means not; only a == bound (or a NaN, where both verdicts are false) takes the
// doubles. This needs IEEE subtraction with subnormals kept: the build sets -ftz=false and no
// fast-math (src/CMakeLists.txt), and the device uses __fsub_rn, which is never contracted.
KVC_HD bool within_bound(float x, float x_hat, float bound) {
  const float a = abs_difference(x, x_hat);
  if (a < bound) return true;
  if (a > bound) return false;
  return within_bound_double(x, x_hat, bound);  // a == bound, or a NaN
}

// Spacing of floats at |x| (a power of two; the smallest subnormal for 0).
KVC_HD float float_ulp(float x) {
  const uint32_t exp = (float_bits(x) >> 23) & 0xFFu;
  if (exp == 0) return bits_float(1u);
  return exp > 23 ? bits_float((exp - 23u) << 23) : bits_float(1u << (exp - 1u));
}

// The step of a constant group in relative mode, where the bound is 0: the ulp of x, so that x
// is an exact multiple of it (1 for x == 0). A power of two, exact in bf16 from 2^-133 up.
KVC_HD float constant_group_step(float x) { return x == 0.0f ? 1.0f : float_ulp(x); }

// The largest step that keeps every element with |x| <= max_abs within bound: the nearest code
// is at most step/2 away, and rounding the product code * step adds at most half an ulp of the
// result, so step <= 2 * (bound - ulp(max_abs + bound)). The subtraction may round up by half
// an ulp, which the factor 2 on the full ulp absorbs. 0 when the bound is below float
// resolution at max_abs (the block is then stored verbatim).
KVC_HD float step_for_bound(float bound, float max_abs) {
  const float reach = max_abs + bound;
  if (!(reach <= 3.4028234e38f)) return 0.0f;  // overflow or NaN
  const float half = bound - float_ulp(reach);
  return half > 0.0f ? 2.0f * half : 0.0f;
}

// Nearest code to x / step (ties to even), or a neighbour when float rounding of the product
// pushes that one past the bound. False when no code within kMaxAbsCode meets the bound: the
// encoder then stores the block verbatim. quantize_element_slow tries q (the nearest code) with
// the exact comparison, then q - 1 and q + 1 while inside (-kMaxAbsCode, kMaxAbsCode);
// quantize_element first takes q where its float difference alone says it is within the bound
// (within_bound's first test), which leaves the same code.
KVC_HD bool quantize_element_slow(float x, float step, float bound, int32_t q, int32_t& code) {
  if (within_bound(x, dequantize(q, step), bound)) {
    code = q;
    return true;
  }
  for (int32_t c = q - 1; c <= q + 1; c += 2) {
    if (c > -kMaxAbsCode && c < kMaxAbsCode && within_bound(x, dequantize(c, step), bound)) {
      code = c;
      return true;
    }
  }
  return false;
}
KVC_HD bool quantize_element(float x, float step, float bound, int32_t& code) {
  const float r = quantize_ratio(x, step);
  if (!(r > -float(kMaxAbsCode) && r < float(kMaxAbsCode))) return false;  // NaN too
  const int32_t q = int32_t(r);
  if (abs_difference(x, dequantize(q, step)) < bound) {
    code = q;
    return true;
  }
  return quantize_element_slow(x, step, bound, q, code);
}

// Step and bound of a group in relative mode: the bound is rel * (hi - lo); the step, from
// step_for_bound rounded down to bf16 (the stored width). A constant group gets the exact step
// of its value.
struct GroupStep {
  float step;
  float bound;
};
KVC_HD GroupStep relative_group_step(float rel, float lo, float hi) {
  const float bound = rel * (hi - lo);
  const float abs_lo = bits_float(float_bits(lo) & 0x7FFFFFFFu);
  const float abs_hi = bits_float(float_bits(hi) & 0x7FFFFFFFu);
  const float max_abs = abs_lo > abs_hi ? abs_lo : abs_hi;
  const float wanted = hi == lo ? constant_group_step(lo) : step_for_bound(bound, max_abs);
  return {bf16_to_float(float_to_bf16_down(wanted)), bound};
}

// Huffman centre of a group: its mean code, rounded half up, computed exactly in integers.
KVC_HD int32_t mean_center(int64_t sum, uint32_t n) {
  const int64_t a = sum + int64_t(n / 2);
  int64_t q = a / int64_t(n);
  if (a % int64_t(n) != 0 && a < 0) --q;  // floor, not truncation
  return int32_t(q);
}

// Bits of a two's complement field that holds s.
KVC_HD uint32_t signed_bit_width(int32_t s) {
  return (s >= 0 ? bit_width(uint32_t(s)) : bit_width(~uint32_t(s))) + 1u;
}

// ---- Element order ----------------------------------------------------------------------------
// Groups: K has one group per channel (group_size = num_tokens); V has one group per token and
// channel segment (group_size = channels per segment). Element p of group g sits at:
struct Coord {
  uint32_t token;
  uint32_t channel;
};
KVC_HD Coord element_coord(bool is_value, uint32_t head_dim, uint32_t group_size, uint32_t g,
                           uint32_t p) {
  if (!is_value) return {p, g};
  const uint32_t segments = head_dim / group_size;
  return {g / segments, (g % segments) * group_size + p};
}

// ---- Bit streams: LSB-first within little-endian bytes, as in DEFLATE -------------------------
// A reader that never touches bytes outside [data, data + size_bytes): missing bytes read as 0
// and overrun() reports that more bits were consumed than the stream holds.
struct BitReader {
  const uint8_t* data;
  uint32_t size_bytes;
  uint32_t next_byte;
  uint64_t buffer;
  uint32_t buffered;  // valid bits in buffer
  uint64_t consumed;  // bits consumed in total

  KVC_HD BitReader(const uint8_t* d, uint32_t n)
      : data(d), size_bytes(n), next_byte(0), buffer(0), buffered(0), consumed(0) {}

  KVC_HD void refill() {
#if !defined(__CUDA_ARCH__)
    // The host takes the next 8 bytes in one load where the stream has them, and counts the
    // whole bytes that fit. The bits above those are the stream's next bits, so the refill that
    // counts them ORs in the same values.
    if (uint64_t(next_byte) + 8u <= size_bytes) {
      buffer |=
          (uint64_t(load_u32(data + next_byte)) | (uint64_t(load_u32(data + next_byte + 4)) << 32))
          << buffered;
      const uint32_t bytes = (63u - buffered) / 8u;
      next_byte += bytes;
      buffered += 8u * bytes;
      return;
    }
#endif
    refill_bytes();
  }
  // The refill a byte at a time: the device's, and the host's at a stream's end.
  KVC_HD void refill_bytes() {
    while (buffered <= 56) {
      const uint64_t byte = next_byte < size_bytes ? data[next_byte] : 0u;
      buffer |= byte << buffered;
      ++next_byte;
      buffered += 8;
    }
  }
  // Up to 32 bits without consuming them; refills first.
  KVC_HD uint32_t peek(uint32_t bits) {
    if (buffered < bits) refill();
    return bits == 0 ? 0u : uint32_t(buffer & ((uint64_t(1) << bits) - 1u));
  }
  KVC_HD void skip(uint32_t bits) {
    buffer >>= bits;
    buffered -= bits;
    consumed += bits;
  }
  KVC_HD uint32_t read(uint32_t bits) {
    const uint32_t v = peek(bits);
    skip(bits);
    return v;
  }
  KVC_HD bool overrun() const { return consumed > uint64_t(size_bytes) * 8u; }
};

// Writer into a zeroed or overwritable buffer sized for the bits it gets; bits leave in whole
// 32-bit words, and flush() writes the bytes of the last partial word.
struct BitWriter {
  uint8_t* data;
  uint32_t next_byte;
  uint64_t acc;
  uint32_t pending;  // bits in acc, fewer than 32 between calls

  KVC_HD explicit BitWriter(uint8_t* d) : data(d), next_byte(0), acc(0), pending(0) {}
  KVC_HD void write(uint32_t value, uint32_t bits) {
    if (bits == 0) return;
    const uint64_t v = bits >= 32 ? value : (value & ((1u << bits) - 1u));
    acc |= v << pending;
    pending += bits;
    if (pending >= 32) {
      store_u32(data + next_byte, uint32_t(acc));
      next_byte += 4;
      acc >>= 32;
      pending -= 32;
    }
  }
  KVC_HD void flush() {
    for (; pending > 0; pending = pending > 8 ? pending - 8 : 0) {
      data[next_byte++] = uint8_t(acc);
      acc >>= 8;
    }
    acc = 0;
  }
};

KVC_HD int32_t sign_extend(uint32_t v, uint32_t bits) {
  if (bits == 0) return 0;
  if (bits >= 32) return int32_t(v);
  const uint32_t m = 1u << (bits - 1u);
  return int32_t((v ^ m) - m);
}

// ---- Block layout ------------------------------------------------------------------------------
// Where each section of a block lies, parsed from its header and checked against the bytes
// available, so that decoders index only inside the block.
enum class ParseError : uint32_t {
  kNone = 0,
  kTruncatedHeader,  // fewer than 32 bytes
  kBadMagic,
  kBadVersion,
  kBadField,     // a header field outside its range
  kTruncated,    // the stated length exceeds the bytes available
  kBadSections,  // sections do not fit in the stated length
};

struct BlockLayout {
  uint32_t encoding;
  bool is_value;
  bool per_group_step;
  uint32_t raw_dtype;  // kvc_dtype of raw blocks
  uint32_t code_bits;
  uint32_t num_tokens, head_dim, group_size, num_groups, num_substreams;
  uint32_t block_bytes;
  uint32_t codebook_id;
  int32_t center_base;
  uint32_t center_bits;
  // Byte offsets from the block start.
  uint32_t steps_offset, centers_offset, stream_ends_offset, payload_offset;
  uint32_t payload_bytes;  // block_bytes - payload_offset
};

KVC_HD uint32_t dtype_bytes(uint32_t dtype) { return dtype == 3 ? 4u : 2u; }

// Sections after the header: steps, centres, sub-stream ends, payload, each 4-byte aligned.
// Shared by the encoder (to size) and the decoders (to check); 64-bit so no field can overflow.
KVC_HD void place_sections(BlockLayout& b) {
  const uint64_t g = b.num_groups;
  uint64_t at = kHeaderBytes;
  b.steps_offset = uint32_t(at);
  if (b.encoding != kRaw) at += b.per_group_step ? align4(uint32_t(2 * g)) : 4u;
  b.centers_offset = uint32_t(at);
  if (b.encoding != kRaw) at += (g * b.center_bits + 31u) / 32u * 4u;
  b.stream_ends_offset = uint32_t(at);
  if (b.encoding == kHuffman) at += align4(2u * b.num_substreams);
  b.payload_offset = uint32_t(at);
}

KVC_HD ParseError parse_block(const uint8_t* p, uint64_t available, BlockLayout& b) {
  if (available < kHeaderBytes) return ParseError::kTruncatedHeader;
  if (load_u32(p + offset::kMagic) != kBlockMagic) return ParseError::kBadMagic;
  if (load_u8(p + offset::kVersion) != kVersion) return ParseError::kBadVersion;
  b.encoding = load_u8(p + offset::kEncoding);
  const uint32_t flags = load_u8(p + offset::kFlags);
  b.is_value = (flags & flag::kValue) != 0;
  b.per_group_step = (flags & flag::kPerGroupStep) != 0;
  b.raw_dtype = (flags >> flag::kRawDtypeShift) & 3u;
  b.code_bits = load_u8(p + offset::kCodeBits);
  b.num_tokens = load_u16(p + offset::kNumTokens);
  b.head_dim = load_u16(p + offset::kHeadDim);
  b.group_size = load_u16(p + offset::kGroupSize);
  b.num_substreams = load_u16(p + offset::kSubstreams);
  b.block_bytes = load_u32(p + offset::kBlockBytes);
  b.codebook_id = load_u32(p + offset::kCodebookId);
  b.center_base = int32_t(load_u32(p + offset::kCenterBase));
  b.center_bits = load_u8(p + offset::kCenterBits);
  const uint32_t reserved = load_u8(p + 29) | load_u8(p + 30) | load_u8(p + 31);

  bool ok = b.encoding <= kHuffman && (flags & ~flag::kKnown) == 0 && reserved == 0 &&
            b.num_tokens >= 1 && b.num_tokens <= 1024 && b.head_dim >= 1 && b.head_dim <= 1024 &&
            b.group_size >= 1;
  if (ok) {
    ok = b.is_value ? (b.head_dim % b.group_size == 0) : (b.group_size == b.num_tokens);
  }
  if (ok && b.encoding == kRaw) {
    ok = b.raw_dtype >= 1 && b.per_group_step == false && b.code_bits == 0 &&
         b.num_substreams == 0 && b.codebook_id == 0 && b.center_base == 0 && b.center_bits == 0;
  } else if (ok) {
    ok = b.raw_dtype == 0 && b.center_bits <= kMaxCodeBits &&
         (b.encoding == kFixed
              ? (b.code_bits <= kMaxCodeBits && b.num_substreams == 0 && b.codebook_id == 0)
              : (b.code_bits <= kMaxEscapeBits && b.num_substreams >= 1 &&
                 b.group_size % b.num_substreams == 0));
  }
  if (!ok) return ParseError::kBadField;
  if (b.block_bytes % 4u != 0 || b.block_bytes < kHeaderBytes) return ParseError::kBadField;
  if (b.block_bytes > available) return ParseError::kTruncated;

  b.num_groups = b.num_tokens * b.head_dim / b.group_size;
  place_sections(b);
  if (b.payload_offset > b.block_bytes) return ParseError::kBadSections;
  b.payload_bytes = b.block_bytes - b.payload_offset;
  const uint64_t elements = uint64_t(b.num_tokens) * b.head_dim;
  uint64_t need = 0;
  if (b.encoding == kRaw) need = elements * dtype_bytes(b.raw_dtype);
  if (b.encoding == kFixed) need = (elements * b.code_bits + 7u) / 8u;
  if (b.encoding == kHuffman) {
    // Stream ends are non-decreasing and inside the payload.
    uint32_t prev = 0;
    for (uint32_t s = 0; s < b.num_substreams; ++s) {
      const uint32_t end = load_u16(p + b.stream_ends_offset + 2u * s);
      if (end < prev) return ParseError::kBadSections;
      prev = end;
    }
    need = prev;
  }
  if (need > b.payload_bytes) return ParseError::kBadSections;
  return ParseError::kNone;
}

// ---- Writing a block: shared by the CPU and CUDA encoders so their sizes and headers agree ----

constexpr uint32_t kMaxStreamEnd = 0xFFFFu;  // sub-stream ends are 16-bit

// The layout of a candidate encoding, sized before anything is written.
KVC_HD BlockLayout make_layout(bool is_value, uint32_t num_tokens, uint32_t head_dim,
                               uint32_t group_size, uint32_t encoding, bool relative,
                               uint32_t code_bits, int32_t center_base, uint32_t center_bits,
                               uint32_t num_substreams, uint32_t codebook_id, uint32_t raw_dtype,
                               uint64_t payload_bytes) {
  BlockLayout b{};
  b.encoding = encoding;
  b.is_value = is_value;
  b.per_group_step = encoding != kRaw && relative;
  b.raw_dtype = encoding == kRaw ? raw_dtype : 0u;
  b.code_bits = code_bits;
  b.num_tokens = num_tokens;
  b.head_dim = head_dim;
  b.group_size = group_size;
  b.num_groups = num_tokens * head_dim / group_size;
  b.num_substreams = encoding == kHuffman ? num_substreams : 0u;
  b.codebook_id = encoding == kHuffman ? codebook_id : 0u;
  b.center_base = encoding == kRaw ? 0 : center_base;
  b.center_bits = encoding == kRaw ? 0u : center_bits;
  place_sections(b);
  b.payload_bytes = uint32_t(payload_bytes);
  b.block_bytes = b.payload_offset + align4(uint32_t(payload_bytes));
  return b;
}

KVC_HD void write_header(const BlockLayout& b, uint8_t* dst) {
  for (uint32_t i = 0; i < kHeaderBytes; ++i) dst[i] = 0;
  store_u32(dst + offset::kMagic, kBlockMagic);
  store_u8(dst + offset::kVersion, kVersion);
  store_u8(dst + offset::kEncoding, b.encoding);
  const uint32_t flags = (b.is_value ? flag::kValue : 0u) |
                         (b.per_group_step ? flag::kPerGroupStep : 0u) |
                         (b.raw_dtype << flag::kRawDtypeShift);
  store_u8(dst + offset::kFlags, flags);
  store_u8(dst + offset::kCodeBits, b.code_bits);
  store_u16(dst + offset::kNumTokens, b.num_tokens);
  store_u16(dst + offset::kHeadDim, b.head_dim);
  store_u16(dst + offset::kGroupSize, b.group_size);
  store_u16(dst + offset::kSubstreams, b.num_substreams);
  store_u32(dst + offset::kBlockBytes, b.block_bytes);
  store_u32(dst + offset::kCodebookId, b.codebook_id);
  store_u32(dst + offset::kCenterBase, uint32_t(b.center_base));
  store_u8(dst + offset::kCenterBits, b.center_bits);
}

// Group of an element at (token, channel), and its position inside the group.
KVC_HD uint32_t group_of(bool is_value, uint32_t head_dim, uint32_t group_size, uint32_t token,
                         uint32_t channel) {
  return is_value ? token * (head_dim / group_size) + channel / group_size : channel;
}
KVC_HD uint32_t position_of(bool is_value, uint32_t group_size, uint32_t token, uint32_t channel) {
  return is_value ? channel % group_size : token;
}

}  // namespace kvc::format
