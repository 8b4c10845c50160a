// SPDX-License-Identifier: Apache-2.0
// The store's Hadamard rotation (kvc_store_config.rotation): the transform itself against the
// matrix it stands for, a rotated store's reads, attention and serialized sequences, the
// model-based test with rotation on, and the ratio it buys on a real model's KV cache.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include "kernels/common/hadamard.cuh"
#include "store_model.hpp"

namespace kvc::test {
namespace {

// Entry (i, j) of the Sylvester Hadamard matrix: (-1)^popcount(i & j).
int sylvester(uint32_t i, uint32_t j) { return __builtin_popcount(i & j) % 2 ? -1 : 1; }

TEST(Hadamard, MatchesTheMatrixProductAndIsOrthonormalAndItsOwnInverse) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (uint32_t n = 1; n <= 1024; n *= 2) {
    std::vector<float> x(n), y;
    for (float& e : x) e = normal(rng) * (rng() % 5 == 0 ? 30.0f : 1.0f);
    y = x;
    hadamard::rotate(y.data(), n);
    double norm_x = 0, norm_y = 0;
    for (uint32_t i = 0; i < n; ++i) {
      double want = 0, magnitude = 0;
      for (uint32_t j = 0; j < n; ++j) {
        want += sylvester(i, j) * double(x[j]);
        magnitude += std::fabs(double(x[j]));
      }
      want /= std::sqrt(double(n));
      // log2(n) rounded adds of partial sums bounded by the L1 norm, and the scaling.
      const double tol = (std::log2(double(n)) + 2) * 6e-8 * magnitude / std::sqrt(double(n));
      ASSERT_NEAR(y[i], want, tol) << "n " << n << " element " << i;
      norm_x += double(x[i]) * x[i];
      norm_y += double(y[i]) * y[i];
    }
    EXPECT_NEAR(std::sqrt(norm_y), std::sqrt(norm_x), 1e-6 * std::sqrt(norm_x) * std::log2(2.0 * n))
        << "n " << n;
    hadamard::rotate(y.data(), n);  // H / sqrt(n) is its own inverse
    for (uint32_t i = 0; i < n; ++i) {
      ASSERT_NEAR(y[i], x[i], 1e-6 * std::sqrt(norm_x)) << "n " << n << " element " << i;
    }
  }
  EXPECT_EQ(hadamard::scale(64), 0.125f);
  EXPECT_EQ(hadamard::scale(128), 0.70710678118654752440f / 8);
  EXPECT_TRUE(hadamard::valid_dim(256));
  EXPECT_FALSE(hadamard::valid_dim(96));
  EXPECT_FALSE(hadamard::valid_dim(0));
}

TEST(Hadamard, SpreadsAnOutlierOverTheRow) {
  std::vector<float> x(64, 0.0f);
  x[17] = 8.0f;  // one outlier channel: every rotated element gets 8 / sqrt(64) = 1, signed
  hadamard::rotate(x.data(), 64);
  for (uint32_t i = 0; i < 64; ++i) EXPECT_EQ(std::fabs(x[i]), 1.0f) << i;
}

Shape rotation_shape() {
  Shape sh;
  sh.dim = 32;
  sh.tokens = 16;
  return sh;
}

kvc_store_config rotated_config(const Shape& sh) {
  kvc_store_config c = store_config(sh, 1 << 22);
  c.rotation = KVC_ROTATION_HADAMARD;
  return c;
}

TEST(StoreRotation, ConfigIsChecked) {
  const kvc_store_config defaults = KVC_STORE_CONFIG_INIT;
  EXPECT_EQ(defaults.rotation, KVC_ROTATION_NONE);
  Shape sh = rotation_shape();
  kvc_store_config c = rotated_config(sh);
  kvc_store_t s = nullptr;
  c.rotation = 3;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(kvc_last_error()).find("rotation"), std::string::npos) << kvc_last_error();
  c.rotation = -1;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  c.rotation = KVC_ROTATION_HADAMARD;
  c.head_dim = 48;  // the codec takes it; the Hadamard matrix needs a power of two
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_NOT_SUPPORTED);
  EXPECT_NE(std::string(kvc_last_error()).find("power of two"), std::string::npos);
  c.rotation = KVC_ROTATION_HADAMARD_VALUES;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_NOT_SUPPORTED);
  c.rotation = KVC_ROTATION_NONE;
  ASSERT_EQ(kvc_store_create(&c, &s), KVC_SUCCESS) << kvc_last_error();
  kvc_store_destroy(s);
  c = rotated_config(sh);
  ASSERT_EQ(kvc_store_create(&c, &s), KVC_SUCCESS) << kvc_last_error();
  kvc_store_destroy(s);
}

