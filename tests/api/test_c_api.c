/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The public C API from a plain C99 program: what a C user sees through <kvcomp/kvcomp.h>.
 * Round-trips blocks (histogram -> codebook -> codec -> encode -> decode) and checks the error
 * bound on every element, then the error reporting: status strings, the per-thread last error
 * after a misuse, outputs left untouched on failure, destroy(NULL). Exits nonzero on any failure.
 */
#include <kvcomp/kvcomp.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_failures = 0;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                            \
    }                                                                          \
  } while (0)

/* A call that must succeed; on failure prints the status and the library's message. */
#define CHECK_OK(call)                                                                       \
  do {                                                                                       \
    kvc_status_t check_ok_status_ = (call);                                                  \
    if (check_ok_status_ != KVC_SUCCESS) {                                                   \
      fprintf(stderr, "%s:%d: %s returned %d (%s): %s\n", __FILE__, __LINE__, #call,         \
              (int)check_ok_status_, kvc_status_string(check_ok_status_), kvc_last_error()); \
      ++g_failures;                                                                          \
    }                                                                                        \
  } while (0)

/* ---- fp16 helpers (round to nearest even), enough for exactly representable test data ---- */

static uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_float(sign | 0x7F800000u | (mant << 13));
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  return (sign ? -1.0f : 1.0f) * (float)ldexp((double)mant, -24);
}

/* Only for finite values well inside the fp16 range, which is all this test makes. */
static uint16_t float_to_half(float f) {
  const uint16_t sign = (uint16_t)((float_bits(f) >> 16) & 0x8000u);
  const double a = fabs((double)f);
  int e;
  double scaled;
  if (a < ldexp(1.0, -14)) {
    scaled = a * ldexp(1.0, 24); /* subnormal: units of 2^-24 */
    return (uint16_t)(sign | (uint16_t)nearbyint(scaled));
  }
  frexp(a, &e);              /* a = m * 2^e, m in [0.5, 1) */
  scaled = ldexp(a, 11 - e); /* 11 significant bits, in [1024, 2048) */
  {
    double m = nearbyint(scaled); /* the current rounding mode: to nearest even */
    int exp = e - 1 + 15;
    if (m >= 2048.0) {
      m /= 2.0;
      ++exp;
    }
    return (uint16_t)(sign | (uint16_t)(exp << 10) | ((uint16_t)m & 0x3FFu));
  }
}

/* Half the spacing of fp16 values around y: what the final rounding to fp16 may add. */
static double half_ulp16(float y) {
  const double a = fabs((double)y);
  int e;
  if (a < ldexp(1.0, -14)) return ldexp(1.0, -25);
  frexp(a, &e);
  return ldexp(1.0, e - 1 - 10 - 1);
}

/* ---- Test data ------------------------------------------------------------------------- */

static uint32_t g_rng = 12345u;

static float next_uniform(void) { /* in [0, 1) */
  g_rng = g_rng * 1664525u + 1013904223u;
  return (float)(g_rng >> 8) / 16777216.0f;
}

enum { kNumTokens = 64, kHeadDim = 128, kKvHeads = 3, kValueGroup = 32 };

/* A cache [kNumTokens, kKvHeads, kHeadDim]; head h is block h. Keys get outlier channels,
 * as real keys do; head 2 holds constant channels (keys) or constant rows (values) in part. */
static void fill_cache(float* cache, int kind, int dtype) {
  int t, h, c;
  for (t = 0; t < kNumTokens; ++t) {
    for (h = 0; h < kKvHeads; ++h) {
      for (c = 0; c < kHeadDim; ++c) {
        const float scale = (kind == KVC_KIND_KEY && c % 17 == 0) ? 8.0f : 1.0f;
        float x = scale * (next_uniform() + next_uniform() + next_uniform() - 1.5f);
        if (h == 2 && (kind == KVC_KIND_KEY ? c % 5 == 0 : t % 7 == 0)) x = 0.25f * (float)(c % 3);
        if (dtype == KVC_DTYPE_FP16) x = half_to_float(float_to_half(x));
        cache[((size_t)t * kKvHeads + (size_t)h) * kHeadDim + (size_t)c] = x;
      }
    }
  }
}

