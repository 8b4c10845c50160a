// SPDX-License-Identifier: Apache-2.0
// The CUDA tile codec kernels (kernels/codec/tile_encode.cuh, tile_decode.cuh), run on the CPU
// under the host emulation, against the CPU oracle (src/cpu/tile_codec_cpu.cpp): byte-identical
// tile blocks (format t1) over K and V, every supported T and D up to 8K elements and two of 32K,
// the three input dtypes, both bound modes, with and without the channel permutation and split
// widths, on realistic data, outlier channels and tokens, special values and blocks that stay raw;
// equal decoded elements in every output dtype; equal verdicts on damaged and truncated blocks.
#include "tests/emulation/device_emulation.hpp"  // first: the kernels compile against it
//
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <sstream>
#include <tuple>

#include "codec/codec_params.hpp"
#include "core/error.hpp"
#include "cpu/codec_cpu.hpp"
#include "cpu/tile_codec_cpu.hpp"
#include "emulated_codec.hpp"  // with_dtype
#include "kernels/codec/tile_decode.cuh"
#include "kernels/codec/tile_encode.cuh"
#include "test_support.hpp"

namespace kvc::test {
namespace {

namespace t = kvc::tiles;

// As src/cuda/codec.cu fills it.
kernels::TileShape tile_shape_of(const CodecParams& p) {
  return {p.is_value,    p.num_tokens,       p.head_dim,    p.relative,
          p.error_bound, p.permute_channels, p.split_widths};
}

emu::LaunchResult emulated_tile_encode(const CodecParams& p, const std::vector<const void*>& src,
                                       int64_t stride, kvc_dtype dtype,
                                       const std::vector<void*>& dst,
                                       std::vector<uint32_t>& bytes) {
  bytes.assign(src.size(), 0xDEADBEEFu);
  emu::LaunchResult r;
  with_dtype(dtype, [&](auto dt) {
    r = emu::launch(kernels::tile_encode_kernel<decltype(dt)::value>, uint32_t(src.size()),
                    kernels::kThreads,
                    kernels::tile_encode_smem_bytes(p.num_elements(), p.num_groups),
                    tile_shape_of(p), src.data(), stride, dst.data(), bytes.data());
  });
  return r;
}

emu::LaunchResult emulated_tile_decode(const CodecParams& p, const std::vector<const void*>& src,
                                       const std::vector<uint32_t>& available, kvc_dtype dtype,
                                       const std::vector<void*>& dst, int64_t stride,
                                       std::vector<kvc_status_t>& status) {
  status.assign(src.size(), kvc_status_t(12345));
  emu::LaunchResult r;
  with_dtype(dtype, [&](auto dt) {
    r = emu::launch(kernels::tile_decode_kernel<decltype(dt)::value>, uint32_t(src.size()),
                    kernels::kThreads, 0, tile_shape_of(p), src.data(), available.data(),
                    dst.data(), stride, status.data());
  });
  return r;
}

enum class Data { kSynthetic, kOutliers, kSpecial, kLarge, kOffsets };

struct Case {
  kvc_codec_config config;
  kvc_dtype dtype;
  Data data;
  bool corrupt;
  uint32_t seed;
  std::string name() const {
    std::ostringstream o;
    o << (config.kind == KVC_KIND_VALUE ? "V" : "K") << " T" << config.num_tokens << " D"
      << config.head_dim << (config.bound_mode == KVC_BOUND_RELATIVE ? " rel " : " abs ")
      << config.error_bound << " dtype " << dtype << " permute " << config.tile_permute_channels
      << " split " << config.tile_split_widths << " data " << int(data) << " seed " << seed;
    return o.str();
  }
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name(); }

std::vector<Case> cases() {
  std::vector<Case> out;
  uint32_t seed = 100;
  auto add = [&](kvc_kind kind, uint32_t tokens, uint32_t dim) {
    ++seed;
    kvc_codec_config c = make_config(kind, tokens, dim, KVC_BOUND_ABSOLUTE, 0.03f);
    c.block_format = KVC_BLOCK_FORMAT_TILES;
    // Bounds from wide codes (and raw tiles) to 2-bit tiles; both modes.
    const float absolute[] = {0.03f, 0.25f, 0.002f, 1e-9f};
    const float relative[] = {0.02f, 0.08f, 0.3f, 0.001f};
    if (seed % 2) {
      c.bound_mode = KVC_BOUND_RELATIVE;
      c.error_bound = relative[(seed / 2) % 4];
    } else {
      c.error_bound = absolute[(seed / 2) % 4];
    }
    c.tile_permute_channels = (seed / 3) % 2 == 0 ? 1 : 0;
    c.tile_split_widths = (seed / 5) % 3 == 2 ? 0 : 1;
    const Data data = Data((seed / 7) % 5);
    out.push_back({c, kvc_dtype(1 + seed % 3), data, seed % 2 == 0, seed});
  };
  for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
    for (uint32_t tokens : {16u, 32u, 64u, 128u}) {
      for (uint32_t dim : {16u, 32u, 64u, 128u, 256u}) {
        if (tokens * dim > 8192) continue;  // keep the suite short
        add(kind, tokens, dim);
        if (tokens * dim <= 2048) add(kind, tokens, dim);  // a second draw of the options
      }
    }
  }
  add(KVC_KIND_VALUE, 1024, 16);  // 64 tiles
  add(KVC_KIND_KEY, 32, 256);     // 16 tiles, 256 channels to sort
  add(KVC_KIND_KEY, 256, 128);    // 32K elements: the largest an H100 takes (128 KiB of codes)
  add(KVC_KIND_VALUE, 128, 256);
  // Coded blocks that the decoder takes in several chunks of tokens (K: a tile's later n-blocks;
  // V: later tiles), on realistic data with moderate bounds, so that its fast path runs past the
  // first chunk.
  for (const auto& [kind, tokens, dim, dtype] :
       {std::tuple{KVC_KIND_KEY, 1024u, 16u, KVC_DTYPE_FP16},
        std::tuple{KVC_KIND_KEY, 256u, 128u, KVC_DTYPE_BF16},
        std::tuple{KVC_KIND_VALUE, 1024u, 16u, KVC_DTYPE_FP32}}) {
    kvc_codec_config c = make_config(kind, tokens, dim, KVC_BOUND_RELATIVE, 0.05f);
    c.block_format = KVC_BLOCK_FORMAT_TILES;
    out.push_back({c, dtype, Data::kSynthetic, false, ++seed});
  }
  return out;
}

// Blocks of 3 heads of one [tokens, 3 * dim] tensor, as an engine's cache holds them.
constexpr uint32_t kHeads = 3;

std::vector<float> input_for(const Case& k) {
  const uint32_t tokens = uint32_t(k.config.num_tokens), d = uint32_t(k.config.head_dim);
  const bool is_value = k.config.kind == KVC_KIND_VALUE;
  std::vector<float> x = bench::synthetic_kv(is_value, tokens, kHeads * d, k.seed);
  std::mt19937 rng(k.seed);
  auto at = [&](uint32_t r, uint32_t h, uint32_t c) -> float& {
    return x[size_t(r) * kHeads * d + h * d + c];
  };
  switch (k.data) {
    case Data::kSynthetic:
      break;
    case Data::kOutliers:
      // A few wide channels (K) or tokens (V) per head, of different magnitudes, so that tiles
      // get different widths and the permutation has something to sort.
      for (uint32_t h = 0; h < kHeads; ++h) {
        for (int o = 0; o < 3; ++o) {
          const float scale = float(4 << (rng() % 6));
          const uint32_t which = rng() % (is_value ? tokens : d);
          for (uint32_t i = 0; i < (is_value ? d : tokens); ++i) {
            (is_value ? at(which, h, i) : at(i, h, which)) *= scale;
          }
        }
      }
      break;
    case Data::kSpecial:
      for (size_t i = 0; i < x.size(); i += 1 + rng() % 5) {
        const float specials[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 0.375f};
        x[i] = specials[rng() % 5];
      }
      for (uint32_t r = 0; r < tokens; ++r) {  // head 2: constant (every group's range is 0)
        for (uint32_t c = 0; c < d; ++c) at(r, 2, c) = 0.375f;
      }
      // Head 1: zeros of both signs only, so a group's minimum and maximum are equal zeros
      // whichever of them a reduction keeps.
      for (uint32_t r = 0; r < tokens; ++r) {
        for (uint32_t c = 0; c < d; ++c) at(r, 1, c) = rng() % 2 ? 0.0f : -0.0f;
      }
      break;
    case Data::kLarge:
      // Magnitudes up to 3e4 (fp16-representable): wide codes, raw tiles at tight bounds.
      for (float& v : x) v = std::clamp(v * float(1 << (rng() % 14)), -3e4f, 3e4f);
      break;
    case Data::kOffsets:
      // Each group (K channel, V token) shifted by its own offset of up to +-6000: centres
      // that need 1, 2 or 4 bytes while the codes within a group stay narrow.
      for (uint32_t h = 0; h < kHeads; ++h) {
        const float reach = h == 0 ? 2.0f : h == 1 ? 300.0f : 6000.0f;
        for (uint32_t g = 0; g < (is_value ? tokens : d); ++g) {
          const float offset = std::ldexp(float(rng() % 4096), -11) * reach - reach;
          for (uint32_t i = 0; i < (is_value ? d : tokens); ++i) {
            (is_value ? at(g, h, i) : at(i, h, g)) += offset;
          }
        }
      }
      break;
  }
  return x;
}

kvc_status_t cpu_decode(const CodecParams& p, const std::vector<uint8_t>& src, uint32_t available,
                        kvc_dtype out, std::vector<uint8_t>& dst, int64_t stride) {
  try {
    cpu::decode_tile_block(p, src.data(), available, out, dst.data(), stride);
    return KVC_SUCCESS;
  } catch (const Error& e) {
    return e.status();
  }
}

// Decodes `blocks` (each `misalign` bytes into an allocation that ends after `available`
// bytes) under emulation and on the CPU into poisoned outputs of each dtype, rows `stride`
// elements apart (the gaps must stay poisoned); expects equal statuses, and equal elements where
// both succeed. Returns how many the CPU rejected.
int expect_same_decode(const std::string& name, const CodecParams& p,
                       const std::vector<std::vector<uint8_t>>& blocks,
                       const std::vector<uint32_t>& available,
                       const std::vector<kvc_dtype>& outputs_of, int64_t stride,
                       uint32_t misalign = 0) {
  int rejected = 0;
  for (kvc_dtype out : outputs_of) {
    const size_t out_bytes = size_t(p.num_tokens) * size_t(stride) * format::dtype_bytes(out);
    std::vector<std::vector<uint8_t>> inputs, outputs;
    std::vector<const void*> src;
    std::vector<void*> dst;
    for (size_t i = 0; i < blocks.size(); ++i) {
      inputs.emplace_back(misalign, uint8_t(0));
      inputs.back().insert(inputs.back().end(), blocks[i].begin(),
                           blocks[i].begin() + available[i]);
      outputs.emplace_back(out_bytes, uint8_t(0xFF));
    }
    for (size_t i = 0; i < blocks.size(); ++i) {
      src.push_back(inputs[i].empty() ? static_cast<const void*>(&available[i])
                                      : inputs[i].data() + misalign);
      dst.push_back(outputs[i].data());
    }
    std::vector<kvc_status_t> status;
    const auto r = emulated_tile_decode(p, src, available, out, dst, stride, status);
    EXPECT_TRUE(r.ok()) << name << "\n" << r.message();
    for (size_t i = 0; i < blocks.size(); ++i) {
      std::vector<uint8_t> want(out_bytes, 0xFF);
      const kvc_status_t s = cpu_decode(p, blocks[i], available[i], out, want, stride);
      EXPECT_EQ(status[i], s) << name << " block " << i << " out " << out;
      if (s == KVC_SUCCESS) EXPECT_EQ(outputs[i], want) << name << " block " << i << " out " << out;
      rejected += s != KVC_SUCCESS;
    }
    if (::testing::Test::HasFailure()) break;
  }
  return rejected;
}

class TileCodecEmulation : public ::testing::TestWithParam<Case> {};

TEST_P(TileCodecEmulation, EncodeIsByteIdenticalAndDecodeEqualsTheCpu) {
  const Case& k = GetParam();
  const CodecParams p = CodecParams::from_config(k.config, false);
  const uint32_t d = p.head_dim;
  const Block tensor =
      make_block(k.dtype, p.num_tokens, kHeads * d, int64_t(kHeads) * d, input_for(k));
  const size_t es = format::dtype_bytes(k.dtype), cap = p.max_block_bytes(k.dtype);

  // Encode: each block into its own allocation of the codec's worst-case size, poisoned, so
  // that the bytes past the block are checked too.
  std::vector<const void*> src;
  std::vector<std::vector<uint8_t>> out(kHeads, std::vector<uint8_t>(cap, 0xEE));
  std::vector<void*> dst;
  for (uint32_t h = 0; h < kHeads; ++h) {
    src.push_back(tensor.bytes.data() + h * d * es);
    dst.push_back(out[h].data());
  }
  std::vector<uint32_t> sizes;
  const auto r = emulated_tile_encode(p, src, tensor.stride, k.dtype, dst, sizes);
  ASSERT_TRUE(r.ok()) << k.name() << "\n" << r.message();
  std::vector<std::vector<uint8_t>> blocks;
  for (uint32_t h = 0; h < kHeads; ++h) {
    std::vector<uint8_t> want(cap, 0xEE);
    const uint32_t n = cpu::encode_tile_block(p, src[h], tensor.stride, k.dtype, want.data());
    ASSERT_EQ(sizes[h], n) << k.name() << " head " << h;
    ASSERT_EQ(out[h], want) << k.name() << " head " << h;
    blocks.emplace_back(want.begin(), want.begin() + n);
  }

  // Contiguous rows from 4-byte-aligned blocks (the kernel's word loads and 16-byte stores), in
  // every output dtype; then rows 1 or 2 elements longer (stores by element), from a block at an
  // odd address for a quarter of the cases (byte loads).
  expect_same_decode(k.name(), p, blocks, sizes, {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32},
                     d);
  const int64_t stride = d + 1 + k.seed % 2;
  expect_same_decode(k.name() + " strided", p, blocks, sizes, {kvc_dtype(1 + k.seed / 3 % 3)},
                     stride, k.seed % 4 == 1 ? 1u : 0u);
  if (!k.corrupt) return;
  // Damaged copies: truncation, and bit flips in the header, table and metadata (the first
  // bytes) or anywhere.
  std::mt19937 rng(k.seed);
  std::vector<std::vector<uint8_t>> bad;
  std::vector<uint32_t> available;
  for (int i = 0; i < 12; ++i) {
    std::vector<uint8_t> b = blocks[size_t(i) % kHeads];
    uint32_t n = uint32_t(b.size());
    if (i % 4 == 0) {
      n = uint32_t(rng() % b.size());
    } else {
      for (int f = 0; f < 1 + i % 3; ++f) {
        const size_t meta = std::min<size_t>(t::kHeaderBytes + 4 * 64 + 256, b.size());
        const size_t at = rng() % 2 ? rng() % meta : rng() % b.size();
        b[at] ^= uint8_t(1u << (rng() % 8));
      }
    }
    bad.push_back(b);
    available.push_back(n);
  }
  const int rejected = expect_same_decode(k.name() + " damaged", p, bad, available,
                                          {kvc_dtype(1 + k.seed / 2 % 3)}, stride);
  EXPECT_GE(rejected, 3) << k.name();  // at least the truncated copies
}

INSTANTIATE_TEST_SUITE_P(Shapes, TileCodecEmulation, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return "case" + std::to_string(info.index) + "_seed" +
                                  std::to_string(info.param.seed);
                         });

