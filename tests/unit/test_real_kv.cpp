// SPDX-License-Identifier: Apache-2.0
// The codec on a real model's KV cache (tests/data: SmolLM2-135M, layers 0, 14 and 29, 512
// tokens): the bound on every element, and compressed sizes no larger than the reference sizes
// recorded in the dump's manifest when it was made.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <regex>
#include <sstream>

#include "test_support.hpp"

#ifndef KVC_TEST_DATA_DIR
#error "KVC_TEST_DATA_DIR must name tests/data"
#endif

namespace kvc::test {
namespace {

constexpr uint32_t kLayers = 3, kTokens = 512, kHeads = 3, kDim = 64, kBlockTokens = 64;
const char* const kLayerNames[kLayers] = {"layer0", "layer14", "layer29"};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "cannot open " << path;
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// "layerN/key|value/absolute|relative/bound" -> {auto block bytes, fixed block bytes}.
std::map<std::string, std::pair<uint64_t, uint64_t>> reference_sizes(const std::string& json) {
  const std::regex entry(
      R"re("(layer\d+/(?:key|value)/(?:absolute|relative)/[0-9.]+)":\s*\{\s*"auto":\s*\{\s*"block_bytes":\s*(\d+)[^}]*\},\s*"fixed":\s*\{\s*"block_bytes":\s*(\d+))re");
  std::map<std::string, std::pair<uint64_t, uint64_t>> out;
  for (auto it = std::sregex_iterator(json.begin(), json.end(), entry);
       it != std::sregex_iterator(); ++it) {
    out[(*it)[1]] = {std::stoull((*it)[2]), std::stoull((*it)[3])};
  }
  return out;
}

TEST(RealKv, BoundHoldsAndSizesDoNotRegress) {
  const std::string raw = read_file(std::string(KVC_TEST_DATA_DIR) + "/smollm2_kv_512.bin");
  ASSERT_EQ(raw.size(), size_t(kLayers) * 2 * kTokens * kHeads * kDim * 2);
  const auto reference =
      reference_sizes(read_file(std::string(KVC_TEST_DATA_DIR) + "/smollm2_kv_512.json"));
  ASSERT_EQ(reference.size(), 15u) << "manifest entries";
  int checked = 0;
  for (const auto& [name, sizes] : reference) {
    std::smatch m;
    const std::regex parts(R"(layer(\d+)/(key|value)/(absolute|relative)/([0-9.]+))");
    ASSERT_TRUE(std::regex_match(name, m, parts));
    const uint32_t layer =
        uint32_t(std::find(kLayerNames, kLayerNames + kLayers, "layer" + m[1].str()) - kLayerNames);
    ASSERT_LT(layer, kLayers) << name;
    const bool is_value = m[2] == "value";
    const kvc_bound_mode mode = m[3] == "absolute" ? KVC_BOUND_ABSOLUTE : KVC_BOUND_RELATIVE;
    const float bound = std::stof(m[4]);
    // [tokens, heads, dim] of this layer and kind, as fp16 bits and exact floats.
    const size_t elems = size_t(kTokens) * kHeads * kDim;
    const auto* bits =
        reinterpret_cast<const uint16_t*>(raw.data()) + (layer * 2 + is_value) * elems;
    std::vector<float> x(elems);
    for (size_t i = 0; i < elems; ++i) x[i] = format::half_to_float(bits[i]);
    const Block cache = make_block(KVC_DTYPE_FP16, kTokens, kHeads * kDim, kHeads * kDim, x);

    kvc_codec_config c =
        make_config(is_value ? KVC_KIND_VALUE : KVC_KIND_KEY, kBlockTokens, kDim, mode, bound);
    kvcomp::Histogram histogram;  // the codebook from the same tokens, as the manifest's
    const kvcomp::Codec probe(c);
    auto block_at = [&](uint32_t b, uint32_t h) {
      return cache.bytes.data() + (size_t(b) * kBlockTokens * kHeads + h) * kDim * 2;
    };
    for (uint32_t b = 0; b < kTokens / kBlockTokens; ++b) {
      for (uint32_t h = 0; h < kHeads; ++h) {
        probe.add_to_histogram(block_at(b, h), KVC_DTYPE_FP16, kHeads * kDim, histogram);
      }
    }
    const kvcomp::Codebook book = kvcomp::Codebook::build(histogram);
    for (kvc_entropy entropy : {KVC_ENTROPY_AUTO, KVC_ENTROPY_FIXED}) {
      c.entropy = entropy;
      const kvcomp::Codec codec(c, &book);
      uint64_t total = 0;
      for (uint32_t b = 0; b < kTokens / kBlockTokens; ++b) {
        for (uint32_t h = 0; h < kHeads; ++h) {
          const auto block = codec.encode(block_at(b, h), KVC_DTYPE_FP16, kHeads * kDim);
          total += block.size();
          std::vector<float> y(size_t(kBlockTokens) * kDim);
          codec.decode(block, KVC_DTYPE_FP32, y.data(), kDim);
          // The element's group range, for the relative bound: K per channel over the block's
          // tokens, V per token over the channels.
          for (uint32_t t = 0; t < kBlockTokens; ++t) {
            for (uint32_t d = 0; d < kDim; ++d) {
              float lo = INFINITY, hi = -INFINITY;
              for (uint32_t e = 0; e < (is_value ? kDim : kBlockTokens); ++e) {
                const uint32_t tt = is_value ? t : e, dd = is_value ? e : d;
                const float v = x[((size_t(b) * kBlockTokens + tt) * kHeads + h) * kDim + dd];
                lo = std::min(lo, v);
                hi = std::max(hi, v);
              }
              const float eb = mode == KVC_BOUND_ABSOLUTE ? bound : bound * (hi - lo);
              const float v = x[((size_t(b) * kBlockTokens + t) * kHeads + h) * kDim + d];
              ASSERT_LE(std::fabs(double(y[size_t(t) * kDim + d]) - double(v)), double(eb))
                  << name << " block " << b << " head " << h << " token " << t << " ch " << d;
            }
          }
        }
      }
      const uint64_t limit = entropy == KVC_ENTROPY_AUTO ? sizes.first : sizes.second;
      EXPECT_LE(total, limit) << name << (entropy == KVC_ENTROPY_AUTO ? " huffman" : " fixed")
                              << ": " << double(elems * 2) / double(total) << "x";
      ++checked;
    }
  }
  EXPECT_EQ(checked, 30);
}

}  // namespace
}  // namespace kvc::test
