// SPDX-License-Identifier: Apache-2.0
// The codec kernels (kernels/codec/*.cuh, the sources nvcc compiles) run under the host
// emulation, launched as src/cuda/codec.cu launches them, on host memory.
#pragma once

#include "tests/emulation/device_emulation.hpp"  // first: the kernels compile against it
//
#include <vector>

#include "codec/codebook.hpp"
#include "codec/codec_params.hpp"
#include "kernels/codec/decode.cuh"
#include "kernels/codec/encode.cuh"
#include "kernels/codec/histogram.cuh"

namespace kvc::test {

inline kernels::Shape shape_of(const CodecParams& p) {
  return {p.is_value,       p.num_tokens, p.head_dim,    p.group_size,       p.num_groups,
          p.num_substreams, p.relative,   p.error_bound, uint32_t(p.entropy)};
}

// A codebook's device tables (as src/cuda/device_book.hpp uploads them), in host memory.
class EmulatedBook {
 public:
  explicit EmulatedBook(const Codebook* book) {
    if (book == nullptr) return;
    tables_ = book->decode_table();
    const size_t codes_at = tables_.size();
    for (uint32_t i = 0; i <= book->num_symbols(); ++i) {
      tables_.push_back(book->reversed_code(i) | (book->length(i) << 24));
    }
    view_ = {tables_.data(),      tables_.data() + codes_at, book->first_symbol(),
             book->num_symbols(), book->max_code_length(),   book->id()};
  }
  EmulatedBook(const EmulatedBook&) = delete;
  EmulatedBook& operator=(const EmulatedBook&) = delete;
  const kernels::BookView& view() const { return view_; }

 private:
  std::vector<uint32_t> tables_;
  kernels::BookView view_{};
};

template <class F>
void with_dtype(kvc_dtype dtype, F&& f) {
  switch (dtype) {
    case KVC_DTYPE_FP16:
      return f(std::integral_constant<kvc_dtype, KVC_DTYPE_FP16>{});
    case KVC_DTYPE_BF16:
      return f(std::integral_constant<kvc_dtype, KVC_DTYPE_BF16>{});
    default:
      return f(std::integral_constant<kvc_dtype, KVC_DTYPE_FP32>{});
  }
}

inline emu::LaunchResult emulated_encode(const CodecParams& p, const kernels::BookView& book,
                                         const std::vector<const void*>& src, int64_t stride,
                                         kvc_dtype dtype, const std::vector<void*>& dst,
                                         std::vector<uint32_t>& bytes) {
  const kernels::Shape sh = shape_of(p);
  bytes.assign(src.size(), 0xDEADBEEFu);
  emu::LaunchResult r;
  with_dtype(dtype, [&](auto dt) {
    r = emu::launch(kernels::encode_kernel<decltype(dt)::value>, uint32_t(src.size()),
                    kernels::kThreads,
                    kernels::encode_smem_bytes(p.num_elements(), p.num_groups, p.num_substreams),
                    sh, book, src.data(), stride, dst.data(), bytes.data());
  });
  return r;
}

// As codec.cu launches it: `warps` compressed blocks per thread block (0: as many as fit in an
// H100's 227 KiB of shared memory per thread block).
inline emu::LaunchResult emulated_decode(const CodecParams& p, const kernels::BookView& book,
                                         const std::vector<const void*>& src,
                                         const std::vector<uint32_t>& available, kvc_dtype dtype,
                                         const std::vector<void*>& dst, int64_t stride,
                                         std::vector<kvc_status_t>& status, uint32_t warps = 0) {
  const kernels::Shape sh = shape_of(p);
  if (warps == 0) warps = kernels::decode_warps(p.num_groups, 227 * 1024);
  const uint32_t blocks = uint32_t(src.size());
  status.assign(src.size(), kvc_status_t(12345));
  emu::LaunchResult r;
  with_dtype(dtype, [&](auto dt) {
    r = emu::launch(kernels::decode_kernel<decltype(dt)::value>, (blocks + warps - 1) / warps,
                    kernels::kDecodeLanes * warps, warps * kernels::decode_smem_bytes(p.num_groups),
                    sh, book, src.data(), available.data(), dst.data(), stride, status.data(),
                    blocks);
  });
  return r;
}

// counts must be zeroed by the caller (codec.cu clears it with a memset).
inline emu::LaunchResult emulated_histogram(const CodecParams& p,
                                            const std::vector<const void*>& src, int64_t stride,
                                            kvc_dtype dtype, kernels::HistogramCounts* counts) {
  const kernels::Shape sh = shape_of(p);
  emu::LaunchResult r;
  with_dtype(dtype, [&](auto dt) {
    r = emu::launch(kernels::histogram_kernel<decltype(dt)::value>, uint32_t(src.size()),
                    kernels::kThreads, kernels::QuantSmem::bytes(p.num_elements(), p.num_groups),
                    sh, src.data(), stride, counts);
  });
  return r;
}

}  // namespace kvc::test
