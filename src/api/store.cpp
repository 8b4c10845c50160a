// SPDX-License-Identifier: Apache-2.0
// The C ABI of the paged store and of decode attention over it: argument checks, then the
// store's backend.
#include <kvcomp/kvcomp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "api/handles.hpp"
#include "core/error.hpp"
#include "core/float_env.hpp"
#include "kernels/common/format.cuh"

namespace {

using kvc::require;
using kvc::require_not_null;

// The store of a call that is not kvc_store_serialized_size or kvc_store_serialize: whatever
// the call, the bytes kvc_store_serialized_size kept may no longer be the sequence's.
kvc_store_s& checked(kvc_store_t store) {
  kvc_store_s& s = *require_not_null(store, "store");
  s.last_written.reset();
  return s;
}

// Calls f with the store's backend (kvc::Store or kvc::cuda::CudaStore), where the two share a
// signature.
template <class F>
decltype(auto) with_backend(kvc_store_s& s, F&& f) {
#if defined(KVC_WITH_CUDA)
  if (s.cuda) return f(*s.cuda);
#endif
  return f(*s.cpu);
}

uint32_t checked_layer(const kvc_store_s& s, int32_t layer) {
  require(layer >= 0 && uint32_t(layer) < s.params.num_layers, KVC_ERROR_INVALID_ARGUMENT,
          "layer = ", layer, " is out of range [0, ", s.params.num_layers, ")");
  return uint32_t(layer);
}

// kind as the integer a C caller passed (kvc::c_enum_value).
uint32_t checked_kind(const kvc_kind& kind) {
  const int32_t v = kvc::c_enum_value(kind);
  require(v == KVC_KIND_KEY || v == KVC_KIND_VALUE, KVC_ERROR_INVALID_ARGUMENT, "kind = ", v,
          " is not a kvc_kind");
  return uint32_t(v);
}

// A data buffer, not NULL and at a multiple of its elements' size: both backends read and write
// it element by element (on the GPU a misaligned access would end the CUDA context).
void require_elements(const void* p, kvc_dtype dtype, const char* name) {
  require_not_null(p, name);
  const uint32_t size = kvc::format::dtype_bytes(dtype);
  require(reinterpret_cast<uintptr_t>(p) % size == 0, KVC_ERROR_INVALID_ARGUMENT, name, " = ", p,
          " is not aligned to its ", size, "-byte elements");
}

void check_stream(const kvc_store_s& s, void* stream) {
  require(s.params.backend == KVC_BACKEND_CUDA || stream == nullptr, KVC_ERROR_INVALID_ARGUMENT,
          "stream must be NULL on the CPU backend");
}

// A batch of live sequence ids, distinct where the call appends.
std::vector<int32_t> checked_ids(kvc_store_s& s, int32_t num_sequences, const int32_t* ids,
                                 bool distinct) {
  require(num_sequences >= 0 && num_sequences <= KVC_STORE_MAX_BATCH, KVC_ERROR_INVALID_ARGUMENT,
          "num_sequences = ", num_sequences,
          " is out of range [0, KVC_STORE_MAX_BATCH = ", KVC_STORE_MAX_BATCH, "]");
  require(num_sequences == 0 || ids != nullptr, KVC_ERROR_NULL_POINTER, "sequence_ids is NULL");
  std::vector<int32_t> batch(ids, ids + num_sequences);
  // The first repeated id, found in O(B log B): this runs on every decode step.
  size_t repeated = batch.size();
  if (distinct) {
    std::vector<int32_t> sorted = batch;
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
      repeated = 1;
      while (std::count(batch.begin(), batch.begin() + long(repeated), batch[repeated]) == 0) {
        ++repeated;
      }
    }
  }
  for (size_t i = 0; i < batch.size(); ++i) {
    require(i != repeated, KVC_ERROR_INVALID_ARGUMENT, "sequence_ids[", i, "] = ", batch[i],
            " appears twice in one step");
    with_backend(s, [&](auto& b) { b.require_live(batch[i]); });
  }
  return batch;
}

}  // namespace

