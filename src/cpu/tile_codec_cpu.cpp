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
    const CodeRange r = code_range(&e.q.codes[size_t(g) * p.group_size], p.group_size);
    e.centers[g] = r.lo;
    cls[g] = t::width_code_for(f::bit_width(uint32_t(int64_t(r.hi) - r.lo)), p.split_widths);
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

// One plane of a tile: the kBits-bit fields (0, 1, 2, 4, 8, 16 or 32 bits) of every lane's
// pairs, placed by the kernels' own functions (t::locate_pair).
template <uint32_t kBits>
struct Plane {
  static constexpr uint32_t bits = kBits;
  static constexpr uint32_t mask = kBits >= 32 ? ~0u : (1u << kBits) - 1u;
  uint32_t pairs;  // per lane
  t::PlaneGeometry geometry;
  explicit Plane(uint32_t pairs) : pairs(pairs), geometry(t::plane_geometry(kBits, pairs)) {}
  // The fields of halves 0 and 1 of pair p of `lane`.
  void read(const uint8_t* plane, uint32_t lane, uint32_t p, uint32_t x[2]) const {
    if constexpr (kBits == 0) {
      x[0] = x[1] = 0;
    } else {
      const t::PairLocation loc = t::locate_pair(geometry, lane, p);
      const uint32_t w = f::load_u32(plane + 4 * loc.word);
      if constexpr (kBits == 32) {
        x[0] = w;
        x[1] = f::load_u32(plane + 4 * t::next_lane_word(loc.word, kBits, pairs));
      } else {
        x[0] = (w >> loc.shift) & mask;
        x[1] = (w >> (loc.shift + 16)) & mask;
      }
    }
  }
  // Adds the low kBits bits of x0 and x1 as pair p of `lane` to a zeroed plane.
  void write(uint8_t* plane, uint32_t lane, uint32_t p, uint32_t x0, uint32_t x1) const {
    if constexpr (kBits != 0) {
      const t::PairLocation loc = t::locate_pair(geometry, lane, p);
      uint8_t* at = plane + 4 * loc.word;
      if constexpr (kBits == 32) {
        f::store_u32(at, x0);
        f::store_u32(plane + 4 * t::next_lane_word(loc.word, kBits, pairs), x1);
      } else {
        f::store_u32(at,
                     f::load_u32(at) | (x0 & mask) << loc.shift | (x1 & mask) << (loc.shift + 16));
      }
    }
  }
};

// Calls f(low, high) with the two planes of a tile of width code w, their widths constants of
// f: a raw tile is one plane of the raw dtype's width, a coded tile the low bits of its
// elements, then the high bits (3- and 6-bit tiles).
template <class F>
void with_planes(const t::TileLayout& b, uint32_t w, F f) {
  const uint32_t pairs = b.pairs_per_lane;
  if (w == t::kWRaw) {
    if (b.raw_dtype == KVC_DTYPE_FP32) return f(Plane<32>(pairs), Plane<0>(pairs));
    return f(Plane<16>(pairs), Plane<0>(pairs));
  }
  t::with_coded_width(w, [&](auto code) {
    constexpr uint32_t kCode = decltype(code)::value;
    f(Plane<t::plane_bits(kCode, 0)>(pairs), Plane<t::plane_bits(kCode, 1)>(pairs));
  });
}

// Calls f(lane, p, k, col) for every pair p of every lane of a tile: the pair's halves are rows
// k and k + 1 of column col of the tile's B operands (t::pair_element), where row k is the
// tile's group 16 * tile + k by position (K channel position, V token) and col the other index.
template <class F>
void for_each_pair(uint32_t pairs, F f) {
  for (uint32_t lane = 0; lane < 32; ++lane) {
    for (uint32_t p = 0; p < pairs; ++p) {
      const t::TileCoord c = t::pair_element(lane, p, 0);
      f(lane, p, c.k, 8 * c.nblock + c.n);
    }
  }
}

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
    uint8_t* plane1 = tile + t::plane1_offset(w, b.nblocks);
    // Row k of the tile: group g; element (k, col) of a coded tile is codes[row[k] + col] -
    // center[k], of a raw tile the input's element row[k] + col * col_step.
    size_t row[16];
    int32_t center[16] = {};
    const size_t col_step = w == t::kWRaw && !b.is_value ? size_t(stride) : 1u;
    for (uint32_t k = 0; k < 16; ++k) {
      const uint32_t j = 16 * i + k, g = b.is_value ? j : e.order[j];
      if (w == t::kWRaw) {
        row[k] = b.is_value ? size_t(j) * size_t(stride) : g;
      } else {
        row[k] = size_t(g) * p.group_size;
        center[k] = e.centers[g];
      }
    }
    auto field = [&](uint32_t k, uint32_t col) -> uint32_t {
      const size_t at = row[k] + col * col_step;
      return w == t::kWRaw ? input_bits(src, dtype, at) : uint32_t(e.q.codes[at] - center[k]);
    };
    with_planes(b, w, [&](auto low, auto high) {
      for_each_pair(b.pairs_per_lane, [&](uint32_t lane, uint32_t pair, uint32_t k, uint32_t col) {
        const uint32_t x0 = field(k, col), x1 = field(k + 1, col);
        low.write(tile, lane, pair, x0, x1);
        if constexpr (decltype(high)::bits != 0) {  // 3- and 6-bit tiles: the high bits
          high.write(plane1, lane, pair, x0 >> decltype(low)::bits, x1 >> decltype(low)::bits);
        }
      });
    });
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

