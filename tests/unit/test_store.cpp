// SPDX-License-Identifier: Apache-2.0
// The paged store on the CPU backend, checked against a dense shadow model after every step:
// lengths, read-back within the bound, attention against a dense reference, all-or-nothing
// failures (out of pages mid-batch, corrupt serialized input), and no page leaks.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "codec/codebook.hpp"
#include "test_support.hpp"

namespace kvc::test {
namespace {

struct Shape {
  int32_t layers = 2, heads = 2, dim = 16, tokens = 8;
  float key_bound = 0.05f, value_bound = 0.02f;
};

kvc_store_config store_config(const Shape& s, int64_t capacity, int32_t page_bytes = 0) {
  kvc_store_config c = KVC_STORE_CONFIG_INIT;
  c.num_layers = s.layers;
  c.num_kv_heads = s.heads;
  c.head_dim = s.dim;
  c.block_tokens = s.tokens;
  c.key_bound_mode = KVC_BOUND_ABSOLUTE;
  c.key_error_bound = s.key_bound;
  c.value_bound_mode = KVC_BOUND_ABSOLUTE;
  c.value_error_bound = s.value_bound;
  c.page_bytes = page_bytes;
  c.capacity_bytes = capacity;
  return c;
}

struct StoreHandle {
  kvc_store_t s = nullptr;
  explicit StoreHandle(const kvc_store_config& c) {
    EXPECT_EQ(kvc_store_create(&c, &s), KVC_SUCCESS) << kvc_last_error();
  }
  ~StoreHandle() { kvc_store_destroy(s); }
};

// fp16 rows [n, heads, dim] from floats, and their exact values.
struct Rows {
  std::vector<uint16_t> bits;
  std::vector<float> values;
};
Rows random_rows(std::mt19937& rng, size_t n, const Shape& s) {
  Rows r;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t i = 0; i < n * size_t(s.heads * s.dim); ++i) {
    const uint16_t h = format::float_to_half(normal(rng) * (i % 7 == 0 ? 4.0f : 1.0f));
    r.bits.push_back(h);
    r.values.push_back(format::half_to_float(h));
  }
  return r;
}

// The dense shadow of one store: per sequence and layer, the exact K and V rows given to it.
struct Shadow {
  Shape shape;
  std::map<int32_t, std::vector<std::vector<float>>> k, v;  // [layer][tokens * heads * dim]

