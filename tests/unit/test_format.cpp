// SPDX-License-Identifier: Apache-2.0
// The shared __host__ __device__ primitives of kernels/common/format.cuh, checked against
// independent oracles: the compiler's own _Float16 (where it has one; elsewhere, as in clang 14
// on x86, a reference by exact arithmetic in double), exhaustive enumeration, exact arithmetic.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <random>

#include "cpu/codec_cpu.hpp"
#include "kernels/common/format.cuh"

namespace kvc::format {
namespace {

#if defined(__FLT16_MANT_DIG__)
uint16_t compiler_half_bits(float v) {
  const _Float16 h = static_cast<_Float16>(v);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

float compiler_half_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}
#else
// fp16 by definition: a value is m * 2^(e - 10) with m < 2^11; the exponent field e + 15 (0 for
// subnormals, whose e is -14).
float compiler_half_to_float(uint16_t bits) {
  const int exponent = (bits >> 10) & 0x1F, mantissa = bits & 0x3FF;
  const double sign = (bits & 0x8000) ? -1.0 : 1.0;
  if (exponent == 0x1F) return mantissa ? NAN : float(sign * INFINITY);
  if (exponent == 0) return float(sign * std::ldexp(double(mantissa), -24));
  return float(sign * std::ldexp(double(1024 + mantissa), exponent - 25));
}

// Round to nearest, ties to even, by exact arithmetic: v / quantum is exact in double (v has 24
// significant bits, the quantum is a power of two), and nearbyint rounds ties to even.
uint16_t compiler_half_bits(float v) {
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  const double a = std::fabs(double(v));
  if (std::isinf(v) || a >= 65520.0) return uint16_t(sign | 0x7C00);  // 65520: halfway to 2^16
  int e;
  std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1): a's exponent is e - 1
  const int exponent = std::max(e - 1, -14);
  const double quantum = std::ldexp(1.0, exponent - 10);
  const double m = std::nearbyint(a / quantum);  // <= 2048
  if (m == 0) return sign;
  if (exponent == -14 && m < 1024) return uint16_t(sign | uint16_t(m));  // subnormal
  const int field = m == 2048 ? exponent + 16 : exponent + 15;           // carried up
  const int mantissa = m == 2048 ? 0 : int(m) - 1024;
  return uint16_t(sign | (field << 10) | mantissa);
}
#endif

TEST(Format, HalfToFloatIsExactForEveryHalf) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t bits = uint16_t(h);
    const float expected = compiler_half_to_float(bits);
    const float got = half_to_float(bits);
    if (std::isnan(expected)) {
      ASSERT_TRUE(std::isnan(got)) << h;
    } else {
      ASSERT_EQ(float_bits(got), float_bits(expected)) << h;
      ASSERT_EQ(float_to_half(got), bits) << h;  // and back
    }
  }
}

TEST(Format, FloatToHalfRoundsLikeTheCompiler) {
  std::mt19937 rng(1);
  for (int i = 0; i < 2000000; ++i) {
    // Random bit patterns concentrated on half's range, plus everything else.
    uint32_t u = rng();
    if (i % 2) u = (u & 0x807FFFFFu) | ((100u + rng() % 50u) << 23);
    float v;
    std::memcpy(&v, &u, 4);
    if (std::isnan(v)) continue;
    ASSERT_EQ(float_to_half(v), compiler_half_bits(v)) << std::hexfloat << v;
  }
  // Ties at the subnormal/normal boundaries and at overflow.
  for (float v : {65504.0f, 65519.99f, 65520.0f, 0x1.0p-24f, 0x1.0p-25f, 0x1.8p-25f, 0x1.0p-14f,
                  0x1.ffcp-15f, 0x1.ffep-15f}) {
    EXPECT_EQ(float_to_half(v), compiler_half_bits(v)) << std::hexfloat << v;
    EXPECT_EQ(float_to_half(-v), compiler_half_bits(-v)) << std::hexfloat << v;
  }
  // inf stays inf; NaN becomes the quiet NaN of its sign.
  EXPECT_EQ(float_to_half(INFINITY), 0x7C00);
  EXPECT_EQ(float_to_half(-INFINITY), 0xFC00);
  EXPECT_EQ(float_to_half(bits_float(0x7F800001u)), 0x7E00);
  EXPECT_EQ(float_to_half(bits_float(0xFFC12345u)), 0xFE00);
}