/* The bound of element (t, c) of a block, as docs/format.md defines it: absolute, or relative
 * to the range of the element's group (keys: channel c over the block's tokens; values: token t
 * and the channel segment holding c), computed in float as the library does. */
static float element_bound(const float* block, int64_t stride, int kind, int bound_mode,
                           float error_bound, int t, int c) {
  float lo, hi;
  int i;
  if (bound_mode == KVC_BOUND_ABSOLUTE) return error_bound;
  if (kind == KVC_KIND_KEY) {
    lo = hi = block[c];
    for (i = 0; i < kNumTokens; ++i) {
      const float x = block[i * stride + c];
      lo = x < lo ? x : lo;
      hi = x > hi ? x : hi;
    }
  } else {
    const int first = c / kValueGroup * kValueGroup;
    lo = hi = block[t * stride + first];
    for (i = first; i < first + kValueGroup; ++i) {
      const float x = block[t * stride + i];
      lo = x < lo ? x : lo;
      hi = x > hi ? x : hi;
    }
  }
  return error_bound * (hi - lo);
}

/* ---- Round trips ----------------------------------------------------------------------- */

typedef struct {
  int kind;
  int bound_mode;
  float error_bound;
  int src_dtype; /* FP32 or FP16 */
  int use_codebook;
} round_trip_case;

