// SPDX-License-Identifier: Apache-2.0
// Per-layer bounds (kvc_store_config.key_/value_layer_scales): layer l's blocks are encoded with
// the scalar bound times its scale, byte for byte what a codec of that bound writes; the scales
// are checked at creation; serialized sequences carry them (version 5) only where some scale is
// not 1, so that a store of all-1 scales writes what a store without them writes.
#include <gtest/gtest.h>

#include <cfenv>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "store_model.hpp"
#include "tests/fuzz/serialized_sequence.hpp"

namespace kvc::test {
namespace {

Shape scales_shape() {
  Shape sh;
  sh.layers = 3;
  sh.heads = 2;
  sh.dim = 16;
  sh.tokens = 16;
  // Loose enough that a halved bound still quantizes (past 8 bits a tile stays raw).
  sh.key_bound = sh.value_bound = 0.2f;
  return sh;
}

// A store of fixed-width (or tile) blocks: no codebooks to carry between stores.
kvc_store_config scales_config(const Shape& sh, int32_t format, const float* key_scales,
                               const float* value_scales) {
  kvc_store_config c = store_config(sh, 1 << 22);
  c.entropy = KVC_ENTROPY_FIXED;
  c.block_format = format;
  c.key_layer_scales = key_scales;
  c.value_layer_scales = value_scales;
  return c;
}

std::string last_error() { return kvc_last_error(); }

TEST(StoreLayerScales, ConfigIsChecked) {
  const kvc_store_config defaults = KVC_STORE_CONFIG_INIT;
  EXPECT_EQ(defaults.key_layer_scales, nullptr);
  EXPECT_EQ(defaults.value_layer_scales, nullptr);
  const Shape sh = scales_shape();
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (bool value : {false, true}) {
    const std::string field = value ? "value_layer_scales[1]" : "key_layer_scales[1]";
    for (float bad : {0.0f, -1.0f, inf, -inf, nan}) {
      const float scales[3] = {1.0f, bad, 2.0f};
      kvc_store_config c = value ? scales_config(sh, KVC_BLOCK_FORMAT_V1, nullptr, scales)
                                 : scales_config(sh, KVC_BLOCK_FORMAT_V1, scales, nullptr);
      kvc_store_t s = nullptr;
      EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT) << bad;
      EXPECT_NE(last_error().find(field), std::string::npos) << last_error();
      EXPECT_NE(last_error().find("finite and > 0"), std::string::npos) << last_error();
      EXPECT_EQ(s, nullptr);
    }
    // Valid scales, but a bound the codec refuses: a relative bound past 1 in layer 2, an
    // absolute one whose double overflows.
    for (bool relative : {true, false}) {
      const float scales[3] = {0.5f, 1.0f, relative ? 4.0f : 1e30f};
      kvc_store_config c = value ? scales_config(sh, KVC_BLOCK_FORMAT_V1, nullptr, scales)
                                 : scales_config(sh, KVC_BLOCK_FORMAT_V1, scales, nullptr);
      (value ? c.value_bound_mode : c.key_bound_mode) =
          relative ? KVC_BOUND_RELATIVE : KVC_BOUND_ABSOLUTE;
      (value ? c.value_error_bound : c.key_error_bound) = relative ? 0.5f : 1e10f;
      kvc_store_t s = nullptr;
      EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT) << relative;
      const std::string want = std::string("layer 2's ") + (value ? "V" : "K") + " bound";
      EXPECT_NE(last_error().find(want), std::string::npos) << last_error();
      EXPECT_NE(last_error().find(value ? "value_layer_scales[2]" : "key_layer_scales[2]"),
                std::string::npos)
          << last_error();
      EXPECT_EQ(s, nullptr);
    }
  }
  // NULL arrays, or scales that keep every bound valid: created.
  const float ok[3] = {0.25f, 1.0f, 8.0f};
  for (const float* k : {static_cast<const float*>(nullptr), ok}) {
    for (const float* v : {static_cast<const float*>(nullptr), ok}) {
      kvc_store_config c = scales_config(sh, KVC_BLOCK_FORMAT_V1, k, v);
      kvc_store_t s = nullptr;
      ASSERT_EQ(kvc_store_create(&c, &s), KVC_SUCCESS) << last_error();
      kvc_store_destroy(s);
    }
  }
}

