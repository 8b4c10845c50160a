// SPDX-License-Identifier: Apache-2.0
// The paged store on the CPU backend, checked against a dense shadow model after every step
// (store_model.hpp): lengths, read-back within the bound, attention against a dense reference,
// all-or-nothing failures (out of pages mid-batch, corrupt serialized input, sequence limits),
// the append record of the stats, and no page leaks.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "codec/codebook.hpp"  // fnv1a32
#include "kernels/common/tile_format.cuh"
#include "kernels/store/next_fit.cuh"
#include "store/store.hpp"  // pad4
#include "store_model.hpp"

namespace kvc::test {
namespace {

TEST(Store, ModelBasedRandomOperations) {
  // The oracle for every backend: 400 steps over a pool of a few hundred blocks (page exhaustion
  // happens along the way), no sequence limits: ModelParams' defaults.
  CpuStoreBackend cpu;
  run_model(cpu, ModelParams{});
}

TEST(Store, ModelBasedRandomOperationsOnTiles) {
  // The same over a store of tile blocks (format t1 needs T and D powers of two >= 16): the
  // bound, exact tails, attention over what it reads back, all-or-nothing, serialize+restore.
  CpuStoreBackend cpu;
  ModelParams mp;
  mp.shape.tokens = 16;
  mp.block_format = KVC_BLOCK_FORMAT_TILES;
  mp.seed = 77;
  run_model(cpu, mp);
}

TEST(Store, TileBlocksAre16ByteMultiplesAndUseNoCodebooks) {
  Shape sh;
  sh.tokens = 32;
  sh.dim = 64;
  kvc_store_config c = store_config(sh, 1 << 20, 8192);
  c.block_format = KVC_BLOCK_FORMAT_TILES;
  c.entropy = KVC_ENTROPY_HUFFMAN;  // ignored by tiles
  c.num_substreams = 3;             // ignored too (it divides no group size)
  StoreHandle store(c);
  ASSERT_NE(store.s, nullptr);
  std::mt19937 rng(4);
  int32_t id = -1;
  Rows k, v;
  ASSERT_NO_FATAL_FAILURE(add_prefilled(store.s, rng, sh, 100, id, k, v));
  const kvc_store_stats st = store_stats(store.s);
  EXPECT_EQ(st.num_blocks, 3 * sh.heads * 2 * sh.layers);
  EXPECT_EQ(st.block_bytes % 16, 0);
  EXPECT_EQ(st.codebook_bytes, 0);
  // Each block a multiple of 16 bytes (so each lands 16-byte aligned in its page): the
  // serialized records say so.
  std::vector<uint8_t> bytes;
  ASSERT_NO_FATAL_FAILURE(serialize_sequence(store.s, id, bytes));
  size_t blocks_seen = 0;
  for (size_t at = 0; at + 8 <= bytes.size(); at += 4) {
    if (format::load_u32(&bytes[at + 4]) == tiles::kMagic) {
      EXPECT_EQ(format::load_u32(&bytes[at]) % 16, 0u) << "record at byte " << at;
      ++blocks_seen;
    }
  }
  EXPECT_EQ(blocks_seen, size_t(st.num_blocks));
  kvc_codebook_t book = nullptr;
  ASSERT_EQ(kvc_store_get_codebook(store.s, 0, KVC_KIND_KEY, &book), KVC_SUCCESS);
  EXPECT_EQ(book, nullptr);
  kvc_histogram_t h = nullptr;
  ASSERT_EQ(kvc_histogram_create(&h), KVC_SUCCESS);
  ASSERT_EQ(kvc_codebook_build(h, nullptr, &book), KVC_SUCCESS);
  EXPECT_EQ(kvc_store_set_codebook(store.s, 1, KVC_KIND_VALUE, book), KVC_ERROR_NOT_SUPPORTED);
  EXPECT_TRUE(last_error_names("no codebooks")) << kvc_last_error();
  kvc_codebook_destroy(book);
  kvc_histogram_destroy(h);
}

TEST(Store, NextFitAlignsBlocksToTheStoresAlignment) {
  // The rule both backends place blocks by (kernels/store/next_fit.cuh).
  EXPECT_EQ(block_alignment(true), 16u);
  EXPECT_EQ(block_alignment(false), 4u);
  uint32_t used = 1024, offset = 7;
  EXPECT_TRUE(place_next_fit(used, 100, 1024, 16, offset));  // no page open yet
  EXPECT_EQ(offset, 0u);
  EXPECT_EQ(used, 100u);
  EXPECT_FALSE(place_next_fit(used, 48, 1024, 16, offset));  // 100 rounds up to 112
  EXPECT_EQ(offset, 112u);
  EXPECT_EQ(used, 160u);
  EXPECT_FALSE(place_next_fit(used, 864, 1024, 16, offset));  // ends exactly at the page end
  EXPECT_EQ(offset, 160u);
  EXPECT_TRUE(place_next_fit(used, 4, 1024, 16, offset));
  EXPECT_EQ(offset, 0u);
  used = 1004;
  EXPECT_TRUE(place_next_fit(used, 20, 1024, 16, offset));  // 1008 + 20 > 1024
  used = 1004;
  EXPECT_FALSE(place_next_fit(used, 20, 1024, 4, offset));  // v1: 4-byte steps, no rounding
  EXPECT_EQ(offset, 1004u);
}

TEST(Store, BlockFormatAndTileShapesAreChecked) {
  Shape sh;
  kvc_store_config c = store_config(sh, 1 << 20);
  kvc_store_t s = nullptr;
  c.block_format = 3;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(last_error_names("block_format")) << kvc_last_error();
  c.block_format = KVC_BLOCK_FORMAT_TILES;  // T = 8: no tile shape
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_NOT_SUPPORTED);
  EXPECT_TRUE(last_error_names("block_format")) << kvc_last_error();
  c.block_tokens = 16;
  c.value_group_size = 8;  // tiles quantize V per whole token
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_NOT_SUPPORTED);
  c.value_group_size = 0;
  c.tile_split_widths = 2;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(last_error_names("tile_split_widths")) << kvc_last_error();
  c.tile_split_widths = 0;
  ASSERT_EQ(kvc_store_create(&c, &s), KVC_SUCCESS) << kvc_last_error();
  kvc_store_destroy(s);
  // num_substreams: checked against the group sizes of a v1 store.
  c = store_config(sh, 1 << 20);
  c.num_substreams = 3;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(last_error_names("num_substreams")) << kvc_last_error();
  c.num_substreams = 4;
  ASSERT_EQ(kvc_store_create(&c, &s), KVC_SUCCESS) << kvc_last_error();
  kvc_store_destroy(s);
}