// Rows with outlier channels (channel 3 of every head 40x larger): what rotation is for.
Rows outlier_rows(std::mt19937& rng, size_t n, const Shape& s) {
  Rows r;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t i = 0; i < n * s.row(); ++i) {
    const uint16_t h = format::float_to_half(normal(rng) * (i % size_t(s.dim) == 3 ? 40.0f : 1.0f));
    r.bits.push_back(h);
    r.values.push_back(format::half_to_float(h));
  }
  return r;
}

TEST(StoreRotation, ReadsBackWithinWhatTheBoundImplies) {
  Shape sh = rotation_shape();
  sh.layers = 1;
  std::mt19937 rng(11);
  const size_t n = 3 * size_t(sh.tokens) + 5;  // three blocks and a tail
  const Rows k = outlier_rows(rng, n, sh), v = outlier_rows(rng, n, sh);
  for (int32_t rotation : {KVC_ROTATION_NONE, KVC_ROTATION_HADAMARD}) {
    kvc_store_config c = rotated_config(sh);
    c.rotation = rotation;
    StoreHandle store(c);
    int32_t id = -1;
    ASSERT_NO_FATAL_FAILURE(add_prefilled(store.s, 1, n, k.bits.data(), v.bits.data(), id));
    const ReadBack r = read_back(store.s, id, n, sh);
    const size_t compressed_rows = 3 * size_t(sh.tokens) * size_t(sh.heads);
    if (rotation == KVC_ROTATION_HADAMARD) {
      ASSERT_NO_FATAL_FAILURE(
          check_rotated_rows(sh, r.k, k.values, compressed_rows, sh.key_bound, "K"));
      ASSERT_NO_FATAL_FAILURE(
          check_rotated_rows(sh, r.v, v.values, compressed_rows, sh.value_bound, "V"));
    }
    // Per element, the errors of a row's D rotated elements (each within the bound) come back
    // summed with signs / sqrt(D): at most sqrt(D) times the bound, and in practice near it.
    double worst = 0;
    for (size_t i = 0; i < compressed_rows * size_t(sh.dim); ++i) {
      worst = std::max(worst, std::fabs(double(r.k[i]) - k.values[i]) / sh.key_bound);
    }
    std::printf("rotation %d: worst K element error %.3f x the bound\n", rotation, worst);
    EXPECT_LE(worst, rotation ? std::sqrt(double(sh.dim)) * 1.01 : 1.0);
    if (rotation == KVC_ROTATION_NONE) {  // tails exact without rotation
      for (size_t i = compressed_rows * size_t(sh.dim); i < n * sh.row(); ++i) {
        ASSERT_EQ(r.k[i], k.values[i]) << i;
      }
    }
  }
}

