// SPDX-License-Identifier: Apache-2.0
// Tile format t1 on a real model's KV cache (tests/data: SmolLM2-135M, layers 0, 14 and 29, 512
// tokens, 3 kv-heads, head_dim 64): the bound on every element, and the compression ratio with
// everything counted (headers, tables, permutations, steps, centres, padding) against fp16, with
// and without the channel permutation, beside format v1 (fixed width; Huffman with a codebook
// built from the same tokens). It prints one line per setting (docs/format.md, "Tile format
// (t1)", records them).
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "kernels/common/tile_format.cuh"
#include "test_support.hpp"

#ifndef KVC_TEST_DATA_DIR
#error "KVC_TEST_DATA_DIR must name tests/data"
#endif

namespace kvc::test {
namespace {

constexpr uint32_t kLayers = 3, kTokens = 512, kHeads = 3, kDim = 64;

std::vector<uint16_t> load_dump() {
  std::ifstream in(std::string(KVC_TEST_DATA_DIR) + "/smollm2_kv_512.bin", std::ios::binary);
  EXPECT_TRUE(in);
  std::vector<uint16_t> bits(size_t(kLayers) * 2 * kTokens * kHeads * kDim);
  in.read(reinterpret_cast<char*>(bits.data()), std::streamsize(bits.size() * 2));
  EXPECT_EQ(size_t(in.gcount()), bits.size() * 2);
  return bits;
}

struct Totals {
  uint64_t bytes = 0;
  uint64_t elements = 0;
  std::array<uint64_t, tiles::kNumWidthCodes> widths{};  // tiles per width code
  double ratio() const { return double(elements * 2) / double(bytes); }
};

// Encodes every block of one kind (all layers, heads and token blocks) with config c, checks the
// bound on every element (tile codecs) and adds up the bytes.
Totals encode_all(const std::vector<uint16_t>& dump, kvc_codec_config c, bool with_codebook) {
  const bool is_value = c.kind == KVC_KIND_VALUE;
  const uint32_t T = uint32_t(c.num_tokens);
  const int64_t stride = kHeads * kDim;
  Totals total;
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    const uint16_t* kind_base = dump.data() + (size_t(layer) * 2 + is_value) * kTokens * stride;
    std::unique_ptr<kvcomp::Codebook> book;
    if (with_codebook) {
      kvc_codec_config plain = c;
      plain.entropy = KVC_ENTROPY_AUTO;
      kvcomp::Codec counter(plain);
      kvcomp::Histogram h;
      for (uint32_t head = 0; head < kHeads; ++head) {
        for (uint32_t b = 0; b < kTokens / T; ++b) {
          counter.add_to_histogram(kind_base + size_t(b) * T * stride + head * kDim, KVC_DTYPE_FP16,
                                   stride, h);
        }
      }
      book = std::make_unique<kvcomp::Codebook>(kvcomp::Codebook::build(h));
    }
    kvc_codec_t codec = nullptr;
    EXPECT_EQ(kvc_codec_create(&c, book ? book->get() : nullptr, &codec), KVC_SUCCESS)
        << kvc_last_error();
    size_t cap = 0;
    EXPECT_EQ(kvc_codec_max_block_bytes(codec, KVC_DTYPE_FP16, &cap), KVC_SUCCESS);
    std::vector<uint8_t> out(cap);
    std::vector<float> y(size_t(T) * kDim);
    for (uint32_t head = 0; head < kHeads; ++head) {
      for (uint32_t b = 0; b < kTokens / T; ++b) {
        const uint16_t* src_bits = kind_base + size_t(b) * T * stride + head * kDim;
        const void* src[1] = {src_bits};
        void* dst[1] = {out.data()};
        uint32_t n = 0;
        EXPECT_EQ(kvc_codec_encode(codec, 1, src, stride, KVC_DTYPE_FP16, dst, cap, &n, nullptr),
                  KVC_SUCCESS);
        total.bytes += n;
        total.elements += size_t(T) * kDim;
        if (c.block_format != KVC_BLOCK_FORMAT_TILES) continue;
        tiles::TileLayout l{};
        EXPECT_EQ(tiles::parse_block(out.data(), n, l), tiles::ParseError::kNone);
        for (uint32_t i = 0; i < l.num_tiles; ++i) {
          ++total.widths[tiles::entry_width(tiles::table_entry(out.data(), l, i))];
        }
        // The bound on every element, as the format defines it.
        const void* enc[1] = {out.data()};
        void* dec[1] = {y.data()};
        EXPECT_EQ(kvc_codec_decode(codec, 1, enc, &n, KVC_DTYPE_FP32, dec, kDim, nullptr, nullptr),
                  KVC_SUCCESS);
        for (uint32_t t = 0; t < T; ++t) {
          float lo = INFINITY, hi = -INFINITY;
          for (uint32_t ch = 0; ch < kDim; ++ch) {
            const float x = format::half_to_float(src_bits[size_t(t) * stride + ch]);
            lo = std::min(lo, x);
            hi = std::max(hi, x);
          }
          for (uint32_t ch = 0; ch < kDim; ++ch) {
            const float x = format::half_to_float(src_bits[size_t(t) * stride + ch]);
            float bound = c.error_bound;
            if (c.bound_mode == KVC_BOUND_RELATIVE) {
              float clo = INFINITY, chi = -INFINITY;  // K: the channel over the block
              for (uint32_t s = 0; s < T && !is_value; ++s) {
                const float v = format::half_to_float(src_bits[size_t(s) * stride + ch]);
                clo = std::min(clo, v);
                chi = std::max(chi, v);
              }
              bound = is_value ? c.error_bound * (hi - lo) : c.error_bound * (chi - clo);
            }
            const double err = std::fabs(double(x) - double(y[size_t(t) * kDim + ch]));
            if (!(err <= double(bound))) {
              ADD_FAILURE() << "layer " << layer << " head " << head << " block " << b << " token "
                            << t << " channel " << ch << " error " << err;
              return total;
            }
          }
        }
      }
    }
    kvc_codec_destroy(codec);
  }
  return total;
}

TEST(TilesRealKv, BoundAndRatio) {
  const std::vector<uint16_t> dump = load_dump();
  struct Setting {
    uint32_t tokens;
    float key_abs, value_rel;
  };
  const Setting settings[] = {
      {128, 0.25f, 0.07f}, {64, 0.25f, 0.07f}, {128, 0.5f, 0.15f}, {128, 0.25f, 0.17f}};
  std::printf(
      "T    K abs  V rel  | K tiles: perm+split  split  perm  neither | V tiles: split  plain | "
      "K+V tiles: all  {0,2,4,8}+perm | v1 K fixed  K Huffman  V fixed  V Huffman | tile widths "
      "0/2/3/4/6/8/raw K; V\n");
  for (const Setting& s : settings) {
    const kvc_codec_config k =
        make_config(KVC_KIND_KEY, s.tokens, kDim, KVC_BOUND_ABSOLUTE, s.key_abs);
    const kvc_codec_config v =
        make_config(KVC_KIND_VALUE, s.tokens, kDim, KVC_BOUND_RELATIVE, s.value_rel);
    auto tiles = [](kvc_codec_config c, int32_t permute, int32_t split) {
      c.block_format = KVC_BLOCK_FORMAT_TILES;
      c.tile_permute_channels = permute;
      c.tile_split_widths = split;
      return c;
    };
    auto v1 = [](kvc_codec_config c, kvc_entropy entropy) {
      c.entropy = entropy;
      return c;
    };
    const Totals k11 = encode_all(dump, tiles(k, 1, 1), false);
    const Totals k01 = encode_all(dump, tiles(k, 0, 1), false);
    const Totals k10 = encode_all(dump, tiles(k, 1, 0), false);
    const Totals k00 = encode_all(dump, tiles(k, 0, 0), false);
    const Totals v1s = encode_all(dump, tiles(v, 1, 1), false);
    const Totals v0s = encode_all(dump, tiles(v, 1, 0), false);
    const Totals kf = encode_all(dump, v1(k, KVC_ENTROPY_FIXED), false);
    const Totals vf = encode_all(dump, v1(v, KVC_ENTROPY_FIXED), false);
    const Totals kh = encode_all(dump, v1(k, KVC_ENTROPY_AUTO), true);
    const Totals vh = encode_all(dump, v1(v, KVC_ENTROPY_AUTO), true);
    // The permutation is kept only where it saves bytes; split widths only add choices.
    EXPECT_LE(k11.bytes, k01.bytes);
    EXPECT_LE(k10.bytes, k00.bytes);
    EXPECT_LE(k11.bytes, k10.bytes);
    EXPECT_LE(v1s.bytes, v0s.bytes);
    auto both = [](const Totals& a, const Totals& b) {
      return double(a.elements * 2 + b.elements * 2) / double(a.bytes + b.bytes);
    };
    auto widths = [](const Totals& t) {
      std::string out;
      for (uint32_t w = 0; w < tiles::kNumWidthCodes; ++w) {
        out += (w ? "/" : "") + std::to_string(t.widths[w]);
      }
      return out;
    };
    std::printf(
        "%-4u %-6.3g %-6.3g | %.3fx %.3fx %.3fx %.3fx | %.3fx %.3fx | %.3fx %.3fx | %.3fx %.3fx "
        "%.3fx %.3fx | %s; %s\n",
        s.tokens, s.key_abs, s.value_rel, k11.ratio(), k01.ratio(), k10.ratio(), k00.ratio(),
        v1s.ratio(), v0s.ratio(), both(k11, v1s), both(k10, v0s), kf.ratio(), kh.ratio(),
        vf.ratio(), vh.ratio(), widths(k11).c_str(), widths(v1s).c_str());
  }
}

// Orthonormal Hadamard rotation of each head (the optional lever of issue 13): the tile ratio of
// the rotated K and V (fp32 input, quantized with the same absolute / relative bounds; the
// rotation is orthonormal, so the error of q.k and p.V keeps its size), beside the unrotated one.
TEST(TilesRealKv, HadamardRotation) {
  const std::vector<uint16_t> dump = load_dump();
  const uint32_t T = 128;
  for (auto [key_abs, value_rel] : {std::pair{0.25f, 0.07f}, std::pair{0.5f, 0.15f}}) {
    for (int kind = 0; kind < 2; ++kind) {
      kvc_codec_config c =
          make_config(kind ? KVC_KIND_VALUE : KVC_KIND_KEY, T, kDim,
                      kind ? KVC_BOUND_RELATIVE : KVC_BOUND_ABSOLUTE, kind ? value_rel : key_abs);
      c.block_format = KVC_BLOCK_FORMAT_TILES;
      kvcomp::Codec codec(c);
      uint64_t bytes[2] = {0, 0}, elements = 0;
      std::vector<float> block(size_t(T) * kDim);
      for (uint32_t layer = 0; layer < kLayers; ++layer) {
        for (uint32_t head = 0; head < kHeads; ++head) {
          for (uint32_t b = 0; b < kTokens / T; ++b) {
            const uint16_t* src = dump.data() +
                                  ((size_t(layer) * 2 + kind) * kTokens + b * T) * kHeads * kDim +
                                  head * kDim;
            for (int rotate = 0; rotate < 2; ++rotate) {
              for (uint32_t t = 0; t < T; ++t) {
                float* v = &block[size_t(t) * kDim];
                for (uint32_t ch = 0; ch < kDim; ++ch) {
                  v[ch] = format::half_to_float(src[size_t(t) * kHeads * kDim + ch]);
                }
                for (uint32_t len = 1; rotate && len < kDim; len <<= 1) {
                  for (uint32_t i = 0; i < kDim; i += 2 * len) {
                    for (uint32_t j = i; j < i + len; ++j) {
                      const float a = v[j], d = v[j + len];
                      v[j] = a + d;
                      v[j + len] = a - d;
                    }
                  }
                }
                for (uint32_t ch = 0; rotate && ch < kDim; ++ch) v[ch] *= 0.125f;  // 1/sqrt(64)
              }
              bytes[rotate] += codec.encode(block.data(), KVC_DTYPE_FP32, kDim).size();
            }
            elements += size_t(T) * kDim;
          }
        }
      }
      std::printf(
          "T %u %s bound %g: tiles %.3fx, Hadamard-rotated tiles %.3fx (fp16 bytes / "
          "block bytes)\n",
          T, kind ? "V rel" : "K abs", double(c.error_bound),
          double(elements * 2) / double(bytes[0]), double(elements * 2) / double(bytes[1]));
    }
  }
}

}  // namespace
}  // namespace kvc::test