static void round_trip(const round_trip_case* rc) {
  static float cache[kNumTokens * kKvHeads * kHeadDim];
  static uint16_t cache16[kNumTokens * kKvHeads * kHeadDim];
  static float out32[kNumTokens * kKvHeads * kHeadDim];
  static uint16_t out16[kNumTokens * kKvHeads * kHeadDim];
  const int64_t stride = kKvHeads * kHeadDim;
  const int failures_before = g_failures;
  kvc_codec_config config = KVC_CODEC_CONFIG_INIT;
  kvc_codec_t plain = NULL, codec = NULL;
  kvc_histogram_t histogram = NULL;
  kvc_codebook_t codebook = NULL;
  uint32_t codebook_id = 0;
  const void* src[kKvHeads];
  void* dst[kKvHeads];
  const void* enc_src[kKvHeads];
  void* dec_dst[kKvHeads];
  uint32_t block_bytes[kKvHeads];
  kvc_status_t block_status[kKvHeads];
  size_t max_bytes = 0;
  int h, t, c, out;

  fill_cache(cache, rc->kind, rc->src_dtype);
  for (h = 0; h < kNumTokens * kKvHeads * kHeadDim; ++h) cache16[h] = float_to_half(cache[h]);
  for (h = 0; h < kKvHeads; ++h) {
    src[h] = rc->src_dtype == KVC_DTYPE_FP16 ? (const void*)(cache16 + h * kHeadDim)
                                             : (const void*)(cache + h * kHeadDim);
  }

  config.kind = rc->kind;
  config.num_tokens = kNumTokens;
  config.head_dim = kHeadDim;
  config.value_group_size = rc->kind == KVC_KIND_VALUE ? kValueGroup : 0;
  config.bound_mode = rc->bound_mode;
  config.error_bound = rc->error_bound;
  config.entropy = KVC_ENTROPY_FIXED;
  CHECK_OK(kvc_codec_create(&config, NULL, &plain));
  if (plain == NULL) return;

  if (rc->use_codebook) {
    /* The prefill's histogram gives the codebook every later block is coded with. */
    uint64_t total = 0;
    CHECK_OK(kvc_histogram_create(&histogram));
    CHECK_OK(kvc_codec_histogram(plain, kKvHeads, src, stride, (kvc_dtype)rc->src_dtype, histogram,
                                 NULL));
    CHECK_OK(kvc_histogram_total(histogram, &total));
    CHECK(total > 0);
    CHECK_OK(kvc_codebook_build(histogram, NULL, &codebook));
    CHECK_OK(kvc_histogram_destroy(histogram));
    if (codebook == NULL) {
      kvc_codec_destroy(plain);
      return;
    }
    CHECK_OK(kvc_codebook_id(codebook, &codebook_id));
    config.entropy = KVC_ENTROPY_HUFFMAN;
    CHECK_OK(kvc_codec_create(&config, codebook, &codec));
    /* The codec keeps its own reference. */
    CHECK_OK(kvc_codebook_destroy(codebook));
  } else {
    codec = plain;
    plain = NULL;
  }
  if (codec == NULL) {
    kvc_codec_destroy(plain);
    return;
  }

  CHECK_OK(kvc_codec_max_block_bytes(codec, (kvc_dtype)rc->src_dtype, &max_bytes));
  CHECK(max_bytes % 4 == 0);
  for (h = 0; h < kKvHeads; ++h) {
    dst[h] = malloc(max_bytes);
    CHECK(dst[h] != NULL);
    if (dst[h] == NULL) return;
    block_bytes[h] = 0;
  }
  CHECK_OK(kvc_codec_encode(codec, kKvHeads, src, stride, (kvc_dtype)rc->src_dtype, dst, max_bytes,
                            block_bytes, NULL));

  for (h = 0; h < kKvHeads; ++h) {
    kvc_block_info info = KVC_BLOCK_INFO_INIT;
    CHECK(block_bytes[h] >= 32 && block_bytes[h] <= max_bytes && block_bytes[h] % 4 == 0);
    CHECK_OK(kvc_block_inspect(dst[h], block_bytes[h], &info));
    CHECK(info.format_version == KVC_FORMAT_VERSION);
    CHECK(info.block_bytes == block_bytes[h]);
    CHECK(info.kind == rc->kind);
    CHECK(info.num_tokens == kNumTokens && info.head_dim == kHeadDim);
    if (rc->use_codebook) {
      CHECK(info.encoding == KVC_ENCODING_HUFFMAN);
      CHECK(info.codebook_id == codebook_id);
    } else {
      CHECK(info.encoding == KVC_ENCODING_FIXED);
    }
    enc_src[h] = dst[h];
  }

  for (out = 0; out < 2; ++out) {
    const kvc_dtype out_dtype = out == 0 ? KVC_DTYPE_FP32 : KVC_DTYPE_FP16;
    for (h = 0; h < kKvHeads; ++h) {
      dec_dst[h] = out == 0 ? (void*)(out32 + h * kHeadDim) : (void*)(out16 + h * kHeadDim);
      block_status[h] = KVC_ERROR_INTERNAL;
    }
    CHECK_OK(kvc_codec_decode(codec, kKvHeads, enc_src, block_bytes, out_dtype, dec_dst, stride,
                              block_status, NULL));
    for (h = 0; h < kKvHeads; ++h) {
      int bad = 0;
      CHECK(block_status[h] == KVC_SUCCESS);
      for (t = 0; t < kNumTokens; ++t) {
        for (c = 0; c < kHeadDim; ++c) {
          const size_t at = (size_t)t * (size_t)stride + (size_t)(h * kHeadDim + c);
          const double x = cache[at];
          const double y = out == 0 ? (double)out32[at] : (double)half_to_float(out16[at]);
          double allowed = element_bound(cache + h * kHeadDim, stride, rc->kind, rc->bound_mode,
                                         rc->error_bound, t, c);
          if (out == 1) allowed += half_ulp16((float)y); /* the final rounding to fp16 */
          if (!(fabs(x - y) <= allowed)) {
            if (bad++ < 5) {
              fprintf(stderr,
                      "bound violated: kind %d mode %d eb %g src %d codebook %d out %d block %d "
                      "token %d channel %d: x %.9g x_hat %.9g |diff| %.9g > %.9g\n",
                      rc->kind, rc->bound_mode, (double)rc->error_bound, rc->src_dtype,
                      rc->use_codebook, (int)out_dtype, h, t, c, x, y, fabs(x - y), allowed);
            }
          }
        }
      }
      CHECK(bad == 0);
    }
  }

  /* A truncated block is a data error, not a crash; a block of the other kind is refused. */
  {
    uint32_t short_bytes = block_bytes[0] - 4;
    kvc_status_t st = kvc_codec_decode(codec, 1, enc_src, &short_bytes, KVC_DTYPE_FP32, dec_dst,
                                       stride, NULL, NULL);
    CHECK(st >= 200 && st < 300);
    CHECK(strlen(kvc_last_error()) > 0);
  }
  {
    kvc_codec_config other = config;
    kvc_codec_t other_codec = NULL;
    kvc_status_t st;
    other.kind = rc->kind == KVC_KIND_KEY ? KVC_KIND_VALUE : KVC_KIND_KEY;
    other.value_group_size = other.kind == KVC_KIND_VALUE ? kValueGroup : 0;
    other.entropy = KVC_ENTROPY_FIXED;
    CHECK_OK(kvc_codec_create(&other, NULL, &other_codec));
    st = kvc_codec_decode(other_codec, 1, enc_src, block_bytes, KVC_DTYPE_FP32, dec_dst, stride,
                          NULL, NULL);
    CHECK(st == KVC_ERROR_CONFIG_MISMATCH);
    CHECK_OK(kvc_codec_destroy(other_codec));
  }

  for (h = 0; h < kKvHeads; ++h) free(dst[h]);
  CHECK_OK(kvc_codec_destroy(codec));
  CHECK_OK(kvc_codec_destroy(plain));
  if (g_failures != failures_before) {
    fprintf(stderr, "round trip failed: kind %d bound mode %d eb %g src dtype %d codebook %d\n",
            rc->kind, rc->bound_mode, (double)rc->error_bound, rc->src_dtype, rc->use_codebook);
  }
}

