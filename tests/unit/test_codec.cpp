// SPDX-License-Identifier: Apache-2.0
// The CPU codec through the public API: round trips with the bound checked on every element,
// the encoder's choices, edge-case data, and corrupt input to the decoder.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfenv>
#include <cmath>
#include <limits>
#include <random>
#include <sstream>

#include "test_support.hpp"

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace kvc::test {
namespace {

// Decodes into `out_dtype` and checks every element against its bound.
void check_round_trip(const kvcomp::Codec& codec, const kvc_codec_config& c, const Block& b,
                      const std::vector<uint8_t>& block, kvc_dtype out_dtype,
                      const std::string& where) {
  const size_t es = format::dtype_bytes(out_dtype);
  const int64_t out_stride = int64_t(b.dim) + 3;  // a padded destination
  std::vector<uint8_t> out(size_t(b.tokens) * size_t(out_stride) * es, 0xAB);
  codec.decode(block, out_dtype, out.data(), out_stride);
  const std::vector<float> bound = element_bounds(c, b);
  const bool raw = kvcomp::inspect(block).encoding == KVC_ENCODING_RAW;
  for (uint32_t t = 0; t < b.tokens; ++t) {
    for (uint32_t ch = 0; ch < b.dim; ++ch) {
      const size_t o = size_t(t) * size_t(out_stride) + ch;
      float y;
      if (out_dtype == KVC_DTYPE_FP32) {
        std::memcpy(&y, &out[o * 4], 4);
      } else {
        uint16_t h;
        std::memcpy(&h, &out[o * 2], 2);
        y = out_dtype == KVC_DTYPE_FP16 ? format::half_to_float(h) : format::bf16_to_float(h);
      }
      const float x = b.values[size_t(t) * size_t(b.stride) + ch];
      const float eb = bound[size_t(t) * b.dim + ch];
      const double err = std::fabs(double(x) - double(y));
      const double allowed =
          raw ? output_half_ulp(out_dtype, x) : eb + output_half_ulp(out_dtype, y);
      if (!(err <= allowed)) {
        ADD_FAILURE() << where << ": token " << t << " channel " << ch << " x=" << x
                      << " decoded=" << y << " |err|=" << err << " > allowed " << allowed
                      << " (bound " << eb << ")";
        return;
      }
    }
  }
  // Padding between rows is never written.
  for (uint32_t t = 0; t < b.tokens; ++t) {
    for (int64_t ch = b.dim; ch < out_stride; ++ch) {
      for (size_t k = 0; k < es; ++k) {
        EXPECT_EQ(out[(size_t(t) * size_t(out_stride) + size_t(ch)) * es + k], 0xAB) << where;
      }
    }
  }
}

struct SweepCase {
  kvc_kind kind;
  uint32_t tokens, dim;
  kvc_dtype dtype;
  kvc_bound_mode mode;
  float bound;
  int32_t value_group;
};

std::string describe(const SweepCase& s, uint32_t seed) {
  std::ostringstream o;
  o << (s.kind == KVC_KIND_KEY ? "K" : "V") << " T=" << s.tokens << " D=" << s.dim
    << " dtype=" << s.dtype << (s.mode == KVC_BOUND_RELATIVE ? " rel=" : " abs=") << s.bound
    << " vgroup=" << s.value_group << " seed=" << seed;
  return o.str();
}

TEST(Codec, RoundTripSweepMeetsBoundOnEveryElement) {
  const kvc_dtype dtypes[] = {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32};
  const uint32_t token_counts[] = {16, 32, 64, 128};
  const uint32_t dims[] = {64, 128, 256};
  uint32_t seed = 1;
  int cases = 0;
  for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
    for (uint32_t tokens : token_counts) {
      for (uint32_t dim : dims) {
        for (int rep = 0; rep < 3; ++rep) {
          for (kvc_dtype dtype : dtypes) {
            ++seed;
            // Rotate bounds and modes over the shapes rather than a full product: every
            // combination of each pair still appears.
            const bool relative = seed % 2 == 0;
            const float bound = relative ? std::array<float, 3>{0.01f, 0.05f, 0.2f}[seed % 3]
                                         : std::array<float, 3>{0.005f, 0.05f, 0.5f}[seed % 3];
            const int32_t vgroup = kind == KVC_KIND_VALUE && seed % 3 == 0 ? 32 : 0;
            const SweepCase s{
                kind,  tokens, dim, dtype, relative ? KVC_BOUND_RELATIVE : KVC_BOUND_ABSOLUTE,
                bound, vgroup};
            const kvc_codec_config c =
                make_config(kind, tokens, dim, s.mode, bound, KVC_ENTROPY_AUTO, vgroup);
            const kvcomp::Codebook book = train(c, dtype, seed * 7);
            const kvcomp::Codec codec(c, &book);
            const auto x = bench::synthetic_kv(kind == KVC_KIND_VALUE, tokens, dim, seed);
            const Block b = make_block(dtype, tokens, dim, int64_t(dim) + 5, x);
            const std::vector<uint8_t> block = codec.encode(b.data(), dtype, b.stride);
            ASSERT_LE(block.size(), codec.max_block_bytes(dtype));
            ASSERT_EQ(block.size() % 4, 0u);
            // Realistic data always quantizes: a verbatim block here would be a step bug.
            ASSERT_NE(kvcomp::inspect(block).encoding, KVC_ENCODING_RAW) << describe(s, seed);
            for (kvc_dtype out : dtypes)
              check_round_trip(codec, c, b, block, out, describe(s, seed));
            ++cases;
          }
        }
      }
    }
  }
  EXPECT_EQ(cases, 216);
}

TEST(Codec, ManySeedsAndBoundsOnSmallBlocks) {
  std::mt19937 rng(42);
  for (int i = 0; i < 300; ++i) {
    const kvc_kind kind = rng() % 2 ? KVC_KIND_VALUE : KVC_KIND_KEY;
    const uint32_t tokens = 1 + rng() % 40;
    const uint32_t dim = 1 + rng() % 40;
    const kvc_dtype dtype = kvc_dtype(1 + rng() % 3);
    const bool relative = rng() % 2;
    const float bound = relative ? std::ldexp(1.0f, -int(rng() % 12)) * 0.9f
                                 : std::ldexp(1.0f, -int(rng() % 16)) * 1.3f;
    const kvc_codec_config c =
        make_config(kind, tokens, dim, relative ? KVC_BOUND_RELATIVE : KVC_BOUND_ABSOLUTE, bound);
    const kvcomp::Codebook book = train(c, dtype, uint32_t(i) + 5000, 2);
    const kvcomp::Codec codec(c, &book);
    const Block b =
        make_block(dtype, tokens, dim, dim,
                   bench::synthetic_kv(kind == KVC_KIND_VALUE, tokens, dim, uint32_t(i)));
    const auto block = codec.encode(b.data(), dtype, b.stride);
    ASSERT_LE(block.size(), codec.max_block_bytes(dtype));
    check_round_trip(codec, c, b, block, KVC_DTYPE_FP32, "case " + std::to_string(i));
  }
}

TEST(Codec, EncodingIsDeterministicAndIgnoresSourceStride) {
  const kvc_codec_config c = make_config(KVC_KIND_KEY, 64, 128, KVC_BOUND_RELATIVE, 0.05f);
  const kvcomp::Codebook book = train(c, KVC_DTYPE_FP16, 3);
  const kvcomp::Codec codec(c, &book);
  const auto x = bench::synthetic_kv(false, 64, 128, 9);
  const Block dense = make_block(KVC_DTYPE_FP16, 64, 128, 128, x);
  const Block strided = make_block(KVC_DTYPE_FP16, 64, 128, 8 * 128, x);
  const auto a = codec.encode(dense.data(), KVC_DTYPE_FP16, dense.stride);
  EXPECT_EQ(a, codec.encode(dense.data(), KVC_DTYPE_FP16, dense.stride));
  EXPECT_EQ(a, codec.encode(strided.data(), KVC_DTYPE_FP16, strided.stride));
  // The same values given as fp32 quantize identically (only a raw block would differ).
  const Block wide = make_block(KVC_DTYPE_FP32, 64, 128, 128, dense.values);
  EXPECT_EQ(a, codec.encode(wide.data(), KVC_DTYPE_FP32, wide.stride));
}

TEST(Codec, BatchEqualsSingleBlocks) {
  const kvc_codec_config c = make_config(KVC_KIND_VALUE, 32, 64, KVC_BOUND_ABSOLUTE, 0.02f);
  const kvcomp::Codebook book = train(c, KVC_DTYPE_BF16, 4);
  const kvcomp::Codec codec(c, &book);
  // One [tokens, heads, dim] tensor: block h is head h, rows heads * dim apart.
  const uint32_t heads = 4;
  const auto x = bench::synthetic_kv(true, 32, heads * 64, 11);
  const Block all = make_block(KVC_DTYPE_BF16, 32, heads * 64, heads * 64, x);
  const size_t cap = codec.max_block_bytes(KVC_DTYPE_BF16);
  std::vector<std::vector<uint8_t>> out(heads, std::vector<uint8_t>(cap));
  std::vector<const void*> src;
  std::vector<void*> dst;
  for (uint32_t h = 0; h < heads; ++h) {
    src.push_back(all.bytes.data() + h * 64 * 2);
    dst.push_back(out[h].data());
  }
  std::vector<uint32_t> sizes(heads, 0);
  codec.encode_batch(src, all.stride, KVC_DTYPE_BF16, dst, cap, sizes.data());
  for (uint32_t h = 0; h < heads; ++h) {
    const auto single = codec.encode(src[h], KVC_DTYPE_BF16, all.stride);
    ASSERT_EQ(sizes[h], single.size());
    EXPECT_TRUE(std::equal(single.begin(), single.end(), out[h].begin())) << "head " << h;
  }
  // And decode them back as a batch into the same interleaved layout.
  std::vector<float> back(size_t(32) * heads * 64, -1.0f);
  std::vector<void*> back_ptrs;
  std::vector<const void*> blocks;
  for (uint32_t h = 0; h < heads; ++h) {
    back_ptrs.push_back(back.data() + h * 64);
    blocks.push_back(out[h].data());
  }
  std::vector<kvc_status_t> status(heads, KVC_ERROR_INTERNAL);
  codec.decode_batch(blocks, sizes.data(), KVC_DTYPE_FP32, back_ptrs, heads * 64, status.data());
  for (uint32_t h = 0; h < heads; ++h) EXPECT_EQ(status[h], KVC_SUCCESS);
  for (size_t i = 0; i < back.size(); ++i) {
    ASSERT_LE(std::fabs(back[i] - all.values[i]), 0.02f) << i;
  }
}

TEST(Codec, AutoPicksTheSmallerEncoding) {
  for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
    for (float rel : {0.01f, 0.05f, 0.25f}) {
      kvc_codec_config c = make_config(kind, 64, 128, KVC_BOUND_RELATIVE, rel);
      const kvcomp::Codebook book = train(c, KVC_DTYPE_FP16, 21);
      const Block b = make_block(KVC_DTYPE_FP16, 64, 128, 128,
                                 bench::synthetic_kv(kind == KVC_KIND_VALUE, 64, 128, 77));
      const auto size_with = [&](kvc_entropy e) {
        c.entropy = e;
        return kvcomp::Codec(c, &book).encode(b.data(), KVC_DTYPE_FP16, b.stride).size();
      };
      const size_t fixed = size_with(KVC_ENTROPY_FIXED);
      const size_t huffman = size_with(KVC_ENTROPY_HUFFMAN);
      const size_t chosen = size_with(KVC_ENTROPY_AUTO);
      EXPECT_EQ(chosen, std::min(fixed, huffman)) << "kind " << kind << " rel " << rel;
      // On peaked realistic data the entropy coder must beat fixed-width packing.
      EXPECT_LT(huffman, fixed) << "kind " << kind << " rel " << rel;
    }
  }
}

