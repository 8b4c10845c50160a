// SPDX-License-Identifier: Apache-2.0
#include "cpu/tile_codec_cpu.hpp"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "core/error.hpp"
#include "cpu/codec_cpu.hpp"

namespace kvc::cpu {
namespace t = tiles;
namespace f = format;

namespace {

// The whole encoder state of one block: the plan, the v1 quantization it came from and the
// order of the groups (position j holds group order[j]).
struct Encoding {
  TilePlan plan;
  Quantized q;
  std::vector<int32_t> centers;  // [num_groups], by group
  std::vector<uint32_t> order;   // [num_groups], position -> group
};

uint32_t tiles_end(const t::TileLayout& b, const std::vector<uint32_t>& widths) {
  uint64_t at = b.tiles_offset;
  for (uint32_t w : widths) at += t::tile_bytes(t::element_bits(w, b.raw_dtype), b.nblocks);
  return uint32_t(at);
}

Encoding plan_codes(const CodecParams& p, Quantized q, kvc_dtype dtype) {
  Encoding e;
  e.q = std::move(q);
  const uint32_t groups = p.num_groups;
  const uint32_t tiles = t::num_tiles(p.is_value, p.num_tokens, p.head_dim);
  e.order.resize(groups);
  std::iota(e.order.begin(), e.order.end(), 0u);

  // The all-raw block: no metadata, every tile verbatim in the input dtype.
  const std::vector<uint32_t> all_raw(tiles, t::kWRaw);
  t::TileLayout raw =
      t::make_layout(p.is_value, p.num_tokens, p.head_dim, dtype, false, false, false, 0, 0, 0);
  raw.block_bytes = tiles_end(raw, all_raw);
  e.plan = {raw, all_raw};
  if (!e.q.ok) return e;

  // Per group: centre (smallest code) and the width class of its offsets.
  e.centers.resize(groups);
  std::vector<uint32_t> cls(groups);
  for (uint32_t g = 0; g < groups; ++g) {
    const int32_t* c = &e.q.codes[size_t(g) * p.group_size];
    const auto [lo, hi] = std::minmax_element(c, c + p.group_size);
    e.centers[g] = *lo;
    cls[g] = t::width_code_for(f::bit_width(uint32_t(int64_t(*hi) - *lo)), p.split_widths);
  }
  const auto range = std::minmax_element(e.centers.begin(), e.centers.end());
  const int32_t center_base = *range.first;
  const int64_t spread = int64_t(*range.second) - center_base;
  const uint32_t center_bytes = spread < 256 ? 1u : spread < 65536 ? 2u : 4u;
  // The quantized block for a group order, or an empty plan if every tile would be raw.
  auto plan_for = [&](const std::vector<uint32_t>& order) {
    std::vector<uint32_t> widths(tiles, t::kW0);
    for (uint32_t j = 0; j < groups; ++j) {
      widths[j / 16] = std::max(widths[j / 16], cls[order[j]]);
    }
    if (std::all_of(widths.begin(), widths.end(), [](uint32_t w) { return w == t::kWRaw; })) {
      return TilePlan{};
    }
    bool permuted = false;
    for (uint32_t j = 0; j < groups; ++j) permuted |= order[j] != j;
    t::TileLayout b =
        t::make_layout(p.is_value, p.num_tokens, p.head_dim, dtype, true, p.relative, permuted,
                       center_bytes, center_base, p.relative ? 0u : f::float_bits(e.q.steps[0]));
    b.block_bytes = tiles_end(b, widths);
    return TilePlan{b, widths};
  };
  TilePlan best = plan_for(e.order);
  // K: channels sorted by width class (stable), so that wide channels share tiles; kept only
  // where it makes the block smaller (it costs a byte per channel).
  if (!p.is_value && p.permute_channels) {
    std::vector<uint32_t> sorted = e.order;
    std::stable_sort(sorted.begin(), sorted.end(),
                     [&](uint32_t a, uint32_t b) { return cls[a] < cls[b]; });
    const TilePlan permuted = plan_for(sorted);
    if (!permuted.widths.empty() &&
        (best.widths.empty() || permuted.layout.block_bytes < best.layout.block_bytes)) {
      best = permuted;
      e.order = sorted;
    }
  }
  if (!best.widths.empty() && best.layout.block_bytes <= raw.block_bytes) {
    e.plan = best;
  } else {
    std::iota(e.order.begin(), e.order.end(), 0u);  // the all-raw block is never permuted
  }
  return e;
}

Encoding plan_block(const CodecParams& p, const void* src, int64_t stride, kvc_dtype dtype) {
  return plan_codes(p, quantize(p, gather_groups(p, src, stride, dtype)), dtype);
}

// The stored bits of element (token, channel) of the input, for raw tiles.
uint32_t input_bits(const void* src, kvc_dtype dtype, size_t i) {
  if (dtype == KVC_DTYPE_FP32) {
    uint32_t v;
    std::memcpy(&v, static_cast<const uint8_t*>(src) + 4 * i, 4);
    return v;
  }
  uint16_t v;
  std::memcpy(&v, static_cast<const uint8_t*>(src) + 2 * i, 2);
  return v;
}

}  // namespace

TilePlan plan_tile_block(const CodecParams& p, const void* src, int64_t stride, kvc_dtype dtype) {
  return plan_block(p, src, stride, dtype).plan;
}

namespace {

// Writes the block of encoding e; src (the input) is read for raw tiles only.
uint32_t write_tile_block(const CodecParams& p, const Encoding& e, const void* src, int64_t stride,
                          kvc_dtype dtype, uint8_t* dst) {
  const t::TileLayout& b = e.plan.layout;
  std::memset(dst, 0, b.block_bytes);
  t::write_header(b, dst);
  uint32_t at = b.tiles_offset;
  for (uint32_t i = 0; i < b.num_tiles; ++i) {
    f::store_u32(dst + b.table_offset + 4 * i, at | e.plan.widths[i]);
    at += t::tile_bytes(t::element_bits(e.plan.widths[i], b.raw_dtype), b.nblocks);
  }
  if (b.quantized) {
    for (uint32_t j = 0; j < b.num_groups; ++j) {
      const uint32_t g = e.order[j];
      if (b.permuted) f::store_u8(dst + b.perm_offset + j, g);
      if (b.per_group_step) {
        f::store_u16(dst + b.steps_offset + 2 * j, f::float_to_bf16_down(e.q.steps[g]));
      }
      const uint32_t off = uint32_t(int64_t(e.centers[g]) - b.center_base);
      uint8_t* c = dst + b.centers_offset + b.center_bytes * j;
      if (b.center_bytes == 1) f::store_u8(c, off);
      if (b.center_bytes == 2) f::store_u16(c, off);
      if (b.center_bytes == 4) f::store_u32(c, off);
    }
  }
  for (uint32_t i = 0; i < b.num_tiles; ++i) {
    const uint32_t w = e.plan.widths[i];
    uint8_t* tile = dst + t::entry_offset(t::table_entry(dst, b, i));
    // A raw tile is one plane of the input's width; a coded tile one or two planes (low bits,
    // then high bits).
    const uint32_t planes = w == t::kWRaw ? 1u : (t::plane_bits(w, 1) != 0 ? 2u : 1u);
    for (uint32_t plane = 0; plane < planes; ++plane) {
      const uint32_t bits =
          w == t::kWRaw ? t::element_bits(w, b.raw_dtype) : t::plane_bits(w, plane);
      if (bits == 0) continue;
      const uint32_t shift = plane == 0 ? 0u : t::plane_bits(w, 0);
      std::vector<uint32_t> words(t::tile_bytes(bits, b.nblocks) / 4, 0u);
      const t::PlaneGeometry geometry = t::plane_geometry(bits, b.pairs_per_lane);
      for (uint32_t lane = 0; lane < 32; ++lane) {
        for (uint32_t pair = 0; pair < b.pairs_per_lane; ++pair) {
          const t::PairLocation loc = t::locate_pair(geometry, lane, pair);
          for (uint32_t h = 0; h < 2; ++h) {
            const t::BlockCoord c = t::tile_element(b.is_value, i, t::pair_element(lane, pair, h));
            const uint32_t g = b.is_value ? c.token : e.order[c.position];
            const uint32_t channel = b.is_value ? c.position : g;
            uint32_t v;
            if (w == t::kWRaw) {
              v = input_bits(src, dtype, size_t(c.token) * size_t(stride) + channel);
            } else {
              const uint32_t pos = b.is_value ? channel : c.token;
              const uint32_t u = uint32_t(e.q.codes[size_t(g) * p.group_size + pos] - e.centers[g]);
              v = (u >> shift) & ((1u << bits) - 1u);
            }
            if (bits == 32) {
              words[h == 0 ? loc.word : t::next_lane_word(loc.word, bits, b.pairs_per_lane)] = v;
            } else {
              words[loc.word] |= v << (loc.shift + 16 * h);
            }
          }
        }
      }
      uint8_t* at = tile + (plane == 0 ? 0u : t::plane1_offset(w, b.nblocks));
      for (size_t k = 0; k < words.size(); ++k) f::store_u32(at + 4 * k, words[k]);
    }
  }
  return b.block_bytes;
}

}  // namespace

uint32_t encode_tile_block(const CodecParams& p, const void* src, int64_t stride, kvc_dtype dtype,
                           uint8_t* dst) {
  return write_tile_block(p, plan_block(p, src, stride, dtype), src, stride, dtype, dst);
}

uint32_t encode_tile_codes(const CodecParams& p, const Quantized& q, kvc_dtype dtype,
                           uint8_t* dst) {
  require(q.ok, KVC_ERROR_INTERNAL, "encode_tile_codes needs quantized codes");
  const Encoding e = plan_codes(p, q, dtype);
  const std::vector<uint32_t>& w = e.plan.widths;
  require(e.plan.layout.quantized && std::find(w.begin(), w.end(), t::kWRaw) == w.end(),
          KVC_ERROR_CORRUPT_DATA, "codes that need a ",
          e.plan.layout.quantized ? "raw tile" : "verbatim tile block",
          " (the input they came from is not there)");
  return write_tile_block(p, e, nullptr, 0, dtype, dst);
}

namespace {

const char* parse_error_text(t::ParseError e) {
  switch (e) {
    case t::ParseError::kTruncatedHeader:
      return "fewer bytes than the 32-byte header";
    case t::ParseError::kBadMagic:
      return "bad magic (not a kvcomp tile block)";
    case t::ParseError::kBadField:
      return "a header field is out of range";
    case t::ParseError::kTruncated:
      return "its stated length exceeds the bytes available";
    case t::ParseError::kBadSections:
      return "its sections do not fit in its stated length";
    case t::ParseError::kBadTable:
      return "its tile table does not match its tiles";
    case t::ParseError::kBadPermutation:
      return "its channel permutation is not one";
    default:
      return "unreadable header";
  }
}

}  // namespace

t::TileLayout parse_tile_header(const uint8_t* src, uint64_t available) {
  t::TileLayout b{};
  const t::ParseError err = t::parse_block(src, available, b);
  if (err == t::ParseError::kBadVersion) {
    fail(KVC_ERROR_FORMAT_VERSION, "tile block format version ",
         f::load_u8(src + t::offset::kVersion), " is not supported (this library reads version ",
         t::kVersion, ")");
  }
  if (err != t::ParseError::kNone)
    fail(KVC_ERROR_CORRUPT_DATA, "corrupt tile block: ", parse_error_text(err));
  return b;
}

namespace {

// Calls element(token, channel, raw, bits, g) for every element of a parsed tile block: its raw
// bits (raw tiles) or its unsigned offset from its group's centre, and its metadata position g.
template <class Element>
void walk_tiles(const t::TileLayout& b, const uint8_t* src, Element element) {
  for (uint32_t i = 0; i < b.num_tiles; ++i) {
    const uint32_t entry = t::table_entry(src, b, i);
    const uint32_t w = t::entry_width(entry);
    const uint8_t* tile = src + t::entry_offset(entry);
    const uint32_t bits0 = w == t::kWRaw ? t::element_bits(w, b.raw_dtype) : t::plane_bits(w, 0);
    const uint32_t bits1 = w == t::kWRaw ? 0u : t::plane_bits(w, 1);
    const uint8_t* plane1 = tile + t::plane1_offset(w, b.nblocks);
    // Each plane's geometry once per tile, each pair's place once per pair.
    const t::PlaneGeometry geometry0 = t::plane_geometry(bits0, b.pairs_per_lane);
    const t::PlaneGeometry geometry1 = t::plane_geometry(bits1, b.pairs_per_lane);
    // Element h of the pair at loc of one plane.
    auto field = [&](const uint8_t* plane, uint32_t bits, t::PairLocation loc,
                     uint32_t h) -> uint32_t {
      if (bits == 0) return 0u;
      if (bits == 32) {
        return f::load_u32(
            plane + 4 * (h == 0 ? loc.word : t::next_lane_word(loc.word, bits, b.pairs_per_lane)));
      }
      return (f::load_u32(plane + 4 * loc.word) >> (loc.shift + 16 * h)) &
             (bits == 16 ? 0xFFFFu : (1u << bits) - 1u);
    };
    for (uint32_t lane = 0; lane < 32; ++lane) {
      for (uint32_t pair = 0; pair < b.pairs_per_lane; ++pair) {
        const t::PairLocation loc0 = t::locate_pair(geometry0, lane, pair);
        const t::PairLocation loc1 = t::locate_pair(geometry1, lane, pair);
        for (uint32_t h = 0; h < 2; ++h) {
          const t::BlockCoord c = t::tile_element(b.is_value, i, t::pair_element(lane, pair, h));
          const uint32_t g = b.is_value ? c.token : c.position;  // metadata position
          const uint32_t channel = b.is_value ? c.position : t::channel_of(src, b, c.position);
          const bool raw = w == t::kWRaw;
          const uint32_t x =
              raw ? field(tile, bits0, loc0, h)
                  : field(tile, bits0, loc0, h) | (field(plane1, bits1, loc1, h) << bits0);
          element(c.token, channel, raw, x, g);
        }
      }
    }
  }
}

t::TileLayout parse_for(const CodecParams& p, const uint8_t* src, uint64_t available) {
  const t::TileLayout b = parse_tile_header(src, available);
  require(b.is_value == p.is_value && b.num_tokens == p.num_tokens && b.head_dim == p.head_dim,
          KVC_ERROR_CONFIG_MISMATCH, "tile block is ", b.is_value ? "V" : "K", " ", b.num_tokens,
          "x", b.head_dim, " but the codec is ", p.is_value ? "V" : "K", " ", p.num_tokens, "x",
          p.head_dim);
  return b;
}

}  // namespace

void decode_tile_block(const CodecParams& p, const uint8_t* src, uint64_t available,
                       kvc_dtype dtype, void* dst, int64_t stride) {
  const t::TileLayout b = parse_for(p, src, available);
  with_storer(dst, dtype, [&](auto store) {
    walk_tiles(b, src, [&](uint32_t token, uint32_t channel, bool raw, uint32_t x, uint32_t g) {
      float v;
      if (!raw) {
        v = f::dequantize(int32_t(t::group_center(src, b, g) + x), t::group_step(src, b, g));
      } else {
        v = b.raw_dtype == KVC_DTYPE_FP32   ? f::bits_float(x)
            : b.raw_dtype == KVC_DTYPE_BF16 ? f::bf16_to_float(uint16_t(x))
                                            : f::half_to_float(uint16_t(x));
      }
      store(size_t(token) * size_t(stride) + channel, v);
    });
  });
}

Quantized tile_block_codes(const CodecParams& p, const uint8_t* src, uint64_t available) {
  const t::TileLayout b = parse_for(p, src, available);
  Quantized q;
  q.ok = b.quantized;
  for (uint32_t i = 0; i < b.num_tiles && q.ok; ++i) {
    q.ok = t::entry_width(t::table_entry(src, b, i)) != t::kWRaw;
  }
  if (!q.ok) return q;
  q.steps.resize(p.num_groups);
  q.codes.resize(p.num_elements());
  walk_tiles(b, src, [&](uint32_t token, uint32_t channel, bool, uint32_t x, uint32_t g) {
    const uint32_t group = p.is_value ? token : channel;  // g is the group's position
    q.steps[group] = t::group_step(src, b, g);
    q.codes[size_t(group) * p.group_size + (p.is_value ? channel : token)] =
        int32_t(t::group_center(src, b, g) + x);
  });
  q.ok = codes_in_range(q);
  return q;
}

}  // namespace kvc::cpu
