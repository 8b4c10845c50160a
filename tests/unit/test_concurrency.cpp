// SPDX-License-Identifier: Apache-2.0
// The thread safety docs/api.md promises ("Thread safety"): distinct handles are independent,
// and read-only calls may share a codebook. Several threads, each with its own stores, or each
// with its own codec over one shared codebook, must get byte for byte what one thread gets
// alone. The tsan stage of .ci/run runs this program under ThreadSanitizer, which also reports
// any data race between them (state shared behind the handles' backs).
#include <gtest/gtest.h>

#include <thread>

#include "store_model.hpp"

namespace kvc::test {
namespace {

constexpr int kThreads = 4;

std::vector<uint8_t> bytes_of(const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  return std::vector<uint8_t>(b, b + n);
}

void add(std::vector<uint8_t>& to, const std::vector<uint8_t>& more) {
  to.insert(to.end(), more.begin(), more.end());
}

// One thread's whole use of a store of its own (format v1, or tiles served as format v1):
// prefill, decode steps, attention, read-back, serialization, restore into a second store.
// Returns every output; what failed is recorded as gtest failures (thread-safe).
std::vector<uint8_t> store_work(uint32_t seed, bool tiles) {
  Shape sh;
  if (tiles) sh.tokens = 16;
  kvc_store_config c = store_config(sh, 1 << 20, 1024);
  if (tiles) {
    c.block_format = KVC_BLOCK_FORMAT_TILES;
    c.serialized_block_format = KVC_BLOCK_FORMAT_V1;
  }
  StoreHandle store(c), copy(c);
  std::mt19937 rng(seed);
  std::vector<uint8_t> out;
  int32_t ids[2] = {-1, -1};
  for (int32_t& id : ids) {
    Rows k, v;
    add_prefilled(store.s, rng, sh, 2 * size_t(sh.tokens) + 5, id, k, v);
  }
  for (int step = 0; step < sh.tokens + 3; ++step) {
    for (int32_t layer = 0; layer < sh.layers; ++layer) {
      const Rows k = random_rows(rng, 2, sh), v = random_rows(rng, 2, sh);
      EXPECT_EQ(kvc_store_append(store.s, layer, 2, ids, k.bits.data(), v.bits.data(), nullptr),
                KVC_SUCCESS)
          << kvc_last_error();
    }
  }
  const int32_t q_heads = sh.heads * sh.group;
  std::vector<uint16_t> q(size_t(2) * q_heads * sh.dim), o(q.size());
  for (auto& x : q) x = format::float_to_half(std::normal_distribution<float>()(rng));
  for (int32_t layer = 0; layer < sh.layers; ++layer) {
    EXPECT_EQ(
        kvc_store_attention(store.s, layer, 2, ids, q_heads, 0.25f, q.data(), o.data(), nullptr),
        KVC_SUCCESS)
        << kvc_last_error();
    add(out, bytes_of(o.data(), o.size() * 2));
  }
  int32_t length = 0;
  EXPECT_EQ(kvc_store_sequence_length(store.s, ids[0], 0, &length), KVC_SUCCESS);
  std::vector<float> rk(size_t(length) * sh.row()), rv(rk.size());
  EXPECT_EQ(
      kvc_store_read(store.s, ids[0], 1, KVC_DTYPE_FP32, length, rk.data(), rv.data(), nullptr),
      KVC_SUCCESS)
      << kvc_last_error();
  add(out, bytes_of(rk.data(), rk.size() * 4));
  add(out, bytes_of(rv.data(), rv.size() * 4));
  std::vector<uint8_t> serialized, again;
  serialize_sequence(store.s, ids[1], serialized);
  // A store without codebooks takes the writer's first (format v1 holds Huffman blocks).
  for (int32_t layer = 0; layer < sh.layers && !tiles; ++layer) {
    for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
      kvc_codebook_t book = nullptr;
      EXPECT_EQ(kvc_store_get_codebook(store.s, layer, kind, &book), KVC_SUCCESS);
      EXPECT_EQ(kvc_store_set_codebook(copy.s, layer, kind, book), KVC_SUCCESS) << kvc_last_error();
      kvc_codebook_destroy(book);
    }
  }
  int32_t restored = -1;
  EXPECT_EQ(kvc_store_restore(copy.s, serialized.data(), serialized.size(), &restored), KVC_SUCCESS)
      << kvc_last_error();
  serialize_sequence(copy.s, restored, again);
  EXPECT_EQ(again, serialized) << "a restored sequence serializes to other bytes";
  add(out, serialized);
  EXPECT_EQ(kvc_store_free_sequence(store.s, ids[0], nullptr), KVC_SUCCESS);
  return out;
}

TEST(Concurrency, StoresOnDifferentThreadsAreIndependent) {
  for (const bool tiles : {false, true}) {
    SCOPED_TRACE(tiles ? "tiles served as format v1" : "format v1");
    std::vector<std::vector<uint8_t>> alone(kThreads), together(kThreads);
    for (int t = 0; t < kThreads; ++t) alone[t] = store_work(100 + t, tiles);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] { together[t] = store_work(100 + t, tiles); });
    }
    for (auto& th : threads) th.join();
    for (int t = 0; t < kThreads; ++t) {
      EXPECT_FALSE(alone[t].empty());
      EXPECT_EQ(together[t], alone[t]) << "thread " << t;
    }
  }
}