TEST(Codec, SubstreamCountsAllRoundTrip) {
  for (int32_t streams : {1, 2, 4, 8, 16, 32, 64}) {
    kvc_codec_config c =
        make_config(KVC_KIND_KEY, 64, 64, KVC_BOUND_RELATIVE, 0.05f, KVC_ENTROPY_HUFFMAN);
    c.num_substreams = streams;
    const kvcomp::Codebook book = train(c, KVC_DTYPE_FP16, 8);
    const kvcomp::Codec codec(c, &book);
    const Block b = make_block(KVC_DTYPE_FP16, 64, 64, 64, bench::synthetic_kv(false, 64, 64, 3));
    const auto block = codec.encode(b.data(), KVC_DTYPE_FP16, 64);
    const kvc_block_info info = kvcomp::inspect(block);
    EXPECT_EQ(info.encoding, KVC_ENCODING_HUFFMAN);
    EXPECT_EQ(info.num_substreams, streams);
    check_round_trip(codec, c, b, block, KVC_DTYPE_FP32, "streams " + std::to_string(streams));
  }
}

// ---- Edge-case data ---------------------------------------------------------------------------

struct EdgeCase {
  const char* name;
  kvc_dtype dtype;
  std::vector<float> values;  // 16 tokens x 8 channels
};