// Saturating conversions are the conversions of the value clamped to the type's finite range.
TEST(Format, SaturatingConversionsClampToTheFiniteRange) {
  const float half_max = 65504.0f, bf16_max = 0x1.fep127f;
  std::mt19937 rng(3);
  std::vector<float> values = {INFINITY,    -INFINITY,       65519.99f,    65520.0f, -65520.0f,
                               0x1.fep127f, 0x1.ff7ffep127f, 0x1.ff8p127f, FLT_MAX,  -FLT_MAX};
  for (int i = 0; i < 1000000; ++i) values.push_back(bits_float(rng()));
  for (float v : values) {
    if (std::isnan(v)) {
      EXPECT_EQ(float_to_half_saturate(v) & 0x7E00u, 0x7E00u);
      EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16_saturate(v))));
      continue;
    }
    ASSERT_EQ(float_to_half_saturate(v), float_to_half(std::clamp(v, -half_max, half_max)))
        << std::hexfloat << v;
    ASSERT_EQ(float_to_bf16_saturate(v), float_to_bf16(std::clamp(v, -bf16_max, bf16_max)))
        << std::hexfloat << v;
  }
}

TEST(Format, Bf16RoundsToNearestEven) {
  std::mt19937 rng(2);
  for (int i = 0; i < 1000000; ++i) {
    const uint32_t u = rng();
    float v;
    std::memcpy(&v, &u, 4);
    if (!std::isfinite(v)) continue;
    const uint16_t b = float_to_bf16(v);
    if (std::fabs(v) >= 0x1.ffp127f) {  // past bf16's largest finite value and the midpoint
      ASSERT_TRUE(std::isinf(bf16_to_float(b))) << std::hexfloat << v;
      continue;
    }
    const double err = std::fabs(double(bf16_to_float(b)) - double(v));
    // The two bf16 neighbours of v: no one closer, and ties go to the even one.
    const uint16_t down = uint16_t(u >> 16);
    const uint16_t up = uint16_t(down + 1);
    const double err_down = std::fabs(double(bf16_to_float(down)) - double(v));
    const double err_up = std::fabs(double(bf16_to_float(up)) - double(v));
    ASSERT_LE(err, std::min(err_down, err_up)) << std::hexfloat << v;
    if (err_down == err_up) ASSERT_EQ(b & 1u, 0u) << std::hexfloat << v;
    // Rounding down never exceeds the magnitude.
    ASSERT_LE(std::fabs(bf16_to_float(float_to_bf16_down(std::fabs(v)))), std::fabs(v));
  }
}

TEST(Format, ConstantGroupStepDividesTheValueExactly) {
  std::mt19937 rng(3);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t u = rng() & 0x7F7FFFFFu;  // finite
    float x;
    std::memcpy(&x, &u, 4);
    const float step = constant_group_step(x);
    const double q = double(x) / double(step);
    ASSERT_EQ(q, std::floor(q)) << std::hexfloat << x;
    ASSERT_LT(std::fabs(q), double(kMaxAbsCode)) << std::hexfloat << x;
    int e = 0;
    ASSERT_EQ(std::frexp(step, &e), 0.5f) << "a power of two: " << std::hexfloat << step;
  }
  EXPECT_EQ(constant_group_step(0.0f), 1.0f);
}

