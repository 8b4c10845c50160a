/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Enum arguments out of range, from C: a C caller may pass any int32 through a kvcomp enum type
 * (negative ones included), and the library must reject it with a status and a message without
 * ever holding it as a C++ enum value (that would be undefined behaviour, which the sanitizer
 * build turns into an abort). Exits nonzero on any failure.
 */
#include <kvcomp/kvcomp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int g_failures = 0;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                            \
    }                                                                          \
  } while (0)

/* A rejected call: the status expected and a non-empty last error. */
static void expect_rejected(kvc_status_t got, kvc_status_t want, const char* call, int32_t value) {
  if (got != want || kvc_last_error()[0] == '\0') {
    fprintf(stderr, "%s with %d: status %d (want %d), last error \"%s\"\n", call, (int)value,
            (int)got, (int)want, kvc_last_error());
    ++g_failures;
  }
}

int main(void) {
  static const int32_t kBad[] = {-1, INT32_MIN, 0, 4, 77, INT32_MAX};
  const size_t num_bad = sizeof kBad / sizeof kBad[0];
  size_t i;
  kvc_codec_config cc = KVC_CODEC_CONFIG_INIT;
  kvc_codec_t codec = NULL;
  kvc_store_config sc = KVC_STORE_CONFIG_INIT;
  kvc_store_t store = NULL;
  kvc_histogram_t histogram = NULL;
  kvc_codebook_t book = NULL;
  int32_t id = -1;
  float out[1];
  uint16_t in[64 * 128];
  size_t bytes = 0;
  uint32_t block_bytes = 0;
  uint32_t block[64];
  kvc_status_t block_status[1];
  const void* src[1];
  void* dst[1];

  memset(in, 0, sizeof in);
  src[0] = in;
  dst[0] = block;
  CHECK(kvc_codec_create(&cc, NULL, &codec) == KVC_SUCCESS);
  sc.capacity_bytes = 1 << 20;
  CHECK(kvc_store_create(&sc, &store) == KVC_SUCCESS);
  CHECK(kvc_store_add_sequence(store, &id) == KVC_SUCCESS);
  CHECK(kvc_histogram_create(&histogram) == KVC_SUCCESS);
  CHECK(codec != NULL && store != NULL && histogram != NULL);
  if (codec == NULL || store == NULL || histogram == NULL) return 1;

  for (i = 0; i < num_bad; ++i) {
    const int32_t v = kBad[i];
    const kvc_dtype dtype = (kvc_dtype)v;
    const kvc_kind kind = (kvc_kind)(v == 0 ? 2 : v); /* 0 is KVC_KIND_KEY */
    kvc_clear_last_error();
    expect_rejected(kvc_codec_max_block_bytes(codec, dtype, &bytes), KVC_ERROR_INVALID_ARGUMENT,
                    "kvc_codec_max_block_bytes", v);
    expect_rejected(
        kvc_codec_encode(codec, 1, src, 128, dtype, dst, sizeof block, &block_bytes, NULL),
        KVC_ERROR_INVALID_ARGUMENT, "kvc_codec_encode", v);
    expect_rejected(kvc_codec_decode(codec, 1, (const void* const*)dst, &block_bytes, dtype, dst,
                                     128, block_status, NULL),
                    KVC_ERROR_INVALID_ARGUMENT, "kvc_codec_decode", v);
    expect_rejected(kvc_codec_histogram(codec, 1, src, 128, dtype, histogram, NULL),
                    KVC_ERROR_INVALID_ARGUMENT, "kvc_codec_histogram", v);
    expect_rejected(kvc_store_read(store, id, 0, dtype, 1, out, out, NULL),
                    KVC_ERROR_INVALID_ARGUMENT, "kvc_store_read", v);
    expect_rejected(kvc_store_get_codebook(store, 0, kind, &book), KVC_ERROR_INVALID_ARGUMENT,
                    "kvc_store_get_codebook", v);
    /* Any status, known or not, has a string. */
    CHECK(kvc_status_string((kvc_status_t)v) != NULL);
    CHECK(strlen(kvc_status_string((kvc_status_t)v)) > 0);
  }
  CHECK(strcmp(kvc_status_string((kvc_status_t)-1), "unknown status") == 0);

  kvc_histogram_destroy(histogram);
  kvc_store_destroy(store);
  kvc_codec_destroy(codec);
  if (g_failures) {
    fprintf(stderr, "%d failure(s)\n", g_failures);
    return 1;
  }
  printf("test_c_enums: ok\n");
  return 0;
}