// n tokens of the same random rows in every layer: [layers, n, heads, dim].
Rows same_rows_per_layer(std::mt19937& rng, size_t n, const Shape& sh) {
  const Rows one = random_rows(rng, n, sh);
  Rows all;
  for (int32_t l = 0; l < sh.layers; ++l) {
    all.bits.insert(all.bits.end(), one.bits.begin(), one.bits.end());
    all.values.insert(all.values.end(), one.values.begin(), one.values.end());
  }
  return all;
}

// One block through kvc_codec_encode with the given bound (absolute, as store_config's).
std::vector<uint8_t> codec_block(const Shape& sh, int32_t kind, int32_t format, float bound,
                                 const uint16_t* src) {
  kvc_codec_config c = KVC_CODEC_CONFIG_INIT;
  c.kind = kind;
  c.num_tokens = sh.tokens;
  c.head_dim = sh.dim;
  c.bound_mode = KVC_BOUND_ABSOLUTE;
  c.error_bound = bound;
  c.entropy = KVC_ENTROPY_FIXED;
  c.block_format = format;
  kvc_codec_t codec = nullptr;
  EXPECT_EQ(kvc_codec_create(&c, nullptr, &codec), KVC_SUCCESS) << last_error();
  size_t max_bytes = 0;
  EXPECT_EQ(kvc_codec_max_block_bytes(codec, KVC_DTYPE_FP16, &max_bytes), KVC_SUCCESS);
  std::vector<uint32_t> words((max_bytes + 3) / 4);
  const void* in[1] = {src};
  void* out[1] = {words.data()};
  uint32_t n = 0;
  EXPECT_EQ(kvc_codec_encode(codec, 1, in, int64_t(sh.row()), KVC_DTYPE_FP16, out, max_bytes, &n,
                             nullptr),
            KVC_SUCCESS)
      << last_error();
  kvc_codec_destroy(codec);
  const auto* p = reinterpret_cast<const uint8_t*>(words.data());
  return std::vector<uint8_t>(p, p + n);
}