TEST(Format, QuantizeElementMeetsTheBoundOrRefuses) {
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> value(-100.0f, 100.0f);
  for (int i = 0; i < 500000; ++i) {
    const float x = value(rng);
    const float bound = std::ldexp(1.0f, -int(rng() % 30)) * (1.0f + float(rng() % 100) / 100);
    const float step = step_for_bound(bound, std::fabs(x));
    int32_t code = 0;
    if (quantize_element(x, step, bound, code)) {
      ASSERT_LE(std::fabs(double(x) - double(dequantize(code, step))), double(bound));
      ASSERT_LT(std::abs(code), kMaxAbsCode);
      ASSERT_GE(step, 2.0 * bound - 3.0 * double(float_ulp(std::fabs(x) + bound)));
    } else {
      // With a step from step_for_bound, refusal happens only when the code would not fit
      // or no positive step exists.
      ASSERT_TRUE(step == 0.0f || std::fabs(x) / step >= float(kMaxAbsCode) - 1)
          << x << " " << bound << " " << step;
    }
  }
}

// The quantizer as docs/format.md §6 states it, element by element: the oracle of
// cpu::quantize, which decides most elements in a branch-free pass.
cpu::Quantized quantize_by_element(const CodecParams& p, const std::vector<float>& x) {
  cpu::Quantized q;
  q.steps.resize(p.num_groups);
  q.codes.resize(x.size());
  float max_abs = 0.0f;
  for (float v : x) max_abs = std::max(max_abs, std::fabs(v));
  for (uint32_t g = 0; g < p.num_groups && q.ok; ++g) {
    const float* xs = &x[size_t(g) * p.group_size];
    GroupStep gs{step_for_bound(p.error_bound, max_abs), p.error_bound};
    if (p.relative) {
      const auto [lo, hi] = std::minmax_element(xs, xs + p.group_size);
      gs = relative_group_step(p.error_bound, *lo, *hi);
    }
    q.steps[g] = gs.step;
    for (uint32_t e = 0; e < p.group_size && q.ok; ++e) {
      q.ok = quantize_element(xs[e], gs.step, gs.bound, q.codes[size_t(g) * p.group_size + e]);
    }
  }
  return q;
}

TEST(Format, CpuQuantizerGivesTheCodesOfQuantizeElement) {
  std::mt19937 rng(9);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  int refused = 0, past_fast_range = 0;
  for (int trial = 0; trial < 600; ++trial) {
    kvc_codec_config c = KVC_CODEC_CONFIG_INIT;
    c.kind = trial % 2 ? KVC_KIND_VALUE : KVC_KIND_KEY;
    c.head_dim = 64;
    c.bound_mode = trial % 4 < 2 ? KVC_BOUND_RELATIVE : KVC_BOUND_ABSOLUTE;
    const int regime = (trial / 4) % 6;
    // Ordinary bounds; bounds so small that codes pass 2^22 (past the branch-free rounding) or
    // 2^24 (refused); bounds near a ratio's ulp, where the float test meets ties.
    const float bounds[] = {0.05f, 3e-7f, 1e-8f, 1e-4f, 0.3f, 0x1p-23f};
    c.error_bound = bounds[regime];
    const CodecParams p = CodecParams::from_config(c, false);
    std::vector<float> x(p.num_elements());
    const float scale = std::ldexp(1.0f, int(rng() % 20) - 10);
    for (float& v : x) v = normal(rng) * scale;
    if (regime == 5) {
      // A range of 2^-25 at |x| = 2^-26: codes at 2^22 + 0..4, where a code the branch-free
      // rounding would get wrong past its range still passes the float test.
      for (float& v : x)
        v = rng() % 2 ? -0x1p-26f : 0x1p-26f * (1.0f + float(rng() % 5) * 0x1p-23f);
    }
    if (regime == 4) {  // halfway between codes: the rounding's ties, at steps the bound gives
      const float step = step_for_bound(c.error_bound, 64.0f);
      for (float& v : x) v = (float(int(rng() % 256) - 128) + 0.5f) * step;
      x[0] = 64.0f;
    }
    if (trial % 7 == 0) {  // zeros of both signs, and a constant group
      for (size_t i = 0; i < x.size(); i += 3) x[i] = i % 2 ? -0.0f : 0.0f;
      std::fill(x.begin(), x.begin() + p.group_size, x[1]);
    }
    const cpu::Quantized want = quantize_by_element(p, x), got = cpu::quantize(p, x);
    ASSERT_EQ(got.ok, want.ok) << trial;
    refused += !want.ok;
    if (!want.ok) continue;
    ASSERT_EQ(got.steps, want.steps) << trial;
    ASSERT_EQ(got.codes, want.codes) << trial;
    past_fast_range += std::any_of(want.codes.begin(), want.codes.end(),
                                   [](int32_t v) { return std::abs(v) >= (1 << 22); });
  }
  EXPECT_GT(refused, 0);  // the cases the data were made for all occurred
  EXPECT_GT(past_fast_range, 0);
}