std::vector<EdgeCase> edge_cases() {
  const uint32_t n = 16 * 8;
  std::vector<EdgeCase> cases;
  cases.push_back({"zeros", KVC_DTYPE_FP16, std::vector<float>(n, 0.0f)});
  std::vector<float> signed_zeros(n);
  for (uint32_t i = 0; i < n; ++i) signed_zeros[i] = i % 2 ? -0.0f : 0.0f;
  cases.push_back({"signed zeros", KVC_DTYPE_FP32, signed_zeros});
  cases.push_back({"constant", KVC_DTYPE_FP16, std::vector<float>(n, 3.140625f)});
  cases.push_back(
      {"constant negative fp32", KVC_DTYPE_FP32, std::vector<float>(n, -1.2345678e-3f)});
  cases.push_back({"constant large bf16", KVC_DTYPE_BF16, std::vector<float>(n, 1.5e30f)});
  std::vector<float> half_subnormals(n);
  for (uint32_t i = 0; i < n; ++i) half_subnormals[i] = std::ldexp(float(i % 7) - 3.0f, -24);
  cases.push_back({"fp16 subnormals", KVC_DTYPE_FP16, half_subnormals});
  std::vector<float> float_subnormals(n);
  for (uint32_t i = 0; i < n; ++i) float_subnormals[i] = std::ldexp(float(i % 5) + 1.0f, -149);
  cases.push_back({"fp32 subnormals", KVC_DTYPE_FP32, float_subnormals});
  cases.push_back(
      {"constant fp32 subnormal", KVC_DTYPE_FP32, std::vector<float>(n, std::ldexp(3.0f, -147))});
  std::vector<float> huge(n);
  for (uint32_t i = 0; i < n; ++i) huge[i] = (i % 2 ? 1.0f : -1.0f) * 1.5e38f * float(i % 3);
  cases.push_back({"fp32 near overflow", KVC_DTYPE_FP32, huge});
  std::vector<float> half_extremes(n);
  for (uint32_t i = 0; i < n; ++i)
    half_extremes[i] = i % 3 == 0 ? 65504.0f : (i % 3 == 1 ? -65504.0f : 0.0f);
  cases.push_back({"fp16 extremes", KVC_DTYPE_FP16, half_extremes});
  std::vector<float> spikes(n, 0.25f);
  spikes[5] = 3000.0f;
  spikes[77] = -0.001f;
  cases.push_back({"one spike", KVC_DTYPE_BF16, spikes});
  return cases;
}

