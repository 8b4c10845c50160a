// SPDX-License-Identifier: Apache-2.0
// Codebooks: construction (optimal where unconstrained, length-limited, canonical, prefix-free),
// serialization, and the parser's handling of damaged bytes.
#include <gtest/gtest.h>

#include <numeric>
#include <queue>
#include <random>

#include "codec/codebook.hpp"
#include "core/error.hpp"

namespace kvc {
namespace {

Histogram histogram_of(const std::vector<std::pair<int32_t, uint64_t>>& counts) {
  Histogram h;
  for (auto [s, n] : counts) h.add(s, n);
  return h;
}

// Cost of an optimal (unlimited) prefix code, by the sum of merged weights.
uint64_t optimal_cost(std::vector<uint64_t> w) {
  if (w.size() == 1) return w[0];
  std::priority_queue<uint64_t, std::vector<uint64_t>, std::greater<>> q(w.begin(), w.end());
  uint64_t cost = 0;
  while (q.size() > 1) {
    const uint64_t a = q.top();
    q.pop();
    const uint64_t b = q.top();
    q.pop();
    cost += a + b;
    q.push(a + b);
  }
  return cost;
}

// Every table entry decodes the code whose bits start the index, and each code appears.
void expect_consistent(const Codebook& b) {
  const auto& table = b.decode_table();
  ASSERT_EQ(table.size(), size_t(1) << b.max_code_length());
  uint64_t kraft = 0;
  for (uint32_t i = 0; i <= b.num_symbols(); ++i) {
    const uint32_t l = b.length(i);
    if (l == 0) continue;
    ASSERT_LE(l, b.max_code_length());
    kraft += uint64_t(1) << (b.max_code_length() - l);
    ASSERT_EQ(table[b.reversed_code(i)], (i << 8) | l) << "index " << i;
  }
  for (uint32_t x = 0; x < table.size(); ++x) {
    const uint32_t l = table[x] & 0xFFu;
    if (l == 0) continue;
    const uint32_t i = table[x] >> 8;
    ASSERT_EQ(x & ((1u << l) - 1u), b.reversed_code(i)) << "entry " << x;
  }
  // Two or more codes form a complete code; one code (the escape alone) uses half the space.
  const uint64_t full = uint64_t(1) << b.max_code_length();
  EXPECT_EQ(kraft, b.num_symbols() == 0 || kraft == full / 2 ? kraft : full);
}

TEST(Codebook, UnconstrainedCodesAreOptimal) {
  std::mt19937 rng(1);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<std::pair<int32_t, uint64_t>> counts;
    const int n = 2 + int(rng() % 40);
    for (int s = -n / 2; s < n - n / 2; ++s) counts.emplace_back(s, 1 + rng() % 1000);
    const Histogram h = histogram_of(counts);
    const Codebook b = Codebook::build(h, 15, 4095);
    expect_consistent(b);
    uint64_t cost = 0;
    std::vector<uint64_t> weights;
    for (auto [s, c] : counts) {
      cost += c * b.length(b.index_of(s));
      weights.push_back(c);
    }
    weights.push_back(1);  // the escape: nothing outside the window, weight 1
    cost += b.length(b.escape_index());
    EXPECT_EQ(cost, optimal_cost(weights)) << "trial " << trial;
  }
}

TEST(Codebook, LengthsRespectTheLimitOnSkewedCounts) {
  // Fibonacci weights force an unlimited Huffman depth of n - 1.
  std::vector<std::pair<int32_t, uint64_t>> counts;
  uint64_t a = 1, b = 1;
  for (int s = 0; s < 40; ++s) {
    counts.emplace_back(s, a);
    const uint64_t c = a + b;
    a = b;
    b = c;
  }
  for (int limit : {4, 6, 8, 12, 15}) {
    const Codebook book = Codebook::build(histogram_of(counts), limit, 4095);
    expect_consistent(book);
    for (uint32_t i = 0; i <= book.num_symbols(); ++i) {
      EXPECT_LE(book.length(i), uint32_t(limit));
    }
  }
}

TEST(Codebook, WindowKeepsTheMostFrequentRangeAndEscapesTheRest) {
  const Histogram h = histogram_of({{-10, 1}, {0, 100}, {1, 50}, {2, 30}, {3, 20}, {90, 2}});
  const Codebook b = Codebook::build(h, 12, 3);
  EXPECT_EQ(b.first_symbol(), 0);
  EXPECT_EQ(b.num_symbols(), 3u);
  for (int32_t s : {-10, 3, 90, 4, -1}) EXPECT_EQ(b.index_of(s), b.escape_index()) << s;
  for (int32_t s : {0, 1, 2}) EXPECT_NE(b.index_of(s), b.escape_index()) << s;
  EXPECT_LE(b.length(b.index_of(0)), b.length(b.index_of(2)));
  expect_consistent(b);
}

TEST(Codebook, GapsInsideTheWindowAreEscaped) {
  const Codebook b = Codebook::build(histogram_of({{0, 10}, {5, 10}}), 12, 255);
  EXPECT_EQ(b.num_symbols(), 6u);
  EXPECT_EQ(b.index_of(2), b.escape_index());
  EXPECT_NE(b.index_of(5), b.escape_index());
  expect_consistent(b);
}

TEST(Codebook, EmptyHistogramGivesAnEscapeOnlyCode) {
  const Codebook b = Codebook::build(Histogram{}, 12, 255);
  EXPECT_EQ(b.num_symbols(), 0u);
  EXPECT_EQ(b.length(b.escape_index()), 1u);
  expect_consistent(b);
}

TEST(Codebook, FarSymbolsOnlyWeighTheEscape) {
  const Histogram h = histogram_of({{-2000000, 700}, {1 << 20, 100}, {3, 5}, {4, 1}});
  EXPECT_EQ(h.total(), 806u);
  const Codebook b = Codebook::build(h, 12, 16);
  EXPECT_EQ(b.first_symbol(), 3);
  EXPECT_EQ(b.num_symbols(), 2u);
  // The escape carries the 800 far occurrences: the shortest code.
  EXPECT_EQ(b.length(b.escape_index()), 1u);
}

TEST(Codebook, SerializationRoundTripsAndIsDeterministic) {
  std::mt19937 rng(2);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<std::pair<int32_t, uint64_t>> counts;
    for (int i = 0; i < 100; ++i) counts.emplace_back(int32_t(rng() % 300) - 150, rng() % 50);
    const Histogram h = histogram_of(counts);
    const Codebook a = Codebook::build(h, 2 + int(rng() % 14), 1 + int(rng() % 400));
    const Codebook parsed = Codebook::parse(a.serialized().data(), a.serialized().size());
    EXPECT_EQ(parsed.serialized(), a.serialized());
    EXPECT_EQ(parsed.id(), a.id());
    EXPECT_EQ(parsed.decode_table(), a.decode_table());
  }
  const Histogram h = histogram_of({{0, 5}, {1, 3}});
  EXPECT_EQ(Codebook::build(h, 12, 255).serialized(), Codebook::build(h, 12, 255).serialized());
}

