// SPDX-License-Identifier: Apache-2.0
// The placement rule of both store backends (host and device), so that they lay out the same
// pages: next fit. A block goes at the end of its (sequence, layer)'s open page, rounded up to
// the store's block alignment, or opens a new page when it does not fit there.
#pragma once

#include <cstdint>

#include "kernels/common/format.cuh"  // KVC_HD

namespace kvc {

// The alignment of blocks in a page: 16 bytes for tile blocks (the tile attention kernel loads
// them 16 bytes at a time), 4 for format v1 blocks. Pages are multiples of 256 bytes, so an
// offset aligned in its page is aligned in the pool.
KVC_HD uint32_t block_alignment(bool tiles) { return tiles ? 16u : 4u; }

// used: bytes taken in the open page (page_bytes when none is open yet); it advances past the
// block. align: block_alignment(), a power of two dividing page_bytes. offset: where the block
// goes, a multiple of align. Returns whether the block opens a new page. (Blocks of either
// format are multiples of their alignment, so rounding changes nothing for the blocks kvcomp
// writes; it keeps the rule right for any block.)
KVC_HD bool place_next_fit(uint32_t& used, uint32_t bytes, uint32_t page_bytes, uint32_t align,
                           uint32_t& offset) {
  uint32_t start = (used + align - 1u) & ~(align - 1u);  // used <= page_bytes <= 2^30
  const bool opens = start + bytes > page_bytes;
  if (opens) start = 0;
  offset = start;
  used = start + bytes;
  return opens;
}

}  // namespace kvc
