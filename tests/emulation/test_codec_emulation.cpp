// SPDX-License-Identifier: Apache-2.0
// The CUDA codec kernels, run on the CPU under the host emulation, against the CPU oracle
// (src/cpu/codec_cpu.cpp): byte-identical encoded blocks, equal decoded elements and statuses
// (corrupt and truncated blocks included), and equal histograms. Small shapes, so that the
// suite runs in CI on every commit, with and without sanitizers.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <sstream>

#include "core/error.hpp"
#include "cpu/codec_cpu.hpp"
#include "test_support.hpp"
#include "tests/emulation/emulated_codec.hpp"

namespace kvc::test {
namespace {

struct Case {
  kvc_codec_config config;
  kvc_dtype dtype;
  bool with_book;
  bool special;  // zeros, -0, tiny and constant values in the input
  bool corrupt;  // also decode damaged copies
  uint32_t seed;
  std::string name() const {
    std::ostringstream o;
    o << (config.kind == KVC_KIND_VALUE ? "V" : "K") << " T" << config.num_tokens << " D"
      << config.head_dim << " G" << config.value_group_size << " S" << config.num_substreams
      << (config.bound_mode == KVC_BOUND_RELATIVE ? " rel " : " abs ") << config.error_bound
      << " entropy " << config.entropy << " dtype " << dtype << (with_book ? " book" : "")
      << (special ? " special" : "") << " seed " << seed;
    return o.str();
  }
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name(); }

// Shapes that reach every path: one token, one channel, odd sizes, sub-streams of one element,
// many groups, groups of two, and the usual 16..256.
std::vector<Case> cases() {
  std::vector<Case> out;
  const uint32_t tokens[] = {1, 3, 5, 7, 16, 33, 64};
  const uint32_t dims[] = {1, 5, 6, 36, 64, 96, 128};
  uint32_t seed = 1;
  for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
    for (uint32_t t : tokens) {
      for (uint32_t d : dims) {
        ++seed;
        if (size_t(t) * d > 4096) continue;  // keep the suite short
        if ((seed % 3) != 0 && t * d > 1024) continue;
        kvc_codec_config c = make_config(kind, t, d, KVC_BOUND_ABSOLUTE, 0.03f);
        if (seed % 2) {
          c.bound_mode = KVC_BOUND_RELATIVE;
          c.error_bound = seed % 3 == 0 ? 0.02f : 0.08f;
        }
        c.entropy = kvc_entropy(seed % 3);
        if (kind == KVC_KIND_VALUE && d % 2 == 0) {
          const uint32_t groups[] = {0, 2, d / 2, d % 32 == 0 ? 32u : 0u};
          c.value_group_size = int32_t(groups[seed % 4]);
        }
        const uint32_t group =
            kind == KVC_KIND_KEY ? t : (c.value_group_size ? uint32_t(c.value_group_size) : d);
        if (seed % 5 == 1) c.num_substreams = 1;
        if (seed % 5 == 2) c.num_substreams = int32_t(group);  // one element per sub-stream
        const kvc_dtype dtype = kvc_dtype(1 + seed % 3);
        const bool book = seed % 7 != 3 || c.entropy == KVC_ENTROPY_HUFFMAN;
        out.push_back({c, dtype, book, seed % 4 == 0, seed % 2 == 0, seed});
      }
    }
  }
  return out;
}

// Blocks of 3 heads of one [tokens, 3 * dim] tensor, as an engine's cache holds them.
constexpr uint32_t kHeads = 3;

std::vector<float> input_for(const Case& k) {
  const uint32_t t = uint32_t(k.config.num_tokens), d = uint32_t(k.config.head_dim);
  std::vector<float> x =
      bench::synthetic_kv(k.config.kind == KVC_KIND_VALUE, t, kHeads * d, k.seed);
  if (k.special) {
    std::mt19937 rng(k.seed);
    for (size_t i = 0; i < x.size(); i += 1 + rng() % 5) {
      const float specials[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 65504.0f * 0.5f};
      x[i] = specials[rng() % 4];
    }
    for (uint32_t r = 0; r < t; ++r) {  // head 2: constant (every group's range is 0)
      for (uint32_t c = 0; c < d; ++c) x[size_t(r) * kHeads * d + 2 * d + c] = 0.375f;
    }
  }
  return x;
}

kvc_status_t cpu_decode(const CodecParams& p, const Codebook* book, const std::vector<uint8_t>& src,
                        uint32_t available, kvc_dtype out, std::vector<uint8_t>& dst) {
  try {
    cpu::decode_block(p, book, src.data(), available, out, dst.data(), p.head_dim);
    return KVC_SUCCESS;
  } catch (const Error& e) {
    return e.status();
  }
}

// Decodes `blocks` (each in an allocation of exactly `available` bytes, starting `misalign`
// bytes past a 4-byte boundary: the kernel's byte-wise paths) under emulation and on the CPU
// into poisoned outputs of each dtype of `outputs_of`; expects equal statuses, and equal
// elements where both succeed. Returns how many were rejected.
int expect_same_decode(const Case& k, const CodecParams& p, const Codebook* book,
                       const EmulatedBook& dbook, const std::vector<std::vector<uint8_t>>& blocks,
                       const std::vector<uint32_t>& available,
                       const std::vector<kvc_dtype>& outputs_of, uint32_t misalign = 0) {
  int rejected = 0;
  for (kvc_dtype out : outputs_of) {
    const size_t out_bytes = size_t(p.num_elements()) * format::dtype_bytes(out);
    std::vector<std::vector<uint8_t>> inputs, outputs;
    std::vector<const void*> src;
    std::vector<void*> dst;
    for (size_t i = 0; i < blocks.size(); ++i) {
      inputs.emplace_back(misalign, uint8_t(0x5A));
      inputs.back().insert(inputs.back().end(), blocks[i].begin(),
                           blocks[i].begin() + available[i]);
      outputs.emplace_back(out_bytes, uint8_t(0xFF));
    }
    for (size_t i = 0; i < blocks.size(); ++i) {
      src.push_back(available[i] == 0 ? static_cast<const void*>(&available[i])
                                      : inputs[i].data() + misalign);
      dst.push_back(outputs[i].data());
    }
    std::vector<kvc_status_t> status;
    // Blocks per decode thread block: what fits (up to 8), or fewer, so that thread blocks with
    // idle warps and several thread blocks both occur.
    const uint32_t warps = k.seed % 3 == 0 ? 0 : 1 + k.seed % 4;
    const auto r =
        emulated_decode(p, dbook.view(), src, available, out, dst, p.head_dim, status, warps);
    EXPECT_TRUE(r.ok()) << k.name() << "\n" << r.message();
    for (size_t i = 0; i < blocks.size(); ++i) {
      std::vector<uint8_t> want(out_bytes, 0xFF);
      const kvc_status_t s = cpu_decode(p, book, blocks[i], available[i], out, want);
      EXPECT_EQ(status[i], s) << k.name() << " block " << i << " out " << out;
      if (s == KVC_SUCCESS)
        EXPECT_EQ(outputs[i], want) << k.name() << " block " << i << " out " << out;
      rejected += s != KVC_SUCCESS;
    }
    if (::testing::Test::HasFailure()) break;
  }
  return rejected;
}

class CodecEmulation : public ::testing::TestWithParam<Case> {};

TEST_P(CodecEmulation, EncodeIsByteIdenticalDecodeAndHistogramEqualTheCpu) {
  const Case& k = GetParam();
  const CodecParams p = CodecParams::from_config(k.config, k.with_book);
  const uint32_t d = p.head_dim;
  const Block tensor =
      make_block(k.dtype, p.num_tokens, kHeads * d, int64_t(kHeads) * d, input_for(k));
  std::unique_ptr<Codebook> book;
  if (k.with_book) {
    const kvcomp::Codebook trained = train(k.config, k.dtype, k.seed);
    const auto bytes = trained.serialize();
    book = std::make_unique<Codebook>(Codebook::parse(bytes.data(), bytes.size()));
  }
  const EmulatedBook dbook(book.get());
  const size_t es = format::dtype_bytes(k.dtype), cap = p.max_block_bytes(k.dtype);

  // Encode: each block into its own allocation of the codec's worst-case size.
  std::vector<const void*> src;
  std::vector<std::vector<uint8_t>> out(kHeads, std::vector<uint8_t>(cap, 0xEE));
  std::vector<void*> dst;
  for (uint32_t h = 0; h < kHeads; ++h) {
    src.push_back(tensor.bytes.data() + h * d * es);
    dst.push_back(out[h].data());
  }
  std::vector<uint32_t> sizes;
  const auto r = emulated_encode(p, dbook.view(), src, tensor.stride, k.dtype, dst, sizes);
  ASSERT_TRUE(r.ok()) << k.name() << "\n" << r.message();
  std::vector<std::vector<uint8_t>> blocks;
  for (uint32_t h = 0; h < kHeads; ++h) {
    std::vector<uint8_t> want(cap, 0xEE);
    const uint32_t n =
        cpu::encode_block(p, book.get(), src[h], tensor.stride, k.dtype, want.data());
    ASSERT_EQ(sizes[h], n) << k.name() << " head " << h;
    ASSERT_EQ(out[h], want) << k.name() << " head " << h;  // the bytes past the block too
    blocks.emplace_back(want.begin(), want.begin() + n);
  }

  // Decode, into every dtype, and from copies that are not 4-byte aligned; then damaged copies.
  expect_same_decode(k, p, book.get(), dbook, blocks, sizes,
                     {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32});
  expect_same_decode(k, p, book.get(), dbook, blocks, sizes, {kvc_dtype(1 + k.seed % 3)},
                     1 + k.seed % 3);
  if (k.corrupt) {
    std::mt19937 rng(k.seed);
    std::vector<std::vector<uint8_t>> bad;
    std::vector<uint32_t> available;
    for (int i = 0; i < 12; ++i) {
      std::vector<uint8_t> b = blocks[size_t(i) % kHeads];
      uint32_t n = uint32_t(b.size());
      if (i % 4 == 0) {
        n = uint32_t(rng() % b.size());  // truncated
      } else {
        for (int f = 0; f < 1 + i % 3; ++f) {
          const size_t at = rng() % 2 ? rng() % std::min<size_t>(64, b.size()) : rng() % b.size();
          b[at] ^= uint8_t(1u << (rng() % 8));
        }
      }
      bad.push_back(b);
      available.push_back(n);
    }
    expect_same_decode(k, p, book.get(), dbook, bad, available, {kvc_dtype(1 + k.seed / 2 % 3)});
    expect_same_decode(k, p, book.get(), dbook, bad, available, {kvc_dtype(1 + k.seed / 5 % 3)}, 2);
  }

  // Histogram.
  auto counts = std::make_unique<kernels::HistogramCounts>();
  std::memset(counts.get(), 0, sizeof(kernels::HistogramCounts));
  const auto rh = emulated_histogram(p, src, tensor.stride, k.dtype, counts.get());
  ASSERT_TRUE(rh.ok()) << k.name() << "\n" << rh.message();
  Histogram want, got;
  for (uint32_t h = 0; h < kHeads; ++h) {
    cpu::histogram_block(p, src[h], tensor.stride, k.dtype, want);
  }
  for (int32_t i = 0; i < 2 * kernels::kHistogramHalf; ++i) {
    if (counts->bins[i] != 0) got.add(i - kernels::kHistogramHalf, counts->bins[i]);
  }
  got.add_unbinned(counts->unbinned);
  EXPECT_EQ(counts->nonfinite, 0u);
  EXPECT_EQ(got.total(), want.total()) << k.name();
  EXPECT_EQ(got.nonzero(), want.nonzero()) << k.name();
}

INSTANTIATE_TEST_SUITE_P(Shapes, CodecEmulation, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return "case" + std::to_string(info.index) + "_seed" +
                                  std::to_string(info.param.seed);
                         });