kvc_status_t parse_status(const std::vector<uint8_t>& bytes) {
  try {
    Codebook::parse(bytes.data(), bytes.size());
    return KVC_SUCCESS;
  } catch (const Error& e) {
    return e.status();
  }
}

TEST(Codebook, EveryDamagedByteAndTruncationIsRejected) {
  const Histogram h = histogram_of({{-3, 4}, {-1, 30}, {0, 100}, {1, 31}, {2, 9}, {7, 1}});
  const std::vector<uint8_t> good = Codebook::build(h, 10, 255).serialized();
  ASSERT_EQ(parse_status(good), KVC_SUCCESS);
  for (size_t at = 0; at < good.size(); ++at) {
    for (int v = 0; v < 256; ++v) {
      if (v == good[at]) continue;
      std::vector<uint8_t> bad = good;
      bad[at] = uint8_t(v);
      const kvc_status_t s = parse_status(bad);
      ASSERT_TRUE(s == KVC_ERROR_CORRUPT_DATA || s == KVC_ERROR_FORMAT_VERSION)
          << "byte " << at << " = " << v;
    }
  }
  for (size_t n = 0; n < good.size(); ++n) {
    ASSERT_EQ(parse_status({good.begin(), good.begin() + long(n)}), KVC_ERROR_CORRUPT_DATA) << n;
  }
  std::vector<uint8_t> longer = good;
  longer.push_back(0);
  EXPECT_EQ(parse_status(longer), KVC_ERROR_CORRUPT_DATA);
}

TEST(Codebook, RandomBytesNeverParse) {
  std::mt19937 rng(3);
  for (int i = 0; i < 20000; ++i) {
    std::vector<uint8_t> junk(rng() % 64);
    for (uint8_t& v : junk) v = uint8_t(rng());
    if (junk.size() >= 4 && i % 2) {  // a valid magic, so parsing goes deeper
      junk[0] = 'k', junk[1] = 'v', junk[2] = 'c', junk[3] = 'h';
    }
    EXPECT_NE(parse_status(junk), KVC_SUCCESS);
  }
}

}  // namespace
}  // namespace kvc
