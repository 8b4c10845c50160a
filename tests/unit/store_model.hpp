// SPDX-License-Identifier: Apache-2.0
// The model-based test of the paged store, shared by the CPU and the GPU suites: random add,
// prefill, decode-append, free and serialize+restore over many sequences, checked after every
// step against a dense shadow (lengths, read-back within the bound, exact tails, attention
// against a double-precision reference; a failed operation leaves the store unchanged).
// The store's data calls go through a StoreBackend, so one driver runs on the CPU backend (host
// pointers, below) and on the CUDA backend (device copies and a stream, in the GPU suite: these
// tests need no CUDA header).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "test_support.hpp"

namespace kvc::test {

struct Shape {
  int32_t layers = 2, heads = 2, dim = 16, tokens = 8;
  int32_t group = 2;  // query heads per kv-head in the attention checks (GQA)
  float key_bound = 0.05f, value_bound = 0.02f;
  size_t row() const { return size_t(heads) * size_t(dim); }  // elements of one token
};

// A CPU store of the shape with absolute bounds; callers set the backend and the limits.
inline kvc_store_config store_config(const Shape& s, int64_t capacity, int32_t page_bytes = 0) {
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
  StoreHandle(const StoreHandle&) = delete;
  StoreHandle& operator=(const StoreHandle&) = delete;
};

// fp16 rows [n, heads, dim] from floats, and their exact values.
struct Rows {
  std::vector<uint16_t> bits;
  std::vector<float> values;
};
inline Rows random_rows(std::mt19937& rng, size_t n, const Shape& s) {
  Rows r;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t i = 0; i < n * s.row(); ++i) {
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
    return k.at(id)[size_t(layer)].size() / shape.row();
  }
  void add_sequence(int32_t id) {
    k[id].assign(size_t(shape.layers), {});
    v[id].assign(size_t(shape.layers), {});
  }
  // Appends n rows of (keys, values), starting at row `first`, to (id, layer).
  void append(int32_t id, int layer, const Rows& keys, const Rows& values, size_t first, size_t n) {
    const long from = long(first * shape.row()), to = long((first + n) * shape.row());
    auto& sk = k.at(id)[size_t(layer)];
    auto& sv = v.at(id)[size_t(layer)];
    sk.insert(sk.end(), keys.values.begin() + from, keys.values.begin() + to);
    sv.insert(sv.end(), values.values.begin() + from, values.values.begin() + to);
  }
  void erase(int32_t id) {
    k.erase(id);
    v.erase(id);
  }
};

// The store's data calls with host tensors (fp16 rows, fp32 read-back); a backend moves them
// to where its store needs them and returns the operation's status, data errors included.
class StoreBackend {
 public:
  virtual ~StoreBackend() = default;
  virtual kvc_backend backend() const = 0;
  // h_keys, h_values: [num_layers, num_tokens, heads, dim] fp16.
  virtual kvc_status_t prefill(kvc_store_t s, int32_t id, int32_t first_layer, int32_t num_layers,
                               int32_t num_tokens, const uint16_t* h_keys,
                               const uint16_t* h_values) = 0;
  // h_keys, h_values: [ids.size(), heads, dim] fp16.
  virtual kvc_status_t append(kvc_store_t s, int32_t layer, const std::vector<int32_t>& ids,
                              const uint16_t* h_keys, const uint16_t* h_values) = 0;
  // h_keys, h_values: [capacity_tokens, heads, dim] fp32.
  virtual kvc_status_t read(kvc_store_t s, int32_t id, int32_t layer, int32_t capacity_tokens,
                            float* h_keys, float* h_values) = 0;
  // h_queries, h_out: [ids.size(), num_q_heads, dim] fp16.
  virtual kvc_status_t attention(kvc_store_t s, int32_t layer, const std::vector<int32_t>& ids,
                                 int32_t num_q_heads, float scale, const uint16_t* h_queries,
                                 uint16_t* h_out) = 0;
  virtual kvc_status_t free_sequence(kvc_store_t s, int32_t id) = 0;
};