TEST(Codec, EdgeCaseDataMeetsTheBound) {
  for (const EdgeCase& e : edge_cases()) {
    for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
      for (kvc_bound_mode mode : {KVC_BOUND_RELATIVE, KVC_BOUND_ABSOLUTE}) {
        for (float bound : {1e-6f, 0.01f, 0.3f}) {
          const kvc_codec_config c = make_config(kind, 16, 8, mode, bound);
          const kvcomp::Codec codec(c);
          const Block b = make_block(e.dtype, 16, 8, 8, e.values);
          const auto block = codec.encode(b.data(), e.dtype, b.stride);
          ASSERT_LE(block.size(), codec.max_block_bytes(e.dtype)) << e.name;
          std::ostringstream where;
          where << e.name << " kind " << kind << " mode " << mode << " bound " << bound;
          // fp32 output always; the narrow types where the values fit them.
          check_round_trip(codec, c, b, block, KVC_DTYPE_FP32, where.str());
          if (e.dtype != KVC_DTYPE_FP32) check_round_trip(codec, c, b, block, e.dtype, where.str());
        }
      }
    }
  }
}

TEST(Codec, ConstantGroupsInRelativeModeAreExact) {
  const kvc_codec_config c = make_config(KVC_KIND_KEY, 16, 8, KVC_BOUND_RELATIVE, 0.1f);
  const kvcomp::Codec codec(c);
  std::vector<float> x(16 * 8);
  for (uint32_t t = 0; t < 16; ++t) {
    for (uint32_t ch = 0; ch < 8; ++ch) x[t * 8 + ch] = 0.1f * float(ch) - 0.3f;  // K groups
  }
  const Block b = make_block(KVC_DTYPE_FP32, 16, 8, 8, x);
  const auto block = codec.encode(b.data(), KVC_DTYPE_FP32, 8);
  EXPECT_NE(kvcomp::inspect(block).encoding, KVC_ENCODING_RAW);
  std::vector<float> y(16 * 8);
  codec.decode(block, KVC_DTYPE_FP32, y.data(), 8);
  EXPECT_EQ(y, b.values);
}