// Every layer holds the same rows; the K scales 0.5, 1, 2 and the V scales 2, 0.5, 1. Each
// layer reads back within its own bound, its blocks are what a codec of that bound writes, a
// looser bound gives fewer bytes, and a layer of scale 1 is as a store without scales has it.
TEST(StoreLayerScales, EachLayerIsEncodedWithItsBound) {
  const Shape sh = scales_shape();
  const float key_scales[3] = {0.5f, 1.0f, 2.0f}, value_scales[3] = {2.0f, 0.5f, 1.0f};
  std::mt19937 rng(31);
  const size_t n = 3 * size_t(sh.tokens) + 5;
  const Rows k = same_rows_per_layer(rng, n, sh), v = same_rows_per_layer(rng, n, sh);
  for (int32_t format : {KVC_BLOCK_FORMAT_V1, KVC_BLOCK_FORMAT_TILES}) {
    const std::string where = format ? "tiles" : "v1";
    StoreHandle scaled(scales_config(sh, format, key_scales, value_scales));
    StoreHandle plain(scales_config(sh, format, nullptr, nullptr));
    int32_t id = -1, plain_id = -1;
    ASSERT_NO_FATAL_FAILURE(
        add_prefilled(scaled.s, sh.layers, n, k.bits.data(), v.bits.data(), id));
    ASSERT_NO_FATAL_FAILURE(
        add_prefilled(plain.s, sh.layers, n, k.bits.data(), v.bits.data(), plain_id));
    std::vector<uint8_t> bytes, plain_bytes;
    ASSERT_NO_FATAL_FAILURE(serialize_sequence(scaled.s, id, bytes));
    ASSERT_NO_FATAL_FAILURE(serialize_sequence(plain.s, plain_id, plain_bytes));
    const auto seq = kvc_fuzz::SerialSequence::parse(bytes.data(), bytes.size());
    const auto plain_seq = kvc_fuzz::SerialSequence::parse(plain_bytes.data(), plain_bytes.size());
    ASSERT_TRUE(seq.has_value() && plain_seq.has_value()) << where;
    std::vector<size_t> layer_bytes[2] = {std::vector<size_t>(3), std::vector<size_t>(3)};
    for (int32_t l = 0; l < sh.layers; ++l) {
      const float bounds[2] = {sh.key_bound * key_scales[l], sh.value_bound * value_scales[l]};
      const ReadBack r = read_back(scaled.s, id, n, sh, l);
      for (size_t i = 0; i < n * sh.row(); ++i) {
        const size_t at = size_t(l) * n * sh.row() + i;
        ASSERT_LE(std::fabs(r.k[i] - k.values[at]), bounds[0])
            << where << ", layer " << l << ", K element " << i;
        ASSERT_LE(std::fabs(r.v[i] - v.values[at]), bounds[1])
            << where << ", layer " << l << ", V element " << i;
      }
      const auto& layer = seq->layers[size_t(l)];
      ASSERT_EQ(layer.num_blocks, 3u) << where;
      for (uint32_t b = 0; b < layer.num_blocks; ++b) {
        for (int32_t h = 0; h < sh.heads; ++h) {
          for (int32_t kind = 0; kind < 2; ++kind) {
            const size_t index = (size_t(b) * size_t(sh.heads) + size_t(h)) * 2 + size_t(kind);
            const Rows& rows = kind == KVC_KIND_KEY ? k : v;
            const uint16_t* src =
                &rows.bits[(size_t(l) * n + size_t(b) * size_t(sh.tokens)) * sh.row() +
                           size_t(h) * size_t(sh.dim)];
            EXPECT_EQ(layer.blocks[index], codec_block(sh, kind, format, bounds[kind], src))
                << where << ", layer " << l << ", block " << b << ", head " << h << ", kind "
                << kind;
            layer_bytes[kind][size_t(l)] += layer.blocks[index].size();
          }
        }
      }
    }
    // K: layer 0 (scale 0.5) > layer 1 (1) > layer 2 (2); V: layer 1 (0.5) > 2 (1) > 0 (2).
    EXPECT_GT(layer_bytes[0][0], layer_bytes[0][1]) << where;
    EXPECT_GT(layer_bytes[0][1], layer_bytes[0][2]) << where;
    EXPECT_GT(layer_bytes[1][1], layer_bytes[1][2]) << where;
    EXPECT_GT(layer_bytes[1][2], layer_bytes[1][0]) << where;
    // K of layer 1 and V of layer 2 have scale 1: as the store without scales has them.
    for (size_t i = 0; i < seq->layers[1].blocks.size(); i += 2) {
      EXPECT_EQ(seq->layers[1].blocks[i], plain_seq->layers[1].blocks[i]) << where << " K " << i;
      EXPECT_EQ(seq->layers[2].blocks[i + 1], plain_seq->layers[2].blocks[i + 1])
          << where << " V " << i;
    }
  }
}

