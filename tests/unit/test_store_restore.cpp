// SPDX-License-Identifier: Apache-2.0
// kvc_store_restore on crafted input: genuine serialized sequences edited field by field and
// resealed (their FNV-1a checksum recomputed, as anyone can), so that only the checks behind the
// checksum stand between the bytes and the store. Each must be rejected with a status and leave
// every other sequence, the pages and the codebooks as they were (docs/format.md §16.5).
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "cpu/tile_codec_cpu.hpp"
#include "store_model.hpp"
#include "tests/fuzz/serialized_sequence.hpp"

namespace kvc::test {
namespace {

using kvc_fuzz::SerialSequence;

// One layer, one kv-head of 16 channels, 8-token blocks: fp16 blocks of at most 32 + 256 bytes,
// so the smallest page is 512 bytes.
Shape small_shape() {
  Shape sh;
  sh.layers = 1;
  sh.heads = 1;
  sh.dim = 16;
  sh.tokens = 8;
  return sh;
}

// A store of the shape that writes fixed-width and raw blocks only (needs no codebook).
kvc_store_config fixed_config(const Shape& sh, int64_t capacity, int32_t page_bytes = 0) {
  kvc_store_config c = store_config(sh, capacity, page_bytes);
  c.entropy = KVC_ENTROPY_FIXED;
  return c;
}

// A sequence of n tokens of `rows` (or random ones) in a new sequence of s; its serialized bytes.
std::vector<uint8_t> sequence_bytes(kvc_store_t s, const Shape& sh, const Rows& k, const Rows& v,
                                    size_t n, int32_t* id_out = nullptr) {
  int32_t id = -1;
  EXPECT_EQ(kvc_store_add_sequence(s, &id), KVC_SUCCESS);
  EXPECT_EQ(
      kvc_store_prefill(s, id, 0, sh.layers, int32_t(n), k.bits.data(), v.bits.data(), nullptr),
      KVC_SUCCESS)
      << kvc_last_error();
  std::vector<uint8_t> bytes;
  serialize_sequence(s, id, bytes);
  if (id_out != nullptr) *id_out = id;
  return bytes;
}

SerialSequence parsed(const std::vector<uint8_t>& bytes) {
  auto s = SerialSequence::parse(bytes.data(), bytes.size());
  EXPECT_TRUE(s.has_value());
  return s.value_or(SerialSequence{});
}

// A codec config for [T, D] blocks of the shape, of one kind and bound.
kvc_codec_config block_config(const Shape& sh, int32_t kind, int32_t bound_mode, float bound) {
  kvc_codec_config c = KVC_CODEC_CONFIG_INIT;
  c.kind = kind;
  c.num_tokens = sh.tokens;
  c.head_dim = sh.dim;
  c.bound_mode = bound_mode;
  c.error_bound = bound;
  return c;
}

// One block [T, D] of `dtype` from dense values through a codec of config c and codebook book.
std::vector<uint8_t> encode_with(const kvc_codec_config& c, kvc_codebook_t book, const Shape& sh,
                                 kvc_dtype dtype, const std::vector<float>& dense) {
  kvc_codec_t codec = nullptr;
  EXPECT_EQ(kvc_codec_create(&c, book, &codec), KVC_SUCCESS) << kvc_last_error();
  const Block in = make_block(dtype, uint32_t(sh.tokens), uint32_t(sh.dim), sh.dim, dense);
  size_t max_bytes = 0;
  EXPECT_EQ(kvc_codec_max_block_bytes(codec, dtype, &max_bytes), KVC_SUCCESS);
  std::vector<uint32_t> words((max_bytes + 3) / 4);
  const void* src[1] = {in.data()};
  void* dst[1] = {words.data()};
  uint32_t n = 0;
  EXPECT_EQ(kvc_codec_encode(codec, 1, src, sh.dim, dtype, dst, max_bytes, &n, nullptr),
            KVC_SUCCESS)
      << kvc_last_error();
  kvc_codec_destroy(codec);
  const auto* p = reinterpret_cast<const uint8_t*>(words.data());
  return std::vector<uint8_t>(p, p + n);
}

// One block [T, D] of `dtype` through a codec of the given settings (any kind, bound, entropy).
std::vector<uint8_t> encode_one(const Shape& sh, int32_t kind, kvc_dtype dtype, int32_t bound_mode,
                                float bound, int32_t entropy, kvc_codebook_t book,
                                int32_t substreams, uint32_t seed) {
  kvc_codec_config c = block_config(sh, kind, bound_mode, bound);
  c.entropy = entropy;
  c.num_substreams = substreams;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> dense(size_t(sh.tokens) * size_t(sh.dim));
  for (float& x : dense) x = normal(rng);
  return encode_with(c, book, sh, dtype, dense);
}

kvc_block_encoding encoding_of(const std::vector<uint8_t>& block) {
  kvc_block_info info = KVC_BLOCK_INFO_INIT;
  EXPECT_EQ(kvc_block_inspect(block.data(), block.size(), &info), KVC_SUCCESS);
  return kvc_block_encoding(info.encoding);
}

// The restore of `bytes` into s fails with `status` and changes nothing: the other sequences'
// bytes, the stats, the next sequence id and the codebooks.
void expect_rejected(kvc_store_t s, const Shadow& shadow, const std::vector<uint8_t>& bytes,
                     kvc_status_t status, const char* what) {
  const auto before = snapshot(s, shadow);
  int32_t id = -1;
  EXPECT_EQ(kvc_store_restore(s, bytes.data(), bytes.size(), &id), status)
      << what << ": " << kvc_last_error();
  EXPECT_EQ(id, -1) << what;
  EXPECT_STRNE(kvc_last_error(), "") << what;
  EXPECT_EQ(snapshot(s, shadow), before) << what << ": the failed restore changed the store";
}

TEST(StoreRestore, ABlockLongerThanAPageIsRejectedAndTouchesNoOtherSequence) {
  // The attack of a crafted sequence: restore X, restore a victim Y, free X, then restore a
  // sequence whose first block is longer than a page. Placing it at X's page must not write into
  // Y's (the next page of the pool).
  const Shape sh = small_shape();
  std::mt19937 rng(1);
  StoreHandle writer(fixed_config(sh, 1 << 20));
  const Rows k = random_rows(rng, 8, sh), v = random_rows(rng, 8, sh);
  const std::vector<uint8_t> genuine = sequence_bytes(writer.s, sh, k, v, 8);
  SerialSequence crafted = parsed(genuine);
  ASSERT_EQ(crafted.layers.size(), 1u);
  ASSERT_EQ(crafted.layers[0].blocks.size(), 2u);

  StoreHandle store(fixed_config(sh, 3 * 512, 512));
  Shadow shadow{sh, {}, {}};
  int32_t x = -1, y = -1;
  ASSERT_EQ(kvc_store_restore(store.s, genuine.data(), genuine.size(), &x), KVC_SUCCESS);
  ASSERT_EQ(kvc_store_restore(store.s, genuine.data(), genuine.size(), &y), KVC_SUCCESS);
  ASSERT_EQ(kvc_store_free_sequence(store.s, x, nullptr), KVC_SUCCESS);
  shadow.add_sequence(y);

  // The K block stretched past the page: its stated length and zero payload bytes after what its
  // decoder reads (a header that parses, a block that decodes).
  for (uint32_t bytes : {512u + 64u, 512u, 288u + 4u}) {
    SerialSequence edit = crafted;
    std::vector<uint8_t>& block = edit.layers[0].blocks[0];
    block.resize(bytes, 0);
    kvc_fuzz::store_word(&block[16], bytes);  // block_bytes (format.md §2)
    kvc_block_info info = KVC_BLOCK_INFO_INIT;
    ASSERT_EQ(kvc_block_inspect(block.data(), block.size(), &info), KVC_SUCCESS)
        << "the stretched block still parses";
    SCOPED_TRACE(bytes);
    expect_rejected(store.s, shadow, edit.bytes(), KVC_ERROR_CORRUPT_DATA, "stretched block");
    EXPECT_TRUE(last_error_names("longer than")) << kvc_last_error();
  }
  // The victim reads back as it was written.
  std::vector<float> rk(8 * sh.row()), rv(8 * sh.row());
  ASSERT_EQ(kvc_store_read(store.s, y, 0, KVC_DTYPE_FP32, 8, rk.data(), rv.data(), nullptr),
            KVC_SUCCESS);
  for (size_t i = 0; i < rk.size(); ++i) {
    ASSERT_LE(std::fabs(rk[i] - k.values[i]), sh.key_bound) << i;
    ASSERT_LE(std::fabs(rv[i] - v.values[i]), sh.value_bound) << i;
  }
}

TEST(StoreRestore, RawBlocksMustHoldTheStoresDtype) {
  const Shape sh = small_shape();
  std::mt19937 rng(2);
  StoreHandle writer(fixed_config(sh, 1 << 20));
  const Rows k = random_rows(rng, 8, sh), v = random_rows(rng, 8, sh);
  const SerialSequence genuine = parsed(sequence_bytes(writer.s, sh, k, v, 8));
  StoreHandle store(fixed_config(sh, 1 << 20, 1024));  // pages large enough for fp32 raw blocks
  Shadow shadow{sh, {}, {}};
  for (kvc_dtype dtype : {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32}) {
    // An absolute bound no quantizer reaches: the codec writes the input verbatim.
    SerialSequence edit = genuine;
    edit.layers[0].blocks[0] = encode_one(sh, KVC_KIND_KEY, dtype, KVC_BOUND_ABSOLUTE, 1e-30f,
                                          KVC_ENTROPY_FIXED, nullptr, 0, 3);
    ASSERT_EQ(encoding_of(edit.layers[0].blocks[0]), KVC_ENCODING_RAW);
    SCOPED_TRACE(dtype);
    if (dtype == KVC_DTYPE_FP16) {  // the store's own dtype: a block it could have written
      int32_t id = -1;
      const std::vector<uint8_t> bytes = edit.bytes();
      ASSERT_EQ(kvc_store_restore(store.s, bytes.data(), bytes.size(), &id), KVC_SUCCESS)
          << kvc_last_error();
      shadow.add_sequence(id);  // snapshot() serializes it with the others
      continue;
    }
    expect_rejected(store.s, shadow, edit.bytes(), KVC_ERROR_CORRUPT_DATA, "raw block dtype");
  }
}

// A store that rotates its rows reads them back rotated in floats: values that are finite but
// near the float limit (bf16 reaches it) sum to inf, and inf - inf to NaN. A restored block or
// uncompressed row must read back finite, not only be finite.
TEST(StoreRestore, RotatedRowsMustReadBackFinite) {
  Shape sh = small_shape();
  sh.tokens = 8;
  kvc_store_config c = fixed_config(sh, 1 << 20, 1024);
  c.dtype = KVC_DTYPE_BF16;
  c.rotation = KVC_ROTATION_HADAMARD;
  StoreHandle writer(c);
  std::mt19937 rng(5);
  Rows k = random_rows(rng, 11, sh), v = random_rows(rng, 11, sh);
  for (Rows* rows : {&k, &v}) {  // the store holds bf16: the same values as bf16 bits
    for (size_t i = 0; i < rows->bits.size(); ++i) {
      rows->bits[i] = format::float_to_bf16(rows->values[i]);
    }
  }
  const SerialSequence genuine = parsed(sequence_bytes(writer.s, sh, k, v, 11));
  ASSERT_EQ(genuine.layers[0].blocks.size(), 2u);
  ASSERT_EQ(genuine.layers[0].tail_k.size(), 3 * sh.row() * 2);
  StoreHandle store(c);
  Shadow shadow{sh, {}, {}};
  {  // the genuine sequence restores
    int32_t id = -1;
    const std::vector<uint8_t> bytes = genuine.bytes();
    ASSERT_EQ(kvc_store_restore(store.s, bytes.data(), bytes.size(), &id), KVC_SUCCESS)
        << kvc_last_error();
    shadow.add_sequence(id);
  }
  // A raw V block of bf16 values near the limit (finite: the check before this one passed it):
  // an absolute bound below float resolution there makes the codec write it verbatim.
  std::vector<float> huge(size_t(sh.tokens) * sh.dim, 3.0e38f);
  SerialSequence edit = genuine;
  edit.layers[0].blocks[1] =
      encode_with(block_config(sh, KVC_KIND_VALUE, KVC_BOUND_ABSOLUTE, 0.02f), nullptr, sh,
                  KVC_DTYPE_BF16, huge);
  ASSERT_EQ(encoding_of(edit.layers[0].blocks[1]), KVC_ENCODING_RAW);
  expect_rejected(store.s, shadow, edit.bytes(), KVC_ERROR_CORRUPT_DATA,
                  "raw block near the limit");
  // A tail row of the same values.
  edit = genuine;
  for (size_t i = 0; i + 1 < edit.layers[0].tail_k.size(); i += 2) {
    const uint16_t bits = format::float_to_bf16(3.0e38f);
    edit.layers[0].tail_k[i] = uint8_t(bits);
    edit.layers[0].tail_k[i + 1] = uint8_t(bits >> 8);
  }
  expect_rejected(store.s, shadow, edit.bytes(), KVC_ERROR_CORRUPT_DATA, "tail near the limit");
}

TEST(StoreRestore, BlocksMustBeOfAnEncodingAndLayoutTheStoreWrites) {
  Shape sh = small_shape();
  std::mt19937 rng(3);
  // Fixed-width blocks from a FIXED store, presented as a HUFFMAN store's: rejected.
  kvc_store_config fixed = store_config(sh, 1 << 20);
  fixed.entropy = KVC_ENTROPY_FIXED;
  StoreHandle fixed_writer(fixed);
  const Rows k = random_rows(rng, 8, sh), v = random_rows(rng, 8, sh);
  SerialSequence from_fixed = parsed(sequence_bytes(fixed_writer.s, sh, k, v, 8));
  ASSERT_EQ(encoding_of(from_fixed.layers[0].blocks[0]), KVC_ENCODING_FIXED);
  from_fixed.set_fingerprint(10, KVC_ENTROPY_HUFFMAN);
  kvc_store_config huffman = store_config(sh, 1 << 20);
  huffman.entropy = KVC_ENTROPY_HUFFMAN;
  StoreHandle huffman_store(huffman);
  Shadow shadow{sh, {}, {}};
  expect_rejected(huffman_store.s, shadow, from_fixed.bytes(), KVC_ERROR_CORRUPT_DATA,
                  "fixed block in a HUFFMAN store");

  // Huffman blocks of an AUTO store, presented as a FIXED store's that holds the same codebook.
  StoreHandle auto_writer(store_config(sh, 1 << 20));
  const Rows k2 = random_rows(rng, 16, sh), v2 = random_rows(rng, 16, sh);
  SerialSequence from_auto = parsed(sequence_bytes(auto_writer.s, sh, k2, v2, 16));
  bool any_huffman = false;
  for (const auto& b : from_auto.layers[0].blocks) {
    any_huffman = any_huffman || encoding_of(b) == KVC_ENCODING_HUFFMAN;
  }
  ASSERT_TRUE(any_huffman);
  StoreHandle fixed_store(fixed);
  for (int32_t kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
    kvc_codebook_t book = nullptr;
    ASSERT_EQ(kvc_store_get_codebook(auto_writer.s, 0, kvc_kind(kind), &book), KVC_SUCCESS);
    ASSERT_EQ(kvc_store_set_codebook(fixed_store.s, 0, kvc_kind(kind), book), KVC_SUCCESS);
    kvc_codebook_destroy(book);
  }
  SerialSequence as_fixed = from_auto;
  as_fixed.set_fingerprint(10, KVC_ENTROPY_FIXED);
  expect_rejected(fixed_store.s, shadow, as_fixed.bytes(), KVC_ERROR_CORRUPT_DATA,
                  "Huffman block in a FIXED store");

  // In an AUTO store like the writer: a K block with per-group steps (relative bound) where the
  // store's bound is absolute, and a Huffman block with one sub-stream where the store uses more.
  StoreHandle auto_store(store_config(sh, 1 << 20));
  kvc_codebook_t key_book = nullptr;
  ASSERT_EQ(kvc_store_get_codebook(auto_writer.s, 0, KVC_KIND_KEY, &key_book), KVC_SUCCESS);
  ASSERT_EQ(kvc_store_set_codebook(auto_store.s, 0, KVC_KIND_KEY, key_book), KVC_SUCCESS);
  kvc_codebook_t value_book = nullptr;
  ASSERT_EQ(kvc_store_get_codebook(auto_writer.s, 0, KVC_KIND_VALUE, &value_book), KVC_SUCCESS);
  ASSERT_EQ(kvc_store_set_codebook(auto_store.s, 0, KVC_KIND_VALUE, value_book), KVC_SUCCESS);
  {
    SerialSequence edit = from_auto;
    edit.layers[0].blocks[0] = encode_one(sh, KVC_KIND_KEY, KVC_DTYPE_FP16, KVC_BOUND_RELATIVE,
                                          0.05f, KVC_ENTROPY_FIXED, nullptr, 0, 4);
    expect_rejected(auto_store.s, shadow, edit.bytes(), KVC_ERROR_CORRUPT_DATA, "per-group steps");
  }
  {
    SerialSequence edit = from_auto;
    edit.layers[0].blocks[0] = encode_one(sh, KVC_KIND_KEY, KVC_DTYPE_FP16, KVC_BOUND_ABSOLUTE,
                                          sh.key_bound, KVC_ENTROPY_HUFFMAN, key_book, 1, 5);
    ASSERT_EQ(encoding_of(edit.layers[0].blocks[0]), KVC_ENCODING_HUFFMAN);
    expect_rejected(auto_store.s, shadow, edit.bytes(), KVC_ERROR_CORRUPT_DATA, "sub-streams");
  }
  // The genuine sequence restores (the checks above are not simply rejecting everything).
  int32_t id = -1;
  const std::vector<uint8_t> bytes = from_auto.bytes();
  EXPECT_EQ(kvc_store_restore(auto_store.s, bytes.data(), bytes.size(), &id), KVC_SUCCESS)
      << kvc_last_error();
  kvc_codebook_destroy(key_book);
  kvc_codebook_destroy(value_book);
}

TEST(StoreRestore, ASequenceWithoutHuffmanBlocksLeavesTheCodebooksOpen) {
  // A sequence of fixed-width blocks (constant data: zero-width codes beat any Huffman code)
  // restored into a fresh store: the layer still takes the writer's codebooks afterwards, and
  // the writer's Huffman sequences then restore.
  const Shape sh = small_shape();
  std::mt19937 rng(6);
  StoreHandle writer(store_config(sh, 1 << 20));
  // The first prefill builds the writer's codebooks from its (random) blocks.
  const Rows k = random_rows(rng, 16, sh), v = random_rows(rng, 16, sh);
  const std::vector<uint8_t> huffman_bytes = sequence_bytes(writer.s, sh, k, v, 16);
  const SerialSequence huffman_sequence = parsed(huffman_bytes);
  int huffman_blocks = 0;
  for (const auto& b : huffman_sequence.layers[0].blocks) {
    huffman_blocks += encoding_of(b) == KVC_ENCODING_HUFFMAN;
  }
  ASSERT_GT(huffman_blocks, 0);
  Rows flat = random_rows(rng, 8, sh);
  for (auto& b : flat.bits) b = 0x3C00;  // 1.0
  const std::vector<uint8_t> fixed_bytes = sequence_bytes(writer.s, sh, flat, flat, 8);
  const SerialSequence fixed_sequence = parsed(fixed_bytes);
  for (const auto& b : fixed_sequence.layers[0].blocks) {
    ASSERT_NE(encoding_of(b), KVC_ENCODING_HUFFMAN);
  }

  StoreHandle fresh(store_config(sh, 1 << 20));
  int32_t id = -1;
  ASSERT_EQ(kvc_store_restore(fresh.s, fixed_bytes.data(), fixed_bytes.size(), &id), KVC_SUCCESS)
      << kvc_last_error();
  kvc_codebook_t none = reinterpret_cast<kvc_codebook_t>(uintptr_t{1});
  ASSERT_EQ(kvc_store_get_codebook(fresh.s, 0, KVC_KIND_KEY, &none), KVC_SUCCESS);
  EXPECT_EQ(none, nullptr) << "a restore brings no codebook";
  for (int32_t kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
    kvc_codebook_t book = nullptr;
    ASSERT_EQ(kvc_store_get_codebook(writer.s, 0, kvc_kind(kind), &book), KVC_SUCCESS);
    EXPECT_EQ(kvc_store_set_codebook(fresh.s, 0, kvc_kind(kind), book), KVC_SUCCESS)
        << "the restore froze a layer it gave no Huffman block: " << kvc_last_error();
    kvc_codebook_destroy(book);
  }
  ASSERT_EQ(kvc_store_restore(fresh.s, huffman_bytes.data(), huffman_bytes.size(), &id),
            KVC_SUCCESS)
      << kvc_last_error();
  // Now the layer holds blocks that need its codebooks: frozen.
  kvc_codebook_t book = nullptr;
  ASSERT_EQ(kvc_store_get_codebook(writer.s, 0, KVC_KIND_KEY, &book), KVC_SUCCESS);
  EXPECT_EQ(kvc_store_set_codebook(fresh.s, 0, KVC_KIND_KEY, book), KVC_ERROR_INVALID_ARGUMENT);
  kvc_codebook_destroy(book);
}

TEST(StoreRestore, AFailedRestoreConsumesNoSequenceId) {
  const Shape sh = small_shape();
  std::mt19937 rng(7);
  StoreHandle writer(fixed_config(sh, 1 << 20));
  const Rows k = random_rows(rng, 24, sh), v = random_rows(rng, 24, sh);
  const std::vector<uint8_t> bytes = sequence_bytes(writer.s, sh, k, v, 24);
  // One page of 512 bytes: three token blocks of K and V do not fit.
  StoreHandle store(fixed_config(sh, 512, 512));
  int32_t id = -1;
  ASSERT_EQ(kvc_store_restore(store.s, bytes.data(), bytes.size(), &id), KVC_ERROR_OUT_OF_PAGES);
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  EXPECT_EQ(id, 0) << "the failed restore used a sequence id";
  // And at max_sequences: the refused restore leaves the ids alone too.
  kvc_store_config limited = fixed_config(sh, 1 << 20);
  limited.max_sequences = 1;
  StoreHandle small(limited);
  ASSERT_EQ(kvc_store_add_sequence(small.s, &id), KVC_SUCCESS);
  ASSERT_EQ(id, 0);
  int32_t restored = -1;
  ASSERT_EQ(kvc_store_restore(small.s, bytes.data(), bytes.size(), &restored),
            KVC_ERROR_OUT_OF_MEMORY);
  ASSERT_EQ(kvc_store_free_sequence(small.s, 0, nullptr), KVC_SUCCESS);
  ASSERT_EQ(kvc_store_add_sequence(small.s, &id), KVC_SUCCESS);
  EXPECT_EQ(id, 1);
}

// The serialized bytes may lie at any address (kvc_store_serialize writes them anywhere): a
// restore reads the sinks' and the tail's fp16 rows, which the image aligns, from an odd one
// (the sanitizer build checks every access's alignment).
TEST(StoreRestore, ReadsSequencesAtAnyAddress) {
  const Shape sh = small_shape();
  std::mt19937 rng(8);
  const Rows k = random_rows(rng, 21, sh), v = random_rows(rng, 21, sh);
  for (const bool rotated : {false, true}) {
    kvc_store_config c = fixed_config(sh, 1 << 20);
    if (rotated) {  // its rows are checked as they read back, rotated
      c.rotation = KVC_ROTATION_HADAMARD;
      c.sink_tokens = 2;
    }
    StoreHandle store(c);
    const std::vector<uint8_t> bytes = sequence_bytes(store.s, sh, k, v, 21);
    std::vector<uint8_t> odd(bytes.size() + 1);
    std::copy(bytes.begin(), bytes.end(), odd.begin() + 1);
    int32_t id = -1;
    ASSERT_EQ(kvc_store_restore(store.s, odd.data() + 1, bytes.size(), &id), KVC_SUCCESS)
        << kvc_last_error();
    std::vector<uint8_t> again;
    ASSERT_NO_FATAL_FAILURE(serialize_sequence(store.s, id, again));
    EXPECT_EQ(again, bytes) << (rotated ? "rotated, with sinks" : "plain");
  }
}

// ---- Stores of tile blocks (format t1) --------------------------------------------------------

// One layer, one kv-head of 32 channels (two K tiles, so that a permutation can pay), 16-token
// blocks; absolute bounds as store_config.
Shape tile_shape() {
  Shape sh = small_shape();
  sh.dim = 32;
  sh.tokens = 16;
  return sh;
}

kvc_store_config tile_config(const Shape& sh, int32_t permute = 1, int32_t split = 1) {
  kvc_store_config c = store_config(sh, 1 << 20);
  c.block_format = KVC_BLOCK_FORMAT_TILES;
  c.tile_permute_channels = permute;
  c.tile_split_widths = split;
  return c;
}

// One tile block [T, D] of `dtype` from dense values, through a tile codec of these settings.
std::vector<uint8_t> encode_tile(const Shape& sh, int32_t kind, kvc_dtype dtype, int32_t bound_mode,
                                 float bound, int32_t permute, int32_t split,
                                 const std::vector<float>& dense) {
  kvc_codec_config c = block_config(sh, kind, bound_mode, bound);
  c.block_format = KVC_BLOCK_FORMAT_TILES;
  c.tile_permute_channels = permute;
  c.tile_split_widths = split;
  return encode_with(c, nullptr, sh, dtype, dense);
}

tiles::TileLayout tile_layout(const std::vector<uint8_t>& block) {
  return cpu::parse_tile_header(block.data(), block.size());
}

// K rows where even channels span a wide range and odd ones a narrow one: sorting channels by
// width puts the wide ones in one tile.
std::vector<float> striped_keys(const Shape& sh, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> dense(size_t(sh.tokens) * size_t(sh.dim));
  for (size_t i = 0; i < dense.size(); ++i) dense[i] = normal(rng) * (i % 2 == 0 ? 3.0f : 0.04f);
  return dense;
}

TEST(StoreRestore, TileStoresRestoreExactlyAndOnlyTileSequencesOfTheirConfiguration) {
  const Shape sh = tile_shape();
  std::mt19937 rng(21);
  StoreHandle writer(tile_config(sh));
  const Rows k = random_rows(rng, 40, sh), v = random_rows(rng, 40, sh);
  int32_t src = -1;
  const std::vector<uint8_t> bytes = sequence_bytes(writer.s, sh, k, v, 40, &src);
  StoreHandle reader(tile_config(sh));
  int32_t id = -1;
  ASSERT_EQ(kvc_store_restore(reader.s, bytes.data(), bytes.size(), &id), KVC_SUCCESS)
      << kvc_last_error();
  std::vector<uint8_t> again;
  ASSERT_NO_FATAL_FAILURE(serialize_sequence(reader.s, id, again));
  EXPECT_EQ(again, bytes) << "a restored tile sequence serializes to other bytes";
  std::vector<float> a(40 * sh.row() * 2), b(40 * sh.row() * 2);
  ASSERT_EQ(kvc_store_read(writer.s, src, 0, KVC_DTYPE_FP32, 40, a.data(), a.data() + 40 * sh.row(),
                           nullptr),
            KVC_SUCCESS);
  ASSERT_EQ(kvc_store_read(reader.s, id, 0, KVC_DTYPE_FP32, 40, b.data(), b.data() + 40 * sh.row(),
                           nullptr),
            KVC_SUCCESS);
  EXPECT_EQ(a, b);

  Shadow shadow{sh, {}, {}};
  // Across block formats, and across tile options: CONFIG_MISMATCH.
  StoreHandle v1(store_config(sh, 1 << 20));
  expect_rejected(v1.s, shadow, bytes, KVC_ERROR_CONFIG_MISMATCH, "tiles into a v1 store");
  const std::vector<uint8_t> v1_bytes = sequence_bytes(v1.s, sh, k, v, 40);
  StoreHandle tiles_store(tile_config(sh));
  expect_rejected(tiles_store.s, shadow, v1_bytes, KVC_ERROR_CONFIG_MISMATCH,
                  "v1 into a tiles store");
  StoreHandle no_split(tile_config(sh, 1, 0));
  expect_rejected(no_split.s, shadow, bytes, KVC_ERROR_CONFIG_MISMATCH, "other tile options");
  // A v1 sequence relabelled as a tiles store's (version 2 and the format word): its blocks are
  // not tile blocks.
  SerialSequence relabelled = parsed(v1_bytes);
  relabelled.head = parsed(bytes).head;
  expect_rejected(tiles_store.s, shadow, relabelled.bytes(), KVC_ERROR_CORRUPT_DATA,
                  "v1 blocks under a tiles header");
}

TEST(StoreRestore, TileBlocksMustBeOnesTheStoreWrites) {
  const Shape sh = tile_shape();
  std::mt19937 rng(22);
  StoreHandle writer(tile_config(sh));
  const Rows k = random_rows(rng, 16, sh), v = random_rows(rng, 16, sh);
  const SerialSequence genuine = parsed(sequence_bytes(writer.s, sh, k, v, 16));
  ASSERT_EQ(genuine.layers[0].blocks.size(), 2u);
  StoreHandle store(tile_config(sh));
  Shadow shadow{sh, {}, {}};
  auto with_key_block = [&](std::vector<uint8_t> block) {
    SerialSequence edit = genuine;
    edit.layers[0].blocks[0] = std::move(block);
    return edit.bytes();
  };
  {
    SerialSequence edit = genuine;
    std::swap(edit.layers[0].blocks[0], edit.layers[0].blocks[1]);
    expect_rejected(store.s, shadow, edit.bytes(), KVC_ERROR_CORRUPT_DATA, "V block as K");
  }
  expect_rejected(store.s, shadow,
                  with_key_block(encode_one(sh, KVC_KIND_KEY, KVC_DTYPE_FP16, KVC_BOUND_ABSOLUTE,
                                            sh.key_bound, KVC_ENTROPY_FIXED, nullptr, 0, 3)),
                  KVC_ERROR_CORRUPT_DATA, "a format v1 block");
  const std::vector<float> keys = striped_keys(sh, 5);
  expect_rejected(store.s, shadow,
                  with_key_block(encode_tile(sh, KVC_KIND_KEY, KVC_DTYPE_FP16, KVC_BOUND_RELATIVE,
                                             0.05f, 1, 1, keys)),
                  KVC_ERROR_CORRUPT_DATA, "per-group steps");
  // Raw tiles must hold the store's dtype: a block too wide to quantize, encoded from bf16.
  std::vector<float> huge(keys.size());
  for (size_t i = 0; i < huge.size(); ++i) huge[i] = (i % 2 ? 1.0f : -1.0f) * 30000.0f;
  const std::vector<uint8_t> raw_bf16 =
      encode_tile(sh, KVC_KIND_KEY, KVC_DTYPE_BF16, KVC_BOUND_ABSOLUTE, 1e-3f, 1, 1, huge);
  ASSERT_EQ(tile_layout(raw_bf16).raw_dtype, uint32_t(KVC_DTYPE_BF16));
  expect_rejected(store.s, shadow, with_key_block(raw_bf16), KVC_ERROR_CORRUPT_DATA,
                  "raw bf16 tiles in an fp16 store");
  // A raw fp16 tile holding inf decodes to inf: rejected.
  std::vector<uint8_t> raw_inf =
      encode_tile(sh, KVC_KIND_KEY, KVC_DTYPE_FP16, KVC_BOUND_ABSOLUTE, 1e-3f, 1, 1, huge);
  const tiles::TileLayout raw = tile_layout(raw_inf);
  ASSERT_FALSE(raw.quantized);
  format::store_u16(&raw_inf[raw.tiles_offset + 6], 0x7C00);
  expect_rejected(store.s, shadow, with_key_block(raw_inf), KVC_ERROR_CORRUPT_DATA, "inf");

  // A permuted K block where the store keeps the channel order; 3- and 6-bit tiles where the
  // store writes none.
  const std::vector<uint8_t> permuted =
      encode_tile(sh, KVC_KIND_KEY, KVC_DTYPE_FP16, KVC_BOUND_ABSOLUTE, sh.key_bound, 1, 0, keys);
  ASSERT_TRUE(tile_layout(permuted).permuted);
  StoreHandle in_order(tile_config(sh, 0, 0));
  StoreHandle in_order_writer(tile_config(sh, 0, 0));
  SerialSequence base = parsed(sequence_bytes(in_order_writer.s, sh, k, v, 16));
  base.layers[0].blocks[0] = permuted;
  expect_rejected(in_order.s, shadow, base.bytes(), KVC_ERROR_CORRUPT_DATA, "permuted");
  std::vector<uint8_t> split;
  for (uint32_t seed = 0; seed < 64 && split.empty(); ++seed) {
    std::vector<float> dense(keys.size());
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::mt19937 r(seed);
    for (float& x : dense) x = normal(r);
    std::vector<uint8_t> b = encode_tile(sh, KVC_KIND_KEY, KVC_DTYPE_FP16, KVC_BOUND_ABSOLUTE,
                                         sh.key_bound, 0, 1, dense);
    const tiles::TileLayout l = tile_layout(b);
    for (uint32_t i = 0; i < l.num_tiles; ++i) {
      const uint32_t w = tiles::entry_width(tiles::table_entry(b.data(), l, i));
      if (w == tiles::kW3 || w == tiles::kW6) split = b;
    }
  }
  ASSERT_FALSE(split.empty()) << "no block with a 3- or 6-bit tile";
  base.layers[0].blocks[0] = split;
  expect_rejected(in_order.s, shadow, base.bytes(), KVC_ERROR_CORRUPT_DATA, "split widths");
  // The genuine sequences restore (the checks above do not reject everything).
  int32_t id = -1;
  const std::vector<uint8_t> ok = genuine.bytes();
  EXPECT_EQ(kvc_store_restore(store.s, ok.data(), ok.size(), &id), KVC_SUCCESS) << kvc_last_error();
}

}  // namespace
}  // namespace kvc::test
