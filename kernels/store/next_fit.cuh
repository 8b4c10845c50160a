// SPDX-License-Identifier: Apache-2.0
// The placement rule of both store backends (host and device), so that they lay out the same
// pages: next fit. A block goes at the end of its (sequence, layer)'s open page, or opens a new
// page when it does not fit there.
#pragma once

#include <cstdint>

#include "kernels/common/format.cuh"  // KVC_HD

namespace kvc {

// used: bytes taken in the open page (page_bytes when none is open yet); it advances past the
// block. offset: where the block goes. Returns whether the block opens a new page.
KVC_HD bool place_next_fit(uint32_t& used, uint32_t bytes, uint32_t page_bytes, uint32_t& offset) {
  const bool opens = used + bytes > page_bytes;
  if (opens) used = 0;
  offset = used;
  used += bytes;
  return opens;
}

}  // namespace kvc
