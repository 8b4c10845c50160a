// SPDX-License-Identifier: Apache-2.0
// Host side of the CUDA codec: device tables, launch configuration, dtype dispatch, and the
// translation of CUDA errors into kvc::Error.
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "core/error.hpp"
#include "cuda/cuda_codec.hpp"
#include "cuda/device_book.hpp"
#include "cuda/launch.hpp"
#include "kernels/codec/decode.cuh"
#include "kernels/codec/encode.cuh"
#include "kernels/codec/histogram.cuh"
#include "kernels/codec/tile_decode.cuh"
#include "kernels/codec/tile_encode.cuh"

namespace kvc::cuda {
namespace k = kvc::kernels;

namespace {

// Every codec kernel exists for the three element types.
template <class F>
void dispatch_dtype(kvc_dtype dtype, F&& f) {
  dispatch<kvc_dtype, KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32>(dtype, "dtype", f);
}

// The most static shared memory (__shared__ variables) of a kernel's dtype instantiations
// (kernel_of(dt) gives each), as compiled for this device: what a launch needs beside its
// dynamic shared memory.
template <class F>
size_t static_smem_bytes(F&& kernel_of) {
  size_t most = 0;
  for (kvc_dtype dtype : {KVC_DTYPE_FP16, KVC_DTYPE_BF16, KVC_DTYPE_FP32}) {
    dispatch_dtype(dtype, [&](auto dt) {
      cudaFuncAttributes attributes{};
      check_cuda(cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(kernel_of(dt))),
                 "cudaFuncGetAttributes");
      most = std::max(most, attributes.sharedSizeBytes);
    });
  }
  return most;
}

}  // namespace

class DeviceCodec {
 public:
  int device = 0;
  k::Shape shape{};
  bool tiles = false;  // format t1: the tile kernels; else v1
  k::TileShape tile_shape{};
  uint32_t decode_warps = 1;         // compressed blocks per decode thread block
  std::unique_ptr<DeviceBook> book;  // none: fixed width only
  // 512 KiB that only histogram() uses (a prefill-time, synchronous call): made there.
  mutable k::HistogramCounts* d_counts = nullptr;

  ~DeviceCodec() { cudaFree(d_counts); }
};

void DeviceCodecDeleter::operator()(DeviceCodec* d) const noexcept { delete d; }

DeviceCodecPtr create_device_codec(const CodecParams& p, const Codebook* codebook) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    cudaGetLastError();  // clear the sticky "no device" error
    fail(KVC_ERROR_NO_DEVICE, "the CUDA backend needs a GPU, and none is usable");
  }
  int device = 0, smem_limit = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  // Each kernel's dynamic shared memory and its static shared memory beside it (the tile
  // decoder has only static shared memory: its stage, close to the 48 KiB a kernel may declare
  // statically).
  size_t need = 0;
  if (p.tiles) {
    need = k::tile_encode_smem_bytes(p.num_elements(), p.num_groups) +
           static_smem_bytes([](auto dt) { return k::tile_encode_kernel<decltype(dt)::value>; });
  } else {
    const size_t encode =
        k::encode_smem_bytes(p.num_elements(), p.num_groups, p.num_substreams) +
        static_smem_bytes([](auto dt) { return k::encode_kernel<decltype(dt)::value>; });
    const size_t decode = k::decode_smem_bytes(p.num_groups) + static_smem_bytes([](auto dt) {
                            return k::decode_kernel<decltype(dt)::value>;
                          });
    need = std::max(encode, decode);
  }
  require(need <= size_t(smem_limit), KVC_ERROR_NOT_SUPPORTED, "a ", p.num_tokens, "x", p.head_dim,
          p.tiles ? " tile block" : " block", " (groups of ", p.group_size, ") needs ", need,
          " bytes of shared memory per thread block; this GPU allows ", smem_limit);

  DeviceCodecPtr d(new DeviceCodec);
  d->device = device;
  d->decode_warps = k::decode_warps(p.num_groups, size_t(smem_limit));
  d->shape = {p.is_value,       p.num_tokens, p.head_dim,    p.group_size,       p.num_groups,
              p.num_substreams, p.relative,   p.error_bound, uint32_t(p.entropy)};
  d->tiles = p.tiles;
  d->tile_shape = {p.is_value,    p.num_tokens,       p.head_dim,    p.relative,
                   p.error_bound, p.permute_channels, p.split_widths};
  if (codebook != nullptr) d->book = std::make_unique<DeviceBook>(*codebook);
  return d;
}

void require_device_arrays(const DeviceCodec& d, void* stream,
                           std::initializer_list<std::pair<const void*, const char*>> arrays) {
  if (capturing(static_cast<cudaStream_t>(stream))) return;
  for (const auto& [array, name] : arrays) require_device_memory(array, d.device, name);
}