// The CPU backend: host pointers as they are, NULL streams, the call's own status.
class CpuStoreBackend final : public StoreBackend {
 public:
  kvc_backend backend() const override { return KVC_BACKEND_CPU; }
  kvc_status_t prefill(kvc_store_t s, int32_t id, int32_t first_layer, int32_t num_layers,
                       int32_t num_tokens, const uint16_t* h_keys,
                       const uint16_t* h_values) override {
    return kvc_store_prefill(s, id, first_layer, num_layers, num_tokens, h_keys, h_values, nullptr);
  }
  kvc_status_t append(kvc_store_t s, int32_t layer, const std::vector<int32_t>& ids,
                      const uint16_t* h_keys, const uint16_t* h_values) override {
    return kvc_store_append(s, layer, int32_t(ids.size()), ids.data(), h_keys, h_values, nullptr);
  }
  kvc_status_t read(kvc_store_t s, int32_t id, int32_t layer, int32_t capacity_tokens,
                    float* h_keys, float* h_values) override {
    return kvc_store_read(s, id, layer, KVC_DTYPE_FP32, capacity_tokens, h_keys, h_values, nullptr);
  }
  kvc_status_t attention(kvc_store_t s, int32_t layer, const std::vector<int32_t>& ids,
                         int32_t num_q_heads, float scale, const uint16_t* h_queries,
                         uint16_t* h_out) override {
    return kvc_store_attention(s, layer, int32_t(ids.size()), ids.data(), num_q_heads, scale,
                               h_queries, h_out, nullptr);
  }
  kvc_status_t free_sequence(kvc_store_t s, int32_t id) override {
    return kvc_store_free_sequence(s, id, nullptr);
  }
};

inline kvc_store_stats store_stats(kvc_store_t s) {
  kvc_store_stats st = KVC_STORE_STATS_INIT;
  EXPECT_EQ(kvc_store_get_stats(s, &st), KVC_SUCCESS) << kvc_last_error();
  return st;
}

// A new sequence of `s` holding n tokens of layers [0, layers) (keys, values: [layers, n, heads,
// dim] fp16) into `id` (call under ASSERT_NO_FATAL_FAILURE).
inline void add_prefilled(kvc_store_t s, int32_t layers, size_t n, const uint16_t* keys,
                          const uint16_t* values, int32_t& id) {
  ASSERT_EQ(kvc_store_add_sequence(s, &id), KVC_SUCCESS) << kvc_last_error();
  ASSERT_EQ(kvc_store_prefill(s, id, 0, layers, int32_t(n), keys, values, nullptr), KVC_SUCCESS)
      << kvc_last_error();
}
// The same with n random tokens in every layer (sh.layers of them); their rows in k, v.
inline void add_prefilled(kvc_store_t s, std::mt19937& rng, const Shape& sh, size_t n, int32_t& id,
                          Rows& k, Rows& v) {
  k = random_rows(rng, n * size_t(sh.layers), sh);
  v = random_rows(rng, n * size_t(sh.layers), sh);
  add_prefilled(s, sh.layers, n, k.bits.data(), v.bits.data(), id);
}

// One sequence's serialized bytes into `bytes` (call under ASSERT_NO_FATAL_FAILURE).
inline void serialize_sequence(kvc_store_t s, int32_t id, std::vector<uint8_t>& bytes) {
  size_t n = 0;
  ASSERT_EQ(kvc_store_serialized_size(s, id, &n), KVC_SUCCESS) << kvc_last_error();
  bytes.resize(n);
  size_t written = 0;
  ASSERT_EQ(kvc_store_serialize(s, id, bytes.data(), n, &written), KVC_SUCCESS) << kvc_last_error();
  ASSERT_EQ(written, n) << "kvc_store_serialized_size and kvc_store_serialize disagree";
}

// Stats and every sequence's serialized bytes: equal snapshots mean an unchanged store.
// last_append_status and failed_appends are left out: a failed prefill or append that changes
// nothing else records itself there.
inline std::vector<uint8_t> snapshot(kvc_store_t s, const Shadow& shadow) {
  std::vector<uint8_t> out;
  for (const auto& [id, layers] : shadow.k) {
    std::vector<uint8_t> bytes;
    serialize_sequence(s, id, bytes);
    out.insert(out.end(), bytes.begin(), bytes.end());
  }
  kvc_store_stats st = store_stats(s);
  st.last_append_status = 0;
  st.failed_appends = 0;
  const auto* p = reinterpret_cast<const uint8_t*>(&st);
  out.insert(out.end(), p, p + sizeof(st));
  return out;
}

