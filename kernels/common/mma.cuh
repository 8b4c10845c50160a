// SPDX-License-Identifier: Apache-2.0
// The fragment layouts of mma.sync.aligned.m16n8k16 that the tile format (B operand order) and
// the tensor-core decode-attention kernels rely on, host-callable so that the CPU tests check
// the index math (the instructions themselves are kvc::device facilities,
// kernels/common/device_api.cuh).
//
// Layouts, from the PTX ISA ("Matrix fragments for mma.m16n8k16 with floating point type"),
// with lane = 4 * groupID + threadID_in_group:
//   A, 16x16 row-major, 8 halves in 4 registers;  B, 16x8 "col", 4 halves in 2 registers;
//   C/D, 16x8 fp32, 4 floats.
#pragma once

#include <cstdint>

#include "kernels/common/format.cuh"  // KVC_HD

namespace kvc::kernels::mma {

struct Coord {
  uint32_t row, col;
};

// Element i (0..7; register i / 2, half i % 2) of a lane's A fragment.
KVC_HD constexpr Coord a_coord(uint32_t lane, uint32_t i) {
  return {lane / 4 + 8 * ((i / 2) % 2), (lane % 4) * 2 + i % 2 + 8 * (i / 4)};
}

// Element i (0..3; register i / 2, half i % 2) of a lane's B fragment: row = k, col = n.
KVC_HD constexpr Coord b_coord(uint32_t lane, uint32_t i) {
  return {(lane % 4) * 2 + i % 2 + 8 * (i / 2), lane / 4};
}

// Element i (0..3) of a lane's C/D fragment.
KVC_HD constexpr Coord c_coord(uint32_t lane, uint32_t i) {
  return {lane / 4 + 8 * (i / 2), (lane % 4) * 2 + i % 2};
}

// What ldmatrix gives a lane of one 8x8 matrix of 16-bit elements: halves h = 0, 1 of its
// register are (row, col) of the matrix as stored (rows at the addresses lanes 8j..8j+7 pass
// for matrix j); with .trans, (col, row).
KVC_HD constexpr Coord ldmatrix_coord(uint32_t lane, uint32_t h, bool trans) {
  const Coord c{lane / 4, (lane % 4) * 2 + h};
  return trans ? Coord{c.col, c.row} : c;
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a shared-memory tile whose rows are
// `row_bytes` long (a multiple of 128): chunks are XOR-swizzled over groups of eight rows, so
// the eight rows an ldmatrix phase reads hit all 32 banks once.
KVC_HD constexpr uint32_t swizzled_offset(uint32_t row, uint32_t chunk, uint32_t row_bytes) {
  return row * row_bytes + ((chunk ^ (row % 8)) * 16);
}

}  // namespace kvc::kernels::mma