// softmax(scale q K^T) V in double over exact rows; q, the result: [q_heads, dim].
std::vector<double> dense_attention(const Shape& sh, const std::vector<float>& k,
                                    const std::vector<float>& v, const std::vector<float>& q,
                                    float scale) {
  const size_t row = sh.row(), len = k.size() / row;
  const int32_t q_heads = sh.heads * sh.group;
  std::vector<double> out(size_t(q_heads) * size_t(sh.dim));
  for (int32_t qh = 0; qh < q_heads; ++qh) {
    const size_t h = size_t(qh / sh.group);
    std::vector<double> w(len);
    double top = -INFINITY, sum = 0;
    for (size_t t = 0; t < len; ++t) {
      double dot = 0;
      for (int d = 0; d < sh.dim; ++d) {
        dot += double(q[size_t(qh) * size_t(sh.dim) + size_t(d)]) *
               k[t * row + h * size_t(sh.dim) + size_t(d)];
      }
      top = std::max(top, w[t] = scale * dot);
    }
    for (double& x : w) sum += (x = std::exp(x - top));
    for (int d = 0; d < sh.dim; ++d) {
      double acc = 0;
      for (size_t t = 0; t < len; ++t) acc += w[t] * v[t * row + h * size_t(sh.dim) + size_t(d)];
      out[size_t(qh) * size_t(sh.dim) + size_t(d)] = acc / sum;
    }
  }
  return out;
}

TEST(StoreRotation, AttentionEqualsTheUnrotatedReference) {
  Shape sh = rotation_shape();
  sh.layers = 1;
  sh.key_bound = 0.002f;  // small bounds: the compressed attention is then close to the exact one
  sh.value_bound = 0.002f;
  std::mt19937 rng(3);
  const size_t n = 2 * size_t(sh.tokens) + 7;
  const Rows k = outlier_rows(rng, n, sh), v = outlier_rows(rng, n, sh);
  const float scale = 0.05f;
  const Rows q = random_rows(rng, size_t(sh.group), sh);
  for (int32_t rotation : {KVC_ROTATION_HADAMARD, KVC_ROTATION_HADAMARD_VALUES}) {
    kvc_store_config c = rotated_config(sh);
    c.rotation = rotation;
    StoreHandle store(c);
    int32_t id = -1;
    ASSERT_NO_FATAL_FAILURE(add_prefilled(store.s, 1, n, k.bits.data(), v.bits.data(), id));
    std::vector<uint16_t> out(q.bits.size());
    ASSERT_EQ(kvc_store_attention(store.s, 0, 1, &id, sh.heads * sh.group, scale, q.bits.data(),
                                  out.data(), nullptr),
              KVC_SUCCESS)
        << kvc_last_error();
    // Against the exact rows: the compression error (a few bounds' worth) and fp16 rounding.
    const std::vector<double> exact = dense_attention(sh, k.values, v.values, q.values, scale);
    double worst = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      const double got = format::half_to_float(out[i]);
      worst = std::max(worst, std::fabs(got - exact[i]));
      ASSERT_NEAR(got, exact[i], 0.05 + 2e-3 * std::fabs(exact[i])) << "element " << i;
    }
    // Against the rows it reads back: the same values up to fp32 rounding of the rotations.
    const ReadBack r = read_back(store.s, id, n, sh);
    AttentionTolerance tol;
    tol.relative = 1e-5;
    ASSERT_NO_FATAL_FAILURE(check_attention(sh, {r}, q, out, scale, tol, "rotated", {id}));
    std::printf("rotation %d: worst |attention - exact| %.5f\n", rotation, worst);
  }
}

TEST(StoreRotation, ModelBasedRandomOperations) {
  CpuStoreBackend cpu;
  ModelParams mp;
  mp.rotation = KVC_ROTATION_HADAMARD;
  mp.tolerance.relative = 1e-5;  // the rotations' fp32 rounding (check_attention)
  mp.seed = 31;
  run_model(cpu, mp);
}

TEST(StoreRotation, ModelBasedRandomOperationsRotatingValuesOnly) {
  CpuStoreBackend cpu;
  ModelParams mp;
  mp.rotation = KVC_ROTATION_HADAMARD_VALUES;
  mp.tolerance.relative = 1e-5;
  mp.seed = 33;
  run_model(cpu, mp);
}