TEST(CodecEmulationEdges, DecodeWarpsFitTheSharedMemory) {
  // The kernel's static shared memory (34 KiB, mostly the staging tiles) and 4 KiB are kept.
  EXPECT_EQ(kernels::kDecodeStaticSmem, 34816u);
  EXPECT_EQ(kernels::decode_warps(128, 232448), 8u);      // 1 KiB per block
  EXPECT_EQ(kernels::decode_warps(8192, 232448), 2u);     // 64 KiB per block
  EXPECT_EQ(kernels::decode_warps(30000, 232448), 1u);    // 234 KiB: one (creation refuses it)
  EXPECT_EQ(kernels::decode_warps(1024, 96 * 1024), 7u);  // 8 KiB per block
  EXPECT_EQ(kernels::decode_warps(1024, 48 * 1024), 1u);
}

// read_bits' word-wide path against the byte-wise definition: every alignment, sizes that are
// not whole words, positions up to and past the end.
TEST(CodecEmulationEdges, ReadBitsEqualsTheBytewiseDefinition) {
  std::mt19937 rng(5);
  std::vector<uint8_t> storage(64 + 8);
  for (auto& b : storage) b = uint8_t(rng());
  for (uint32_t align = 0; align < 4; ++align) {
    for (uint32_t size = 0; size <= 64; ++size) {
      const uint8_t* data = storage.data() + align;
      for (uint64_t pos = 0; pos < uint64_t(size) * 8 + 40; pos += 1 + rng() % 5) {
        for (uint32_t bits = 0; bits <= 32; ++bits) {
          uint64_t window = 0;
          for (uint32_t k = 0; k < 5; ++k) {
            if ((pos >> 3) + k < size) window |= uint64_t(data[(pos >> 3) + k]) << (8 * k);
          }
          window >>= pos & 7;
          const uint32_t want = bits == 0    ? 0u
                                : bits == 32 ? uint32_t(window)
                                             : uint32_t(window & ((uint64_t(1) << bits) - 1));
          ASSERT_EQ(kernels::read_bits(data, size, pos, bits), want)
              << "align " << align << " size " << size << " pos " << pos << " bits " << bits;
        }
      }
    }
  }
}