void encode(const DeviceCodec& d, int32_t num_blocks, const void* const* d_src_blocks,
            int64_t src_token_stride, kvc_dtype src_dtype, void* const* d_dst_blocks,
            uint32_t* d_block_bytes, void* stream) {
  require_device(d.device, "the CUDA codec");
  const k::Shape& sh = d.shape;
  if (d.tiles) {
    // One thread block per KV block (kernels/codec/tile_encode.cuh).
    const size_t smem = k::tile_encode_smem_bytes(sh.num_tokens * sh.head_dim, sh.num_groups);
    dispatch_dtype(src_dtype, [&](auto dt) {
      launch(k::tile_encode_kernel<decltype(dt)::value>, dim3(num_blocks), k::kThreads, smem,
             static_cast<cudaStream_t>(stream), d.tile_shape, d_src_blocks, src_token_stride,
             d_dst_blocks, d_block_bytes);
    });
    return;
  }
  const size_t smem =
      k::encode_smem_bytes(sh.num_tokens * sh.head_dim, sh.num_groups, sh.num_substreams);
  dispatch_dtype(src_dtype, [&](auto dt) {
    launch(k::encode_kernel<decltype(dt)::value>, dim3(num_blocks), k::kThreads, smem,
           static_cast<cudaStream_t>(stream), sh, view_of(d.book), d_src_blocks, src_token_stride,
           d_dst_blocks, d_block_bytes);
  });
}

void decode(const DeviceCodec& d, int32_t num_blocks, const void* const* d_src_blocks,
            const uint32_t* d_src_bytes, kvc_dtype dst_dtype, void* const* d_dst_blocks,
            int64_t dst_token_stride, kvc_status_t* d_block_status, void* stream) {
  require_device(d.device, "the CUDA codec");
  const k::Shape& sh = d.shape;
  if (d.tiles) {
    // One thread block per compressed block (kernels/codec/tile_decode.cuh).
    dispatch_dtype(dst_dtype, [&](auto dt) {
      launch(k::tile_decode_kernel<decltype(dt)::value>, dim3(num_blocks), k::kThreads, 0,
             static_cast<cudaStream_t>(stream), d.tile_shape, d_src_blocks, d_src_bytes,
             d_dst_blocks, dst_token_stride, d_block_status);
    });
    return;
  }
  const uint32_t warps = d.decode_warps, blocks = uint32_t(num_blocks);
  dispatch_dtype(dst_dtype, [&](auto dt) {
    launch(k::decode_kernel<decltype(dt)::value>, dim3((blocks + warps - 1) / warps),
           k::kDecodeLanes * warps, warps * k::decode_smem_bytes(sh.num_groups),
           static_cast<cudaStream_t>(stream), sh, view_of(d.book), d_src_blocks, d_src_bytes,
           d_dst_blocks, dst_token_stride, d_block_status, blocks);
  });
}

void histogram(const DeviceCodec& d, int32_t num_blocks, const void* const* d_src_blocks,
               int64_t src_token_stride, kvc_dtype src_dtype, Histogram& histogram, void* stream) {
  require_device(d.device, "the CUDA codec");
  const auto s = static_cast<cudaStream_t>(stream);
  const k::Shape& sh = d.shape;
  if (d.d_counts == nullptr) {
    check_cuda(cudaMalloc(&d.d_counts, sizeof(k::HistogramCounts)), "cudaMalloc (histogram)");
  }
  check_cuda(cudaMemsetAsync(d.d_counts, 0, sizeof(k::HistogramCounts), s), "cudaMemsetAsync");
  dispatch_dtype(src_dtype, [&](auto dt) {
    launch(k::histogram_kernel<decltype(dt)::value>, dim3(num_blocks), k::kThreads,
           k::QuantSmem::bytes(sh.num_tokens * sh.head_dim, sh.num_groups), s, sh, d_src_blocks,
           src_token_stride, d.d_counts);
  });
  std::vector<unsigned long long> host(sizeof(k::HistogramCounts) / 8 + 1);
  check_cuda(cudaMemcpyAsync(host.data(), d.d_counts, sizeof(k::HistogramCounts),
                             cudaMemcpyDeviceToHost, s),
             "cudaMemcpyAsync (histogram)");
  check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize (histogram)");
  const auto* counts = reinterpret_cast<const k::HistogramCounts*>(host.data());
  require(counts->nonfinite == 0, KVC_ERROR_NONFINITE_INPUT,
          "a block holds inf or NaN (inputs must be finite)");
  for (int32_t i = 0; i < 2 * k::kHistogramHalf; ++i) {
    if (counts->bins[i] != 0) histogram.add(i - k::kHistogramHalf, counts->bins[i]);
  }
  histogram.add_unbinned(counts->unbinned);
}

}  // namespace kvc::cuda