TEST(StoreRotation, ModelBasedRandomOperationsOnTiles) {
  CpuStoreBackend cpu;
  ModelParams mp;
  mp.shape.tokens = 16;
  mp.block_format = KVC_BLOCK_FORMAT_TILES;
  mp.rotation = KVC_ROTATION_HADAMARD;
  mp.tolerance.relative = 1e-5;
  mp.seed = 32;
  run_model(cpu, mp);
}

TEST(StoreRotation, SequencesMoveOnlyBetweenStoresThatRotateAlike) {
  Shape sh = rotation_shape();
  std::mt19937 rng(9);
  const size_t n = size_t(sh.tokens) + 3;
  for (int32_t format : {KVC_BLOCK_FORMAT_V1, KVC_BLOCK_FORMAT_TILES}) {
    kvc_store_config rotated = rotated_config(sh), plain = rotated_config(sh);
    rotated.block_format = plain.block_format = format;
    rotated.entropy = plain.entropy = KVC_ENTROPY_FIXED;  // no codebooks to carry over
    plain.rotation = KVC_ROTATION_NONE;
    StoreHandle a(rotated), b(plain), c(rotated);
    std::vector<uint8_t> from_rotated, from_plain;
    for (auto [s, bytes] : {std::pair{a.s, &from_rotated}, std::pair{b.s, &from_plain}}) {
      int32_t id = -1;
      Rows k, v;
      ASSERT_NO_FATAL_FAILURE(add_prefilled(s, rng, sh, n, id, k, v));
      ASSERT_NO_FATAL_FAILURE(serialize_sequence(s, id, *bytes));
    }
    EXPECT_EQ(format::load_u32(&from_rotated[4]), 3u) << "a rotated store writes version 3";
    int32_t id = -1;
    EXPECT_EQ(kvc_store_restore(b.s, from_rotated.data(), from_rotated.size(), &id),
              KVC_ERROR_CONFIG_MISMATCH);
    EXPECT_NE(std::string(kvc_last_error()).find("rotated"), std::string::npos) << kvc_last_error();
    EXPECT_EQ(kvc_store_restore(a.s, from_plain.data(), from_plain.size(), &id),
              KVC_ERROR_CONFIG_MISMATCH);
    kvc_store_config values_only = rotated;  // the rotation word differs
    values_only.rotation = KVC_ROTATION_HADAMARD_VALUES;
    StoreHandle e(values_only);
    EXPECT_EQ(kvc_store_restore(e.s, from_rotated.data(), from_rotated.size(), &id),
              KVC_ERROR_CONFIG_MISMATCH);
    // A rotated store of the other block format: the fingerprint's block format word differs.
    kvc_store_config other = rotated;
    other.block_format =
        format == KVC_BLOCK_FORMAT_V1 ? KVC_BLOCK_FORMAT_TILES : KVC_BLOCK_FORMAT_V1;
    StoreHandle d(other);
    EXPECT_EQ(kvc_store_restore(d.s, from_rotated.data(), from_rotated.size(), &id),
              KVC_ERROR_CONFIG_MISMATCH);
    // The same configuration restores it, and it reads back as the original does.
    ASSERT_EQ(kvc_store_restore(c.s, from_rotated.data(), from_rotated.size(), &id), KVC_SUCCESS)
        << kvc_last_error();
    const ReadBack original = read_back(a.s, 0, n, sh), copy = read_back(c.s, id, n, sh);
    EXPECT_EQ(original.k, copy.k);
    EXPECT_EQ(original.v, copy.v);
  }
}

