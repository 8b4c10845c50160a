// SPDX-License-Identifier: Apache-2.0
// The C ABI's opaque handle types, shared by the src/api translation units.
#pragma once

#include <kvcomp/kvcomp.h>

#include <memory>

#include "codec/codebook.hpp"
#include "codec/codec_params.hpp"
#include "store/store.hpp"
#if defined(KVC_WITH_CUDA)
#include "kernels/codec/cuda_codec.hpp"
#endif

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

struct kvc_store_s {
  kvc::Store store;
};