// Missing pointers, a misaligned destination and non-finite input: size 0 (encode), an
// invalid-argument status (decode), the non-finite flag (histogram); the other blocks as usual.
TEST(CodecEmulationEdges, BadPointersAndNonFiniteInputAreMarkedPerBlock) {
  const kvc_codec_config c = make_config(KVC_KIND_KEY, 16, 64, KVC_BOUND_ABSOLUTE, 0.01f);
  const CodecParams p = CodecParams::from_config(c, false);
  const EmulatedBook none(nullptr);
  Block b = make_block(KVC_DTYPE_FP32, 16, 64, 64, bench::synthetic_kv(false, 16, 64, 3));
  Block nan_block = b;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(nan_block.bytes.data() + (5 * 64 + 7) * 4, &nan, 4);
  const size_t cap = p.max_block_bytes(KVC_DTYPE_FP32);
  std::vector<uint8_t> o0(cap + 4), o1(cap), o2(cap), o3(cap);
  const std::vector<const void*> src = {b.data(), nullptr, nan_block.data(), b.data()};
  const std::vector<void*> dst = {o0.data() + 2, o1.data(), o2.data(), o3.data()};
  std::vector<uint32_t> sizes;
  ASSERT_TRUE(emulated_encode(p, none.view(), src, 64, KVC_DTYPE_FP32, dst, sizes).ok());
  EXPECT_EQ(sizes, (std::vector<uint32_t>{0, 0, 0, sizes[3]}));
  EXPECT_GT(sizes[3], 0u);

  const std::vector<const void*> blocks = {nullptr, o3.data()};
  std::vector<uint8_t> out(64 * 16 * 4);
  const std::vector<void*> outs = {out.data(), out.data()};
  std::vector<kvc_status_t> status;
  ASSERT_TRUE(emulated_decode(p, none.view(), blocks, {sizes[3], sizes[3]}, KVC_DTYPE_FP32, outs,
                              64, status)
                  .ok());
  EXPECT_EQ(status, (std::vector<kvc_status_t>{KVC_ERROR_INVALID_ARGUMENT, KVC_SUCCESS}));

  auto counts = std::make_unique<kernels::HistogramCounts>();
  std::memset(counts.get(), 0, sizeof(kernels::HistogramCounts));
  ASSERT_TRUE(
      emulated_histogram(p, {nullptr, nan_block.data()}, 64, KVC_DTYPE_FP32, counts.get()).ok());
  EXPECT_EQ(counts->nonfinite, 1u);
}

