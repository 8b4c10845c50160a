// SPDX-License-Identifier: Apache-2.0
// A tiles store that serializes its blocks as format v1 (kvc_store_config.serialized_block_format
// = KVC_BLOCK_FORMAT_V1, serial version 6): smaller sequences that restore, into a store of
// either setting, to the very blocks the writer held; blocks with raw tiles stay as they are;
// damaged transcoded records are refused and change nothing.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "codec/codec_params.hpp"
#include "cpu/codec_cpu.hpp"
#include "cpu/tile_codec_cpu.hpp"
#include "store_model.hpp"
#include "tests/fuzz/fuzz_common.hpp"
#include "tests/fuzz/serialized_sequence.hpp"

namespace kvc::test {
namespace {

using kvc_fuzz::SerialSequence;

Shape transcode_shape() {
  Shape sh;
  sh.layers = 3;
  sh.heads = 2;
  sh.dim = 64;
  sh.tokens = 16;
  sh.key_bound = 0.1f;
  sh.value_bound = 0.072f;  // relative: 3-bit V tiles
  return sh;
}

kvc_store_config tiles_config(const Shape& sh, int32_t serialized_format) {
  kvc_store_config c = store_config(sh, 1 << 22);
  c.block_format = KVC_BLOCK_FORMAT_TILES;
  c.value_bound_mode = KVC_BOUND_RELATIVE;
  c.serialized_block_format = serialized_format;
  return c;
}

std::vector<uint8_t> serialized(kvc_store_t s, int32_t id) {
  std::vector<uint8_t> bytes;
  serialize_sequence(s, id, bytes);
  return bytes;
}

int32_t restored(kvc_store_t s, const std::vector<uint8_t>& bytes) {
  int32_t id = -1;
  EXPECT_EQ(kvc_store_restore(s, bytes.data(), bytes.size(), &id), KVC_SUCCESS) << kvc_last_error();
  return id;
}

// Where version 6's codebook table starts in SerialSequence::head: after the magic, the version
// and 15 + 2L fingerprint words (docs/format.md §16.1).
size_t codebook_table_at(uint32_t layers) { return 8 + 4 * (15 + 2 * size_t(layers)); }

// Version 6's codebook table (docs/format.md §16.3): per (layer, K|V) the codebook's bytes.
std::vector<std::vector<uint8_t>> codebook_table(const SerialSequence& seq) {
  std::vector<std::vector<uint8_t>> books;
  size_t at = codebook_table_at(seq.num_layers());
  for (uint32_t i = 0; i < 2 * seq.num_layers(); ++i) {
    const uint32_t m = kvc_fuzz::load_word(&seq.head[at]);
    books.emplace_back(seq.head.begin() + long(at) + 4, seq.head.begin() + long(at + 4 + m));
    at += 4 + (size_t(m) + 3) / 4 * 4;
  }
  return books;
}

// A codebook is in the table exactly where a record of its layer and kind is a Huffman block.
void expect_books_where_used(const std::vector<uint8_t>& bytes) {
  const auto seq = SerialSequence::parse(bytes.data(), bytes.size());
  ASSERT_TRUE(seq.has_value());
  const auto books = codebook_table(*seq);
  for (size_t l = 0; l < seq->layers.size(); ++l) {
    for (size_t kind = 0; kind < 2; ++kind) {
      bool huffman = false;
      for (size_t i = kind; i < seq->layers[l].blocks.size(); i += 2) {
        const auto& b = seq->layers[l].blocks[i];
        huffman = huffman || (seq->layers[l].transcoded[i] &&
                              cpu::parse_header(b.data(), b.size()).encoding == format::kHuffman);
      }
      EXPECT_EQ(!books[l * 2 + kind].empty(), huffman) << "layer " << l << " kind " << kind;
    }
  }
}

size_t transcoded_records(const std::vector<uint8_t>& bytes, size_t* records = nullptr) {
  const auto seq = SerialSequence::parse(bytes.data(), bytes.size());
  EXPECT_TRUE(seq.has_value());
  size_t n = 0, all = 0;
  for (const auto& l : seq->layers) {
    for (uint8_t t : l.transcoded) n += t, ++all;
  }
  if (records) *records = all;
  return n;
}

// The same 53 tokens (3 blocks and a tail) in a transcoding store and in one that writes its
// tiles as held, for each store option that changes the serialized form.
TEST(StoreTranscode, RestoresTheBlocksTheWriterHeld) {
  const Shape sh = transcode_shape();
  const float scales[3] = {0.5f, 1.0f, 2.0f};
  for (int variant = 0; variant < 7; ++variant) {
    SCOPED_TRACE(variant);
    kvc_store_config ct = tiles_config(sh, KVC_BLOCK_FORMAT_V1);
    kvc_store_config ch = tiles_config(sh, KVC_BLOCK_FORMAT_AUTO);
    for (kvc_store_config* c : {&ct, &ch}) {
      if (variant == 1) c->sink_tokens = 3;
      if (variant == 2) c->key_layer_scales = c->value_layer_scales = scales;
      if (variant == 3) c->rotation = KVC_ROTATION_HADAMARD_VALUES;
      if (variant == 4) c->dtype = KVC_DTYPE_BF16;
      if (variant == 5) {  // relative K (per-channel steps), absolute V (one step per block)
        c->key_bound_mode = KVC_BOUND_RELATIVE;
        c->key_error_bound = 0.05f;
        c->value_bound_mode = KVC_BOUND_ABSOLUTE;
        c->value_error_bound = 0.05f;
      }
      if (variant == 6) c->tile_permute_channels = c->tile_split_widths = 0;
    }
    StoreHandle transcoding(ct), held(ch);
    std::mt19937 rng(11 + variant);
    const size_t n = 3 * size_t(sh.tokens) + 5;
    Rows k = random_rows(rng, n * sh.layers, sh), v = random_rows(rng, n * sh.layers, sh);
    if (variant == 4) {  // the same values as bf16
      for (Rows* r : {&k, &v}) {
        for (size_t i = 0; i < r->bits.size(); ++i) {
          r->bits[i] = format::float_to_bf16(r->values[i]);
        }
      }
    }
    int32_t a = -1, b = -1;
    ASSERT_NO_FATAL_FAILURE(
        add_prefilled(transcoding.s, sh.layers, n, k.bits.data(), v.bits.data(), a));
    ASSERT_NO_FATAL_FAILURE(add_prefilled(held.s, sh.layers, n, k.bits.data(), v.bits.data(), b));
    const std::vector<uint8_t> small = serialized(transcoding.s, a);
    const std::vector<uint8_t> as_held = serialized(held.s, b);
    ASSERT_EQ(kvc_fuzz::load_word(&small[4]), 6u);
    ASSERT_NE(kvc_fuzz::load_word(&as_held[4]), 6u);
    size_t records = 0;
    EXPECT_EQ(transcoded_records(small, &records), records);  // no raw tiles in these data
    EXPECT_EQ(records, size_t(sh.layers) * 3 * sh.heads * 2);
    EXPECT_LT(small.size(), as_held.size());
    ASSERT_NO_FATAL_FAILURE(expect_books_where_used(small));
    std::printf("variant %d: %zu bytes transcoded, %zu as held (%.3f)\n", variant, small.size(),
                as_held.size(), double(small.size()) / double(as_held.size()));

    // Either form into either store: the blocks the writer held, byte for byte.
    for (const std::vector<uint8_t>* bytes : {&small, &as_held}) {
      EXPECT_EQ(serialized(held.s, restored(held.s, *bytes)), as_held);
      EXPECT_EQ(serialized(transcoding.s, restored(transcoding.s, *bytes)), small);
    }
    // And reads the same values as the original.
    const int32_t back = restored(held.s, small);
    for (int32_t l = 0; l < sh.layers; ++l) {
      const ReadBack want = read_back(held.s, b, n, sh, l), got = read_back(held.s, back, n, sh, l);
      EXPECT_EQ(got.k, want.k);
      EXPECT_EQ(got.v, want.v);
    }
  }
}

// kvc_store_serialized_size writes a transcoding store's sequence to learn its size and keeps
// the bytes for the kvc_store_serialize that directly follows: what that call writes is still
// the sequence as the store holds it then, whichever calls came between.
TEST(StoreTranscode, SerializeAfterTheSizeWritesTheSequenceAsHeldThen) {
  const Shape sh = transcode_shape();
  StoreHandle st(tiles_config(sh, KVC_BLOCK_FORMAT_V1));
  std::mt19937 rng(31);
  Rows k, v;
  int32_t a = -1, b = -1;
  ASSERT_NO_FATAL_FAILURE(add_prefilled(st.s, rng, sh, 2 * size_t(sh.tokens), a, k, v));
  ASSERT_NO_FATAL_FAILURE(add_prefilled(st.s, rng, sh, 2 * size_t(sh.tokens) + 3, b, k, v));
  std::vector<uint8_t> buffer(1 << 20);
  const auto size_of = [&](int32_t id) {
    size_t n = 0;
    EXPECT_EQ(kvc_store_serialized_size(st.s, id, &n), KVC_SUCCESS) << kvc_last_error();
    return n;
  };
  const auto write = [&](int32_t id) {
    size_t written = 0;
    EXPECT_EQ(kvc_store_serialize(st.s, id, buffer.data(), buffer.size(), &written), KVC_SUCCESS)
        << kvc_last_error();
    return std::vector<uint8_t>(buffer.begin(), buffer.begin() + long(written));
  };
  // A serialization with nothing kept: a call in between drops what the size call kept.
  const auto fresh = [&](int32_t id) {
    store_stats(st.s);
    return write(id);
  };
  const std::vector<uint8_t> a0 = fresh(a), b0 = fresh(b);
  ASSERT_NE(a0, b0);

  EXPECT_EQ(size_of(a), a0.size());
  EXPECT_EQ(write(a), a0);
  EXPECT_EQ(size_of(a), a0.size());
  EXPECT_EQ(write(b), b0) << "the size of another sequence was kept";
  // Too small a buffer, then a retry: the retry writes the sequence again.
  EXPECT_EQ(size_of(a), a0.size());
  size_t written = 0;
  EXPECT_EQ(kvc_store_serialize(st.s, a, buffer.data(), a0.size() - 1, &written),
            KVC_ERROR_BUFFER_TOO_SMALL);
  EXPECT_EQ(write(a), a0);

  // A token appended between the size and the serialization.
  EXPECT_EQ(size_of(a), a0.size());
  const size_t row = size_t(sh.heads) * sh.dim;
  for (int32_t l = 0; l < sh.layers; ++l) {
    ASSERT_EQ(kvc_store_append(st.s, l, 1, &a, &k.bits[l * row], &v.bits[l * row], nullptr),
              KVC_SUCCESS)
        << kvc_last_error();
  }
  const std::vector<uint8_t> a1 = write(a);
  EXPECT_NE(a1, a0) << "the bytes kept before the append were written";
  EXPECT_EQ(a1, fresh(a));
  EXPECT_EQ(size_of(a), a1.size());
  EXPECT_EQ(write(a), a1);
}

// Constant rows: every record a fixed-width block of width 0, so no codebook is carried.
TEST(StoreTranscode, NoCodebookWhereNoRecordIsHuffman) {
  const Shape sh = transcode_shape();
  StoreHandle st(tiles_config(sh, KVC_BLOCK_FORMAT_V1));
  const size_t n = 2 * size_t(sh.tokens);
  const std::vector<uint16_t> rows(n * sh.layers * sh.row(), format::float_to_half(0.5f));
  int32_t id = -1;
  ASSERT_NO_FATAL_FAILURE(add_prefilled(st.s, sh.layers, n, rows.data(), rows.data(), id));
  const std::vector<uint8_t> bytes = serialized(st.s, id);
  size_t records = 0;
  EXPECT_EQ(transcoded_records(bytes, &records), records);
  const auto seq = SerialSequence::parse(bytes.data(), bytes.size());
  for (const auto& book : codebook_table(*seq)) EXPECT_TRUE(book.empty());
  ASSERT_NO_FATAL_FAILURE(expect_books_where_used(bytes));
}

// A codebook in the table where no record of its layer and kind is a Huffman block: the writer
// never stores one, and the reader, which parses a codebook only when a record needs it,
// refuses it rather than accept what it never read.
TEST(StoreTranscode, ACodebookNoRecordUsesIsRefused) {
  const Shape sh = transcode_shape();
  StoreHandle st(tiles_config(sh, KVC_BLOCK_FORMAT_V1));
  std::mt19937 rng(41);
  Rows k, v;
  int32_t donor = -1, id = -1;
  ASSERT_NO_FATAL_FAILURE(add_prefilled(st.s, rng, sh, 2 * size_t(sh.tokens), donor, k, v));
  const std::vector<uint16_t> rows(2 * size_t(sh.tokens) * sh.layers * sh.row(),
                                   format::float_to_half(0.5f));
  ASSERT_NO_FATAL_FAILURE(
      add_prefilled(st.s, sh.layers, 2 * size_t(sh.tokens), rows.data(), rows.data(), id));
  const std::vector<uint8_t> with_books = serialized(st.s, donor), without = serialized(st.s, id);
  const auto books = codebook_table(*SerialSequence::parse(with_books.data(), with_books.size()));
  auto seq = SerialSequence::parse(without.data(), without.size());
  ASSERT_TRUE(seq.has_value());
  ASSERT_TRUE(books[0].size() > 0);
  // The table with layer 0 K's slot holding the donor's codebook (every slot was empty).
  std::vector<uint8_t> head(seq->head.begin(),
                            seq->head.begin() + long(codebook_table_at(sh.layers)));
  for (uint32_t i = 0; i < 2 * uint32_t(sh.layers); ++i) {
    const std::vector<uint8_t> book = i == 0 ? books[0] : std::vector<uint8_t>{};
    const size_t at = head.size();
    head.resize(at + 4 + (book.size() + 3) / 4 * 4);
    kvc_fuzz::store_word(&head[at], uint32_t(book.size()));
    std::copy(book.begin(), book.end(), head.begin() + long(at) + 4);
  }
  seq->head = head;
  const std::vector<uint8_t> edited = seq->bytes();
  const kvc_store_stats before = store_stats(st.s);
  int32_t out = -1;
  EXPECT_EQ(kvc_store_restore(st.s, edited.data(), edited.size(), &out), KVC_ERROR_CORRUPT_DATA);
  EXPECT_TRUE(last_error_names("is not used by any Huffman record")) << kvc_last_error();
  EXPECT_EQ(out, -1);
  const kvc_store_stats after = store_stats(st.s);
  EXPECT_EQ(std::memcmp(&before, &after, sizeof(before)), 0);
  EXPECT_EQ(kvc_store_restore(st.s, without.data(), without.size(), &out), KVC_SUCCESS)
      << kvc_last_error();  // the same sequence with its own, empty table
}

TEST(StoreTranscode, BlocksWithRawTilesStayAsTheyAre) {
  const Shape sh = transcode_shape();
  StoreHandle transcoding(tiles_config(sh, KVC_BLOCK_FORMAT_V1));
  StoreHandle held(tiles_config(sh, KVC_BLOCK_FORMAT_AUTO));
  std::mt19937 rng(5);
  const size_t n = 2 * size_t(sh.tokens);
  Rows k = random_rows(rng, n * sh.layers, sh);
  const Rows v = random_rows(rng, n * sh.layers, sh);
  // Layer 0, token 3, head 1, channel 7: 60 away from its channel's other values, 600 codes of
  // the absolute bound 0.1: past 8 bits, so that tile of K block 0 of head 1 is raw.
  k.bits[3 * sh.row() + sh.dim + 7] = format::float_to_half(60.0f);
  int32_t a = -1, b = -1;
  ASSERT_NO_FATAL_FAILURE(
      add_prefilled(transcoding.s, sh.layers, n, k.bits.data(), v.bits.data(), a));
  ASSERT_NO_FATAL_FAILURE(add_prefilled(held.s, sh.layers, n, k.bits.data(), v.bits.data(), b));
  const std::vector<uint8_t> small = serialized(transcoding.s, a);
  const auto seq = SerialSequence::parse(small.data(), small.size());
  ASSERT_TRUE(seq.has_value());
  // Records [block, head, K|V]: block 0, head 1, K is record 2.
  EXPECT_EQ(seq->layers[0].transcoded[2], 0u);
  EXPECT_EQ(transcoded_records(small), size_t(sh.layers) * 2 * sh.heads * 2 - 1);
  EXPECT_EQ(serialized(held.s, restored(held.s, small)), serialized(held.s, b));
}

// A block a store could not have written, with codes far outside the quantizer's range (its
// centre base moved to 2^30; the values stay finite): restored as it is, and a transcoding store
// then keeps it as a tile block instead of failing to serialize.
TEST(StoreTranscode, CodesOutsideTheQuantizersRangeStayTileBlocks) {
  const Shape sh = transcode_shape();
  StoreHandle transcoding(tiles_config(sh, KVC_BLOCK_FORMAT_V1));
  StoreHandle held(tiles_config(sh, KVC_BLOCK_FORMAT_AUTO));
  std::mt19937 rng(21);
  Rows k, v;
  int32_t id = -1;
  ASSERT_NO_FATAL_FAILURE(add_prefilled(held.s, rng, sh, 2 * size_t(sh.tokens), id, k, v));
  const std::vector<uint8_t> bytes = serialized(held.s, id);
  auto seq = SerialSequence::parse(bytes.data(), bytes.size());
  ASSERT_TRUE(seq.has_value());
  // Codes near 2^30, and codes that wrap past INT32_MAX (a centre base of 2^31 - 128).
  for (uint32_t base : {1u << 30, 0x7FFFFF80u}) {
    SCOPED_TRACE(base);
    SerialSequence edited = *seq;
    std::vector<uint8_t>& block = edited.layers[0].blocks[0];  // block 0, head 0, K
    ASSERT_NE(block[tiles::offset::kFlags] & tiles::flag::kQuantized, 0);
    kvc_fuzz::store_word(&block[tiles::offset::kCenterBase], base);
    const int32_t crafted = restored(transcoding.s, edited.bytes());
    const std::vector<uint8_t> again = serialized(transcoding.s, crafted);
    const auto out = SerialSequence::parse(again.data(), again.size());
    ASSERT_TRUE(out.has_value());
    EXPECT_EQ(out->layers[0].transcoded[0], 0u);
    EXPECT_EQ(out->layers[0].blocks[0], block);
    EXPECT_EQ(out->layers[0].transcoded[1], 1u);
    EXPECT_EQ(serialized(transcoding.s, restored(transcoding.s, again)), again);
  }
}

TEST(StoreTranscode, ConfigIsChecked) {
  const kvc_store_config defaults = KVC_STORE_CONFIG_INIT;
  EXPECT_EQ(defaults.serialized_block_format, KVC_BLOCK_FORMAT_AUTO);
  const Shape sh = transcode_shape();
  kvc_store_config c = tiles_config(sh, 7);
  kvc_store_t s = nullptr;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(kvc_last_error()).find("serialized_block_format = 7"), std::string::npos)
      << kvc_last_error();
  c = tiles_config(sh, KVC_BLOCK_FORMAT_TILES);
  c.block_format = KVC_BLOCK_FORMAT_V1;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_NOT_SUPPORTED);
  EXPECT_EQ(s, nullptr);

