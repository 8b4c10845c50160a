// SPDX-License-Identifier: Apache-2.0
// The tile kernel's B-operand path (tile_products_any in kernels/attention/tile_attention.cuh:
// the lane's loads, the code-to-half2 conversions of tile_convert.cuh and mma.sync) run on the
// CPU under the host emulation for every width and both dtypes. With the identity as A, each
// accumulator is one element of the tile's 16 x 8 NT matrix, exactly (one product by 1 in fp32);
// it must equal the code the tile's bytes hold for that element (tiles::pair_location, the
// format's placement, docs/format.md §17). Over 2^bits launches every element position (every
// lane, pair, half and so every slot of every word of both planes) holds every code once, the
// other slots of its words holding other codes. And the kernel's readers of a block's metadata
// (tile_layout, tile_step, tile_center) against the format's (tiles::parse_block, group_step,
// group_center), over centres of 1, 2 and 4 bytes.
#include "tests/emulation/device_emulation.hpp"  // first: the kernels compile against it
//
#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "codec/codec_params.hpp"
#include "cpu/tile_codec_cpu.hpp"
#include "kernels/attention/tile_attention.cuh"
#include "test_support.hpp"

namespace kvc::test {
namespace {

namespace k = kvc::kernels;
namespace t = kvc::tiles;

// out[row][8 n + col] = the 16 x 8 NT product of the identity with the tile.
template <kvc_dtype DT, uint32_t NT>
__global__ void tile_times_identity(const uint8_t* tile, uint32_t wcode, float* out) {
  constexpr bool kBf16 = DT == KVC_DTYPE_BF16;
  const uint32_t lane = threadIdx.x % 32;
  float a[8];
  for (uint32_t i = 0; i < 8; ++i) {
    const k::mma::Coord c = k::mma::a_coord(lane, i);
    a[i] = c.row == c.col ? 1.0f : 0.0f;
  }
  const uint4 frag = make_uint4(device::pack2<kBf16>(a[0], a[1]), device::pack2<kBf16>(a[2], a[3]),
                                device::pack2<kBf16>(a[4], a[5]), device::pack2<kBf16>(a[6], a[7]));
  float acc[NT][4] = {};
  k::tile_products_any<DT>(acc, frag, tile, wcode, lane);
  for (uint32_t n = 0; n < NT; ++n) {
    for (uint32_t i = 0; i < 4; ++i) {
      const k::mma::Coord c = k::mma::c_coord(lane, i);
      out[c.row * 8 * NT + 8 * n + c.col] = acc[n][i];
    }
  }
}

// The code of tile element (k, 8 nblock + n) in launch `round`: every position runs through
// every code as `round` does, neighbours differing.
uint32_t code_of(uint32_t round, uint32_t k, uint32_t col, uint32_t bits) {
  return (round + 7u * k + 3u * col + (col >> 3)) & ((1u << bits) - 1u);
}

// A tile of width code `wcode` (coded widths) holding code_of(round, ...) everywhere, laid out as
// the format places it: each plane's pair p of a lane at pair_location, half h 16 bits above.
std::vector<uint4> make_tile(uint32_t wcode, uint32_t nt, uint32_t round) {
  const uint32_t low = t::plane_bits(wcode, 0), high = t::plane_bits(wcode, 1);
  std::vector<uint4> storage((t::tile_bytes(low + high, nt) + 15) / 16, uint4{});
  auto* words = reinterpret_cast<uint32_t*>(storage.data());
  uint32_t* plane1 = words + t::plane1_offset(wcode, nt) / 4;
  for (uint32_t lane = 0; lane < 32; ++lane) {
    for (uint32_t p = 0; p < 2 * nt; ++p) {
      for (uint32_t h = 0; h < 2; ++h) {
        const t::TileCoord c = t::pair_element(lane, p, h);
        const uint32_t code = code_of(round, c.k, 8 * c.nblock + c.n, low + high);
        const t::PairLocation lo = t::pair_location(lane, p, low, 2 * nt);
        words[lo.word] |= (code & ((1u << low) - 1u)) << (lo.shift + 16 * h);
        if (high > 0) {
          const t::PairLocation hi = t::pair_location(lane, p, high, 2 * nt);
          plane1[hi.word] |= (code >> low) << (hi.shift + 16 * h);
        }
      }
    }
  }
  return storage;
}

template <kvc_dtype DT, uint32_t NT>
void check_width(uint32_t wcode, uint32_t rounds) {
  const uint32_t bits = t::plane_bits(wcode, 0) + t::plane_bits(wcode, 1);
  std::vector<float> out(16 * 8 * NT);
  for (uint32_t round = 0; round < rounds; ++round) {
    const std::vector<uint4> tile = make_tile(wcode, NT, round);
    std::fill(out.begin(), out.end(), -1.0f);
    const auto r = emu::launch(tile_times_identity<DT, NT>, 1, 32, 0,
                               reinterpret_cast<const uint8_t*>(tile.data()), wcode, out.data());
    ASSERT_TRUE(r.errors.empty()) << r.errors.front();
    for (uint32_t row = 0; row < 16; ++row) {
      for (uint32_t col = 0; col < 8 * NT; ++col) {
        ASSERT_EQ(out[row * 8 * NT + col], float(code_of(round, row, col, bits)))
            << "dtype " << int(DT) << " NT " << NT << " bits " << bits << " round " << round
            << " k " << row << " n " << col;
      }
    }
  }
}

template <kvc_dtype DT, uint32_t NT>
void check_all_widths() {
  for (uint32_t wcode : {t::kW2, t::kW3, t::kW4, t::kW6}) {
    const uint32_t bits = t::plane_bits(wcode, 0) + t::plane_bits(wcode, 1);
    check_width<DT, NT>(wcode, 1u << bits);  // every code at every position
  }
  check_width<DT, NT>(t::kW8, 16);  // 8 bits: a sixteenth of the codes at each position
}

// K tiles of 64-token blocks and V tiles of D = 64 (NT 8), 128 (16) and 256 (32).
TEST(TileProductsEmulation, EveryCodeOfEveryWidthReachesTheMma) {
  check_all_widths<KVC_DTYPE_FP16, 8>();
  check_all_widths<KVC_DTYPE_BF16, 8>();
  check_all_widths<KVC_DTYPE_FP16, 16>();
  check_all_widths<KVC_DTYPE_BF16, 16>();
  check_all_widths<KVC_DTYPE_FP16, 32>();
  check_all_widths<KVC_DTYPE_BF16, 32>();
}

// K blocks (a step for the block) and V blocks (a bf16 step per token) whose groups are shifted
// by offsets of up to `reach` codes, so that the centres need 1, 2 or 4 bytes: the kernel's
// readers give the format's steps and centres for every group.
TEST(TileProductsEmulation, MetadataReadersEqualTheFormats) {
  std::set<uint32_t> center_bytes;
  std::set<std::pair<bool, bool>> key_layouts;  // (permuted, a step per channel) of K blocks
  struct Kind {
    bool is_value;
    kvc_bound_mode mode;
    float bound;
  };
  for (const Kind kind :
       {Kind{false, KVC_BOUND_ABSOLUTE, 0.5f}, Kind{false, KVC_BOUND_RELATIVE, 0.05f},
        Kind{true, KVC_BOUND_RELATIVE, 0.3f}}) {
    const bool is_value = kind.is_value;
    for (const float reach : {60.0f, 3000.0f, 200000.0f}) {
      for (const bool wide_channels : {false, true}) {
        constexpr uint32_t T = 64, D = 64;
        kvc_codec_config c =
            make_config(is_value ? KVC_KIND_VALUE : KVC_KIND_KEY, T, D, kind.mode, kind.bound);
        c.block_format = KVC_BLOCK_FORMAT_TILES;
        const CodecParams p = CodecParams::from_config(c, false);
        // Group g (K channel, V token) around g * reach / groups codes (K: step 1; V: the
        // token's step is about 0.3 * 2 / 255 of its range, 2 here). wide_channels: every
        // third K channel spans many more codes and the others none, so sorting channels by
        // width pays (a permuted block) under either bound.
        std::vector<float> x(size_t(T) * D);
        for (uint32_t t = 0; t < T; ++t) {
          for (uint32_t ch = 0; ch < D; ++ch) {
            const uint32_t g = is_value ? t : ch;
            const float spread = is_value ? reach * 0.3f * 2.0f / 255.0f * 2.0f : reach;
            const bool narrow = wide_channels && ch % 3 != 0;  // constant: width 0
            const float wide = wide_channels && ch % 3 == 0 ? float(t % 16) * 8.0f : 0.0f;
            x[size_t(t) * D + ch] = float(g) / float(D) * spread +
                                    (narrow ? 0.0f : float((t * 7 + ch * 3) % 5) * 0.25f) + wide;
          }
        }
        const Block b = make_block(KVC_DTYPE_FP32, T, D, D, x);
        std::vector<uint8_t> block(p.max_block_bytes(KVC_DTYPE_FP32) + 4);
        block.resize(cpu::encode_tile_block(p, b.data(), D, KVC_DTYPE_FP32, block.data()));
        t::TileLayout want{};
        ASSERT_EQ(t::parse_block(block.data(), block.size(), want), t::ParseError::kNone);
        ASSERT_TRUE(want.quantized);
        center_bytes.insert(want.center_bytes);
        const t::TileLayout got = k::tile_layout(block.data(), T, D);
        EXPECT_EQ(got.centers_offset, want.centers_offset);
        EXPECT_EQ(got.steps_offset, want.steps_offset);
        for (uint32_t g = 0; g < want.num_groups; ++g) {
          ASSERT_EQ(k::tile_step(block.data(), got, g), t::group_step(block.data(), want, g))
              << is_value << " " << reach << " group " << g;
          ASSERT_EQ(k::tile_center(block.data(), got, g),
                    float(int32_t(t::group_center(block.data(), want, g))))
              << is_value << " " << reach << " group " << g << " centre bytes "
              << want.center_bytes;
        }
        if (is_value) continue;
        key_layouts.insert({want.permuted, want.per_group_step});
        for (uint32_t pos = 0; pos < D; pos += 2) {  // the query fold's pair reader
          const k::PairMeta m = k::tile_pair_meta(block.data(), got, pos);
          for (uint32_t i = 0; i < 2; ++i) {
            const uint32_t j = pos + i;
            ASSERT_EQ(m.channel[i], t::channel_of(block.data(), want, j)) << "position " << j;
            ASSERT_EQ(m.step[i], t::group_step(block.data(), want, j)) << "position " << j;
            ASSERT_EQ(m.centre[i], float(int32_t(t::group_center(block.data(), want, j))))
                << "position " << j << " centre bytes " << want.center_bytes;
          }
        }
      }
    }
  }
  EXPECT_EQ(center_bytes, (std::set<uint32_t>{1, 2, 4}));
  EXPECT_EQ(key_layouts.size(), 4u) << "K blocks permuted or not, with one step or a step each";
}

}  // namespace
}  // namespace kvc::test