/* ---- Versions, statuses and errors ------------------------------------------------------ */

static void test_versions(void) {
  char expected[32];
  CHECK(kvc_version_number() == KVC_VERSION_NUMBER);
  sprintf(expected, "%d.%d.%d", KVC_VERSION_MAJOR, KVC_VERSION_MINOR, KVC_VERSION_PATCH);
  CHECK(kvc_version_string() != NULL && strcmp(kvc_version_string(), expected) == 0);
}

static void test_status_strings(void) {
  static const kvc_status_t known[] = {
      KVC_SUCCESS,
      KVC_ERROR_INVALID_ARGUMENT,
      KVC_ERROR_NULL_POINTER,
      KVC_ERROR_BUFFER_TOO_SMALL,
      KVC_ERROR_ABI_MISMATCH,
      KVC_ERROR_NOT_SUPPORTED,
      KVC_ERROR_NONFINITE_INPUT,
      KVC_ERROR_CORRUPT_DATA,
      KVC_ERROR_CODEBOOK_MISMATCH,
      KVC_ERROR_FORMAT_VERSION,
      KVC_ERROR_CONFIG_MISMATCH,
      KVC_ERROR_OUT_OF_MEMORY,
      KVC_ERROR_CUDA,
      KVC_ERROR_NO_DEVICE,
      KVC_ERROR_INTERNAL,
  };
  size_t i, j;
  for (i = 0; i < sizeof known / sizeof known[0]; ++i) {
    const char* s = kvc_status_string(known[i]);
    CHECK(s != NULL && s[0] != '\0' && strcmp(s, "unknown status") != 0);
    for (j = 0; j < i; ++j) CHECK(s != NULL && strcmp(s, kvc_status_string(known[j])) != 0);
  }
  CHECK(strcmp(kvc_status_string((kvc_status_t)12345), "unknown status") == 0);
  CHECK(strcmp(kvc_status_string((kvc_status_t)-1), "unknown status") == 0);
}