  size_t length(int32_t id, int layer) const {
    return k.at(id)[size_t(layer)].size() / size_t(shape.heads * shape.dim);
  }
};

// Stats and every sequence's serialized bytes: equal snapshots mean an unchanged store.
std::vector<uint8_t> snapshot(kvc_store_t s, const Shadow& shadow) {
  std::vector<uint8_t> out;
  for (const auto& [id, layers] : shadow.k) {
    size_t n = 0;
    EXPECT_EQ(kvc_store_serialized_size(s, id, &n), KVC_SUCCESS);
    std::vector<uint8_t> bytes(n);
    EXPECT_EQ(kvc_store_serialize(s, id, bytes.data(), n, &n), KVC_SUCCESS);
    out.insert(out.end(), bytes.begin(), bytes.end());
  }
  kvc_store_stats st = KVC_STORE_STATS_INIT;
  EXPECT_EQ(kvc_store_get_stats(s, &st), KVC_SUCCESS);
  const auto* p = reinterpret_cast<const uint8_t*>(&st);
  out.insert(out.end(), p, p + sizeof(st));
  return out;
}

// Reads every sequence back and checks lengths, the bound (compressed tokens) and exactness
// (tail tokens); then checks attention against a dense reference over the read-back values.
void check_against_shadow(kvc_store_t s, const Shadow& shadow, std::mt19937& rng,
                          const std::string& where) {
  const Shape& sh = shadow.shape;
  const size_t row = size_t(sh.heads * sh.dim);
  for (int layer = 0; layer < sh.layers; ++layer) {
    std::vector<int32_t> ids;
    std::map<int32_t, std::pair<std::vector<float>, std::vector<float>>> read;
    for (const auto& [id, layers] : shadow.k) {
      const size_t len = shadow.length(id, layer);
      int32_t got = -1;
      ASSERT_EQ(kvc_store_sequence_length(s, id, layer, &got), KVC_SUCCESS);
      ASSERT_EQ(size_t(got), len) << where;
      std::vector<float> k(len * row), v(len * row);
      ASSERT_EQ(kvc_store_read(s, id, layer, KVC_DTYPE_FP32, int32_t(len), k.data(), v.data()),
                KVC_SUCCESS)
          << kvc_last_error();
      const size_t compressed = len / size_t(sh.tokens) * size_t(sh.tokens) * row;
      const auto& xk = shadow.k.at(id)[size_t(layer)];
      const auto& xv = shadow.v.at(id)[size_t(layer)];
      for (size_t i = 0; i < len * row; ++i) {
        const float bk = i < compressed ? sh.key_bound : 0.0f;
        const float bv = i < compressed ? sh.value_bound : 0.0f;
        ASSERT_LE(std::fabs(k[i] - xk[i]), bk) << where << " seq " << id << " K elem " << i;
        ASSERT_LE(std::fabs(v[i] - xv[i]), bv) << where << " seq " << id << " V elem " << i;
      }
      ids.push_back(id);
      read[id] = {std::move(k), std::move(v)};
    }
    if (ids.empty()) continue;
    // Attention with GQA group 2, against double-precision attention over the read-back K/V.
    const int32_t q_heads = sh.heads * 2;
    const float scale = 1.0f / std::sqrt(float(sh.dim));
    Rows q = random_rows(rng, ids.size() * 2, sh);
    std::vector<uint16_t> out(q.bits.size(), 0xFFFF);
    ASSERT_EQ(kvc_store_attention(s, layer, int32_t(ids.size()), ids.data(), q_heads, scale,
                                  q.bits.data(), out.data(), nullptr),
              KVC_SUCCESS)
        << kvc_last_error();
    for (size_t b = 0; b < ids.size(); ++b) {
      const auto& [k, v] = read[ids[b]];
      const size_t len = k.size() / row;
      for (int32_t qh = 0; qh < q_heads; ++qh) {
        const int32_t h = qh / 2;
        const float* qv = &q.values[(b * size_t(q_heads) + size_t(qh)) * size_t(sh.dim)];
        std::vector<double> w(len);
        double top = -INFINITY, sum = 0;
        for (size_t t = 0; t < len; ++t) {
          double dot = 0;
          for (int d = 0; d < sh.dim; ++d)
            dot += double(qv[d]) * k[t * row + size_t(h * sh.dim + d)];
          w[t] = scale * dot;
          top = std::max(top, w[t]);
        }
        for (double& x : w) sum += (x = std::exp(x - top));
        for (int d = 0; d < sh.dim; ++d) {
          double ref = 0;
          for (size_t t = 0; t < len; ++t) ref += w[t] * v[t * row + size_t(h * sh.dim + d)];
          ref = len ? ref / sum : 0.0;
          const float got = format::half_to_float(
              out[(b * size_t(q_heads) + size_t(qh)) * size_t(sh.dim) + size_t(d)]);
          ASSERT_LE(std::fabs(got - ref), 1e-6 + output_half_ulp(KVC_DTYPE_FP16, float(ref)))
              << where << " attention seq " << ids[b] << " head " << qh << " dim " << d;
        }
      }
    }
  }
}

TEST(Store, ModelBasedRandomOperations) {
  const Shape sh;
  // Room for a few hundred blocks: page exhaustion happens along the way.
  StoreHandle store(store_config(sh, 48 * 1024, 2048));
  Shadow shadow{sh, {}, {}};
  std::mt19937 rng(2024);
  const size_t row = size_t(sh.heads * sh.dim);
  int out_of_pages = 0, restored = 0;
  for (int step = 0; step < 400; ++step) {
    const int op = int(rng() % 10);
    const std::string where = "step " + std::to_string(step) + " op " + std::to_string(op);
    std::vector<int32_t> live;
    for (const auto& [id, layers] : shadow.k) live.push_back(id);
    if (op == 0 || live.empty()) {  // add
      int32_t id = -1;
      ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
      shadow.k[id].assign(size_t(sh.layers), {});
      shadow.v[id].assign(size_t(sh.layers), {});
    } else if (op <= 2) {  // prefill all layers of one sequence
      const int32_t id = live[rng() % live.size()];
      const size_t n = rng() % 30;
      Rows k = random_rows(rng, n * size_t(sh.layers), sh),
           v = random_rows(rng, n * size_t(sh.layers), sh);
      const auto before = snapshot(store.s, shadow);
      const kvc_status_t st =
          kvc_store_prefill(store.s, id, 0, sh.layers, int32_t(n), k.bits.data(), v.bits.data());
      if (st == KVC_ERROR_OUT_OF_PAGES) {
        ++out_of_pages;
        ASSERT_EQ(snapshot(store.s, shadow), before)
            << where << ": a failed prefill changed the store";
        continue;
      }
      ASSERT_EQ(st, KVC_SUCCESS) << kvc_last_error();
      for (int l = 0; l < sh.layers; ++l) {
        auto from = k.values.begin() + long(size_t(l) * n * row);
        shadow.k[id][size_t(l)].insert(shadow.k[id][size_t(l)].end(), from, from + long(n * row));
        auto vfrom = v.values.begin() + long(size_t(l) * n * row);
        shadow.v[id][size_t(l)].insert(shadow.v[id][size_t(l)].end(), vfrom, vfrom + long(n * row));
      }
    } else if (op <= 6) {  // decode step: one token to each sequence of a random batch, all layers
      std::vector<int32_t> batch;
      for (int32_t id : live) {
        if (rng() % 3) batch.push_back(id);
      }
      if (batch.empty()) continue;
      for (int l = 0; l < sh.layers; ++l) {
        Rows k = random_rows(rng, batch.size(), sh), v = random_rows(rng, batch.size(), sh);
        const auto before = snapshot(store.s, shadow);
        const kvc_status_t st = kvc_store_append(store.s, l, int32_t(batch.size()), batch.data(),
                                                 k.bits.data(), v.bits.data(), nullptr);
        if (st == KVC_ERROR_OUT_OF_PAGES) {
          ++out_of_pages;
          ASSERT_EQ(snapshot(store.s, shadow), before)
              << where << ": a failed append changed the store";
          // Keep layers in step: undo this step's earlier layers by freeing nothing; the
          // model simply records what the store holds.
          break;
        }
        ASSERT_EQ(st, KVC_SUCCESS) << kvc_last_error();
        for (size_t b = 0; b < batch.size(); ++b) {
          auto& sk = shadow.k[batch[b]][size_t(l)];
          auto& sv = shadow.v[batch[b]][size_t(l)];
          sk.insert(sk.end(), k.values.begin() + long(b * row),
                    k.values.begin() + long((b + 1) * row));
          sv.insert(sv.end(), v.values.begin() + long(b * row),
                    v.values.begin() + long((b + 1) * row));
        }
      }
    } else if (op == 7) {  // free
      const int32_t id = live[rng() % live.size()];
      ASSERT_EQ(kvc_store_free_sequence(store.s, id), KVC_SUCCESS);
      shadow.k.erase(id);
      shadow.v.erase(id);
    } else {  // serialize, then restore as a new sequence (and sometimes free the original)
      const int32_t id = live[rng() % live.size()];
      size_t n = 0;
      ASSERT_EQ(kvc_store_serialized_size(store.s, id, &n), KVC_SUCCESS);
      std::vector<uint8_t> bytes(n);
      ASSERT_EQ(kvc_store_serialize(store.s, id, bytes.data(), n, &n), KVC_SUCCESS);
      if (op == 9) {
        ASSERT_EQ(kvc_store_free_sequence(store.s, id), KVC_SUCCESS);
      }
      int32_t copy = -1;
      const kvc_status_t st = kvc_store_restore(store.s, bytes.data(), bytes.size(), &copy);
      if (st == KVC_ERROR_OUT_OF_PAGES) {
        ++out_of_pages;
        if (op == 9) {
          shadow.k.erase(id);
          shadow.v.erase(id);
        }
        continue;
      }
      ASSERT_EQ(st, KVC_SUCCESS) << kvc_last_error();
      ++restored;
      shadow.k[copy] = shadow.k[id];
      shadow.v[copy] = shadow.v[id];
      if (op == 9) {
        shadow.k.erase(id);
        shadow.v.erase(id);
      }
    }
    check_against_shadow(store.s, shadow, rng, where);
  }
  EXPECT_GT(out_of_pages, 0) << "the pool never filled: the test did not reach exhaustion";
  EXPECT_GT(restored, 0);
}

TEST(Store, OutOfPagesInTheMiddleOfABatchChangesNothing) {
  Shape sh;
  sh.layers = 1;
  // Page of 1024 bytes: one K and one V block of 8 x 16 fit; capacity: four pages.
  StoreHandle store(store_config(sh, 4 * 1024, 1024));
  Shadow shadow{sh, {}, {}};
  std::mt19937 rng(5);
  std::vector<int32_t> ids(6);
  for (int32_t& id : ids) {
    ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
    shadow.k[id].assign(1, {});
    shadow.v[id].assign(1, {});
  }
  // Fill every tail to T - 1 tokens: the next step compresses a block for every sequence.
  for (int32_t id : ids) {
    Rows k = random_rows(rng, 7, sh), v = random_rows(rng, 7, sh);
    ASSERT_EQ(kvc_store_prefill(store.s, id, 0, 1, 7, k.bits.data(), v.bits.data()), KVC_SUCCESS);
    shadow.k[id][0] = k.values;
    shadow.v[id][0] = v.values;
  }
  const auto before = snapshot(store.s, shadow);
  Rows k = random_rows(rng, ids.size(), sh), v = random_rows(rng, ids.size(), sh);
  EXPECT_EQ(kvc_store_append(store.s, 0, int32_t(ids.size()), ids.data(), k.bits.data(),
                             v.bits.data(), nullptr),
            KVC_ERROR_OUT_OF_PAGES);
  EXPECT_NE(std::string(kvc_last_error()).find("are free"), std::string::npos) << kvc_last_error();
  EXPECT_EQ(snapshot(store.s, shadow), before);
  check_against_shadow(store.s, shadow, rng, "after the failed step");
  // The first four fit.
  EXPECT_EQ(kvc_store_append(store.s, 0, 4, ids.data(), k.bits.data(), v.bits.data(), nullptr),
            KVC_SUCCESS);
}

TEST(Store, PagesReturnExactlyAfterManyOperations) {
  Shape sh;
  sh.layers = 1;
  sh.heads = 1;
  sh.dim = 8;
  sh.tokens = 4;
  StoreHandle store(store_config(sh, 64 * 1024, 512));
  std::mt19937 rng(9);
  kvc_store_stats st = KVC_STORE_STATS_INIT;
  std::vector<int32_t> live;
  const Rows one = random_rows(rng, 1, sh);
  int64_t most_pages = 0;
  for (int op = 0; op < 100000; ++op) {
    if (live.empty() || rng() % 8 == 0) {
      int32_t id;
      ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
      live.push_back(id);
    } else if (rng() % 16 == 0) {
      const size_t i = rng() % live.size();
      ASSERT_EQ(kvc_store_free_sequence(store.s, live[i]), KVC_SUCCESS);
      live.erase(live.begin() + long(i));
    } else {
      const int32_t id = live[rng() % live.size()];
      const kvc_status_t s =
          kvc_store_append(store.s, 0, 1, &id, one.bits.data(), one.bits.data(), nullptr);
      ASSERT_TRUE(s == KVC_SUCCESS || s == KVC_ERROR_OUT_OF_PAGES) << kvc_last_error();
    }
    if (op % 1000 == 0) {
      ASSERT_EQ(kvc_store_get_stats(store.s, &st), KVC_SUCCESS);
      most_pages = std::max(most_pages, st.pages_in_use);
    }
  }
  for (int32_t id : live) ASSERT_EQ(kvc_store_free_sequence(store.s, id), KVC_SUCCESS);
  ASSERT_EQ(kvc_store_get_stats(store.s, &st), KVC_SUCCESS);
  EXPECT_EQ(st.pages_in_use, 0);
  EXPECT_EQ(st.num_sequences, 0);
  EXPECT_GT(most_pages, st.pages_total / 2) << "the pool was never under pressure";
  // Every page is usable again: fill the whole pool with one sequence.
  int32_t id;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  while (kvc_store_append(store.s, 0, 1, &id, one.bits.data(), one.bits.data(), nullptr) ==
         KVC_SUCCESS) {
  }
  ASSERT_EQ(kvc_store_get_stats(store.s, &st), KVC_SUCCESS);
  EXPECT_EQ(st.pages_in_use, st.pages_total);
}

TEST(Store, SerializedSequencesRejectDamageAndMismatchAndChangeNothing) {
  const Shape sh;
  StoreHandle store(store_config(sh, 1 << 20));
  std::mt19937 rng(3);
  int32_t id;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  Rows k = random_rows(rng, 21 * 2, sh), v = random_rows(rng, 21 * 2, sh);
  ASSERT_EQ(kvc_store_prefill(store.s, id, 0, 2, 21, k.bits.data(), v.bits.data()), KVC_SUCCESS);
  size_t n = 0;
  ASSERT_EQ(kvc_store_serialized_size(store.s, id, &n), KVC_SUCCESS);
  std::vector<uint8_t> good(n);
  ASSERT_EQ(kvc_store_serialize(store.s, id, good.data(), n, &n), KVC_SUCCESS);
  kvc_store_stats before = KVC_STORE_STATS_INIT, after = KVC_STORE_STATS_INIT;
  ASSERT_EQ(kvc_store_get_stats(store.s, &before), KVC_SUCCESS);
  int32_t copy = -1;
  for (size_t at = 0; at < good.size(); at += 1 + at / 16) {
    std::vector<uint8_t> bad = good;
    bad[at] ^= 0x10;
    const kvc_status_t s = kvc_store_restore(store.s, bad.data(), bad.size(), &copy);
    ASSERT_TRUE(s == KVC_ERROR_CORRUPT_DATA || s == KVC_ERROR_FORMAT_VERSION) << "byte " << at;
  }
  for (size_t cut = 0; cut < good.size(); cut += 7) {
    ASSERT_NE(kvc_store_restore(store.s, good.data(), cut, &copy), KVC_SUCCESS) << cut;
  }
  EXPECT_EQ(copy, -1);
  ASSERT_EQ(kvc_store_get_stats(store.s, &after), KVC_SUCCESS);
  EXPECT_EQ(std::memcmp(&before, &after, sizeof(before)), 0);

  // Another configuration, and a store without the codebooks.
  Shape other = sh;
  other.key_bound = 0.1f;
  StoreHandle different(store_config(other, 1 << 20));
  EXPECT_EQ(kvc_store_restore(different.s, good.data(), good.size(), &copy),
            KVC_ERROR_CONFIG_MISMATCH);
  StoreHandle fresh(store_config(sh, 1 << 20));
  EXPECT_EQ(kvc_store_restore(fresh.s, good.data(), good.size(), &copy),
            KVC_ERROR_CODEBOOK_MISMATCH);
  // Importing the codebooks makes it restorable, bit for bit.
  for (int layer = 0; layer < 2; ++layer) {
    for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
      kvc_codebook_t book = nullptr;
      ASSERT_EQ(kvc_store_get_codebook(store.s, layer, kind, &book), KVC_SUCCESS);
      ASSERT_NE(book, nullptr);
      ASSERT_EQ(kvc_store_set_codebook(fresh.s, layer, kind, book), KVC_SUCCESS);
      kvc_codebook_destroy(book);
    }
  }
  ASSERT_EQ(kvc_store_restore(fresh.s, good.data(), good.size(), &copy), KVC_SUCCESS)
      << kvc_last_error();
  std::vector<uint8_t> again(n);
  ASSERT_EQ(kvc_store_serialize(fresh.s, copy, again.data(), n, &n), KVC_SUCCESS);
  EXPECT_EQ(again, good);
}

