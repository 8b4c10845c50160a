// SPDX-License-Identifier: Apache-2.0
// Host side of GPU decode attention: the split schedule, shared-memory sizing, dispatch on
// dtype, head_dim and group size, and the launches (no synchronisation, no allocation).
#include <cuda_runtime.h>

#include <algorithm>

#include "core/error.hpp"
#include "cuda/cuda_attention.hpp"
#include "cuda/device_book.hpp"
#include "cuda/launch.hpp"
#include "kernels/attention/attention.cuh"
#include "kernels/attention/tile_attention.cuh"

namespace kvc::cuda {
namespace k = kvc::kernels;

namespace {

// dtype x head_dim x group bucket -> a kernel instantiation.
template <class F>
void dispatch_shape(const AttentionShape& s, F&& f) {
  dispatch<kvc_dtype, KVC_DTYPE_FP16, KVC_DTYPE_BF16>(s.dtype, "dtype", [&](auto dt) {
    dispatch<uint32_t, 64u, 128u, 256u>(s.head_dim, "head_dim", [&](auto d) {
      dispatch<uint32_t, 4u, 16u>(s.group <= 4 ? 4u : 16u, "group", [&](auto g) { f(dt, d, g); });
    });
  });
}

int multiprocessors() {
  int count = 0;
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, current_device()),
             "cudaDeviceGetAttribute");
  return count;
}

// Splits so that about four thread blocks per multiprocessor are in flight, each split a whole
// number of units.
AttentionPlan make_plan(const AttentionShape& s, uint32_t max_units, int sms = multiprocessors()) {
  require(s.group >= 1 && s.group <= 16, KVC_ERROR_NOT_SUPPORTED, "GQA group ", s.group,
          " is out of the kernels' range [1, 16]");
  const uint64_t want = uint64_t(sms) * 4;
  const uint64_t per_split_grid = uint64_t(s.kv_heads) * s.num_sequences;
  uint32_t splits = uint32_t(std::clamp<uint64_t>((want + per_split_grid - 1) / per_split_grid, 1,
                                                  std::max(1u, max_units)));
  // No split of the longest sequence empty.
  const uint32_t per = std::max(1u, (max_units + splits - 1) / splits);
  splits = std::max(1u, (max_units + per - 1) / per);
  const uint64_t parts = uint64_t(splits) * k::kWarps;
  const uint64_t rows = uint64_t(s.num_sequences) * s.kv_heads * s.group * parts;
  return {splits, size_t(rows * (s.head_dim + 2) * sizeof(float))};
}

k::AttentionParams params_for(const AttentionShape& s, const AttentionPlan& plan,
                              uint32_t block_tokens, const void* queries, void* workspace) {
  const uint32_t parts = plan.num_splits * k::kWarps;
  const size_t rows = size_t(s.num_sequences) * s.kv_heads * s.group * parts;
  float* acc = static_cast<float*>(workspace);
  return {s.kv_heads, s.group, block_tokens, parts, s.scale, queries, acc, acc + rows * s.head_dim};
}

void combine(const AttentionShape& s, const k::AttentionParams& P, void* out, cudaStream_t stream) {
  dispatch<kvc_dtype, KVC_DTYPE_FP16, KVC_DTYPE_BF16>(s.dtype, "dtype", [&](auto dt) {
    launch(k::attention_combine_kernel<decltype(dt)::value>,
           dim3(s.kv_heads * s.group, s.num_sequences), s.head_dim, 0, stream, P, s.head_dim, out);
  });
}

}  // namespace

class DeviceCodebooks {
 public:
  std::unique_ptr<DeviceBook> books[2];  // K, V; none where the layer has no codebook
};

void DeviceCodebooksDeleter::operator()(DeviceCodebooks* d) const noexcept { delete d; }

DeviceCodebooksPtr upload_codebooks(const Codebook* key_book, const Codebook* value_book) {
  DeviceCodebooksPtr d(new DeviceCodebooks);
  if (key_book != nullptr) d->books[0] = std::make_unique<DeviceBook>(*key_book);
  if (value_book != nullptr) d->books[1] = std::make_unique<DeviceBook>(*value_book);
  return d;
}

namespace {

// The dynamic shared memory of attention_compressed_kernel<., D, G> (its only shared memory):
// the group's queries and each warp's state.
template <uint32_t D, uint32_t G>
size_t compressed_smem_bytes(uint32_t T, uint32_t max_groups) {
  return (D * G + k::kWarps * (k::WarpState<G>::floats(T, D) + 2 * max_groups)) * sizeof(float);
}

}  // namespace

