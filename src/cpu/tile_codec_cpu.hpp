// SPDX-License-Identifier: Apache-2.0
// The CPU reference codec of tile format t1 (docs/format.md, "Tile format (t1)"): the oracle of
// the tensor-core attention kernel's input. Pairs are located with the kernels' own functions
// (kernels/common/tile_format.cuh: pair_element, locate_pair; that a pair's second half is the
// next row of the same column is pinned by test_tiles_format), group metadata once per tile row.
#pragma once

#include <kvcomp/kvcomp.h>

#include <cstdint>
#include <vector>

#include "codec/codec_params.hpp"
#include "cpu/codec_cpu.hpp"
#include "kernels/common/tile_format.cuh"

namespace kvc::cpu {

// What the encoder decided for one block (exposed for tests and measurements).
struct TilePlan {
  tiles::TileLayout layout{};
  std::vector<uint32_t> widths;  // [num_tiles] width codes
};

// The plan encode_tile_block would write (finite input, already checked).
TilePlan plan_tile_block(const CodecParams& p, const void* src, int64_t token_stride,
                         kvc_dtype dtype);

// Encodes one block (finite input, already checked) into dst, which holds at least
// layout.block_bytes of the plan; returns the bytes written.
uint32_t encode_tile_block(const CodecParams& p, const void* src, int64_t token_stride,
                           kvc_dtype dtype, uint8_t* dst);

// The tile block of codes already quantized (q.ok, as quantize() gives them for p), without an
// input: throws KVC_ERROR_CORRUPT_DATA where the encoder would store a tile, or the block,
// verbatim. Byte-identical to encode_tile_block of an input with those codes otherwise.
uint32_t encode_tile_codes(const CodecParams& p, const Quantized& q, kvc_dtype dtype, uint8_t* dst);

// The codes and steps of a tile block without raw tiles, in group order as quantize() gave
// them, after the checks of decode_tile_block; !ok for a block with raw tiles, or with a code
// outside the quantizer's range (codes_in_range: only a crafted block has one).
Quantized tile_block_codes(const CodecParams& p, const uint8_t* src, uint64_t available);

// Parses and checks a tile block (header, table, permutation) against the bytes available;
// throws KVC_ERROR_CORRUPT_DATA or KVC_ERROR_FORMAT_VERSION.
tiles::TileLayout parse_tile_header(const uint8_t* src, uint64_t available);

// Decodes one tile block; throws a data status on bad input. Reads only
// src[0, min(available, stated length)).
void decode_tile_block(const CodecParams& p, const uint8_t* src, uint64_t available,
                       kvc_dtype dtype, void* dst, int64_t token_stride);

}  // namespace kvc::cpu
