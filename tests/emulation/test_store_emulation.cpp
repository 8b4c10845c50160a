// SPDX-License-Identifier: Apache-2.0
// The CUDA store's kernels (kernels/store/store_kernels.cuh), run on the CPU under the host
// emulation in the order src/cuda/store.cu launches them (stage, encode, commit, copy per
// layer, finish; free), against a shadow model: random adds, appends and frees, with unknown
// sequences, over-long sequences, inf/NaN rows and pages running out. After every step: every
// block byte-identical to the CPU encoder's block of the same rows, at the next-fit offset;
// exact tails; pages owned by one (sequence, layer) each, and with the free stack a partition of
// the pool; counters; and a failed call changes nothing. A store of tile blocks (format t1) runs
// the same kernels with the CPU tile encoder in the encoder's place (the device tile encoder
// writes the same bytes), and every tile block starts 16-byte aligned in its page. A store that
// rotates its rows (kvc_store_config.rotation) first runs rotate_rows_kernel over the inputs, as
// store.cu does: its blocks and tails must be those of the rows rotated on the CPU (the CPU
// store's arithmetic), bit for bit; the rotation kernel alone is checked against it too.
#include "tests/emulation/emulated_codec.hpp"
//
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <set>

#include "cpu/codec_cpu.hpp"
#include "cpu/tile_codec_cpu.hpp"
#include "kernels/common/hadamard.cuh"
#include "kernels/store/store_kernels.cuh"
#include "test_support.hpp"

namespace kvc::test {
namespace {

namespace ks = kvc::kernels::store;
using kernels::BlockLocation;
using kernels::SequenceView;

struct StoreShape {
  uint32_t layers = 2, heads = 2, dim = 16, block_tokens = 4;
  uint32_t page_bytes = 512, num_pages = 20, max_sequences = 4, max_tokens = 24;
  uint32_t sink_tokens = 0;
  uint32_t row() const { return heads * dim; }
  uint32_t dense_rows() const { return sink_tokens + block_tokens; }  // per buffer
};

// A tiles store: format t1 needs T and D powers of two from 16; blocks of up to 48 + 512 bytes.
StoreShape tile_store_shape() {
  StoreShape s;
  s.block_tokens = 16;
  s.page_bytes = 1280;
  s.num_pages = 14;
  s.max_tokens = 80;
  return s;
}

// Whether the fp16 rows of one block [T, D] (stride elements apart) are all finite.
bool finite_block(const CodecParams& p, const void* src, int64_t stride) {
  const auto* x = static_cast<const uint16_t*>(src);
  for (uint32_t t = 0; t < p.num_tokens; ++t) {
    for (uint32_t d = 0; d < p.head_dim; ++d) {
      if ((x[size_t(t) * size_t(stride) + d] & 0x7C00u) == 0x7C00u) return false;
    }
  }
  return true;
}

// The CUDA codec's encode contract for tile blocks, with the CPU tile encoder: a NULL source or a
// non-finite block gives 0 bytes and no block.
void tile_encode(const CodecParams& p, const std::vector<const void*>& src, int64_t stride,
                 const std::vector<void*>& dst, std::vector<uint32_t>& bytes) {
  bytes.assign(src.size(), 0);
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i] == nullptr || !finite_block(p, src[i], stride)) continue;
    bytes[i] =
        cpu::encode_tile_block(p, src[i], stride, KVC_DTYPE_FP16, static_cast<uint8_t*>(dst[i]));
  }
}

size_t round16(size_t n) { return (n + 15) / 16 * 16; }

// The store's device state in host memory, and store.cu's host logic for the calls the test
// makes (codebooks fixed from the start: no book building).
class EmulatedStore {
 public:
  EmulatedStore(const StoreShape& s, const CodecParams& key, const CodecParams& value,
                const Codebook* key_book, const Codebook* value_book, bool rotated = false)
      : s_(s), params_{key, value}, books_{key_book, value_book}, rotated_(rotated) {
    for (int kind = 0; kind < 2; ++kind)
      dbooks_[kind] = std::make_unique<EmulatedBook>(books_[kind]);
    table_blocks_ = (s.max_tokens + s.block_tokens - 1) / s.block_tokens;
    const size_t layers = size_t(s.max_sequences) * s.layers;
    pool_.assign(size_t(s.num_pages) * s.page_bytes, 0xCC);
    tables_.assign(layers * table_blocks_ * s.heads * 2, BlockLocation{0xFFFFFFFFu, 0, 0});
    dense_.assign(layers * 2 * s.dense_rows() * s.row(), 0);
    states_.resize(layers);
    for (size_t i = 0; i < layers; ++i) {
      states_[i].view = {tables_.data() + i * table_blocks_ * s.heads * 2,
                         0,
                         0,
                         0,
                         dense_.data() + 2 * i * s.dense_rows() * s.row(),
                         dense_.data() + (2 * i + 1) * s.dense_rows() * s.row()};
    }
    for (uint32_t i = 0; i < s.num_pages; ++i) free_pages_.push_back(s.num_pages - 1 - i);
    slot_ids_.assign(s.max_sequences, -1);
    generations_.assign(s.max_sequences, 0);
    layer_compressed_.assign(s.layers, 0);
    counters_ = {s.num_pages, KVC_SUCCESS, 0, 0, 0, 0, 0};
  }

  ks::StoreView view() {
    return {states_.data(),
            slot_ids_.data(),
            free_pages_.data(),
            &counters_,
            layer_compressed_.data(),
            pool_.data(),
            s_.page_bytes,
            s_.layers,
            s_.heads,
            s_.dim,
            s_.block_tokens,
            s_.max_sequences,
            s_.max_tokens,
            0x7C00u,
            block_alignment(params_[0].tiles),
            s_.sink_tokens};
  }

  // -1 when every slot is taken.
  int32_t add_sequence() {
    for (uint32_t slot = 0; slot < s_.max_sequences; ++slot) {
      if (slot_ids_[slot] != -1) continue;
      const int32_t id = int32_t(generations_[slot]++ * s_.max_sequences + slot);
      slot_ids_[slot] = id;
      return id;
    }
    return -1;
  }

  void free_sequence(int32_t id) {
    const auto r = emu::launch(ks::free_kernel, 1, ks::kStoreThreads, 0, view(), id);
    ASSERT_TRUE(r.ok()) << r.message();
    EXPECT_EQ(slot_ids_[uint32_t(id) % s_.max_sequences], -1) << "the kernel frees the slot";
  }