// within_bound decides with a float difference first and falls back to doubles only where the
// rounded difference equals the bound: its verdict must be the exact one in every case. Pairs
// one ulp or a few apart, bounds equal to the rounded difference (the fallback) and just beside
// it, subnormals, overflow to inf, and random magnitudes.
TEST(Format, WithinBoundEqualsTheExactComparison) {
  std::mt19937 rng(11);
  // The double difference rounds monotonically and bound is a double: its verdict is exact.
  auto exact = [](float x, float y, float bound) {
    return std::fabs(double(x) - double(y)) <= double(bound);
  };
  auto next = [](float v, int k) {
    for (; k > 0; --k) v = std::nextafter(v, INFINITY);
    for (; k < 0; ++k) v = std::nextafter(v, -INFINITY);
    return v;
  };
  long fallbacks = 0;
  for (int i = 0; i < 2000000; ++i) {
    const int e = int(rng() % 300) - 150;
    const float x =
        std::ldexp(float(rng() % (1u << 24)) / float(1u << 24), e) * ((rng() & 1) ? 1 : -1);
    float y;
    switch (rng() % 4) {
      case 0:
        y = next(x, int(rng() % 9) - 4);
        break;
      case 1:
        y = std::ldexp(float(rng() % (1u << 24)) / float(1u << 24), e - int(rng() % 30));
        break;
      case 2:
        y = -x;
        break;
      default:
        y = x * (1.0f + std::ldexp(float(rng() % 1000), -int(rng() % 40)));
        break;
    }
    const float a = std::fabs(x - y);
    float bound;
    switch (rng() % 4) {
      case 0:
        bound = a;
        break;  // the fallback
      case 1:
        bound = next(a, int(rng() % 5) - 2);
        break;
      case 2:
        bound = std::ldexp(1.0f, int(rng() % 280) - 149);
        break;
      default:
        bound = a * float(rng() % 1000) / 500.0f;
        break;
    }
    if (!(bound >= 0.0f)) bound = 0.0f;
    fallbacks += a == bound;
    ASSERT_EQ(within_bound(x, y, bound), exact(x, y, bound)) << x << " " << y << " " << bound;
  }
  EXPECT_GT(fallbacks, 100000);  // the tie path is exercised
  const float big = 3.4028235e38f, inf = INFINITY;
  EXPECT_FALSE(within_bound(big, -big, big));  // the float difference overflows
  EXPECT_TRUE(within_bound(big, -big, inf));
  EXPECT_FALSE(within_bound(1.0f, 0.0f, std::nanf("")));
  EXPECT_TRUE(within_bound(1e-45f, 0.0f, 1e-45f));  // subnormal difference equal to the bound
  EXPECT_FALSE(within_bound(3e-45f, 0.0f, 1e-45f));
}

TEST(Format, MeanCenterIsTheRoundedMean) {
  for (int64_t sum = -1000; sum <= 1000; ++sum) {
    for (uint32_t n : {1u, 2u, 3u, 7u, 64u}) {
      EXPECT_EQ(mean_center(sum, n), int32_t(std::floor(double(sum) / n + 0.5))) << sum << "/" << n;
    }
  }
}