// The cases reach every width code, raw blocks, raw tiles inside quantized blocks, permuted
// blocks, and all three centre widths (so that a change that loses them shows up here).
TEST(TileCodecEmulationCoverage, CasesReachEveryWidthAndLayout) {
  std::set<uint32_t> widths, center_bytes;
  int raw_blocks = 0, permuted = 0, mixed_raw = 0;
  for (const Case& k : cases()) {
    const CodecParams p = CodecParams::from_config(k.config, false);
    const uint32_t d = p.head_dim;
    const Block tensor =
        make_block(k.dtype, p.num_tokens, kHeads * d, int64_t(kHeads) * d, input_for(k));
    for (uint32_t h = 0; h < kHeads; ++h) {
      const cpu::TilePlan plan = cpu::plan_tile_block(
          p, tensor.bytes.data() + h * d * format::dtype_bytes(k.dtype), tensor.stride, k.dtype);
      raw_blocks += !plan.layout.quantized;
      permuted += plan.layout.permuted;
      if (plan.layout.quantized) center_bytes.insert(plan.layout.center_bytes);
      bool raw_tile = false;
      for (uint32_t w : plan.widths) {
        widths.insert(w);
        raw_tile |= w == t::kWRaw;
      }
      mixed_raw += plan.layout.quantized && raw_tile;
    }
  }
  EXPECT_EQ(widths.size(), size_t(t::kNumWidthCodes));
  EXPECT_GT(raw_blocks, 0);
  EXPECT_GT(permuted, 0);
  EXPECT_GT(mixed_raw, 0);
  EXPECT_EQ(center_bytes.size(), 3u);
}

