// SPDX-License-Identifier: Apache-2.0
// Golden vectors: blocks encoded by format version 1 from fixed inputs, pinned byte for byte in
// tests/golden/format_v1.txt. A change to the encoder that changes any byte fails here: either
// it is a bug, or the format version must change (docs/format.md).
// Regenerate (only with a format change): KVC_WRITE_GOLDEN=<path> ./unit_golden
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <set>

#include "test_support.hpp"

#ifndef KVC_GOLDEN_FILE
#error "KVC_GOLDEN_FILE must name tests/golden/format_v1.txt"
#endif

namespace kvc::test {
namespace {

// Inputs from integer formulas: no random generator whose sequence could change.
std::vector<float> golden_input(uint32_t tokens, uint32_t dim, uint32_t salt) {
  std::vector<float> x(size_t(tokens) * dim);
  for (uint32_t t = 0; t < tokens; ++t) {
    for (uint32_t c = 0; c < dim; ++c) {
      const int32_t k = int32_t((t * 7 + c * 13 + salt * 5) % 17) - 8;
      x[size_t(t) * dim + c] =
          float(k) * 0.125f + (c % 5 == 0 ? 4.0f : 0.0f) - float((t * c + salt) % 3) * 0.0625f;
    }
  }
  return x;
}

kvcomp::Codebook golden_codebook() {
  kvcomp::Histogram h;
  const uint64_t counts[] = {1, 2, 5, 10, 20, 10, 5, 2, 1};
  h.add_counts(-4, counts);
  return kvcomp::Codebook::build(h);
}

std::string hex(const std::vector<uint8_t>& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (uint8_t b : bytes) {
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

std::map<std::string, std::string> encode_all() {
  const kvcomp::Codebook book = golden_codebook();
  std::map<std::string, std::string> out;
  out["codebook"] = hex(book.serialize());
  struct Case {
    const char* name;
    kvc_kind kind;
    kvc_bound_mode mode;
    float bound;
    kvc_entropy entropy;
    int32_t value_group;
  };
  const Case cases[] = {
      {"k_rel_fixed", KVC_KIND_KEY, KVC_BOUND_RELATIVE, 0.05f, KVC_ENTROPY_FIXED, 0},
      {"k_rel_huffman", KVC_KIND_KEY, KVC_BOUND_RELATIVE, 0.05f, KVC_ENTROPY_HUFFMAN, 0},
      {"k_abs_huffman", KVC_KIND_KEY, KVC_BOUND_ABSOLUTE, 0.1f, KVC_ENTROPY_HUFFMAN, 0},
      {"v_abs_fixed", KVC_KIND_VALUE, KVC_BOUND_ABSOLUTE, 0.05f, KVC_ENTROPY_FIXED, 0},
      {"v_rel_huffman_g8", KVC_KIND_VALUE, KVC_BOUND_RELATIVE, 0.1f, KVC_ENTROPY_HUFFMAN, 8},
      {"v_raw", KVC_KIND_VALUE, KVC_BOUND_ABSOLUTE, 1e-12f, KVC_ENTROPY_AUTO, 0},
  };
  uint32_t salt = 0;
  for (const Case& c : cases) {
    kvc_codec_config config = KVC_CODEC_CONFIG_INIT;
    config.kind = c.kind;
    config.num_tokens = 8;
    config.head_dim = 16;
    config.bound_mode = c.mode;
    config.error_bound = c.bound;
    config.entropy = c.entropy;
    config.value_group_size = c.value_group;
    config.num_substreams = 2;
    if (c.kind == KVC_KIND_VALUE && c.value_group == 0) config.num_substreams = 4;
    const kvcomp::Codec codec(config, &book);
    const Block b = make_block(KVC_DTYPE_FP16, 8, 16, 16, golden_input(8, 16, salt++));
    out[c.name] = hex(codec.encode(b.data(), KVC_DTYPE_FP16, 16));
  }
  return out;
}

TEST(Golden, EncoderReproducesPinnedFormatV1Bytes) {
  const auto encoded = encode_all();
  if (const char* path = std::getenv("KVC_WRITE_GOLDEN")) {
    std::ofstream out(path);
    for (const auto& [name, bytes] : encoded) out << name << ' ' << bytes << '\n';
    GTEST_SKIP() << "wrote " << path;
  }
  std::ifstream in(KVC_GOLDEN_FILE);
  ASSERT_TRUE(in) << "cannot open " << KVC_GOLDEN_FILE;
  std::map<std::string, std::string> pinned;
  std::string name, bytes;
  while (in >> name >> bytes) pinned[name] = bytes;
  ASSERT_EQ(pinned.size(), encoded.size());
  for (const auto& [n, b] : encoded) EXPECT_EQ(b, pinned[n]) << n;
}

TEST(Golden, EveryEncodingIsPinned) {
  std::set<int32_t> encodings;
  for (const auto& [name, bytes] : encode_all()) {
    if (name == "codebook") continue;
    std::vector<uint8_t> raw(bytes.size() / 2);
    for (size_t i = 0; i < raw.size(); ++i)
      raw[i] = uint8_t(std::stoi(bytes.substr(2 * i, 2), nullptr, 16));
    encodings.insert(kvcomp::inspect(raw).encoding);
  }
  EXPECT_EQ(encodings,
            (std::set<int32_t>{KVC_ENCODING_RAW, KVC_ENCODING_FIXED, KVC_ENCODING_HUFFMAN}));
}

}  // namespace
}  // namespace kvc::test
