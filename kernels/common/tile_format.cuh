// SPDX-License-Identifier: Apache-2.0
// Tile blocks, format t1 (docs/format.md, "Tile format (t1)"): fixed-width quantization codes in
// the operand order of mma.sync.m16n8k16, defined once for the CPU reference codec and the
// tensor-core attention kernel. Everything here is __host__ __device__ so that the CPU tests
// exercise the index math and the integer-to-half conversions the kernel runs.
#pragma once

#include <stdint.h>

#include <type_traits>

#include "kernels/common/format.cuh"
#include "kernels/common/mma.cuh"

namespace kvc::tiles {

// ---- Block header: 32 bytes, little-endian -------------------------------------------------
constexpr uint32_t kMagic = 0x7463766Bu;  // bytes "kvct"
constexpr uint32_t kVersion = 1;
constexpr uint32_t kHeaderBytes = 32;
constexpr uint32_t kTileAlign = 16;  // tiles and blocks start at multiples of 16 (cp.async)

namespace offset {
constexpr uint32_t kMagic = 0;        // u32
constexpr uint32_t kVersion = 4;      // u8
constexpr uint32_t kFlags = 5;        // u8: see flag::
constexpr uint32_t kCenterBytes = 6;  // u8: 0 (not quantized), 1, 2 or 4
constexpr uint32_t kNumTiles = 7;     // u8
constexpr uint32_t kNumTokens = 8;    // u16: T
constexpr uint32_t kHeadDim = 10;     // u16: D
constexpr uint32_t kBlockBytes = 12;  // u32: whole block, a multiple of 16
constexpr uint32_t kCenterBase = 16;  // i32
constexpr uint32_t kStep = 20;        // u32: fp32 bits of the block's step (absolute mode)
// bytes 24..31 reserved, zero
}  // namespace offset

namespace flag {
constexpr uint32_t kValue = 1u << 0;         // 0 K, 1 V
constexpr uint32_t kPerGroupStep = 1u << 1;  // bf16 step per group, else one fp32 step
constexpr uint32_t kPermuted = 1u << 2;      // K: a channel permutation section is present
constexpr uint32_t kQuantized = 1u << 3;     // steps and centres present; else every tile raw
constexpr uint32_t kRawDtypeShift = 4;       // 2 bits: kvc_dtype of raw tiles (the input's)
constexpr uint32_t kKnown = 0x3Fu;
}  // namespace flag

// Width codes of the tile table (the low 4 bits of each entry), in increasing size. A tile of
// 3 or 6 bits is two planes, each laid out as a tile of its own width: the low bits of every
// element (2 or 4 bits), then the high bits (1 or 2), so that each plane converts with the
// same shift-and-mask as a plain tile.
enum WidthCode : uint32_t { kW0 = 0, kW2 = 1, kW3 = 2, kW4 = 3, kW6 = 4, kW8 = 5, kWRaw = 6 };
constexpr uint32_t kNumWidthCodes = 7;

// Bits of plane 0 (the low bits) and plane 1 (the high bits) of a coded tile's elements: one
// nibble per width code of a constant, so that a kernel looks them up without local memory.
KVC_HD constexpr uint32_t plane_bits(uint32_t wcode, uint32_t plane) {
  constexpr uint32_t kLow = 0x0844220u;   // codes 0..6: 0, 2, 2, 4, 4, 8, 0
  constexpr uint32_t kHigh = 0x0020100u;  // codes 0..6: 0, 0, 1, 0, 2, 0, 0
  return wcode < kNumWidthCodes ? ((plane == 0 ? kLow : kHigh) >> (4u * wcode)) & 15u : 0u;
}

// Calls f(std::integral_constant<uint32_t, W>{}) for a coded width code W (kW0 to kW8), so that
// its planes' bits are constants of f (plane_bits is constexpr); raw and unknown codes call
// nothing.
template <class F>
KVC_HD void with_coded_width(uint32_t wcode, F&& f) {
  auto one = [&](auto w) { return wcode == decltype(w)::value ? (f(w), true) : false; };
  using std::integral_constant;
  one(integral_constant<uint32_t, kW0>{}) || one(integral_constant<uint32_t, kW2>{}) ||
      one(integral_constant<uint32_t, kW3>{}) || one(integral_constant<uint32_t, kW4>{}) ||
      one(integral_constant<uint32_t, kW6>{}) || one(integral_constant<uint32_t, kW8>{});
}

// Bits per element of a tile: 0, 2, 3, 4, 6, 8, or the raw dtype's 16 / 32.
KVC_HD uint32_t element_bits(uint32_t wcode, uint32_t raw_dtype) {
  return wcode == kWRaw ? 8u * format::dtype_bytes(raw_dtype)
                        : plane_bits(wcode, 0) + plane_bits(wcode, 1);
}

// The narrowest width code holding an unsigned value of `bits` bits; kWRaw above 8. Without
// split widths only the single-plane codes 0, 2, 4 and 8 bits are used.
KVC_HD uint32_t width_code_for(uint32_t bits, bool split = true) {
  if (bits == 0) return kW0;
  if (bits <= 2) return kW2;
  if (bits <= 3 && split) return kW3;
  if (bits <= 4) return kW4;
  if (bits <= 6 && split) return kW6;
  if (bits <= 8) return kW8;
  return kWRaw;
}

// ---- Shapes -------------------------------------------------------------------------------
// T (tokens) a power of two in [16, 1024], D (channels) a power of two in [16, 256].
KVC_HD bool is_pow2_in(uint32_t v, uint32_t lo, uint32_t hi) {
  return v >= lo && v <= hi && (v & (v - 1u)) == 0;
}
KVC_HD bool shape_supported(uint32_t num_tokens, uint32_t head_dim) {
  return is_pow2_in(num_tokens, 16, 1024) && is_pow2_in(head_dim, 16, 256);
}

// K: one tile per 16 (permuted) channels over all T tokens. V: one tile per 16 tokens over all
// D channels. The tile's n-blocks are its 16 x 8 mma B operands: T/8 (K) or D/8 (V).
KVC_HD uint32_t num_tiles(bool is_value, uint32_t num_tokens, uint32_t head_dim) {
  return (is_value ? num_tokens : head_dim) / 16u;
}
KVC_HD uint32_t num_nblocks(bool is_value, uint32_t num_tokens, uint32_t head_dim) {
  return (is_value ? head_dim : num_tokens) / 8u;
}
// Groups (quantization rows) of a block: K channels, V tokens.
KVC_HD uint32_t num_groups(bool is_value, uint32_t num_tokens, uint32_t head_dim) {
  return is_value ? num_tokens : head_dim;
}
// Bytes of one tile: 16 x (8 * nblocks) elements of `bits` bits.
KVC_HD uint32_t tile_bytes(uint32_t bits, uint32_t nblocks) { return 16u * nblocks * bits; }
// Byte offset of plane 1 (the high bits of a 3- or 6-bit tile) from the tile start.
KVC_HD uint32_t plane1_offset(uint32_t wcode, uint32_t nblocks) {
  return tile_bytes(plane_bits(wcode, 0), nblocks);
}

// ---- Where a tile element lives --------------------------------------------------------------
// A lane holds, per n-block j, B elements b0..b3 as two pairs (registers) r = 0, 1 of halves
// h = 0, 1 (i = 2r + h). Its pairs are numbered p = 2j + r, 0 <= p < 2 * nblocks.
struct TileCoord {
  uint32_t nblock;  // j
  uint32_t k;       // row of the B operand: K tile channel (0..15), V tile token (0..15)
  uint32_t n;       // column: token within the n-block (K), channel within the n-block (V)
};
KVC_HD TileCoord pair_element(uint32_t lane, uint32_t p, uint32_t h) {
  const kernels::mma::Coord c = kernels::mma::b_coord(lane, 2u * (p & 1u) + h);
  return {p >> 1, c.row, c.col};
}
// The element of a tile: K tile (16 channels x T tokens): channel position 16 * tile + k,
// token 8 * nblock + n. V tile (16 tokens x D channels): token 16 * tile + k, channel
// 8 * nblock + n.
struct BlockCoord {
  uint32_t token;
  uint32_t position;  // K: the channel's permuted position j (channel perm[j]); V: the channel
};
KVC_HD BlockCoord tile_element(bool is_value, uint32_t tile, TileCoord c) {
  if (is_value) return {16u * tile + c.k, 8u * c.nblock + c.n};
  return {8u * c.nblock + c.n, 16u * tile + c.k};
}

// Storage of pair p of `lane` in a tile of `bits`-bit elements with `pairs` pairs per lane:
// the 32-bit word of the tile (little-endian, from the tile start) and the bit of the low
// element; the high element is 16 bits above it (bits <= 16) or in the next word (bits 32).
//  - bits <= 8: a word holds P = 16 / bits pairs in slots s = 0..P-1, slot s at bits
//    [s*bits, s*bits+bits) (low) and [16+s*bits, 16+s*bits+bits) (high), so that one shift and
//    one mask give a half2's two integers. A lane's pair p is in its word p / P, slot p % P;
//    where a lane has fewer than P pairs (T or D = 16 with 2 bits), P / pairs lanes share a
//    word, lane l taking slots from (l % (P / pairs)) * pairs.
//  - bits 16: one pair per word; bits 32: one element per word, low first.
//  - A lane's words are interleaved with the other lanes' in units of U = min(4, lane words)
//    words: lane word w is tile word (w / U) * 32U + lane * U + w % U, so a warp reads each
//    unit as 32 consecutive U-word (up to 16-byte) loads.
struct PairLocation {
  uint32_t word;
  uint32_t shift;
};
// log2 of a power of two. Bits, pairs per lane and run lengths are all powers of two, so the
// layout's divisions are shifts: a decoder with runtime widths pays no integer division. Plain
// bit tests (not an intrinsic), so that constant arguments fold before the optimizer's
// inlining and unrolling decisions.
KVC_HD uint32_t log2_pow2(uint32_t v) {
  return ((v & 0xAAAAAAAAu) != 0 ? 1u : 0u) | ((v & 0xCCCCCCCCu) != 0 ? 2u : 0u) |
         ((v & 0xF0F0F0F0u) != 0 ? 4u : 0u) | ((v & 0xFF00FF00u) != 0 ? 8u : 0u) |
         ((v & 0xFFFF0000u) != 0 ? 16u : 0u);
}
KVC_HD uint32_t lane_words(uint32_t bits, uint32_t pairs) {
  return bits <= 16 ? (pairs * bits + 15u) >> 4 : 2u * pairs;
}
// What pair_location needs of a plane of `bits` bits with `pairs` pairs per lane, as shifts
// and masks: worked out once per tile, so that locating a pair costs a few integer operations.
struct PlaneGeometry {
  uint32_t bits;
  bool shared;            // lanes share a word: P / pairs of them (P = 16 / bits pairs per word)
  uint32_t log_sharing;   // shared: log2 of the lanes per word
  uint32_t log_pairs;     // shared: log2 of pairs
  uint32_t pre;           // 1 for 32-bit elements (two lane words per pair), else 0
  uint32_t log_per_word;  // log2 P for bits <= 8, else 0
  uint32_t log_u;         // log2 of the run length U = min(4, lane words)
};
KVC_HD PlaneGeometry plane_geometry(uint32_t bits, uint32_t pairs) {
  PlaneGeometry g{};
  g.bits = bits;
  g.log_per_word = bits <= 8 ? 4u - log2_pow2(bits) : 0u;
  g.log_pairs = log2_pow2(pairs);
  g.shared = bits <= 8 && pairs < (1u << g.log_per_word);
  g.log_sharing = g.shared ? g.log_per_word - g.log_pairs : 0u;
  g.pre = bits == 32 ? 1u : 0u;
  const uint32_t words = lane_words(bits, pairs);
  g.log_u = words < 4u ? log2_pow2(words) : 2u;
  return g;
}
// Storage of pair p of `lane`: lane word w = p / P (bits <= 8), p (16) or 2p (32) sits in run
// w / U at the lane's slot, word (w / U) * 32U + lane * U + w % U; its slot p % P at bit
// (p % P) * bits.
KVC_HD PairLocation locate_pair(const PlaneGeometry& g, uint32_t lane, uint32_t p) {
  if (g.shared) {
    return {lane >> g.log_sharing,
            (((lane & ((1u << g.log_sharing) - 1u)) << g.log_pairs) + p) * g.bits};
  }
  const uint32_t w = (p << g.pre) >> g.log_per_word;
  return {((w >> g.log_u) << (5u + g.log_u)) + (lane << g.log_u) + (w & ((1u << g.log_u) - 1u)),
          (p & ((1u << g.log_per_word) - 1u)) * g.bits};
}
KVC_HD PairLocation pair_location(uint32_t lane, uint32_t p, uint32_t bits, uint32_t pairs) {
  return locate_pair(plane_geometry(bits, pairs), lane, p);
}
// The word after `word` in the same lane's sequence (the high element of a 32-bit pair).
KVC_HD uint32_t next_lane_word(uint32_t word, uint32_t bits, uint32_t pairs) {
  const uint32_t words = lane_words(bits, pairs);
  const uint32_t u = words < 4u ? words : 4u;
  return (word & (u - 1u)) + 1u < u ? word + 1u : word - (u - 1u) + 32u * u;
}

// ---- Integer fields and their conversion to half2 ---------------------------------------------
// The two `bits`-bit integers of the pair at `shift` of word w (bits <= 8, one plane).
KVC_HD uint32_t pair_mask(uint32_t bits) { return ((1u << bits) - 1u) * 0x00010001u; }
KVC_HD uint32_t pair_low(uint32_t w, uint32_t shift, uint32_t bits) {
  return (w >> shift) & ((1u << bits) - 1u);
}
KVC_HD uint32_t pair_high(uint32_t w, uint32_t shift, uint32_t bits) {
  return (w >> (shift + 16u)) & ((1u << bits) - 1u);
}

// fp16 magic: OR-ing an integer u < 1024 into the mantissa of 1024.0 (0x6400) gives the half
// 1024 + u exactly; subtracting 1024 (HSUB2) gives u. One LOP3 (shift-and-mask-or) per pair,
// plus the shift when it is not 0: ((w >> shift) & mask) | 0x64006400.
constexpr uint32_t kFp16Magic2 = 0x64006400u;
KVC_HD uint32_t fp16x2_biased(uint32_t w, uint32_t shift, uint32_t bits) {
  return ((w >> shift) & pair_mask(bits)) | kFp16Magic2;
}
// Without the shift, for a slot that ends at or below bit 10 (shift + bits <= 10): the half
// 1024 + u * 2^shift, exact; the kernel folds 2^-shift into its scale instead of shifting.
KVC_HD uint32_t fp16x2_biased_in_place(uint32_t w, uint32_t shift, uint32_t bits) {
  return (w & (pair_mask(bits) << shift)) | kFp16Magic2;
}
// bf16 magic: 128.0 (0x4300) has 7 mantissa bits, so u < 128 (2- and 4-bit tiles; 8-bit codes
// below 128).
constexpr uint32_t kBf16Magic2 = 0x43004300u;
KVC_HD uint32_t bf16x2_biased(uint32_t w, uint32_t shift, uint32_t bits) {
  return ((w >> shift) & pair_mask(bits)) | kBf16Magic2;
}
// bf16 for 8-bit codes: via the fp32 magic 2^23 (0x4B000000 | u is 2^23 + u; minus 2^23 is u,
// exact), then fp32 -> bf16, exact for u < 256 (bf16 has 8 significant bits).
KVC_HD uint16_t u8_to_bf16_via_f32(uint32_t u) {
  const float v = format::bits_float(0x4B000000u | (u & 0xFFu)) - 8388608.0f;
  return format::float_to_bf16(v);
}

// The CPU's model of HSUB2 / HSUB2.BF16 (each half: exact difference rounded once to the
// type, as the hardware does): a - b per half of two 16-bit pairs.
KVC_HD uint32_t hsub2_fp16(uint32_t a, uint32_t b) {
  const float lo = format::half_to_float(uint16_t(a)) - format::half_to_float(uint16_t(b));
  const float hi =
      format::half_to_float(uint16_t(a >> 16)) - format::half_to_float(uint16_t(b >> 16));
  return uint32_t(format::float_to_half(lo)) | (uint32_t(format::float_to_half(hi)) << 16);
}
KVC_HD uint32_t hsub2_bf16(uint32_t a, uint32_t b) {
  const float lo = format::bf16_to_float(uint16_t(a)) - format::bf16_to_float(uint16_t(b));
  const float hi =
      format::bf16_to_float(uint16_t(a >> 16)) - format::bf16_to_float(uint16_t(b >> 16));
  return uint32_t(format::float_to_bf16(lo)) | (uint32_t(format::float_to_bf16(hi)) << 16);
}

// ---- Block layout ------------------------------------------------------------------------------
// header(32) | tile table (4 * NT) | permutation (K, permuted: align4(D)) | steps (quantized,
// per-group: align4(2 * NG)) | centres (quantized: NG * center_bytes) | zero to a multiple of 16
// | tiles. Table entry i: the tile's offset from the block start (a multiple of 16) | its width
// code in bits 0..3. Tile i+1 starts where tile i ends; the last ends at block_bytes.
enum class ParseError : uint32_t {
  kNone = 0,
  kTruncatedHeader,
  kBadMagic,
  kBadVersion,
  kBadField,
  kTruncated,
  kBadSections,
  kBadTable,
  kBadPermutation,
};

struct TileLayout {
  bool is_value;
  bool per_group_step;
  bool permuted;
  bool quantized;
  uint32_t raw_dtype;
  uint32_t center_bytes;
  uint32_t num_tiles;
  uint32_t num_tokens, head_dim;
  uint32_t num_groups, nblocks, pairs_per_lane;
  uint32_t block_bytes;
  int32_t center_base;
  uint32_t step_bits;
  uint32_t table_offset, perm_offset, steps_offset, centers_offset, tiles_offset;
};

// Offsets of the sections before the tiles; 64-bit so that no field can overflow.
KVC_HD void place_sections(TileLayout& b) {
  uint64_t at = kHeaderBytes;
  b.table_offset = uint32_t(at);
  at += 4u * uint64_t(b.num_tiles);
  b.perm_offset = uint32_t(at);
  if (b.permuted) at += format::align4(b.head_dim);
  b.steps_offset = uint32_t(at);
  if (b.quantized && b.per_group_step) at += format::align4(2u * b.num_groups);
  b.centers_offset = uint32_t(at);
  if (b.quantized) at += uint64_t(b.num_groups) * b.center_bytes;
  b.tiles_offset = uint32_t((at + kTileAlign - 1u) / kTileAlign * kTileAlign);
}

KVC_HD TileLayout make_layout(bool is_value, uint32_t num_tokens, uint32_t head_dim,
                              uint32_t raw_dtype, bool quantized, bool relative, bool permuted,
                              uint32_t center_bytes, int32_t center_base, uint32_t step_bits) {
  TileLayout b{};
  b.is_value = is_value;
  b.quantized = quantized;
  b.per_group_step = quantized && relative;
  b.permuted = quantized && permuted && !is_value;
  b.raw_dtype = raw_dtype;
  b.center_bytes = quantized ? center_bytes : 0u;
  b.num_tokens = num_tokens;
  b.head_dim = head_dim;
  b.num_tiles = num_tiles(is_value, num_tokens, head_dim);
  b.num_groups = num_groups(is_value, num_tokens, head_dim);
  b.nblocks = num_nblocks(is_value, num_tokens, head_dim);
  b.pairs_per_lane = 2u * b.nblocks;
  b.center_base = quantized ? center_base : 0;
  b.step_bits = quantized && !relative ? step_bits : 0u;
  place_sections(b);
  return b;
}

KVC_HD uint32_t table_entry(const uint8_t* block, const TileLayout& b, uint32_t tile) {
  return format::load_u32(block + b.table_offset + 4u * tile);
}
KVC_HD uint32_t entry_offset(uint32_t entry) { return entry & ~15u; }
KVC_HD uint32_t entry_width(uint32_t entry) { return entry & 15u; }

KVC_HD void write_header(const TileLayout& b, uint8_t* dst) {
  for (uint32_t i = 0; i < kHeaderBytes; ++i) dst[i] = 0;
  format::store_u32(dst + offset::kMagic, kMagic);
  format::store_u8(dst + offset::kVersion, kVersion);
  const uint32_t flags =
      (b.is_value ? flag::kValue : 0u) | (b.per_group_step ? flag::kPerGroupStep : 0u) |
      (b.permuted ? flag::kPermuted : 0u) | (b.quantized ? flag::kQuantized : 0u) |
      (b.raw_dtype << flag::kRawDtypeShift);
  format::store_u8(dst + offset::kFlags, flags);
  format::store_u8(dst + offset::kCenterBytes, b.center_bytes);
  format::store_u8(dst + offset::kNumTiles, b.num_tiles);
  format::store_u16(dst + offset::kNumTokens, b.num_tokens);
  format::store_u16(dst + offset::kHeadDim, b.head_dim);
  format::store_u32(dst + offset::kBlockBytes, b.block_bytes);
  format::store_u32(dst + offset::kCenterBase, uint32_t(b.center_base));
  format::store_u32(dst + offset::kStep, b.step_bits);
}

// Parses and checks everything a decoder (or the kernel's prologue) relies on: the header, the
// table's offsets and widths against the stated length and the bytes available, and that the
// permutation is one. After kNone, every tile lies inside [tiles_offset, block_bytes).
KVC_HD ParseError parse_block(const uint8_t* p, uint64_t available, TileLayout& b) {
  if (available < kHeaderBytes) return ParseError::kTruncatedHeader;
  if (format::load_u32(p + offset::kMagic) != kMagic) return ParseError::kBadMagic;
  if (format::load_u8(p + offset::kVersion) != kVersion) return ParseError::kBadVersion;
  const uint32_t flags = format::load_u8(p + offset::kFlags);
  b.is_value = (flags & flag::kValue) != 0;
  b.per_group_step = (flags & flag::kPerGroupStep) != 0;
  b.permuted = (flags & flag::kPermuted) != 0;
  b.quantized = (flags & flag::kQuantized) != 0;
  b.raw_dtype = (flags >> flag::kRawDtypeShift) & 3u;
  b.center_bytes = format::load_u8(p + offset::kCenterBytes);
  b.num_tiles = format::load_u8(p + offset::kNumTiles);
  b.num_tokens = format::load_u16(p + offset::kNumTokens);
  b.head_dim = format::load_u16(p + offset::kHeadDim);
  b.block_bytes = format::load_u32(p + offset::kBlockBytes);
  b.center_base = int32_t(format::load_u32(p + offset::kCenterBase));
  b.step_bits = format::load_u32(p + offset::kStep);
  uint32_t reserved = 0;
  for (uint32_t i = 24; i < kHeaderBytes; ++i) reserved |= p[i];

  bool ok = (flags & ~flag::kKnown) == 0 && reserved == 0 && b.raw_dtype >= 1 &&
            shape_supported(b.num_tokens, b.head_dim) &&
            b.num_tiles == num_tiles(b.is_value, b.num_tokens, b.head_dim) &&
            !(b.permuted && b.is_value);
  if (ok && b.quantized) {
    ok = b.center_bytes == 1 || b.center_bytes == 2 || b.center_bytes == 4;
    if (ok && b.per_group_step) ok = b.step_bits == 0;
  } else if (ok) {
    ok = !b.per_group_step && !b.permuted && b.center_bytes == 0 && b.center_base == 0 &&
         b.step_bits == 0;
  }
  if (!ok) return ParseError::kBadField;
  if (b.block_bytes % kTileAlign != 0 || b.block_bytes < kHeaderBytes) {
    return ParseError::kBadField;
  }
  if (b.block_bytes > available) return ParseError::kTruncated;
  b.num_groups = num_groups(b.is_value, b.num_tokens, b.head_dim);
  b.nblocks = num_nblocks(b.is_value, b.num_tokens, b.head_dim);
  b.pairs_per_lane = 2u * b.nblocks;
  place_sections(b);
  if (b.tiles_offset > b.block_bytes) return ParseError::kBadSections;

  uint64_t at = b.tiles_offset;
  for (uint32_t i = 0; i < b.num_tiles; ++i) {
    const uint32_t entry = table_entry(p, b, i);
    const uint32_t w = entry_width(entry);
    if (w >= kNumWidthCodes || (!b.quantized && w != kWRaw)) return ParseError::kBadTable;
    if (entry_offset(entry) != at) return ParseError::kBadTable;
    at += tile_bytes(element_bits(w, b.raw_dtype), b.nblocks);
    if (at > b.block_bytes) return ParseError::kBadTable;
  }
  if (at != b.block_bytes) return ParseError::kBadTable;

  if (b.permuted) {
    uint32_t seen[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // D <= 256 channels
    for (uint32_t j = 0; j < b.head_dim; ++j) {
      const uint32_t c = p[b.perm_offset + j];
      if (c >= b.head_dim || (seen[c >> 5] >> (c & 31u)) & 1u) return ParseError::kBadPermutation;
      seen[c >> 5] |= 1u << (c & 31u);
    }
  }
  return ParseError::kNone;
}

// Group metadata, by position (K: permuted channel position j; V: token).
KVC_HD float group_step(const uint8_t* p, const TileLayout& b, uint32_t g) {
  return b.per_group_step ? format::bf16_to_float(format::load_u16(p + b.steps_offset + 2u * g))
                          : format::bits_float(b.step_bits);
}
// The centre modulo 2^32 (corrupt blocks wrap, never overflow).
KVC_HD uint32_t group_center(const uint8_t* p, const TileLayout& b, uint32_t g) {
  const uint8_t* at = p + b.centers_offset + b.center_bytes * g;
  const uint32_t off = b.center_bytes == 1   ? format::load_u8(at)
                       : b.center_bytes == 2 ? format::load_u16(at)
                                             : format::load_u32(at);
  return uint32_t(b.center_base) + off;
}
KVC_HD uint32_t channel_of(const uint8_t* p, const TileLayout& b, uint32_t position) {
  return b.permuted ? uint32_t(p[b.perm_offset + position]) : position;
}

}  // namespace kvc::tiles
