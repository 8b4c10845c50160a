// SPDX-License-Identifier: Apache-2.0
// Shared by the fuzz targets and the seed generator: the codec shapes a fuzz input selects, the
// fixed codebook the decoder fuzzer's codecs carry, and the layout of the fuzz inputs. Public
// API only: the fuzzers see the library as a user does.
#pragma once

#include <kvcomp/kvcomp.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace kvc_fuzz {

// Aborts (a fuzzer finding) with a message when a property of the library does not hold.
#define KVC_FUZZ_CHECK(cond)                                                                       \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      std::fprintf(stderr, "%s:%d: property violated: %s\n  last error: %s\n", __FILE__, __LINE__, \
                   #cond, kvc_last_error());                                                       \
      std::abort();                                                                                \
    }                                                                                              \
  } while (0)

struct Shape {
  int32_t num_tokens;
  int32_t head_dim;
  int32_t value_group_size;  // V only; 0 = head_dim
  int32_t num_substreams;    // 0 = automatic
};

// Usual and odd shapes, kept small so that each fuzz iteration is fast.
inline constexpr Shape kShapes[8] = {
    {16, 64, 0, 0}, {64, 128, 32, 0}, {8, 32, 16, 0}, {32, 256, 64, 0},
    {1, 64, 32, 1}, {64, 64, 0, 4},   {3, 40, 8, 0},  {128, 128, 0, 0},
};
inline constexpr int kNumShapes = 8;

// Decoder fuzz input: one selector byte, then the block bytes.
//   bits 0-2: shape; bit 3: kind (0 K, 1 V); bits 4-5: output dtype (0 fp16, 1 bf16, 2/3 fp32);
//   bit 6: codec without the codebook; bit 7: output rows padded (stride head_dim + 8).
struct DecodeSelector {
  int shape;
  int32_t kind;
  kvc_dtype dtype;
  bool with_codebook;
  bool padded;
};

inline DecodeSelector parse_selector(uint8_t b) {
  static constexpr kvc_dtype kDtypes[4] = {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32,
                                           KVC_DTYPE_FP32};
  return {b & 7, (b >> 3) & 1 ? KVC_KIND_VALUE : KVC_KIND_KEY, kDtypes[(b >> 4) & 3],
          ((b >> 6) & 1) == 0, ((b >> 7) & 1) != 0};
}

inline uint8_t make_selector(int shape, int32_t kind, kvc_dtype dtype, bool with_codebook) {
  const int d = dtype == KVC_DTYPE_FP16 ? 0 : dtype == KVC_DTYPE_BF16 ? 1 : 2;
  return uint8_t(shape | (kind == KVC_KIND_VALUE ? 8 : 0) | (d << 4) | (with_codebook ? 0 : 64));
}

// Tile codecs (format t1) of the tile decoder fuzzer: shapes the tile format takes.
inline constexpr Shape kTileShapes[4] = {
    {16, 16, 0, 0}, {32, 64, 0, 0}, {16, 32, 0, 0}, {64, 128, 0, 0}};
inline constexpr int kNumTileShapes = 4;

// Tile decoder fuzz input: one selector byte, then the block bytes.
//   bits 0-1: tile shape; bit 3: kind (0 K, 1 V); bits 4-5: output dtype (0 fp16, 1 bf16,
//   2/3 fp32); bit 7: output rows padded (stride head_dim + 8).
inline DecodeSelector parse_tile_selector(uint8_t b) {
  DecodeSelector s = parse_selector(b);
  s.shape = b & 3;
  s.with_codebook = false;
  return s;
}

inline kvc_codec_config tile_codec_config(const Shape& s, int32_t kind, int32_t bound_mode,
                                          float error_bound) {
  kvc_codec_config c = KVC_CODEC_CONFIG_INIT;
  c.kind = kind;
  c.num_tokens = s.num_tokens;
  c.head_dim = s.head_dim;
  c.bound_mode = bound_mode;
  c.error_bound = error_bound;
  c.block_format = KVC_BLOCK_FORMAT_TILES;
  return c;
}

// Codebook fuzz input: flags, a 16-bit little-endian length n, n bytes of serialized codebook,
// then the bytes of a block to decode with it. Flag bit 0: recompute the codebook's checksum
// (FNV-1a of all but its last 4 bytes, docs/format.md) so that mutations reach the parser's
// later checks instead of stopping at the checksum.
inline constexpr size_t kCodebookInputHeader = 3;

inline uint32_t fnv1a32(const uint8_t* data, size_t size) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < size; ++i) h = (h ^ data[i]) * 16777619u;
  return h;
}

inline kvc_codec_config codec_config(const Shape& s, int32_t kind, int32_t entropy,
                                     int32_t bound_mode, float error_bound) {
  kvc_codec_config c = KVC_CODEC_CONFIG_INIT;
  c.kind = kind;
  c.num_tokens = s.num_tokens;
  c.head_dim = s.head_dim;
  c.value_group_size = kind == KVC_KIND_VALUE ? s.value_group_size : 0;
  c.num_substreams = s.num_substreams;
  c.entropy = entropy;
  c.bound_mode = bound_mode;
  c.error_bound = error_bound;
  return c;
}

