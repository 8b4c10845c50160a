// SPDX-License-Identifier: Apache-2.0
// The tile attention kernel's code-to-half2 conversion (kernels/attention/tile_convert.cuh),
// run on the CPU through the same plan: for every width the magic number covers, every slot of
// a word and every code in both halves, LOP3 ((w >> base) & mask | magic) then one FMA by
// 2^-in_place with addend -magic * 2^-in_place gives the code exactly, in fp16 and in bf16.
#include <gtest/gtest.h>

#include <cmath>

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

}  // namespace
}  // namespace kvc::kernels::tile_convert