  // kvc_store_append over every layer: keys/values [layers, ids, n, heads, dim] of fp16.
  kvc_status_t append(const std::vector<int32_t>& ids, uint32_t n,
                      const std::vector<uint16_t>& given_keys,
                      const std::vector<uint16_t>& given_values) {
    std::vector<uint16_t> keys = given_keys, values = given_values;
    if (rotated_) {  // store.cu: rotated into scratch (fp16, rounded, not saturated) first
      const size_t rows = keys.size() / s_.dim;
      for (int kind = 0; kind < 2; ++kind) {
        const auto r =
            emu::launch(ks::rotate_rows_kernel, emu::Dim3(uint32_t(std::min<size_t>(rows, 7))),
                        ks::kRotateThreads, 0,
                        static_cast<const void*>((kind ? given_values : given_keys).data()),
                        uint32_t(KVC_DTYPE_FP16), static_cast<void*>((kind ? values : keys).data()),
                        uint32_t(KVC_DTYPE_FP16), false, rows, s_.dim);
        EXPECT_TRUE(r.ok()) << "rotate: " << r.message();
        if (!r.ok()) return KVC_ERROR_INTERNAL;
      }
    }
    const uint32_t B = uint32_t(ids.size()), H = s_.heads, T = s_.block_tokens, L = s_.layers;
    const uint32_t max_blocks = (T - 1 + n) / T;
    const size_t layer_slots = size_t(B) * max_blocks * H;
    const size_t stride[2] = {round16(params_[0].max_block_bytes(KVC_DTYPE_FP16)),
                              round16(params_[1].max_block_bytes(KVC_DTYPE_FP16))};
    std::vector<ks::Entry> entries(size_t(L) * B);
    std::vector<const void*> src[2] = {std::vector<const void*>(L * layer_slots),
                                       std::vector<const void*>(L * layer_slots)};
    std::vector<uint8_t> encoded[2] = {std::vector<uint8_t>(layer_slots * stride[0], 0xEE),
                                       std::vector<uint8_t>(layer_slots * stride[1], 0xEE)};
    std::vector<void*> dst[2];
    for (int kind = 0; kind < 2; ++kind) {
      for (size_t i = 0; i < layer_slots; ++i)
        dst[kind].push_back(encoded[kind].data() + i * stride[kind]);
    }
    std::vector<uint32_t> bytes[2];
    std::vector<void*> copy_dst(layer_slots * 2);
    ks::CallState call;
    std::memset(&call, 0xFF, sizeof(call));
    ks::Batch batch{};
    std::copy(ids.begin(), ids.end(), batch.ids);
    const ks::StoreView V = view();
    auto ok = [&](const emu::LaunchResult& r, const char* what) {
      EXPECT_TRUE(r.ok()) << what << ": " << r.message();
      return r.ok();
    };
    if (!ok(emu::launch(ks::stage_kernel, emu::Dim3(B, L), ks::kStoreThreads, 0, V, batch, B, 0u, n,
                        keys.data(), values.data(), max_blocks, entries.data(), src[0].data(),
                        src[1].data(), &call),
            "stage")) {
      return KVC_ERROR_INTERNAL;
    }
    for (uint32_t li = 0; li < L; ++li) {
      for (int kind = 0; kind < 2; ++kind) {
        const std::vector<const void*> layer_src(src[kind].begin() + long(li * layer_slots),
                                                 src[kind].begin() + long((li + 1) * layer_slots));
        if (params_[kind].tiles) {
          tile_encode(params_[kind], layer_src, int64_t(H) * s_.dim, dst[kind], bytes[kind]);
        } else if (!ok(emulated_encode(params_[kind], dbooks_[kind]->view(), layer_src,
                                       int64_t(H) * s_.dim, KVC_DTYPE_FP16, dst[kind], bytes[kind]),
                       "encode")) {
          return KVC_ERROR_INTERNAL;
        }
      }
      if (!ok(emu::launch(ks::commit_kernel, 1, ks::kStoreThreads, 0, V, B, max_blocks, li == 0,
                          entries.data() + size_t(li) * B, bytes[0].data(), bytes[1].data(),
                          copy_dst.data(), &call),
              "commit") ||
          !ok(emu::launch(ks::copy_kernel, uint32_t(layer_slots * 2), 128, 0, copy_dst.data(),
                          encoded[0].data(), encoded[1].data(), stride[0], stride[1],
                          bytes[0].data(), bytes[1].data(), &call),
              "copy")) {
        return KVC_ERROR_INTERNAL;
      }
    }
    if (!ok(emu::launch(ks::finish_kernel, L * B, ks::kStoreThreads, 0, V, B, n, keys.data(),
                        values.data(), entries.data(), &call),
            "finish")) {
      return KVC_ERROR_INTERNAL;
    }
    return kvc_status_t(counters_.last_status);
  }

  const StoreShape& shape() const { return s_; }
  const CodecParams& params(int kind) const { return params_[kind]; }
  const Codebook* book(int kind) const { return books_[kind]; }
  const ks::LayerState& state(int32_t id, uint32_t layer) const {
    return states_[size_t(uint32_t(id) % s_.max_sequences) * s_.layers + layer];
  }
  const std::vector<uint8_t>& pool() const { return pool_; }
  const std::vector<uint32_t>& free_pages() const { return free_pages_; }
  const ks::Counters& counters() const { return counters_; }
  const std::vector<uint32_t>& layer_compressed() const { return layer_compressed_; }

 private:
  StoreShape s_;
  CodecParams params_[2];
  const Codebook* books_[2];
  std::unique_ptr<EmulatedBook> dbooks_[2];
  uint32_t table_blocks_ = 0;
  std::vector<uint8_t> pool_;
  std::vector<BlockLocation> tables_;
  std::vector<uint16_t> dense_;  // sinks and tails
  std::vector<ks::LayerState> states_;
  std::vector<uint32_t> free_pages_;
  std::vector<int32_t> slot_ids_;
  std::vector<uint32_t> generations_;
  std::vector<uint32_t> layer_compressed_;
  ks::Counters counters_{};
  bool rotated_ = false;
};

// The shadow: every live sequence's rows per layer, [tokens, heads * dim] of fp16 (K and V).
struct Shadow {
  std::map<int32_t, std::vector<std::vector<uint16_t>>> keys, values;  // [layer] -> rows
  // An append's rows: keys, values [layers, ids.size(), n, row], in call order.
  void append(const std::vector<int32_t>& ids, uint32_t n, uint32_t layers, size_t row,
              const std::vector<uint16_t>& k_rows, const std::vector<uint16_t>& v_rows) {
    const size_t per_entry = size_t(n) * row;
    for (uint32_t l = 0; l < layers; ++l) {
      for (size_t b = 0; b < ids.size(); ++b) {
        const size_t at = (size_t(l) * ids.size() + b) * per_entry;
        auto& k = keys[ids[b]][l];
        auto& v = values[ids[b]][l];
        k.insert(k.end(), k_rows.begin() + long(at), k_rows.begin() + long(at + per_entry));
        v.insert(v.end(), v_rows.begin() + long(at), v_rows.begin() + long(at + per_entry));
      }
    }
  }
};

// The table rows a call adds per (layer, sequence): the first new row's index, the rows.
using NewRows = std::vector<std::pair<uint32_t, std::vector<BlockLocation>>>;

// A snapshot of everything a failed call must leave as it was.
struct Snapshot {
  std::vector<ks::LayerState> states;
  std::vector<std::vector<BlockLocation>> tables;
  std::vector<uint32_t> free_stack;
  ks::Counters counters;
};

class StoreChecker {
 public:
  StoreChecker(EmulatedStore& store, Shadow& shadow) : st_(store), sh_(shadow) {}

  std::vector<uint8_t> cpu_block(int kind, const std::vector<uint16_t>& rows, uint32_t j,
                                 uint32_t h) const {
    const StoreShape& s = st_.shape();
    const CodecParams& p = st_.params(kind);
    std::vector<uint8_t> out(p.max_block_bytes(KVC_DTYPE_FP16));
    const uint16_t* src = rows.data() + size_t(j) * s.block_tokens * s.row() + h * s.dim;
    const uint32_t n =
        p.tiles ? cpu::encode_tile_block(p, src, s.row(), KVC_DTYPE_FP16, out.data())
                : cpu::encode_block(p, st_.book(kind), src, s.row(), KVC_DTYPE_FP16, out.data());
    out.resize(n);
    return out;
  }

  Snapshot snapshot() const {
    Snapshot snap;
    const StoreShape& s = st_.shape();
    for (const auto& [id, layers] : sh_.keys) {
      for (uint32_t l = 0; l < s.layers; ++l) {
        const ks::LayerState& ls = st_.state(id, l);
        snap.states.push_back(ls);
        snap.tables.emplace_back(ls.view.blocks, ls.view.blocks + ls.view.num_blocks * s.heads * 2);
      }
    }
    snap.counters = st_.counters();
    snap.free_stack.assign(st_.free_pages().begin(),
                           st_.free_pages().begin() + snap.counters.free_top);
    return snap;
  }