TEST(Store, CodebooksFreezeOnceALayerHasBlocks) {
  const Shape sh;
  StoreHandle store(store_config(sh, 1 << 20));
  kvc_codebook_t none = reinterpret_cast<kvc_codebook_t>(0x1);
  ASSERT_EQ(kvc_store_get_codebook(store.s, 0, KVC_KIND_KEY, &none), KVC_SUCCESS);
  EXPECT_EQ(none, nullptr);
  std::mt19937 rng(1);
  int32_t id;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  Rows k = random_rows(rng, 16 * 2, sh), v = random_rows(rng, 16 * 2, sh);
  ASSERT_EQ(kvc_store_prefill(store.s, id, 0, 2, 16, k.bits.data(), v.bits.data()), KVC_SUCCESS);
  kvc_codebook_t book = nullptr;
  ASSERT_EQ(kvc_store_get_codebook(store.s, 1, KVC_KIND_VALUE, &book), KVC_SUCCESS);
  ASSERT_NE(book, nullptr);
  EXPECT_EQ(kvc_store_set_codebook(store.s, 1, KVC_KIND_VALUE, book), KVC_ERROR_INVALID_ARGUMENT);
  kvc_codebook_destroy(book);
}

TEST(Store, ArgumentsAreChecked) {
  const Shape sh;
  kvc_store_config c = store_config(sh, 1 << 20);
  kvc_store_t s = nullptr;
  c.page_bytes = 100;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(kvc_last_error()).find("page_bytes = 100"), std::string::npos);
  c = store_config(sh, 10);
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  c = store_config(sh, 1 << 20);
  c.dtype = KVC_DTYPE_FP32;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  c = store_config(sh, 1 << 20);
  c.backend = KVC_BACKEND_CUDA;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_NOT_SUPPORTED);
  c = store_config(sh, 1 << 20);
  c.head_dim = 0;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(kvc_last_error()).find("store fields"), std::string::npos);
  EXPECT_EQ(s, nullptr);

  StoreHandle store(store_config(sh, 1 << 20));
  int32_t id;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  std::vector<uint16_t> rows(2 * 64 * 32, 0x3C00);
  EXPECT_EQ(kvc_store_prefill(store.s, id + 1, 0, 1, 4, rows.data(), rows.data()),
            KVC_ERROR_UNKNOWN_SEQUENCE);
  EXPECT_EQ(kvc_store_prefill(store.s, id, 1, 2, 4, rows.data(), rows.data()),
            KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(kvc_store_prefill(store.s, id, 0, 1, 4, nullptr, rows.data()), KVC_ERROR_NULL_POINTER);
  const int32_t twice[2] = {id, id};
  EXPECT_EQ(kvc_store_append(store.s, 0, 2, twice, rows.data(), rows.data(), nullptr),
            KVC_ERROR_INVALID_ARGUMENT);
  rows[5] = 0x7E00;  // NaN
  EXPECT_EQ(kvc_store_prefill(store.s, id, 0, 1, 4, rows.data(), rows.data()),
            KVC_ERROR_NONFINITE_INPUT);
  int32_t len = -1;
  ASSERT_EQ(kvc_store_sequence_length(store.s, id, 0, &len), KVC_SUCCESS);
  EXPECT_EQ(len, 0);
  EXPECT_EQ(kvc_store_attention(store.s, 0, 1, &id, 3, 1.0f, rows.data(), rows.data(), nullptr),
            KVC_ERROR_INVALID_ARGUMENT);  // 3 query heads for 2 kv-heads
  EXPECT_EQ(kvc_store_read(store.s, id, 0, KVC_DTYPE_FP16, -1, rows.data(), rows.data()),
            KVC_ERROR_BUFFER_TOO_SMALL);
  EXPECT_EQ(kvc_store_free_sequence(store.s, id), KVC_SUCCESS);
  EXPECT_EQ(kvc_store_free_sequence(store.s, id), KVC_ERROR_UNKNOWN_SEQUENCE);
  EXPECT_EQ(kvc_store_destroy(nullptr), KVC_SUCCESS);
}

}  // namespace
}  // namespace kvc::test