// How close attention must come to the double-precision reference over the read-back K and V:
// |out - ref| <= absolute + relative * max_t |V[t, d]| + half an ulp of the fp16 output at ref.
// The output is a convex combination of the column V[:, d], so rounding in the accumulation
// scales with that column's magnitude, not with |ref| (which cancellation can make tiny).
struct AttentionTolerance {
  double absolute = 1e-6;  // the CPU backend accumulates in double: only the last rounding
  double relative = 0.0;
};

// K and V of one (sequence, layer) as the store reads them back: [length, heads, dim] fp32.
struct ReadBack {
  std::vector<float> k, v;
};

// Reads (id, layer) of a CPU store back as fp32 [n, heads, dim].
inline ReadBack read_back(kvc_store_t s, int32_t id, size_t n, const Shape& sh, int32_t layer = 0) {
  ReadBack r{std::vector<float>(n * sh.row()), std::vector<float>(n * sh.row())};
  EXPECT_EQ(
      kvc_store_read(s, id, layer, KVC_DTYPE_FP32, int32_t(n), r.k.data(), r.v.data(), nullptr),
      KVC_SUCCESS)
      << kvc_last_error();
  return r;
}

// out (fp16 bits) against softmax(scale q K^T) V in double over kv[b], for each batch entry b;
// q and out: [kv.size(), heads * group, dim].
inline void check_attention(const Shape& sh, const std::vector<ReadBack>& kv, const Rows& q,
                            const std::vector<uint16_t>& out, float scale,
                            const AttentionTolerance& tol, const std::string& where,
                            const std::vector<int32_t>& ids) {
  const size_t row = sh.row();
  const int32_t q_heads = sh.heads * sh.group;
  for (size_t b = 0; b < kv.size(); ++b) {
    const std::vector<float>& k = kv[b].k;
    const std::vector<float>& v = kv[b].v;
    const size_t len = k.size() / row;
    for (int32_t qh = 0; qh < q_heads; ++qh) {
      const int32_t h = qh / sh.group;
      const float* qv = &q.values[(b * size_t(q_heads) + size_t(qh)) * size_t(sh.dim)];
      std::vector<double> w(len);
      double top = -INFINITY, sum = 0;
      for (size_t t = 0; t < len; ++t) {
        double dot = 0;
        for (int d = 0; d < sh.dim; ++d) dot += double(qv[d]) * k[t * row + size_t(h * sh.dim + d)];
        w[t] = scale * dot;
        top = std::max(top, w[t]);
      }
      for (double& x : w) sum += (x = std::exp(x - top));
      for (int d = 0; d < sh.dim; ++d) {
        double ref = 0, magnitude = 0;
        for (size_t t = 0; t < len; ++t) {
          const double x = v[t * row + size_t(h * sh.dim + d)];
          ref += w[t] * x;
          magnitude = std::max(magnitude, std::fabs(x));
        }
        ref = len ? ref / sum : 0.0;
        const float got = format::half_to_float(
            out[(b * size_t(q_heads) + size_t(qh)) * size_t(sh.dim) + size_t(d)]);
        ASSERT_LE(std::fabs(got - ref), tol.absolute + tol.relative * magnitude +
                                            output_half_ulp(KVC_DTYPE_FP16, float(ref)))
            << where << " attention seq " << ids[b] << " (length " << len << ") head " << qh
            << " dim " << d << ": got " << got << ", reference " << ref;
      }
    }
  }
}