  void expect_unchanged(const Snapshot& before, const std::string& where) const {
    const Snapshot now = snapshot();
    ASSERT_EQ(now.states.size(), before.states.size()) << where;
    for (size_t i = 0; i < now.states.size(); ++i) {
      EXPECT_EQ(now.states[i].view.num_blocks, before.states[i].view.num_blocks) << where;
      EXPECT_EQ(now.states[i].view.sink_tokens, before.states[i].view.sink_tokens) << where;
      EXPECT_EQ(now.states[i].view.tail_tokens, before.states[i].view.tail_tokens) << where;
      EXPECT_EQ(now.states[i].open_page, before.states[i].open_page) << where;
      EXPECT_EQ(now.states[i].open_used, before.states[i].open_used) << where;
      for (size_t b = 0; b < now.tables[i].size(); ++b) {
        EXPECT_EQ(now.tables[i][b].page, before.tables[i][b].page) << where;
        EXPECT_EQ(now.tables[i][b].offset, before.tables[i][b].offset) << where;
        EXPECT_EQ(now.tables[i][b].bytes, before.tables[i][b].bytes) << where;
      }
    }
    EXPECT_EQ(now.free_stack, before.free_stack) << where;
    EXPECT_EQ(now.counters.num_blocks, before.counters.num_blocks) << where;
    EXPECT_EQ(now.counters.block_bytes, before.counters.block_bytes) << where;
    EXPECT_EQ(now.counters.tokens, before.counters.tokens) << where;
    EXPECT_EQ(now.counters.failed, before.counters.failed + 1) << where;
  }

  // Every invariant of the store against the shadow.
  void check(const std::string& where) const {
    const StoreShape& s = st_.shape();
    const uint32_t T = s.block_tokens;
    std::set<uint32_t> used;
    uint64_t blocks = 0, bytes = 0, tokens = 0;
    for (const auto& [id, layers] : sh_.keys) {
      for (uint32_t l = 0; l < s.layers; ++l) {
        const std::vector<uint16_t>* rows[2] = {&sh_.keys.at(id)[l], &sh_.values.at(id)[l]};
        const uint32_t len = uint32_t(rows[0]->size() / s.row());
        tokens += len;
        const ks::LayerState& ls = st_.state(id, l);
        ASSERT_EQ(ls.view.num_blocks, len / T) << where << " id " << id << " layer " << l;
        ASSERT_EQ(ls.view.tail_tokens, len % T) << where << " id " << id << " layer " << l;
        // The sinks (the first rows, once there is a block), then the tail.
        const uint32_t sinks = len >= T ? s.sink_tokens : 0;
        ASSERT_EQ(ls.view.sink_tokens, sinks) << where << " id " << id << " layer " << l;
        for (int kind = 0; kind < 2; ++kind) {
          const auto* dense =
              static_cast<const uint16_t*>(kind == 0 ? ls.view.dense_keys : ls.view.dense_values);
          ASSERT_TRUE(std::equal(rows[kind]->begin(), rows[kind]->begin() + sinks * s.row(), dense))
              << where << " sinks of id " << id << " layer " << l << " kind " << kind;
          const size_t first = size_t(len / T) * T * s.row();
          ASSERT_TRUE(std::equal(rows[kind]->begin() + long(first), rows[kind]->end(),
                                 dense + sinks * s.row()))
              << where << " tail of id " << id << " layer " << l << " kind " << kind;
        }
        // Blocks: CPU bytes, next-fit offsets, pages of their own.
        uint32_t open = s.page_bytes, page = 0xFFFFFFFFu;
        std::set<uint32_t> mine;
        for (uint32_t j = 0; j < ls.view.num_blocks; ++j) {
          for (uint32_t h = 0; h < s.heads; ++h) {
            for (int kind = 0; kind < 2; ++kind) {
              const BlockLocation& at = ls.view.blocks[(size_t(j) * s.heads + h) * 2 + kind];
              const std::vector<uint8_t> want = cpu_block(kind, *rows[kind], j, h);
              ASSERT_EQ(at.bytes, want.size()) << where;
              uint32_t offset = 0;
              const bool fresh = place_next_fit(open, at.bytes, s.page_bytes,
                                                block_alignment(st_.params(kind).tiles), offset);
              ASSERT_EQ(at.offset, offset) << where << " id " << id << " layer " << l;
              if (st_.params(kind).tiles) {
                ASSERT_EQ(at.offset % tiles::kTileAlign, 0u) << where << " unaligned tile block";
              }
              if (!fresh) ASSERT_EQ(at.page, page) << where;
              if (fresh) ASSERT_TRUE(mine.insert(at.page).second) << where << " page reused";
              page = at.page;
              ASSERT_LT(at.page, s.num_pages) << where;
              ASSERT_LE(size_t(at.offset) + at.bytes, s.page_bytes) << where;
              const uint8_t* p = st_.pool().data() + size_t(at.page) * s.page_bytes + at.offset;
              ASSERT_TRUE(std::equal(want.begin(), want.end(), p))
                  << where << " block " << j << " head " << h << " kind " << kind;
              ++blocks;
              bytes += at.bytes;
            }
          }
        }
        if (ls.view.num_blocks > 0) {
          EXPECT_EQ(ls.open_page, page) << where;
          EXPECT_EQ(ls.open_used, open) << where;
        }
        for (uint32_t pg : mine) ASSERT_TRUE(used.insert(pg).second) << where << " page shared";
      }
    }
    const ks::Counters& c = st_.counters();
    ASSERT_EQ(c.free_top + used.size(), s.num_pages) << where;
    std::set<uint32_t> free(st_.free_pages().begin(), st_.free_pages().begin() + c.free_top);
    ASSERT_EQ(free.size(), c.free_top) << where << " a page twice on the free stack";
    for (uint32_t pg : free) ASSERT_EQ(used.count(pg), 0u) << where << " page both free and used";
    EXPECT_EQ(c.num_blocks, blocks) << where;
    EXPECT_EQ(c.block_bytes, bytes) << where;
    EXPECT_EQ(c.tokens, tokens) << where;
  }

  // The status the call should end with, in the store's order: the first failing (layer,
  // sequence) of staging, else pages running out.
  kvc_status_t expected(const std::vector<int32_t>& ids, const std::vector<bool>& live, uint32_t n,
                        const std::vector<uint16_t>& keys,
                        const std::vector<uint16_t>& values) const {
    const StoreShape& s = st_.shape();
    const size_t per_entry = size_t(n) * s.row();
    for (uint32_t l = 0; l < s.layers; ++l) {
      for (size_t b = 0; b < ids.size(); ++b) {
        if (!live[b]) return KVC_ERROR_UNKNOWN_SEQUENCE;
        const size_t len = sh_.keys.at(ids[b])[l].size() / s.row();
        if (len + n > s.max_tokens) return KVC_ERROR_INVALID_ARGUMENT;
        const size_t at = (size_t(l) * ids.size() + b) * per_entry;
        for (size_t i = at; i < at + per_entry; ++i) {
          if ((keys[i] & 0x7C00u) == 0x7C00u || (values[i] & 0x7C00u) == 0x7C00u) {
            return KVC_ERROR_NONFINITE_INPUT;
          }
        }
      }
    }
    // Pages: the new blocks of every (layer, sequence), placed next-fit after what is there.
    uint32_t need = 0;
    for (uint32_t l = 0; l < s.layers; ++l) {
      for (size_t b = 0; b < ids.size(); ++b) {
        std::vector<uint16_t> rows[2] = {sh_.keys.at(ids[b])[l], sh_.values.at(ids[b])[l]};
        const size_t at = (size_t(l) * ids.size() + b) * per_entry;
        rows[0].insert(rows[0].end(), keys.begin() + long(at), keys.begin() + long(at + per_entry));
        rows[1].insert(rows[1].end(), values.begin() + long(at),
                       values.begin() + long(at + per_entry));
        const ks::LayerState& ls = st_.state(ids[b], l);
        uint32_t open = ls.view.num_blocks > 0 ? ls.open_used : s.page_bytes, offset = 0;
        const uint32_t total = uint32_t(rows[0].size() / s.row()) / s.block_tokens;
        for (uint32_t j = ls.view.num_blocks; j < total; ++j) {
          for (uint32_t h = 0; h < s.heads; ++h) {
            for (int kind = 0; kind < 2; ++kind) {
              need += place_next_fit(open, uint32_t(cpu_block(kind, rows[kind], j, h).size()),
                                     s.page_bytes, block_alignment(st_.params(kind).tiles), offset);
            }
          }
        }
      }
    }
    return need > st_.counters().free_top ? KVC_ERROR_OUT_OF_PAGES : KVC_SUCCESS;
  }