namespace kvc::test {
namespace {

TEST(Store, PageSlackIsSmallAtLongContext) {
  // One layer of a Llama-like cache (8 kv-heads, head_dim 128, T = 64) at 32K tokens, default
  // page size: the partly filled pages cost at most 3% of the compressed bytes.
  kvc_store_config c = KVC_STORE_CONFIG_INIT;
  c.num_kv_heads = 8;
  c.capacity_bytes = int64_t(256) << 20;
  kvc_store_t s = nullptr;
  ASSERT_EQ(kvc_store_create(&c, &s), KVC_SUCCESS) << kvc_last_error();
  int32_t id;
  ASSERT_EQ(kvc_store_add_sequence(s, &id), KVC_SUCCESS);
  const uint32_t chunk = 4096, row = 8 * 128;
  for (uint32_t done = 0; done < 32768; done += chunk) {
    const auto k = bench::synthetic_kv(false, chunk, row, done + 1);
    const auto v = bench::synthetic_kv(true, chunk, row, done + 2);
    std::vector<uint16_t> kb(k.size()), vb(v.size());
    for (size_t i = 0; i < k.size(); ++i) {
      kb[i] = format::float_to_half(k[i]);
      vb[i] = format::float_to_half(v[i]);
    }
    ASSERT_EQ(kvc_store_prefill(s, id, 0, 1, int32_t(chunk), kb.data(), vb.data()), KVC_SUCCESS)
        << kvc_last_error();
  }
  kvc_store_stats st = KVC_STORE_STATS_INIT;
  ASSERT_EQ(kvc_store_get_stats(s, &st), KVC_SUCCESS);
  EXPECT_EQ(st.num_blocks, 32768 / 64 * 8 * 2);
  const double slack = double(st.page_bytes - st.block_bytes) / double(st.block_bytes);
  EXPECT_LE(slack, 0.03) << "pages " << st.page_bytes << " blocks " << st.block_bytes;
  const double total = double(st.page_bytes + st.tail_bytes + st.table_bytes + st.codebook_bytes);
  std::printf(
      "32K tokens, 8 kv-heads x 128, one layer: %.1f bytes/token vs %.0f fp16 "
      "(ratio %.2f, page slack %.2f%%)\n",
      total / 32768, double(st.dense_bytes) / 32768, double(st.dense_bytes) / total, 100 * slack);
  kvc_store_destroy(s);
}

}  // namespace
}  // namespace kvc::test

