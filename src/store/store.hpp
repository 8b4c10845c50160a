// SPDX-License-Identifier: Apache-2.0
// The paged compressed KV store (CPU backend): page pool, per-(sequence, layer) block tables and
// tails, per-(layer, K|V) codebooks. Every mutating operation first plans its whole effect
// (encodes, sizes, counts pages) and only then commits, so a failure changes nothing.
#pragma once

#include <kvcomp/kvcomp.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "codec/codebook.hpp"
#include "codec/codec_params.hpp"
#include "kernels/common/format.cuh"

namespace kvc {

struct StoreParams {
  kvc_backend backend;
  uint32_t num_layers, num_heads, head_dim, block_tokens;
  kvc_dtype dtype;
  // The codec parameters of K and V blocks with the scalar bounds (key_/value_error_bound):
  // what every layer shares (shape, groups, entropy, format, largest block). Blocks are encoded
  // and decoded with codec(layer, kind), which has the layer's bound.
  CodecParams key, value;
  uint32_t page_bytes;
  uint32_t num_pages;
  uint32_t max_sequences, max_sequence_tokens;  // 0: no limit
  kvc_store_config config;  // as given (the scale pointers cleared), for fingerprints
  // kvc_store_config.key_/value_layer_scales, copied: [kind][layer], 1.0f where none given.
  std::array<std::vector<float>, 2> layer_scales;
  // [layer * 2 + kind]: key or value with the layer's bound, scalar bound * layer scale.
  std::vector<CodecParams> layer_codecs;

  static StoreParams from_config(const kvc_store_config& c);
  size_t token_bytes() const { return size_t(num_heads) * head_dim * format::dtype_bytes(dtype); }
  // The codec parameters of (layer, kind)'s blocks: the one answer, for encoding, codebook
  // building and decoding alike.
  const CodecParams& codec(uint32_t layer, uint32_t kind) const {
    return layer_codecs[size_t(layer) * 2 + kind];
  }
  // Whether some layer's bound is not the scalar bound (a scale other than 1): serial version 5.
  bool layer_scaled() const;
  uint64_t token_limit() const { return max_sequence_tokens ? max_sequence_tokens : INT32_MAX; }
  // Whether the store's blocks are tile blocks (format t1, no codebooks) rather than format v1.
  bool tiles() const { return key.tiles; }
  // Which rows are stored rotated (kvc_store_config.rotation), by kind: K, V.
  std::array<bool, 2> rotates = {false, false};
  bool rotated() const { return rotates[0] || rotates[1]; }
  // kvc_store_config.sink_tokens: rows of a layer's first block also kept uncompressed.
  uint32_t sink_tokens = 0;
  // The sink rows a layer of num_blocks compressed blocks holds: all of them once its first
  // block is compressed, none before (its first tokens are then still in the tail).
  uint32_t sinks_held(uint32_t num_blocks) const { return num_blocks > 0 ? sink_tokens : 0; }
  // kvc_store_config.serialized_block_format = V1 on a tiles store: serialization writes each
  // tile block as format v1 where that is smaller (serial version 6).
  bool transcodes = false;
};

// The rotation of store rows (kvc_store_config.rotation), on the host: every (token, head) row of
// rows [tokens, heads, dim] of the store's 16-bit dtype is rotated in fp32 and rounded back to
// the dtype to nearest (not saturating: a rotated element past the dtype's range becomes inf,
// which the caller rejects). The CUDA store's kernels do the same arithmetic.
void rotate_rows(const StoreParams& p, uint8_t* rows, size_t tokens);
// x: count rows of head_dim floats, rotated in place (the rotation is its own inverse).
void rotate_floats(const StoreParams& p, float* x, size_t count);

// Where a compressed block lives in the pool.
struct BlockRef {
  uint32_t page;
  uint32_t offset;
  uint32_t bytes;
};

// One (sequence, layer): compressed token blocks, then an uncompressed tail; and the sinks, an
// uncompressed copy of the first block's first rows, read instead of them.
struct LayerCache {
  uint32_t num_blocks = 0;       // token blocks
  std::vector<BlockRef> blocks;  // [num_blocks, num_heads, 2 (K, V)]
  uint32_t tail_tokens = 0;      // < block_tokens
  std::vector<uint8_t> tail_k;   // [tail_tokens, num_heads, head_dim] of dtype
  std::vector<uint8_t> tail_v;
  std::vector<uint8_t> sink_k;  // [sinks_held(num_blocks), num_heads, head_dim] of dtype
  std::vector<uint8_t> sink_v;
  std::vector<uint32_t> pages;  // owned, in allocation order; the last one is open
  uint32_t open_used = 0;       // bytes used in the last page
};

struct StoreStats {
  int64_t num_blocks = 0, block_bytes = 0, page_bytes = 0, tail_bytes = 0, table_bytes = 0,
          codebook_bytes = 0, dense_bytes = 0, pages_in_use = 0;
  kvc_status last_append_status = KVC_SUCCESS;
  int32_t failed_appends = 0;
  int64_t decoded_cache_bytes = 0;  // the CPU attention's fp32 copies of decoded blocks
};

using StoreBooks = std::vector<std::shared_ptr<const Codebook>>;  // [layer * 2 + kind]

// One sequence as it travels between stores: per layer the encoded blocks ([num_blocks, heads,
// K|V]), the sink rows (sinks_held(num_blocks) of them) and the tail rows.
struct SequenceImage {
  struct Layer {
    uint32_t num_blocks = 0, tail_tokens = 0;
    std::vector<std::vector<uint8_t>> blocks;
    std::vector<uint8_t> sink_k, sink_v, tail_k, tail_v;
    bool has_huffman = false;  // a block needs the layer's codebooks (so restoring freezes them)
  };
  std::vector<Layer> layers;
};

// The serialized form (docs/format.md, "Serialized sequence"). parse_image checks everything:
// checksum, configuration, codebooks, tails finite, token limits, and that every block is one
// this store could have written (valid_store_block) and decodes. Its blocks are then at most
// max_block_bytes long, so each fits in a page (StoreParams::from_config).
std::vector<uint8_t> serialize_image(const StoreParams& p, const StoreBooks& books,
                                     const SequenceImage& image);
SequenceImage parse_image(const StoreParams& p, const StoreBooks& books, const uint8_t* data,
                          size_t size);
// n rounded up to a multiple of 4, the padding of the serialized form's byte fields: in size_t,
// since a sequence's serialized form may pass 4 GiB.
constexpr size_t pad4(size_t n) { return (n + 3) & ~size_t(3); }

// The size serialize_image gives, from the lengths alone (not for a store that transcodes): for
// each layer in order, add_layer(its sink and tail tokens), then add_block(bytes) for each of
// its blocks.
class SerializedSize {
 public:
  SerializedSize(const StoreParams& p, size_t num_books);
  void add_layer(uint32_t sink_tokens, uint32_t tail_tokens);  // sinks_held, tail tokens
  void add_block(uint32_t bytes);
  size_t bytes() const { return bytes_; }