TEST(Codec, UnreachableBoundFallsBackToVerbatim) {
  // Values near 1000 with an absolute bound far below their fp32 spacing: no code can honour
  // it except the exact value, and 2^24 codes do not reach 1000 / 1e-9.
  const kvc_codec_config c = make_config(KVC_KIND_VALUE, 16, 8, KVC_BOUND_ABSOLUTE, 1e-9f);
  const kvcomp::Codec codec(c);
  const Block b = make_block(KVC_DTYPE_FP32, 16, 8, 8, uniform_kv(16, 8, 999.0f, 1001.0f, 5));
  const auto block = codec.encode(b.data(), KVC_DTYPE_FP32, 8);
  EXPECT_EQ(kvcomp::inspect(block).encoding, KVC_ENCODING_RAW);
  EXPECT_EQ(block.size(), codec.max_block_bytes(KVC_DTYPE_FP32));
  std::vector<float> y(16 * 8);
  codec.decode(block, KVC_DTYPE_FP32, y.data(), 8);
  EXPECT_EQ(y, b.values);
}

TEST(Codec, NonFiniteInputIsRejectedAndNothingIsWritten) {
  const kvc_codec_config c = make_config(KVC_KIND_KEY, 16, 8, KVC_BOUND_ABSOLUTE, 0.01f);
  const kvcomp::Codec codec(c);
  for (float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                    std::numeric_limits<float>::quiet_NaN()}) {
    std::vector<float> x(16 * 8, 1.0f);
    x[3 * 8 + 5] = bad;
    std::vector<uint8_t> dst(codec.max_block_bytes(KVC_DTYPE_FP32), 0x5A);
    const void* src = x.data();
    void* dst_ptr = dst.data();
    uint32_t written = 12345;
    EXPECT_EQ(kvc_codec_encode(codec.get(), 1, &src, 8, KVC_DTYPE_FP32, &dst_ptr, dst.size(),
                               &written, nullptr),
              KVC_ERROR_NONFINITE_INPUT);
    EXPECT_TRUE(last_error_names("token 3 channel 5")) << kvc_last_error();
    EXPECT_EQ(written, 12345u);
    EXPECT_TRUE(std::all_of(dst.begin(), dst.end(), [](uint8_t v) { return v == 0x5A; }));
  }
}

