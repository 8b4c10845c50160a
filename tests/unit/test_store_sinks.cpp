// SPDX-License-Identifier: Apache-2.0
// Attention sinks (kvc_store_config.sink_tokens): the first tokens of every (sequence, layer)
// kept uncompressed beside the first block, read back exactly and attended from there; the rest
// of the store as without them; serialized sequences that carry them; the model-based test with
// sinks on.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>

#include "codec/codebook.hpp"  // fnv1a32
#include "store_model.hpp"

namespace kvc::test {
namespace {

Shape sink_shape() {
  Shape sh;
  sh.layers = 1;
  sh.dim = 32;
  sh.tokens = 16;
  return sh;
}

kvc_store_config sink_config(const Shape& sh, int32_t sinks, int32_t format) {
  kvc_store_config c = store_config(sh, 1 << 22);
  c.sink_tokens = sinks;
  c.block_format = format;
  return c;
}

TEST(StoreSinks, ConfigIsChecked) {
  const kvc_store_config defaults = KVC_STORE_CONFIG_INIT;
  EXPECT_EQ(defaults.sink_tokens, 0);
  const Shape sh = sink_shape();
  kvc_store_t s = nullptr;
  for (int32_t bad : {-1, sh.tokens, sh.tokens + 1}) {
    kvc_store_config c = sink_config(sh, bad, KVC_BLOCK_FORMAT_V1);
    EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT) << bad;
    EXPECT_NE(std::string(kvc_last_error()).find("sink_tokens"), std::string::npos)
        << kvc_last_error();
    EXPECT_EQ(s, nullptr);
  }
  kvc_store_config c = sink_config(sh, sh.tokens - 1, KVC_BLOCK_FORMAT_V1);
  ASSERT_EQ(kvc_store_create(&c, &s), KVC_SUCCESS) << kvc_last_error();
  kvc_store_destroy(s);
}

// A store with sinks and one without, fed the same rows (by prefill, or token by token): the
// first `sinks` rows read back exactly once there is a block (before, every row is a tail row),
// every other row as the store without sinks reads it, and attention agrees with the rows read.
TEST(StoreSinks, SinksReadBackExactlyAndEverythingElseAsWithout) {
  const Shape sh = sink_shape();
  const int32_t S = 5;
  std::mt19937 rng(17);
  const size_t n = 3 * size_t(sh.tokens) + 4;
  const Rows k = random_rows(rng, n, sh), v = random_rows(rng, n, sh);
  const Rows q = random_rows(rng, size_t(sh.group), sh);
  const float scale = 1.0f / std::sqrt(float(sh.dim));
  for (int32_t format : {KVC_BLOCK_FORMAT_V1, KVC_BLOCK_FORMAT_TILES}) {
    for (bool by_prefill : {true, false}) {
      const std::string where =
          std::string(format ? "tiles" : "v1") + (by_prefill ? ", prefill" : ", token by token");
      StoreHandle with(sink_config(sh, S, format)), without(sink_config(sh, 0, format));
      int32_t id = -1;
      ASSERT_EQ(kvc_store_add_sequence(with.s, &id), KVC_SUCCESS);
      ASSERT_EQ(kvc_store_add_sequence(without.s, &id), KVC_SUCCESS);
      for (size_t done = 0; done < n;) {
        const size_t step = by_prefill ? n : 1;
        for (kvc_store_t s : {with.s, without.s}) {
          ASSERT_EQ(kvc_store_prefill(s, id, 0, 1, int32_t(step), &k.bits[done * sh.row()],
                                      &v.bits[done * sh.row()], nullptr),
                    KVC_SUCCESS)
              << kvc_last_error();
        }
        done += step;
        if (!by_prefill && done != size_t(sh.tokens) - 1 && done != size_t(sh.tokens) &&
            done != n) {
          continue;  // checked just before and at the first block, and at the end
        }
        const ReadBack a = read_back(with.s, id, done, sh), b = read_back(without.s, id, done, sh);
        const size_t exact = (done >= size_t(sh.tokens) ? size_t(S) : 0) * sh.row();
        for (size_t i = 0; i < done * sh.row(); ++i) {
          const float want_k = i < exact ? k.values[i] : b.k[i];
          const float want_v = i < exact ? v.values[i] : b.v[i];
          ASSERT_EQ(a.k[i], want_k) << where << ", " << done << " tokens, K element " << i;
          ASSERT_EQ(a.v[i], want_v) << where << ", " << done << " tokens, V element " << i;
        }
        std::vector<uint16_t> out(q.bits.size(), 0xFFFF);
        ASSERT_EQ(kvc_store_attention(with.s, 0, 1, &id, sh.heads * sh.group, scale, q.bits.data(),
                                      out.data(), nullptr),
                  KVC_SUCCESS)
            << kvc_last_error();
        ASSERT_NO_FATAL_FAILURE(check_attention(sh, {a}, q, out, scale, {}, where, {id}));
      }
      // The sinks are counted with the uncompressed rows.
      const kvc_store_stats x = store_stats(with.s), y = store_stats(without.s);
      EXPECT_EQ(x.tail_bytes, y.tail_bytes + 2 * S * int64_t(sh.row()) * 2) << where;
      EXPECT_EQ(x.block_bytes, y.block_bytes) << where;
      EXPECT_EQ(x.dense_bytes, y.dense_bytes) << where;
    }
  }
}

TEST(StoreSinks, ModelBasedRandomOperations) {
  CpuStoreBackend cpu;
  ModelParams mp;
  mp.sink_tokens = 3;
  mp.seed = 41;
  run_model(cpu, mp);
}

TEST(StoreSinks, ModelBasedRandomOperationsOnTiles) {
  CpuStoreBackend cpu;
  ModelParams mp;
  mp.shape.tokens = 16;
  mp.block_format = KVC_BLOCK_FORMAT_TILES;
  mp.sink_tokens = 15;
  mp.seed = 42;
  run_model(cpu, mp);
}

TEST(StoreSinks, ModelBasedRandomOperationsWithRotation) {
  CpuStoreBackend cpu;
  ModelParams mp;
  mp.rotation = KVC_ROTATION_HADAMARD;
  mp.tolerance.relative = 1e-5;  // the rotations' fp32 rounding (check_attention)
  mp.sink_tokens = 2;
  mp.seed = 43;
  run_model(cpu, mp);
}

void reseal(std::vector<uint8_t>& bytes) {
  format::store_u32(&bytes[bytes.size() - 4], fnv1a32(bytes.data(), bytes.size() - 4));
}

TEST(StoreSinks, SequencesCarryTheirSinksAndMoveOnlyBetweenStoresWithTheSameCount) {
  Shape sh = sink_shape();
  sh.layers = 2;
  std::mt19937 rng(23);
  const size_t n = size_t(sh.tokens) + 3;
  for (int32_t format : {KVC_BLOCK_FORMAT_V1, KVC_BLOCK_FORMAT_TILES}) {
    kvc_store_config four = sink_config(sh, 4, format), none = sink_config(sh, 0, format);
    four.entropy = none.entropy = KVC_ENTROPY_FIXED;  // no codebooks to carry over
    kvc_store_config three = four;
    three.sink_tokens = 3;
    StoreHandle a(four), b(none), c(three), d(four);
    int32_t id = -1;
    Rows k, v;
    ASSERT_NO_FATAL_FAILURE(add_prefilled(a.s, rng, sh, n, id, k, v));
    std::vector<uint8_t> bytes;
    ASSERT_NO_FATAL_FAILURE(serialize_sequence(a.s, id, bytes));
    EXPECT_EQ(format::load_u32(&bytes[4]), 4u) << "a store with sinks writes version 4";
    int32_t copy = -1;
    EXPECT_EQ(kvc_store_restore(b.s, bytes.data(), bytes.size(), &copy), KVC_ERROR_CONFIG_MISMATCH);
    EXPECT_NE(std::string(kvc_last_error()).find("sink"), std::string::npos) << kvc_last_error();
    EXPECT_EQ(kvc_store_restore(c.s, bytes.data(), bytes.size(), &copy), KVC_ERROR_CONFIG_MISMATCH);
    ASSERT_EQ(kvc_store_restore(d.s, bytes.data(), bytes.size(), &copy), KVC_SUCCESS)
        << kvc_last_error();
    for (int32_t layer = 0; layer < sh.layers; ++layer) {
      const ReadBack x = read_back(a.s, id, n, sh, layer), y = read_back(d.s, copy, n, sh, layer);
      EXPECT_EQ(x.k, y.k) << "layer " << layer;
      EXPECT_EQ(x.v, y.v) << "layer " << layer;
    }
    std::vector<uint8_t> again;
    ASSERT_NO_FATAL_FAILURE(serialize_sequence(d.s, copy, again));
    EXPECT_EQ(again, bytes);
    // A sink row of inf, checksum made right: rejected, naming the sinks, nothing restored. The
    // first layer's sink K rows follow its blocks: find them by their bits.
    std::vector<uint8_t> bad = bytes;
    const auto* first = reinterpret_cast<const uint8_t*>(k.bits.data());
    const auto at = std::search(bad.begin() + 8, bad.end(), first, first + 4 * sh.row() * 2);
    ASSERT_NE(at, bad.end());
    format::store_u16(&*at + 6, 0x7C00);
    reseal(bad);
    const kvc_store_stats before = store_stats(d.s);
    EXPECT_EQ(kvc_store_restore(d.s, bad.data(), bad.size(), &copy), KVC_ERROR_CORRUPT_DATA);
    EXPECT_NE(std::string(kvc_last_error()).find("sinks"), std::string::npos) << kvc_last_error();
    EXPECT_EQ(store_stats(d.s).num_sequences, before.num_sequences);
  }
}

}  // namespace
}  // namespace kvc::test
