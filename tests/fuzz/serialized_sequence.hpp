// SPDX-License-Identifier: Apache-2.0
// A serialized sequence (docs/format.md §16) taken apart into its records and put back together,
// written from the format document alone, so that tests and fuzzers can edit a genuine sequence
// field by field and reseal it (recompute its FNV-1a checksum) before restoring it.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace kvc_fuzz {

inline uint32_t load_word(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
inline void store_word(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i));
}
inline uint32_t sequence_fnv1a32(const uint8_t* data, size_t size) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < size; ++i) h = (h ^ data[i]) * 16777619u;
  return h;
}
// Recomputes the trailing checksum after an edit.
inline void reseal(std::vector<uint8_t>& bytes) {
  if (bytes.size() < 4) return;
  store_word(&bytes[bytes.size() - 4], sequence_fnv1a32(bytes.data(), bytes.size() - 4));
}

struct SerialSequence {
  // magic, version, the fingerprint (12 words in version 1, 13 in version 2: stores of tile
  // blocks, 14 in version 3: stores that rotate their rows, 15 in version 4: stores that keep
  // attention sinks, 15 + 2 * num_layers in versions 5 and 6: stores with per-layer bounds,
  // tiles stores writing format v1) and the codebook table (version 6: the codebooks
  // themselves): kept as bytes.
  std::vector<uint8_t> head;
  struct Layer {
    uint32_t num_blocks = 0, tail_tokens = 0;
    std::vector<std::vector<uint8_t>> blocks;  // [num_blocks, H, K|V], each without padding
    std::vector<uint8_t> transcoded;           // per block: version 6's record flag (bit 31)
    std::vector<uint8_t> sink_k, sink_v;       // versions 4-6, a layer with blocks; unpadded
    std::vector<uint8_t> tail_k, tail_v;       // unpadded
  };
  std::vector<Layer> layers;

  static constexpr size_t kFingerprintAt = 8;
  uint32_t fingerprint(size_t word) const { return load_word(&head[kFingerprintAt + 4 * word]); }
  void set_fingerprint(size_t word, uint32_t v) { store_word(&head[kFingerprintAt + 4 * word], v); }
  uint32_t num_layers() const { return fingerprint(0); }
  uint32_t num_heads() const { return fingerprint(1); }
  uint32_t head_dim() const { return fingerprint(2); }
  uint32_t version() const { return load_word(&head[4]); }
  uint32_t sink_tokens() const { return version() >= 4 ? fingerprint(14) : 0; }
  size_t row_bytes() const { return size_t(num_heads()) * head_dim() * 2; }  // fp16 or bf16

  // Takes apart a well-formed sequence (the checksum is not checked); nothing if the bytes are
  // not one. Sizes are limited so that a fuzzer's input cannot ask for huge allocations.
  static std::optional<SerialSequence> parse(const uint8_t* data, size_t size) {
    if (size < 8 + 60 + 4 || size % 4 != 0) return std::nullopt;
    const uint32_t version = load_word(data + 4);
    const uint32_t layers = load_word(data + 8);  // fingerprint word 0
    if (version >= 5 && (layers == 0 || layers > 64)) return std::nullopt;
    const size_t fingerprint_bytes = version >= 5   ? 60 + 8 * size_t(layers)
                                     : version == 4 ? 60
                                     : version == 3 ? 56
                                     : version == 2 ? 52
                                                    : 48;
    if (size < 8 + fingerprint_bytes + 4) return std::nullopt;
    SerialSequence s;
    s.head.assign(data, data + 8 + fingerprint_bytes);
    const uint32_t L = s.num_layers(), H = s.num_heads(), D = s.head_dim();
    if (L == 0 || L > 64 || H == 0 || H > 64 || D == 0 || D > 1024) return std::nullopt;
    if (s.sink_tokens() > 1024) return std::nullopt;
    size_t at = 8 + fingerprint_bytes;
    const size_t end = size - 4;
    auto need = [&](size_t n) { return n <= end - at; };
    const size_t table_at = at;
    if (version == 6) {  // per (layer, K|V): a byte count, then that many bytes (padded)
      for (uint32_t i = 0; i < 2 * L; ++i) {
        if (!need(4)) return std::nullopt;
        const size_t padded = (size_t(load_word(data + at)) + 3) / 4 * 4;
        at += 4;
        if (!need(padded)) return std::nullopt;
        at += padded;
      }
    } else {
      if (!need(16 * size_t(L))) return std::nullopt;
      at += 16 * size_t(L);
    }
    s.head.insert(s.head.end(), data + table_at, data + at);
    for (uint32_t l = 0; l < L; ++l) {
      Layer layer;
      if (!need(8)) return std::nullopt;
      layer.num_blocks = load_word(data + at);
      layer.tail_tokens = load_word(data + at + 4);
      at += 8;
      const uint64_t count = uint64_t(layer.num_blocks) * H * 2;
      if (count > (end - at) / 4) return std::nullopt;
      for (uint64_t i = 0; i < count; ++i) {
        if (!need(4)) return std::nullopt;
        const uint32_t word = load_word(data + at), flag = version == 6 ? word >> 31 : 0u;
        const uint32_t n = word & ~(flag << 31);
        at += 4;
        const size_t padded = (size_t(n) + 3) / 4 * 4;
        if (!need(padded)) return std::nullopt;
        layer.blocks.emplace_back(data + at, data + at + n);
        layer.transcoded.push_back(uint8_t(flag));
        at += padded;
      }
      // The uncompressed rows, K then V: the sinks (a layer with blocks), then the tail.
      auto rows = [&](uint64_t tokens, std::vector<uint8_t>& k, std::vector<uint8_t>& v) {
        const uint64_t bytes = tokens * s.row_bytes(), padded = (bytes + 3) / 4 * 4;
        if (padded > (end - at) / 2) return false;
        k.assign(data + at, data + at + bytes);
        at += size_t(padded);
        v.assign(data + at, data + at + bytes);
        at += size_t(padded);
        return true;
      };
      if (!rows(layer.num_blocks ? s.sink_tokens() : 0, layer.sink_k, layer.sink_v) ||
          !rows(layer.tail_tokens, layer.tail_k, layer.tail_v)) {
        return std::nullopt;
      }
      s.layers.push_back(std::move(layer));
    }
    if (at != end) return std::nullopt;
    return s;
  }

  // The bytes, resealed. Counts are written as they are in the records (an edited num_blocks
  // may disagree with the blocks present: that is for the fuzzer to try).
  std::vector<uint8_t> bytes() const {
    std::vector<uint8_t> out = head;
    auto word = [&](uint32_t v) {
      out.resize(out.size() + 4);
      store_word(&out[out.size() - 4], v);
    };
    auto padded = [&](const std::vector<uint8_t>& b) {
      out.insert(out.end(), b.begin(), b.end());
      out.resize((out.size() + 3) / 4 * 4);
    };
    for (const Layer& l : layers) {
      word(l.num_blocks);
      word(l.tail_tokens);
      for (size_t i = 0; i < l.blocks.size(); ++i) {
        const bool flag = i < l.transcoded.size() && l.transcoded[i];
        word(uint32_t(l.blocks[i].size()) | (flag ? 1u << 31 : 0u));
        padded(l.blocks[i]);
      }
      padded(l.sink_k);
      padded(l.sink_v);
      padded(l.tail_k);
      padded(l.tail_v);
    }
    word(0);
    reseal(out);
    return out;
  }
};

}  // namespace kvc_fuzz