// Reads every sequence back and checks lengths, the bound (compressed tokens) and exactness
// (tail tokens); then checks attention against a dense reference over the read-back values.
// For a kind a store rotates (kvc_store_config.rotation) the bounds hold in the
// rotated space; what they imply for a row read back (per token and head, D elements) is checked
// instead: its L2 error is at most sqrt(D) * bound (the rotation preserves L2 norms) plus the
// rounding of the rotated row to fp16 (half an ulp per element: <= 2^-11 |x|_2, checked with
// 2^-10 |x|_2 for the fp32 arithmetic), and a tail row's only that rounding.
inline void check_rotated_rows(const Shape& sh, const std::vector<float>& got,
                               const std::vector<float>& want, size_t compressed_rows, float bound,
                               const std::string& what) {
  const size_t rows = want.size() / size_t(sh.dim);
  for (size_t r = 0; r < rows; ++r) {
    double err = 0, norm = 0;
    for (int d = 0; d < sh.dim; ++d) {
      const size_t i = r * size_t(sh.dim) + size_t(d);
      err += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
      norm += double(want[i]) * want[i];
    }
    const double limit = (r < compressed_rows ? std::sqrt(double(sh.dim)) * bound : 0.0) +
                         std::ldexp(std::sqrt(norm), -10) + 1e-6;
    ASSERT_LE(std::sqrt(err), limit) << what << " row " << r << " (token " << r / size_t(sh.heads)
                                     << " head " << r % size_t(sh.heads) << ")";
  }
}

// rotation: the store's kvc_rotation (its rotated kinds are checked as check_rotated_rows says);
// sinks: the store's sink_tokens, read back exactly once a sequence has a block.
inline void check_against_shadow(StoreBackend& be, kvc_store_t s, const Shadow& shadow,
                                 std::mt19937& rng, const std::string& where,
                                 const AttentionTolerance& tol = {},
                                 int32_t rotation = KVC_ROTATION_NONE, uint32_t sinks = 0) {
  const bool rotated_k = rotation == KVC_ROTATION_HADAMARD;
  const bool rotated_v = rotation != KVC_ROTATION_NONE;
  const Shape& sh = shadow.shape;
  const size_t row = sh.row();
  for (int layer = 0; layer < sh.layers; ++layer) {
    std::vector<int32_t> ids;
    std::vector<ReadBack> read;
    for (const auto& [id, layers] : shadow.k) {
      const size_t len = shadow.length(id, layer);
      int32_t got = -1;
      ASSERT_EQ(kvc_store_sequence_length(s, id, layer, &got), KVC_SUCCESS) << kvc_last_error();
      ASSERT_EQ(size_t(got), len) << where << " seq " << id << " layer " << layer;
      ReadBack r{std::vector<float>(len * row), std::vector<float>(len * row)};
      ASSERT_EQ(be.read(s, id, layer, int32_t(len), r.k.data(), r.v.data()), KVC_SUCCESS)
          << where << ": " << kvc_last_error();
      const size_t compressed = len / size_t(sh.tokens) * size_t(sh.tokens) * row;
      const size_t exact_sinks = compressed > 0 ? sinks * row : 0;  // elements
      const auto& xk = shadow.k.at(id)[size_t(layer)];
      const auto& xv = shadow.v.at(id)[size_t(layer)];
      const std::string what =
          where + " seq " + std::to_string(id) + " layer " + std::to_string(layer);
      const size_t rows = compressed / size_t(sh.dim);
      if (rotated_k) {
        ASSERT_NO_FATAL_FAILURE(check_rotated_rows(sh, r.k, xk, rows, sh.key_bound, what + " K"));
      }
      if (rotated_v) {
        ASSERT_NO_FATAL_FAILURE(check_rotated_rows(sh, r.v, xv, rows, sh.value_bound, what + " V"));
      }
      for (size_t i = 0; i < len * row; ++i) {
        const bool bounded = i >= exact_sinks && i < compressed;
        if (!rotated_k) {
          ASSERT_LE(std::fabs(r.k[i] - xk[i]), bounded ? sh.key_bound : 0.0f)
              << what << " K elem " << i;
        }
        if (!rotated_v) {
          ASSERT_LE(std::fabs(r.v[i] - xv[i]), bounded ? sh.value_bound : 0.0f)
              << what << " V elem " << i;
        }
      }
      ids.push_back(id);
      read.push_back(std::move(r));
    }
    if (ids.empty()) continue;
    const int32_t q_heads = sh.heads * sh.group;
    const float scale = 1.0f / std::sqrt(float(sh.dim));
    Rows q = random_rows(rng, ids.size() * size_t(sh.group), sh);
    std::vector<uint16_t> out(q.bits.size(), 0xFFFF);  // poison: NaN unless written
    ASSERT_EQ(be.attention(s, layer, ids, q_heads, scale, q.bits.data(), out.data()), KVC_SUCCESS)
        << where << ": " << kvc_last_error();
    ASSERT_NO_FATAL_FAILURE(check_attention(sh, read, q, out, scale, tol,
                                            where + " layer " + std::to_string(layer), ids));
  }
}