// ---- Escapes -----------------------------------------------------------------------------------

TEST(Codec, SymbolsMissingFromTheCodebookGoThroughTheEscape) {
  // Train on narrow data, encode wide data: most symbols are outside the codebook's range.
  kvc_codec_config c =
      make_config(KVC_KIND_VALUE, 32, 64, KVC_BOUND_ABSOLUTE, 0.01f, KVC_ENTROPY_HUFFMAN);
  kvcomp::Histogram histogram;
  const uint64_t counts[] = {5, 100, 5};
  histogram.add_counts(-1, counts);
  const kvcomp::Codebook book = kvcomp::Codebook::build(histogram);
  EXPECT_EQ(book.code_length(5), 0);  // never seen: escaped
  const kvcomp::Codec codec(c, &book);
  const Block b = make_block(KVC_DTYPE_FP16, 32, 64, 64, uniform_kv(32, 64, -8.0f, 8.0f, 1));
  const auto block = codec.encode(b.data(), KVC_DTYPE_FP16, 64);
  const kvc_block_info info = kvcomp::inspect(block);
  EXPECT_EQ(info.encoding, KVC_ENCODING_HUFFMAN);
  EXPECT_GT(info.code_bits, 8);  // escape payload wide enough for |symbol| ~ 800
  check_round_trip(codec, c, b, block, KVC_DTYPE_FP32, "escapes");
}

TEST(Codec, EmptyHistogramCodebookEscapesEverything) {
  kvcomp::Histogram empty;
  const kvcomp::Codebook book = kvcomp::Codebook::build(empty);
  EXPECT_EQ(book.code_length(0), 0);
  const kvc_codec_config c =
      make_config(KVC_KIND_KEY, 16, 64, KVC_BOUND_RELATIVE, 0.05f, KVC_ENTROPY_HUFFMAN);
  const kvcomp::Codec codec(c, &book);
  const Block b = make_block(KVC_DTYPE_FP16, 16, 64, 64, bench::synthetic_kv(false, 16, 64, 2));
  const auto block = codec.encode(b.data(), KVC_DTYPE_FP16, 64);
  EXPECT_EQ(kvcomp::inspect(block).encoding, KVC_ENCODING_HUFFMAN);
  check_round_trip(codec, c, b, block, KVC_DTYPE_FP32, "all escapes");
}

// ---- Corrupt input ------------------------------------------------------------------------------

bool is_data_error(kvc_status_t s) {
  return s == KVC_ERROR_CORRUPT_DATA || s == KVC_ERROR_CODEBOOK_MISMATCH ||
         s == KVC_ERROR_FORMAT_VERSION || s == KVC_ERROR_CONFIG_MISMATCH;
}

// Decodes arbitrary bytes: a success or a data error, never anything else (ASan and UBSan
// builds of this test catch any out-of-bounds access).
kvc_status_t decode_bytes(const kvcomp::Codec& codec, const std::vector<uint8_t>& bytes,
                          size_t tokens, size_t dim) {
  // Copy into an exactly sized heap buffer so that an overread is an ASan error.
  std::unique_ptr<uint8_t[]> exact(new uint8_t[std::max<size_t>(bytes.size(), 1)]);
  std::copy(bytes.begin(), bytes.end(), exact.get());
  std::vector<float> out(tokens * dim);
  const void* src = exact.get();
  void* dst = out.data();
  const uint32_t n = uint32_t(bytes.size());
  kvc_status_t block_status = KVC_ERROR_INTERNAL;
  const kvc_status_t s = kvc_codec_decode(codec.get(), 1, &src, &n, KVC_DTYPE_FP32, &dst,
                                          int64_t(dim), &block_status, nullptr);
  EXPECT_EQ(s, block_status);
  EXPECT_TRUE(s == KVC_SUCCESS || is_data_error(s)) << kvc_status_string(s);
  if (s != KVC_SUCCESS) EXPECT_STRNE(kvc_last_error(), "");
  return s;
}