namespace kvc::test {
namespace {

// Recomputes a serialized sequence's trailing checksum after an edit.
void reseal(std::vector<uint8_t>& bytes) {
  format::store_u32(&bytes[bytes.size() - 4], fnv1a32(bytes.data(), bytes.size() - 4));
}

TEST(Store, RestoreDecodesEveryBlockAndChecksTails) {
  Shape sh;
  sh.layers = 1;
  StoreHandle store(store_config(sh, 1 << 20));
  std::mt19937 rng(4);
  int32_t id;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  Rows k = random_rows(rng, 11, sh), v = random_rows(rng, 11, sh);
  ASSERT_EQ(kvc_store_prefill(store.s, id, 0, 1, 11, k.bits.data(), v.bits.data()), KVC_SUCCESS);
  size_t n = 0;
  ASSERT_EQ(kvc_store_serialized_size(store.s, id, &n), KVC_SUCCESS);
  std::vector<uint8_t> good(n);
  ASSERT_EQ(kvc_store_serialize(store.s, id, good.data(), n, &n), KVC_SUCCESS);
  // Layout: magic, version, 12 fingerprint words, 2 codebook pairs, num_blocks, tail_tokens,
  // then the first block's byte count and the block.
  const size_t first_block = 4 * (2 + 12 + 4 + 2 + 1);
  const kvc_block_info info =
      kvcomp::inspect({good.data() + first_block, good.size() - first_block});
  ASSERT_EQ(info.encoding, KVC_ENCODING_HUFFMAN);
  int32_t copy = -1;
  // Damage behind a valid header, under a valid checksum: sub-stream 0 emptied (its end set to
  // 0, still in order), so its symbols run past it. Only decoding finds that.
  std::vector<uint8_t> bad = good;
  const uint8_t* block = bad.data() + first_block;
  ASSERT_EQ(format::load_u8(block + 6) & 2u, 0u) << "absolute bounds: one f32 step";
  const uint32_t center_bits = format::load_u8(block + 28);
  const size_t ends = first_block + 32 + 4 + (16 * center_bits + 31) / 32 * 4;
  ASSERT_GT(format::load_u16(bad.data() + ends), 0u);
  format::store_u16(bad.data() + ends, 0);
  reseal(bad);
  kvc_block_info parsed = KVC_BLOCK_INFO_INIT;
  ASSERT_EQ(kvc_block_inspect(bad.data() + first_block, info.block_bytes, &parsed), KVC_SUCCESS)
      << "the header still parses";
  EXPECT_EQ(kvc_store_restore(store.s, bad.data(), bad.size(), &copy), KVC_ERROR_CORRUPT_DATA);
  EXPECT_NE(std::string(kvc_last_error()).find("sub-stream"), std::string::npos)
      << kvc_last_error();
  // A NaN in the tail.
  std::vector<uint8_t> nan_tail = good;
  format::store_u16(&nan_tail[nan_tail.size() - 8], 0x7E00);
  reseal(nan_tail);
  EXPECT_EQ(kvc_store_restore(store.s, nan_tail.data(), nan_tail.size(), &copy),
            KVC_ERROR_CORRUPT_DATA);
  EXPECT_EQ(copy, -1);
}

TEST(Store, TailOnlySequencesNeedNoCodebookAndFrozenStaysFrozen) {
  Shape sh;
  sh.layers = 1;
  StoreHandle store(store_config(sh, 1 << 20));
  std::mt19937 rng(6);
  int32_t id;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  Rows k = random_rows(rng, 20, sh), v = random_rows(rng, 20, sh);
  ASSERT_EQ(kvc_store_prefill(store.s, id, 0, 1, 20, k.bits.data(), v.bits.data()), KVC_SUCCESS);
  // A short sequence, only a tail: restorable into a store that has no codebooks.
  int32_t short_id;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &short_id), KVC_SUCCESS);
  ASSERT_EQ(kvc_store_prefill(store.s, short_id, 0, 1, 3, k.bits.data(), v.bits.data()),
            KVC_SUCCESS);
  size_t n = 0;
  ASSERT_EQ(kvc_store_serialized_size(store.s, short_id, &n), KVC_SUCCESS);
  std::vector<uint8_t> bytes(n);
  ASSERT_EQ(kvc_store_serialize(store.s, short_id, bytes.data(), n, &n), KVC_SUCCESS);
  StoreHandle fresh(store_config(sh, 1 << 20));
  int32_t copy = -1;
  EXPECT_EQ(kvc_store_restore(fresh.s, bytes.data(), bytes.size(), &copy), KVC_SUCCESS)
      << kvc_last_error();
  // Freeing every sequence does not unfreeze the layer's codebooks.
  ASSERT_EQ(kvc_store_free_sequence(store.s, id), KVC_SUCCESS);
  ASSERT_EQ(kvc_store_free_sequence(store.s, short_id), KVC_SUCCESS);
  kvc_codebook_t book = nullptr;
  ASSERT_EQ(kvc_store_get_codebook(store.s, 0, KVC_KIND_KEY, &book), KVC_SUCCESS);
  EXPECT_EQ(kvc_store_set_codebook(store.s, 0, KVC_KIND_KEY, book), KVC_ERROR_INVALID_ARGUMENT);
  kvc_codebook_destroy(book);
}

}  // namespace
}  // namespace kvc::test
