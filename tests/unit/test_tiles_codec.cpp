// SPDX-License-Identifier: Apache-2.0
// The CPU reference codec of tile format t1 through the C ABI: the bound on every element over
// sweeps, decode equal to v1's reconstruction of the same codes, the channel permutation,
// edge data, corruption, and the API's tile-specific answers.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <vector>

#include "cpu/codec_cpu.hpp"
#include "cpu/tile_codec_cpu.hpp"
#include "test_support.hpp"

namespace kvc::test {
namespace {

namespace t = kvc::tiles;
namespace f = kvc::format;

kvc_codec_config tile_config(kvc_kind kind, uint32_t tokens, uint32_t dim, kvc_bound_mode mode,
                             float bound, bool permute = true) {
  kvc_codec_config c = make_config(kind, tokens, dim, mode, bound);
  c.block_format = KVC_BLOCK_FORMAT_TILES;
  c.tile_permute_channels = permute ? 1 : 0;
  return c;
}

struct Codec {
  kvc_codec_t h = nullptr;
  explicit Codec(const kvc_codec_config& c) {
    EXPECT_EQ(kvc_codec_create(&c, nullptr, &h), KVC_SUCCESS) << kvc_last_error();
  }
  ~Codec() { kvc_codec_destroy(h); }
  size_t max_bytes(kvc_dtype dtype) const {
    size_t n = 0;
    EXPECT_EQ(kvc_codec_max_block_bytes(h, dtype, &n), KVC_SUCCESS);
    return n;
  }
  std::vector<uint8_t> encode(const Block& b) const {
    std::vector<uint8_t> out(max_bytes(b.dtype) + 16, 0xCD);
    const void* src[1] = {b.data()};
    void* dst[1] = {out.data()};
    uint32_t n = 0;
    const kvc_status_t st =
        kvc_codec_encode(h, 1, src, b.stride, b.dtype, dst, out.size(), &n, nullptr);
    EXPECT_EQ(st, KVC_SUCCESS) << kvc_last_error();
    out.resize(n);
    return out;
  }
  kvc_status_t decode(const std::vector<uint8_t>& bytes, kvc_dtype dtype, void* dst,
                      int64_t stride) const {
    const void* src[1] = {bytes.data()};
    void* out[1] = {dst};
    const uint32_t n = uint32_t(bytes.size());
    return kvc_codec_decode(h, 1, src, &n, dtype, out, stride, nullptr, nullptr);
  }
  std::vector<float> decode_f32(const std::vector<uint8_t>& bytes, uint32_t tokens,
                                uint32_t dim) const {
    std::vector<float> y(size_t(tokens) * dim, NAN);
    EXPECT_EQ(decode(bytes, KVC_DTYPE_FP32, y.data(), dim), KVC_SUCCESS) << kvc_last_error();
    return y;
  }
};

// The width of the tile holding each element (token, channel) of a tile block.
std::vector<uint32_t> width_map(const std::vector<uint8_t>& bytes) {
  t::TileLayout b{};
  EXPECT_EQ(t::parse_block(bytes.data(), bytes.size(), b), t::ParseError::kNone);
  std::vector<uint32_t> w(size_t(b.num_tokens) * b.head_dim);
  for (uint32_t tk = 0; tk < b.num_tokens; ++tk) {
    for (uint32_t j = 0; j < b.head_dim; ++j) {
      const uint32_t tile = b.is_value ? tk / 16 : j / 16;
      w[size_t(tk) * b.head_dim + t::channel_of(bytes.data(), b, j)] =
          t::entry_width(t::table_entry(bytes.data(), b, tile));
    }
  }
  return w;
}

// A tiles store's serialization (docs/format.md, "Serialized sequence", version 6): a tile block
// without raw tiles gives back the quantizer's codes q; format v1 of them, with and without a
// codebook, decodes to those codes and to the tile block's values y; and the tile block of those
// codes is the block itself, byte for byte.
void check_transcoding(const CodecParams& p, const cpu::Quantized& q,
                       const std::vector<uint8_t>& bytes, const std::vector<uint32_t>& widths,
                       const std::vector<float>& y, kvc_dtype dtype, const std::string& what) {
  const bool coded = (bytes[t::offset::kFlags] & t::flag::kQuantized) != 0 &&
                     std::find(widths.begin(), widths.end(), t::kWRaw) == widths.end();
  const cpu::Quantized codes = cpu::tile_block_codes(p, bytes.data(), bytes.size());
  ASSERT_EQ(codes.ok, coded) << what;
  if (!coded) return;
  ASSERT_EQ(codes.codes, q.codes) << what;
  for (uint32_t g = 0; g < p.num_groups; ++g) {
    ASSERT_EQ(f::float_bits(codes.steps[g]), f::float_bits(q.steps[g])) << what << " group " << g;
  }
  std::vector<uint8_t> again(bytes.size() + 64, 0xCD);
  ASSERT_EQ(cpu::encode_tile_codes(p, codes, dtype, again.data()), bytes.size()) << what;
  again.resize(bytes.size());
  ASSERT_EQ(again, bytes) << what;

  const CodecParams v = p.transcoded();
  Histogram h;
  cpu::histogram_codes(v, codes, h);
  const Codebook book = Codebook::build(h, 12, 255);
  for (const Codebook* cb : {static_cast<const Codebook*>(nullptr), &book}) {
    const std::vector<uint8_t> v1 = cpu::encode_codes(v, cb, codes);
    const f::BlockLayout layout = cpu::parse_header(v1.data(), v1.size());
    ASSERT_NE(layout.encoding, f::kRaw) << what;
    const cpu::Quantized back = cpu::decode_codes(v, cb, v1.data(), v1.size());
    ASSERT_TRUE(back.ok && back.codes == codes.codes) << what;
    for (uint32_t g = 0; g < p.num_groups; ++g) {
      ASSERT_EQ(f::float_bits(back.steps[g]), f::float_bits(codes.steps[g])) << what;
    }
    std::vector<float> z(y.size(), NAN);
    cpu::decode_block(v, cb, v1.data(), v1.size(), KVC_DTYPE_FP32, z.data(), p.head_dim);
    for (size_t i = 0; i < y.size(); ++i) {
      ASSERT_EQ(f::float_bits(z[i]), f::float_bits(y[i])) << what << " element " << i;
    }
  }
}

// Checks one block: every element within its bound (fp32 output, no slack), and equal to v1's
// reconstruction of the same codes (coded tiles) or to the input (raw tiles); fp16/bf16 output
// is the saturating rounding of the fp32 value; and the block through format v1
// (check_transcoding).
void check_block(const kvc_codec_config& c, const Block& b, const std::string& what) {
  Codec codec(c);
  const std::vector<uint8_t> bytes = codec.encode(b);
  ASSERT_FALSE(bytes.empty()) << what;
  ASSERT_EQ(bytes.size() % 16, 0u);
  ASSERT_LE(bytes.size(), codec.max_bytes(b.dtype));
  const std::vector<float> y = codec.decode_f32(bytes, b.tokens, b.dim);
  const std::vector<float> bound = element_bounds(c, b);
  const std::vector<uint32_t> widths = width_map(bytes);

  const CodecParams p = CodecParams::from_config(c, false);
  const cpu::Quantized q = cpu::quantize(p, cpu::gather_groups(p, b.data(), b.stride, b.dtype));
  for (uint32_t tk = 0; tk < b.tokens; ++tk) {
    for (uint32_t ch = 0; ch < b.dim; ++ch) {
      const float x = b.values[size_t(tk) * size_t(b.stride) + ch];
      const float v = y[size_t(tk) * b.dim + ch];
      ASSERT_LE(std::fabs(double(x) - double(v)), double(bound[size_t(tk) * b.dim + ch]))
          << what << " token " << tk << " channel " << ch << " x " << x << " got " << v;
      if (widths[size_t(tk) * b.dim + ch] == t::kWRaw) {
        ASSERT_EQ(f::float_bits(v), f::float_bits(x)) << what;
      } else {
        ASSERT_TRUE(q.ok) << what;
        const uint32_t g = p.is_value ? tk : ch;
        const uint32_t e = p.is_value ? ch : tk;
        ASSERT_EQ(f::float_bits(v),
                  f::float_bits(f::dequantize(q.codes[size_t(g) * p.group_size + e], q.steps[g])))
            << what << " token " << tk << " channel " << ch;
      }
    }
  }
  check_transcoding(p, q, bytes, widths, y, b.dtype, what);
  for (kvc_dtype out : {KVC_DTYPE_FP16, KVC_DTYPE_BF16}) {
    std::vector<uint16_t> h(size_t(b.tokens) * b.dim);
    ASSERT_EQ(codec.decode(bytes, out, h.data(), b.dim), KVC_SUCCESS);
    for (size_t i = 0; i < h.size(); ++i) {
      ASSERT_EQ(h[i], out == KVC_DTYPE_FP16 ? f::float_to_half_saturate(y[i])
                                            : f::float_to_bf16_saturate(y[i]));
    }
  }
}

TEST(TileCodec, BoundOnEveryElementOverSweeps) {
  uint32_t seed = 1;
  for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
    for (uint32_t tokens : {16u, 32u, 64u, 128u}) {
      for (uint32_t dim : {64u, 128u, 256u}) {
        for (kvc_dtype dtype : {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32}) {
          for (kvc_bound_mode mode : {KVC_BOUND_ABSOLUTE, KVC_BOUND_RELATIVE}) {
            const float bound = mode == KVC_BOUND_ABSOLUTE ? 0.05f : 0.07f;
            const kvc_codec_config c = tile_config(kind, tokens, dim, mode, bound);
            const auto x = bench::synthetic_kv(kind == KVC_KIND_VALUE, tokens, dim, ++seed);
            const Block b = make_block(dtype, tokens, dim, dim + 8, x);  // padded rows
            check_block(c, b,
                        "kind " + std::to_string(kind) + " T " + std::to_string(tokens) + " D " +
                            std::to_string(dim) + " dtype " + std::to_string(dtype) + " mode " +
                            std::to_string(mode) + " seed " + std::to_string(seed));
          }
        }
      }
    }
  }
}

// Tight and loose bounds reach every width: 0 (constant groups), 2, 4, 8 and raw tiles.
TEST(TileCodec, EveryWidthAppearsAndHoldsTheBound) {
  std::set<uint32_t> seen;
  uint32_t seed = 100;
  for (float bound : {1e-4f, 0.002f, 0.02f, 0.2f, 2.0f, 100.0f}) {
    for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
      const kvc_codec_config c = tile_config(kind, 64, 64, KVC_BOUND_ABSOLUTE, bound);
      auto x = bench::synthetic_kv(kind == KVC_KIND_VALUE, 64, 64, ++seed);
      for (uint32_t tk = 0; tk < 16; ++tk) {
        for (uint32_t ch = 0; ch < 16; ++ch) x[tk * 64 + ch] = 0.0f;  // a constant corner
      }
      const Block b = make_block(KVC_DTYPE_FP32, 64, 64, 64, x);
      check_block(c, b, "bound " + std::to_string(bound));
      Codec codec(c);
      const auto bytes = codec.encode(b);
      t::TileLayout l{};
      ASSERT_EQ(t::parse_block(bytes.data(), bytes.size(), l), t::ParseError::kNone);
      for (uint32_t i = 0; i < l.num_tiles; ++i) {
        seen.insert(t::entry_width(t::table_entry(bytes.data(), l, i)));
      }
    }
  }
  EXPECT_EQ(seen.size(), size_t(t::kNumWidthCodes));
}