// Missing pointers, a misaligned destination and non-finite input: size 0 (encode), an
// invalid-argument status (decode); the other blocks as usual. A block of the wrong kind or
// shape, and a v1 block: the CPU's verdicts.
TEST(TileCodecEmulationEdges, BadPointersNonFiniteInputAndForeignBlocks) {
  kvc_codec_config c = make_config(KVC_KIND_KEY, 16, 64, KVC_BOUND_ABSOLUTE, 0.01f);
  c.block_format = KVC_BLOCK_FORMAT_TILES;
  const CodecParams p = CodecParams::from_config(c, false);
  Block b = make_block(KVC_DTYPE_FP32, 16, 64, 64, bench::synthetic_kv(false, 16, 64, 3));
  for (const float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Block nan_block = b;
    std::memcpy(nan_block.bytes.data() + (5 * 64 + 7) * 4, &bad, 4);
    const size_t cap = p.max_block_bytes(KVC_DTYPE_FP32);
    std::vector<uint8_t> o0(cap + 4), o1(cap), o2(cap, 0xAB), o3(cap);
    const std::vector<const void*> src = {b.data(), nullptr, nan_block.data(), b.data()};
    const std::vector<void*> dst = {o0.data() + 2, o1.data(), o2.data(), o3.data()};
    std::vector<uint32_t> sizes;
    ASSERT_TRUE(emulated_tile_encode(p, src, 64, KVC_DTYPE_FP32, dst, sizes).ok());
    EXPECT_EQ(sizes, (std::vector<uint32_t>{0, 0, 0, sizes[3]}));
    EXPECT_EQ(o2, std::vector<uint8_t>(cap, 0xAB));  // nothing written
    std::vector<uint8_t> want(cap);
    ASSERT_EQ(sizes[3], cpu::encode_tile_block(p, b.data(), 64, KVC_DTYPE_FP32, want.data()));
    o3.resize(sizes[3]);
    want.resize(sizes[3]);
    EXPECT_EQ(o3, want);

    std::vector<uint8_t> out(64 * 16 * 4);
    std::vector<kvc_status_t> status;
    ASSERT_TRUE(emulated_tile_decode(p, {nullptr, o3.data(), o3.data()}, {sizes[3], sizes[3], 0},
                                     KVC_DTYPE_FP32, {out.data(), nullptr, out.data()}, 64, status)
                    .ok());
    EXPECT_EQ(status,
              (std::vector<kvc_status_t>{KVC_ERROR_INVALID_ARGUMENT, KVC_ERROR_INVALID_ARGUMENT,
                                         KVC_ERROR_CORRUPT_DATA}));
  }

  // The same block through codecs of another kind and another shape; a v1 block; a tile block
  // of a newer version.
  std::vector<uint8_t> block(p.max_block_bytes(KVC_DTYPE_FP32));
  block.resize(cpu::encode_tile_block(p, b.data(), 64, KVC_DTYPE_FP32, block.data()));
  kvc_codec_config v1 = make_config(KVC_KIND_KEY, 16, 64, KVC_BOUND_ABSOLUTE, 0.01f);
  std::vector<uint8_t> v1_block(
      CodecParams::from_config(v1, false).max_block_bytes(KVC_DTYPE_FP32));
  v1_block.resize(cpu::encode_block(CodecParams::from_config(v1, false), nullptr, b.data(), 64,
                                    KVC_DTYPE_FP32, v1_block.data()));
  std::vector<uint8_t> newer = block;
  newer[t::offset::kVersion] = 2;
  kvc_codec_config as_value = c, wider = c;
  as_value.kind = KVC_KIND_VALUE;
  wider.num_tokens = 32;
  const kvc_codec_config others[] = {c, as_value, wider};
  for (int o = 0; o < 3; ++o) {
    const CodecParams q = CodecParams::from_config(others[o], false);
    const std::vector<std::vector<uint8_t>> blocks = {block, v1_block, newer};
    const int rejected = expect_same_decode(
        "foreign", q, blocks,
        {uint32_t(block.size()), uint32_t(v1_block.size()), uint32_t(newer.size())},
        {KVC_DTYPE_BF16}, q.head_dim);
    EXPECT_EQ(rejected, o == 0 ? 2 : 3);
  }
}