  // V1 on a format v1 store: its blocks as held, as with AUTO.
  std::vector<uint8_t> bytes[2];
  for (int32_t i = 0; i < 2; ++i) {
    kvc_store_config v1 = tiles_config(sh, i ? KVC_BLOCK_FORMAT_V1 : KVC_BLOCK_FORMAT_AUTO);
    v1.block_format = KVC_BLOCK_FORMAT_V1;
    v1.entropy = KVC_ENTROPY_FIXED;
    StoreHandle st(v1);
    std::mt19937 rng(3);
    Rows k, v;
    int32_t id = -1;
    ASSERT_NO_FATAL_FAILURE(add_prefilled(st.s, rng, sh, 40, id, k, v));
    bytes[i] = serialized(st.s, id);
  }
  EXPECT_EQ(bytes[0], bytes[1]);
}

// A transcoding store's sequence of 2 blocks per layer, and the store that wrote it.
struct Written {
  std::vector<uint8_t> bytes;
  SerialSequence seq;
};
Written written(kvc_store_t s) {
  const Shape sh = transcode_shape();
  std::mt19937 rng(9);
  Rows k, v;
  int32_t id = -1;
  add_prefilled(s, rng, sh, 2 * size_t(sh.tokens), id, k, v);
  Written w{serialized(s, id), {}};
  w.seq = *SerialSequence::parse(w.bytes.data(), w.bytes.size());
  return w;
}