void require_attention_support(const AttentionShape& s, const CodecParams& key,
                               const CodecParams& value) {
  const uint32_t T = key.num_tokens;
  require(T % k::kLanes == 0 && T / k::kLanes <= k::kMaxTokensPerLane &&
              key.num_substreams == k::kLanes && value.num_substreams == k::kLanes &&
              value.group_size % k::kLanes == 0 && key.head_dim == s.head_dim,
          KVC_ERROR_NOT_SUPPORTED,
          "GPU attention needs 32, 64 or 128 tokens per block, 32 sub-streams in K and V "
          "blocks and value groups of a multiple of 32 channels");
  // dtype, head_dim and group have kernels, and the device the shared memory they take (before
  // any launch of the call, which a capture would otherwise keep half made).
  const uint32_t max_groups = std::max(key.num_groups, value.num_groups);
  dispatch_shape(s, [&](auto, auto d, auto g) {
    constexpr uint32_t D = decltype(d)::value;
    const size_t smem = compressed_smem_bytes<D, decltype(g)::value>(T, max_groups);
    const size_t optin = shared_memory_optin();
    require(smem <= optin, KVC_ERROR_NOT_SUPPORTED, "GPU attention over format v1 blocks of ", T,
            " tokens at head_dim ", D, " with GQA group ", s.group, " needs ", smem,
            " bytes of shared memory per thread block; this GPU allows ", optin);
  });
}

AttentionPlan plan_attention(const AttentionShape& s, uint32_t max_units) {
  return make_plan(s, max_units);
}

size_t attention_workspace_bound(const AttentionShape& s, uint32_t max_units) {
  const int sms = multiprocessors();
  size_t bytes = 0;
  for (AttentionShape b = s; b.num_sequences >= 1; --b.num_sequences) {
    bytes = std::max(bytes, make_plan(b, max_units, sms).workspace_bytes);
  }
  return bytes;
}

void attention_compressed(const AttentionShape& s, const AttentionPlan& plan,
                          const CodecParams& key, const CodecParams& value,
                          const DeviceCodebooks& books, const uint8_t* d_pool, size_t page_bytes,
                          const SequenceView* d_sequences, const void* d_queries, void* d_out,
                          void* d_workspace, void* stream) {
  require_attention_support(s, key, value);
  const uint32_t T = key.num_tokens;
  const k::AttentionParams P = params_for(s, plan, T, d_queries, d_workspace);
  const uint32_t max_groups = std::max(key.num_groups, value.num_groups);
  const auto st = static_cast<cudaStream_t>(stream);
  dispatch_shape(s, [&](auto dt, auto d, auto g) {
    constexpr uint32_t D = decltype(d)::value, G = decltype(g)::value;
    const size_t smem = compressed_smem_bytes<D, G>(T, max_groups);
    launch(k::attention_compressed_kernel<decltype(dt)::value, D, G>,
           dim3(plan.num_splits, s.kv_heads, s.num_sequences), k::kWarps * k::kLanes, smem, st, P,
           d_sequences, d_pool, page_bytes, view_of(books.books[0]), view_of(books.books[1]),
           value.group_size, max_groups);
  });
  combine(s, P, d_out, st);
}

namespace {

// Calls f(D, T) (integral constants) for the tile kernel's shape.
template <class F>
void dispatch_tile_shape(uint32_t tokens_per_block, uint32_t head_dim, F&& f) {
  require(tile_attention_covers(tokens_per_block, head_dim), KVC_ERROR_NOT_SUPPORTED,
          "tile attention has kernels for blocks of 64 or 128 tokens at head_dim 64, 128 or 256, "
          "at most 128 * 128 elements; not ",
          tokens_per_block, " tokens at head_dim ", head_dim);
  dispatch<uint32_t, 64u, 128u, 256u>(head_dim, "head_dim", [&](auto d) {
    constexpr uint32_t D = decltype(d)::value;
    dispatch<uint32_t, 64u, 128u>(tokens_per_block, "tokens per tile block", [&](auto t) {
      if constexpr (D * decltype(t)::value <= 128 * 128) f(d, t);
    });
  });
}

// Wide: the largest coded unit, or as much as the device's shared memory leaves two stages per
// warp. Compact: kCompactStageBytes. NOT_SUPPORTED where the device cannot hold the block's
// queries, fragments and two stages per warp of at least 16 bytes.
template <uint32_t D, uint32_t T>
uint32_t stage_bytes_for(TileStaging staging) {
  using Tr = k::TileAttentionTraits<D, T>;
  const size_t optin = shared_memory_optin();
  size_t stage = Tr::kLargestCodedUnit;
  if (staging == TileStaging::kCompact) {
    require(D == 128 && T == 64, KVC_ERROR_NOT_SUPPORTED,
            "compact tile staging exists for 64-token blocks at head_dim 128 only; not ", T,
            " tokens at head_dim ", D);
    stage = k::kCompactStageBytes;
  } else if (optin > Tr::smem_bytes(0)) {
    stage = std::min(stage, (optin - Tr::smem_bytes(0)) / (k::kWarps * Tr::kStages) / 16 * 16);
  }
  require(stage >= 16 && Tr::smem_bytes(stage) <= optin, KVC_ERROR_NOT_SUPPORTED,
          "tile attention at head_dim ", D, " with ", T, "-token blocks needs ",
          Tr::smem_bytes(std::max<size_t>(stage, 16)),
          " bytes of shared memory per thread block; this device allows ", optin);
  return uint32_t(stage);
}

}  // namespace