TEST(Store, FewerSubstreamsGiveSmallerBlocks) {
  // The store used to fix 32 sub-streams; num_substreams lets a CPU store trade them for ratio.
  Shape sh;
  sh.tokens = 64;
  sh.dim = 64;
  sh.layers = 1;
  std::mt19937 rng(12);
  const Rows k = random_rows(rng, 256, sh), v = random_rows(rng, 256, sh);
  int64_t bytes[2] = {};
  for (int i = 0; i < 2; ++i) {
    kvc_store_config c = store_config(sh, 4 << 20);
    c.num_substreams = i == 0 ? 0 : 2;
    StoreHandle store(c);
    int32_t id = -1;
    ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
    ASSERT_EQ(kvc_store_prefill(store.s, id, 0, 1, 256, k.bits.data(), v.bits.data(), nullptr),
              KVC_SUCCESS)
        << kvc_last_error();
    bytes[i] = store_stats(store.s).block_bytes;
  }
  EXPECT_LT(bytes[1], bytes[0]);
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
    ASSERT_EQ(kvc_store_prefill(store.s, id, 0, 1, 7, k.bits.data(), v.bits.data(), nullptr),
              KVC_SUCCESS);
    shadow.k[id][0] = k.values;
    shadow.v[id][0] = v.values;
  }
  const auto before = snapshot(store.s, shadow);
  Rows k = random_rows(rng, ids.size(), sh), v = random_rows(rng, ids.size(), sh);
  EXPECT_EQ(kvc_store_append(store.s, 0, int32_t(ids.size()), ids.data(), k.bits.data(),
                             v.bits.data(), nullptr),
            KVC_ERROR_OUT_OF_PAGES);
  EXPECT_TRUE(last_error_names("are free")) << kvc_last_error();
  EXPECT_EQ(snapshot(store.s, shadow), before);
  CpuStoreBackend cpu;
  check_against_shadow(cpu, store.s, shadow, rng, "after the failed step");
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
      ASSERT_EQ(kvc_store_free_sequence(store.s, live[i], nullptr), KVC_SUCCESS);
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
  for (int32_t id : live) ASSERT_EQ(kvc_store_free_sequence(store.s, id, nullptr), KVC_SUCCESS);
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