// Steps that are not finite, which only a damaged block holds (parsing does not read steps): a
// group's elements become NaN or saturate, with the CPU's bits. A step so large that every
// product overflows is finite and takes the fast path, whose clamp must saturate as well.
TEST(TileCodecEmulationEdges, NonFiniteAndHugeStepsDecodeAsOnTheCpu) {
  for (const bool is_value : {false, true}) {
    kvc_codec_config c = make_config(is_value ? KVC_KIND_VALUE : KVC_KIND_KEY, 64, 64,
                                     is_value ? KVC_BOUND_RELATIVE : KVC_BOUND_ABSOLUTE, 0.05f);
    c.block_format = KVC_BLOCK_FORMAT_TILES;
    const CodecParams p = CodecParams::from_config(c, false);
    const Block b =
        make_block(KVC_DTYPE_FP16, 64, 64, 64, bench::synthetic_kv(is_value, 64, 64, 11));
    std::vector<uint8_t> block(p.max_block_bytes(KVC_DTYPE_FP16));
    block.resize(cpu::encode_tile_block(p, b.data(), 64, KVC_DTYPE_FP16, block.data()));
    t::TileLayout L{};
    ASSERT_EQ(t::parse_block(block.data(), block.size(), L), t::ParseError::kNone);
    ASSERT_EQ(L.per_group_step, is_value);
    std::vector<std::vector<uint8_t>> damaged;
    if (is_value) {  // group 5's bf16 step: +inf, a NaN, the largest finite bf16
      for (const uint16_t bits : {uint16_t(0x7F80), uint16_t(0x7FC1), uint16_t(0x7F7F)}) {
        damaged.push_back(block);
        format::store_u16(damaged.back().data() + L.steps_offset + 2 * 5, bits);
      }
    } else {  // the block's fp32 step: +inf, a NaN, 3e38
      for (const uint32_t bits : {0x7F800000u, 0x7FC00001u, format::float_bits(3e38f)}) {
        damaged.push_back(block);
        format::store_u32(damaged.back().data() + t::offset::kStep, bits);
      }
    }
    const std::vector<uint32_t> sizes(damaged.size(), uint32_t(block.size()));
    EXPECT_EQ(expect_same_decode(is_value ? "V steps" : "K step", p, damaged, sizes,
                                 {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32}, 64),
              0);
  }
}

}  // namespace
}  // namespace kvc::test