// Without split widths the encoder uses only the single-plane widths 0, 2, 4, 8 and raw.
TEST(TileCodec, SplitWidthsOff) {
  for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
    for (float bound : {0.002f, 0.02f, 0.2f}) {
      kvc_codec_config c = tile_config(kind, 64, 64, KVC_BOUND_ABSOLUTE, bound);
      c.tile_split_widths = 0;
      const Block b =
          make_block(KVC_DTYPE_FP16, 64, 64, 64, bench::synthetic_kv(kind == 1, 64, 64, 5));
      check_block(c, b, "no split, bound " + std::to_string(bound));
      const auto bytes = Codec(c).encode(b);
      t::TileLayout l{};
      ASSERT_EQ(t::parse_block(bytes.data(), bytes.size(), l), t::ParseError::kNone);
      for (uint32_t i = 0; i < l.num_tiles; ++i) {
        const uint32_t w = t::entry_width(t::table_entry(bytes.data(), l, i));
        EXPECT_TRUE(w != t::kW3 && w != t::kW6) << w;
      }
    }
  }
}

TEST(TileCodec, EdgeData) {
  struct Case {
    const char* name;
    kvc_dtype dtype;
    std::vector<float> values;  // 16 x 16, filled by pattern
  };
  const uint32_t n = 16 * 16;
  auto fill = [&](auto fn) {
    std::vector<float> v(n);
    for (uint32_t i = 0; i < n; ++i) v[i] = fn(i);
    return v;
  };
  const std::vector<Case> cases = {
      {"zeros", KVC_DTYPE_FP16, fill([](uint32_t) { return 0.0f; })},
      {"constant", KVC_DTYPE_BF16, fill([](uint32_t) { return -3.25f; })},
      {"fp16 max", KVC_DTYPE_FP16,
       fill([](uint32_t i) { return i % 3 == 0 ? 65504.0f : (i % 3 == 1 ? -65504.0f : 1.0f); })},
      {"fp32 near overflow", KVC_DTYPE_FP32,
       fill([](uint32_t i) { return i % 2 ? 3.4e38f : -3.0e38f; })},
      {"bf16 huge", KVC_DTYPE_BF16, fill([](uint32_t i) { return i % 5 ? 1e38f : -2e37f; })},
      {"subnormals", KVC_DTYPE_FP32, fill([](uint32_t i) { return float(i % 7) * 1e-42f; })},
      {"fp16 subnormals", KVC_DTYPE_FP16,
       fill([](uint32_t i) { return float(i % 9) * 5.9604645e-8f; })},
      {"one outlier", KVC_DTYPE_FP16, fill([](uint32_t i) { return i == 37 ? 3000.0f : 0.5f; })},
  };
  for (const Case& cs : cases) {
    for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
      for (kvc_bound_mode mode : {KVC_BOUND_ABSOLUTE, KVC_BOUND_RELATIVE}) {
        for (float bound : {1e-30f, 0.01f, 0.3f}) {
          if (mode == KVC_BOUND_RELATIVE && bound < 1e-20f) continue;
          const kvc_codec_config c = tile_config(kind, 16, 16, mode, bound);
          const Block b = make_block(cs.dtype, 16, 16, 16, cs.values);
          check_block(c, b,
                      std::string(cs.name) + " kind " + std::to_string(kind) + " mode " +
                          std::to_string(mode) + " bound " + std::to_string(bound));
        }
      }
    }
  }
}