 private:
  size_t token_bytes_, bytes_;
};
// One block in the store's format (cp.tiles: t1, else v1; book: the layer's codebook for v1, may
// be NULL): encodes finite rows (stride elements apart) into dst, which holds
// cp.max_block_bytes(dtype), returning the bytes written; decodes, throwing a data status.
// Pages place tile blocks 16-byte aligned (place_next_fit, block_alignment): what the tile
// attention kernel's 16-byte loads need.
uint32_t encode_store_block(const CodecParams& cp, const Codebook* book, const uint8_t* src,
                            int64_t stride, kvc_dtype dtype, uint8_t* dst);
void decode_store_block(const CodecParams& cp, const Codebook* book, const uint8_t* src,
                        uint32_t bytes, kvc_dtype dtype, void* dst, int64_t stride);
// The codebook a store builds for a layer from its first blocks: the default configuration.
std::shared_ptr<const Codebook> build_layer_codebook(const Histogram& histogram);
// count fp16/bf16 elements to fp16, bf16 or fp32 (saturating, as the codec's output).
void convert_elements(const uint8_t* src, kvc_dtype from, uint8_t* dst, kvc_dtype to, size_t count);
// Whether rows [tokens, heads, dim] of the store's dtype are all finite.
bool finite_rows(const StoreParams& p, const uint8_t* rows, size_t tokens);

class Store {
 public:
  explicit Store(const StoreParams& params);

  int32_t add_sequence();
  void free_sequence(int32_t id);
  uint32_t length(int32_t id, uint32_t layer) const;
  void require_live(int32_t id) const { sequence(id); }
  size_t num_sequences() const { return sequences_.size(); }

  void set_codebook(uint32_t layer, uint32_t kind, std::shared_ptr<const Codebook> book);
  std::shared_ptr<const Codebook> codebook(uint32_t layer, uint32_t kind) const {
    return books_[layer * 2 + kind];
  }