TEST(StoreRotation, ARotatedRowPastTheDtypesRangeIsRejected) {
  Shape sh = rotation_shape();
  sh.layers = 1;
  StoreHandle store(rotated_config(sh));
  int32_t id = -1;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  // 60000 in every channel: finite in fp16, but the first rotated element is 60000 * sqrt(32).
  std::vector<uint16_t> big(sh.row(), format::float_to_half(60000.0f)), zero(sh.row(), 0);
  EXPECT_EQ(kvc_store_append(store.s, 0, 1, &id, big.data(), zero.data(), nullptr),
            KVC_ERROR_NONFINITE_INPUT);
  EXPECT_NE(std::string(kvc_last_error()).find("rotated"), std::string::npos) << kvc_last_error();
  int32_t len = -1;
  ASSERT_EQ(kvc_store_sequence_length(store.s, id, 0, &len), KVC_SUCCESS);
  EXPECT_EQ(len, 0);
  // bf16 has the range: the same row is stored.
  kvc_store_config c = rotated_config(sh);
  c.dtype = KVC_DTYPE_BF16;
  StoreHandle wide(c);
  ASSERT_EQ(kvc_store_add_sequence(wide.s, &id), KVC_SUCCESS);
  std::vector<uint16_t> big16(sh.row(), format::float_to_bf16(60000.0f));
  EXPECT_EQ(kvc_store_append(wide.s, 0, 1, &id, big16.data(), zero.data(), nullptr), KVC_SUCCESS)
      << kvc_last_error();
  // A bf16 row that rotates into range but not back within fp32, as a read does it: one
  // element of 1e38 becomes 32 of 1.8e37, which sum to inf on the way back.
  std::vector<uint16_t> spike(sh.row(), format::float_to_bf16(0.0f));
  spike[0] = format::float_to_bf16(1e38f);
  EXPECT_EQ(kvc_store_append(wide.s, 0, 1, &id, spike.data(), zero.data(), nullptr),
            KVC_ERROR_NONFINITE_INPUT);
  EXPECT_NE(std::string(kvc_last_error()).find("rotate back"), std::string::npos)
      << kvc_last_error();
  ASSERT_EQ(kvc_store_sequence_length(wide.s, id, 0, &len), KVC_SUCCESS);
  EXPECT_EQ(len, 1);
}