TEST(TileCodec, NonFiniteInputIsRejected) {
  const kvc_codec_config c = tile_config(KVC_KIND_KEY, 16, 16, KVC_BOUND_ABSOLUTE, 0.1f);
  Codec codec(c);
  for (float bad : {INFINITY, -INFINITY, NAN}) {
    std::vector<float> x(256, 1.0f);
    x[77] = bad;
    const Block b = make_block(KVC_DTYPE_FP32, 16, 16, 16, x);
    std::vector<uint8_t> out(codec.max_bytes(KVC_DTYPE_FP32));
    const void* src[1] = {b.data()};
    void* dst[1] = {out.data()};
    uint32_t nbytes = 0;
    EXPECT_EQ(
        kvc_codec_encode(codec.h, 1, src, 16, KVC_DTYPE_FP32, dst, out.size(), &nbytes, nullptr),
        KVC_ERROR_NONFINITE_INPUT);
  }
}

// Outlier channels: sorting channels by width puts them into one tile.
TEST(TileCodec, PermutationGroupsWideChannels) {
  for (kvc_bound_mode mode : {KVC_BOUND_ABSOLUTE, KVC_BOUND_RELATIVE}) {
    auto x = bench::synthetic_kv(false, 64, 128, 7);
    for (uint32_t tk = 0; tk < 64; ++tk) {
      for (uint32_t ch : {3u, 40u, 77u, 110u}) x[tk * 128 + ch] *= 40.0f;  // outlier channels
    }
    const Block b = make_block(KVC_DTYPE_FP16, 64, 128, 128, x);
    const float bound = mode == KVC_BOUND_ABSOLUTE ? 0.1f : 0.05f;
    const kvc_codec_config on = tile_config(KVC_KIND_KEY, 64, 128, mode, bound, true);
    const kvc_codec_config off = tile_config(KVC_KIND_KEY, 64, 128, mode, bound, false);
    check_block(on, b, "permuted");
    check_block(off, b, "in order");
    const auto with = Codec(on).encode(b);
    const auto without = Codec(off).encode(b);
    // check_block showed both decode every coded element to v1's reconstruction.
    t::TileLayout l{};
    ASSERT_EQ(t::parse_block(with.data(), with.size(), l), t::ParseError::kNone);
    if (mode == KVC_BOUND_ABSOLUTE) {
      EXPECT_TRUE(l.permuted);
      EXPECT_LT(with.size(), without.size());
    }
    ASSERT_EQ(t::parse_block(without.data(), without.size(), l), t::ParseError::kNone);
    EXPECT_FALSE(l.permuted);
  }
}