struct Encoded {
  kvc_codec_config config;
  std::vector<uint8_t> block;
};

std::vector<Encoded> sample_blocks(const kvcomp::Codebook& key_book,
                                   const kvcomp::Codebook& value_book) {
  std::vector<Encoded> out;
  for (kvc_entropy e : {KVC_ENTROPY_FIXED, KVC_ENTROPY_HUFFMAN}) {
    for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
      const kvc_codec_config c = make_config(kind, 32, 64, KVC_BOUND_RELATIVE, 0.05f, e);
      const kvcomp::Codec codec(c, kind == KVC_KIND_KEY ? &key_book : &value_book);
      const Block b = make_block(KVC_DTYPE_FP16, 32, 64, 64,
                                 bench::synthetic_kv(kind == KVC_KIND_VALUE, 32, 64, 1234));
      out.push_back({c, codec.encode(b.data(), KVC_DTYPE_FP16, 64)});
    }
  }
  // A verbatim block.
  const kvc_codec_config c = make_config(KVC_KIND_KEY, 32, 64, KVC_BOUND_ABSOLUTE, 1e-9f);
  const Block b = make_block(KVC_DTYPE_FP32, 32, 64, 64, uniform_kv(32, 64, 999, 1001, 3));
  out.push_back({c, kvcomp::Codec(c).encode(b.data(), KVC_DTYPE_FP32, 64)});
  return out;
}

class CorruptBlocks : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto kc = make_config(KVC_KIND_KEY, 32, 64, KVC_BOUND_RELATIVE, 0.05f);
    const auto vc = make_config(KVC_KIND_VALUE, 32, 64, KVC_BOUND_RELATIVE, 0.05f);
    key_book_ = std::make_unique<kvcomp::Codebook>(train(kc, KVC_DTYPE_FP16, 99));
    value_book_ = std::make_unique<kvcomp::Codebook>(train(vc, KVC_DTYPE_FP16, 98));
    samples_ = sample_blocks(*key_book_, *value_book_);
    ASSERT_EQ(kvcomp::inspect(samples_[0].block).encoding, KVC_ENCODING_FIXED);
    ASSERT_EQ(kvcomp::inspect(samples_[2].block).encoding, KVC_ENCODING_HUFFMAN);
    ASSERT_EQ(kvcomp::inspect(samples_.back().block).encoding, KVC_ENCODING_RAW);
  }
  kvcomp::Codec codec_for(const kvc_codec_config& c) const {
    return kvcomp::Codec(c, c.kind == KVC_KIND_KEY ? key_book_.get() : value_book_.get());
  }
  std::unique_ptr<kvcomp::Codebook> key_book_, value_book_;
  std::vector<Encoded> samples_;
};

TEST_F(CorruptBlocks, EveryTruncationIsRejected) {
  for (const Encoded& e : samples_) {
    const kvcomp::Codec codec = codec_for(e.config);
    ASSERT_EQ(decode_bytes(codec, e.block, 32, 64), KVC_SUCCESS);
    for (size_t n = 0; n < e.block.size(); ++n) {
      const std::vector<uint8_t> cut(e.block.begin(), e.block.begin() + long(n));
      ASSERT_NE(decode_bytes(codec, cut, 32, 64), KVC_SUCCESS) << "length " << n;
    }
  }
}

TEST_F(CorruptBlocks, BitFlipsNeverCrash) {
  std::mt19937 rng(7);
  int rejected = 0, total = 0;
  for (const Encoded& e : samples_) {
    const kvcomp::Codec codec = codec_for(e.config);
    for (int i = 0; i < 3000; ++i) {
      std::vector<uint8_t> bad = e.block;
      const int flips = 1 + int(rng() % 4);
      for (int f = 0; f < flips; ++f) {
        // Half the flips in the header and section tables, where they matter most.
        const size_t at =
            rng() % 2 ? rng() % std::min<size_t>(bad.size(), 160) : rng() % bad.size();
        bad[at] ^= uint8_t(1u << (rng() % 8));
      }
      rejected += decode_bytes(codec, bad, 32, 64) != KVC_SUCCESS;
      ++total;
    }
  }
  // Many flips land in payload bits and decode to other values; header damage must be caught.
  EXPECT_GT(rejected, total / 10);
}

