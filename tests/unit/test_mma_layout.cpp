// SPDX-License-Identifier: Apache-2.0
// The fragment index math the tensor-core attention kernels rely on (kernels/common/mma.cuh):
// every layout is a bijection onto its matrix, the accumulators of S = Q K^T are the A fragment
// of P V with no data movement, the ldmatrix addressing of K and V yields exactly the B
// fragments the kernels feed to mma, and the swizzled shared-memory rows are conflict-free.
#include <gtest/gtest.h>

#include <set>
#include <utility>

#include "kernels/common/mma.cuh"

namespace kvc::kernels::mma {
namespace {

constexpr uint32_t kLanes = 32;

template <class F>
std::set<std::pair<uint32_t, uint32_t>> cover(uint32_t per_lane, F coord) {
  std::set<std::pair<uint32_t, uint32_t>> seen;
  for (uint32_t lane = 0; lane < kLanes; ++lane) {
    for (uint32_t i = 0; i < per_lane; ++i) {
      const Coord c = coord(lane, i);
      seen.insert({c.row, c.col});
    }
  }
  return seen;
}

TEST(MmaLayout, FragmentsCoverTheirMatricesOnce) {
  const auto a = cover(8, a_coord);
  const auto b = cover(4, b_coord);
  const auto c = cover(4, c_coord);
  EXPECT_EQ(a.size(), 16u * 16u);
  EXPECT_EQ(b.size(), 16u * 8u);
  EXPECT_EQ(c.size(), 16u * 8u);
  for (const auto& [r, col] : a) EXPECT_TRUE(r < 16 && col < 16);
  for (const auto& [r, col] : b) EXPECT_TRUE(r < 16 && col < 8);
  for (const auto& [r, col] : c) EXPECT_TRUE(r < 16 && col < 8);
}

// The PTX ISA's tables, spot-checked by hand: lane 5 is groupID 1, threadID_in_group 1.
TEST(MmaLayout, MatchesThePtxTables) {
  EXPECT_EQ(a_coord(5, 0).row, 1u);
  EXPECT_EQ(a_coord(5, 0).col, 2u);
  EXPECT_EQ(a_coord(5, 3).row, 9u);
  EXPECT_EQ(a_coord(5, 3).col, 3u);
  EXPECT_EQ(a_coord(5, 4).row, 1u);
  EXPECT_EQ(a_coord(5, 4).col, 10u);
  EXPECT_EQ(a_coord(5, 7).row, 9u);
  EXPECT_EQ(a_coord(5, 7).col, 11u);
  EXPECT_EQ(b_coord(5, 1).row, 3u);
  EXPECT_EQ(b_coord(5, 1).col, 1u);
  EXPECT_EQ(b_coord(5, 2).row, 10u);
  EXPECT_EQ(c_coord(5, 2).row, 9u);
  EXPECT_EQ(c_coord(5, 3).col, 3u);
}

// The kernels pack the accumulators of n-tiles 2kk and 2kk + 1 (elements 0..3 each) as the A
// fragment of k-step kk: A element i comes from n-tile i / 4, element i % 4.
TEST(MmaLayout, ScoreAccumulatorsAreTheProbabilityAFragment) {
  for (uint32_t lane = 0; lane < kLanes; ++lane) {
    for (uint32_t i = 0; i < 8; ++i) {
      const Coord c = c_coord(lane, i % 4);
      const Coord a = a_coord(lane, i);
      EXPECT_EQ(a.row, c.row) << lane << " " << i;
      EXPECT_EQ(a.col, c.col + 8 * (i / 4)) << lane << " " << i;
    }
  }
}

// K staged as rows of tokens: ldmatrix (no .trans) matrix j of lane 8j + r is token r of the
// n-tile and channels 8j..8j+7 of a 32-channel pair of k-steps. Registers j = 0, 1 must be the
// B fragment of k-step 0 and registers 2, 3 that of k-step 1 (B: row = channel, col = token).
TEST(MmaLayout, LdmatrixOfKeyRowsIsTheScoreBFragment) {
  for (uint32_t lane = 0; lane < kLanes; ++lane) {
    for (uint32_t j = 0; j < 4; ++j) {
      for (uint32_t h = 0; h < 2; ++h) {
        const Coord m = ldmatrix_coord(lane, h, false);  // (token within 8, channel within 8)
        const uint32_t token = m.row, channel = 8 * j + m.col;
        const uint32_t kstep = j / 2;
        const Coord b = b_coord(lane, 2 * (j % 2) + h);
        EXPECT_EQ(channel, 16 * kstep + b.row) << lane << " " << j << " " << h;
        EXPECT_EQ(token, b.col) << lane << " " << j << " " << h;
      }
    }
  }
}

// V staged as rows of tokens: ldmatrix.trans matrix j of lane 8j + r is token 8 (j % 2) + r of
// the k-step and the channels of n-tile j / 2. Registers 0, 1 must be the B fragment of n-tile 0
// and 2, 3 that of n-tile 1 (B: row = token, col = channel).
TEST(MmaLayout, LdmatrixTransOfValueRowsIsTheOutputBFragment) {
  for (uint32_t lane = 0; lane < kLanes; ++lane) {
    for (uint32_t j = 0; j < 4; ++j) {
      for (uint32_t h = 0; h < 2; ++h) {
        const Coord m = ldmatrix_coord(lane, h, true);  // stored (token, channel) within 8x8
        const uint32_t token = 8 * (j % 2) + m.row, ntile = j / 2, channel = m.col;
        const Coord b = b_coord(lane, 2 * (j % 2) + h);
        EXPECT_EQ(token, b.row) << lane << " " << j << " " << h;
        EXPECT_EQ(channel, b.col) << lane << " " << j << " " << h;
        EXPECT_LE(ntile, 1u);
      }
    }
  }
}

// Each ldmatrix phase reads one 16-byte chunk from each of 8 consecutive rows (same logical
// chunk): the swizzle must spread them over all 32 banks, for every row length the kernels use,
// and keep every row's chunks a permutation of the row.
TEST(MmaLayout, SwizzledRowsAreConflictFreeAndPermuted) {
  for (uint32_t head_dim : {64u, 128u, 256u}) {
    const uint32_t row_bytes = head_dim * 2, chunks = row_bytes / 16;
    for (uint32_t first = 0; first < 64; first += 8) {
      for (uint32_t chunk = 0; chunk < chunks; ++chunk) {
        std::set<uint32_t> banks;
        for (uint32_t r = first; r < first + 8; ++r) {
          banks.insert(swizzled_offset(r, chunk, row_bytes) % 128 / 16);
        }
        EXPECT_EQ(banks.size(), 8u) << head_dim << " " << first << " " << chunk;
      }
    }
    for (uint32_t r = 0; r < 16; ++r) {
      std::set<uint32_t> offsets;
      for (uint32_t chunk = 0; chunk < chunks; ++chunk) {
        const uint32_t off = swizzled_offset(r, chunk, row_bytes);
        EXPECT_GE(off, r * row_bytes);
        EXPECT_LT(off, (r + 1) * row_bytes);
        offsets.insert(off);
      }
      EXPECT_EQ(offsets.size(), chunks);
    }
  }
}

}  // namespace
}  // namespace kvc::kernels::mma
