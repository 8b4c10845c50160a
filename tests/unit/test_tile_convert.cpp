// SPDX-License-Identifier: Apache-2.0
// The tile attention kernel's code-to-half2 conversion (kernels/attention/tile_convert.cuh),
// run on the CPU through the same plan: for every width the magic number covers, every slot of
// a word and every code in both halves, LOP3 ((w >> base) & mask | magic) then one FMA by
// 2^-in_place with addend -magic * 2^-in_place gives the code exactly, in fp16 and in bf16; and
// for the two-plane 3- and 6-bit tiles, every code of both planes merged through plane_pair's
// plan; and the power of two by which fp16 folds past fp16's range are scaled (fold_shift).
#include <gtest/gtest.h>

#include <cmath>
#include <utility>
#include <vector>

#include "kernels/attention/tile_convert.cuh"

namespace kvc::kernels::tile_convert {
namespace {

namespace f = kvc::format;

float half_value(uint32_t bits16, bool bf16) {
  return bf16 ? f::bf16_to_float(uint16_t(bits16)) : f::half_to_float(uint16_t(bits16));
}

// The hardware's fma.rn.{f16,bf16}x2 on one half: a * b + c rounded once. Here every product
// and sum is exact in fp32, so rounding the fp32 result once is the same.
uint16_t fma_half(uint32_t a, uint32_t b, uint32_t c, bool bf16) {
  const float r = half_value(a, bf16) * half_value(b, bf16) + half_value(c, bf16);
  return bf16 ? f::float_to_bf16(r) : f::float_to_half(r);
}

TEST(TileConvert, EveryCodeOfEverySlotIsExact) {
  for (bool bf16 : {false, true}) {
    for (uint32_t bits : {2u, 4u, 8u}) {
      if (!magic_fits(bits, bf16)) continue;
      for (uint32_t slot = 0; slot < 16 / bits; ++slot) {
        const SlotPlan plan = slot_plan(bits, slot, bf16);
        ASSERT_EQ(plan.base + plan.in_place, slot * bits);
        ASSERT_LE(plan.in_place + bits, mantissa_bits(bf16)) << bits << " " << slot;
        for (uint32_t lo = 0; lo < (1u << bits); ++lo) {
          for (uint32_t hi = 0; hi < (1u << bits); ++hi) {
            // Neighbouring slots filled with ones: the mask must keep them out.
            const uint32_t noise =
                0xFFFFFFFFu & ~(((1u << bits) - 1u) * 0x00010001u << (slot * bits));
            const uint32_t w = noise | (lo << (slot * bits)) | (hi << (16 + slot * bits));
            const uint32_t biased = biased_pair(w >> plan.base, bits, plan.in_place, bf16);
            const uint32_t scale = fma_scale(plan.in_place, bf16);
            const uint32_t addend = fma_addend(plan.in_place, bf16);
            const uint16_t got_lo =
                fma_half(biased & 0xFFFFu, scale & 0xFFFFu, addend & 0xFFFFu, bf16);
            const uint16_t got_hi = fma_half(biased >> 16, scale >> 16, addend >> 16, bf16);
            ASSERT_EQ(half_value(got_lo, bf16), float(lo))
                << "bf16 " << bf16 << " bits " << bits << " slot " << slot << " code " << lo;
            ASSERT_EQ(half_value(got_hi, bf16), float(hi))
                << "bf16 " << bf16 << " bits " << bits << " slot " << slot << " code " << hi;
          }
        }
      }
    }
  }
}

// Two-plane tiles (3 = 2 + 1 and 6 = 4 + 2 bits), as plane_pair computes them: for every slot of
// the low plane's word, every slot of the high plane's and every code of both halves in both
// planes, the words' shifts, LOP3 (lo and the magic number), LOP3 (hi ORed above lo) and one FMA
// give exactly the half of lo + 2^LOW * hi (+0 for 0, as the single-plane path gives).
TEST(TileConvert, EveryCodeOfBothPlanesIsExact) {
  for (bool bf16 : {false, true}) {
    for (const auto& [low, high] : {std::pair{2u, 1u}, std::pair{4u, 2u}}) {
      for (uint32_t sl = 0; sl < 16 / low; ++sl) {
        for (uint32_t sh = 0; sh < 16 / high; ++sh) {
          const PlanePlan p = plane_plan(low, high, sl, sh, bf16);
          const uint32_t l = p.low.in_place;
          ASSERT_EQ(p.low.base + int32_t(l), int32_t(sl * low));
          ASSERT_EQ(p.high.base + int32_t(p.high.in_place), int32_t(sh * high));
          ASSERT_EQ(p.high.in_place, l + low);
          ASSERT_LE(l + low + high, mantissa_bits(bf16)) << low << "+" << high << " slot " << sl;
          const uint32_t hi_mask = ((1u << high) - 1u) * 0x00010001u << p.high.in_place;
          // Every other slot of both words filled with ones: the masks must keep them out.
          const uint32_t lo_noise = ~(((1u << low) - 1u) * 0x00010001u << (sl * low));
          const uint32_t hi_noise = ~(((1u << high) - 1u) * 0x00010001u << (sh * high));
          for (uint32_t code = 0; code < (1u << (2 * (low + high))); ++code) {
            const uint32_t lo0 = code & ((1u << low) - 1u);
            const uint32_t lo1 = (code >> low) & ((1u << low) - 1u);
            const uint32_t hi0 = (code >> (2 * low)) & ((1u << high) - 1u);
            const uint32_t hi1 = code >> (2 * low + high);
            const uint32_t lo_w = lo_noise | lo0 << (sl * low) | lo1 << (16 + sl * low);
            const uint32_t hi_w = hi_noise | hi0 << (sh * high) | hi1 << (16 + sh * high);
            const uint32_t lo_b = biased_pair(shift_by(lo_w, p.low.base), low, l, bf16);
            const uint32_t both = (shift_by(hi_w, p.high.base) & hi_mask) | lo_b;  // LOP3
            const uint32_t scale = fma_scale(l, bf16), addend = fma_addend(l, bf16);
            for (uint32_t half = 0; half < 2; ++half) {
              const auto part = [&](uint32_t x) { return (x >> (16 * half)) & 0xFFFFu; };
              const uint16_t got = fma_half(part(both), part(scale), part(addend), bf16);
              const uint32_t want = half == 0 ? lo0 + (hi0 << low) : lo1 + (hi1 << low);
              const uint16_t want_bits =
                  bf16 ? f::float_to_bf16(float(want)) : f::float_to_half(float(want));
              ASSERT_EQ(got, want_bits)
                  << "bf16 " << bf16 << " bits " << low << "+" << high << " slots " << sl << ","
                  << sh << " half " << half << " code " << want;
            }
          }
        }
      }
    }
  }
}

// Where the planes' codes go: 6-bit fp16 codes at bits 0 and 4 of the low word (its slots 2 and 3
// shifted by 8), the high word shifted left or right to just above them.
TEST(TileConvert, PlanePlans) {
  EXPECT_EQ(plane_plan(4, 2, 1, 1, false).low.base, 0);
  EXPECT_EQ(plane_plan(4, 2, 1, 1, false).low.in_place, 4u);
  EXPECT_EQ(plane_plan(4, 2, 1, 1, false).high.base, -6);  // bit 2 to bit 8
  EXPECT_EQ(plane_plan(4, 2, 2, 6, false).low.base, 8);
  EXPECT_EQ(plane_plan(4, 2, 2, 6, false).high.base, 8);  // bit 12 to bit 4
  EXPECT_EQ(plane_plan(4, 2, 1, 1, true).low.base, 4);    // bf16: every 4-bit code at bit 0
  EXPECT_EQ(plane_plan(2, 1, 3, 3, false).high.in_place, 8u);
  EXPECT_EQ(plane_plan(2, 1, 4, 4, false).low.base, 8);
  EXPECT_EQ(shift_by(0x80000001u, 1), 0x40000000u);
  EXPECT_EQ(shift_by(0x80000001u, -1), 0x00000002u);
}

// The constants are the halves they claim to be.
TEST(TileConvert, FmaConstants) {
  for (bool bf16 : {false, true}) {
    const float magic = bf16 ? 128.0f : 1024.0f;
    for (uint32_t s = 0; s <= 8; ++s) {
      EXPECT_EQ(half_value(fma_scale(s, bf16) & 0xFFFFu, bf16), std::ldexp(1.0f, -int(s)));
      EXPECT_EQ(half_value(fma_addend(s, bf16) >> 16, bf16), -magic * std::ldexp(1.0f, -int(s)));
    }
  }
}

// The shifts a word needs: 4-bit fp16 codes shift once per word (slots 2 and 3), 8-bit bf16
// codes do not fit the magic number at all.
TEST(TileConvert, SlotPlans) {
  EXPECT_EQ(slot_plan(4, 1, false).base, 0u);
  EXPECT_EQ(slot_plan(4, 2, false).base, 8u);
  EXPECT_EQ(slot_plan(4, 3, false).base, 8u);
  EXPECT_EQ(slot_plan(2, 4, false).base, 0u);
  EXPECT_EQ(slot_plan(2, 5, false).base, 10u);
  EXPECT_TRUE(magic_fits(8, false));
  EXPECT_FALSE(magic_fits(8, true));
}

// fold_shift puts every bound from fp16's limit up (inf and NaN included) into [2^14, 2^15),
// below the limit after rounding to fp16, with 2^e and 2^-e normal floats.
TEST(TileConvert, FoldShiftsBringBoundsBelowTheFp16Limit) {
  std::vector<float> bounds = {kFp16FoldLimit, 65519.0f, 65536.0f,
                               1e5f,           3.0e38f,  std::nextafter(131072.0f, 0.0f),
                               131072.0f,      INFINITY, NAN};
  for (float b = kFp16FoldLimit; b < 3e38f; b *= 1.37f) bounds.push_back(b);
  for (float b : bounds) {
    const uint32_t e = fold_shift(b);
    EXPECT_GE(e, 1u) << b;
    EXPECT_LE(e, 114u) << b;
    EXPECT_EQ(pow2(int32_t(e)), std::ldexp(1.0f, int(e))) << b;
    EXPECT_EQ(pow2(-int32_t(e)), std::ldexp(1.0f, -int(e))) << b;
    if (std::isfinite(b)) {
      const float scaled = b * pow2(-int32_t(e));
      EXPECT_GE(scaled, 16384.0f) << b;
      EXPECT_LT(scaled, 32768.0f) << b;
      EXPECT_TRUE(std::isfinite(f::half_to_float(f::float_to_half(scaled)))) << b;
    }
  }
}

}  // namespace
}  // namespace kvc::kernels::tile_convert
