// SPDX-License-Identifier: Apache-2.0
// Golden vectors of tile format t1: blocks encoded from fixed inputs, pinned byte for byte in
// tests/golden/format_t1.txt, and the worked example of docs/format.md (section 17.9). A change
// to the encoder that changes any byte fails here: either it is a bug, or the tile format version
// must change.
// Regenerate (only with a format change): KVC_WRITE_GOLDEN=<path> ./unit_tiles_golden
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <map>

#include "test_support.hpp"

#ifndef KVC_GOLDEN_FILE
#error "KVC_GOLDEN_FILE must name tests/golden/format_t1.txt"
#endif

namespace kvc::test {
namespace {

std::string hex(const std::vector<uint8_t>& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (uint8_t b : bytes) {
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

// Inputs from integer formulas: no random generator whose sequence could change. Channels 5 and
// 20 are outliers (wide codes) and channels 8..10 constant.
std::vector<float> golden_input(uint32_t tokens, uint32_t dim, uint32_t salt) {
  std::vector<float> x(size_t(tokens) * dim);
  for (uint32_t t = 0; t < tokens; ++t) {
    for (uint32_t c = 0; c < dim; ++c) {
      const int32_t k = int32_t((t * 7 + c * 13 + salt * 5) % 17) - 8;
      float v = float(k) * 0.125f - float((t * c + salt) % 3) * 0.0625f;
      if (c == 5 || c == 20) v *= 24.0f;
      if (c >= 8 && c <= 10) v = 0.75f;
      x[size_t(t) * dim + c] = v;
    }
  }
  return x;
}

std::vector<uint8_t> encode(const kvc_codec_config& c, kvc_dtype dtype,
                            const std::vector<float>& x) {
  const Block b = make_block(dtype, uint32_t(c.num_tokens), uint32_t(c.head_dim), c.head_dim, x);
  kvcomp::Codec codec(c);
  return codec.encode(b.data(), dtype, b.stride);
}

kvc_codec_config tile_config(kvc_kind kind, int32_t tokens, int32_t dim, kvc_bound_mode mode,
                             float bound, int32_t permute) {
  kvc_codec_config c = KVC_CODEC_CONFIG_INIT;
  c.kind = kind;
  c.num_tokens = tokens;
  c.head_dim = dim;
  c.bound_mode = mode;
  c.error_bound = bound;
  c.block_format = KVC_BLOCK_FORMAT_TILES;
  c.tile_permute_channels = permute;
  return c;
}

std::map<std::string, std::string> encode_all() {
  struct Case {
    const char* name;
    kvc_kind kind;
    int32_t tokens, dim;
    kvc_bound_mode mode;
    float bound;
    int32_t permute;
    kvc_dtype dtype;
  };
  const Case cases[] = {
      {"k_abs_t16_d32_fp16_perm", KVC_KIND_KEY, 16, 32, KVC_BOUND_ABSOLUTE, 0.1f, 1,
       KVC_DTYPE_FP16},
      {"k_abs_t16_d32_fp16_noperm", KVC_KIND_KEY, 16, 32, KVC_BOUND_ABSOLUTE, 0.1f, 0,
       KVC_DTYPE_FP16},
      {"k_abs_t16_d32_fp16_loose", KVC_KIND_KEY, 16, 32, KVC_BOUND_ABSOLUTE, 1.5f, 1,
       KVC_DTYPE_FP16},
      {"k_rel_t32_d16_bf16", KVC_KIND_KEY, 32, 16, KVC_BOUND_RELATIVE, 0.05f, 1, KVC_DTYPE_BF16},
      {"k_abs_t16_d16_fp32_wide", KVC_KIND_KEY, 16, 16, KVC_BOUND_ABSOLUTE, 0.002f, 1,
       KVC_DTYPE_FP32},
      {"v_rel_t32_d16_fp16", KVC_KIND_VALUE, 32, 16, KVC_BOUND_RELATIVE, 0.07f, 1, KVC_DTYPE_FP16},
      {"v_abs_t16_d32_bf16", KVC_KIND_VALUE, 16, 32, KVC_BOUND_ABSOLUTE, 0.3f, 1, KVC_DTYPE_BF16},
      {"v_rel_t16_d16_fp32_3bit", KVC_KIND_VALUE, 16, 16, KVC_BOUND_RELATIVE, 0.1f, 1,
       KVC_DTYPE_FP32},
      {"v_raw_t16_d16_fp16", KVC_KIND_VALUE, 16, 16, KVC_BOUND_ABSOLUTE, 1e-12f, 1, KVC_DTYPE_FP16},
  };
  std::map<std::string, std::string> out;
  uint32_t salt = 0;
  for (const Case& c : cases) {
    const kvc_codec_config config =
        tile_config(c.kind, c.tokens, c.dim, c.mode, c.bound, c.permute);
    out[c.name] = hex(encode(config, c.dtype, golden_input(c.tokens, c.dim, salt++)));
  }
  return out;
}

TEST(TilesGolden, BlocksMatchPinnedBytes) {
  const auto encoded = encode_all();
  if (const char* path = std::getenv("KVC_WRITE_GOLDEN")) {
    std::ofstream out(path);
    for (const auto& [name, bytes] : encoded) out << name << " " << bytes << "\n";
    GTEST_SKIP() << "wrote " << path;
  }
  std::ifstream in(KVC_GOLDEN_FILE);
  ASSERT_TRUE(in) << "cannot open " << KVC_GOLDEN_FILE;
  std::map<std::string, std::string> pinned;
  std::string name, bytes;
  while (in >> name >> bytes) pinned[name] = bytes;
  ASSERT_EQ(pinned.size(), encoded.size());
  for (const auto& [n, b] : encoded) {
    ASSERT_TRUE(pinned.count(n)) << n;
    EXPECT_EQ(b, pinned[n]) << n;
    // The pinned bytes decode (the fixed decoder reads the fixed encoder's blocks).
  }
}

// docs/format.md 17.9: K, T = 16, D = 16, fp16 input, absolute bound 0.0625.
TEST(TilesGolden, WorkedExample) {
  std::vector<float> x(16 * 16);
  for (uint32_t t = 0; t < 16; ++t) {
    for (uint32_t c = 0; c < 16; ++c) x[t * 16 + c] = float((t + 3 * c) % 16) * 0.125f - 1.0f;
  }
  const auto bytes =
      encode(tile_config(KVC_KIND_KEY, 16, 16, KVC_BOUND_ABSOLUTE, 0.0625f, 1), KVC_DTYPE_FP16, x);
  ASSERT_EQ(bytes.size(), 192u);
  const std::string h = hex(bytes);
  // Header, table, centres (the 64 bytes before the tile).
  EXPECT_EQ(h.substr(0, 128),
            "6b766374011801011000100"
            "0c0000000f8ffffffe0ffff3d0000000000000000"
            "43000000" +
                std::string(56, '0'));
  // Lane 0's word: tokens 0 and 8, channels 0, 1, 8, 9.
  EXPECT_EQ(h.substr(128, 8), "8008b33b");
  if (std::getenv("KVC_PRINT_EXAMPLE")) {
    for (size_t i = 0; i < bytes.size(); i += 16) {
      std::printf("%02zx:", i);
      for (size_t j = i; j < i + 16; ++j) std::printf(" %02x", bytes[j]);
      std::printf("\n");
    }
  }
}

}  // namespace
}  // namespace kvc::test