extern "C" {

kvc_status_t kvc_store_create(const kvc_store_config* config, kvc_store_t* store) {
  return kvc::api_call(__func__, [&] {
    require_not_null(config, "config");
    require_not_null(store, "store");
    const kvc::DefaultFloatEnvironment ieee;  // the per-layer bounds are float products
    auto made = std::make_unique<kvc_store_s>();
    made->params = kvc::StoreParams::from_config(*config);
    if (made->params.backend == KVC_BACKEND_CPU) {
      made->cpu = std::make_unique<kvc::Store>(made->params);
    } else {
#if defined(KVC_WITH_CUDA)
      made->cuda = std::make_unique<kvc::cuda::CudaStore>(made->params);
#else
      kvc::no_cuda();
#endif
    }
    *store = made.release();
  });
}

kvc_status_t kvc_store_destroy(kvc_store_t store) {
  delete store;
  return KVC_SUCCESS;
}

kvc_status_t kvc_store_set_codebook(kvc_store_t store, int32_t layer, kvc_kind kind,
                                    kvc_codebook_t codebook) {
  return kvc::api_call(__func__, [&] {
    kvc_store_s& s = checked(store);
    require_not_null(codebook, "codebook");
    const uint32_t l = checked_layer(s, layer), k = checked_kind(kind);
    require(!s.params.tiles(), KVC_ERROR_NOT_SUPPORTED,
            "the store holds tile blocks (format t1), which use no codebooks");
    with_backend(s, [&](auto& b) { b.set_codebook(l, k, codebook->book); });
  });
}

kvc_status_t kvc_store_get_codebook(kvc_store_t store, int32_t layer, kvc_kind kind,
                                    kvc_codebook_t* codebook) {
  return kvc::api_call(__func__, [&] {
    kvc_store_s& s = checked(store);
    require_not_null(codebook, "codebook");
    const uint32_t l = checked_layer(s, layer), k = checked_kind(kind);
    auto book = with_backend(s, [&](auto& b) { return b.codebook(l, k); });
    *codebook = book ? new kvc_codebook_s{std::move(book)} : nullptr;
  });
}

kvc_status_t kvc_store_add_sequence(kvc_store_t store, int32_t* sequence_id) {
  return kvc::api_call(__func__, [&] {
    kvc_store_s& s = checked(store);
    require_not_null(sequence_id, "sequence_id");
    *sequence_id = with_backend(s, [&](auto& b) { return b.add_sequence(); });
  });
}

kvc_status_t kvc_store_free_sequence(kvc_store_t store, int32_t sequence_id, void* stream) {
  return kvc::api_call(__func__, [&] {
    kvc_store_s& s = checked(store);
    check_stream(s, stream);
#if defined(KVC_WITH_CUDA)
    if (s.cuda) return s.cuda->free_sequence(sequence_id, stream);
#endif
    s.cpu->free_sequence(sequence_id);
  });
}

kvc_status_t kvc_store_sequence_length(kvc_store_t store, int32_t sequence_id, int32_t layer,
                                       int32_t* num_tokens) {
  return kvc::api_call(__func__, [&] {
    kvc_store_s& s = checked(store);
    require_not_null(num_tokens, "num_tokens");
    const uint32_t l = checked_layer(s, layer);
    *num_tokens = int32_t(with_backend(s, [&](auto& b) { return b.length(sequence_id, l); }));
  });
}

kvc_status_t kvc_store_prefill(kvc_store_t store, int32_t sequence_id, int32_t first_layer,
                               int32_t num_layers, int32_t num_tokens, const void* keys,
                               const void* values, void* stream) {
  return kvc::api_call(__func__, [&] {
    kvc_store_s& s = checked(store);
    const uint32_t first = checked_layer(s, first_layer);
    require(num_layers >= 1 && uint32_t(num_layers) <= s.params.num_layers - first,
            KVC_ERROR_INVALID_ARGUMENT, "num_layers = ", num_layers, " is out of range [1, ",
            s.params.num_layers - first, "] from first_layer = ", first_layer);
    require(num_tokens >= 0, KVC_ERROR_INVALID_ARGUMENT, "num_tokens = ", num_tokens,
            " is negative");
    check_stream(s, stream);
    if (num_tokens == 0) return;
    require_elements(keys, s.params.dtype, "keys");
    require_elements(values, s.params.dtype, "values");
    with_backend(s, [&](auto& b) { b.require_live(sequence_id); });
#if defined(KVC_WITH_CUDA)
    if (s.cuda) {
      return s.cuda->prefill(sequence_id, first, uint32_t(num_layers), uint32_t(num_tokens), keys,
                             values, stream);
    }
#endif
    const kvc::DefaultFloatEnvironment ieee;
    s.cpu->prefill(sequence_id, first, uint32_t(num_layers), uint32_t(num_tokens),
                   static_cast<const uint8_t*>(keys), static_cast<const uint8_t*>(values));
  });
}

kvc_status_t kvc_store_append(kvc_store_t store, int32_t layer, int32_t num_sequences,
                              const int32_t* sequence_ids, const void* keys, const void* values,
                              void* stream) {
  return kvc::api_call(__func__, [&] {
    kvc_store_s& s = checked(store);
    const uint32_t l = checked_layer(s, layer);
    check_stream(s, stream);
    const std::vector<int32_t> ids = checked_ids(s, num_sequences, sequence_ids, /*distinct=*/true);
    if (ids.empty()) return;
    require_elements(keys, s.params.dtype, "keys");
    require_elements(values, s.params.dtype, "values");
#if defined(KVC_WITH_CUDA)
    if (s.cuda) return s.cuda->append(l, ids, keys, values, stream);
#endif
    const kvc::DefaultFloatEnvironment ieee;
    s.cpu->append(l, ids, static_cast<const uint8_t*>(keys), static_cast<const uint8_t*>(values));
  });
}

kvc_status_t kvc_store_read(kvc_store_t store, int32_t sequence_id, int32_t layer, kvc_dtype dtype,
                            int32_t capacity_tokens, void* keys, void* values, void* stream) {
  return kvc::api_call(__func__, [&] {
    kvc_store_s& s = checked(store);
    const uint32_t l = checked_layer(s, layer);
    const kvc_dtype out_dtype = kvc::checked_dtype(dtype, "dtype");
    check_stream(s, stream);
    const uint32_t length = with_backend(s, [&](auto& b) { return b.length(sequence_id, l); });
    require(capacity_tokens >= 0 && uint32_t(capacity_tokens) >= length, KVC_ERROR_BUFFER_TOO_SMALL,
            "capacity_tokens = ", capacity_tokens, " but the sequence holds ", length, " tokens");
    if (length == 0) return;
    require_elements(keys, out_dtype, "keys");
    require_elements(values, out_dtype, "values");
#if defined(KVC_WITH_CUDA)
    if (s.cuda) return s.cuda->read(sequence_id, l, out_dtype, length, keys, values, stream);
#endif
    const kvc::DefaultFloatEnvironment ieee;
    s.cpu->read(sequence_id, l, out_dtype, keys, values);
  });
}

kvc_status_t kvc_store_get_stats(kvc_store_t store, kvc_store_stats* stats) {
  return kvc::api_call(__func__, [&] {
    kvc_store_s& s = checked(store);
    require_not_null(stats, "stats");
    kvc::check_struct_header(*stats, "stats");
    const kvc::StoreStats st = with_backend(s, [](auto& b) { return b.stats(); });
    kvc_store_stats out = *stats;
    out.num_sequences = int32_t(with_backend(s, [](auto& b) { return b.num_sequences(); }));
    out.num_blocks = st.num_blocks;
    out.block_bytes = st.block_bytes;
    out.page_bytes = st.page_bytes;
    out.tail_bytes = st.tail_bytes;
    out.table_bytes = st.table_bytes;
    out.codebook_bytes = st.codebook_bytes;
    out.dense_bytes = st.dense_bytes;
    out.pages_in_use = st.pages_in_use;
    out.pages_total = s.params.num_pages;
    out.last_append_status = st.last_append_status;
    out.failed_appends = st.failed_appends;
    out.decoded_cache_bytes = st.decoded_cache_bytes;
    *stats = out;
  });
}

kvc_status_t kvc_store_serialized_size(kvc_store_t store, int32_t sequence_id, size_t* size_bytes) {
  return kvc::api_call(__func__, [&] {
    kvc_store_s& s = checked(store);
    require_not_null(size_bytes, "size_bytes");
    if (!s.params.transcodes) {
      *size_bytes = with_backend(s, [&](auto& b) { return b.serialized_size(sequence_id); });
      return;
    }
    std::vector<uint8_t> bytes = with_backend(s, [&](auto& b) { return b.serialize(sequence_id); });
    *size_bytes = bytes.size();
    // A CUDA store can change with no call on it (a captured graph of appends, replayed): it
    // keeps nothing, and kvc_store_serialize writes the sequence again.
    if (s.params.backend == KVC_BACKEND_CPU) {
      s.last_written = kvc_store_s::Written{sequence_id, std::move(bytes)};
    }
  });
}

kvc_status_t kvc_store_serialize(kvc_store_t store, int32_t sequence_id, void* h_dst,
                                 size_t dst_capacity_bytes, size_t* written_bytes) {
  return kvc::api_call(__func__, [&] {
    std::optional<kvc_store_s::Written> kept;
    if (store != nullptr) kept = std::move(store->last_written);
    kvc_store_s& s = checked(store);
    require_not_null(h_dst, "h_dst");
    require_not_null(written_bytes, "written_bytes");
    const std::vector<uint8_t> bytes =
        kept && kept->sequence_id == sequence_id
            ? std::move(kept->bytes)
            : with_backend(s, [&](auto& b) { return b.serialize(sequence_id); });
    require(dst_capacity_bytes >= bytes.size(), KVC_ERROR_BUFFER_TOO_SMALL,
            "dst_capacity_bytes = ", dst_capacity_bytes, " but the sequence needs ", bytes.size(),
            " bytes (kvc_store_serialized_size)");
    std::copy(bytes.begin(), bytes.end(), static_cast<uint8_t*>(h_dst));
    *written_bytes = bytes.size();
  });
}

kvc_status_t kvc_store_restore(kvc_store_t store, const void* h_src, size_t src_bytes,
                               int32_t* sequence_id) {
  return kvc::api_call(__func__, [&] {
    kvc_store_s& s = checked(store);
    require_not_null(h_src, "h_src");
    require_not_null(sequence_id, "sequence_id");
    const kvc::DefaultFloatEnvironment ieee;  // restore decodes every block to validate it
    *sequence_id = with_backend(
        s, [&](auto& b) { return b.restore(static_cast<const uint8_t*>(h_src), src_bytes); });
  });
}

kvc_status_t kvc_store_attention(kvc_store_t store, int32_t layer, int32_t num_sequences,
                                 const int32_t* sequence_ids, int32_t num_q_heads, float scale,
                                 const void* queries, void* out, void* stream) {
  return kvc::api_call(__func__, [&] {
    kvc_store_s& s = checked(store);
    const uint32_t l = checked_layer(s, layer);
    const uint32_t heads = s.params.num_heads;
    require(num_q_heads >= int32_t(heads) && num_q_heads % int32_t(heads) == 0 &&
                num_q_heads / int32_t(heads) <= 64,
            KVC_ERROR_INVALID_ARGUMENT, "num_q_heads = ", num_q_heads,
            " must be a multiple (1..64) of num_kv_heads = ", heads);
    require(std::isfinite(scale), KVC_ERROR_INVALID_ARGUMENT, "scale = ", scale, " is not finite");
    check_stream(s, stream);
    // Every id is live before any output is written.
    const std::vector<int32_t> ids =
        checked_ids(s, num_sequences, sequence_ids, /*distinct=*/false);
    if (ids.empty()) return;
    require_elements(queries, s.params.dtype, "queries");
    require_elements(out, s.params.dtype, "out");
#if defined(KVC_WITH_CUDA)
    if (s.cuda)
      return s.cuda->attention(l, ids, uint32_t(num_q_heads), scale, queries, out, stream);
#endif
    const kvc::DefaultFloatEnvironment ieee;
    s.cpu->attention(l, ids, uint32_t(num_q_heads), scale, static_cast<const uint8_t*>(queries),
                     static_cast<uint8_t*>(out));
  });
}

}  // extern "C"
