// SPDX-License-Identifier: Apache-2.0
// The C ABI of the paged store and of decode attention over it.
#include <kvcomp/kvcomp.h>

#include <cmath>
#include <vector>

#include "api/handles.hpp"
#include "core/error.hpp"
#include "core/float_env.hpp"

namespace {

using kvc::require;
using kvc::require_not_null;

kvc::Store& checked(kvc_store_t store) { return require_not_null(store, "store")->store; }

uint32_t checked_layer(const kvc::Store& s, int32_t layer) {
  require(layer >= 0 && uint32_t(layer) < s.params().num_layers, KVC_ERROR_INVALID_ARGUMENT,
          "layer = ", layer, " is out of range [0, ", s.params().num_layers, ")");
  return uint32_t(layer);
}

uint32_t checked_kind(int32_t kind) {
  require(kind == KVC_KIND_KEY || kind == KVC_KIND_VALUE, KVC_ERROR_INVALID_ARGUMENT,
          "kind = ", kind, " is not a kvc_kind");
  return uint32_t(kind);
}

std::vector<int32_t> checked_ids(int32_t num_sequences, const int32_t* ids) {
  require(num_sequences >= 0, KVC_ERROR_INVALID_ARGUMENT, "num_sequences = ", num_sequences,
          " is negative");
  require(num_sequences == 0 || ids != nullptr, KVC_ERROR_NULL_POINTER, "sequence_ids is NULL");
  return std::vector<int32_t>(ids, ids + num_sequences);
}

}  // namespace

