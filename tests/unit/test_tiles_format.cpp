// SPDX-License-Identifier: Apache-2.0
// The host-callable math of tile format t1 (kernels/common/tile_format.cuh) that the tensor-core
// kernel shares: where each tile element is stored (the mma.m16n8k16 fragment coordinates it
// builds on are checked in test_mma_layout.cpp), and the magic-number integer-to-half
// conversions, exact for every code of every width.
#include <gtest/gtest.h>
#include <kvcomp/kvcomp.h>

#include <algorithm>
#include <set>
#include <vector>

#include "kernels/common/tile_format.cuh"

namespace kvc::test {
namespace {

namespace t = kvc::tiles;
namespace f = kvc::format;

// Every bit of a tile belongs to exactly one element; each lane's pairs sit in the unit
// interleave that makes a warp's loads contiguous.
TEST(TileStorage, EveryElementOnceAndCoalesced) {
  for (uint32_t bits : {1u, 2u, 4u, 8u, 16u, 32u}) {
    for (uint32_t nblocks = 2; nblocks <= 128; nblocks *= 2) {
      const uint32_t pairs = 2 * nblocks;
      const uint32_t bytes = t::tile_bytes(bits, nblocks);
      ASSERT_EQ(bytes % 16, 0u);
      std::vector<uint8_t> used(size_t(bytes) * 8, 0);
      const uint32_t words = bytes / 4;
      const uint32_t lane_words = t::lane_words(bits, pairs);
      for (uint32_t lane = 0; lane < 32; ++lane) {
        for (uint32_t p = 0; p < pairs; ++p) {
          const t::PairLocation loc = t::pair_location(lane, p, bits, pairs);
          for (uint32_t h = 0; h < 2; ++h) {
            uint32_t word = loc.word, shift = loc.shift;
            if (bits == 32) {
              if (h == 1) word = t::next_lane_word(loc.word, bits, pairs);
            } else {
              shift += 16 * h;
            }
            ASSERT_LT(word, words) << bits << " " << nblocks;
            ASSERT_LE(shift + std::min(bits, 32u), 32u);
            for (uint32_t i = 0; i < std::min(bits, 32u); ++i) {
              uint8_t& u = used[size_t(word) * 32 + shift + i];
              ASSERT_EQ(u, 0) << "bits " << bits << " nblocks " << nblocks << " lane " << lane;
              u = 1;
            }
            // Coalescing: lane word w of this lane is in unit w / U at the lane's slot.
            if (bits >= 16 || pairs * bits >= 16) {
              const uint32_t unit = std::min(4u, lane_words);
              EXPECT_EQ((word / unit) % 32, lane);
            } else {
              EXPECT_EQ(word, lane / (16 / bits / pairs));  // lanes share a word
            }
          }
        }
      }
      for (uint8_t u : used) ASSERT_EQ(u, 1) << "bits " << bits << " nblocks " << nblocks;
    }
  }
}

// pair_location computes with shifts; it must equal the layout as docs/format.md states it, in
// divisions, for every width, lane count and pair.
TEST(TileStorage, PairLocationIsTheFormatsDefinition) {
  auto defined = [](uint32_t lane, uint32_t p, uint32_t bits, uint32_t pairs) {
    const uint32_t lane_words = bits <= 16 ? (pairs * bits + 15) / 16 : 2 * pairs;
    const uint32_t u = std::min(4u, lane_words);
    if (bits <= 8) {
      const uint32_t per_word = 16 / bits;
      if (pairs < per_word) {
        const uint32_t sharing = per_word / pairs;
        return t::PairLocation{lane / sharing, ((lane % sharing) * pairs + p) * bits};
      }
      const uint32_t w = p / per_word;
      return t::PairLocation{(w / u) * 32 * u + lane * u + w % u, (p % per_word) * bits};
    }
    const uint32_t w = bits == 16 ? p : 2 * p;
    return t::PairLocation{(w / u) * 32 * u + lane * u + w % u, 0};
  };
  for (uint32_t bits : {1u, 2u, 4u, 8u, 16u, 32u}) {
    for (uint32_t pairs = 2; pairs <= 256; pairs *= 2) {  // 2 * n-blocks: T or D from 8 to 1024
      for (uint32_t lane = 0; lane < 32; ++lane) {
        for (uint32_t p = 0; p < pairs; ++p) {
          const t::PairLocation got = t::pair_location(lane, p, bits, pairs);
          const t::PairLocation want = defined(lane, p, bits, pairs);
          ASSERT_EQ(got.word, want.word) << bits << " bits, " << pairs << " pairs, lane " << lane;
          ASSERT_EQ(got.shift, want.shift) << bits << " bits, " << pairs << " pairs, lane " << lane;
        }
      }
    }
  }
}

TEST(TileStorage, ElementCoordinatesCoverTheTile) {
  for (bool is_value : {false, true}) {
    const uint32_t nblocks = 8;  // K: T = 64; V: D = 64
    std::set<std::pair<uint32_t, uint32_t>> seen;
    for (uint32_t lane = 0; lane < 32; ++lane) {
      for (uint32_t p = 0; p < 2 * nblocks; ++p) {
        for (uint32_t h = 0; h < 2; ++h) {
          const t::BlockCoord c = t::tile_element(is_value, 3, t::pair_element(lane, p, h));
          seen.insert({c.token, c.position});
          if (is_value) {
            EXPECT_TRUE(c.token >= 48 && c.token < 64);
            EXPECT_LT(c.position, 64u);
          } else {
            EXPECT_TRUE(c.position >= 48 && c.position < 64);
            EXPECT_LT(c.token, 64u);
          }
        }
      }
    }
    EXPECT_EQ(seen.size(), 16u * 64u);
  }
  // The pair's two halves are consecutive rows of the B operand (k, k + 1): one half2.
  for (uint32_t lane = 0; lane < 32; ++lane) {
    for (uint32_t p = 0; p < 8; ++p) {
      const t::TileCoord lo = t::pair_element(lane, p, 0), hi = t::pair_element(lane, p, 1);
      EXPECT_EQ(hi.k, lo.k + 1);
      EXPECT_EQ(hi.n, lo.n);
      EXPECT_EQ(lo.k % 2, 0u);
    }
  }
}

uint32_t put_pair(uint32_t shift, uint32_t lo, uint32_t hi) {
  return (lo << shift) | (hi << (shift + 16));
}

TEST(TileConversion, Fp16MagicIsExactForEveryCodeOfEveryWidth) {
  for (uint32_t bits : {1u, 2u, 4u, 8u}) {
    for (uint32_t shift = 0; shift + bits <= 16; shift += bits) {
      for (uint32_t u = 0; u < (1u << bits); ++u) {
        const uint32_t v = (1u << bits) - 1 - u;
        // Neighbouring slots full of ones must not leak into the pair.
        const uint32_t noise = ~put_pair(shift, (1u << bits) - 1, (1u << bits) - 1);
        const uint32_t w = put_pair(shift, u, v) | noise;
        EXPECT_EQ(t::pair_low(w, shift, bits), u);
        EXPECT_EQ(t::pair_high(w, shift, bits), v);
        const uint32_t h2 = t::hsub2_fp16(t::fp16x2_biased(w, shift, bits), t::kFp16Magic2);
        ASSERT_EQ(f::half_to_float(uint16_t(h2)), float(u)) << bits << " " << shift;
        ASSERT_EQ(f::half_to_float(uint16_t(h2 >> 16)), float(v)) << bits << " " << shift;
        if (shift + bits <= 10) {
          const uint32_t b2 = t::fp16x2_biased_in_place(w, shift, bits);
          ASSERT_EQ(f::half_to_float(uint16_t(b2)), 1024.0f + float(u << shift));
          ASSERT_EQ(f::half_to_float(uint16_t(b2 >> 16)), 1024.0f + float(v << shift));
        }
      }
    }
  }
}

TEST(TileConversion, Bf16MagicIsExactBelow128AndTheF32PathForEight) {
  for (uint32_t bits : {1u, 2u, 4u, 8u}) {
    for (uint32_t shift = 0; shift + bits <= 16; shift += bits) {
      for (uint32_t u = 0; u < (1u << bits); ++u) {
        const uint32_t w = put_pair(shift, u, u ^ 1u);
        const uint32_t h2 = t::hsub2_bf16(t::bf16x2_biased(w, shift, bits), t::kBf16Magic2);
        const bool exact = f::bf16_to_float(uint16_t(h2)) == float(u);
        if (u < 128) EXPECT_TRUE(exact) << bits << " " << u;
        if (u == 129) EXPECT_FALSE(exact);  // 8-bit codes from 128 up need the fp32 path
      }
    }
  }
  for (uint32_t u = 0; u < 256; ++u) {
    EXPECT_EQ(f::bf16_to_float(t::u8_to_bf16_via_f32(u)), float(u));
  }
}

TEST(TileWidths, CodesAndBits) {
  const uint32_t bits[] = {0, 2, 3, 4, 6, 8};
  for (uint32_t w = 0; w < t::kWRaw; ++w) {
    EXPECT_EQ(t::element_bits(w, KVC_DTYPE_FP16), bits[w]);
    EXPECT_EQ(t::plane_bits(w, 0) + t::plane_bits(w, 1), bits[w]);
    EXPECT_TRUE(t::plane_bits(w, 1) == 0 || t::plane_bits(w, 1) * 2 == t::plane_bits(w, 0));
  }
  const uint32_t split[] = {t::kW0, t::kW2, t::kW2, t::kW3, t::kW4, t::kW6, t::kW6, t::kW8, t::kW8};
  const uint32_t plain[] = {t::kW0, t::kW2, t::kW2, t::kW4, t::kW4, t::kW8, t::kW8, t::kW8, t::kW8};
  for (uint32_t b = 0; b <= 8; ++b) {
    EXPECT_EQ(t::width_code_for(b), split[b]) << b;
    EXPECT_EQ(t::width_code_for(b, false), plain[b]) << b;
    EXPECT_GE(t::element_bits(t::width_code_for(b), KVC_DTYPE_FP16), b);
  }
  EXPECT_EQ(t::width_code_for(9), uint32_t(t::kWRaw));
  EXPECT_EQ(t::element_bits(t::kWRaw, KVC_DTYPE_BF16), 16u);
  EXPECT_EQ(t::element_bits(t::kWRaw, KVC_DTYPE_FP32), 32u);
  EXPECT_EQ(t::tile_bytes(4, 16), 1024u);  // K tile, T = 128, 4 bits: 16 x 128 x 4 / 8
  EXPECT_EQ(t::plane1_offset(t::kW6, 16), 1024u);
}

}  // namespace
}  // namespace kvc::test