// Every truncation and every single-byte change yields a data status or a decode, never a
// crash (AddressSanitizer builds and the fuzzer check the reads).
TEST(TileCodec, TruncationAndByteFlips) {
  struct Case {
    kvc_kind kind;
    kvc_bound_mode mode;
    kvc_dtype dtype;
    float bound;
  };
  for (const Case& cs : {Case{KVC_KIND_KEY, KVC_BOUND_ABSOLUTE, KVC_DTYPE_FP16, 0.05f},
                         Case{KVC_KIND_VALUE, KVC_BOUND_RELATIVE, KVC_DTYPE_BF16, 0.07f},
                         Case{KVC_KIND_KEY, KVC_BOUND_RELATIVE, KVC_DTYPE_FP32, 1e-5f},
                         Case{KVC_KIND_VALUE, KVC_BOUND_ABSOLUTE, KVC_DTYPE_FP32, 1e-30f}}) {
    const kvc_codec_config c = tile_config(cs.kind, 16, 32, cs.mode, cs.bound);
    Codec codec(c);
    auto x = bench::synthetic_kv(cs.kind == KVC_KIND_VALUE, 16, 32, 3);
    x[5] *= 50.0f;
    const Block b = make_block(cs.dtype, 16, 32, 32, x);
    const std::vector<uint8_t> bytes = codec.encode(b);
    std::vector<float> y(16 * 32);
    for (size_t n = 1; n < bytes.size(); ++n) {
      std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + long(n));
      ASSERT_EQ(codec.decode(cut, KVC_DTYPE_FP32, y.data(), 32), KVC_ERROR_CORRUPT_DATA) << n;
    }
    for (size_t i = 0; i < bytes.size(); ++i) {
      for (uint8_t mask : {0x01, 0x10, 0x80, 0xFF}) {
        std::vector<uint8_t> bad = bytes;
        bad[i] ^= mask;
        const kvc_status_t st = codec.decode(bad, KVC_DTYPE_FP32, y.data(), 32);
        ASSERT_TRUE(st == KVC_SUCCESS || st == KVC_ERROR_CORRUPT_DATA ||
                    st == KVC_ERROR_FORMAT_VERSION || st == KVC_ERROR_CONFIG_MISMATCH)
            << "byte " << i << " status " << st;
        if (i < t::kHeaderBytes + 4 * 2 && i >= t::offset::kBlockBytes &&
            i < t::offset::kBlockBytes + 4) {
          EXPECT_NE(st, KVC_SUCCESS);  // a wrong length never passes the table check
        }
      }
    }
  }
}