// The serialized form pads its byte fields to 4 bytes in size_t: a sequence past 4 GiB (a 70B
// model's at about 52K tokens) keeps every byte (32-bit arithmetic wrapped and cut it to a stub).
TEST(Store, SerializedPaddingHoldsPast4GiB) {
  EXPECT_EQ(pad4(0), 0u);
  EXPECT_EQ(pad4(5), 8u);
  EXPECT_EQ(pad4(0xFFFFFFFDull), 0x100000000ull);
  EXPECT_EQ(pad4((1ull << 32) + 1), (1ull << 32) + 4);
  EXPECT_EQ(pad4((5ull << 32) + 8), (5ull << 32) + 8);
}

TEST(Store, SerializedSequencesRejectDamageAndMismatchAndChangeNothing) {
  const Shape sh;
  StoreHandle store(store_config(sh, 1 << 20));
  std::mt19937 rng(3);
  int32_t id;
  Rows k, v;
  ASSERT_NO_FATAL_FAILURE(add_prefilled(store.s, rng, sh, 21, id, k, v));
  std::vector<uint8_t> good;
  ASSERT_NO_FATAL_FAILURE(serialize_sequence(store.s, id, good));
  size_t n = good.size();
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
  // The field that differs, and both values.
  EXPECT_TRUE(last_error_names("its key_error_bound = 0.05")) << kvc_last_error();
  EXPECT_TRUE(last_error_names("this store's 0.1")) << kvc_last_error();
  Shape heads = sh;
  heads.heads = sh.heads + 1;
  StoreHandle more_heads(store_config(heads, 1 << 20));
  EXPECT_EQ(kvc_store_restore(more_heads.s, good.data(), good.size(), &copy),
            KVC_ERROR_CONFIG_MISMATCH);
  EXPECT_TRUE(last_error_names("its num_kv_heads = 2, this store's 3")) << kvc_last_error();
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
  Rows k, v;
  ASSERT_NO_FATAL_FAILURE(add_prefilled(store.s, rng, sh, 16, id, k, v));
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
  EXPECT_TRUE(last_error_names("page_bytes = 100"));
  c = store_config(sh, 10);
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  c = store_config(sh, 1 << 20);
  c.dtype = KVC_DTYPE_FP32;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  c = store_config(sh, 1 << 20);
  c.backend = KVC_BACKEND_CUDA;  // without max_sequences and max_sequence_tokens
  const kvc_status_t cuda = kvc_store_create(&c, &s);
  // The CUDA store needs both limits; a build without CUDA has no CUDA store at all.
  EXPECT_TRUE(cuda == KVC_ERROR_INVALID_ARGUMENT || cuda == KVC_ERROR_NOT_SUPPORTED)
      << kvc_status_string(cuda) << ": " << kvc_last_error();
  c = store_config(sh, 1 << 20);
  c.max_sequences = -1;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  c = store_config(sh, 1 << 20);
  c.max_sequence_tokens = -1;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  c = store_config(sh, 1 << 20);
  c.head_dim = 0;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(last_error_names("store fields"));
  EXPECT_EQ(s, nullptr);

  StoreHandle store(store_config(sh, 1 << 20));
  int32_t id;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  std::vector<uint16_t> rows(2 * 64 * 32, 0x3C00);
  EXPECT_EQ(kvc_store_prefill(store.s, id + 1, 0, 1, 4, rows.data(), rows.data(), nullptr),
            KVC_ERROR_UNKNOWN_SEQUENCE);
  EXPECT_EQ(kvc_store_prefill(store.s, id, 1, 2, 4, rows.data(), rows.data(), nullptr),
            KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(kvc_store_prefill(store.s, id, 0, 1, 4, nullptr, rows.data(), nullptr),
            KVC_ERROR_NULL_POINTER);
  const int32_t twice[2] = {id, id};
  EXPECT_EQ(kvc_store_append(store.s, 0, 2, twice, rows.data(), rows.data(), nullptr),
            KVC_ERROR_INVALID_ARGUMENT);
  rows[5] = 0x7E00;  // NaN
  EXPECT_EQ(kvc_store_prefill(store.s, id, 0, 1, 4, rows.data(), rows.data(), nullptr),
            KVC_ERROR_NONFINITE_INPUT);
  int32_t len = -1;
  ASSERT_EQ(kvc_store_sequence_length(store.s, id, 0, &len), KVC_SUCCESS);
  EXPECT_EQ(len, 0);
  // Data buffers at an odd address: refused before anything is read or written.
  rows[5] = 0x3C00;
  const auto* odd = reinterpret_cast<const uint8_t*>(rows.data()) + 1;
  EXPECT_EQ(kvc_store_prefill(store.s, id, 0, 1, 4, odd, rows.data(), nullptr),
            KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(last_error_names("keys = ")) << kvc_last_error();
  EXPECT_EQ(kvc_store_append(store.s, 0, 1, &id, rows.data(), odd, nullptr),
            KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(last_error_names("values = ")) << kvc_last_error();
  ASSERT_EQ(kvc_store_sequence_length(store.s, id, 0, &len), KVC_SUCCESS);
  EXPECT_EQ(len, 0) << "a refused call appended";
  ASSERT_EQ(kvc_store_append(store.s, 0, 1, &id, rows.data(), rows.data(), nullptr), KVC_SUCCESS);
  std::vector<uint16_t> out(rows.size(), 0xFFFF);
  auto* odd_out = reinterpret_cast<uint8_t*>(out.data()) + 1;
  EXPECT_EQ(kvc_store_read(store.s, id, 0, KVC_DTYPE_FP16, 1, odd_out, out.data(), nullptr),
            KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(kvc_store_read(store.s, id, 0, KVC_DTYPE_FP32, 1, out.data() + 1, out.data(), nullptr),
            KVC_ERROR_INVALID_ARGUMENT);  // 2-byte aligned, fp32 elements
  EXPECT_EQ(kvc_store_attention(store.s, 0, 1, &id, 2, 1.0f, odd, out.data(), nullptr),
            KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(kvc_store_attention(store.s, 0, 1, &id, 2, 1.0f, rows.data(), odd_out, nullptr),
            KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(last_error_names("out = ")) << kvc_last_error();
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](uint16_t x) { return x == 0xFFFF; }));
  ASSERT_EQ(kvc_store_free_sequence(store.s, id, nullptr), KVC_SUCCESS);
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  EXPECT_EQ(kvc_store_attention(store.s, 0, 1, &id, 3, 1.0f, rows.data(), rows.data(), nullptr),
            KVC_ERROR_INVALID_ARGUMENT);  // 3 query heads for 2 kv-heads
  EXPECT_EQ(kvc_store_read(store.s, id, 0, KVC_DTYPE_FP16, -1, rows.data(), rows.data(), nullptr),
            KVC_ERROR_BUFFER_TOO_SMALL);
  EXPECT_EQ(kvc_store_free_sequence(store.s, id, nullptr), KVC_SUCCESS);
  EXPECT_EQ(kvc_store_free_sequence(store.s, id, nullptr), KVC_ERROR_UNKNOWN_SEQUENCE);
  EXPECT_EQ(kvc_store_destroy(nullptr), KVC_SUCCESS);
}

TEST(Store, AtMostMaxSequencesAreLive) {
  const Shape sh;
  kvc_store_config c = store_config(sh, 1 << 20);
  c.max_sequences = 3;
  StoreHandle store(c);
  std::vector<int32_t> ids(3);
  for (int32_t& id : ids) ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  int32_t extra = -1;
  EXPECT_EQ(kvc_store_add_sequence(store.s, &extra), KVC_ERROR_OUT_OF_MEMORY);
  EXPECT_TRUE(last_error_names("max_sequences")) << kvc_last_error();
  EXPECT_EQ(store_stats(store.s).num_sequences, 3);
  // Freeing one makes room for one more, under a new id.
  ASSERT_EQ(kvc_store_free_sequence(store.s, ids[1], nullptr), KVC_SUCCESS);
  ASSERT_EQ(kvc_store_add_sequence(store.s, &extra), KVC_SUCCESS) << kvc_last_error();
  EXPECT_GT(extra, ids[2]);
  EXPECT_EQ(store_stats(store.s).num_sequences, 3);
  EXPECT_EQ(kvc_store_add_sequence(store.s, &extra), KVC_ERROR_OUT_OF_MEMORY);
}

TEST(Store, NoSequenceGrowsPastMaxSequenceTokens) {
  const Shape sh;  // 2 layers, T = 8
  kvc_store_config c = store_config(sh, 1 << 20);
  c.max_sequence_tokens = 20;
  StoreHandle store(c);
  CpuStoreBackend cpu;
  Shadow shadow{sh, {}, {}};
  std::mt19937 rng(12);
  int32_t a, b;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &a), KVC_SUCCESS);
  ASSERT_EQ(kvc_store_add_sequence(store.s, &b), KVC_SUCCESS);
  shadow.add_sequence(a);
  shadow.add_sequence(b);
  // Layers [first, first + layers) of one sequence; the shadow follows what succeeds.
  const auto prefill = [&](int32_t id, int first, int layers, size_t n) {
    const Rows k = random_rows(rng, n * size_t(layers), sh);
    const Rows v = random_rows(rng, n * size_t(layers), sh);
    const kvc_status_t st = kvc_store_prefill(store.s, id, first, layers, int32_t(n), k.bits.data(),
                                              v.bits.data(), nullptr);
    if (st == KVC_SUCCESS) {
      for (int l = 0; l < layers; ++l) shadow.append(id, first + l, k, v, size_t(l) * n, n);
    }
    return st;
  };
  int32_t failed = 0;
  // A refused call: the status, a message that names the limit, an unchanged store, and a
  // failed append on record.
  const auto refused = [&](kvc_status_t st, const std::vector<uint8_t>& before, const char* what) {
    EXPECT_EQ(st, KVC_ERROR_INVALID_ARGUMENT) << what;
    EXPECT_TRUE(last_error_names("max_sequence_tokens")) << what << ": " << kvc_last_error();
    EXPECT_EQ(snapshot(store.s, shadow), before) << what << " changed the store";
    const kvc_store_stats st_after = store_stats(store.s);
    EXPECT_EQ(st_after.last_append_status, KVC_ERROR_INVALID_ARGUMENT) << what;
    EXPECT_EQ(st_after.failed_appends, ++failed) << what;
  };
  ASSERT_EQ(prefill(a, 0, 2, 15), KVC_SUCCESS) << kvc_last_error();
  auto before = snapshot(store.s, shadow);
  refused(prefill(a, 0, 2, 6), before, "a prefill to 21 tokens");
  refused(prefill(b, 0, 2, 21), before, "a prefill of 21 tokens");
  ASSERT_EQ(prefill(a, 1, 1, 5), KVC_SUCCESS) << "layer 1 at exactly the limit";
  before = snapshot(store.s, shadow);
  refused(prefill(a, 0, 2, 1), before, "a prefill past the limit in layer 1 only (all or none)");
  ASSERT_EQ(prefill(a, 0, 1, 5), KVC_SUCCESS) << "layer 0 at exactly the limit";
  ASSERT_EQ(prefill(b, 0, 2, 3), KVC_SUCCESS);
  // One sequence of a decode batch at the limit fails the whole batch.
  const std::vector<int32_t> batch = {b, a};
  const Rows k = random_rows(rng, 2, sh), v = random_rows(rng, 2, sh);
  before = snapshot(store.s, shadow);
  refused(kvc_store_append(store.s, 0, 2, batch.data(), k.bits.data(), v.bits.data(), nullptr),
          before, "an append past the limit");
  ASSERT_EQ(kvc_store_append(store.s, 0, 1, &b, k.bits.data(), v.bits.data(), nullptr),
            KVC_SUCCESS);
  shadow.append(b, 0, k, v, 0, 1);
  EXPECT_EQ(store_stats(store.s).last_append_status, KVC_SUCCESS);
  check_against_shadow(cpu, store.s, shadow, rng, "at the limit");
}

TEST(Store, StatsRecordTheLatestAppendStatusAndCountFailures) {
  Shape sh;
  sh.layers = 1;
  // Pages of 1024 bytes, four of them: a block step of six sequences does not fit, four do.
  StoreHandle store(store_config(sh, 4 * 1024, 1024));
  std::mt19937 rng(8);
  kvc_store_stats st = store_stats(store.s);
  EXPECT_EQ(st.last_append_status, KVC_SUCCESS);
  EXPECT_EQ(st.failed_appends, 0);
  std::vector<int32_t> ids(6);
  for (int32_t& id : ids) {
    ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
    const Rows k = random_rows(rng, 7, sh), v = random_rows(rng, 7, sh);
    ASSERT_EQ(kvc_store_prefill(store.s, id, 0, 1, 7, k.bits.data(), v.bits.data(), nullptr),
              KVC_SUCCESS);
  }
  st = store_stats(store.s);
  EXPECT_EQ(st.last_append_status, KVC_SUCCESS);
  EXPECT_EQ(st.failed_appends, 0);

  const Rows k = random_rows(rng, ids.size(), sh), v = random_rows(rng, ids.size(), sh);
  ASSERT_EQ(kvc_store_append(store.s, 0, int32_t(ids.size()), ids.data(), k.bits.data(),
                             v.bits.data(), nullptr),
            KVC_ERROR_OUT_OF_PAGES);
  st = store_stats(store.s);
  EXPECT_EQ(st.last_append_status, KVC_ERROR_OUT_OF_PAGES);
  EXPECT_EQ(st.failed_appends, 1);
  ASSERT_EQ(kvc_store_append(store.s, 0, 4, ids.data(), k.bits.data(), v.bits.data(), nullptr),
            KVC_SUCCESS);
  st = store_stats(store.s);
  EXPECT_EQ(st.last_append_status, KVC_SUCCESS);
  EXPECT_EQ(st.failed_appends, 1) << "a success keeps the count";

  // A NaN in a prefill (of a tail only: no page is needed) is a failed append too.
  int32_t fresh;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &fresh), KVC_SUCCESS);
  Rows nan = random_rows(rng, 2, sh);
  nan.bits[3] = 0x7E00;
  ASSERT_EQ(kvc_store_prefill(store.s, fresh, 0, 1, 2, nan.bits.data(), nan.bits.data(), nullptr),
            KVC_ERROR_NONFINITE_INPUT);
  st = store_stats(store.s);
  EXPECT_EQ(st.last_append_status, KVC_ERROR_NONFINITE_INPUT);
  EXPECT_EQ(st.failed_appends, 2);

  // Calls that fail their argument checks never ran as appends: the record stays.
  void* const stream = reinterpret_cast<void*>(uintptr_t{0x1000});
  EXPECT_EQ(kvc_store_append(store.s, 0, 1, &fresh, k.bits.data(), v.bits.data(), stream),
            KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(kvc_store_prefill(store.s, fresh, 1, 1, 1, k.bits.data(), v.bits.data(), nullptr),
            KVC_ERROR_INVALID_ARGUMENT);  // layer 1 of a one-layer store
  st = store_stats(store.s);
  EXPECT_EQ(st.last_append_status, KVC_ERROR_NONFINITE_INPUT);
  EXPECT_EQ(st.failed_appends, 2);

  ASSERT_EQ(kvc_store_prefill(store.s, fresh, 0, 1, 1, k.bits.data(), v.bits.data(), nullptr),
            KVC_SUCCESS);
  st = store_stats(store.s);
  EXPECT_EQ(st.last_append_status, KVC_SUCCESS);
  EXPECT_EQ(st.failed_appends, 2);
}