static void test_errors(void) {
  kvc_codec_config config = KVC_CODEC_CONFIG_INIT;
  kvc_codec_t codec = NULL;
  kvc_codec_t untouched = (kvc_codec_t)&config; /* a sentinel, never dereferenced */
  kvc_histogram_t histogram = NULL;
  kvc_status_t st;

  kvc_clear_last_error();
  CHECK(kvc_last_error() != NULL && kvc_last_error()[0] == '\0');

  /* A NULL output pointer: NULL_POINTER, and the message names the function. */
  st = kvc_histogram_create(NULL);
  CHECK(st == KVC_ERROR_NULL_POINTER);
  CHECK(strstr(kvc_last_error(), "kvc_histogram_create") != NULL);
  kvc_clear_last_error();
  CHECK(kvc_last_error()[0] == '\0');

  /* A struct from another ABI: refused, the output handle left as it was. */
  config.struct_size = sizeof(config) + 4;
  st = kvc_codec_create(&config, NULL, &untouched);
  CHECK(st == KVC_ERROR_ABI_MISMATCH);
  CHECK(untouched == (kvc_codec_t)&config);
  CHECK(strlen(kvc_last_error()) > 0);
  config.struct_size = sizeof(config);

  /* Out-of-range values. */
  config.num_tokens = 0;
  st = kvc_codec_create(&config, NULL, &untouched);
  CHECK(st == KVC_ERROR_INVALID_ARGUMENT);
  CHECK(untouched == (kvc_codec_t)&config);
  CHECK(strstr(kvc_last_error(), "num_tokens") != NULL);
  config.num_tokens = 64;
  config.entropy = KVC_ENTROPY_HUFFMAN; /* needs a codebook */
  CHECK(kvc_codec_create(&config, NULL, &untouched) == KVC_ERROR_INVALID_ARGUMENT);
  config.entropy = KVC_ENTROPY_AUTO;

  /* A success leaves the last error of the thread alone. */
  CHECK_OK(kvc_codec_create(&config, NULL, &codec));
  CHECK(strlen(kvc_last_error()) > 0);

  if (codec != NULL) {
    static float block[64 * 128];
    static uint32_t dst_storage[(32 + 64 * 128 * 4) / 4];
    const void* src = block;
    void* dst = dst_storage;
    uint32_t bytes = 777u;
    size_t max_bytes = 0;
    int i;
    for (i = 0; i < 64 * 128; ++i) block[i] = (float)(i % 13) * 0.125f;
    CHECK_OK(kvc_codec_max_block_bytes(codec, KVC_DTYPE_FP32, &max_bytes));
    CHECK(max_bytes <= sizeof dst_storage);

    /* Non-finite input: refused before anything is written. */
    block[1000] = (float)NAN;
    st = kvc_codec_encode(codec, 1, &src, 128, KVC_DTYPE_FP32, &dst, max_bytes, &bytes, NULL);
    CHECK(st == KVC_ERROR_NONFINITE_INPUT);
    CHECK(bytes == 777u);
    block[1000] = 0.0f;

    /* A stride below head_dim, a NULL block pointer, a stream on the CPU backend. */
    CHECK(kvc_codec_encode(codec, 1, &src, 127, KVC_DTYPE_FP32, &dst, max_bytes, &bytes, NULL) ==
          KVC_ERROR_INVALID_ARGUMENT);
    CHECK(kvc_codec_encode(codec, 1, NULL, 128, KVC_DTYPE_FP32, &dst, max_bytes, &bytes, NULL) ==
          KVC_ERROR_NULL_POINTER);
    CHECK(kvc_codec_encode(codec, 1, &src, 128, KVC_DTYPE_FP32, &dst, max_bytes, &bytes,
                           (void*)&bytes) != KVC_SUCCESS);
    CHECK(bytes == 777u);
    CHECK(kvc_codec_decode(NULL, 1, &src, &bytes, KVC_DTYPE_FP32, &dst, 128, NULL, NULL) ==
          KVC_ERROR_NULL_POINTER);

    /* Zero blocks is a valid no-op. */
    CHECK_OK(kvc_codec_encode(codec, 0, NULL, 128, KVC_DTYPE_FP32, NULL, 0, NULL, NULL));

    /* Garbage is corrupt data, with a message. */
    {
      static uint32_t garbage[64];
      const void* gsrc = garbage;
      void* gdst = block;
      const uint32_t gbytes = sizeof garbage;
      kvc_status_t block_st = KVC_SUCCESS;
      kvc_block_info info = KVC_BLOCK_INFO_INIT;
      for (i = 0; i < 64; ++i) garbage[i] = 0x9E3779B9u * (uint32_t)(i + 1);
      kvc_clear_last_error();
      st = kvc_codec_decode(codec, 1, &gsrc, &gbytes, KVC_DTYPE_FP32, &gdst, 128, &block_st, NULL);
      CHECK(st == KVC_ERROR_CORRUPT_DATA && block_st == st);
      CHECK(strlen(kvc_last_error()) > 0);
      info.num_tokens = 4242;
      CHECK(kvc_block_inspect(garbage, sizeof garbage, &info) == KVC_ERROR_CORRUPT_DATA);
      CHECK(info.num_tokens == 4242);
    }
    CHECK_OK(kvc_codec_destroy(codec));
  }

  /* Codebooks: serialization round trip and an undersized buffer. */
  CHECK_OK(kvc_histogram_create(&histogram));
  if (histogram != NULL) {
    static const uint64_t counts[9] = {1, 4, 20, 90, 400, 85, 22, 5, 1};
    kvc_codebook_t book = NULL, copy = NULL;
    unsigned char bytes[4096];
    size_t size = 0, written = 0;
    uint32_t id = 0, copy_id = 1;
    int32_t length = -1;
    CHECK(kvc_histogram_add_counts(histogram, -4, 9, NULL) == KVC_ERROR_NULL_POINTER);
    CHECK_OK(kvc_histogram_add_counts(histogram, -4, 9, counts));
    CHECK_OK(kvc_codebook_build(histogram, NULL, &book));
    if (book != NULL) {
      CHECK_OK(kvc_codebook_code_length(book, 0, &length));
      CHECK(length >= 1 && length <= KVC_MAX_CODE_LENGTH);
      CHECK_OK(kvc_codebook_code_length(book, 100000, &length));
      CHECK(length == 0);
      CHECK_OK(kvc_codebook_serialized_size(book, &size));
      CHECK(size > 0 && size <= sizeof bytes);
      written = 12345;
      CHECK(kvc_codebook_serialize(book, bytes, size - 1, &written) == KVC_ERROR_BUFFER_TOO_SMALL);
      CHECK(written == 12345);
      CHECK_OK(kvc_codebook_serialize(book, bytes, sizeof bytes, &written));
      CHECK(written == size);
      CHECK_OK(kvc_codebook_deserialize(bytes, written, &copy));
      CHECK_OK(kvc_codebook_id(book, &id));
      if (copy != NULL) CHECK_OK(kvc_codebook_id(copy, &copy_id));
      CHECK(id == copy_id);
      bytes[written / 2] ^= 0x40u;
      CHECK(kvc_codebook_deserialize(bytes, written, &copy) == KVC_ERROR_CORRUPT_DATA);
      CHECK_OK(kvc_codebook_destroy(copy));
      CHECK_OK(kvc_codebook_destroy(book));
    }
    CHECK_OK(kvc_histogram_destroy(histogram));
  }

  /* destroy(NULL) is a no-op. */
  CHECK(kvc_histogram_destroy(NULL) == KVC_SUCCESS);
  CHECK(kvc_codebook_destroy(NULL) == KVC_SUCCESS);
  CHECK(kvc_codec_destroy(NULL) == KVC_SUCCESS);
}

