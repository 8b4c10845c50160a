// SPDX-License-Identifier: Apache-2.0
// Writes the fuzzers' seed corpora: valid encoded blocks of every shape, kind, input dtype and
// encoding (fixed width, Huffman with the decoder fuzzer's codebook, raw), and serialized
// codebooks with blocks coded by them, tile blocks (format t1), serialized store sequences of
// every store configuration of fuzz_store.hpp, and call programs. Usage: kvc_fuzz_make_seeds
// <corpus dir>; creates <dir>/decode, <dir>/codebook, <dir>/tiles, <dir>/restore and
// <dir>/calls (replacing what was there).
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "fuzz_common.hpp"
#include "fuzz_store.hpp"

namespace {

namespace fs = std::filesystem;
using kvc_fuzz::kNumShapes;
using kvc_fuzz::kShapes;

int g_written = 0;

void write_file(const fs::path& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  KVC_FUZZ_CHECK(out.good());
  ++g_written;
}

// Encodes one block; returns its bytes.
std::vector<uint8_t> encode(const kvc_fuzz::Shape& shape, int32_t kind, kvc_codebook_t book,
                            int32_t entropy, int32_t bound_mode, float error_bound, kvc_dtype dtype,
                            uint32_t seed, int pattern) {
  const kvc_codec_config c = kvc_fuzz::codec_config(shape, kind, entropy, bound_mode, error_bound);
  kvc_codec_t codec = nullptr;
  KVC_FUZZ_CHECK(kvc_codec_create(&c, book, &codec) == KVC_SUCCESS);
  std::vector<float> x;
  kvc_fuzz::fill_block(x, shape, seed, pattern);
  const std::vector<uint8_t> input = kvc_fuzz::to_dtype(x, dtype);
  std::vector<uint8_t> block = kvc_fuzz::encode_block(codec, input.data(), dtype, shape.head_dim);
  kvc_codec_destroy(codec);
  return block;
}

void decode_seeds(const fs::path& dir) {
  kvc_codebook_t book = kvc_fuzz::make_fixed_codebook();
  static constexpr kvc_dtype kDtypes[3] = {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32};
  for (int s = 0; s < kNumShapes; ++s) {
    for (int32_t kind = 0; kind < 2; ++kind) {
      struct Variant {
        int32_t entropy;
        int32_t bound_mode;
        float error_bound;
        int pattern;
        bool with_codebook;
      };
      static constexpr Variant kVariants[] = {
          {KVC_ENTROPY_FIXED, KVC_BOUND_RELATIVE, 0.05f, 0, true},
          {KVC_ENTROPY_HUFFMAN, KVC_BOUND_RELATIVE, 0.05f, 0, true},
          {KVC_ENTROPY_AUTO, KVC_BOUND_ABSOLUTE, 0.01f, 0, true},
          {KVC_ENTROPY_HUFFMAN, KVC_BOUND_ABSOLUTE, 0.5f, 1, true},
          {KVC_ENTROPY_FIXED, KVC_BOUND_ABSOLUTE, 1e-30f, 2, false},  // unreachable: raw
      };
      int v = 0;
      for (const Variant& var : kVariants) {
        const kvc_dtype dtype = kDtypes[(s + kind + v) % 3];
        std::vector<uint8_t> bytes = encode(kShapes[s], kind, var.with_codebook ? book : nullptr,
                                            var.entropy, var.bound_mode, var.error_bound, dtype,
                                            uint32_t(100 * s + 10 * kind + v), var.pattern);
        const kvc_dtype out = kDtypes[(s + v) % 3];
        bytes.insert(bytes.begin(), kvc_fuzz::make_selector(s, kind, out, var.with_codebook));
        write_file(dir / ("s" + std::to_string(s) + "_k" + std::to_string(kind) + "_v" +
                          std::to_string(v)),
                   bytes);
        ++v;
      }
    }
  }
  kvc_codebook_destroy(book);
}

void codebook_seeds(const fs::path& dir) {
  struct Book {
    int32_t half_width;  // of the peaked histogram; 0: empty histogram
    int32_t max_code_length;
    int32_t max_symbols;
  };
  static constexpr Book kBooks[] = {
      {0, 12, 255}, {1, 2, 3}, {8, 4, 15}, {40, 12, 255}, {300, 15, 4095}, {100, 6, 50},
  };
  int b = 0;
  for (const Book& spec : kBooks) {
    kvc_histogram_t h = nullptr;
    KVC_FUZZ_CHECK(kvc_histogram_create(&h) == KVC_SUCCESS);
    if (spec.half_width > 0) kvc_fuzz::add_peaked_counts(h, spec.half_width, uint64_t(1) << 30);
    kvc_codebook_config cc = KVC_CODEBOOK_CONFIG_INIT;
    cc.max_code_length = spec.max_code_length;
    cc.max_symbols = spec.max_symbols;
    kvc_codebook_t book = nullptr;
    KVC_FUZZ_CHECK(kvc_codebook_build(h, &cc, &book) == KVC_SUCCESS);
    kvc_histogram_destroy(h);
    size_t n = 0, written = 0;
    KVC_FUZZ_CHECK(kvc_codebook_serialized_size(book, &n) == KVC_SUCCESS);
    std::vector<uint8_t> serialized(n);
    KVC_FUZZ_CHECK(kvc_codebook_serialize(book, serialized.data(), n, &written) == KVC_SUCCESS);
    for (int32_t kind = 0; kind < 2; ++kind) {
      const kvc_fuzz::Shape& shape = kShapes[(b + kind) % kNumShapes];
      const std::vector<uint8_t> block =
          encode(shape, kind, book, KVC_ENTROPY_HUFFMAN, KVC_BOUND_RELATIVE, 0.02f, KVC_DTYPE_FP16,
                 uint32_t(7 * b + kind), 0);
      std::vector<uint8_t> bytes = {uint8_t(kind << 1), uint8_t(n), uint8_t(n >> 8)};
      bytes.insert(bytes.end(), serialized.begin(), serialized.end());
      bytes.insert(bytes.end(), block.begin(), block.end());
      write_file(dir / ("b" + std::to_string(b) + "_k" + std::to_string(kind)), bytes);
    }
    kvc_codebook_destroy(book);
    ++b;
  }
}

// Tile blocks (format t1) of every tile shape, kind and input dtype, with coded, zero-width and
// raw tiles, permuted and not.
void tile_seeds(const fs::path& dir) {
  static constexpr kvc_dtype kDtypes[3] = {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32};
  struct Variant {
    int32_t bound_mode;
    float error_bound;
    int pattern;
    int32_t permute;
  };
  static constexpr Variant kVariants[] = {
      {KVC_BOUND_RELATIVE, 0.07f, 0, 1},  {KVC_BOUND_ABSOLUTE, 0.05f, 0, 1},
      {KVC_BOUND_ABSOLUTE, 0.05f, 0, 0},  {KVC_BOUND_ABSOLUTE, 0.5f, 1, 1},
      {KVC_BOUND_ABSOLUTE, 1e-30f, 2, 1},  // unreachable: raw tiles
  };
  for (int s = 0; s < kvc_fuzz::kNumTileShapes; ++s) {
    for (int32_t kind = 0; kind < 2; ++kind) {
      int v = 0;
      for (const Variant& var : kVariants) {
        const kvc_fuzz::Shape& shape = kvc_fuzz::kTileShapes[s];
        kvc_codec_config c =
            kvc_fuzz::tile_codec_config(shape, kind, var.bound_mode, var.error_bound);
        c.tile_permute_channels = var.permute;
        kvc_codec_t codec = nullptr;
        KVC_FUZZ_CHECK(kvc_codec_create(&c, nullptr, &codec) == KVC_SUCCESS);
        std::vector<float> x;
        kvc_fuzz::fill_block(x, shape, uint32_t(1000 + 100 * s + 10 * kind + v), var.pattern);
        const kvc_dtype dtype = kDtypes[(s + kind + v) % 3];
        const std::vector<uint8_t> input = kvc_fuzz::to_dtype(x, dtype);
        std::vector<uint8_t> bytes =
            kvc_fuzz::encode_block(codec, input.data(), dtype, shape.head_dim);
        kvc_codec_destroy(codec);
        bytes.insert(bytes.begin(), kvc_fuzz::make_selector(s, kind, kDtypes[(s + v) % 3], false));
        write_file(dir / ("t" + std::to_string(s) + "_k" + std::to_string(kind) + "_v" +
                          std::to_string(v)),
                   bytes);
        ++v;
      }
    }
  }
}

// Genuine sequences of each store configuration: empty, tail only, whole blocks, blocks and a
// tail, in several layers; smooth data (Huffman or fixed blocks), constant (zero-width fixed) and
// wide-ranged (raw); each behind its selector byte (configuration, checksum recomputed).
void restore_seeds(const fs::path& dir) {
  kvc_codebook_t book = kvc_fuzz::make_fixed_codebook();
  for (int which = 0; which < kvc_fuzz::kNumStoreConfigs; ++which) {
    const kvc_store_config c = kvc_fuzz::store_config(which);
    kvc_store_config roomy = c;
    roomy.capacity_bytes = int64_t(1) << 20;
    roomy.max_sequences = 0;
    kvc_store_t s = nullptr;
    KVC_FUZZ_CHECK(kvc_store_create(&roomy, &s) == KVC_SUCCESS);
    kvc_fuzz::set_store_codebooks(s, c, book);
    const int32_t T = c.block_tokens;
    const int32_t lengths[] = {0, 1, T - 1, T, 2 * T + 1, 3 * T + 2};
    int n = 0;
    for (int32_t len : lengths) {
      for (int pattern = 0; pattern < 3; ++pattern) {
        if (len == 0 && pattern > 0) continue;
        const int32_t id = kvc_fuzz::prefilled_sequence(
            s, c, len, uint32_t(100 * which + 10 * n + pattern), pattern);
        std::vector<uint8_t> bytes = kvc_fuzz::serialized(s, id);
        bytes.insert(bytes.begin(), uint8_t(kvc_fuzz::selector_of_config(which) | 4));
        write_file(dir / ("c" + std::to_string(which) + "_n" + std::to_string(len) + "_p" +
                          std::to_string(pattern)),
                   bytes);
      }
      ++n;
    }
    kvc_store_destroy(s);
  }
  kvc_codebook_destroy(book);
}

// Call programs for the call-sequence fuzzer: pseudo-random bytes behind each configuration's
// selector (FuzzedDataProvider turns any bytes into calls).
void call_seeds(const fs::path& dir) {
  uint32_t state = 12345;
  for (int which = 0; which < kvc_fuzz::kNumStoreConfigs; ++which) {
    for (int i = 0; i < 8; ++i) {
      // (every fourth program on a store that rotates its rows: selector bit 6)
      std::vector<uint8_t> bytes = {
          uint8_t(kvc_fuzz::selector_of_config(which) | (i % 4 == 3 ? 0x40 : 0))};
      const size_t n = 64 + 160 * size_t(i);
      for (size_t j = 0; j < n; ++j) {
        state = state * 1664525u + 1013904223u;
        bytes.push_back(uint8_t(state >> 24));
      }
      write_file(dir / ("c" + std::to_string(which) + "_" + std::to_string(i)), bytes);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
    return 2;
  }
  const fs::path root = argv[1];
  for (const char* name : {"decode", "codebook", "tiles", "restore", "calls"}) {
    fs::remove_all(root / name);
    fs::create_directories(root / name);
  }
  decode_seeds(root / "decode");
  codebook_seeds(root / "codebook");
  tile_seeds(root / "tiles");
  restore_seeds(root / "restore");
  call_seeds(root / "calls");
  std::printf("wrote %d seeds under %s\n", g_written, root.string().c_str());
  return 0;
}