// Codecs over one codebook, one per thread, encoding and decoding at the same time while the
// codebook is queried and serialized.
TEST(Concurrency, CodecsSharingACodebookRunConcurrently) {
  const Shape sh;  // rows of heads x dim = 32 elements: a 64 x 64 block is 128 of them
  std::mt19937 rng(7);
  std::vector<Rows> blocks;
  for (int b = 0; b < 8; ++b) blocks.push_back(random_rows(rng, 128, sh));
  kvc_codec_config cc = make_config(KVC_KIND_KEY, 64, 64, KVC_BOUND_RELATIVE, 0.05f);
  kvc_codec_t plain = nullptr;
  ASSERT_EQ(kvc_codec_create(&cc, nullptr, &plain), KVC_SUCCESS);
  kvc_histogram_t hist = nullptr;
  ASSERT_EQ(kvc_histogram_create(&hist), KVC_SUCCESS);
  const void* first = blocks[0].bits.data();
  ASSERT_EQ(kvc_codec_histogram(plain, 1, &first, 64, KVC_DTYPE_FP16, hist, nullptr), KVC_SUCCESS);
  kvc_codebook_t book = nullptr;
  ASSERT_EQ(kvc_codebook_build(hist, nullptr, &book), KVC_SUCCESS);
  kvc_histogram_destroy(hist);
  kvc_codec_destroy(plain);

  auto work = [&](int t) {
    std::vector<uint8_t> out;
    kvc_codec_t codec = nullptr;
    EXPECT_EQ(kvc_codec_create(&cc, book, &codec), KVC_SUCCESS) << kvc_last_error();
    size_t cap = 0;
    EXPECT_EQ(kvc_codec_max_block_bytes(codec, KVC_DTYPE_FP16, &cap), KVC_SUCCESS);
    std::vector<uint8_t> block(cap);
    std::vector<float> decoded(64 * 64);
    for (int round = 0; round < 4; ++round) {
      const void* src = blocks[size_t(t + round) % blocks.size()].bits.data();
      void* dst = block.data();
      uint32_t written = 0;
      EXPECT_EQ(kvc_codec_encode(codec, 1, &src, 64, KVC_DTYPE_FP16, &dst, cap, &written, nullptr),
                KVC_SUCCESS);
      const void* in = block.data();
      void* to = decoded.data();
      EXPECT_EQ(
          kvc_codec_decode(codec, 1, &in, &written, KVC_DTYPE_FP32, &to, 64, nullptr, nullptr),
          KVC_SUCCESS);
      add(out, bytes_of(block.data(), written));
      add(out, bytes_of(decoded.data(), decoded.size() * 4));
      size_t size = 0;
      uint32_t id = 0;
      int32_t length = 0;
      EXPECT_EQ(kvc_codebook_serialized_size(book, &size), KVC_SUCCESS);
      std::vector<uint8_t> serialized(size);
      EXPECT_EQ(kvc_codebook_serialize(book, serialized.data(), size, &size), KVC_SUCCESS);
      EXPECT_EQ(kvc_codebook_id(book, &id), KVC_SUCCESS);
      EXPECT_EQ(kvc_codebook_code_length(book, round, &length), KVC_SUCCESS);
      add(out, serialized);
    }
    kvc_codec_destroy(codec);
    return out;
  };
  std::vector<std::vector<uint8_t>> alone(kThreads), together(kThreads);
  for (int t = 0; t < kThreads; ++t) alone[t] = work(t);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back([&, t] { together[t] = work(t); });
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(together[t], alone[t]) << "thread " << t;
  kvc_codebook_destroy(book);
}

}  // namespace
}  // namespace kvc::test