/* The store's per-layer bounds from C: NULL by default; a bad scale refused naming it; a store of
 * valid scales holds each layer within its own bound (layer 0's K bound 0.5 * 0.02, layer 1's
 * 4 * 0.02), and the looser layer's blocks are smaller. */
static void test_store_layer_scales(void) {
  enum { L = 2, T = 16, D = 32, N = 2 * T };
  static const float bad[L] = {1.0f, -1.0f};
  static const float scales[L] = {0.5f, 4.0f};
  kvc_store_config config = KVC_STORE_CONFIG_INIT;
  kvc_store_t store = NULL;
  kvc_store_stats stats[L];
  uint16_t keys[L * N * D], values[L * N * D];
  float back_k[N * D], back_v[N * D];
  int32_t id = -1, l, i;
  CHECK(config.key_layer_scales == NULL && config.value_layer_scales == NULL);
  config.num_layers = L;
  config.head_dim = D;
  config.block_tokens = T;
  config.key_bound_mode = KVC_BOUND_ABSOLUTE;
  config.key_error_bound = 0.02f;
  config.entropy = KVC_ENTROPY_FIXED;
  config.block_format = KVC_BLOCK_FORMAT_V1;
  config.key_layer_scales = bad;
  CHECK(kvc_store_create(&config, &store) == KVC_ERROR_INVALID_ARGUMENT && store == NULL);
  CHECK(strstr(kvc_last_error(), "key_layer_scales[1]") != NULL);
  config.key_layer_scales = scales;
  CHECK_OK(kvc_store_create(&config, &store));
  if (store == NULL) return;
  for (i = 0; i < L * N * D; ++i) {
    /* the same rows in both layers */
    keys[i] = float_to_half(4.0f * next_uniform() - 2.0f);
    values[i] = float_to_half(next_uniform());
    if (i >= N * D) {
      keys[i] = keys[i - N * D];
      values[i] = values[i - N * D];
    }
  }
  CHECK_OK(kvc_store_add_sequence(store, &id));
  for (l = 0; l < L; ++l) {
    kvc_store_stats st = KVC_STORE_STATS_INIT;
    CHECK_OK(kvc_store_prefill(store, id, l, 1, N, keys + l * N * D, values + l * N * D, NULL));
    CHECK_OK(kvc_store_get_stats(store, &st));
    stats[l] = st;
    CHECK_OK(kvc_store_read(store, id, l, KVC_DTYPE_FP32, N, back_k, back_v, NULL));
    for (i = 0; i < N * D; ++i) {
      CHECK(fabsf(back_k[i] - half_to_float(keys[l * N * D + i])) <= 0.02f * scales[l]);
    }
  }
  /* block_bytes after layer 0, then after both: the tighter layer 0 took more */
  CHECK(stats[0].block_bytes > stats[1].block_bytes - stats[0].block_bytes);
  kvc_store_destroy(store);
}

int main(void) {
  static const int kinds[2] = {KVC_KIND_KEY, KVC_KIND_VALUE};
  int k, m, d, cb;
  test_versions();
  test_status_strings();
  test_errors();
  test_store_layer_scales();
  for (k = 0; k < 2; ++k) {
    for (m = 0; m < 2; ++m) {
      for (d = 0; d < 2; ++d) {
        for (cb = 0; cb < 2; ++cb) {
          round_trip_case rc;
          rc.kind = kinds[k];
          rc.bound_mode = m == 0 ? KVC_BOUND_ABSOLUTE : KVC_BOUND_RELATIVE;
          rc.error_bound = m == 0 ? 0.02f : 0.05f;
          rc.src_dtype = d == 0 ? KVC_DTYPE_FP32 : KVC_DTYPE_FP16;
          rc.use_codebook = cb;
          round_trip(&rc);
        }
      }
    }
  }
  if (g_failures != 0) {
    fprintf(stderr, "test_c_api: %d check(s) failed\n", g_failures);
    return 1;
  }
  printf("test_c_api: all checks passed (kvcomp %s)\n", kvc_version_string());
  return 0;
}