TEST(TileCodec, ApiAnswers) {
  // Shapes and groups the format does not cover.
  for (auto [tokens, dim] :
       {std::pair{48u, 64u}, std::pair{64u, 96u}, std::pair{8u, 64u}, std::pair{64u, 512u}}) {
    const kvc_codec_config c = tile_config(KVC_KIND_KEY, tokens, dim, KVC_BOUND_ABSOLUTE, 0.1f);
    kvc_codec_t h = nullptr;
    EXPECT_EQ(kvc_codec_create(&c, nullptr, &h), KVC_ERROR_NOT_SUPPORTED);
    EXPECT_TRUE(last_error_names("KVC_BLOCK_FORMAT_TILES"));
  }
  kvc_codec_config v = tile_config(KVC_KIND_VALUE, 64, 64, KVC_BOUND_RELATIVE, 0.1f);
  v.value_group_size = 32;
  kvc_codec_t h = nullptr;
  EXPECT_EQ(kvc_codec_create(&v, nullptr, &h), KVC_ERROR_NOT_SUPPORTED);
  kvc_codec_config bad = tile_config(KVC_KIND_KEY, 64, 64, KVC_BOUND_RELATIVE, 0.1f);
  bad.block_format = 2;
  EXPECT_EQ(kvc_codec_create(&bad, nullptr, &h), KVC_ERROR_INVALID_ARGUMENT);
  bad.block_format = KVC_BLOCK_FORMAT_TILES;
  bad.tile_permute_channels = 2;
  EXPECT_EQ(kvc_codec_create(&bad, nullptr, &h), KVC_ERROR_INVALID_ARGUMENT);
  bad.tile_permute_channels = 1;
  bad.tile_split_widths = -1;
  EXPECT_EQ(kvc_codec_create(&bad, nullptr, &h), KVC_ERROR_INVALID_ARGUMENT);
  // The CUDA backend takes tile codecs as it takes v1 ones: refused only where it cannot run (a
  // CPU-only build, no GPU); tests/gpu/test_tile_codec_gpu.cpp checks it where it can.
  kvc_codec_config gpu = tile_config(KVC_KIND_KEY, 64, 64, KVC_BOUND_RELATIVE, 0.1f);
  gpu.backend = KVC_BACKEND_CUDA;
  const kvc_status_t on_gpu = kvc_codec_create(&gpu, nullptr, &h);
  EXPECT_TRUE(on_gpu == KVC_SUCCESS || on_gpu == KVC_ERROR_NO_DEVICE ||
              (on_gpu == KVC_ERROR_NOT_SUPPORTED && last_error_names("without a CUDA compiler")))
      << kvc_last_error();
  kvc_codec_destroy(h);
  h = nullptr;

  const kvc_codec_config c = tile_config(KVC_KIND_VALUE, 32, 64, KVC_BOUND_RELATIVE, 0.07f);
  Codec codec(c);
  // The bound: all tiles raw in the input dtype after the header and table.
  EXPECT_EQ(codec.max_bytes(KVC_DTYPE_FP16), 48u + 32u * 64u * 2u);
  EXPECT_EQ(codec.max_bytes(KVC_DTYPE_FP32), 48u + 32u * 64u * 4u);
  const Block b = make_block(KVC_DTYPE_FP16, 32, 64, 64, bench::synthetic_kv(true, 32, 64, 9));
  const auto bytes = codec.encode(b);
  kvc_block_info info = KVC_BLOCK_INFO_INIT;
  ASSERT_EQ(kvc_block_inspect(bytes.data(), bytes.size(), &info), KVC_SUCCESS);
  EXPECT_EQ(info.encoding, KVC_ENCODING_TILES);
  EXPECT_EQ(info.kind, KVC_KIND_VALUE);
  EXPECT_EQ(info.block_bytes, bytes.size());
  EXPECT_EQ(info.num_tokens, 32);
  EXPECT_EQ(info.head_dim, 64);
  EXPECT_EQ(info.code_bits, 4);  // rel 0.07: 9 levels per token
  // Histograms are for Huffman codebooks.
  kvc_histogram_t hist = nullptr;
  ASSERT_EQ(kvc_histogram_create(&hist), KVC_SUCCESS);
  const void* src[1] = {b.data()};
  EXPECT_EQ(kvc_codec_histogram(codec.h, 1, src, 64, KVC_DTYPE_FP16, hist, nullptr),
            KVC_ERROR_NOT_SUPPORTED);
  kvc_histogram_destroy(hist);
  // A v1 codec does not read tile blocks and a tile codec does not read v1 blocks.
  kvc_codec_config v1c = c;
  v1c.block_format = KVC_BLOCK_FORMAT_V1;
  Codec v1(v1c);
  std::vector<uint16_t> out(32 * 64);
  EXPECT_EQ(v1.decode(bytes, KVC_DTYPE_FP16, out.data(), 64), KVC_ERROR_CORRUPT_DATA);
  EXPECT_EQ(codec.decode(v1.encode(b), KVC_DTYPE_FP16, out.data(), 64), KVC_ERROR_CORRUPT_DATA);
  // A K codec does not read V blocks.
  Codec k(tile_config(KVC_KIND_KEY, 32, 64, KVC_BOUND_RELATIVE, 0.07f));
  EXPECT_EQ(k.decode(bytes, KVC_DTYPE_FP16, out.data(), 64), KVC_ERROR_CONFIG_MISMATCH);
  // Too small a destination: nothing written.
  std::vector<uint8_t> small(bytes.size() - 16);
  void* dst[1] = {small.data()};
  uint32_t nbytes = 0;
  EXPECT_EQ(
      kvc_codec_encode(codec.h, 1, src, 64, KVC_DTYPE_FP16, dst, small.size(), &nbytes, nullptr),
      KVC_ERROR_BUFFER_TOO_SMALL);
}

}  // namespace
}  // namespace kvc::test