// Inf and NaN in every input type, through the encoder's 16-byte loads (an aligned block whose
// rows are a multiple of 16 bytes) and its element-wise loads (the same rows one element
// further on): size 0; the largest finite value of the type: the CPU's bytes.
TEST(CodecEmulationEdges, NonFiniteInputIsFoundByBothLoadPaths) {
  const kvc_codec_config c = make_config(KVC_KIND_KEY, 16, 64, KVC_BOUND_ABSOLUTE, 0.01f);
  const CodecParams p = CodecParams::from_config(c, false);
  const EmulatedBook none(nullptr);
  const float inf = std::numeric_limits<float>::infinity();
  for (kvc_dtype dt : {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32}) {
    const float largest = dt == KVC_DTYPE_FP16   ? 65504.0f
                          : dt == KVC_DTYPE_BF16 ? 3.38953139e38f
                                                 : 3.4028235e38f;
    for (float special : {inf, -inf, std::numeric_limits<float>::quiet_NaN(), largest, -largest}) {
      for (uint32_t shift : {0u, 1u}) {
        std::vector<float> x = bench::synthetic_kv(false, 17, 72, 5);
        x[size_t(5) * 72 + 7 + shift] = special;
        const Block b = make_block(dt, 17, 72, 72, x);
        const void* src = b.bytes.data() + shift * format::dtype_bytes(dt);
        std::vector<uint8_t> out(p.max_block_bytes(dt), 0xEE), want(out.size(), 0xEE);
        std::vector<uint32_t> sizes;
        ASSERT_TRUE(emulated_encode(p, none.view(), {src}, 72, dt, {out.data()}, sizes).ok());
        const bool finite = std::isfinite(special);
        EXPECT_EQ(sizes[0] != 0, finite) << dt << " " << special << " shift " << shift;
        if (finite) {
          EXPECT_EQ(sizes[0], cpu::encode_block(p, nullptr, src, 72, dt, want.data()));
          EXPECT_EQ(out, want) << dt << " " << special << " shift " << shift;
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvc::test