  // The table rows a successful call adds, laid out as the CPU store's commit lays them out
  // (Store::commit in src/store/store.cpp: place_next_fit after the open page, a page off the
  // free stack's top for each placement that opens one), (layer, sequence) by (layer, sequence)
  // in the order the CUDA store commits them. [layer * ids + b]: the first new row, the rows.
  NewRows expected_rows(const std::vector<int32_t>& ids, uint32_t n,
                        const std::vector<uint16_t>& keys,
                        const std::vector<uint16_t>& values) const {
    const StoreShape& s = st_.shape();
    const size_t per_entry = size_t(n) * s.row();
    std::vector<uint32_t> free(st_.free_pages().begin(),
                               st_.free_pages().begin() + st_.counters().free_top);
    NewRows out;
    for (uint32_t l = 0; l < s.layers; ++l) {
      for (size_t b = 0; b < ids.size(); ++b) {
        std::vector<uint16_t> rows[2] = {sh_.keys.at(ids[b])[l], sh_.values.at(ids[b])[l]};
        const size_t at = (size_t(l) * ids.size() + b) * per_entry;
        rows[0].insert(rows[0].end(), keys.begin() + long(at), keys.begin() + long(at + per_entry));
        rows[1].insert(rows[1].end(), values.begin() + long(at),
                       values.begin() + long(at + per_entry));
        const ks::LayerState& ls = st_.state(ids[b], l);
        uint32_t used = ls.view.num_blocks > 0 ? ls.open_used : s.page_bytes, offset = 0;
        uint32_t page = ls.open_page;
        out.emplace_back(ls.view.num_blocks * s.heads * 2, std::vector<BlockLocation>{});
        const uint32_t total = uint32_t(rows[0].size() / s.row()) / s.block_tokens;
        for (uint32_t j = ls.view.num_blocks; j < total; ++j) {
          for (uint32_t h = 0; h < s.heads; ++h) {
            for (int kind = 0; kind < 2; ++kind) {
              const uint32_t size = uint32_t(cpu_block(kind, rows[kind], j, h).size());
              if (place_next_fit(used, size, s.page_bytes, block_alignment(st_.params(kind).tiles),
                                 offset)) {
                page = free.back();
                free.pop_back();
              }
              out.back().second.push_back({page, offset, size});
            }
          }
        }
      }
    }
    return out;
  }

  void expect_rows(const std::vector<int32_t>& ids, const NewRows& want,
                   const std::string& where) const {
    const StoreShape& s = st_.shape();
    for (uint32_t l = 0; l < s.layers; ++l) {
      for (size_t b = 0; b < ids.size(); ++b) {
        const auto& [first, rows] = want[l * ids.size() + b];
        const ks::LayerState& ls = st_.state(ids[b], l);
        ASSERT_EQ(ls.view.num_blocks * s.heads * 2, first + rows.size()) << where;
        for (size_t i = 0; i < rows.size(); ++i) {
          const BlockLocation& got = ls.view.blocks[first + i];
          ASSERT_TRUE(got.page == rows[i].page && got.offset == rows[i].offset &&
                      got.bytes == rows[i].bytes)
              << where << " layer " << l << " id " << ids[b] << " new row " << i << " of "
              << rows.size() << ": got (" << got.page << ", " << got.offset << ", " << got.bytes
              << ") want (" << rows[i].page << ", " << rows[i].offset << ", " << rows[i].bytes
              << ")";
        }
      }
    }
  }

 private:
  EmulatedStore& st_;
  Shadow& sh_;
};

std::vector<uint16_t> random_rows(std::mt19937& rng, bool is_value, uint32_t tokens, uint32_t row) {
  const auto x = bench::synthetic_kv(is_value, tokens, row, rng());
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = format::float_to_half(x[i]);
  return out;
}

// Rows [count, dim] of fp16 rotated as the CPU store rotates them (src/store/store.cpp
// rotate_rows: fp32 transform, rounded to nearest, not saturated).
std::vector<uint16_t> cpu_rotated(const std::vector<uint16_t>& rows, uint32_t dim) {
  std::vector<uint16_t> out(rows.size());
  std::vector<float> x(dim);
  for (size_t r = 0; r < rows.size() / dim; ++r) {
    for (uint32_t d = 0; d < dim; ++d) x[d] = hadamard::load16(rows[r * dim + d], false);
    hadamard::rotate(x.data(), dim);
    for (uint32_t d = 0; d < dim; ++d) out[r * dim + d] = hadamard::store16(x[d], false);
  }
  return out;
}

void run_store_model(uint32_t seed, int steps, bool tiles = false, bool rotated = false,
                     uint32_t sinks = 0) {
  StoreShape s = tiles ? tile_store_shape() : StoreShape{};
  s.sink_tokens = sinks;
  kvc_codec_config kc = make_config(KVC_KIND_KEY, s.block_tokens, s.dim, KVC_BOUND_RELATIVE, 0.05f);
  kvc_codec_config vc =
      make_config(KVC_KIND_VALUE, s.block_tokens, s.dim, KVC_BOUND_RELATIVE, 0.05f);
  const auto parse = [](const kvcomp::Codebook& b) {
    const auto bytes = b.serialize();
    return Codebook::parse(bytes.data(), bytes.size());
  };
  const Codebook kbook = parse(train(kc, KVC_DTYPE_FP16, seed));
  const Codebook vbook = parse(train(vc, KVC_DTYPE_FP16, seed + 1));
  if (tiles) {  // (as the store's codec parameters: kind_params in src/store/store.cpp)
    kc.block_format = vc.block_format = KVC_BLOCK_FORMAT_TILES;
    kc.num_substreams = vc.num_substreams = 0;
  }
  EmulatedStore store(s, CodecParams::from_config(kc, true), CodecParams::from_config(vc, true),
                      tiles ? nullptr : &kbook, tiles ? nullptr : &vbook, rotated);
  Shadow shadow;
  StoreChecker checker(store, shadow);
  std::mt19937 rng(seed);
  std::vector<int32_t> freed;
  int failures = 0, appends = 0;
  std::map<kvc_status_t, int> statuses;
  for (int step = 0; step < steps; ++step) {
    const std::string where = "seed " + std::to_string(seed) + " step " + std::to_string(step);
    const uint32_t op = rng() % 10;
    if (op < 2 || shadow.keys.empty()) {
      const int32_t id = store.add_sequence();
      if (id >= 0) {
        shadow.keys[id].assign(s.layers, {});
        shadow.values[id].assign(s.layers, {});
      }
    } else if (op < 3) {
      auto it = std::next(shadow.keys.begin(), long(rng() % shadow.keys.size()));
      const int32_t id = it->first;
      // The free stack gains the sequence's pages layer by layer, each layer's last-allocated
      // page first, as the CPU store pushes them (so both hand out the same pages next).
      std::vector<uint32_t> want(store.free_pages().begin(),
                                 store.free_pages().begin() + store.counters().free_top);
      for (uint32_t l = 0; l < s.layers; ++l) {
        const ks::LayerState& ls = store.state(id, l);
        std::vector<uint32_t> pages;
        for (uint32_t i = 0; i < ls.view.num_blocks * s.heads * 2; ++i) {
          if (pages.empty() || pages.back() != ls.view.blocks[i].page) {
            pages.push_back(ls.view.blocks[i].page);
          }
        }
        want.insert(want.end(), pages.rbegin(), pages.rend());
      }
      store.free_sequence(id);
      ASSERT_EQ(store.counters().free_top, want.size()) << where;
      ASSERT_TRUE(std::equal(want.begin(), want.end(), store.free_pages().begin()))
          << where << ": the free stack is not in the CPU store's order";
      shadow.keys.erase(id);
      shadow.values.erase(id);
      freed.push_back(id);
    } else {
      std::vector<int32_t> ids;
      for (const auto& [id, rows] : shadow.keys) {
        if (rng() % 3 != 0) ids.push_back(id);
      }
      if (!freed.empty() && rng() % 8 == 0) {  // a sequence no longer live, somewhere in the batch
        ids.insert(ids.begin() + long(rng() % (ids.size() + 1)), freed[rng() % freed.size()]);
      }
      std::vector<bool> live;
      for (int32_t id : ids) live.push_back(shadow.keys.count(id) != 0);
      if (ids.empty()) continue;
      const uint32_t n = rng() % 6 == 0 ? 5 + rng() % 9 : 1 + rng() % 3;
      const size_t count = size_t(s.layers) * ids.size() * n * s.row();
      std::vector<uint16_t> keys = random_rows(rng, false, uint32_t(count / s.row()), s.row());
      std::vector<uint16_t> values = random_rows(rng, true, uint32_t(count / s.row()), s.row());
      if (rng() % 12 == 0) (rng() % 2 ? keys : values)[rng() % count] = rng() % 2 ? 0x7C00 : 0x7E00;
      if (rotated && rng() % 12 == 0) {  // finite, but its rotated row is past fp16's range
        std::fill_n(keys.begin() + long(rng() % (count / s.dim) * s.dim), s.dim, uint16_t(0x7B00));
      }
      const std::vector<uint16_t> given_keys = keys, given_values = values;
      if (rotated) {  // the store holds the rows rotated: the shadow too
        keys = cpu_rotated(keys, s.dim);
        values = cpu_rotated(values, s.dim);
      }
      const kvc_status_t want = checker.expected(ids, live, n, keys, values);
      const Snapshot before = checker.snapshot();
      NewRows rows;
      if (want == KVC_SUCCESS) rows = checker.expected_rows(ids, n, keys, values);
      const kvc_status_t got = store.append(ids, n, given_keys, given_values);
      ASSERT_EQ(got, want) << where;
      ++appends;
      ++statuses[got];
      if (got != KVC_SUCCESS) {
        ++failures;
        checker.expect_unchanged(before, where);
      } else {
        checker.expect_rows(ids, rows, where);
        shadow.append(ids, n, s.layers, s.row(), keys, values);
      }
    }
    checker.check(where);
    if (::testing::Test::HasFatalFailure()) return;
  }
  std::printf("seed %u: %d appends, statuses:", seed, appends);
  for (const auto& [status, count] : statuses)
    std::printf(" %s x%d", kvc_status_string(status), count);
  std::printf("; %llu blocks, %u of %u pages free at the end\n",
              (unsigned long long)store.counters().num_blocks, store.counters().free_top,
              s.num_pages);
  EXPECT_GT(appends, steps / 3);
  EXPECT_GT(failures, 0);
  EXPECT_EQ(store.layer_compressed(), std::vector<uint32_t>(s.layers, 1));
}

