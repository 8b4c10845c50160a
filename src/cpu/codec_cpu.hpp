// SPDX-License-Identifier: Apache-2.0
// The CPU codec: the reference implementation of docs/format.md and the oracle of the tests.
// Deliberately plain: one block at a time, each step in the order the format describes; the
// per-element passes are written without branches or per-element dispatch where that lets the
// compiler vectorize them (docs/performance.md), and give the same bytes.
#pragma once

#include <kvcomp/kvcomp.h>

#include <cstdint>
#include <vector>

#include "codec/codebook.hpp"
#include "codec/codec_params.hpp"
#include "kernels/common/format.cuh"

namespace kvc::cpu {

// run(load), where load(i) reads element i of an array of dtype as a float: the dtype is looked
// at once, not per element, so that loops inside run vectorize.
template <class Run>
auto with_loader(const void* src, kvc_dtype dtype, Run run) {
  const auto* bits = static_cast<const uint16_t*>(src);
  switch (dtype) {
    case KVC_DTYPE_FP16:
      return run([bits](size_t i) { return format::half_to_float(bits[i]); });
    case KVC_DTYPE_BF16:
      return run([bits](size_t i) { return format::bf16_to_float(bits[i]); });
    default:
      return run([x = static_cast<const float*>(src)](size_t i) { return x[i]; });
  }
}
// run(store), where store(i, v) writes v as element i of an array of dtype, rounded to nearest
// even and saturating (as decoders write).
template <class Run>
void with_storer(void* dst, kvc_dtype dtype, Run run) {
  auto* bits = static_cast<uint16_t*>(dst);
  switch (dtype) {
    case KVC_DTYPE_FP16:
      return run([bits](size_t i, float v) { bits[i] = format::float_to_half_saturate(v); });
    case KVC_DTYPE_BF16:
      return run([bits](size_t i, float v) { bits[i] = format::float_to_bf16_saturate(v); });
    default:
      return run([x = static_cast<float*>(dst)](size_t i, float v) { x[i] = v; });
  }
}
// One element of each.
inline float load_element(const void* src, kvc_dtype dtype, size_t i) {
  return with_loader(src, dtype, [i](auto load) { return load(i); });
}
inline void store_element(void* dst, kvc_dtype dtype, size_t i, float v) {
  with_storer(dst, dtype, [i, v](auto store) { store(i, v); });
}
// The float of an element stored verbatim as raw_dtype (a kvc_dtype): its bits, low-aligned.
inline float raw_value(uint32_t raw_dtype, uint32_t bits) {
  return raw_dtype == KVC_DTYPE_FP32   ? format::bits_float(bits)
         : raw_dtype == KVC_DTYPE_BF16 ? format::bf16_to_float(uint16_t(bits))
                                       : format::half_to_float(uint16_t(bits));
}
// Whether elements [first, first + count) of an array of dtype are all finite.
bool all_finite(const void* src, kvc_dtype dtype, size_t first, size_t count);

// The block as floats in group order: element p of group g at [g * group_size + p].
std::vector<float> gather_groups(const CodecParams& p, const void* src, int64_t token_stride,
                                 kvc_dtype dtype);

// Quantization of one block (docs/format.md §6), shared by format v1 and the tile format:
// codes in group order and each group's step, or !ok when some element cannot meet its bound
// with a code (the block is then stored verbatim; codes and steps then mean nothing).
struct Quantized {
  bool ok = true;
  std::vector<float> steps;    // [num_groups]
  std::vector<int32_t> codes;  // [num_groups, group_size]
};
Quantized quantize(const CodecParams& p, const std::vector<float>& x);
// Writes the values of codes q (group order, as quantize() gives them) into dst, a [tokens,
// head_dim] array of dtype whose tokens are token_stride elements apart: the decoders' last step.
void store_values(const CodecParams& p, const Quantized& q, kvc_dtype dtype, void* dst,
                  int64_t token_stride);
// The smallest and largest of n >= 1 codes, in a loop the compiler vectorizes
// (std::minmax_element tracks positions and does not vectorize).
struct CodeRange {
  int32_t lo, hi;
};
inline CodeRange code_range(const int32_t* c, uint32_t n) {
  CodeRange r{c[0], c[0]};
  for (uint32_t i = 1; i < n; ++i) {
    r.lo = c[i] < r.lo ? c[i] : r.lo;
    r.hi = c[i] > r.hi ? c[i] : r.hi;
  }
  return r;
}
// Whether every code lies in the quantizer's range, (-kMaxAbsCode, kMaxAbsCode): true for what
// quantize() gives, false only for codes read from crafted blocks.
bool codes_in_range(const Quantized& q);

// Throws KVC_ERROR_NONFINITE_INPUT naming the block, token and channel of the first inf/NaN.
void check_finite(const CodecParams& p, int32_t block, const void* src, int64_t token_stride,
                  kvc_dtype dtype);

// The size encode_block will write for this block (finite input, already checked).
uint32_t encoded_size(const CodecParams& p, const Codebook* codebook, const void* src,
                      int64_t token_stride, kvc_dtype dtype);

// Encodes one block (finite input, already checked) into dst, which holds at least
// encoded_size() bytes; returns the bytes written.
uint32_t encode_block(const CodecParams& p, const Codebook* codebook, const void* src,
                      int64_t token_stride, kvc_dtype dtype, uint8_t* dst);

// Format v1 from codes already quantized (q.ok): the smaller of fixed width and, with a
// codebook, Huffman, never verbatim (the codes are all there is). What a tiles store's
// serialization writes in place of a tile block (docs/format.md, "Serialized sequence").
std::vector<uint8_t> encode_codes(const CodecParams& p, const Codebook* codebook,
                                  const Quantized& q);

// Parses and checks a block header against the bytes available (any decoder's first step);
// throws KVC_ERROR_CORRUPT_DATA or KVC_ERROR_FORMAT_VERSION.
format::BlockLayout parse_header(const uint8_t* src, uint64_t available);

// Decodes one block; throws a data status (corrupt, codebook or config mismatch) on bad input.
// Reads only src[0, min(available, stated length)).
void decode_block(const CodecParams& p, const Codebook* codebook, const uint8_t* src,
                  uint64_t available, kvc_dtype dtype, void* dst, int64_t token_stride);

// The codes and steps of a fixed-width or Huffman block, as quantize() gave them (decode_block
// before dequantization), with the same checks; !ok for a verbatim block.
Quantized decode_codes(const CodecParams& p, const Codebook* codebook, const uint8_t* src,
                       uint64_t available);

// Adds the block's Huffman symbols to a histogram (blocks stored verbatim add nothing).
void histogram_block(const CodecParams& p, const void* src, int64_t token_stride, kvc_dtype dtype,
                     Histogram& histogram);
// The same from codes already quantized (q.ok).
void histogram_codes(const CodecParams& p, const Quantized& q, Histogram& histogram);

}  // namespace kvc::cpu
