// SPDX-License-Identifier: Apache-2.0
#include "store/store.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <iterator>
#include <new>

#include "core/error.hpp"
#include "cpu/codec_cpu.hpp"
#include "cpu/tile_codec_cpu.hpp"
#include "cuda/cuda_attention.hpp"  // tile_attention_covers
#include "kernels/common/format.cuh"
#include "kernels/common/hadamard.cuh"
#include "kernels/store/next_fit.cuh"

namespace kvc {
namespace f = format;

namespace {

constexpr uint32_t kSerialMagic = 0x7363766Bu;  // bytes "kvcs"
// Version 1: stores of format v1 blocks. Version 2: the fingerprint gains a word for the block
// format (a tiles store writes 2; a v1 store keeps writing 1, which every reader takes).
// Version 3: a store that rotates its rows (kvc_store_config.rotation), of either block format;
// the fingerprint always has the block format word, then a word for the rotation. Version 4: a
// store that keeps attention sinks (kvc_store_config.sink_tokens), rotating or not: the
// fingerprint gains a word for the sink count, each layer record the sink rows. Version 5: a
// store with per-layer bounds (kvc_store_config.key_/value_layer_scales, some scale not 1): the
// fingerprint has all of version 4's words (the sink count even if 0), then the K scales and the
// V scales; the layer records are as in version 4.
constexpr uint32_t kSerialVersion = 1;
constexpr uint32_t kSerialVersionTiles = 2;
constexpr uint32_t kSerialVersionRotated = 3;
constexpr uint32_t kSerialVersionSinks = 4;
constexpr uint32_t kSerialVersionLayerScales = 5;
// Version 6: a tiles store's sequence with its blocks entropy-coded (serialized_block_format =
// V1): version 5's fingerprint words whatever the store (sink count and scales included), each
// (layer, K|V)'s serialized transcoding codebook instead of a codebook id, and block records
// whose top bit says "format v1 of the tile block's codes".
constexpr uint32_t kSerialVersionTranscoded = 6;
constexpr uint32_t kTranscodedBlock = 1u << 31;
constexpr size_t kSinksFingerprintWords = 15;  // version 4's, which version 5 starts with

// Whether the tile attention kernel covers a store shape (cuda::tile_attention_covers), V
// quantized per whole token.
bool tile_kernel_shape(const kvc_store_config& c) {
  return c.block_tokens > 0 && c.head_dim > 0 &&
         cuda::tile_attention_covers(uint32_t(c.block_tokens), uint32_t(c.head_dim)) &&
         (c.value_group_size == 0 || c.value_group_size == c.head_dim);
}

// The block format the configuration asks for, AUTO resolved (kvc_store_config.block_format).
bool wants_tiles(const kvc_store_config& c) {
  require(c.block_format == KVC_BLOCK_FORMAT_V1 || c.block_format == KVC_BLOCK_FORMAT_TILES ||
              c.block_format == KVC_BLOCK_FORMAT_AUTO,
          KVC_ERROR_INVALID_ARGUMENT, "config->block_format = ", c.block_format,
          " is not a kvc_block_format (KVC_BLOCK_FORMAT_V1 = 0, KVC_BLOCK_FORMAT_TILES = 1, ",
          "KVC_BLOCK_FORMAT_AUTO = 2)");
  if (c.block_format == KVC_BLOCK_FORMAT_AUTO) {
    // Tiles where attention runs on the GPU and has a tile kernel, unless the configuration
    // asks for what only format v1 has: Huffman codes or a sub-stream count.
    return c.backend == KVC_BACKEND_CUDA && tile_kernel_shape(c) &&
           c.entropy != KVC_ENTROPY_HUFFMAN && c.num_substreams == 0;
  }
  return c.block_format == KVC_BLOCK_FORMAT_TILES;
}

// bound: the kind's error bound (the scalar bound, or a layer's).
CodecParams kind_params(const kvc_store_config& c, bool is_value, bool tiles, float bound) {
  kvc_codec_config k = KVC_CODEC_CONFIG_INIT;
  k.backend = KVC_BACKEND_CPU;
  k.kind = is_value ? KVC_KIND_VALUE : KVC_KIND_KEY;
  k.num_tokens = c.block_tokens;
  k.head_dim = c.head_dim;
  k.value_group_size = is_value ? c.value_group_size : 0;
  k.bound_mode = is_value ? c.value_bound_mode : c.key_bound_mode;
  k.error_bound = bound;
  k.entropy = c.entropy;  // checked, and ignored by tiles
  // Tiles have no sub-streams: the field is ignored, not checked against the group size.
  k.num_substreams = tiles ? 0 : c.num_substreams;
  k.block_format = tiles ? KVC_BLOCK_FORMAT_TILES : KVC_BLOCK_FORMAT_V1;
  k.tile_permute_channels = c.tile_permute_channels;
  k.tile_split_widths = c.tile_split_widths;
  return CodecParams::from_config(k, /*has_codebook=*/true);
}

}  // namespace

StoreParams StoreParams::from_config(const kvc_store_config& c) {
  check_struct_header(c, "config");
  require(c.backend == KVC_BACKEND_CPU || c.backend == KVC_BACKEND_CUDA, KVC_ERROR_INVALID_ARGUMENT,
          "config->backend = ", c.backend, " is not a kvc_backend");
  require(c.num_layers >= 1 && c.num_layers <= 4096, KVC_ERROR_INVALID_ARGUMENT,
          "config->num_layers = ", c.num_layers, " is out of range [1, 4096]");
  require(c.num_kv_heads >= 1 && c.num_kv_heads <= 1024, KVC_ERROR_INVALID_ARGUMENT,
          "config->num_kv_heads = ", c.num_kv_heads, " is out of range [1, 1024]");
  require(c.dtype == KVC_DTYPE_FP16 || c.dtype == KVC_DTYPE_BF16, KVC_ERROR_INVALID_ARGUMENT,
          "config->dtype = ", c.dtype, " must be KVC_DTYPE_FP16 or KVC_DTYPE_BF16");
  require(c.max_sequences >= 0 && c.max_sequences <= (1 << 20), KVC_ERROR_INVALID_ARGUMENT,
          "config->max_sequences = ", c.max_sequences, " is out of range [0, 2^20]");
  require(c.max_sequence_tokens >= 0, KVC_ERROR_INVALID_ARGUMENT,
          "config->max_sequence_tokens = ", c.max_sequence_tokens, " is negative");
  require(c.backend == KVC_BACKEND_CPU || (c.max_sequences > 0 && c.max_sequence_tokens > 0),
          KVC_ERROR_INVALID_ARGUMENT, "the CUDA store needs config->max_sequences (",
          c.max_sequences, ") and config->max_sequence_tokens (", c.max_sequence_tokens,
          ") > 0: they size its device tables");
  StoreParams p{};
  p.backend = kvc_backend(c.backend);
  p.max_sequences = uint32_t(c.max_sequences);
  p.max_sequence_tokens = uint32_t(c.max_sequence_tokens);
  p.config = c;
  // The codec checks head_dim, block_tokens, bounds, value groups and entropy, naming the codec
  // field; say which store fields those are.
  const bool tiles = wants_tiles(c);
  try {
    p.key = kind_params(c, false, tiles, c.key_error_bound);
    p.value = kind_params(c, true, tiles, c.value_error_bound);
  } catch (const Error& e) {
    fail(e.status(), e.what(), " (store fields: head_dim, block_tokens, key_/value_bound_mode, ",
         "key_/value_error_bound, value_group_size, entropy, num_substreams, block_format, ",
         "tile_permute_channels, tile_split_widths)");
  }
  // Per-layer bounds: the scalar bound times the layer's scale, each checked as the codec
  // checks a bound. The arrays are read here only (the stored config must not keep them).
  p.config.key_layer_scales = p.config.value_layer_scales = nullptr;
  p.layer_codecs.resize(size_t(c.num_layers) * 2);
  for (uint32_t kind = 0; kind < 2; ++kind) {
    const bool is_value = kind == KVC_KIND_VALUE;
    const float* given = is_value ? c.value_layer_scales : c.key_layer_scales;
    const char* field = is_value ? "value" : "key";
    const float scalar = is_value ? c.value_error_bound : c.key_error_bound;
    std::vector<float>& scales = p.layer_scales[kind];
    scales.assign(size_t(c.num_layers), 1.0f);
    if (given) std::copy(given, given + c.num_layers, scales.begin());
    for (int32_t l = 0; l < c.num_layers; ++l) {
      const float scale = scales[size_t(l)];
      require(std::isfinite(scale) && scale > 0.0f, KVC_ERROR_INVALID_ARGUMENT, "config->", field,
              "_layer_scales[", l, "] = ", scale, " must be finite and > 0");
      CodecParams& cp = p.layer_codecs[size_t(l) * 2 + kind];
      cp = is_value ? p.value : p.key;
      if (scale == 1.0f) continue;  // the scalar bound, checked above
      const float bound = scalar * scale;
      try {
        cp = kind_params(c, is_value, tiles, bound);
      } catch (const Error& e) {
        fail(e.status(), "layer ", l, "'s ", is_value ? "V" : "K", " bound ", field,
             "_error_bound * ", field, "_layer_scales[", l, "] = ", scalar, " * ", scale, " = ",
             bound, ": ", e.what(), " (store fields: ", field, "_bound_mode, ", field,
             "_error_bound, ", field, "_layer_scales)");
      }
    }
  }
  // Fields valid (the codec checked them): a CUDA store of tiles also needs the tile kernel.
  require(!tiles || c.backend != KVC_BACKEND_CUDA || tile_kernel_shape(c), KVC_ERROR_NOT_SUPPORTED,
          "config->block_format = KVC_BLOCK_FORMAT_TILES on the CUDA backend needs what the tile "
          "attention kernel reads: block_tokens 64 or 128, head_dim 64, 128 or 256 with "
          "block_tokens * head_dim <= 16384, value_group_size 0 or head_dim; but block_tokens = ",
          c.block_tokens, ", head_dim = ", c.head_dim, ", value_group_size = ", c.value_group_size);
  require(c.rotation == KVC_ROTATION_NONE || c.rotation == KVC_ROTATION_HADAMARD ||
              c.rotation == KVC_ROTATION_HADAMARD_VALUES,
          KVC_ERROR_INVALID_ARGUMENT, "config->rotation = ", c.rotation,
          " is not a kvc_rotation (KVC_ROTATION_NONE = 0, KVC_ROTATION_HADAMARD = 1, ",
          "KVC_ROTATION_HADAMARD_VALUES = 2)");
  require(c.rotation == KVC_ROTATION_NONE || hadamard::valid_dim(uint32_t(c.head_dim)),
          KVC_ERROR_NOT_SUPPORTED, "config->rotation = ", c.rotation,
          " (a Hadamard rotation) needs head_dim a power of two (the Sylvester Hadamard ",
          "matrix), but head_dim = ", c.head_dim);
  p.rotates = {c.rotation == KVC_ROTATION_HADAMARD, c.rotation != KVC_ROTATION_NONE};
  // block_tokens is valid here (the codec checked it).
  require(c.sink_tokens >= 0 && c.sink_tokens < c.block_tokens, KVC_ERROR_INVALID_ARGUMENT,
          "config->sink_tokens = ", c.sink_tokens,
          " is out of range [0, block_tokens - 1 = ", c.block_tokens - 1, "]");
  p.sink_tokens = uint32_t(c.sink_tokens);
  require(c.serialized_block_format == KVC_BLOCK_FORMAT_V1 ||
              c.serialized_block_format == KVC_BLOCK_FORMAT_TILES ||
              c.serialized_block_format == KVC_BLOCK_FORMAT_AUTO,
          KVC_ERROR_INVALID_ARGUMENT,
          "config->serialized_block_format = ", c.serialized_block_format,
          " is not a kvc_block_format (KVC_BLOCK_FORMAT_V1 = 0, KVC_BLOCK_FORMAT_TILES = 1, ",
          "KVC_BLOCK_FORMAT_AUTO = 2)");
  require(tiles || c.serialized_block_format != KVC_BLOCK_FORMAT_TILES, KVC_ERROR_NOT_SUPPORTED,
          "config->serialized_block_format = KVC_BLOCK_FORMAT_TILES: a store of format v1 ",
          "blocks serializes them as they are (set it to KVC_BLOCK_FORMAT_AUTO)");
  p.transcodes = tiles && c.serialized_block_format == KVC_BLOCK_FORMAT_V1;
  p.num_layers = uint32_t(c.num_layers);
  p.num_heads = uint32_t(c.num_kv_heads);
  p.head_dim = uint32_t(c.head_dim);
  p.block_tokens = uint32_t(c.block_tokens);
  p.dtype = kvc_dtype(c.dtype);
  const size_t largest = std::max(p.key.max_block_bytes(p.dtype), p.value.max_block_bytes(p.dtype));
  size_t page = size_t(c.page_bytes);
  if (c.page_bytes == 0) page = (largest + 65535) / 65536 * 65536;
  require(c.page_bytes >= 0 && page % 256 == 0 && page >= largest && page <= (size_t(1) << 30),
          KVC_ERROR_INVALID_ARGUMENT, "config->page_bytes = ", c.page_bytes,
          " must be a multiple of 256 in [", largest, " (the largest block), 2^30], or 0");
  p.page_bytes = uint32_t(page);
  require(c.capacity_bytes >= int64_t(page), KVC_ERROR_INVALID_ARGUMENT,
          "config->capacity_bytes = ", c.capacity_bytes, " holds no page of ", page, " bytes");
  const int64_t pages = c.capacity_bytes / int64_t(page);
  require(pages < int64_t(UINT32_MAX), KVC_ERROR_INVALID_ARGUMENT,
          "config->capacity_bytes = ", c.capacity_bytes, " makes more than 2^32 - 1 pages");
  p.num_pages = uint32_t(pages);
  return p;
}

bool StoreParams::layer_scaled() const {
  for (const auto& scales : layer_scales) {
    if (std::any_of(scales.begin(), scales.end(), [](float s) { return s != 1.0f; })) return true;
  }
  return false;
}

Store::Store(const StoreParams& params)
    : p_(params),
      pool_(new uint8_t[size_t(params.num_pages) * params.page_bytes]),
      books_(size_t(params.num_layers) * 2),
      compressed_(params.num_layers, false) {
  free_pages_.reserve(p_.num_pages);
  for (uint32_t i = p_.num_pages; i-- > 0;) free_pages_.push_back(i);  // page 0 on top
}

int32_t Store::add_sequence() {
  require(next_id_ < INT32_MAX, KVC_ERROR_OUT_OF_MEMORY, "sequence ids are exhausted");
  require(p_.max_sequences == 0 || sequences_.size() < p_.max_sequences, KVC_ERROR_OUT_OF_MEMORY,
          "the store holds config->max_sequences = ", p_.max_sequences, " live sequences");
  sequences_.emplace(next_id_, std::vector<LayerCache>(p_.num_layers));
  return next_id_++;
}

void Store::free_sequence(int32_t id) {
  for (const LayerCache& cache : sequence(id)) {
    free_pages_.insert(free_pages_.end(), cache.pages.rbegin(), cache.pages.rend());
  }
  drop_decoded(id);
  sequences_.erase(id);
}

const std::vector<LayerCache>& Store::sequence(int32_t id) const {
  auto it = sequences_.find(id);
  require(it != sequences_.end(), KVC_ERROR_UNKNOWN_SEQUENCE, "sequence_id = ", id,
          " is not a live sequence");
  return it->second;
}

const LayerCache& Store::layer_cache(int32_t id, uint32_t layer) const {
  return sequence(id)[layer];
}

uint32_t Store::length(int32_t id, uint32_t layer) const {
  const LayerCache& c = layer_cache(id, layer);
  return c.num_blocks * p_.block_tokens + c.tail_tokens;
}

void Store::set_codebook(uint32_t layer, uint32_t kind, std::shared_ptr<const Codebook> book) {
  require(!compressed_[layer], KVC_ERROR_INVALID_ARGUMENT, "layer ", layer,
          " has compressed blocks already: its codebooks are frozen");
  books_[layer * 2 + kind] = std::move(book);
}

// ---- Appending -----------------------------------------------------------------------------

struct Store::Update {
  int32_t id;
  uint32_t layer;
  uint32_t full_blocks;                      // token blocks compressed by this update
  std::vector<uint8_t> rows_k, rows_v;       // old tail + new tokens: [n, heads, dim]
  std::vector<std::vector<uint8_t>> blocks;  // [full_blocks, heads, 2 (K, V)] encoded
  uint32_t tail_tokens;                      // tokens left in the tail afterwards
  std::vector<uint8_t> tail_k, tail_v;       // and their rows
  std::vector<uint8_t> sink_k, sink_v;       // the sink rows, if the layer's first block is new
  bool freezes_books = true;                 // whether its blocks freeze the layer's codebooks
};

void convert_elements(const uint8_t* src, kvc_dtype from, uint8_t* dst, kvc_dtype to,
                      size_t count) {
  cpu::with_loader(src, from, [&](auto load) {
    cpu::with_storer(dst, to, [&](auto store) {
      for (size_t i = 0; i < count; ++i) store(i, load(i));
    });
  });
}

uint32_t encode_store_block(const CodecParams& cp, const Codebook* book, const uint8_t* src,
                            int64_t stride, kvc_dtype dtype, uint8_t* dst) {
  if (cp.tiles) return cpu::encode_tile_block(cp, src, stride, dtype, dst);
  return cpu::encode_block(cp, book, src, stride, dtype, dst);
}

void decode_store_block(const CodecParams& cp, const Codebook* book, const uint8_t* src,
                        uint32_t bytes, kvc_dtype dtype, void* dst, int64_t stride) {
  if (cp.tiles) return cpu::decode_tile_block(cp, src, bytes, dtype, dst, stride);
  cpu::decode_block(cp, book, src, bytes, dtype, dst, stride);
}

std::shared_ptr<const Codebook> build_layer_codebook(const Histogram& histogram) {
  const kvc_codebook_config defaults = KVC_CODEBOOK_CONFIG_INIT;
  return std::make_shared<const Codebook>(
      Codebook::build(histogram, defaults.max_code_length, defaults.max_symbols));
}

void rotate_rows(const StoreParams& p, uint8_t* rows, size_t tokens) {
  const bool bf16 = p.dtype == KVC_DTYPE_BF16;
  std::vector<float> x(p.head_dim);
  auto* e = reinterpret_cast<uint16_t*>(rows);
  for (size_t r = 0; r < tokens * p.num_heads; ++r, e += p.head_dim) {
    uint16_t bits;
    for (uint32_t d = 0; d < p.head_dim; ++d) {
      std::memcpy(&bits, e + d, 2);
      x[d] = hadamard::load16(bits, bf16);
    }
    hadamard::rotate(x.data(), p.head_dim);
    for (uint32_t d = 0; d < p.head_dim; ++d) {
      bits = hadamard::store16(x[d], bf16);
      std::memcpy(e + d, &bits, 2);
    }
  }
}

void rotate_floats(const StoreParams& p, float* x, size_t count) {
  for (size_t r = 0; r < count; ++r) hadamard::rotate(x + r * p.head_dim, p.head_dim);
}

// Whether `count` rows of head_dim floats of `kind` read back finite: they are finite and, for a
// kind the store rotates, so is their rotation back, in floats as a read does it (sums of values
// near the float limit overflow). x is left rotated.
bool read_back_finite(const StoreParams& p, uint32_t kind, float* x, size_t count) {
  const auto finite = [&] {
    return std::all_of(x, x + count * p.head_dim, [](float v) { return std::isfinite(v); });
  };
  if (!finite()) return false;
  if (!p.rotates[kind]) return true;
  rotate_floats(p, x, count);
  return finite();
}
// The same for rows [tokens, heads, dim] of the store's dtype.
bool rows_read_back_finite(const StoreParams& p, uint32_t kind, const uint8_t* rows,
                           size_t tokens) {
  if (!p.rotates[kind]) return finite_rows(p, rows, tokens);
  std::vector<float> x(tokens * p.num_heads * p.head_dim);
  for (size_t e = 0; e < x.size(); ++e) x[e] = cpu::load_element(rows, p.dtype, e);
  return read_back_finite(p, kind, x.data(), tokens * p.num_heads);
}

bool finite_rows(const StoreParams& p, const uint8_t* rows, size_t tokens) {
  return cpu::all_finite(rows, p.dtype, 0, tokens * p.num_heads * p.head_dim);
}

Store::Update Store::plan_update(int32_t id, uint32_t layer, uint32_t num_tokens,
                                 const uint8_t* keys, const uint8_t* values,
                                 size_t row_stride) const {
  const LayerCache& cache = layer_cache(id, layer);
  require(length(id, layer) + uint64_t(num_tokens) <= p_.token_limit(), KVC_ERROR_INVALID_ARGUMENT,
          "sequence ", id, " layer ", layer, " would hold ", length(id, layer) + num_tokens,
          " tokens, more than ", p_.token_limit(), " (config->max_sequence_tokens, or 2^31 - 1)");
  const size_t row = p_.token_bytes();
  Update u{id, layer, 0, cache.tail_k, cache.tail_v, {}, 0, {}, {}, {}, {}};
  for (uint32_t t = 0; t < num_tokens; ++t) {
    const uint8_t* k = keys + t * row_stride;
    const uint8_t* v = values + t * row_stride;
    require(finite_rows(p_, k, 1) && finite_rows(p_, v, 1), KVC_ERROR_NONFINITE_INPUT, "sequence ",
            id, " layer ", layer, " token ", t, " holds inf or NaN (inputs must be finite)");
    u.rows_k.insert(u.rows_k.end(), k, k + row);
    u.rows_v.insert(u.rows_v.end(), v, v + row);
    for (uint32_t kind = 0; kind < 2; ++kind) {  // the store holds rotated rows, tails too
      if (!p_.rotates[kind]) continue;
      std::vector<uint8_t>& rows = kind == KVC_KIND_KEY ? u.rows_k : u.rows_v;
      uint8_t* r = rows.data() + rows.size() - row;
      rotate_rows(p_, r, 1);
      // Rotated back in fp32 when read, it must stay finite too (bf16 values above about
      // FLT_MAX / sqrt(head_dim) sum past the fp32 range).
      require(rows_read_back_finite(p_, kind, r, 1), KVC_ERROR_NONFINITE_INPUT, "sequence ", id,
              " layer ", layer, " token ", t, ": its rotated ", kind == KVC_KIND_KEY ? "K" : "V",
              " row (config->rotation) leaves the range of the store's dtype, or does not rotate "
              "back within fp32");
    }
  }
  const uint32_t total = cache.tail_tokens + num_tokens;
  u.full_blocks = total / p_.block_tokens;
  u.tail_tokens = total % p_.block_tokens;
  const size_t kept = size_t(u.full_blocks) * p_.block_tokens * row;
  u.tail_k.assign(u.rows_k.begin() + long(kept), u.rows_k.end());
  u.tail_v.assign(u.rows_v.begin() + long(kept), u.rows_v.end());
  if (cache.num_blocks == 0 && u.full_blocks > 0) {  // the rows start at token 0
    const size_t sinks = size_t(p_.sink_tokens) * row;
    u.sink_k.assign(u.rows_k.begin(), u.rows_k.begin() + long(sinks));
    u.sink_v.assign(u.rows_v.begin(), u.rows_v.begin() + long(sinks));
  }
  return u;
}

// Encodes the complete blocks of every update of one layer, building the layer's codebooks from
// them first if the layer has none yet. Returns the layer's codebooks, to be frozen only if the
// whole operation commits.
Store::LayerBooks Store::encode_updates(uint32_t layer, std::vector<Update>& updates) const {
  const int64_t stride = int64_t(p_.num_heads) * p_.head_dim;
  const size_t es = f::dtype_bytes(p_.dtype);
  auto block_src = [&](const Update& u, uint32_t b, uint32_t h, uint32_t kind) {
    const auto& rows = kind == KVC_KIND_KEY ? u.rows_k : u.rows_v;
    return rows.data() + (size_t(b) * p_.block_tokens * stride + size_t(h) * p_.head_dim) * es;
  };
  LayerBooks books = {books_[layer * 2], books_[layer * 2 + 1]};
  // No block to compress (a decode step inside a block): no codebook to build, and no 512 KiB
  // histogram to allocate and scan on every step.
  const bool compresses = std::any_of(updates.begin(), updates.end(),
                                      [](const Update& u) { return u.full_blocks > 0; });
  for (uint32_t kind = 0; kind < 2; ++kind) {
    const CodecParams& cp = p_.codec(layer, kind);
    // Tiles have no Huffman symbols: a tiles store builds no codebooks.
    if (books[kind] || cp.tiles || cp.entropy == KVC_ENTROPY_FIXED || !compresses) continue;
    Histogram histogram;
    for (const Update& u : updates) {
      for (uint32_t b = 0; b < u.full_blocks; ++b) {
        for (uint32_t h = 0; h < p_.num_heads; ++h) {
          cpu::histogram_block(cp, block_src(u, b, h, kind), stride, p_.dtype, histogram);
        }
      }
    }
    if (histogram.total() == 0) continue;  // nothing compressed yet: no codebook yet
    books[kind] = build_layer_codebook(histogram);
  }
  std::vector<uint8_t> scratch(
      std::max(p_.key.max_block_bytes(p_.dtype), p_.value.max_block_bytes(p_.dtype)));
  for (Update& u : updates) {
    u.blocks.reserve(size_t(u.full_blocks) * p_.num_heads * 2);
    for (uint32_t b = 0; b < u.full_blocks; ++b) {
      for (uint32_t h = 0; h < p_.num_heads; ++h) {
        for (uint32_t kind = 0; kind < 2; ++kind) {
          const uint32_t n =
              encode_store_block(p_.codec(layer, kind), books[kind].get(), block_src(u, b, h, kind),
                                 stride, p_.dtype, scratch.data());
          u.blocks.emplace_back(scratch.begin(), scratch.begin() + n);
        }
      }
    }
  }
  return books;
}

uint32_t Store::pages_needed(const LayerCache& cache,
                             const std::vector<std::vector<uint8_t>>& blocks) const {
  uint32_t used = cache.pages.empty() ? p_.page_bytes : cache.open_used, pages = 0, offset;
  for (const auto& block : blocks) {
    // Encoders and parse_image keep blocks below max_block_bytes, which fits a page; commit
    // copies a block into one page, so this is what keeps it inside the page.
    require(block.size() <= p_.page_bytes, KVC_ERROR_INTERNAL, "a block of ", block.size(),
            " bytes does not fit a page of ", p_.page_bytes);
    pages += place_next_fit(used, uint32_t(block.size()), p_.page_bytes,
                            block_alignment(p_.tiles()), offset);
  }
  return pages;
}

void Store::commit(Transaction& tx) {
  uint64_t needed = 0;
  for (const Update& u : tx.updates) needed += pages_needed(layer_cache(u.id, u.layer), u.blocks);
  require(needed <= free_pages_.size(), KVC_ERROR_OUT_OF_PAGES, "needs ", needed, " more pages of ",
          p_.page_bytes, " bytes but ", free_pages_.size(), " are free (nothing was changed)");
  // Everything that can throw (allocation) happens before the first change.
  std::vector<LayerCache*> caches;
  for (const Update& u : tx.updates) {
    LayerCache& c = sequences_.at(u.id)[u.layer];
    c.blocks.reserve(c.blocks.size() + u.blocks.size());
    c.pages.reserve(c.pages.size() + u.blocks.size());
    caches.push_back(&c);
  }
  for (size_t i = 0; i < tx.updates.size(); ++i) {
    Update& u = tx.updates[i];
    LayerCache& c = *caches[i];
    uint32_t used = c.pages.empty() ? p_.page_bytes : c.open_used, offset;
    for (const auto& block : u.blocks) {
      const uint32_t size = uint32_t(block.size());
      if (place_next_fit(used, size, p_.page_bytes, block_alignment(p_.tiles()), offset)) {
        c.pages.push_back(free_pages_.back());
        free_pages_.pop_back();
      }
      const uint32_t page = c.pages.back();
      std::memcpy(&pool_[size_t(page) * p_.page_bytes + offset], block.data(), size);
      c.blocks.push_back({page, offset, size});
    }
    if (!u.blocks.empty()) c.open_used = used;
    c.num_blocks += u.full_blocks;
    c.tail_k.swap(u.tail_k);
    c.tail_v.swap(u.tail_v);
    c.tail_tokens = u.tail_tokens;
    if (!u.sink_k.empty()) {  // the layer's first block is new: its sinks come with it
      c.sink_k.swap(u.sink_k);
      c.sink_v.swap(u.sink_v);
    }
  }
  for (const auto& [layer, books] : tx.books) {
    books_[layer * 2] = books[0];
    books_[layer * 2 + 1] = books[1];
  }
  for (const Update& u : tx.updates) {
    if (u.full_blocks > 0 && u.freezes_books) compressed_[u.layer] = true;
  }
}

template <class F>
void Store::recording_outcome(F&& operation) {
  try {
    operation();
    last_append_status_ = KVC_SUCCESS;
  } catch (const Error& e) {
    last_append_status_ = e.status();
    ++failed_appends_;
    throw;
  } catch (const std::bad_alloc&) {  // api_call's status for it
    last_append_status_ = KVC_ERROR_OUT_OF_MEMORY;
    ++failed_appends_;
    throw;
  }
}

void Store::prefill(int32_t id, uint32_t first_layer, uint32_t num_layers, uint32_t num_tokens,
                    const uint8_t* keys, const uint8_t* values) {
  recording_outcome(
      [&] { prefill_all_layers(id, first_layer, num_layers, num_tokens, keys, values); });
}

void Store::prefill_all_layers(int32_t id, uint32_t first_layer, uint32_t num_layers,
                               uint32_t num_tokens, const uint8_t* keys, const uint8_t* values) {
  Transaction tx;
  const size_t layer_bytes = size_t(num_tokens) * p_.token_bytes();
  for (uint32_t l = 0; l < num_layers; ++l) {
    std::vector<Update> one;
    one.push_back(plan_update(id, first_layer + l, num_tokens, keys + l * layer_bytes,
                              values + l * layer_bytes, p_.token_bytes()));
    tx.books.emplace_back(first_layer + l, encode_updates(first_layer + l, one));
    tx.updates.push_back(std::move(one.front()));
  }
  commit(tx);
}

void Store::append(uint32_t layer, const std::vector<int32_t>& ids, const uint8_t* keys,
                   const uint8_t* values) {
  recording_outcome([&] { append_one_token(layer, ids, keys, values); });
}

void Store::append_one_token(uint32_t layer, const std::vector<int32_t>& ids, const uint8_t* keys,
                             const uint8_t* values) {
  Transaction tx;
  const size_t row = p_.token_bytes();
  for (size_t i = 0; i < ids.size(); ++i) {  // distinct: checked by the API
    tx.updates.push_back(plan_update(ids[i], layer, 1, keys + i * row, values + i * row, row));
  }
  tx.books.emplace_back(layer, encode_updates(layer, tx.updates));
  commit(tx);
}

// ---- Reading -------------------------------------------------------------------------------

void Store::decode_block_rows(const LayerCache& c, uint32_t layer, uint32_t block, uint32_t head,
                              uint32_t kind, float* dst) const {
  const uint32_t dim = p_.head_dim;
  const BlockRef& r = c.blocks[(size_t(block) * p_.num_heads + head) * 2 + kind];
  decode_store_block(p_.codec(layer, kind), books_[layer * 2 + kind].get(),
                     &pool_[size_t(r.page) * p_.page_bytes + r.offset], r.bytes, KVC_DTYPE_FP32,
                     dst, dim);
  if (block != 0) return;
  const auto& sinks = kind == KVC_KIND_KEY ? c.sink_k : c.sink_v;
  for (uint32_t t = 0; t < p_.sinks_held(c.num_blocks); ++t) {
    for (uint32_t d = 0; d < dim; ++d) {
      dst[size_t(t) * dim + d] =
          cpu::load_element(sinks.data(), p_.dtype, (size_t(t) * p_.num_heads + head) * dim + d);
    }
  }
}

std::vector<float> Store::decode_head(const LayerCache& c, uint32_t layer, uint32_t head,
                                      uint32_t kind) const {
  const uint32_t dim = p_.head_dim, T = p_.block_tokens;
  std::vector<float> out(size_t(c.num_blocks * T + c.tail_tokens) * dim);
  for (uint32_t b = 0; b < c.num_blocks; ++b) {
    decode_block_rows(c, layer, b, head, kind, &out[size_t(b) * T * dim]);
  }
  const auto& tail = kind == KVC_KIND_KEY ? c.tail_k : c.tail_v;
  for (uint32_t t = 0; t < c.tail_tokens; ++t) {
    for (uint32_t d = 0; d < dim; ++d) {
      out[(size_t(c.num_blocks) * T + t) * dim + d] =
          cpu::load_element(tail.data(), p_.dtype, (size_t(t) * p_.num_heads + head) * dim + d);
    }
  }
  if (p_.rotates[kind]) rotate_floats(p_, out.data(), out.size() / dim);  // to the caller's space
  return out;
}

void Store::read(int32_t id, uint32_t layer, kvc_dtype dtype, void* keys, void* values) const {
  const LayerCache& c = layer_cache(id, layer);
  const size_t dim = p_.head_dim, heads = p_.num_heads;
  for (uint32_t kind = 0; kind < 2; ++kind) {
    void* dst = kind == KVC_KIND_KEY ? keys : values;
    for (uint32_t h = 0; h < heads; ++h) {
      const std::vector<float> x = decode_head(c, layer, h, kind);
      for (size_t t = 0; t < x.size() / dim; ++t) {
        for (size_t d = 0; d < dim; ++d) {
          cpu::store_element(dst, dtype, (t * heads + h) * dim + d, x[t * dim + d]);
        }
      }
    }
  }
}

const Store::DecodedLayer& Store::decoded_layer(int32_t id, uint32_t layer) const {
  const LayerCache& c = layer_cache(id, layer);
  const uint32_t dim = p_.head_dim, T = p_.block_tokens, heads = p_.num_heads;
  auto entry = decoded_.find({id, layer});
  if (entry == decoded_.end()) {  // a new entry enters whole or not at all
    DecodedLayer fresh;
    fresh.k.resize(heads);
    fresh.v.resize(heads);
    entry = decoded_.emplace(std::pair{id, layer}, std::move(fresh)).first;
  }
  DecodedLayer& dec = entry->second;
  if (dec.num_blocks == c.num_blocks) return dec;
  // Decode the new blocks into scratch, and make room in every row vector, before changing
  // any: a block that fails to decode, or memory that runs out, leaves the entry as it was.
  const uint32_t added = c.num_blocks - dec.num_blocks;
  std::vector<std::vector<float>> k(heads), v(heads);
  std::vector<float> rows(size_t(T) * dim);
  for (uint32_t h = 0; h < heads; ++h) {
    k[h].resize(size_t(added) * T * dim);
    v[h].resize(size_t(added) * T * dim);
    for (uint32_t b = 0; b < added; ++b) {
      for (uint32_t kind = 0; kind < 2; ++kind) {
        float* dst = kind == KVC_KIND_KEY ? rows.data() : &v[h][size_t(b) * T * dim];
        decode_block_rows(c, layer, dec.num_blocks + b, h, kind, dst);
      }
      float* kt = &k[h][size_t(b) * T * dim];
      for (uint32_t t = 0; t < T; ++t) {
        for (uint32_t d = 0; d < dim; ++d) kt[size_t(d) * T + t] = rows[size_t(t) * dim + d];
      }
    }
  }
  std::vector<std::vector<float>> grown(2 * size_t(heads));  // copies with room, where needed
  for (uint32_t i = 0; i < 2 * heads; ++i) {
    const std::vector<float>& have = i < heads ? dec.k[i] : dec.v[i - heads];
    const size_t need = have.size() + size_t(added) * T * dim;
    if (need > have.capacity()) {
      grown[i].reserve(std::max(need, 2 * have.capacity()));
      grown[i].assign(have.begin(), have.end());
    }
  }
  for (uint32_t i = 0; i < 2 * heads; ++i) {  // nothing below allocates
    std::vector<float>& have = i < heads ? dec.k[i] : dec.v[i - heads];
    const std::vector<float>& rows = i < heads ? k[i] : v[i - heads];
    if (grown[i].capacity() > 0) have.swap(grown[i]);
    have.insert(have.end(), rows.begin(), rows.end());
  }
  dec.num_blocks = c.num_blocks;
  return dec;
}

void Store::drop_decoded(int32_t id) {
  decoded_.erase(decoded_.lower_bound({id, 0}), decoded_.upper_bound({id, UINT32_MAX}));
}

// The reference arithmetic: fp32 K and V, per query head dot = sum over d in order of
// double(q[d]) * k[d], score = double(scale) * dot, w = exp(score - max), out = (sum_t w v_t) /
// (sum_t w), all in double and in token order. Loops run over tokens (K) and channels (V) so
// that they vectorize; with -ffp-contract=off every value is the same as in a plain loop.
void Store::attend_head(const LayerCache& c, const DecodedLayer& dec, uint32_t h, uint32_t q_heads,
                        float scale, const uint8_t* q, uint8_t* out) const {
  const uint32_t dim = p_.head_dim, T = p_.block_tokens, group = q_heads / p_.num_heads;
  const size_t es = f::dtype_bytes(p_.dtype);
  const size_t blocked = size_t(dec.num_blocks) * T, tail = c.tail_tokens, len = blocked + tail;
  // The tail in the same layouts: K transposed [dim, tail], V [tail, dim].
  std::vector<float> tail_k(tail * dim), tail_v(tail * dim);
  for (size_t t = 0; t < tail; ++t) {
    for (uint32_t d = 0; d < dim; ++d) {
      const size_t at = (t * p_.num_heads + h) * dim + d;
      tail_k[size_t(d) * tail + t] = cpu::load_element(c.tail_k.data(), p_.dtype, at);
      tail_v[t * dim + d] = cpu::load_element(c.tail_v.data(), p_.dtype, at);
    }
  }
  std::vector<double> score(len), acc(dim), qd(dim);
  std::vector<float> qf(dim);  // the query, then the output, as floats (rotated if the store is)
  for (uint32_t g = 0; g < group; ++g) {
    const size_t qh = size_t(h) * group + g;
    uint8_t* ov = out + qh * dim * es;
    if (len == 0) {
      for (uint32_t d = 0; d < dim; ++d) cpu::store_element(ov, p_.dtype, d, 0.0f);
      continue;
    }
    for (uint32_t d = 0; d < dim; ++d) qf[d] = cpu::load_element(q + qh * dim * es, p_.dtype, d);
    if (p_.rotates[KVC_KIND_KEY]) rotate_floats(p_, qf.data(), 1);  // q'.k' = q.k
    for (uint32_t d = 0; d < dim; ++d) qd[d] = double(qf[d]);
    std::fill(score.begin(), score.end(), 0.0);
    for (uint32_t b = 0; b < dec.num_blocks; ++b) {
      const float* kt = &dec.k[h][size_t(b) * T * dim];
      double* sb = &score[size_t(b) * T];
      for (uint32_t d = 0; d < dim; ++d) {
        const double x = qd[d];
        const float* row = kt + size_t(d) * T;
        for (uint32_t t = 0; t < T; ++t) sb[t] += x * row[t];
      }
    }
    for (uint32_t d = 0; d < dim; ++d) {
      const double x = qd[d];
      const float* row = tail_k.data() + size_t(d) * tail;  // no tail: empty, not indexed
      for (size_t t = 0; t < tail; ++t) score[blocked + t] += x * row[t];
    }
    double top = -INFINITY, sum = 0;
    for (size_t t = 0; t < len; ++t) {
      score[t] *= double(scale);
      top = std::max(top, score[t]);
    }
    std::fill(acc.begin(), acc.end(), 0.0);
    for (size_t t = 0; t < len; ++t) {
      const double w = std::exp(score[t] - top);
      sum += w;
      const float* vt = t < blocked ? &dec.v[h][t * dim] : &tail_v[(t - blocked) * dim];
      for (uint32_t d = 0; d < dim; ++d) acc[d] += w * vt[d];
    }
    for (uint32_t d = 0; d < dim; ++d) qf[d] = float(acc[d] / sum);
    if (p_.rotates[KVC_KIND_VALUE]) rotate_floats(p_, qf.data(), 1);  // o = R o': rotated back
    for (uint32_t d = 0; d < dim; ++d) cpu::store_element(ov, p_.dtype, d, qf[d]);
  }
}

void Store::attention(uint32_t layer, const std::vector<int32_t>& ids, uint32_t q_heads,
                      float scale, const uint8_t* q, uint8_t* out) const {
  const size_t row = size_t(q_heads) * p_.head_dim * f::dtype_bytes(p_.dtype);
  // Every output is computed before any is written: a call that fails (memory, a corrupt
  // block) leaves out as it was.
  std::vector<uint8_t> result(ids.size() * row);
  for (size_t s = 0; s < ids.size(); ++s) {
    const LayerCache& c = layer_cache(ids[s], layer);
    const DecodedLayer& dec = decoded_layer(ids[s], layer);
    for (uint32_t h = 0; h < p_.num_heads; ++h) {
      attend_head(c, dec, h, q_heads, scale, q + s * row, result.data() + s * row);
    }
  }
  std::copy(result.begin(), result.end(), out);
}

StoreStats Store::stats() const {
  StoreStats st;
  const size_t row = p_.token_bytes();
  for (const auto& [id, layers] : sequences_) {
    for (const LayerCache& c : layers) {
      st.num_blocks += int64_t(c.blocks.size());
      for (const BlockRef& r : c.blocks) st.block_bytes += r.bytes;
      st.pages_in_use += int64_t(c.pages.size());
      st.tail_bytes +=
          int64_t(c.tail_k.size() + c.tail_v.size() + c.sink_k.size() + c.sink_v.size());
      st.table_bytes +=
          int64_t(c.blocks.size() * sizeof(BlockRef) + c.pages.size() * sizeof(uint32_t));
      st.dense_bytes += int64_t(2 * row * (size_t(c.num_blocks) * p_.block_tokens + c.tail_tokens));
    }
  }
  st.page_bytes = st.pages_in_use * p_.page_bytes;
  st.last_append_status = last_append_status_;
  st.failed_appends = failed_appends_;
  for (const auto& [key, dec] : decoded_) {
    for (size_t h = 0; h < dec.k.size(); ++h) {
      st.decoded_cache_bytes +=
          int64_t((dec.k[h].capacity() + dec.v[h].capacity()) * sizeof(float));
    }
  }
  for (const auto& b : books_) {
    if (b) st.codebook_bytes += int64_t(b->serialized().size());
  }
  return st;
}

// ---- Serialization -------------------------------------------------------------------------
// Layout (little-endian u32 words unless said): magic "kvcs", version, the store fingerprint
// (kFingerprintWords words), per (layer, K|V) a present flag and a codebook id, then per layer:
// num_blocks, tail_tokens, the blocks ([num_blocks, heads, K|V]: byte count, then the block),
// in versions 4 and 5 the sinks' K then V bytes, the tail's K then V bytes (each padded to 4);
// last, an FNV-1a-32 of everything before it.

namespace {

// The serialized version of a store's blocks as held (v1 stores keep version 1, which older
// readers take); a transcoding store writes version 6 instead.
uint32_t serial_version(const StoreParams& p) {
  if (p.layer_scaled()) return kSerialVersionLayerScales;
  if (p.sink_tokens > 0) return kSerialVersionSinks;
  if (p.rotated()) return kSerialVersionRotated;
  return p.tiles() ? kSerialVersionTiles : kSerialVersion;
}

// What a store writing `version` holds, for a mismatch message.
const char* serial_contents(uint32_t version) {
  switch (version) {
    case kSerialVersion:
      return "format v1 blocks";
    case kSerialVersionTiles:
      return "tile blocks";
    case kSerialVersionRotated:
      return "rotated rows (config->rotation)";
    case kSerialVersionSinks:
      return "attention sinks (config->sink_tokens)";
    case kSerialVersionTranscoded:
      return "tile blocks, written as format v1 (config->serialized_block_format)";
    default:
      return "per-layer bounds (config->key_/value_layer_scales)";
  }
}

// What must match between the writing and the restoring store: 12 words in version 1, 13 in
// version 2 (the block format word last), 14 in version 3 (the block format word, 0 for format
// v1 blocks, then the rotation), 15 in version 4 (those, then the sink count), 15 + 2 *
// num_layers in version 5 (those, then the K scales and the V scales as float bits) and, with
// full, in version 6. A tiles store ignores entropy and sub-streams: they count as 0, so that
// stores differing only there exchange sequences.
std::vector<uint32_t> fingerprint(const StoreParams& p, bool full = false) {
  const kvc_store_config& c = p.config;
  uint32_t key_bound, value_bound;
  std::memcpy(&key_bound, &c.key_error_bound, 4);
  std::memcpy(&value_bound, &c.value_error_bound, 4);
  const bool t = p.tiles();
  std::vector<uint32_t> words = {p.num_layers,
                                 p.num_heads,
                                 p.head_dim,
                                 p.block_tokens,
                                 uint32_t(p.dtype),
                                 uint32_t(c.key_bound_mode),
                                 key_bound,
                                 uint32_t(c.value_bound_mode),
                                 value_bound,
                                 p.value.group_size,
                                 t ? 0u : uint32_t(c.entropy),
                                 t ? 0u : p.key.num_substreams | (p.value.num_substreams << 16)};
  // The block format word: bit 0 tiles, bit 1 K channels may be permuted, bit 2 split widths.
  const bool scaled = full || p.layer_scaled();                      // versions 5, 6
  const bool extended = p.rotated() || p.sink_tokens > 0 || scaled;  // versions 3 to 6
  if (t) {
    words.push_back(1u | (p.key.permute_channels ? 2u : 0u) | (p.key.split_widths ? 4u : 0u));
  } else if (extended) {
    words.push_back(0u);  // format v1 blocks
  }
  if (extended) words.push_back(uint32_t(c.rotation));
  if (p.sink_tokens > 0 || scaled) words.push_back(p.sink_tokens);
  if (scaled) {
    for (const auto& scales : p.layer_scales) {
      for (float scale : scales) words.push_back(f::float_bits(scale));
    }
  }
  return words;
}

struct Writer {
  std::vector<uint8_t> out;
  void u32(uint32_t v) {
    const size_t at = out.size();
    out.resize(at + 4);
    f::store_u32(&out[at], v);
  }
  void bytes(const uint8_t* p, size_t n) {
    out.insert(out.end(), p, p + n);
    out.resize(pad4(out.size()));
  }
};

struct Reader {
  const uint8_t* data;
  size_t size, at = 0;
  void need(size_t n) {
    require(n <= size - at, KVC_ERROR_CORRUPT_DATA, "serialized sequence: truncated at byte ", at);
  }
  uint32_t u32() {
    need(4);
    at += 4;
    return f::load_u32(data + at - 4);
  }
  const uint8_t* bytes(size_t n) {
    const size_t padded = (n + 3) / 4 * 4;
    need(padded);
    at += padded;
    return data + at - padded;
  }
};

// A restored block must be one this store could have written itself, whatever the header's own
// checks allow: kvc_store_restore's contract is that a restored sequence behaves like one the
// store built. block is block `index` ([num_blocks, heads, K|V]) of layer l; its header parsed.
void check_store_block(const StoreParams& p, const CodecParams& cp, const f::BlockLayout& b,
                       uint32_t bytes, uint32_t l, size_t index) {
  auto require_block = [&](bool ok, const auto&... what) {
    require(ok, KVC_ERROR_CORRUPT_DATA, "serialized sequence: layer ", l, " block ", index, " ",
            what...);
  };
  require_block(b.block_bytes == bytes, "states ", b.block_bytes, " bytes, its record ", bytes);
  // The store writes nothing longer (the verbatim encoding of its dtype), and its pages hold
  // that much: a longer block would not fit where restore places it.
  const size_t longest = cp.max_block_bytes(p.dtype);
  require_block(bytes <= longest, "is ", bytes, " bytes, longer than the ", longest,
                " of the largest block this store writes (pages of ", p.page_bytes, ")");
  require_block(b.is_value == cp.is_value && b.num_tokens == cp.num_tokens &&
                    b.head_dim == cp.head_dim && b.group_size == cp.group_size,
                "is ", b.is_value ? "V" : "K", " ", b.num_tokens, "x", b.head_dim, " in groups of ",
                b.group_size, " where the store's is ", cp.is_value ? "V" : "K", " ", cp.num_tokens,
                "x", cp.head_dim, " in groups of ", cp.group_size);
  const bool entropy_allows = b.encoding == f::kRaw ||
                              (b.encoding == f::kFixed && cp.entropy != KVC_ENTROPY_HUFFMAN) ||
                              (b.encoding == f::kHuffman && cp.entropy != KVC_ENTROPY_FIXED);
  require_block(entropy_allows, "has encoding ", b.encoding, ", which a store of entropy ",
                int32_t(cp.entropy), " does not write");
  if (b.encoding == f::kRaw) {
    require_block(b.raw_dtype == uint32_t(p.dtype), "holds raw elements of kvc_dtype ", b.raw_dtype,
                  " where the store's dtype is ", int32_t(p.dtype));
  } else {
    require_block(b.per_group_step == cp.relative, b.per_group_step ? "has" : "lacks",
                  " per-group steps where the store's bound is ",
                  cp.relative ? "relative" : "absolute");
  }
  if (b.encoding == f::kHuffman) {
    require_block(b.num_substreams == cp.num_substreams, "has ", b.num_substreams,
                  " sub-streams where the store writes ", cp.num_substreams);
  }
}

// The same for a tile block (format t1), its header and table parsed (parse_tile_header: sizes,
// offsets and widths consistent, block_bytes a multiple of 16 within the bytes given).
void check_store_tile_block(const StoreParams& p, const CodecParams& cp, const tiles::TileLayout& b,
                            const uint8_t* block, uint32_t bytes, uint32_t l, size_t index) {
  auto require_block = [&](bool ok, const auto&... what) {
    require(ok, KVC_ERROR_CORRUPT_DATA, "serialized sequence: layer ", l, " tile block ", index,
            " ", what...);
  };
  require_block(b.block_bytes == bytes, "states ", b.block_bytes, " bytes, its record ", bytes);
  const size_t longest = cp.max_block_bytes(p.dtype);
  require_block(bytes <= longest, "is ", bytes, " bytes, longer than the ", longest,
                " of the largest tile block this store writes (pages of ", p.page_bytes, ")");
  require_block(
      b.is_value == cp.is_value && b.num_tokens == cp.num_tokens && b.head_dim == cp.head_dim,
      "is ", b.is_value ? "V" : "K", " ", b.num_tokens, "x", b.head_dim, " where the store's is ",
      cp.is_value ? "V" : "K", " ", cp.num_tokens, "x", cp.head_dim);
  require_block(b.raw_dtype == uint32_t(p.dtype), "has raw tiles of kvc_dtype ", b.raw_dtype,
                " where the store's dtype is ", int32_t(p.dtype));
  if (b.quantized) {
    require_block(b.per_group_step == cp.relative, b.per_group_step ? "has" : "lacks",
                  " per-group steps where the store's bound is ",
                  cp.relative ? "relative" : "absolute");
  }
  require_block(!b.permuted || (!cp.is_value && cp.permute_channels),
                "permutes its channels, which this store does not (tile_permute_channels = 0)");
  for (uint32_t i = 0; i < b.num_tiles && !cp.split_widths; ++i) {
    const uint32_t w = tiles::entry_width(tiles::table_entry(block, b, i));
    require_block(w != tiles::kW3 && w != tiles::kW6, "has a ", w == tiles::kW3 ? 3 : 6,
                  "-bit tile, which this store does not write (tile_split_widths = 0)");
  }
}

}  // namespace

SerializedSize::SerializedSize(const StoreParams& p, size_t num_books)
    : token_bytes_(p.token_bytes()),
      bytes_(4 * (2 + fingerprint(p).size()) + 8 * num_books + 4) {}  // + the checksum

void SerializedSize::add_layer(uint32_t sink_tokens, uint32_t tail_tokens) {
  bytes_ += 8 + 2 * pad4(sink_tokens * token_bytes_) + 2 * pad4(tail_tokens * token_bytes_);
}

void SerializedSize::add_block(uint32_t bytes) { bytes_ += 4 + pad4(bytes); }

namespace {

// The tile block of codes q (q.ok); encode_tile_codes refuses codes that would need a raw tile.
std::vector<uint8_t> tile_block_of(const StoreParams& p, const CodecParams& cp,
                                   const cpu::Quantized& q) {
  std::vector<uint8_t> tile(cp.max_block_bytes(p.dtype));
  tile.resize(cpu::encode_tile_codes(cp, q, p.dtype, tile.data()));
  return tile;
}

// Version 6's records of one (layer, K|V): the blocks (every second one of the layer's, from
// `kind`) as format v1 of their codes where that is smaller and rebuilds the same bytes (the
// tile encoder is a function of the codes; checked, not assumed), else as held; and the codebook
// of the codes (none where no record is a Huffman block).
struct TranscodedKind {
  std::vector<std::vector<uint8_t>> records;  // empty: the block as held
  std::shared_ptr<const Codebook> book;
};
TranscodedKind transcode_kind(const StoreParams& p, const CodecParams& cp,
                              const std::vector<std::vector<uint8_t>>& blocks, uint32_t kind) {
  TranscodedKind out;
  // Each block's codes are taken twice (histogram, then encoding) rather than kept: one block's
  // at a time, not a layer's (4 bytes per element).
  Histogram h;
  for (size_t i = kind; i < blocks.size(); i += 2) {
    const cpu::Quantized q = cpu::tile_block_codes(cp, blocks[i].data(), blocks[i].size());
    if (q.ok) cpu::histogram_codes(cp.transcoded(), q, h);
  }
  if (h.total() > 0) out.book = build_layer_codebook(h);
  bool huffman = false;
  for (size_t i = kind; i < blocks.size(); i += 2) {
    const std::vector<uint8_t>& block = blocks[i];
    std::vector<uint8_t>& record = out.records.emplace_back();
    const cpu::Quantized q = cpu::tile_block_codes(cp, block.data(), block.size());
    if (!q.ok) continue;  // raw tiles hold inputs, which the codes do not
    std::vector<uint8_t> v1 = cpu::encode_codes(cp.transcoded(), out.book.get(), q);
    if (v1.size() >= block.size()) continue;
    const cpu::Quantized back =
        cpu::decode_codes(cp.transcoded(), out.book.get(), v1.data(), v1.size());
    if (!back.ok || tile_block_of(p, cp, back) != block) continue;
    huffman = huffman || cpu::parse_header(v1.data(), v1.size()).encoding == f::kHuffman;
    record = std::move(v1);
  }
  if (!huffman) out.book.reset();
  return out;
}

}  // namespace

std::vector<uint8_t> serialize_image(const StoreParams& p, const StoreBooks& books,
                                     const SequenceImage& image) {
  Writer w;
  w.u32(kSerialMagic);
  w.u32(p.transcodes ? kSerialVersionTranscoded : serial_version(p));
  for (uint32_t v : fingerprint(p, p.transcodes)) w.u32(v);
  std::vector<TranscodedKind> transcoded;  // [layer * 2 + kind], version 6
  for (uint32_t l = 0; l < image.layers.size() && p.transcodes; ++l) {
    for (uint32_t kind = 0; kind < 2; ++kind) {
      transcoded.push_back(transcode_kind(p, p.codec(l, kind), image.layers[l].blocks, kind));
    }
  }
  for (const TranscodedKind& t : transcoded) {
    w.u32(t.book ? uint32_t(t.book->serialized().size()) : 0u);
    if (t.book) w.bytes(t.book->serialized().data(), t.book->serialized().size());
  }
  for (size_t i = 0; i < (p.transcodes ? 0 : books.size()); ++i) {
    w.u32(books[i] ? 1u : 0u);
    w.u32(books[i] ? books[i]->id() : 0u);
  }
  for (uint32_t l = 0; l < image.layers.size(); ++l) {
    const SequenceImage::Layer& layer = image.layers[l];
    w.u32(layer.num_blocks);
    w.u32(layer.tail_tokens);
    for (size_t i = 0; i < layer.blocks.size(); ++i) {
      const std::vector<uint8_t>* v1 =
          p.transcodes ? &transcoded[l * 2 + i % 2].records[i / 2] : nullptr;
      const bool as_v1 = v1 != nullptr && !v1->empty();
      const std::vector<uint8_t>& out = as_v1 ? *v1 : layer.blocks[i];
      w.u32(uint32_t(out.size()) | (as_v1 ? kTranscodedBlock : 0u));
      w.bytes(out.data(), out.size());
    }
    w.bytes(layer.sink_k.data(), layer.sink_k.size());  // empty without sinks
    w.bytes(layer.sink_v.data(), layer.sink_v.size());
    w.bytes(layer.tail_k.data(), layer.tail_k.size());
    w.bytes(layer.tail_v.data(), layer.tail_v.size());
  }
  w.u32(fnv1a32(w.out.data(), w.out.size()));
  return std::move(w.out);
}

SequenceImage parse_image(const StoreParams& p, const StoreBooks& books, const uint8_t* data,
                          size_t size) {
  require(size >= 12 && size % 4 == 0, KVC_ERROR_CORRUPT_DATA, "serialized sequence: ", size,
          " bytes is not a whole serialized sequence");
  Reader r{data, size - 4};
  require(r.u32() == kSerialMagic, KVC_ERROR_CORRUPT_DATA,
          "serialized sequence: bad magic (not a kvcomp sequence)");
  const uint32_t version = r.u32();
  require(version >= kSerialVersion && version <= kSerialVersionTranscoded,
          KVC_ERROR_FORMAT_VERSION, "serialized sequence: version ", version,
          " is not supported (this library reads versions 1 to ", kSerialVersionTranscoded, ")");
  require(fnv1a32(data, size - 4) == f::load_u32(data + size - 4), KVC_ERROR_CORRUPT_DATA,
          "serialized sequence: checksum mismatch");
  // A store of the other block format wrote it (version 1: format v1 blocks; 2: tiles), or one
  // that rotates or does not (version 3: rotated rows), or keeps sinks or does not (version 4),
  // or has per-layer bounds or does not (version 5). A tiles store also reads version 6, its
  // blocks as format v1, whatever it writes itself.
  const bool transcoded = version == kSerialVersionTranscoded;
  require(version == serial_version(p) || (transcoded && p.tiles()), KVC_ERROR_CONFIG_MISMATCH,
          "serialized sequence: a store of ", serial_contents(version),
          " wrote it, but this store holds ", serial_contents(serial_version(p)));
  const std::vector<uint32_t> words = fingerprint(p, transcoded);
  for (size_t i = 0; i < words.size(); ++i) {
    const uint32_t word = r.u32();
    if (word == words[i]) continue;
    if (i >= kSinksFingerprintWords) {  // version 5: a layer scale
      const size_t j = i - kSinksFingerprintWords;
      const bool is_value = j >= p.num_layers;
      fail(KVC_ERROR_CONFIG_MISMATCH,
           "serialized sequence: written by a store of another configuration: its ",
           is_value ? "value" : "key", "_layer_scales[", j % p.num_layers,
           "] = ", f::bits_float(word), ", this store's ", f::bits_float(words[i]),
           " (per-layer bounds)");
    }
    // The fingerprint's words in order (fingerprint()), for the message.
    static constexpr const char* kField[] = {
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "block_tokens",
        "dtype",
        "key_bound_mode",
        "key_error_bound",
        "value_bound_mode",
        "value_error_bound",
        "value_group_size",
        "entropy",
        "num_substreams (K, V << 16)",
        "block format (bit 0 tiles, 1 tile_permute_channels, 2 tile_split_widths)",
        "rotation",
        "sink_tokens"};
    static_assert(std::size(kField) == kSinksFingerprintWords);
    const char* what = "serialized sequence: written by a store of another configuration: its ";
    if (i == 6 || i == 8) {  // the error bounds
      fail(KVC_ERROR_CONFIG_MISMATCH, what, kField[i], " = ", f::bits_float(word),
           ", this store's ", f::bits_float(words[i]));
    }
    fail(KVC_ERROR_CONFIG_MISMATCH, what, kField[i], " = ", word, ", this store's ", words[i]);
  }
  // The writer's codebooks: informative, each Huffman block names the one it needs; in version
  // 6, the transcoding codebooks themselves, parsed when a record first needs one (a parsed
  // codebook holds a decode table of up to 128 KiB: one per (layer, K|V) up front would let a
  // short string claim a store's worth of them). The writer stores one only where a record of
  // its layer and kind is a Huffman block, so one that none uses is corrupt data.
  struct TranscodingBook {
    const uint8_t* bytes = nullptr;
    uint32_t size = 0;
    std::shared_ptr<const Codebook> book;
    bool used = false;
  };
  std::vector<TranscodingBook> transcoding(transcoded ? size_t(p.num_layers) * 2 : 0);
  for (TranscodingBook& t : transcoding) {
    t.size = r.u32();
    if (t.size > 0) t.bytes = r.bytes(t.size);
  }
  const auto book_name = [](size_t i) {
    return "the transcoding codebook of layer " + std::to_string(i / 2) + (i % 2 ? " V" : " K");
  };
  const auto transcoding_book = [&](size_t i) -> const Codebook* {
    TranscodingBook& t = transcoding[i];
    if (t.bytes == nullptr) return nullptr;
    t.used = true;
    if (!t.book) {
      try {
        t.book = std::make_shared<const Codebook>(Codebook::parse(t.bytes, t.size));
      } catch (const Error& e) {
        fail(KVC_ERROR_CORRUPT_DATA, book_name(i), ": ", e.what());  // in a record's message
      }
    }
    return t.book.get();
  };
  for (size_t i = 0; i < (transcoded ? 0 : books.size() * 2); ++i) r.u32();
  SequenceImage image;
  std::vector<float> scratch(size_t(p.block_tokens) * p.head_dim);
  const size_t row = p.token_bytes();
  for (uint32_t l = 0; l < p.num_layers; ++l) {
    SequenceImage::Layer& layer = image.layers.emplace_back();
    layer.num_blocks = r.u32();
    layer.tail_tokens = r.u32();
    require(layer.tail_tokens < p.block_tokens && layer.num_blocks <= (1u << 24),
            KVC_ERROR_CORRUPT_DATA, "serialized sequence: layer ", l, " has impossible sizes");
    require(uint64_t(layer.num_blocks) * p.block_tokens + layer.tail_tokens <= p.token_limit(),
            KVC_ERROR_INVALID_ARGUMENT, "serialized sequence: layer ", l, " holds more than ",
            p.token_limit(), " tokens (config->max_sequence_tokens)");
    for (size_t i = 0; i < size_t(layer.num_blocks) * p.num_heads * 2; ++i) {
      const uint32_t word = r.u32();
      const bool v1_of_tiles = transcoded && (word & kTranscodedBlock) != 0;
      uint32_t bytes = v1_of_tiles ? word & ~kTranscodedBlock : word;
      const uint8_t* block = r.bytes(bytes);
      const uint32_t kind = uint32_t(i % 2);
      const CodecParams& cp = p.codec(l, kind);
      const Codebook* book = books[l * 2 + kind].get();
      std::vector<uint8_t> rebuilt;  // the tile block of a transcoded record
      if (v1_of_tiles) {
        // Any failure is corrupt data (a block version other than 1 aside): version 6 carries
        // the codebooks it needs, and its writer's configuration is this store's.
        try {
          const CodecParams v = cp.transcoded();
          const f::BlockLayout b = cpu::parse_header(block, bytes);
          require(b.block_bytes == bytes && b.encoding != f::kRaw &&
                      b.per_group_step == v.relative &&
                      (b.encoding != f::kHuffman || b.num_substreams == v.num_substreams),
                  KVC_ERROR_CORRUPT_DATA,
                  "it is not a block the writer makes: its length, encoding, step layout or "
                  "sub-stream count");
          const Codebook* tb = b.encoding == f::kHuffman ? transcoding_book(l * 2 + kind) : nullptr;
          const cpu::Quantized q = cpu::decode_codes(v, tb, block, bytes);
          require(cpu::codes_in_range(q), KVC_ERROR_CORRUPT_DATA,
                  "a code outside the quantizer's range");
          rebuilt = tile_block_of(p, cp, q);
        } catch (const Error& e) {
          fail(e.status() == KVC_ERROR_FORMAT_VERSION ? e.status() : KVC_ERROR_CORRUPT_DATA,
               "serialized sequence: layer ", l, " block ", i,
               " (format v1 of a tile block): ", e.what());
        }
        block = rebuilt.data();
        bytes = uint32_t(rebuilt.size());
      }
      bool huffman = false;
      if (cp.tiles) {
        check_store_tile_block(p, cp, cpu::parse_tile_header(block, bytes), block, bytes, l, i);
      } else {
        const f::BlockLayout b = cpu::parse_header(block, bytes);
        check_store_block(p, cp, b, bytes, l, i);
        require(b.encoding != f::kHuffman || (book && book->id() == b.codebook_id),
                KVC_ERROR_CODEBOOK_MISMATCH, "serialized sequence: layer ", l,
                " holds a block of codebook ", b.codebook_id,
                ", which this store does not have (import it)");
        huffman = b.encoding == f::kHuffman;
      }
      try {  // a block that parses may still not decode: reject it now, not at the first read
        decode_store_block(cp, book, block, bytes, KVC_DTYPE_FP32, scratch.data(), p.head_dim);
      } catch (const Error& e) {
        fail(e.status(), "serialized sequence: layer ", l, ": ", e.what());
      }
      // The store holds values that read back finite only (its inputs are checked): so must a
      // restored block (not a raw block of inf or NaN, a step of inf, a code that overflows its
      // step, nor values whose rotation back overflows).
      require(read_back_finite(p, kind, scratch.data(), p.block_tokens), KVC_ERROR_CORRUPT_DATA,
              "serialized sequence: layer ", l, " block ", i,
              " decodes to inf or NaN, or to rows that read back so");
      layer.blocks.emplace_back(block, block + bytes);
      layer.has_huffman = layer.has_huffman || huffman;
    }
    // The uncompressed rows: the sinks (none before the first block), then the tail.
    auto read_rows = [&](uint32_t tokens, const char* what, std::vector<uint8_t>& k_rows,
                         std::vector<uint8_t>& v_rows) {
      const size_t bytes = size_t(tokens) * row;
      const uint8_t* k = r.bytes(bytes);
      const uint8_t* v = r.bytes(bytes);
      // Checked as copied: the caller's bytes may lie at any address, the rows' elements not.
      k_rows.assign(k, k + bytes);
      v_rows.assign(v, v + bytes);
      require(rows_read_back_finite(p, KVC_KIND_KEY, k_rows.data(), tokens) &&
                  rows_read_back_finite(p, KVC_KIND_VALUE, v_rows.data(), tokens),
              KVC_ERROR_CORRUPT_DATA, "serialized sequence: layer ", l, " has inf or NaN in its ",
              what, ", or rows that read back so");
    };
    read_rows(p.sinks_held(layer.num_blocks), "sinks", layer.sink_k, layer.sink_v);
    read_rows(layer.tail_tokens, "tail", layer.tail_k, layer.tail_v);
  }
  for (size_t i = 0; i < transcoding.size(); ++i) {
    require(transcoding[i].bytes == nullptr || transcoding[i].used, KVC_ERROR_CORRUPT_DATA,
            "serialized sequence: ", book_name(i),
            " is not used by any Huffman record of that layer and kind (a writer stores none)");
  }
  require(r.at == r.size, KVC_ERROR_CORRUPT_DATA, "serialized sequence: trailing bytes");
  return image;
}

std::vector<uint8_t> Store::serialize(int32_t id) const {
  SequenceImage image;
  for (const LayerCache& c : sequence(id)) {
    SequenceImage::Layer& l = image.layers.emplace_back();
    l.num_blocks = c.num_blocks;
    l.tail_tokens = c.tail_tokens;
    for (const BlockRef& r : c.blocks) {
      const uint8_t* block = &pool_[size_t(r.page) * p_.page_bytes + r.offset];
      l.blocks.emplace_back(block, block + r.bytes);
    }
    l.sink_k = c.sink_k;
    l.sink_v = c.sink_v;
    l.tail_k = c.tail_k;
    l.tail_v = c.tail_v;
  }
  return serialize_image(p_, books_, image);
}

size_t Store::serialized_size(int32_t id) const {
  require(!p_.transcodes, KVC_ERROR_INTERNAL, "a store that transcodes knows a size by writing");
  SerializedSize size(p_, books_.size());
  for (const LayerCache& c : sequence(id)) {
    size.add_layer(p_.sinks_held(c.num_blocks), c.tail_tokens);
    for (const BlockRef& r : c.blocks) size.add_block(r.bytes);
  }
  return size.bytes();
}

int32_t Store::restore(const uint8_t* data, size_t size) {
  SequenceImage image = parse_image(p_, books_, data, size);
  Transaction tx;
  for (uint32_t l = 0; l < p_.num_layers; ++l) {
    SequenceImage::Layer& in = image.layers[l];
    tx.updates.push_back({-1,
                          l,
                          in.num_blocks,
                          {},
                          {},
                          std::move(in.blocks),
                          in.tail_tokens,
                          std::move(in.tail_k),
                          std::move(in.tail_v),
                          std::move(in.sink_k),
                          std::move(in.sink_v)});
    // Fixed-width and raw blocks need no codebook: only a Huffman block, which names the layer's
    // current codebook, freezes it.
    tx.updates.back().freezes_books = in.has_huffman;
  }
  // The sequence exists only if the whole restore commits; otherwise its id is handed out again.
  const int32_t id = add_sequence();
  for (Update& u : tx.updates) u.id = id;
  try {
    commit(tx);
  } catch (...) {
    sequences_.erase(id);
    next_id_ = id;
    throw;
  }
  return id;
}

}  // namespace kvc
