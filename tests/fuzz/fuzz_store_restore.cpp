// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: kvc_store_restore on mutated serialized sequences (docs/format.md §16).
// Input: one selector byte (bits 0-1 and 3: the store configuration, fuzz_store.hpp
// config_of_selector; bit 2: recompute
// the checksum first, so that mutations reach the checks behind it), then the bytes to restore.
// The custom mutator edits genuine sequences record by record (blocks stretched, shrunk, swapped,
// their header fields changed, counts changed) as well as byte by byte, and reseals them.
//
// Each input goes to a fresh store that holds a victim sequence placed right after a freed one
// (the layout in which an overlong block would land in the victim's page). Properties:
//   - the status is success or one that kvc_store_restore documents, with a message on failure;
//   - a failed restore changes nothing: the victim's bytes, the stats (pages, blocks, bytes),
//     and the next sequence id;
//   - a restored sequence reads back (every layer, fp32, finite values) and attends without
//     errors, leaves the victim as it was, and frees every page it took.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "fuzz_common.hpp"
#include "fuzz_store.hpp"
#include "serialized_sequence.hpp"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace {

using kvc_fuzz::SerialSequence;

struct Fixture {
  kvc_codebook_t book = kvc_fuzz::make_fixed_codebook();
  // Per configuration: the bytes of X (freed before the input is restored) and of the victim Y.
  std::vector<uint8_t> x[kvc_fuzz::kNumStoreConfigs], y[kvc_fuzz::kNumStoreConfigs];
  Fixture() {
    for (int i = 0; i < kvc_fuzz::kNumStoreConfigs; ++i) {
      const kvc_store_config c = kvc_fuzz::store_config(i);
      kvc_store_t s = nullptr;
      KVC_FUZZ_CHECK(kvc_store_create(&c, &s) == KVC_SUCCESS);
      kvc_fuzz::set_store_codebooks(s, c, book);
      const int32_t T = c.block_tokens;
      x[i] = kvc_fuzz::serialized(s, kvc_fuzz::prefilled_sequence(s, c, T + 1, 11, 0));
      y[i] = kvc_fuzz::serialized(s, kvc_fuzz::prefilled_sequence(s, c, 2 * T + 3, 12, 0));
      kvc_store_destroy(s);
    }
  }
};

const Fixture& fixture() {
  static const Fixture f;
  return f;
}

bool documented_restore_status(kvc_status_t s) {
  switch (s) {
    case KVC_ERROR_CORRUPT_DATA:
    case KVC_ERROR_FORMAT_VERSION:
    case KVC_ERROR_CONFIG_MISMATCH:
    case KVC_ERROR_CODEBOOK_MISMATCH:
    case KVC_ERROR_INVALID_ARGUMENT:  // a layer longer than max_sequence_tokens
    case KVC_ERROR_OUT_OF_MEMORY:     // max_sequences live (or a host allocation)
    case KVC_ERROR_OUT_OF_PAGES:
      return true;
    default:
      return false;
  }
}