TEST(StoreEmulation, RandomOperationsAgainstAShadowModelSeed1) { run_store_model(1, 45); }
TEST(StoreEmulation, RandomOperationsAgainstAShadowModelSeed2) { run_store_model(2, 45); }
TEST(StoreEmulation, RandomOperationsAgainstAShadowModelSeed3) { run_store_model(3, 45); }
TEST(StoreEmulation, TileBlocksAgainstAShadowModelSeed4) { run_store_model(4, 60, true); }
TEST(StoreEmulation, TileBlocksAgainstAShadowModelSeed5) { run_store_model(5, 60, true); }
TEST(StoreEmulation, RotatedRowsAgainstAShadowModelSeed6) { run_store_model(6, 45, false, true); }
TEST(StoreEmulation, RotatedTileBlocksAgainstAShadowModelSeed7) {
  run_store_model(7, 60, true, true);
}
TEST(StoreEmulation, SinksAgainstAShadowModelSeed9) { run_store_model(9, 45, false, false, 3); }
TEST(StoreEmulation, SinksWithTileBlocksAgainstAShadowModelSeed10) {
  run_store_model(10, 60, true, false, 4);
}

// ---- commit_kernel alone ------------------------------------------------------------------

// One layer's commit over made-up block sizes, against the CPU store's placement (Store::commit
// in src/store/store.cpp: per sequence in order, place_next_fit from its open page, a page off
// the free stack's top for each placement that opens one). Sizes are any from 1 byte to a whole
// page, most not multiples of the alignment, and open pages hold any number of bytes (aligned or
// not), so the rule is checked beyond the blocks the encoders write. long_blocks: the new blocks
// of the sequences at `long_at` (placed by the whole thread block when that is more than
// kStoreThreads placements); the others get 0 to 2.
struct CommitCase {
  uint32_t sequences, heads, page_bytes, align;
  std::vector<uint32_t> long_at;
  uint32_t long_blocks;
  uint32_t by_block;            // of them, placed by the whole thread block
  bool short_of_pages = false;  // one page fewer than the call needs: nothing may change
  uint32_t largest = 0;         // when not 0: every size from 1 to this
  // When set, for the long sequences: the size of placement i of sequence b, the bytes used in
  // their open page, their live blocks (else random).
  std::function<uint32_t(uint32_t b, uint32_t i)> size_of = nullptr;
  int64_t open_used = -1;
  int32_t live = -1;
  // When set: the size of the first long sequence's fifth K block, 0 or past a page, which no
  // encoder writes and the kernel refuses (KVC_ERROR_INTERNAL), changing nothing.
  std::optional<uint32_t> bad_size;
};
constexpr uint32_t kEitherPath = ~0u;  // CommitCase::by_block: not checked