// The codec parameters of the shape's K tile blocks, with a bound of the given mode.
CodecParams key_tile_params(const Shape& sh, kvc_bound_mode mode, float bound) {
  return CodecParams::from_config(
      kvc_fuzz::tile_codec_config({sh.tokens, sh.dim, 0, 0}, KVC_KIND_KEY, mode, bound), false);
}

void expect_refused(kvc_store_t s, const std::vector<uint8_t>& bytes, const std::string& what,
                    kvc_status_t status = KVC_ERROR_CORRUPT_DATA) {
  const int32_t before = store_stats(s).num_sequences;
  int32_t id = -1;
  EXPECT_EQ(kvc_store_restore(s, bytes.data(), bytes.size(), &id), status) << what;
  EXPECT_NE(std::string(kvc_last_error()).find(what), std::string::npos) << kvc_last_error();
  EXPECT_EQ(store_stats(s).num_sequences, before);
}

TEST(StoreTranscode, DamagedRecordsAreRefused) {
  const Shape sh = transcode_shape();
  StoreHandle st(tiles_config(sh, KVC_BLOCK_FORMAT_V1));
  const Written w = written(st.s);
  ASSERT_EQ(w.seq.layers[1].transcoded[0], 1u);
  StoreHandle held(tiles_config(sh, KVC_BLOCK_FORMAT_AUTO));  // the same rows, as held
  const Written h = written(held.s);
  {  // A transcoded record read as a tile block.
    SerialSequence bad = w.seq;
    bad.layers[1].transcoded[0] = 0;
    expect_refused(st.s, bad.bytes(), "bad magic (not a kvcomp tile block)");
  }
  {  // A tile block read as format v1.
    SerialSequence bad = w.seq;
    bad.layers[1].blocks[0] = h.seq.layers[1].blocks[0];
    expect_refused(st.s, bad.bytes(), "(format v1 of a tile block): corrupt block: bad magic");
  }
  {  // Codes that need a raw tile: one K code 1000 steps from its channel's others.
    const CodecParams p = key_tile_params(sh, KVC_BOUND_ABSOLUTE, sh.key_bound);
    const std::vector<uint8_t>& tile = h.seq.layers[1].blocks[0];
    cpu::Quantized q = cpu::tile_block_codes(p, tile.data(), tile.size());
    ASSERT_TRUE(q.ok);
    q.codes[5] += 1000;
    SerialSequence bad = w.seq;
    bad.layers[1].blocks[0] = cpu::encode_codes(p.transcoded(), nullptr, q);
    expect_refused(st.s, bad.bytes(), "codes that need a raw tile");
  }
  {  // A record whose step layout is not its kind's: per-group steps in an absolute-K store.
    const CodecParams relative = key_tile_params(sh, KVC_BOUND_RELATIVE, 0.05f).transcoded();
    cpu::Quantized q;
    q.steps.assign(relative.num_groups, 0.125f);
    q.codes.assign(relative.num_elements(), 3);
    SerialSequence bad = w.seq;
    bad.layers[1].blocks[0] = cpu::encode_codes(relative, nullptr, q);
    expect_refused(st.s, bad.bytes(), "step layout");
  }
  {                      // A Huffman record without its codebook: the table entry emptied.
    size_t huffman = 0;  // a Huffman record of layer 0's K
    for (size_t i = 0; i < w.seq.layers[0].blocks.size(); i += 2) {
      const auto& b = w.seq.layers[0].blocks[i];
      if (w.seq.layers[0].transcoded[i] &&
          cpu::parse_header(b.data(), b.size()).encoding == format::kHuffman) {
        huffman = i + 1;
      }
    }
    ASSERT_NE(huffman, 0u) << "no Huffman record in layer 0's K";
    SerialSequence bad = w.seq;
    const size_t table = codebook_table_at(uint32_t(sh.layers));  // layer 0 K's entry
    const uint32_t m = kvc_fuzz::load_word(&bad.head[table]);
    ASSERT_GT(m, 0u);
    bad.head.erase(bad.head.begin() + long(table) + 4, bad.head.begin() + long(table + 4 + m));
    kvc_fuzz::store_word(&bad.head[table], 0);
    expect_refused(st.s, bad.bytes(), "codebook");

    // The same record as a Huffman block of two sub-streams (the writer makes one).
    const auto& record = w.seq.layers[0].blocks[huffman - 1];
    const Codebook book = Codebook::parse(&w.seq.head[table + 4], m);
    CodecParams two = key_tile_params(sh, KVC_BOUND_ABSOLUTE, sh.key_bound).transcoded();
    const cpu::Quantized q = cpu::decode_codes(two, &book, record.data(), record.size());
    two.num_substreams = 2;
    SerialSequence split = w.seq;
    split.layers[0].blocks[huffman - 1] = cpu::encode_codes(two, &book, q);
    const auto& b = split.layers[0].blocks[huffman - 1];
    ASSERT_EQ(cpu::parse_header(b.data(), b.size()).encoding, format::kHuffman);
    expect_refused(st.s, split.bytes(), "sub-stream count");
  }
  {  // A flagged record in a version that has no flags: a length past the end.
    SerialSequence bad = h.seq;
    bad.layers[0].transcoded.assign(bad.layers[0].blocks.size(), 0);
    bad.layers[0].transcoded[0] = 1;
    expect_refused(held.s, bad.bytes(), "truncated");
  }
  {  // A format v1 store does not read version 6.
    kvc_store_config c = tiles_config(sh, KVC_BLOCK_FORMAT_AUTO);
    c.block_format = KVC_BLOCK_FORMAT_V1;
    StoreHandle v1(c);
    expect_refused(v1.s, w.bytes, "written as format v1 (config->serialized_block_format)",
                   KVC_ERROR_CONFIG_MISMATCH);
  }
}

}  // namespace
}  // namespace kvc::test