TEST(Store, BatchesTakeAtMostMaxBatchSequences) {
  Shape sh;
  sh.layers = 1;
  StoreHandle store(store_config(sh, 1 << 20));
  std::vector<int32_t> ids(KVC_STORE_MAX_BATCH + 1);
  for (int32_t& id : ids) ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  std::mt19937 rng(14);
  const Rows k = random_rows(rng, ids.size(), sh), v = random_rows(rng, ids.size(), sh);
  const Rows q = random_rows(rng, ids.size() * size_t(sh.group), sh);
  std::vector<uint16_t> out(q.bits.size());
  const int32_t q_heads = sh.heads * sh.group;
  EXPECT_EQ(kvc_store_append(store.s, 0, int32_t(ids.size()), ids.data(), k.bits.data(),
                             v.bits.data(), nullptr),
            KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(kvc_store_attention(store.s, 0, int32_t(ids.size()), ids.data(), q_heads, 1.0f,
                                q.bits.data(), out.data(), nullptr),
            KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(store_stats(store.s).failed_appends, 0) << "an argument error is no failed append";
  EXPECT_EQ(kvc_store_append(store.s, 0, KVC_STORE_MAX_BATCH, ids.data(), k.bits.data(),
                             v.bits.data(), nullptr),
            KVC_SUCCESS)
      << kvc_last_error();
  EXPECT_EQ(kvc_store_attention(store.s, 0, KVC_STORE_MAX_BATCH, ids.data(), q_heads, 1.0f,
                                q.bits.data(), out.data(), nullptr),
            KVC_SUCCESS)
      << kvc_last_error();
}

TEST(Store, CpuBackendRejectsAStream) {
  const Shape sh;
  StoreHandle store(store_config(sh, 1 << 20));
  CpuStoreBackend cpu;
  Shadow shadow{sh, {}, {}};
  std::mt19937 rng(13);
  int32_t id;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  shadow.add_sequence(id);
  const Rows k = random_rows(rng, 2 * 10, sh), v = random_rows(rng, 2 * 10, sh);
  ASSERT_EQ(kvc_store_prefill(store.s, id, 0, 2, 10, k.bits.data(), v.bits.data(), nullptr),
            KVC_SUCCESS);
  for (int l = 0; l < 2; ++l) shadow.append(id, l, k, v, size_t(l) * 10, 10);

  void* const stream = reinterpret_cast<void*>(uintptr_t{0x1000});
  const kvc_store_stats stats_before = store_stats(store.s);
  const auto before = snapshot(store.s, shadow);
  const auto rejected = [&](kvc_status_t st, const char* call) {
    EXPECT_EQ(st, KVC_ERROR_INVALID_ARGUMENT) << call;
    EXPECT_TRUE(last_error_names("stream")) << call << ": " << kvc_last_error();
  };
  rejected(kvc_store_prefill(store.s, id, 0, 2, 10, k.bits.data(), v.bits.data(), stream),
           "kvc_store_prefill");
  rejected(kvc_store_append(store.s, 0, 1, &id, k.bits.data(), v.bits.data(), stream),
           "kvc_store_append");
  std::vector<float> rk(10 * sh.row()), rv(10 * sh.row());
  rejected(kvc_store_read(store.s, id, 0, KVC_DTYPE_FP32, 10, rk.data(), rv.data(), stream),
           "kvc_store_read");
  std::vector<uint16_t> q(size_t(sh.group) * sh.row(), 0x3C00), out(q.size());
  rejected(kvc_store_attention(store.s, 0, 1, &id, sh.heads * sh.group, 1.0f, q.data(), out.data(),
                               stream),
           "kvc_store_attention");
  rejected(kvc_store_free_sequence(store.s, id, stream), "kvc_store_free_sequence");
  EXPECT_EQ(snapshot(store.s, shadow), before) << "a rejected call changed the store";
  const kvc_store_stats stats_after = store_stats(store.s);
  EXPECT_EQ(stats_after.last_append_status, stats_before.last_append_status);
  EXPECT_EQ(stats_after.failed_appends, stats_before.failed_appends);
  check_against_shadow(cpu, store.s, shadow, rng, "after the rejected calls");
}

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
    const auto kb = bench::synthetic_fp16_blocks(false, 1, chunk, row, done + 1);
    const auto vb = bench::synthetic_fp16_blocks(true, 1, chunk, row, done + 2);
    ASSERT_EQ(kvc_store_prefill(s, id, 0, 1, int32_t(chunk), kb.data(), vb.data(), nullptr),
              KVC_SUCCESS)
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
  Rows k, v;
  ASSERT_NO_FATAL_FAILURE(add_prefilled(store.s, rng, sh, 11, id, k, v));
  std::vector<uint8_t> good;
  ASSERT_NO_FATAL_FAILURE(serialize_sequence(store.s, id, good));
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
  EXPECT_TRUE(last_error_names("sub-stream")) << kvc_last_error();
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
  Rows k, v;
  ASSERT_NO_FATAL_FAILURE(add_prefilled(store.s, rng, sh, 20, id, k, v));
  // A short sequence, only a tail: restorable into a store that has no codebooks.
  int32_t short_id;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &short_id), KVC_SUCCESS);
  ASSERT_EQ(kvc_store_prefill(store.s, short_id, 0, 1, 3, k.bits.data(), v.bits.data(), nullptr),
            KVC_SUCCESS);
  std::vector<uint8_t> bytes;
  ASSERT_NO_FATAL_FAILURE(serialize_sequence(store.s, short_id, bytes));
  StoreHandle fresh(store_config(sh, 1 << 20));
  int32_t copy = -1;
  EXPECT_EQ(kvc_store_restore(fresh.s, bytes.data(), bytes.size(), &copy), KVC_SUCCESS)
      << kvc_last_error();
  // Freeing every sequence does not unfreeze the layer's codebooks.
  ASSERT_EQ(kvc_store_free_sequence(store.s, id, nullptr), KVC_SUCCESS);
  ASSERT_EQ(kvc_store_free_sequence(store.s, short_id, nullptr), KVC_SUCCESS);
  kvc_codebook_t book = nullptr;
  ASSERT_EQ(kvc_store_get_codebook(store.s, 0, KVC_KIND_KEY, &book), KVC_SUCCESS);
  EXPECT_EQ(kvc_store_set_codebook(store.s, 0, KVC_KIND_KEY, book), KVC_ERROR_INVALID_ARGUMENT);
  kvc_codebook_destroy(book);
}

}  // namespace
}  // namespace kvc::test
