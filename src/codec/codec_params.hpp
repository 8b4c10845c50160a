// SPDX-License-Identifier: Apache-2.0
// A codec's validated configuration, shared by the backends.
#pragma once

#include <kvcomp/kvcomp.h>

#include <cstddef>
#include <cstdint>

namespace kvc {

struct CodecParams {
  kvc_backend backend;
  bool is_value;
  uint32_t num_tokens;
  uint32_t head_dim;
  uint32_t group_size;
  uint32_t num_groups;
  uint32_t num_substreams;
  bool relative;
  float error_bound;
  kvc_entropy entropy;
  bool tiles;             // format t1 (kvc_block_format TILES), else v1
  bool permute_channels;  // tiles, K: sort channels by code width
  bool split_widths;      // tiles: 3- and 6-bit two-plane tiles allowed

  // Validates a public config; throws kvc::Error naming the offending field.
  static CodecParams from_config(const kvc_codec_config& config, bool has_codebook);

  uint32_t num_elements() const { return num_tokens * head_dim; }
  // Format v1 with this (tile) codec's groups, bound and mode, so the same codes, in one Huffman
  // sub-stream: the form a tiles store's serialization writes its blocks in.
  CodecParams transcoded() const;
  // Largest block for this input dtype: the verbatim encoding, which the encoder always weighs.
  size_t max_block_bytes(kvc_dtype dtype) const;
};

// Throws KVC_ERROR_INVALID_ARGUMENT naming the argument unless dtype is a kvc_dtype.
void require_dtype(int32_t dtype, const char* name);
// The same for a kvc_dtype argument from C, read as the integer it holds (c_enum_value): the
// validated dtype.
kvc_dtype checked_dtype(const kvc_dtype& dtype, const char* name);

}  // namespace kvc
