/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The store calls that take enum arguments, called from C with any int32 in the enum's place
 * (legal in C, negative values included; in C++ forming such an enum value is not), for the
 * call-sequence fuzzer.
 */
#include "c_enum_calls.h"

kvc_status_t kvc_fuzz_store_read(kvc_store_t store, int32_t sequence_id, int32_t layer,
                                 int32_t dtype, int32_t capacity_tokens, void* keys, void* values,
                                 void* stream) {
  return kvc_store_read(store, sequence_id, layer, (kvc_dtype)dtype, capacity_tokens, keys, values,
                        stream);
}

kvc_status_t kvc_fuzz_store_set_codebook(kvc_store_t store, int32_t layer, int32_t kind,
                                         kvc_codebook_t codebook) {
  return kvc_store_set_codebook(store, layer, (kvc_kind)kind, codebook);
}

kvc_status_t kvc_fuzz_store_get_codebook(kvc_store_t store, int32_t layer, int32_t kind,
                                         kvc_codebook_t* codebook) {
  return kvc_store_get_codebook(store, layer, (kvc_kind)kind, codebook);
}

const char* kvc_fuzz_status_string(int32_t status) {
  return kvc_status_string((kvc_status_t)status);
}
