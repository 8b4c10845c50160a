// SPDX-License-Identifier: Apache-2.0
// The C ABI's opaque handle types, shared by the src/api translation units.
#pragma once

#include <kvcomp/kvcomp.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "codec/codebook.hpp"
#include "codec/codec_params.hpp"
#include "core/error.hpp"
#include "store/store.hpp"
#if defined(KVC_WITH_CUDA)
#include "cuda/cuda_codec.hpp"
#include "cuda/cuda_store.hpp"
#endif

namespace kvc {

#if !defined(KVC_WITH_CUDA)
[[noreturn]] inline void no_cuda() {
  fail(KVC_ERROR_NOT_SUPPORTED,
       "this build of kvcomp has no CUDA backend (it was built without a CUDA compiler)");
}
#endif

}  // namespace kvc

struct kvc_histogram_s {
  kvc::Histogram histogram;
};

struct kvc_codebook_s {
  std::shared_ptr<const kvc::Codebook> book;
};

struct kvc_codec_s {
  kvc::CodecParams params;
  std::shared_ptr<const kvc::Codebook> book;  // may be null
#if defined(KVC_WITH_CUDA)
  kvc::cuda::DeviceCodecPtr device;  // the CUDA backend's tables
#endif
  bool on_cuda() const { return params.backend == KVC_BACKEND_CUDA; }
};

// One of the two backends.
struct kvc_store_s {
  kvc::StoreParams params;
  std::unique_ptr<kvc::Store> cpu;
#if defined(KVC_WITH_CUDA)
  std::unique_ptr<kvc::cuda::CudaStore> cuda;
#endif
  // A CPU store that transcodes its tiles to format v1 on serialize learns a sequence's size
  // only by writing it: kvc_store_serialized_size keeps what it wrote for a kvc_store_serialize
  // of the same sequence that directly follows, and every other call on the store drops it.
  struct Written {
    int32_t sequence_id;
    std::vector<uint8_t> bytes;
  };
  std::optional<Written> last_written;
};