  // keys/values: [num_layers, num_tokens, heads, dim] of dtype.
  void prefill(int32_t id, uint32_t first_layer, uint32_t num_layers, uint32_t num_tokens,
               const uint8_t* keys, const uint8_t* values);
  // keys/values: [ids.size(), heads, dim] of dtype; distinct ids.
  void append(uint32_t layer, const std::vector<int32_t>& ids, const uint8_t* keys,
              const uint8_t* values);
  // Dense [length, heads, dim] of dtype; capacity_tokens checked by the caller.
  void read(int32_t id, uint32_t layer, kvc_dtype dtype, void* keys, void* values) const;
  // q, out: [ids.size(), q_heads, dim] of the store's dtype.
  void attention(uint32_t layer, const std::vector<int32_t>& ids, uint32_t q_heads, float scale,
                 const uint8_t* q, uint8_t* out) const;

  StoreStats stats() const;
  std::vector<uint8_t> serialize(int32_t id) const;
  // From the block lengths: not for a store that transcodes (the caller serializes).
  size_t serialized_size(int32_t id) const;
  int32_t restore(const uint8_t* data, size_t size);

 private:
  struct Update;  // the planned effect of one operation on one (sequence, layer)
  using LayerBooks = std::array<std::shared_ptr<const Codebook>, 2>;
  struct Transaction {
    std::vector<Update> updates;
    std::vector<std::pair<uint32_t, LayerBooks>> books;  // codebooks to freeze, by layer
  };

  // Runs a prefill or append, recording its outcome for stats().
  template <class F>
  void recording_outcome(F&& operation);
  void prefill_all_layers(int32_t id, uint32_t first_layer, uint32_t num_layers,
                          uint32_t num_tokens, const uint8_t* keys, const uint8_t* values);
  void append_one_token(uint32_t layer, const std::vector<int32_t>& ids, const uint8_t* keys,
                        const uint8_t* values);
  const std::vector<LayerCache>& sequence(int32_t id) const;  // throws for unknown ids
  const LayerCache& layer_cache(int32_t id, uint32_t layer) const;
  Update plan_update(int32_t id, uint32_t layer, uint32_t num_tokens, const uint8_t* keys,
                     const uint8_t* values, size_t row_stride) const;
  LayerBooks encode_updates(uint32_t layer, std::vector<Update>& updates) const;
  // Checks the pages, then applies every update; throws (changing nothing) if they do not fit.
  void commit(Transaction& tx);
  uint32_t pages_needed(const LayerCache& cache,
                        const std::vector<std::vector<uint8_t>>& blocks) const;
  // fp32 reconstruction of one head's K or V for (sequence, layer): [length, dim].
  std::vector<float> decode_head(const LayerCache& cache, uint32_t layer, uint32_t head,
                                 uint32_t kind) const;
  // Block b of one head's K or V as fp32 rows [T, dim] (stride dim) into dst; block 0's first
  // rows are the sinks, where the store keeps them. Throws the data status of a damaged block.
  void decode_block_rows(const LayerCache& cache, uint32_t layer, uint32_t block, uint32_t head,
                         uint32_t kind, float* dst) const;

  // The fp32 reconstruction of a (sequence, layer)'s compressed blocks, kept by attention so
  // that each block is decoded once, not on every call: blocks never change once written and a
  // sequence only grows, so an entry is extended by the blocks added since, and dropped when
  // its sequence is freed (ids are never reused). Reported as decoded_cache_bytes.
  struct DecodedLayer {
    uint32_t num_blocks = 0;
    std::vector<std::vector<float>> k;  // [heads][num_blocks, dim, T]: each block transposed
    std::vector<std::vector<float>> v;  // [heads][num_blocks * T, dim]
  };
  const DecodedLayer& decoded_layer(int32_t id, uint32_t layer) const;
  void attend_head(const LayerCache& c, const DecodedLayer& dec, uint32_t head, uint32_t q_heads,
                   float scale, const uint8_t* q, uint8_t* out) const;
  void drop_decoded(int32_t id);

  StoreParams p_;
  std::unique_ptr<uint8_t[]> pool_;   // num_pages * page_bytes
  std::vector<uint32_t> free_pages_;  // a stack
  StoreBooks books_;
  // [layer]: has compressed a block, or restored a Huffman block, so its codebooks are frozen
  std::vector<bool> compressed_;
  std::map<int32_t, std::vector<LayerCache>> sequences_;
  int32_t next_id_ = 0;
  kvc_status last_append_status_ = KVC_SUCCESS;
  int32_t failed_appends_ = 0;
  mutable std::map<std::pair<int32_t, uint32_t>, DecodedLayer> decoded_;  // (id, layer)
};

}  // namespace kvc