void run_commit_case(const CommitCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const uint32_t B = c.sequences, H = c.heads, P = c.page_bytes;
  std::vector<uint32_t> blocks(B), live(B);
  for (uint32_t b = 0; b < B; ++b) {
    blocks[b] = rng() % 3;
    live[b] = rng() % 4 == 0 ? 0 : 1 + rng() % 3;
  }
  for (uint32_t b : c.long_at) blocks[b] = c.long_blocks;
  if (c.live >= 0)
    for (uint32_t b : c.long_at) live[b] = uint32_t(c.live);
  std::vector<bool> is_long(B, false);
  for (uint32_t b : c.long_at) is_long[b] = true;
  const uint32_t max_blocks = *std::max_element(blocks.begin(), blocks.end());
  const uint32_t slots = max_blocks * H, row_capacity = (3 + max_blocks) * H * 2;
  const auto random_size = [&]() -> uint32_t {
    if (c.largest != 0) return 1 + rng() % c.largest;
    switch (rng() % 10) {
      case 0:
        return P - rng() % 3 * c.align;  // a whole page, or nearly
      case 1:
        return P / 2 + rng() % (P / 2);  // more than half a page
      case 2:
        return (1 + rng() % (P / 4 / c.align)) * c.align;  // aligned
      default:
        return 1 + rng() % (P / 8);  // small, unaligned
    }
  };
  std::vector<uint32_t> bytes_k(size_t(B) * slots, 0), bytes_v(size_t(B) * slots, 0);
  for (uint32_t b = 0; b < B; ++b) {
    for (uint32_t s = 0; s < blocks[b] * H; ++s) {
      bytes_k[size_t(b) * slots + s] =
          c.size_of && is_long[b] ? c.size_of(b, 2 * s) : random_size();
      bytes_v[size_t(b) * slots + s] =
          c.size_of && is_long[b] ? c.size_of(b, 2 * s + 1) : random_size();
    }
  }
  if (c.bad_size) bytes_k[size_t(c.long_at.at(0)) * slots + 4] = *c.bad_size;
  // Sequence b lives in slot b (layer 0); pages [0, B) are the open pages, the free stack holds
  // the others shuffled (so a page taken out of order shows).
  std::vector<BlockLocation> tables(size_t(B) * row_capacity, BlockLocation{0xFFFFFFFFu, 7, 7});
  std::vector<ks::LayerState> states(B);
  std::vector<ks::Entry> entries(B);
  for (uint32_t b = 0; b < B; ++b) {
    ks::LayerState& st = states[b];
    st.view = SequenceView{};
    st.view.blocks = tables.data() + size_t(b) * row_capacity;
    st.view.num_blocks = live[b];
    st.open_page = b;
    const uint32_t r = rng() % 4;
    st.open_used = r == 0 ? P : r == 1 ? P - rng() % 7 : uint32_t(rng() % (P + 1));
    if (c.open_used >= 0 && is_long[b]) st.open_used = uint32_t(c.open_used);
    entries[b] = {b, 0, KVC_SUCCESS, 0, blocks[b], 0, 0xEEEEEEEEu, 0, 0, 0};
  }
  // The reference, and the pages it needs.
  std::vector<std::vector<BlockLocation>> want(B);
  std::vector<uint32_t> want_first(B), want_open(B), want_used(B), want_added(B);
  uint32_t pages = 0;
  std::vector<uint32_t> opened_by;  // the rank of every page opened, by sequence
  for (uint32_t b = 0; b < B; ++b) {
    uint32_t used = live[b] > 0 ? states[b].open_used : P, page = b, added = 0, offset = 0;
    want_first[b] = pages;
    for (uint32_t i = 0; i < blocks[b] * H * 2; ++i) {
      const uint32_t size = (i % 2 == 0 ? bytes_k : bytes_v)[size_t(b) * slots + i / 2];
      if (place_next_fit(used, size, P, c.align, offset)) page = 0x80000000u | pages++;
      want[b].push_back({page, offset, size});
      added += size;
    }
    want_open[b] = page;
    want_used[b] = used;
    want_added[b] = added;
  }
  const uint32_t free_top = c.short_of_pages ? pages - 1 : pages + 3;
  const uint32_t num_pages = B + free_top;
  std::vector<uint32_t> free_pages(free_top);
  for (uint32_t i = 0; i < free_top; ++i) free_pages[i] = B + i;
  std::shuffle(free_pages.begin(), free_pages.end(), rng);
  const auto resolve = [&](uint32_t page) {  // rank r: the free stack's (r + 1)-th page from top
    return page & 0x80000000u ? free_pages[free_top - 1 - (page & 0x7FFFFFFFu)] : page;
  };
  // The commit only computes addresses in the pool: pages of up to 2^30 bytes get a made-up base.
  const bool made_up = size_t(num_pages) * P > (size_t(1) << 28);
  std::vector<uint8_t> pool_bytes(made_up ? 0 : size_t(num_pages) * P);
  uint8_t* const pool =
      made_up ? reinterpret_cast<uint8_t*>(uintptr_t(1) << 44) : pool_bytes.data();
  std::vector<int32_t> slot_ids(B);
  std::vector<uint32_t> layer_compressed(1, 1);
  ks::Counters counters{free_top, KVC_SUCCESS, 0, 0, 0, 0, 0};
  const ks::StoreView V{states.data(),
                        slot_ids.data(),
                        free_pages.data(),
                        &counters,
                        layer_compressed.data(),
                        pool,
                        P,
                        1,
                        H,
                        16,
                        16,
                        B,
                        1u << 20,
                        0x7C00u,
                        c.align,
                        0};
  void* const poison = reinterpret_cast<void*>(uintptr_t(0x5A5A5A50));
  std::vector<void*> copy_dst(size_t(B) * slots * 2, poison);
  ks::CallState call;
  std::memset(&call, 0xFF, sizeof(call));
  const std::vector<BlockLocation> tables_before = tables;
  const auto r =
      emu::launch(ks::commit_kernel, 1, ks::kStoreThreads, 0, V, B, max_blocks, true,
                  entries.data(), bytes_k.data(), bytes_v.data(), copy_dst.data(), &call);
  ASSERT_TRUE(r.ok()) << r.message();
  if (c.short_of_pages || c.bad_size) {
    ASSERT_NE(call.failure, ks::kNoFailure);
    EXPECT_EQ(int32_t(uint32_t(call.failure)),
              c.bad_size ? KVC_ERROR_INTERNAL : KVC_ERROR_OUT_OF_PAGES);
    EXPECT_EQ(call.free_top, free_top);
    for (size_t i = 0; i < tables.size(); ++i) {
      ASSERT_EQ(tables[i].page, tables_before[i].page) << "row " << i << " written";
      ASSERT_EQ(tables[i].offset, tables_before[i].offset) << "row " << i << " written";
    }
    return;
  }
  ASSERT_EQ(call.failure, ks::kNoFailure) << int32_t(uint32_t(call.failure));
  EXPECT_EQ(call.free_top, free_top - pages);
  // The sequences the kernel's rule (placed_by_block, place_group) gives the thread block.
  uint32_t by_block = 0;
  for (uint32_t at = 0; at < B; at += ks::kStoreThreads) {
    uint64_t chunks = 0, longest = 0, candidates = 0;
    for (uint32_t b = at; b < std::min(B, at + ks::kStoreThreads); ++b) {
      const uint32_t n = blocks[b] * H * 2;
      if (blocks[b] < 2 || n <= ks::kStoreThreads) continue;
      ++candidates;
      chunks += (n + ks::kPlaceChunk - 1) / ks::kPlaceChunk;
      longest = std::max<uint64_t>(longest, n);
    }
    if (chunks * ks::kChunkWalk < longest) by_block += uint32_t(candidates);
  }
  for (uint32_t b = 0; b < B; ++b) {
    const uint32_t n = blocks[b] * H * 2;
    const std::string where = "sequence " + std::to_string(b) + " of " + std::to_string(n);
    ASSERT_EQ(entries[b].first_page, want_first[b]) << where;
    if (n > 0) {
      ASSERT_EQ(entries[b].open_page, resolve(want_open[b])) << where;
      ASSERT_EQ(entries[b].open_used, want_used[b]) << where;
      ASSERT_EQ(entries[b].added_bytes, want_added[b]) << where;
    }
    const BlockLocation* rows = tables.data() + size_t(b) * row_capacity;
    for (uint32_t i = 0; i < row_capacity; ++i) {
      const bool placed = i >= live[b] * H * 2 && i < live[b] * H * 2 + n;
      const BlockLocation got = rows[i];
      const BlockLocation w =
          placed ? want[b][i - live[b] * H * 2] : tables_before[size_t(b) * row_capacity + i];
      const uint32_t page = placed ? resolve(w.page) : w.page;
      ASSERT_TRUE(got.page == page && got.offset == w.offset && got.bytes == w.bytes)
          << where << " row " << i << ": got (" << got.page << ", " << got.offset << ", "
          << got.bytes << ") want (" << page << ", " << w.offset << ", " << w.bytes << ")";
    }
    for (uint32_t i = 0; i < slots * 2; ++i) {
      void* const got = copy_dst[(size_t(b) * slots) * 2 + i];
      void* const w =
          i < n ? pool + size_t(resolve(want[b][i].page)) * P + want[b][i].offset : nullptr;
      ASSERT_EQ(got, w) << where << " copy destination " << i;
    }
  }
  if (c.by_block != kEitherPath) EXPECT_EQ(by_block, c.by_block);
}