extern "C" {

kvc_status_t kvc_store_create(const kvc_store_config* config, kvc_store_t* store) {
  return kvc::api_call(__func__, [&] {
    require_not_null(config, "config");
    require_not_null(store, "store");
    const kvc::StoreParams params = kvc::StoreParams::from_config(*config);
    *store = new kvc_store_s{kvc::Store(params)};
  });
}

kvc_status_t kvc_store_destroy(kvc_store_t store) {
  delete store;
  return KVC_SUCCESS;
}

kvc_status_t kvc_store_set_codebook(kvc_store_t store, int32_t layer, kvc_kind kind,
                                    kvc_codebook_t codebook) {
  return kvc::api_call(__func__, [&] {
    kvc::Store& s = checked(store);
    require_not_null(codebook, "codebook");
    s.set_codebook(checked_layer(s, layer), checked_kind(kind), codebook->book);
  });
}

kvc_status_t kvc_store_get_codebook(kvc_store_t store, int32_t layer, kvc_kind kind,
                                    kvc_codebook_t* codebook) {
  return kvc::api_call(__func__, [&] {
    kvc::Store& s = checked(store);
    require_not_null(codebook, "codebook");
    auto book = s.codebook(checked_layer(s, layer), checked_kind(kind));
    *codebook = book ? new kvc_codebook_s{std::move(book)} : nullptr;
  });
}

kvc_status_t kvc_store_add_sequence(kvc_store_t store, int32_t* sequence_id) {
  return kvc::api_call(__func__, [&] {
    kvc::Store& s = checked(store);
    require_not_null(sequence_id, "sequence_id");
    *sequence_id = s.add_sequence();
  });
}

kvc_status_t kvc_store_free_sequence(kvc_store_t store, int32_t sequence_id) {
  return kvc::api_call(__func__, [&] { checked(store).free_sequence(sequence_id); });
}

kvc_status_t kvc_store_sequence_length(kvc_store_t store, int32_t sequence_id, int32_t layer,
                                       int32_t* num_tokens) {
  return kvc::api_call(__func__, [&] {
    kvc::Store& s = checked(store);
    require_not_null(num_tokens, "num_tokens");
    *num_tokens = int32_t(s.length(sequence_id, checked_layer(s, layer)));
  });
}

kvc_status_t kvc_store_prefill(kvc_store_t store, int32_t sequence_id, int32_t first_layer,
                               int32_t num_layers, int32_t num_tokens, const void* h_keys,
                               const void* h_values) {
  return kvc::api_call(__func__, [&] {
    kvc::Store& s = checked(store);
    const uint32_t first = checked_layer(s, first_layer);
    require(num_layers >= 1 && uint32_t(num_layers) <= s.params().num_layers - first,
            KVC_ERROR_INVALID_ARGUMENT, "num_layers = ", num_layers, " is out of range [1, ",
            s.params().num_layers - first, "] from first_layer = ", first_layer);
    require(num_tokens >= 0, KVC_ERROR_INVALID_ARGUMENT, "num_tokens = ", num_tokens,
            " is negative");
    if (num_tokens == 0) return;
    require_not_null(h_keys, "h_keys");
    require_not_null(h_values, "h_values");
    const kvc::DefaultFloatEnvironment ieee;
    s.prefill(sequence_id, first, uint32_t(num_layers), uint32_t(num_tokens),
              static_cast<const uint8_t*>(h_keys), static_cast<const uint8_t*>(h_values));
  });
}

kvc_status_t kvc_store_append(kvc_store_t store, int32_t layer, int32_t num_sequences,
                              const int32_t* sequence_ids, const void* h_keys, const void* h_values,
                              void* stream) {
  return kvc::api_call(__func__, [&] {
    kvc::Store& s = checked(store);
    const uint32_t l = checked_layer(s, layer);
    const std::vector<int32_t> ids = checked_ids(num_sequences, sequence_ids);
    require(stream == nullptr, KVC_ERROR_INVALID_ARGUMENT,
            "stream must be NULL on the CPU backend");
    if (ids.empty()) return;
    require_not_null(h_keys, "h_keys");
    require_not_null(h_values, "h_values");
    const kvc::DefaultFloatEnvironment ieee;
    s.append(l, ids, static_cast<const uint8_t*>(h_keys), static_cast<const uint8_t*>(h_values));
  });
}

kvc_status_t kvc_store_read(kvc_store_t store, int32_t sequence_id, int32_t layer, kvc_dtype dtype,
                            int32_t capacity_tokens, void* h_keys, void* h_values) {
  return kvc::api_call(__func__, [&] {
    kvc::Store& s = checked(store);
    const uint32_t l = checked_layer(s, layer);
    kvc::require_dtype(dtype, "dtype");
    const uint32_t length = s.length(sequence_id, l);
    require(capacity_tokens >= 0 && uint32_t(capacity_tokens) >= length, KVC_ERROR_BUFFER_TOO_SMALL,
            "capacity_tokens = ", capacity_tokens, " but the sequence holds ", length, " tokens");
    if (length == 0) return;
    require_not_null(h_keys, "h_keys");
    require_not_null(h_values, "h_values");
    const kvc::DefaultFloatEnvironment ieee;
    s.read(sequence_id, l, dtype, h_keys, h_values);
  });
}

kvc_status_t kvc_store_get_stats(kvc_store_t store, kvc_store_stats* stats) {
  return kvc::api_call(__func__, [&] {
    kvc::Store& s = checked(store);
    require_not_null(stats, "stats");
    kvc::check_struct_header(*stats, "stats");
    const kvc::StoreStats st = s.stats();
    kvc_store_stats out = *stats;
    out.num_sequences = int32_t(s.num_sequences());
    out.num_blocks = st.num_blocks;
    out.block_bytes = st.block_bytes;
    out.page_bytes = st.page_bytes;
    out.tail_bytes = st.tail_bytes;
    out.table_bytes = st.table_bytes;
    out.codebook_bytes = st.codebook_bytes;
    out.dense_bytes = st.dense_bytes;
    out.pages_in_use = st.pages_in_use;
    out.pages_total = s.params().num_pages;
    *stats = out;
  });
}

kvc_status_t kvc_store_serialized_size(kvc_store_t store, int32_t sequence_id, size_t* size_bytes) {
  return kvc::api_call(__func__, [&] {
    kvc::Store& s = checked(store);
    require_not_null(size_bytes, "size_bytes");
    *size_bytes = s.serialize(sequence_id).size();
  });
}

kvc_status_t kvc_store_serialize(kvc_store_t store, int32_t sequence_id, void* h_dst,
                                 size_t dst_capacity_bytes, size_t* written_bytes) {
  return kvc::api_call(__func__, [&] {
    kvc::Store& s = checked(store);
    require_not_null(h_dst, "h_dst");
    require_not_null(written_bytes, "written_bytes");
    const std::vector<uint8_t> bytes = s.serialize(sequence_id);
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
    kvc::Store& s = checked(store);
    require_not_null(h_src, "h_src");
    require_not_null(sequence_id, "sequence_id");
    *sequence_id = s.restore(static_cast<const uint8_t*>(h_src), src_bytes);
  });
}

kvc_status_t kvc_store_attention(kvc_store_t store, int32_t layer, int32_t num_sequences,
                                 const int32_t* sequence_ids, int32_t num_q_heads, float scale,
                                 const void* h_queries, void* h_out, void* stream) {
  return kvc::api_call(__func__, [&] {
    kvc::Store& s = checked(store);
    const uint32_t l = checked_layer(s, layer);
    const std::vector<int32_t> ids = checked_ids(num_sequences, sequence_ids);
    const uint32_t heads = s.params().num_heads;
    require(num_q_heads >= int32_t(heads) && num_q_heads % int32_t(heads) == 0 &&
                num_q_heads / int32_t(heads) <= 64,
            KVC_ERROR_INVALID_ARGUMENT, "num_q_heads = ", num_q_heads,
            " must be a multiple (1..64) of num_kv_heads = ", heads);
    require(std::isfinite(scale), KVC_ERROR_INVALID_ARGUMENT, "scale = ", scale, " is not finite");
    require(stream == nullptr, KVC_ERROR_INVALID_ARGUMENT,
            "stream must be NULL on the CPU backend");
    for (int32_t id : ids) s.length(id, l);  // every id is live before any output is written
    if (ids.empty()) return;
    require_not_null(h_queries, "h_queries");
    require_not_null(h_out, "h_out");
    const kvc::DefaultFloatEnvironment ieee;
    s.attention(l, ids, uint32_t(num_q_heads), scale, static_cast<const uint8_t*>(h_queries),
                static_cast<uint8_t*>(h_out));
  });
}

}  // extern "C"