#if defined(FE_UPWARD) && defined(FE_DOWNWARD)
// A layer's bound is the float product of the bound and its scale, rounded to nearest whatever
// rounding mode the thread that creates the store is in (api.md, "Floating-point environment").
TEST(StoreLayerScales, BoundsDoNotDependOnTheCallersRoundingMode) {
  const Shape sh = scales_shape();
  const float key_scales[3] = {0.7f, 0.3f, 1.1f}, value_scales[3] = {0.3f, 1.1f, 0.7f};
  std::mt19937 rng(37);
  const size_t n = size_t(sh.tokens) + 3;
  const Rows k = same_rows_per_layer(rng, n, sh), v = same_rows_per_layer(rng, n, sh);
  auto bytes_of_store_made_in = [&](int mode) {
    const int saved = std::fegetround();
    std::fesetround(mode);
    kvc_store_t s = nullptr;
    const kvc_store_config c = scales_config(sh, KVC_BLOCK_FORMAT_V1, key_scales, value_scales);
    const kvc_status_t st = kvc_store_create(&c, &s);
    std::fesetround(saved);
    EXPECT_EQ(st, KVC_SUCCESS) << kvc_last_error();
    std::vector<uint8_t> bytes;
    if (s == nullptr) return bytes;
    int32_t id = -1;
    add_prefilled(s, sh.layers, n, k.bits.data(), v.bits.data(), id);
    serialize_sequence(s, id, bytes);
    kvc_store_destroy(s);
    return bytes;
  };
  const std::vector<uint8_t> nearest = bytes_of_store_made_in(FE_TONEAREST);
  ASSERT_FALSE(nearest.empty());
  EXPECT_EQ(bytes_of_store_made_in(FE_UPWARD), nearest);
  EXPECT_EQ(bytes_of_store_made_in(FE_DOWNWARD), nearest);
}
#endif

