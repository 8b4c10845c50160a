// SPDX-License-Identifier: Apache-2.0
// The paged store on the GPU, as the host library sees it (no CUDA headers). The device state is
// authoritative: pool, free-page stack, per-(sequence, layer) block tables and tails live in
// device memory and the append kernels read lengths from there, so a captured decode step
// replays correctly. The host keeps only what it decides itself: which sequence ids are live,
// codebooks, and scratch sizes. Every method throws kvc::Error.
#pragma once

#include <kvcomp/kvcomp.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "store/store.hpp"

namespace kvc::cuda {

class CudaStore {
 public:
  explicit CudaStore(const StoreParams& params);
  ~CudaStore();
  CudaStore(const CudaStore&) = delete;
  CudaStore& operator=(const CudaStore&) = delete;

  int32_t add_sequence();  // waits for the device
  void free_sequence(int32_t id, void* stream);
  void require_live(int32_t id) const;          // KVC_ERROR_UNKNOWN_SEQUENCE otherwise
  uint32_t length(int32_t id, uint32_t layer);  // waits for the device
  size_t num_sequences() const;

  void set_codebook(uint32_t layer, uint32_t kind, std::shared_ptr<const Codebook> book);
  std::shared_ptr<const Codebook> codebook(uint32_t layer, uint32_t kind) const;

  // Device tensors as in the C API; ids distinct and live (checked by the caller).
  void prefill(int32_t id, uint32_t first_layer, uint32_t num_layers, uint32_t num_tokens,
               const void* keys, const void* values, void* stream);
  void append(uint32_t layer, const std::vector<int32_t>& ids, const void* keys, const void* values,
              void* stream);
  void read(int32_t id, uint32_t layer, kvc_dtype dtype, uint32_t capacity_tokens, void* keys,
            void* values, void* stream);
  void attention(uint32_t layer, const std::vector<int32_t>& ids, uint32_t q_heads, float scale,
                 const void* queries, void* out, void* stream);

  StoreStats stats() const;  // no synchronization: the device's last copy-out
  std::vector<uint8_t> serialize(int32_t id);
  // From the block tables, no block copied: not for a store that transcodes (the caller
  // serializes).
  size_t serialized_size(int32_t id);
  int32_t restore(const uint8_t* data, size_t size);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvc::cuda