void check_reads_back(kvc_store_t s, const kvc_store_config& c, int32_t id) {
  const size_t row = kvc_fuzz::row_elements(c);
  for (int32_t l = 0; l < c.num_layers; ++l) {
    int32_t n = -1;
    KVC_FUZZ_CHECK(kvc_store_sequence_length(s, id, l, &n) == KVC_SUCCESS);
    KVC_FUZZ_CHECK(n >= 0 && (c.max_sequence_tokens == 0 || n <= c.max_sequence_tokens));
    std::vector<float> k(size_t(n) * row), v(size_t(n) * row);
    KVC_FUZZ_CHECK(kvc_store_read(s, id, l, KVC_DTYPE_FP32, n, k.data(), v.data(), nullptr) ==
                   KVC_SUCCESS);
    for (size_t i = 0; i < k.size(); ++i) {
      KVC_FUZZ_CHECK(std::isfinite(k[i]) && std::isfinite(v[i]));
    }
    std::vector<uint16_t> q(row, 0x3C00), out(row);  // one query head per kv-head, 1.0
    KVC_FUZZ_CHECK(kvc_store_attention(s, l, 1, &id, c.num_kv_heads, 0.25f, q.data(), out.data(),
                                       nullptr) == KVC_SUCCESS);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const Fixture& f = fixture();
  const int which = kvc_fuzz::config_of_selector(data[0]);
  const bool reseal = (data[0] & 4) != 0;
  std::vector<uint8_t> edited(data + 1, data + size);
  if (reseal) kvc_fuzz::reseal(edited);
  const kvc_fuzz::ExactCopy input(edited.data(), edited.size());

  const kvc_store_config c = kvc_fuzz::store_config(which);
  kvc_store_t s = nullptr;
  KVC_FUZZ_CHECK(kvc_store_create(&c, &s) == KVC_SUCCESS);
  kvc_fuzz::set_store_codebooks(s, c, f.book);
  int32_t x = -1, y = -1;
  KVC_FUZZ_CHECK(kvc_store_restore(s, f.x[which].data(), f.x[which].size(), &x) == KVC_SUCCESS);
  KVC_FUZZ_CHECK(kvc_store_restore(s, f.y[which].data(), f.y[which].size(), &y) == KVC_SUCCESS);
  KVC_FUZZ_CHECK(kvc_store_free_sequence(s, x, nullptr) == KVC_SUCCESS);
  const kvc_fuzz::StoreSnapshot before = kvc_fuzz::snapshot(s, {y});

  kvc_clear_last_error();
  int32_t id = -1;
  const kvc_status_t st = kvc_store_restore(s, input.p, edited.size(), &id);
  if (st != KVC_SUCCESS) {
    KVC_FUZZ_CHECK(documented_restore_status(st));
    KVC_FUZZ_CHECK(kvc_last_error()[0] != '\0');
    KVC_FUZZ_CHECK(id == -1);
    KVC_FUZZ_CHECK(kvc_fuzz::snapshot(s, {y}) == before);
    // No sequence id was used up: the next one is the one after Y.
    int32_t next = -1;
    KVC_FUZZ_CHECK(kvc_store_add_sequence(s, &next) == KVC_SUCCESS);
    KVC_FUZZ_CHECK(next == y + 1);
  } else {
    KVC_FUZZ_CHECK(id == y + 1);
    check_reads_back(s, c, id);
    KVC_FUZZ_CHECK(kvc_fuzz::snapshot(s, {y}).sequences == before.sequences);
    // A restored sequence serializes to a string that restores again.
    const std::vector<uint8_t> again = kvc_fuzz::serialized(s, id);
    KVC_FUZZ_CHECK(kvc_store_free_sequence(s, id, nullptr) == KVC_SUCCESS);
    KVC_FUZZ_CHECK(kvc_fuzz::snapshot(s, {y}) == before);
    int32_t copy = -1;
    KVC_FUZZ_CHECK(kvc_store_restore(s, again.data(), again.size(), &copy) == KVC_SUCCESS);
  }
  kvc_store_destroy(s);
  return 0;
}

// ---- Structure-aware mutation -----------------------------------------------------------------

namespace {

// One edit of a parsed sequence's records; false if there was nothing to edit.
bool mutate_records(SerialSequence& s, std::minstd_rand& rng, size_t max_block) {
  auto pick = [&](size_t n) { return size_t(rng() % n); };
  std::vector<std::vector<uint8_t>*> blocks;
  for (auto& l : s.layers) {
    for (auto& b : l.blocks) blocks.push_back(&b);
  }
  auto set_length = [](std::vector<uint8_t>& b) {  // block_bytes: at 12 in a tile block ("kvct")
    const bool tile = b.size() >= 4 && kvc_fuzz::load_word(b.data()) == 0x7463766Bu;
    if (b.size() >= 20) kvc_fuzz::store_word(&b[tile ? 12 : 16], uint32_t(b.size()));
  };
  switch (rng() % 10) {
    case 0: {  // bytes of one block mutated, its stated length kept equal to its record
      if (blocks.empty()) return false;
      std::vector<uint8_t>& b = *blocks[pick(blocks.size())];
      const size_t n = b.size();
      b.resize(std::max(n, max_block));
      b.resize(LLVMFuzzerMutate(b.data(), n, b.size()) / 4 * 4);
      set_length(b);
      return true;
    }
    case 1: {  // one block stretched or cut to a multiple of 4, zero-filled
      if (blocks.empty()) return false;
      std::vector<uint8_t>& b = *blocks[pick(blocks.size())];
      const size_t sizes[] = {b.size() + 4,
                              b.size() * 2,
                              max_block,
                              max_block + 4,
                              4096,
                              b.size() > 8 ? b.size() - 4 : 0,
                              32};
      b.resize(sizes[pick(7)] / 4 * 4, 0);
      set_length(b);
      return true;
    }
    case 2: {  // two blocks swapped (K for V, one layer's for another's)
      if (blocks.size() < 2) return false;
      std::swap(*blocks[pick(blocks.size())], *blocks[pick(blocks.size())]);
      return true;
    }
    case 3: {  // one header byte of a block set to a chosen or random value
      if (blocks.empty()) return false;
      std::vector<uint8_t>& b = *blocks[pick(blocks.size())];
      if (b.size() < 32) return false;
      // (v1: 16 block_bytes, 24 and 27 the centre base; tiles: 16 and 19 the centre base)
      static constexpr size_t kFields[] = {5, 6, 7, 8, 10, 12, 14, 16, 19, 20, 24, 27, 28};
      const size_t at = kFields[pick(13)];
      b[at] = rng() % 2 ? uint8_t(rng()) : uint8_t(rng() % 4);
      return true;
    }
    case 4: {  // a layer's counts changed (records then disagree with the blocks present)
      SerialSequence::Layer& l = s.layers[pick(s.layers.size())];
      const uint32_t delta = rng() % 2 ? 1u : uint32_t(-1);
      if (rng() % 2) {
        l.num_blocks += delta;
      } else {
        l.tail_tokens += delta;
      }
      return true;
    }
    case 5: {  // a token block repeated or dropped, consistently
      SerialSequence::Layer& l = s.layers[pick(s.layers.size())];
      const size_t per = size_t(s.num_heads()) * 2;
      if (l.num_blocks == 0 || l.blocks.size() < per) return false;
      if (rng() % 2) {
        l.blocks.insert(l.blocks.end(), l.blocks.end() - long(per), l.blocks.end());
        ++l.num_blocks;
      } else {
        l.blocks.erase(l.blocks.end() - long(per), l.blocks.end());
        --l.num_blocks;
      }
      return true;
    }
    case 6: {  // a tail token added or removed, consistently (a non-finite value now and then)
      SerialSequence::Layer& l = s.layers[pick(s.layers.size())];
      const size_t row = s.row_bytes();  // (an earlier edit may have changed H or D)
      if (row == 0 || row > (size_t(1) << 16)) return false;
      if (rng() % 2 && l.tail_k.size() >= row && l.tail_tokens > 0) {
        l.tail_k.resize(l.tail_k.size() - row);
        l.tail_v.resize(l.tail_v.size() - row);
        --l.tail_tokens;
      } else {
        const uint8_t fill = rng() % 8 ? uint8_t(rng() % 0x40) : 0xFF;
        l.tail_k.resize(l.tail_k.size() + row, fill);
        l.tail_v.resize(l.tail_v.size() + row, fill);
        ++l.tail_tokens;
      }
      return true;
    }
    case 7: {  // a sink element changed (non-finite now and then), or the sinks dropped
      SerialSequence::Layer& l = s.layers[pick(s.layers.size())];
      if (l.sink_k.empty()) return false;
      if (rng() % 4 == 0) {
        l.sink_k.clear();
        l.sink_v.clear();
      } else {
        std::vector<uint8_t>& rows = rng() % 2 ? l.sink_k : l.sink_v;
        rows[pick(rows.size()) | 1] = rng() % 4 ? uint8_t(rng() % 0x40) : 0x7C;
      }
      return true;
    }
    case 8: {  // version 6: a record's flag (format v1 of a tile block, or a tile block) flipped
      SerialSequence::Layer& l = s.layers[pick(s.layers.size())];
      if (s.version() != 6 || l.transcoded.empty()) return false;
      uint8_t& flag = l.transcoded[pick(l.transcoded.size())];
      flag ^= 1u;
      return true;
    }
    default: {  // a fingerprint or codebook-table word changed
      const size_t words = (s.head.size() - 8) / 4;
      const size_t w = pick(words);
      uint32_t v = kvc_fuzz::load_word(&s.head[8 + 4 * w]);
      v = rng() % 2 ? v + 1 : uint32_t(rng());
      kvc_fuzz::store_word(&s.head[8 + 4 * w], v);
      return true;
    }
  }
}

}  // namespace

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  std::minstd_rand rng(seed);
  if (size > 1 && rng() % 4 != 0) {
    if (auto s = SerialSequence::parse(data + 1, size - 1)) {
      const int which = kvc_fuzz::config_of_selector(data[0]);
      const kvc_store_config c = kvc_fuzz::store_config(which);
      // (a tile block's header and table take up to 48 bytes at these shapes)
      const size_t header = c.block_format == KVC_BLOCK_FORMAT_TILES ? 48 : 32;
      const size_t max_block = header + size_t(c.block_tokens) * size_t(c.head_dim) * 2;
      bool changed = false;
      for (int i = 0, n = 1 + int(rng() % 3); i < n; ++i) {
        changed = mutate_records(*s, rng, max_block) || changed;
      }
      const std::vector<uint8_t> out = s->bytes();
      if (changed && out.size() + 1 <= max_size) {
        data[0] |= 4;  // resealed by bytes(); keep it so
        std::memcpy(data + 1, out.data(), out.size());
        return out.size() + 1;
      }
    }
  }
  return LLVMFuzzerMutate(data, size, max_size);
}