uint32_t tile_stage_bytes(TileStaging staging, uint32_t tokens_per_block, uint32_t head_dim) {
  uint32_t bytes = 0;
  dispatch_tile_shape(tokens_per_block, head_dim, [&](auto d, auto t) {
    bytes = stage_bytes_for<decltype(d)::value, decltype(t)::value>(staging);
  });
  return bytes;
}

void attention_tiles(const AttentionShape& s, const AttentionPlan& plan, uint32_t tokens_per_block,
                     const uint8_t* d_pool, size_t page_bytes, const SequenceView* d_sequences,
                     const void* d_queries, void* d_out, void* d_workspace, void* stream,
                     TileStaging staging) {
  const k::AttentionParams P = params_for(s, plan, tokens_per_block, d_queries, d_workspace);
  const auto st = static_cast<cudaStream_t>(stream);
  const dim3 grid(plan.num_splits, s.kv_heads, s.num_sequences);
  dispatch<kvc_dtype, KVC_DTYPE_FP16, KVC_DTYPE_BF16>(s.dtype, "dtype", [&](auto dt) {
    dispatch_tile_shape(tokens_per_block, s.head_dim, [&](auto d, auto t) {
      constexpr uint32_t D = decltype(d)::value, T = decltype(t)::value;
      const uint32_t stage = stage_bytes_for<D, T>(staging);
      dispatch<bool, false, true>(k::upper_rows(s.group), "group above 8", [&](auto upper) {
        launch(k::attention_tiles_kernel<decltype(dt)::value, D, T, decltype(upper)::value>, grid,
               k::kWarps * k::kLanes, k::TileAttentionTraits<D, T>::smem_bytes(stage), st, P,
               d_sequences, d_pool, page_bytes, stage);
      });
    });
  });
  combine(s, P, d_out, st);
}

namespace {

// Tokens per unit of the dense kernel, which depends on head_dim.
uint32_t dense_unit_tokens(uint32_t head_dim) {
  uint32_t unit = 0;
  dispatch<uint32_t, 64u, 128u, 256u>(
      head_dim, "head_dim", [&](auto d) { unit = k::DenseMmaTraits<decltype(d)::value>::kUnit; });
  return unit;
}

}  // namespace

AttentionPlan plan_dense_attention(const AttentionShape& s, uint32_t max_tokens) {
  const uint32_t unit = dense_unit_tokens(s.head_dim);
  return make_plan(s, (max_tokens + unit - 1) / unit);
}

void attention_dense(const AttentionShape& s, const AttentionPlan& plan, uint32_t max_tokens,
                     const uint32_t* d_lengths, const void* d_keys, const void* d_values,
                     const void* d_queries, void* d_out, void* d_workspace, void* stream) {
  const k::AttentionParams P =
      params_for(s, plan, dense_unit_tokens(s.head_dim), d_queries, d_workspace);
  const auto st = static_cast<cudaStream_t>(stream);
  dispatch<kvc_dtype, KVC_DTYPE_FP16, KVC_DTYPE_BF16>(s.dtype, "dtype", [&](auto dt) {
    dispatch<uint32_t, 64u, 128u, 256u>(s.head_dim, "head_dim", [&](auto d) {
      constexpr uint32_t D = decltype(d)::value;
      dispatch<bool, false, true>(k::upper_rows(s.group), "group above 8", [&](auto upper) {
        launch(k::attention_dense_kernel<decltype(dt)::value, D, decltype(upper)::value>,
               dim3(plan.num_splits, s.kv_heads, s.num_sequences), k::kWarps * k::kLanes,
               k::DenseMmaTraits<D>::smem_bytes(), st, P, max_tokens, d_lengths, d_keys, d_values);
      });
    });
  });
  combine(s, P, d_out, st);
}

}  // namespace kvc::cuda
