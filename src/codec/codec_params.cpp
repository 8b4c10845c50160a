// SPDX-License-Identifier: Apache-2.0
#include "codec/codec_params.hpp"

#include <cmath>

#include "core/error.hpp"
#include "kernels/common/format.cuh"
#include "kernels/common/tile_format.cuh"

namespace kvc {

void require_dtype(int32_t dtype, const char* name) {
  require(dtype == KVC_DTYPE_FP16 || dtype == KVC_DTYPE_BF16 || dtype == KVC_DTYPE_FP32,
          KVC_ERROR_INVALID_ARGUMENT, name, " = ", dtype,
          " is not a kvc_dtype (KVC_DTYPE_FP16 = 1, KVC_DTYPE_BF16 = 2, KVC_DTYPE_FP32 = 3)");
}

kvc_dtype checked_dtype(const kvc_dtype& dtype, const char* name) {
  const int32_t v = c_enum_value(dtype);
  require_dtype(v, name);
  return kvc_dtype(v);
}

namespace {

// Auto sub-streams: the largest divisor of the group size up to 32, one per GPU lane.
uint32_t default_substreams(uint32_t group_size) {
  for (uint32_t s = 32; s > 1; --s) {
    if (group_size % s == 0) return s;
  }
  return 1;
}

}  // namespace

CodecParams CodecParams::from_config(const kvc_codec_config& c, bool has_codebook) {
  check_struct_header(c, "config");
  require(c.backend == KVC_BACKEND_CPU || c.backend == KVC_BACKEND_CUDA, KVC_ERROR_INVALID_ARGUMENT,
          "config->backend = ", c.backend,
          " is not a kvc_backend (KVC_BACKEND_CPU = 0, KVC_BACKEND_CUDA = 1)");
  require(c.kind == KVC_KIND_KEY || c.kind == KVC_KIND_VALUE, KVC_ERROR_INVALID_ARGUMENT,
          "config->kind = ", c.kind, " is not a kvc_kind (KVC_KIND_KEY = 0, KVC_KIND_VALUE = 1)");
  require(c.num_tokens >= 1 && c.num_tokens <= KVC_MAX_NUM_TOKENS, KVC_ERROR_INVALID_ARGUMENT,
          "config->num_tokens = ", c.num_tokens, " is out of range [1, ", KVC_MAX_NUM_TOKENS, "]");
  require(c.head_dim >= 1 && c.head_dim <= KVC_MAX_HEAD_DIM, KVC_ERROR_INVALID_ARGUMENT,
          "config->head_dim = ", c.head_dim, " is out of range [1, ", KVC_MAX_HEAD_DIM, "]");
  require(c.bound_mode == KVC_BOUND_ABSOLUTE || c.bound_mode == KVC_BOUND_RELATIVE,
          KVC_ERROR_INVALID_ARGUMENT, "config->bound_mode = ", c.bound_mode,
          " is not a kvc_bound_mode");
  if (c.bound_mode == KVC_BOUND_ABSOLUTE) {
    require(c.error_bound > 0.0f && std::isfinite(2.0f * c.error_bound), KVC_ERROR_INVALID_ARGUMENT,
            "config->error_bound = ", c.error_bound, " must be > 0 and finite (absolute bound)");
  } else {
    require(c.error_bound > 0.0f && c.error_bound <= 1.0f, KVC_ERROR_INVALID_ARGUMENT,
            "config->error_bound = ", c.error_bound, " must be in (0, 1] (relative bound)");
  }
  require(c.entropy >= KVC_ENTROPY_AUTO && c.entropy <= KVC_ENTROPY_HUFFMAN,
          KVC_ERROR_INVALID_ARGUMENT, "config->entropy = ", c.entropy, " is not a kvc_entropy");
  require(c.entropy != KVC_ENTROPY_HUFFMAN || has_codebook, KVC_ERROR_INVALID_ARGUMENT,
          "config->entropy = KVC_ENTROPY_HUFFMAN needs a codebook, but codebook is NULL");

  CodecParams p{};
  p.backend = kvc_backend(c.backend);
  p.is_value = c.kind == KVC_KIND_VALUE;
  p.num_tokens = uint32_t(c.num_tokens);
  p.head_dim = uint32_t(c.head_dim);
  if (p.is_value) {
    const int32_t g = c.value_group_size == 0 ? c.head_dim : c.value_group_size;
    require(g >= 1 && g <= c.head_dim && c.head_dim % g == 0, KVC_ERROR_INVALID_ARGUMENT,
            "config->value_group_size = ", c.value_group_size,
            " must divide head_dim = ", c.head_dim, " (or be 0 for head_dim)");
    p.group_size = uint32_t(g);
  } else {
    require(c.value_group_size == 0, KVC_ERROR_INVALID_ARGUMENT,
            "config->value_group_size = ", c.value_group_size,
            " must be 0 for keys (key groups are channels over the block's tokens)");
    p.group_size = p.num_tokens;
  }
  p.num_groups = p.num_elements() / p.group_size;
  if (c.num_substreams == 0) {
    p.num_substreams = default_substreams(p.group_size);
  } else {
    require(c.num_substreams >= 1 && uint32_t(c.num_substreams) <= p.group_size &&
                p.group_size % uint32_t(c.num_substreams) == 0,
            KVC_ERROR_INVALID_ARGUMENT, "config->num_substreams = ", c.num_substreams,
            " must divide the group size ", p.group_size, " (or be 0 for automatic)");
    p.num_substreams = uint32_t(c.num_substreams);
  }
  p.relative = c.bound_mode == KVC_BOUND_RELATIVE;
  p.error_bound = c.error_bound;
  p.entropy = kvc_entropy(c.entropy);
  require(c.block_format == KVC_BLOCK_FORMAT_V1 || c.block_format == KVC_BLOCK_FORMAT_TILES,
          KVC_ERROR_INVALID_ARGUMENT, "config->block_format = ", c.block_format,
          " is not a kvc_block_format (KVC_BLOCK_FORMAT_V1 = 0, KVC_BLOCK_FORMAT_TILES = 1)");
  require(c.tile_permute_channels == 0 || c.tile_permute_channels == 1, KVC_ERROR_INVALID_ARGUMENT,
          "config->tile_permute_channels = ", c.tile_permute_channels, " must be 0 or 1");
  require(c.tile_split_widths == 0 || c.tile_split_widths == 1, KVC_ERROR_INVALID_ARGUMENT,
          "config->tile_split_widths = ", c.tile_split_widths, " must be 0 or 1");
  p.tiles = c.block_format == KVC_BLOCK_FORMAT_TILES;
  p.split_widths = c.tile_split_widths == 1;
  p.permute_channels = c.tile_permute_channels == 1;
  if (p.tiles) {
    require(tiles::shape_supported(p.num_tokens, p.head_dim), KVC_ERROR_NOT_SUPPORTED,
            "config->block_format = KVC_BLOCK_FORMAT_TILES needs num_tokens a power of two in "
            "[16, 1024] and head_dim a power of two in [16, 256], but they are ",
            p.num_tokens, " and ", p.head_dim);
    require(!p.is_value || p.group_size == p.head_dim, KVC_ERROR_NOT_SUPPORTED,
            "config->block_format = KVC_BLOCK_FORMAT_TILES quantizes values per token over all ",
            "head_dim channels, but config->value_group_size = ", c.value_group_size);
  }
  return p;
}

CodecParams CodecParams::transcoded() const {
  CodecParams v = *this;
  v.tiles = v.permute_channels = v.split_widths = false;
  v.num_substreams = 1;
  v.entropy = KVC_ENTROPY_AUTO;
  return v;
}

size_t CodecParams::max_block_bytes(kvc_dtype dtype) const {
  if (tiles) {
    // All tiles raw and no metadata: the encoder never writes more (docs/format.md, t1).
    const tiles::TileLayout b =
        tiles::make_layout(is_value, num_tokens, head_dim, dtype, false, false, false, 0, 0, 0);
    return b.tiles_offset + size_t(num_elements()) * format::dtype_bytes(dtype);
  }
  return format::kHeaderBytes +
         format::align4(uint32_t(num_elements() * format::dtype_bytes(dtype)));
}

}  // namespace kvc