#ifdef KVC_TEST_DATA_DIR
// The ratio rotation buys on a real KV cache (tests/data: SmolLM2-135M, layers 0, 14 and 29,
// 512 tokens, 3 kv-heads of 64), at the bounds the accuracy harness found useful; also the
// bound's implication on every row read back. Prints the figures.
TEST(StoreRotation, RealKvRatioWithAndWithoutRotation) {
  constexpr size_t kLayers = 3, kTokens = 512, kHeads = 3, kDim = 64;
  std::ifstream in(std::string(KVC_TEST_DATA_DIR) + "/smollm2_kv_512.bin", std::ios::binary);
  ASSERT_TRUE(in);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  const std::string raw = buffer.str();
  ASSERT_EQ(raw.size(), kLayers * 2 * kTokens * kHeads * kDim * 2);
  const auto* bits = reinterpret_cast<const uint16_t*>(raw.data());
  const size_t elems = kTokens * kHeads * kDim;
  // [layers, tokens, heads, dim] of K, and of V, as the store's prefill takes them.
  std::vector<uint16_t> keys, values;
  for (size_t l = 0; l < kLayers; ++l) {
    keys.insert(keys.end(), bits + (l * 2) * elems, bits + (l * 2 + 1) * elems);
    values.insert(values.end(), bits + (l * 2 + 1) * elems, bits + (l * 2 + 2) * elems);
  }
  // What the rotation alone costs: each row rotated in fp32, rounded to fp16 (as the store keeps
  // it) and rotated back, against the row; in units of the bounds used below (K absolute 0.25).
  for (int kind = 0; kind < 2; ++kind) {
    const std::vector<uint16_t>& rows = kind ? values : keys;
    double sq = 0, worst = 0, norm = 0;
    std::vector<float> x(kDim);
    for (size_t r = 0; r < rows.size() / kDim; ++r) {
      for (size_t d = 0; d < kDim; ++d) x[d] = format::half_to_float(rows[r * kDim + d]);
      hadamard::rotate(x.data(), kDim);
      for (float& e : x) e = format::half_to_float(format::float_to_half(e));
      hadamard::rotate(x.data(), kDim);
      for (size_t d = 0; d < kDim; ++d) {
        const double want = format::half_to_float(rows[r * kDim + d]), err = x[d] - want;
        sq += err * err;
        norm += want * want;
        worst = std::max(worst, std::fabs(err));
      }
    }
    std::printf(
        "%s: the rotated rows' fp16 rounding alone: rms error %.2e (%.2e of the rms "
        "value), largest %.2e\n",
        kind ? "V" : "K", std::sqrt(sq / double(rows.size())), std::sqrt(sq / norm), worst);
    EXPECT_LE(std::sqrt(sq / norm), std::ldexp(1.0, -11));  // half an ulp, relative, at most
  }
  struct Setting {
    int32_t format, tokens;
  };
  for (const Setting st : {Setting{KVC_BLOCK_FORMAT_V1, 128}, Setting{KVC_BLOCK_FORMAT_TILES, 128},
                           Setting{KVC_BLOCK_FORMAT_V1, 64}, Setting{KVC_BLOCK_FORMAT_TILES, 64}}) {
    for (int32_t rotation : {KVC_ROTATION_NONE, KVC_ROTATION_HADAMARD}) {
      kvc_store_config c = KVC_STORE_CONFIG_INIT;
      c.num_layers = int32_t(kLayers);
      c.num_kv_heads = int32_t(kHeads);
      c.head_dim = int32_t(kDim);
      c.block_tokens = st.tokens;
      c.key_bound_mode = KVC_BOUND_ABSOLUTE;
      c.key_error_bound = 0.25f;
      c.value_bound_mode = KVC_BOUND_RELATIVE;
      c.value_error_bound = 0.07f;
      c.block_format = st.format;
      c.rotation = rotation;
      c.capacity_bytes = int64_t(64) << 20;
      StoreHandle store(c);
      int32_t id = -1;
      ASSERT_NO_FATAL_FAILURE(
          add_prefilled(store.s, int32_t(kLayers), kTokens, keys.data(), values.data(), id));
      const kvc_store_stats s = store_stats(store.s);
      ASSERT_EQ(s.tail_bytes, 0);
      // K: the row L2 error within sqrt(D) * 0.25 plus the rotated row's fp16 rounding.
      Shape sh;
      sh.heads = int32_t(kHeads);
      sh.dim = int32_t(kDim);
      double k_sq = 0, k_worst = 0;
      for (size_t l = 0; l < kLayers; ++l) {
        ReadBack r{std::vector<float>(elems), std::vector<float>(elems)};
        ASSERT_EQ(kvc_store_read(store.s, id, int32_t(l), KVC_DTYPE_FP32, int32_t(kTokens),
                                 r.k.data(), r.v.data(), nullptr),
                  KVC_SUCCESS);
        std::vector<float> x(elems);
        for (size_t i = 0; i < elems; ++i) {
          x[i] = format::half_to_float(keys[l * elems + i]);
          k_sq += (double(r.k[i]) - x[i]) * (double(r.k[i]) - x[i]);
          k_worst = std::max(k_worst, std::fabs(double(r.k[i]) - x[i]));
        }
        if (rotation) {
          ASSERT_NO_FATAL_FAILURE(
              check_rotated_rows(sh, r.k, x, kTokens * kHeads, 0.25f, "real K"));
        }
      }
      std::printf(
          "%s T %d rotation %d: %.3fx (block bytes %lld of dense %lld), K rms error %.4f, "
          "largest %.4f\n",
          st.format == KVC_BLOCK_FORMAT_V1 ? "format v1" : "tiles    ", st.tokens, rotation,
          double(s.dense_bytes) / double(s.block_bytes), (long long)s.block_bytes,
          (long long)s.dense_bytes, std::sqrt(k_sq / double(kLayers * elems)), k_worst);
    }
  }
}
#endif

}  // namespace
}  // namespace kvc::test