namespace kvc::test {
namespace {

// What the tensor-core kernel will do, emulated on the CPU with tile_format.cuh alone: per lane
// and pair, load the plane words, convert with the fp16 magic (one shift-and-mask-or per plane,
// HSUB2), merge two planes, and fold the steps and centres into the query (K) or the
// probabilities (V). The result matches q . x_hat (K) and p . V_hat (V) of the reference
// decode to fp32-accumulation tolerance.
std::vector<uint32_t> lane_codes(const std::vector<uint8_t>& bytes, const t::TileLayout& b,
                                 uint32_t tile, uint32_t lane, uint32_t pair) {
  const uint32_t entry = t::table_entry(bytes.data(), b, tile);
  const uint32_t w = t::entry_width(entry);
  const uint8_t* base = bytes.data() + t::entry_offset(entry);
  uint32_t u[2] = {0, 0};
  for (uint32_t plane = 0; plane < 2; ++plane) {
    const uint32_t bits = t::plane_bits(w, plane);
    if (bits == 0) continue;
    const uint8_t* at = base + (plane == 0 ? 0u : t::plane1_offset(w, b.nblocks));
    const t::PairLocation loc = t::pair_location(lane, pair, bits, b.pairs_per_lane);
    const uint32_t word = f::load_u32(at + 4 * loc.word);
    const uint32_t h2 = t::hsub2_fp16(t::fp16x2_biased(word, loc.shift, bits), t::kFp16Magic2);
    const uint32_t shift = plane == 0 ? 0u : t::plane_bits(w, 0);
    u[0] += uint32_t(f::half_to_float(uint16_t(h2))) << shift;
    u[1] += uint32_t(f::half_to_float(uint16_t(h2 >> 16))) << shift;
  }
  return {u[0], u[1]};
}

TEST(TileKernelPath, FoldedProductsMatchTheReference) {
  uint32_t any_raw = 0;  // the raw-tile path is taken somewhere
  for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
    for (kvc_bound_mode mode : {KVC_BOUND_ABSOLUTE, KVC_BOUND_RELATIVE}) {
      const uint32_t T = 64, D = 128;
      auto x = bench::synthetic_kv(kind == KVC_KIND_VALUE, T, D, 21);
      for (uint32_t tk = 0; tk < T; ++tk) x[tk * D + 17] *= 30.0f;  // an outlier channel
      const Block blk = make_block(KVC_DTYPE_FP16, T, D, D, x);
      const kvc_codec_config c =
          tile_config(kind, T, D, mode, mode == KVC_BOUND_ABSOLUTE ? 0.05f : 0.07f);
      Codec codec(c);
      const auto bytes = codec.encode(blk);
      const std::vector<float> ref = codec.decode_f32(bytes, T, D);
      t::TileLayout b{};
      ASSERT_EQ(t::parse_block(bytes.data(), bytes.size(), b), t::ParseError::kNone);
      ASSERT_TRUE(b.quantized);
      // K: one query q[D]; V: one probability row p[T].
      const std::vector<float> weights = uniform_kv(1, kind == KVC_KIND_KEY ? D : T, -1, 1, 5);
      const uint32_t outputs = kind == KVC_KIND_KEY ? T : D;
      std::vector<double> want(outputs, 0.0), got(outputs, 0.0);
      for (uint32_t tk = 0; tk < T; ++tk) {
        for (uint32_t ch = 0; ch < D; ++ch) {
          const double v = ref[size_t(tk) * D + ch];
          if (kind == KVC_KIND_KEY) want[tk] += double(weights[ch]) * v;
          if (kind == KVC_KIND_VALUE) want[ch] += double(weights[tk]) * v;
        }
      }
      // Folds: scaled weights per group position (as fp16, the mma operand) and one constant
      // over the groups of coded tiles. Raw tiles (fp16 here) take the unscaled weights.
      auto raw_tile = [&](uint32_t i) {
        return t::entry_width(t::table_entry(bytes.data(), b, i)) == t::kWRaw;
      };
      std::vector<float> scaled(b.num_groups);
      double constant = 0.0;
      for (uint32_t j = 0; j < b.num_groups; ++j) {
        const float wj = weights[t::channel_of(bytes.data(), b, j)];
        const float step = t::group_step(bytes.data(), b, j);
        scaled[j] = f::half_to_float(f::float_to_half(wj * step));
        if (raw_tile(j / 16)) continue;
        const float min_value = f::dequantize(int32_t(t::group_center(bytes.data(), b, j)), step);
        constant += double(wj) * double(min_value);
      }
      uint32_t raw_tiles = 0;
      for (uint32_t i = 0; i < b.num_tiles; ++i) {
        const bool raw = raw_tile(i);
        raw_tiles += raw;
        const uint8_t* tile = bytes.data() + t::entry_offset(t::table_entry(bytes.data(), b, i));
        for (uint32_t lane = 0; lane < 32; ++lane) {
          for (uint32_t pair = 0; pair < b.pairs_per_lane; ++pair) {
            std::vector<float> v(2);
            if (raw) {
              const t::PairLocation loc = t::pair_location(lane, pair, 16, b.pairs_per_lane);
              const uint32_t h2 = f::load_u32(tile + 4 * loc.word);  // the half2 itself
              v = {f::half_to_float(uint16_t(h2)), f::half_to_float(uint16_t(h2 >> 16))};
            } else {
              const std::vector<uint32_t> u = lane_codes(bytes, b, i, lane, pair);
              v = {float(u[0]), float(u[1])};
            }
            for (uint32_t h = 0; h < 2; ++h) {
              const t::BlockCoord e =
                  t::tile_element(b.is_value, i, t::pair_element(lane, pair, h));
              const uint32_t j = kind == KVC_KIND_KEY ? e.position : e.token;
              const double wv =
                  raw ? double(weights[t::channel_of(bytes.data(), b, j)]) : double(scaled[j]);
              got[kind == KVC_KIND_KEY ? e.token : e.position] += wv * double(v[h]);
            }
          }
        }
      }
      any_raw += raw_tiles;
      double scale = 0.0;
      for (double v : want) scale = std::max(scale, std::fabs(v));
      for (uint32_t o = 0; o < outputs; ++o) {
        // Per-block constant: K adds it to every token's score, V to every channel's output.
        EXPECT_NEAR(got[o] + constant, want[o], 2e-3 * (scale + 1.0))
            << "kind " << kind << " mode " << mode << " output " << o;
      }
    }
  }
  EXPECT_GT(any_raw, 0u);
}

}  // namespace
}  // namespace kvc::test