// Calls element(k, col, x) for every element of a tile of width code w (for_each_pair's rows
// and columns): its raw bits (a raw tile) or its unsigned offset from its group's centre.
template <class Element>
void walk_tile(const t::TileLayout& b, const uint8_t* tile, uint32_t w, Element element) {
  const uint8_t* plane1 = tile + t::plane1_offset(w, b.nblocks);
  with_planes(b, w, [&](auto low, auto high) {
    for_each_pair(b.pairs_per_lane, [&](uint32_t lane, uint32_t pair, uint32_t k, uint32_t col) {
      uint32_t x[2];
      low.read(tile, lane, pair, x);
      if constexpr (decltype(high)::bits != 0) {  // 3- and 6-bit tiles: the high bits
        uint32_t y[2];
        high.read(plane1, lane, pair, y);
        x[0] |= y[0] << decltype(low)::bits;
        x[1] |= y[1] << decltype(low)::bits;
      }
      element(k, col, x[0]);
      element(k + 1, col, x[1]);
    });
  });
}

t::TileLayout parse_for(const CodecParams& p, const uint8_t* src, uint64_t available) {
  const t::TileLayout b = parse_tile_header(src, available);
  require(b.is_value == p.is_value && b.num_tokens == p.num_tokens && b.head_dim == p.head_dim,
          KVC_ERROR_CONFIG_MISMATCH, "tile block is ", b.is_value ? "V" : "K", " ", b.num_tokens,
          "x", b.head_dim, " but the codec is ", p.is_value ? "V" : "K", " ", p.num_tokens, "x",
          p.head_dim);
  return b;
}

// The codes and steps of a parsed block's coded tiles in group order (as quantize() gives them);
// the groups of raw tiles keep code 0 and step 0.
Quantized coded_tiles(const CodecParams& p, const t::TileLayout& b, const uint8_t* src) {
  Quantized q;
  q.steps.assign(p.num_groups, 0.0f);
  q.codes.assign(p.num_elements(), 0);
  for (uint32_t i = 0; i < b.num_tiles; ++i) {
    const uint32_t entry = t::table_entry(src, b, i);
    if (t::entry_width(entry) == t::kWRaw) continue;
    // Row k of the tile holds the codes of group g at codes[row[k] + col].
    size_t row[16];
    uint32_t center[16];
    for (uint32_t k = 0; k < 16; ++k) {
      const uint32_t j = 16 * i + k, g = b.is_value ? j : t::channel_of(src, b, j);
      q.steps[g] = t::group_step(src, b, j);
      row[k] = size_t(g) * p.group_size;
      center[k] = t::group_center(src, b, j);
    }
    walk_tile(b, src + t::entry_offset(entry), t::entry_width(entry),
              [&](uint32_t k, uint32_t col, uint32_t x) {
                q.codes[row[k] + col] = int32_t(center[k] + x);  // modulo 2^32: no overflow
              });
  }
  return q;
}

}  // namespace

void decode_tile_block(const CodecParams& p, const uint8_t* src, uint64_t available,
                       kvc_dtype dtype, void* dst, int64_t stride) {
  const t::TileLayout b = parse_for(p, src, available);
  // The codes first, then the values, as format v1 decodes; then the raw tiles' elements.
  if (b.quantized) store_values(p, coded_tiles(p, b, src), dtype, dst, stride);
  // Element (k, col) of tile i goes to dst[row[k] + col * col_step].
  const size_t col_step = b.is_value ? 1u : size_t(stride);
  with_storer(dst, dtype, [&](auto store) {
    for (uint32_t i = 0; i < b.num_tiles; ++i) {
      const uint32_t entry = t::table_entry(src, b, i);
      if (t::entry_width(entry) != t::kWRaw) continue;
      size_t row[16];
      for (uint32_t k = 0; k < 16; ++k) {
        const uint32_t j = 16 * i + k;  // K: channel position, V: token
        row[k] = b.is_value ? size_t(j) * size_t(stride) : t::channel_of(src, b, j);
      }
      walk_tile(b, src + t::entry_offset(entry), t::kWRaw,
                [&](uint32_t k, uint32_t col, uint32_t x) {
                  store(row[k] + col * col_step, raw_value(b.raw_dtype, x));
                });
    }
  });
}

Quantized tile_block_codes(const CodecParams& p, const uint8_t* src, uint64_t available) {
  const t::TileLayout b = parse_for(p, src, available);
  bool coded = b.quantized;
  for (uint32_t i = 0; i < b.num_tiles && coded; ++i) {
    coded = t::entry_width(t::table_entry(src, b, i)) != t::kWRaw;
  }
  if (!coded) {
    Quantized q;
    q.ok = false;
    return q;
  }
  Quantized q = coded_tiles(p, b, src);
  q.ok = codes_in_range(q);
  return q;
}

}  // namespace kvc::cpu