// Counts of a peaked symbol distribution, as quantization codes have.
inline void add_peaked_counts(kvc_histogram_t h, int32_t half_width, uint64_t peak) {
  std::vector<uint64_t> counts(size_t(2 * half_width + 1));
  for (int32_t i = -half_width; i <= half_width; ++i) {
    const int32_t a = i < 0 ? -i : i;
    counts[size_t(i + half_width)] = 1 + (peak >> (a < 60 ? a : 60));
  }
  KVC_FUZZ_CHECK(kvc_histogram_add_counts(h, -half_width, int32_t(counts.size()), counts.data()) ==
                 KVC_SUCCESS);
}

// The codebook of the decoder fuzzer's codecs (and of its seeds).
inline kvc_codebook_t make_fixed_codebook() {
  kvc_histogram_t h = nullptr;
  kvc_codebook_t book = nullptr;
  KVC_FUZZ_CHECK(kvc_histogram_create(&h) == KVC_SUCCESS);
  add_peaked_counts(h, 40, uint64_t(1) << 20);
  KVC_FUZZ_CHECK(kvc_codebook_build(h, nullptr, &book) == KVC_SUCCESS);
  kvc_histogram_destroy(h);
  return book;
}

// Deterministic test data: smooth values with outlier channels, or a constant.
inline void fill_block(std::vector<float>& x, const Shape& s, uint32_t seed, int pattern) {
  x.assign(size_t(s.num_tokens) * size_t(s.head_dim), 0.0f);
  uint32_t state = seed * 2654435761u + 1u;
  auto next = [&state] {
    state = state * 1664525u + 1013904223u;
    return float(state >> 8) / 16777216.0f - 0.5f;
  };
  for (int32_t t = 0; t < s.num_tokens; ++t) {
    for (int32_t c = 0; c < s.head_dim; ++c) {
      float v = next() + next() + 0.1f * float(c % 5);
      if (c % 19 == 3) v *= 12.0f;
      if (pattern == 1) v = 0.375f;                           // constant
      if (pattern == 2) v = (c % 2 ? 1e-3f : 3e4f) * next();  // wide range
      x[size_t(t) * size_t(s.head_dim) + size_t(c)] = v;
    }
  }
}

// Input in the given dtype (fp16/bf16 by truncating the float: exact enough for test data).
inline std::vector<uint8_t> to_dtype(const std::vector<float>& x, kvc_dtype dtype) {
  std::vector<uint8_t> out;
  if (dtype == KVC_DTYPE_FP32) {
    out.resize(x.size() * 4);
    std::memcpy(out.data(), x.data(), out.size());
    return out;
  }
  out.resize(x.size() * 2);
  for (size_t i = 0; i < x.size(); ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], 4);
    uint16_t h;
    if (dtype == KVC_DTYPE_BF16) {
      h = uint16_t(u >> 16);
    } else {
      // fp16 from a float in the normal half range, mantissa truncated.
      const uint32_t sign = (u >> 16) & 0x8000u;
      const int32_t exp = int32_t((u >> 23) & 0xFF) - 127 + 15;
      if (exp <= 0) {
        h = uint16_t(sign);
      } else if (exp >= 31) {
        h = uint16_t(sign | 0x7BFFu);
      } else {
        h = uint16_t(sign | uint32_t(exp) << 10 | ((u >> 13) & 0x3FFu));
      }
    }
    std::memcpy(&out[2 * i], &h, 2);
  }
  return out;
}

// One block [num_tokens, head_dim] of dtype through the codec; its bytes, at most
// kvc_codec_max_block_bytes of them (any codebook, however poor, fits: worst case verbatim).
inline std::vector<uint8_t> encode_block(kvc_codec_t codec, const void* input, kvc_dtype dtype,
                                         int64_t head_dim) {
  size_t max_bytes = 0;
  KVC_FUZZ_CHECK(kvc_codec_max_block_bytes(codec, dtype, &max_bytes) == KVC_SUCCESS);
  std::vector<uint32_t> words((max_bytes + 3) / 4);  // 4-byte aligned, as the codec needs
  const void* src[1] = {input};
  void* dst[1] = {words.data()};
  uint32_t block_bytes = 0;
  KVC_FUZZ_CHECK(kvc_codec_encode(codec, 1, src, head_dim, dtype, dst, max_bytes, &block_bytes,
                                  nullptr) == KVC_SUCCESS);
  KVC_FUZZ_CHECK(block_bytes <= max_bytes);
  const uint8_t* p = reinterpret_cast<const uint8_t*>(words.data());
  return std::vector<uint8_t>(p, p + block_bytes);
}

// The statuses a decoder may give for bad bytes (2xx), and nothing else.
inline bool is_data_status(kvc_status_t s) { return s >= 200 && s < 300; }

// Bytes copied into an allocation of exactly their size, so that AddressSanitizer sees any read
// past them.
struct ExactCopy {
  uint8_t* p;
  ExactCopy(const uint8_t* data, size_t n) : p(static_cast<uint8_t*>(std::malloc(n ? n : 1))) {
    if (p != nullptr && n != 0) std::memcpy(p, data, n);
  }
  ~ExactCopy() { std::free(p); }
  ExactCopy(const ExactCopy&) = delete;
  ExactCopy& operator=(const ExactCopy&) = delete;
};

}  // namespace kvc_fuzz