// What the model-based run does: a shape, a pool small enough to run out, the store's limits,
// the number of steps and the attention tolerance of the backend.
struct ModelParams {
  Shape shape;
  int64_t capacity_bytes = 48 * 1024;
  int32_t page_bytes = 2048;
  int32_t max_sequences = 0;         // 0: no limit
  int32_t max_sequence_tokens = 0;   // 0: no limit
  uint32_t max_prefill_tokens = 30;  // a prefill takes [0, max_prefill_tokens) tokens
  int steps = 400;
  uint32_t seed = 2024;
  AttentionTolerance tolerance;
  int32_t block_format = KVC_BLOCK_FORMAT_AUTO;  // TILES: a store of tile blocks (format t1)
  int32_t rotation = KVC_ROTATION_NONE;          // rotated kinds checked as check_rotated_rows says
  int32_t sink_tokens = 0;                       // kvc_store_config.sink_tokens: read back exactly
};

// Random operations against the store and its shadow, checked after every step. With limits set,
// an add at max_sequences must fail with KVC_ERROR_OUT_OF_MEMORY, and a prefill or append that
// takes a (sequence, layer) past max_sequence_tokens must fail (KVC_ERROR_INVALID_ARGUMENT; or
// KVC_ERROR_OUT_OF_PAGES where the pool is also short, the order of the two checks being the
// backend's), each changing nothing.
inline void run_model(StoreBackend& be, const ModelParams& mp) {
  const Shape& sh = mp.shape;
  kvc_store_config config = store_config(sh, mp.capacity_bytes, mp.page_bytes);
  config.backend = be.backend();
  config.max_sequences = mp.max_sequences;
  config.max_sequence_tokens = mp.max_sequence_tokens;
  config.block_format = mp.block_format;
  config.rotation = mp.rotation;
  config.sink_tokens = mp.sink_tokens;
  StoreHandle store(config);
  ASSERT_NE(store.s, nullptr);
  Shadow shadow{sh, {}, {}};
  std::mt19937 rng(mp.seed);
  const auto past_limit = [&](int32_t id, int layer, size_t n) {
    return mp.max_sequence_tokens > 0 &&
           shadow.length(id, layer) + n > size_t(mp.max_sequence_tokens);
  };
  const auto full = [&] {
    return mp.max_sequences > 0 && shadow.k.size() >= size_t(mp.max_sequences);
  };
  int out_of_pages = 0, restored = 0, refused = 0;
  // A prefill or append allowed to fail (out of pages; at a limit, if it would pass one),
  // counted; the caller then checks that it changed nothing.
  const auto counted_failure = [&](kvc_status_t st, bool too_long) {
    int* count = st == KVC_ERROR_OUT_OF_PAGES                   ? &out_of_pages
                 : too_long && st == KVC_ERROR_INVALID_ARGUMENT ? &refused
                                                                : nullptr;
    if (count != nullptr) ++*count;
    return count != nullptr;
  };
  for (int step = 0; step < mp.steps; ++step) {
    const int op = int(rng() % 10);
    const std::string where = "seed " + std::to_string(mp.seed) + " step " + std::to_string(step) +
                              " op " + std::to_string(op);
    std::vector<int32_t> live;
    for (const auto& [id, layers] : shadow.k) live.push_back(id);
    if (op == 0 || live.empty()) {  // add
      int32_t id = -1;
      if (full()) {
        const auto before = snapshot(store.s, shadow);
        ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_ERROR_OUT_OF_MEMORY) << where;
        ASSERT_EQ(snapshot(store.s, shadow), before)
            << where << ": a refused add changed the store";
        ++refused;
      } else {
        ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS)
            << where << ": " << kvc_last_error();
        shadow.add_sequence(id);
      }
    } else if (op <= 2) {  // prefill all layers of one sequence
      const int32_t id = live[rng() % live.size()];
      const size_t n = rng() % mp.max_prefill_tokens;
      Rows k = random_rows(rng, n * size_t(sh.layers), sh),
           v = random_rows(rng, n * size_t(sh.layers), sh);
      bool too_long = false;
      for (int l = 0; l < sh.layers; ++l) too_long = too_long || past_limit(id, l, n);
      const auto before = snapshot(store.s, shadow);
      const kvc_status_t st =
          be.prefill(store.s, id, 0, sh.layers, int32_t(n), k.bits.data(), v.bits.data());
      if (counted_failure(st, too_long)) {
        ASSERT_EQ(snapshot(store.s, shadow), before)
            << where << ": a failed prefill changed the store";
        continue;
      }
      ASSERT_EQ(st, KVC_SUCCESS) << where << ": " << kvc_last_error();
      ASSERT_FALSE(too_long) << where << ": a prefill past max_sequence_tokens succeeded";
      for (int l = 0; l < sh.layers; ++l) shadow.append(id, l, k, v, size_t(l) * n, n);
    } else if (op <= 6) {  // decode step: one token to each sequence of a random batch, all layers
      std::vector<int32_t> batch;
      for (int32_t id : live) {
        if (rng() % 3) batch.push_back(id);
      }
      if (batch.empty()) continue;
      for (int l = 0; l < sh.layers; ++l) {
        Rows k = random_rows(rng, batch.size(), sh), v = random_rows(rng, batch.size(), sh);
        bool too_long = false;
        for (int32_t id : batch) too_long = too_long || past_limit(id, l, 1);
        const auto before = snapshot(store.s, shadow);
        const kvc_status_t st = be.append(store.s, l, batch, k.bits.data(), v.bits.data());
        if (counted_failure(st, too_long)) {
          ASSERT_EQ(snapshot(store.s, shadow), before)
              << where << ": a failed append changed the store";
          // The later layers are not appended: the shadow records what the store holds.
          break;
        }
        ASSERT_EQ(st, KVC_SUCCESS) << where << ": " << kvc_last_error();
        ASSERT_FALSE(too_long) << where << ": an append past max_sequence_tokens succeeded";
        for (size_t b = 0; b < batch.size(); ++b) shadow.append(batch[b], l, k, v, b, 1);
      }
    } else if (op == 7) {  // free
      const int32_t id = live[rng() % live.size()];
      ASSERT_EQ(be.free_sequence(store.s, id), KVC_SUCCESS) << where << ": " << kvc_last_error();
      shadow.erase(id);
    } else {  // serialize, then restore as a new sequence (and sometimes free the original)
      const int32_t id = live[rng() % live.size()];
      std::vector<uint8_t> bytes;
      ASSERT_NO_FATAL_FAILURE(serialize_sequence(store.s, id, bytes)) << where;
      if (op == 9) {
        ASSERT_EQ(be.free_sequence(store.s, id), KVC_SUCCESS) << where << ": " << kvc_last_error();
      }
      // Copied before the original leaves the shadow: the restored sequence holds the same rows.
      const auto k = shadow.k[id], v = shadow.v[id];
      if (op == 9) shadow.erase(id);
      if (!full()) {  // (where the store is full of sequences, restoring is not tried)
        const auto before = snapshot(store.s, shadow);
        int32_t copy = -1;
        const kvc_status_t st = kvc_store_restore(store.s, bytes.data(), bytes.size(), &copy);
        if (st == KVC_ERROR_OUT_OF_PAGES) {
          ++out_of_pages;
          ASSERT_EQ(snapshot(store.s, shadow), before)
              << where << ": a failed restore changed the store";
          continue;
        }
        ASSERT_EQ(st, KVC_SUCCESS) << where << ": " << kvc_last_error();
        ++restored;
        shadow.k[copy] = k;
        shadow.v[copy] = v;
      }
    }
    ASSERT_NO_FATAL_FAILURE(check_against_shadow(be, store.s, shadow, rng, where, mp.tolerance,
                                                 mp.rotation, uint32_t(mp.sink_tokens)));
  }
  EXPECT_GT(out_of_pages, 0) << "the pool never filled: the test did not reach exhaustion";
  EXPECT_GT(restored, 0);
  std::printf("%d steps: %d out of pages, %d restored, %d refused at a limit\n", mp.steps,
              out_of_pages, restored, refused);
}

}  // namespace kvc::test
