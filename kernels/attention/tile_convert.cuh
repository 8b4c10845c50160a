// SPDX-License-Identifier: Apache-2.0
// Tile codes to half2 in about one instruction per element (format t1 puts a pair's two codes
// 16 bits apart, slot s of a word at bit s * BITS; tile_format.cuh).
//
// OR-ing an integer u into the mantissa of a power of two M (the "magic" 1024 = 0x6400 for
// fp16, 128 = 0x4300 for bf16) gives the half M + u exactly while u fits the mantissa. A code
// already sitting at bit `in_place` (in_place + BITS <= mantissa bits) needs no shift: the
// half is M + u * 2^in_place, and one FMA by 2^-in_place with addend -M * 2^-in_place leaves
// u exactly (every step is a power-of-two scaling or an exact difference). So a pair costs one
// LOP3 ((w & mask) | magic) and one HFMA2, plus one shift per word for the slots that lie
// beyond the mantissa (shared by the slots that follow). Host-callable: the CPU tests check
// every code of every width and slot through the same plan.
#pragma once

#include <cstdint>

#include "kernels/common/format.cuh"
#if defined(__CUDACC__) || defined(KVC_DEVICE_EMULATION)
#include "kernels/common/device_api.cuh"
#endif

namespace kvc::kernels::tile_convert {

struct SlotPlan {
  uint32_t base;      // shift the word right by this first (shared by a run of slots)
  uint32_t in_place;  // the code's bit position after that shift
};

// Mantissa bits of the MMA input type: 10 (fp16) or 7 (bf16).
KVC_HD constexpr uint32_t mantissa_bits(bool bf16) { return bf16 ? 7u : 10u; }

// Whether BITS-bit codes convert through the magic number at all (u < 2^mantissa).
KVC_HD constexpr bool magic_fits(uint32_t bits, bool bf16) { return bits <= mantissa_bits(bf16); }

// Slot s of a BITS-bit word: the largest in-place position that is a multiple of BITS and keeps
// the code inside the mantissa is q; slots are shifted in windows of q + BITS bits.
KVC_HD constexpr SlotPlan slot_plan(uint32_t bits, uint32_t slot, bool bf16) {
  const uint32_t q = (mantissa_bits(bf16) - bits) / bits * bits;
  const uint32_t window = q + bits;
  const uint32_t shift = slot * bits;
  return {shift / window * window, shift % window};
}

// The half2 bits (fp16 or bf16) of the magic number with u at `in_place` (w pre-shifted).
KVC_HD constexpr uint32_t biased_pair(uint32_t w, uint32_t bits, uint32_t in_place, bool bf16) {
  const uint32_t mask = ((1u << bits) - 1u) * 0x00010001u;
  return (w & (mask << in_place)) | (bf16 ? 0x43004300u : 0x64006400u);
}

// The FMA's multiplier 2^-in_place and addend -M * 2^-in_place, as a pair of equal halves.
KVC_HD constexpr uint32_t fma_scale(uint32_t in_place, bool bf16) {
  const uint32_t h = bf16 ? (127u - in_place) << 7 : (15u - in_place) << 10;
  return h | h << 16;
}
KVC_HD constexpr uint32_t fma_addend(uint32_t in_place, bool bf16) {
  const uint32_t h =
      bf16 ? 0x8000u | ((127u + 7u - in_place) << 7) : 0x8000u | ((15u + 10u - in_place) << 10);
  return h | h << 16;
}

// ---- Two-plane codes: 3 = 2 + 1 and 6 = 4 + 2 bits --------------------------------------------
// A 3- or 6-bit tile is two planes (tile_format.cuh), each laid out as a tile of its own width:
// the low LOW bits of every element, then the high HIGH bits. The two merge in the integer
// domain: the low plane's word shifted (once per window of slots) so that lo lies at l, with
// l + LOW + HIGH <= mantissa bits; the high plane's word shifted so that hi lies just above it,
// at l + LOW (a shift per pair: the planes' slots step by different widths); one LOP3 puts lo and
// the magic number in place, a second ORs hi above it, and the (LOW + HIGH)-bit code lo + 2^LOW *
// hi converts with one HFMA2 as a plain tile's code at l does (exact, as above). 2 LOP3 + 1 HFMA2
// + about one shift per pair; biasing each plane on its own and removing both magic numbers with
// two HFMA2 (one folded addend) measured slower (docs/performance.md).

// Where a plane's slot is converted: shift the word right by `base` (left by -base); the code is
// then at bit in_place.
struct PlaneSlot {
  int32_t base;
  uint32_t in_place;
};
KVC_HD constexpr uint32_t shift_by(uint32_t w, int32_t base) {
  return base >= 0 ? w >> base : w << -base;
}

// Slot low_slot of a low-plane word and slot high_slot of a high-plane word (the same pair): the
// low code at l, in windows that leave room for the high bits above it, and the high code at
// l + LOW.
struct PlanePlan {
  PlaneSlot low, high;
};
KVC_HD constexpr PlanePlan plane_plan(uint32_t low, uint32_t high, uint32_t low_slot,
                                      uint32_t high_slot, bool bf16) {
  const uint32_t per_window = (mantissa_bits(bf16) - low - high) / low + 1;
  const uint32_t l = low_slot % per_window * low;
  return {{int32_t(low_slot * low) - int32_t(l), l},
          {int32_t(high_slot * high) - int32_t(l + low), l + low}};
}

// ---- The folds' range in fp16 -----------------------------------------------------------------
// The A operands q * step (K) and p * step (V, p <= 1) are rounded to fp16, whose largest finite
// value is 65504. Where a bound on them reaches it, the kernel folds them scaled by 2^-e (exact)
// and scales the products back in fp32. fold_shift gives the e that puts the bound in
// [2^14, 2^15): the largest product keeps fp16's 11 bits, the others lose only what falls below
// fp16's normal range. For any bound >= 65504, inf and NaN included: 1 <= e <= 114, so 2^e and
// 2^-e are normal floats.
constexpr float kFp16FoldLimit = 65504.0f;
KVC_HD uint32_t fold_shift(float bound) {
  return ((format::float_bits(bound) >> 23) & 0xFFu) - 127u - 14u;
}
// 2^e as a float, for -126 <= e <= 127.
KVC_HD float pow2(int32_t e) { return format::bits_float(uint32_t(127 + e) << 23); }

#if defined(__CUDACC__) || defined(KVC_DEVICE_EMULATION)

// The pair in slot `slot` of word w as halves of the MMA input type; exact. Called with a slot
// that unrolling makes constant, so the plan and the constants fold away.
template <bool BF16, uint32_t BITS>
__device__ __forceinline__ uint32_t pair(uint32_t w, uint32_t slot) {
  static_assert(magic_fits(BITS, BF16), "codes wider than the mantissa need another path");
  const SlotPlan plan = slot_plan(BITS, slot, BF16);
  const uint32_t mask = ((1u << BITS) - 1u) * 0x00010001u << plan.in_place;
  const uint32_t biased =
      device::lop3_and_or(w >> plan.base, mask, BF16 ? 0x43004300u : 0x64006400u);
  return device::fma2<BF16>(biased, fma_scale(plan.in_place, BF16),
                            fma_addend(plan.in_place, BF16));
}

// The pair of a two-plane tile: slot lo_slot of low-plane word lo_w and slot hi_slot of
// high-plane word hi_w, as halves of the MMA input type; exact. Called with slots that unrolling
// makes constant, so the plan and the constants fold away.
template <bool BF16, uint32_t LOW, uint32_t HIGH>
__device__ __forceinline__ uint32_t plane_pair(uint32_t lo_w, uint32_t lo_slot, uint32_t hi_w,
                                               uint32_t hi_slot) {
  static_assert(magic_fits(LOW + HIGH, BF16), "the merged code must fit the mantissa");
  const PlanePlan p = plane_plan(LOW, HIGH, lo_slot, hi_slot, BF16);
  const uint32_t lo_mask = ((1u << LOW) - 1u) * 0x00010001u << p.low.in_place;
  const uint32_t hi_mask = ((1u << HIGH) - 1u) * 0x00010001u << p.high.in_place;
  const uint32_t lo =
      device::lop3_and_or(shift_by(lo_w, p.low.base), lo_mask, BF16 ? 0x43004300u : 0x64006400u);
  const uint32_t both = device::lop3_and_or(shift_by(hi_w, p.high.base), hi_mask, lo);
  return device::fma2<BF16>(both, fma_scale(p.low.in_place, BF16),
                            fma_addend(p.low.in_place, BF16));
}

#endif

}  // namespace kvc::kernels::tile_convert
