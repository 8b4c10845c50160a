/* SPDX-License-Identifier: Apache-2.0 */
/* c_enum_calls.c: store calls with their enum arguments as int32 (any value), made from C. */
#pragma once

#include <kvcomp/kvcomp.h>

#ifdef __cplusplus
extern "C" {
#endif

kvc_status_t kvc_fuzz_store_read(kvc_store_t store, int32_t sequence_id, int32_t layer,
                                 int32_t dtype, int32_t capacity_tokens, void* keys, void* values,
                                 void* stream);
kvc_status_t kvc_fuzz_store_set_codebook(kvc_store_t store, int32_t layer, int32_t kind,
                                         kvc_codebook_t codebook);
kvc_status_t kvc_fuzz_store_get_codebook(kvc_store_t store, int32_t layer, int32_t kind,
                                         kvc_codebook_t* codebook);
const char* kvc_fuzz_status_string(int32_t status);

#ifdef __cplusplus
}
#endif