// A prefill's thousands of placements (3,200: four chunks of place_by_block) beside short
// sequences, over three groups of kStoreThreads sequences with long ones in two of them; format
// v1's alignment.
TEST(StoreEmulation, CommitPlacesLongAndShortSequencesAsTheCpuStore) {
  run_commit_case({600, 8, 4096, 4, {5, 299, 300}, 200, 3}, 11);
}
// Tile blocks' alignment, small pages (a page per one to a few placements), an odd head count.
TEST(StoreEmulation, CommitPlacesTileAlignedBlocksAsTheCpuStore) {
  run_commit_case({40, 3, 1280, 16, {0, 17, 39}, 180, 3}, 12);
}
// One prefill alone, just past the threshold (17 blocks x 8 heads: 272 placements), and at it
// (16 blocks: 256, walked by one thread).
TEST(StoreEmulation, CommitPlacesASequenceAtTheThresholdAsTheCpuStore) {
  run_commit_case({1, 8, 2048, 16, {0}, 17, 1}, 13);
  run_commit_case({3, 8, 2048, 4, {1}, 16, 0}, 14);
}
// A batch of many long prompts (40 of 17 blocks: 272 placements each) stays with one thread per
// sequence (place_group), beside a group whose one long sequence goes to the thread block.
TEST(StoreEmulation, CommitPlacesABatchOfLongPromptsAsTheCpuStore) {
  std::vector<uint32_t> many;
  for (uint32_t b = 0; b < 40; ++b) many.push_back(b * 3);
  many.push_back(300);
  run_commit_case({301, 8, 4096, 16, many, 17, 1}, 17);
}
// Pages of hundreds of small blocks: chunks of place_by_block that open one page or none, so
// that the next chunk goes on in the page an earlier one opened.
TEST(StoreEmulation, CommitPlacesManyBlocksPerPageAsTheCpuStore) {
  run_commit_case({4, 8, 65536, 4, {0, 2}, 300, 2, false, 64}, 16);
}
TEST(StoreEmulation, CommitShortOfPagesChangesNothing) {
  run_commit_case({20, 8, 4096, 4, {3}, 60, 1, true}, 15);
}

// Edge cases of place_by_block (from a review): one long sequence of fixed or patterned sizes,
// placed by the thread block, against next fit.
CommitCase one_long(uint32_t heads, uint32_t P, uint32_t align, uint32_t blocks,
                    std::function<uint32_t(uint32_t, uint32_t)> size_of, int64_t open_used,
                    int32_t live) {
  CommitCase c{1, heads, P, align, {0}, blocks, 1};
  c.size_of = std::move(size_of);
  c.open_used = open_used;
  c.live = live;
  return c;
}
uint32_t fixed(uint32_t bytes, uint32_t) { return bytes; }

TEST(StoreEmulation, CommitPagesEndingAtChunkEnds) {  // 256 16-byte blocks a page, 1,024 a chunk
  using namespace std::placeholders;
  run_commit_case(one_long(8, 4096, 4, 300, std::bind(fixed, 16, _2), 4096, 2), 1);
  run_commit_case(one_long(8, 4096, 16, 300, std::bind(fixed, 16, _2), 0, 0), 2);
  run_commit_case(one_long(8, 4096, 16, 300, std::bind(fixed, 13, _2), 4095, 1), 3);
}

TEST(StoreEmulation, CommitPagesSpanningChunks) {
  using namespace std::placeholders;
  run_commit_case(one_long(8, 4096, 4, 300, std::bind(fixed, 12, _2), 100, 1), 4);
  run_commit_case(one_long(8, 65536, 4, 300, std::bind(fixed, 4, _2), 7, 1), 5);  // none opened
  run_commit_case(one_long(
                      8, 65536, 16, 300, [](uint32_t, uint32_t i) { return 1 + i % 17; }, 65535, 1),
                  6);
}

TEST(StoreEmulation, CommitWholePageBlocks) {  // a page per placement: 1,024 runs in a chunk
  using namespace std::placeholders;
  run_commit_case(one_long(8, 1024, 16, 128, std::bind(fixed, 1024, _2), 1024, 3), 7);
  run_commit_case(one_long(8, 1024, 16, 128, std::bind(fixed, 1024, _2), 0, 3), 8);
  run_commit_case(
      one_long(
          8, 1024, 4, 129, [](uint32_t, uint32_t i) { return i % 2 ? 1024u : 1020u; }, 4, 3),
      9);
}

TEST(StoreEmulation, CommitFirstBlockThatJustFitsOrDoesNotFitTheOpenPage) {
  const auto first = [](uint32_t bytes, uint32_t rest) {
    return [=](uint32_t, uint32_t i) { return i == 0 ? bytes : rest; };
  };
  run_commit_case(one_long(8, 4096, 16, 40, first(32, 48), 4096 - 17, 1), 10);
  run_commit_case(one_long(8, 4096, 16, 40, first(16, 48), 4096 - 17, 1), 11);  // fills it
  run_commit_case(one_long(8, 4096, 16, 40, first(17, 48), 4096 - 32, 1), 12);
  run_commit_case(one_long(8, 4096, 4, 40, first(4096, 3), 1, 1), 13);
}

TEST(StoreEmulation, CommitRefusesABlockOfNoBytesOrPastAPage) {
  for (uint32_t bad : {0u, 4097u, 0xFFFFFFF0u}) {
    CommitCase c = one_long(
        8, 4096, 16, 40, [](uint32_t, uint32_t) { return 48u; }, 100, 1);
    c.bad_size = bad;
    SCOPED_TRACE(bad);
    run_commit_case(c, 18);
  }
}

TEST(StoreEmulation, CommitLastChunkOfTwoPlacements) {  // 27 blocks x 19 heads x 2 = 1,026
  run_commit_case(one_long(
                      19, 2048, 16, 27, [](uint32_t, uint32_t i) { return 100 + i % 97; }, 2000, 2),
                  14);
  run_commit_case(
      one_long(
          19, 2048, 16, 27, [](uint32_t, uint32_t i) { return i >= 1024 ? 2048u : 7u; }, 2000, 2),
      15);
}

TEST(StoreEmulation, CommitPagesOf1GiBSumPast32Bits) {  // a chunk's scan reaches 2^39
  const uint32_t P = 1u << 30;
  run_commit_case(
      one_long(
          8, P, 16, 70,
          [](uint32_t, uint32_t i) { return i % 3 == 0 ? (1u << 30) : (1u << 29) - 16 * (i % 5); },
          P - 48, 1),
      16);
  run_commit_case(
      one_long(
          8, P, 4, 70, [](uint32_t, uint32_t i) { return (1u << 28) + 4 * (i % 7) + 1; }, 0, 1),
      17);
}

// Random batches: 1 to 6 sequences, up to 3 of them long, sizes random, up to a page, or drawn
// from page-sized, alignment-sized and 1-byte blocks.
TEST(StoreEmulation, CommitRandomBatches) {
  std::mt19937 rng(2026);
  const uint32_t pages[] = {256, 512, 1280, 4096, 65536};
  for (int it = 0; it < 60; ++it) {
    CommitCase c{};
    c.sequences = 1 + rng() % 6;
    c.heads = 1 + rng() % 12;
    c.page_bytes = pages[rng() % 5];
    c.align = rng() % 2 ? 4 : 16;
    const uint32_t longs = 1 + rng() % std::min(3u, c.sequences);
    for (uint32_t k = 0; k < longs; ++k) c.long_at.push_back(rng() % c.sequences);
    std::sort(c.long_at.begin(), c.long_at.end());
    c.long_at.erase(std::unique(c.long_at.begin(), c.long_at.end()), c.long_at.end());
    c.long_blocks = 2 + rng() % (5000 / (2 * c.heads));
    c.by_block = kEitherPath;
    const uint32_t kind = rng() % 4;
    if (kind == 0) c.largest = 1 + rng() % 64;
    if (kind == 1) c.largest = 1 + rng() % c.page_bytes;
    if (kind == 2) {
      c.size_of = [P = c.page_bytes, a = c.align, seed = uint32_t(rng())](uint32_t b, uint32_t i) {
        const uint32_t h = (i * 2654435761u) ^ (b * 40503u) ^ seed;
        const uint32_t choice[] = {P, P - a, a, 1u, 1 + h % (P / 16 + 1)};
        return choice[h % 5];
      };
    }
    SCOPED_TRACE("batch " + std::to_string(it));
    run_commit_case(c, uint32_t(rng()));
    if (HasFatalFailure()) return;
  }
}