// Serialized sequences: all-1 scales write what no scales write (the same version and bytes, and
// each restores the other's); other scales write version 5, which restores into a store of the
// same scales exactly, and which stores of other scales or none refuse, saying why.
TEST(StoreLayerScales, SequencesCarryTheirScalesOnlyWhereTheyMatter) {
  const Shape sh = scales_shape();
  const float ones[3] = {1.0f, 1.0f, 1.0f};
  const float key_scales[3] = {0.5f, 1.0f, 2.0f}, value_scales[3] = {1.5f, 1.0f, 0.75f};
  const float key_copy[3] = {0.5f, 1.0f, 2.0f}, value_other[3] = {1.5f, 1.0f, 0.5f};
  std::mt19937 rng(37);
  const size_t n = 2 * size_t(sh.tokens) + 3;
  for (int32_t format : {KVC_BLOCK_FORMAT_V1, KVC_BLOCK_FORMAT_TILES}) {
    for (auto [sinks, rotation] : {std::pair{0, KVC_ROTATION_NONE}, std::pair{2, KVC_ROTATION_NONE},
                                   std::pair{0, KVC_ROTATION_HADAMARD}}) {
      const std::string where = std::string(format ? "tiles" : "v1") + ", sinks " +
                                std::to_string(sinks) + ", rotation " + std::to_string(rotation);
      auto config = [&](const float* ks, const float* vs) {
        kvc_store_config c = scales_config(sh, format, ks, vs);
        c.sink_tokens = sinks;
        c.rotation = rotation;
        return c;
      };
      Rows k, v;
      // All-1 scales: the same bytes as no scales, in both directions.
      StoreHandle unit(config(ones, ones)), none(config(nullptr, nullptr));
      int32_t a = -1, b = -1;
      ASSERT_NO_FATAL_FAILURE(add_prefilled(unit.s, rng, sh, n, a, k, v));
      ASSERT_NO_FATAL_FAILURE(add_prefilled(none.s, sh.layers, n, k.bits.data(), v.bits.data(), b));
      std::vector<uint8_t> unit_bytes, none_bytes;
      ASSERT_NO_FATAL_FAILURE(serialize_sequence(unit.s, a, unit_bytes));
      ASSERT_NO_FATAL_FAILURE(serialize_sequence(none.s, b, none_bytes));
      EXPECT_EQ(unit_bytes, none_bytes) << where;
      const uint32_t plain_version = sinks ? 4u : rotation ? 3u : format ? 2u : 1u;
      EXPECT_EQ(format::load_u32(&unit_bytes[4]), plain_version) << where;
      int32_t copy = -1;
      EXPECT_EQ(kvc_store_restore(none.s, unit_bytes.data(), unit_bytes.size(), &copy), KVC_SUCCESS)
          << where << ": " << last_error();
      EXPECT_EQ(kvc_store_restore(unit.s, none_bytes.data(), none_bytes.size(), &copy), KVC_SUCCESS)
          << where << ": " << last_error();

      // Scales that matter: version 5, the scales after version 4's 15 fingerprint words.
      StoreHandle scaled(config(key_scales, value_scales)), same(config(key_copy, value_scales));
      StoreHandle other(config(key_scales, value_other)), keys_only(config(key_scales, nullptr));
      int32_t id = -1;
      ASSERT_NO_FATAL_FAILURE(
          add_prefilled(scaled.s, sh.layers, n, k.bits.data(), v.bits.data(), id));
      std::vector<uint8_t> bytes;
      ASSERT_NO_FATAL_FAILURE(serialize_sequence(scaled.s, id, bytes));
      ASSERT_EQ(format::load_u32(&bytes[4]), 5u) << where;
      const auto seq = kvc_fuzz::SerialSequence::parse(bytes.data(), bytes.size());
      ASSERT_TRUE(seq.has_value()) << where;
      EXPECT_EQ(seq->fingerprint(12) & 1u, format ? 1u : 0u) << where;  // the block format word
      EXPECT_EQ(seq->fingerprint(13), uint32_t(rotation)) << where;
      EXPECT_EQ(seq->fingerprint(14), uint32_t(sinks)) << where;
      for (int32_t l = 0; l < sh.layers; ++l) {
        uint32_t kb, vb;
        std::memcpy(&kb, &key_scales[l], 4);
        std::memcpy(&vb, &value_scales[l], 4);
        EXPECT_EQ(seq->fingerprint(15 + size_t(l)), kb) << where << ", layer " << l;
        EXPECT_EQ(seq->fingerprint(15 + size_t(sh.layers + l)), vb) << where << ", layer " << l;
      }
      ASSERT_EQ(kvc_store_restore(same.s, bytes.data(), bytes.size(), &copy), KVC_SUCCESS)
          << where << ": " << last_error();
      for (int32_t l = 0; l < sh.layers; ++l) {
        const ReadBack x = read_back(scaled.s, id, n, sh, l), y = read_back(same.s, copy, n, sh, l);
        EXPECT_EQ(x.k, y.k) << where << ", layer " << l;
        EXPECT_EQ(x.v, y.v) << where << ", layer " << l;
      }
      std::vector<uint8_t> again;
      ASSERT_NO_FATAL_FAILURE(serialize_sequence(same.s, copy, again));
      EXPECT_EQ(again, bytes) << where;
      // Refused, each store unchanged.
      const std::pair<kvc_store_t, const char*> refusers[] = {
          {none.s, "layer_scales"}, {other.s, "value_layer_scales[2]"}, {keys_only.s, "value_"}};
      for (const auto& [s, named] : refusers) {
        const int64_t before = store_stats(s).num_sequences;
        int32_t refused = -1;
        EXPECT_EQ(kvc_store_restore(s, bytes.data(), bytes.size(), &refused),
                  KVC_ERROR_CONFIG_MISMATCH)
            << where << ", " << named;
        EXPECT_NE(last_error().find(named), std::string::npos) << where << ": " << last_error();
        EXPECT_EQ(refused, -1) << where;
        EXPECT_EQ(store_stats(s).num_sequences, before) << where;
      }
      // And the scaled store refuses the sequences of scale-less stores.
      EXPECT_EQ(kvc_store_restore(scaled.s, none_bytes.data(), none_bytes.size(), &copy),
                KVC_ERROR_CONFIG_MISMATCH)
          << where;
      EXPECT_NE(last_error().find("layer_scales"), std::string::npos) << last_error();
    }
  }
}

}  // namespace
}  // namespace kvc::test