TEST(Format, SignedBitWidthHoldsTheValue) {
  for (int32_t s = -70000; s <= 70000; ++s) {
    const uint32_t w = signed_bit_width(s);
    ASSERT_EQ(sign_extend(uint32_t(s) & ((w >= 32 ? 0u : (1u << w)) - 1u), w), s) << s;
    if (w > 1) ASSERT_NE(sign_extend(uint32_t(s) & ((1u << (w - 1)) - 1u), w - 1), s) << s;
  }
}

TEST(Format, BitWriterAndReaderAgree) {
  std::mt19937 rng(5);
  std::vector<std::pair<uint32_t, uint32_t>> fields;
  uint64_t bits = 0;
  for (int i = 0; i < 20000; ++i) {
    const uint32_t w = rng() % 33;
    const uint32_t v = w == 32 ? rng() : (w == 0 ? 0 : rng() & ((1u << w) - 1u));
    fields.emplace_back(v, w);
    bits += w;
  }
  std::vector<uint8_t> buffer((bits + 7) / 8, 0);
  BitWriter out(buffer.data());
  for (auto [v, w] : fields) out.write(v, w);
  out.flush();
  EXPECT_EQ(out.next_byte, buffer.size());
  BitReader in(buffer.data(), uint32_t(buffer.size()));
  for (auto [v, w] : fields) {
    ASSERT_EQ(in.peek(w), v);
    in.skip(w);
  }
  EXPECT_FALSE(in.overrun());
  in.read(8);
  EXPECT_TRUE(in.overrun());
  // LSB-first: the first bit written is bit 0 of byte 0.
  std::vector<uint8_t> one(1, 0);
  BitWriter w1(one.data());
  w1.write(1, 1);
  w1.write(0, 1);
  w1.write(1, 1);
  w1.flush();
  EXPECT_EQ(one[0], 0x05);
}

// The host's 8-byte refill reads what the byte-wise one (the device's) reads: the same fields,
// consumed count and overrun, at every alignment and up to and past the stream's end.
TEST(Format, BitReaderRefillsAlikeByWordsAndByBytes) {
  std::mt19937 rng(6);
  for (int trial = 0; trial < 20000; ++trial) {
    std::vector<uint8_t> bytes(rng() % 40);
    for (uint8_t& b : bytes) b = uint8_t(rng());
    BitReader words(bytes.data(), uint32_t(bytes.size())), by_bytes = words;
    for (int op = 0; op < 40; ++op) {
      const uint32_t bits = rng() % 33;
      if (by_bytes.buffered < bits) by_bytes.refill_bytes();  // so that peek does not refill
      ASSERT_EQ(words.peek(bits), by_bytes.peek(bits)) << trial << " " << op;
      words.skip(bits);
      by_bytes.skip(bits);
      ASSERT_EQ(words.consumed, by_bytes.consumed);
      ASSERT_EQ(words.overrun(), by_bytes.overrun());
    }
  }
}

TEST(Format, ElementCoordsCoverTheBlockOnce) {
  for (bool is_value : {false, true}) {
    for (uint32_t group : {4u, 8u, 16u}) {
      const uint32_t tokens = 16, dim = 16;
      const uint32_t gs = is_value ? group : tokens;
      std::vector<int> seen(tokens * dim, 0);
      for (uint32_t g = 0; g < tokens * dim / gs; ++g) {
        for (uint32_t e = 0; e < gs; ++e) {
          const Coord c = element_coord(is_value, dim, gs, g, e);
          ASSERT_LT(c.token, tokens);
          ASSERT_LT(c.channel, dim);
          seen[c.token * dim + c.channel]++;
        }
      }
      for (int s : seen) ASSERT_EQ(s, 1);
    }
  }
}

}  // namespace
}  // namespace kvc::format