// A long prefill and batches of several sequences through the whole append chain (stage,
// encode, commit, copy, finish) of a tiles store, every block byte for byte and every new table
// row against the CPU store's layout: a prefill of 2,800 tokens x 8 heads (175 blocks: 2,800
// placements per layer, three chunks of the thread block's placement) going on in a page an
// earlier call opened; batches whose sequences fall on either side of the threshold (16 blocks,
// 256 placements: one thread; 17: the thread block) or all past it, after a free put pages back
// on the free stack; and a decode step.
TEST(StoreEmulation, LongPrefillAndMixedBatchesLayOutPagesAsTheCpuStore) {
  StoreShape s = tile_store_shape();
  s.heads = 8;
  s.page_bytes = 4096;
  s.num_pages = 900;
  s.max_sequences = 5;
  s.max_tokens = 4096;
  kvc_codec_config kc = make_config(KVC_KIND_KEY, s.block_tokens, s.dim, KVC_BOUND_RELATIVE, 0.05f);
  kvc_codec_config vc =
      make_config(KVC_KIND_VALUE, s.block_tokens, s.dim, KVC_BOUND_RELATIVE, 0.05f);
  kc.block_format = vc.block_format = KVC_BLOCK_FORMAT_TILES;
  kc.num_substreams = vc.num_substreams = 0;
  EmulatedStore store(s, CodecParams::from_config(kc, true), CodecParams::from_config(vc, true),
                      nullptr, nullptr);
  Shadow shadow;
  StoreChecker checker(store, shadow);
  std::mt19937 rng(17);
  std::vector<int32_t> ids;
  for (int i = 0; i < 5; ++i) {
    ids.push_back(store.add_sequence());
    shadow.keys[ids.back()].assign(s.layers, {});
    shadow.values[ids.back()].assign(s.layers, {});
  }
  const auto append = [&](const std::vector<int32_t>& call, uint32_t n, const std::string& where) {
    const size_t count = size_t(s.layers) * call.size() * n;
    const std::vector<uint16_t> keys = random_rows(rng, false, uint32_t(count), s.row());
    const std::vector<uint16_t> values = random_rows(rng, true, uint32_t(count), s.row());
    const std::vector<bool> live(call.size(), true);
    ASSERT_EQ(checker.expected(call, live, n, keys, values), KVC_SUCCESS) << where;
    const NewRows rows = checker.expected_rows(call, n, keys, values);
    ASSERT_EQ(store.append(call, n, keys, values), KVC_SUCCESS) << where;
    checker.expect_rows(call, rows, where);
    shadow.append(call, n, s.layers, s.row(), keys, values);
    checker.check(where);
  };
  append(ids, 7, "tails");
  append({ids[0], ids[1], ids[2]}, 10, "a block each");  // tails of 1 past one block
  ASSERT_LT(store.state(ids[0], 0).open_used, s.page_bytes);
  append({ids[0]}, 2800, "long prefill");
  ASSERT_EQ(store.state(ids[0], 1).view.num_blocks, 176u);
  append({ids[1], ids[3], ids[2], ids[4]}, 270, "16 and 17 blocks");  // tails 1, 7, 1, 7
  ASSERT_EQ(store.state(ids[1], 0).view.num_blocks, 17u);
  ASSERT_EQ(store.state(ids[3], 0).view.num_blocks, 17u);
  store.free_sequence(ids[1]);
  shadow.keys.erase(ids[1]);
  shadow.values.erase(ids[1]);
  append({ids[3], ids[0], ids[4]}, 600, "all past the threshold");
  append({ids[0], ids[2], ids[3], ids[4]}, 1, "decode step");
  std::printf("%llu blocks, %u of %u pages free at the end\n",
              (unsigned long long)store.counters().num_blocks, store.counters().free_top,
              s.num_pages);
}

// rotate_rows_kernel against hadamard::rotate, bit for bit, for every dtype pair it serves: the
// append's fp16/bf16 -> same (rounded, not saturated), the read's fp32 -> any (saturated), and the
// attention's in-place-shaped fp16 -> fp16 (saturated); dims 1 to 1024 and grids smaller than the
// row count (grid-stride).
TEST(StoreEmulation, RotateRowsKernelIsTheCpuRotation) {
  std::mt19937 rng(8);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (uint32_t dim : {1u, 2u, 16u, 64u, 256u, 1024u}) {
    const size_t rows = dim >= 256 ? 3 : 9;
    std::vector<float> x(rows * dim);
    for (float& e : x) e = normal(rng) * (rng() % 9 == 0 ? 3000.0f : 1.0f);
    for (uint32_t in :
         {uint32_t(KVC_DTYPE_FP16), uint32_t(KVC_DTYPE_BF16), uint32_t(KVC_DTYPE_FP32)}) {
      for (uint32_t out :
           {uint32_t(KVC_DTYPE_FP16), uint32_t(KVC_DTYPE_BF16), uint32_t(KVC_DTYPE_FP32)}) {
        for (bool saturate : {false, true}) {
          const size_t in_es = in == KVC_DTYPE_FP32 ? 4 : 2, out_es = out == KVC_DTYPE_FP32 ? 4 : 2;
          std::vector<uint8_t> src(x.size() * in_es), dst(x.size() * out_es, 0xAB);
          for (size_t i = 0; i < x.size(); ++i)
            cpu::store_element(src.data(), kvc_dtype(in), i, x[i]);
          const auto r = emu::launch(ks::rotate_rows_kernel, emu::Dim3(2), ks::kRotateThreads, 0,
                                     static_cast<const void*>(src.data()), in,
                                     static_cast<void*>(dst.data()), out, saturate, rows, dim);
          ASSERT_TRUE(r.ok()) << r.message();
          std::vector<float> row(dim);
          for (size_t rr = 0; rr < rows; ++rr) {
            for (uint32_t d = 0; d < dim; ++d) {
              row[d] = cpu::load_element(src.data(), kvc_dtype(in), rr * dim + d);
            }
            hadamard::rotate(row.data(), dim);
            for (uint32_t d = 0; d < dim; ++d) {
              std::vector<uint8_t> want(4);
              if (out == KVC_DTYPE_FP32 || saturate) {
                cpu::store_element(want.data(), kvc_dtype(out), 0, row[d]);
              } else {
                const uint16_t b = hadamard::store16(row[d], out == KVC_DTYPE_BF16);
                std::memcpy(want.data(), &b, 2);
              }
              ASSERT_EQ(std::memcmp(&dst[(rr * dim + d) * out_es], want.data(), out_es), 0)
                  << "dim " << dim << " in " << in << " out " << out << " saturate " << saturate
                  << " row " << rr << " element " << d;
            }
          }
        }
      }
    }
  }
}

// Rows an append stores (rotated, not saturated) that would not rotate back within fp32 get an
// inf, which the append then refuses, as the CPU store refuses them: bf16 values above about
// FLT_MAX / sqrt(head_dim) rotate into the dtype but sum past fp32 on the way back.
TEST(StoreEmulation, RotateRowsKernelMarksARowThatDoesNotRotateBack) {
  const uint32_t dim = 128;
  std::vector<uint16_t> src(2 * dim, format::float_to_bf16(0.0f)), dst(src.size());
  src[0] = format::float_to_bf16(1e38f);    // rotates to 128 values of 8.8e36: back, inf
  src[dim] = format::float_to_bf16(1e36f);  // fine both ways
  for (bool saturate : {false, true}) {
    const auto r = emu::launch(ks::rotate_rows_kernel, emu::Dim3(1), ks::kRotateThreads, 0,
                               static_cast<const void*>(src.data()), uint32_t(KVC_DTYPE_BF16),
                               static_cast<void*>(dst.data()), uint32_t(KVC_DTYPE_BF16), saturate,
                               size_t(2), dim);
    ASSERT_TRUE(r.ok()) << r.message();
    std::vector<float> row(dim);
    for (uint32_t d = 0; d < dim; ++d) row[d] = format::bf16_to_float(src[d]);
    hadamard::rotate(row.data(), dim);
    EXPECT_EQ(std::isinf(format::bf16_to_float(dst[0])), !saturate) << "saturate " << saturate;
    for (uint32_t d = 1; d < dim; ++d) EXPECT_EQ(dst[d], format::float_to_bf16(row[d]));
    for (uint32_t d = 0; d < dim; ++d)
      EXPECT_TRUE(std::isfinite(format::bf16_to_float(dst[dim + d])));
  }
}

}  // namespace
}  // namespace kvc::test