TEST_F(CorruptBlocks, RandomBytesAndHeaderFieldsNeverCrash) {
  std::mt19937 rng(8);
  const kvcomp::Codec codec = codec_for(samples_[2].config);
  for (int i = 0; i < 2000; ++i) {
    std::vector<uint8_t> junk(rng() % 600);
    for (uint8_t& v : junk) v = uint8_t(rng());
    if (junk.size() >= 8 && i % 2) {  // a valid magic and version, so parsing goes deeper
      format::store_u32(junk.data(), format::kBlockMagic);
      junk[4] = 1;
    }
    decode_bytes(codec, junk, 32, 64);
  }
  // Each header byte set to every value, on a valid Huffman block.
  for (size_t at = 0; at < format::kHeaderBytes; ++at) {
    for (int v = 0; v < 256; ++v) {
      std::vector<uint8_t> bad = samples_[2].block;
      bad[at] = uint8_t(v);
      decode_bytes(codec, bad, 32, 64);
    }
  }
}

TEST_F(CorruptBlocks, MismatchesAreNamed) {
  // A Huffman block decoded with another codebook.
  const Encoded& huffman_k = samples_[2];
  kvcomp::Codec wrong_book(huffman_k.config, value_book_.get());
  EXPECT_EQ(decode_bytes(wrong_book, huffman_k.block, 32, 64), KVC_ERROR_CODEBOOK_MISMATCH);
  // A K block decoded by a V codec.
  kvcomp::Codec value_codec(samples_[3].config, value_book_.get());
  EXPECT_EQ(decode_bytes(value_codec, samples_[0].block, 32, 64), KVC_ERROR_CONFIG_MISMATCH);
  // A future format version.
  std::vector<uint8_t> future = huffman_k.block;
  future[format::offset::kVersion] = 2;
  EXPECT_EQ(decode_bytes(codec_for(huffman_k.config), future, 32, 64), KVC_ERROR_FORMAT_VERSION);
}

#if defined(__SSE__)
TEST(Codec, CallersFloatEnvironmentDoesNotChangeTheBytes) {
  // Subnormal inputs and a bound near them: flush-to-zero or another rounding mode in the
  // caller's environment would change codes if the codec ran under it.
  const kvc_codec_config c = make_config(KVC_KIND_VALUE, 16, 64, KVC_BOUND_ABSOLUTE, 1e-39f);
  const kvcomp::Codec codec(c);
  std::vector<float> x(16 * 64);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::ldexp(float(i % 97) - 48.0f, -135);
  const Block b = make_block(KVC_DTYPE_FP32, 16, 64, 64, x);
  const auto reference = codec.encode(b.data(), KVC_DTYPE_FP32, 64);
  ASSERT_NE(kvcomp::inspect(reference).encoding, KVC_ENCODING_RAW);
  const unsigned saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u);  // flush-to-zero and denormals-are-zero
  const int saved_round = std::fegetround();
  std::fesetround(FE_UPWARD);
  const auto under_ftz = codec.encode(b.data(), KVC_DTYPE_FP32, 64);
  std::vector<float> y(16 * 64);
  codec.decode(under_ftz, KVC_DTYPE_FP32, y.data(), 64);
  const unsigned after = _mm_getcsr();
  const int round_after = std::fegetround();
  std::fesetround(saved_round);
  _mm_setcsr(saved);
  EXPECT_EQ(after & 0x8040u, 0x8040u) << "the caller's environment is restored";
  EXPECT_EQ(round_after, FE_UPWARD);
  EXPECT_EQ(under_ftz, reference);
  for (size_t i = 0; i < x.size(); ++i) ASSERT_LE(std::fabs(y[i] - x[i]), 1e-39f) << i;
}
#endif

}  // namespace
}  // namespace kvc::test
