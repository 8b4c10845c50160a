/* SPDX-License-Identifier: Apache-2.0 */
/* compress_block: compresses one block of keys (64 tokens x 128 channels) with kvcomp, decodes it
 * and checks the error bound. Plain C99, public API only. */
#include <kvcomp/kvcomp.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                                      \
  do {                                                                                   \
    kvc_status_t s_ = (call);                                                            \
    if (s_ != KVC_SUCCESS) {                                                             \
      fprintf(stderr, "%s: %s\n  %s\n", #call, kvc_status_string(s_), kvc_last_error()); \
      return 1;                                                                          \
    }                                                                                    \
  } while (0)

enum { T = 64, D = 128 }; /* tokens per block, head_dim */

/* Roughly normal noise (mean 0, sd 1) from a fixed-seed LCG: the run is deterministic. */
static float noise(void) {
  static uint32_t state = 12345u;
  float sum = 0.0f;
  for (int i = 0; i < 4; ++i) {
    state = state * 1664525u + 1013904223u;
    sum += (float)(state >> 8) / 16777216.0f;
  }
  return (sum - 2.0f) * 1.7320508f;
}

int main(void) {
  /* Synthetic keys, [T, D] row-major: a per-channel offset plus noise; every 32nd channel is an
   * outlier channel with a large offset and spread, as real keys have. FP32 input keeps the
   * example short; KVC_DTYPE_FP16 and KVC_DTYPE_BF16 inputs work the same way. */
  static float keys[T * D], decoded[T * D];
  for (int c = 0; c < D; ++c) {
    const int outlier = c % 32 == 7;
    const float offset = outlier ? 6.0f : 0.5f * noise(), spread = outlier ? 3.0f : 0.7f;
    for (int t = 0; t < T; ++t) keys[t * D + c] = offset + spread * noise();
  }
  const void* src[1] = {keys};

  /* Keys, |x - x_hat| <= 5% of each channel's range over the block, CPU backend. */
  kvc_codec_config config = KVC_CODEC_CONFIG_INIT;
  config.kind = KVC_KIND_KEY;
  config.num_tokens = T;
  config.head_dim = D;
  config.bound_mode = KVC_BOUND_RELATIVE;
  config.error_bound = 0.05f;

  /* 1. A codebook from the histogram of representative blocks (in an engine: the prefill). */
  kvc_codec_t probe, codec;
  kvc_histogram_t histogram;
  kvc_codebook_t codebook;
  CHECK(kvc_codec_create(&config, NULL, &probe)); /* no codebook yet: fixed width only */
  CHECK(kvc_histogram_create(&histogram));
  CHECK(kvc_codec_histogram(probe, 1, src, D, KVC_DTYPE_FP32, histogram, NULL));
  CHECK(kvc_codebook_build(histogram, NULL, &codebook));

  /* 2. A codec with that codebook; encode into a buffer of the worst-case size. */
  CHECK(kvc_codec_create(&config, codebook, &codec));
  size_t capacity;
  CHECK(kvc_codec_max_block_bytes(codec, KVC_DTYPE_FP32, &capacity));
  void* block = malloc(capacity);
  if (block == NULL) return 1;
  void* dst[1] = {block};
  uint32_t block_bytes;
  CHECK(kvc_codec_encode(codec, 1, src, D, KVC_DTYPE_FP32, dst, capacity, &block_bytes, NULL));

  /* 3. Decode and check every element against its channel's bound. */
  const void* enc[1] = {block};
  void* out[1] = {decoded};
  CHECK(kvc_codec_decode(codec, 1, enc, &block_bytes, KVC_DTYPE_FP32, out, D, NULL, NULL));
  float max_error = 0.0f, worst = 0.0f; /* worst: largest error / bound */
  for (int c = 0; c < D; ++c) {
    float lo = keys[c], hi = keys[c];
    for (int t = 1; t < T; ++t) {
      const float x = keys[t * D + c];
      lo = x < lo ? x : lo;
      hi = x > hi ? x : hi;
    }
    const float bound = config.error_bound * (hi - lo);
    for (int t = 0; t < T; ++t) {
      float e = decoded[t * D + c] - keys[t * D + c];
      e = e < 0.0f ? -e : e;
      max_error = e > max_error ? e : max_error;
      if (e > 0.0f && e / bound > worst) worst = e / bound;
    }
  }

  kvc_block_info info = KVC_BLOCK_INFO_INIT;
  CHECK(kvc_block_inspect(block, block_bytes, &info));
  static const char* const kEncodings[] = {"raw", "fixed width", "Huffman"};
  printf("kvcomp %s: one K block, %d tokens x %d channels\n", kvc_version_string(), T, D);
  printf("  encoded %s: %u bytes, %.2fx smaller than fp16 (%d bytes)\n", kEncodings[info.encoding],
         block_bytes, (double)(T * D * 2) / block_bytes, T * D * 2);
  printf("  max |error| %.4f; largest error / bound %.3f (must be <= 1)\n", max_error, worst);

  kvc_codec_destroy(codec);
  kvc_codec_destroy(probe);
  kvc_codebook_destroy(codebook);
  kvc_histogram_destroy(histogram);
  free(block);
  return worst <= 1.0f ? 0 : 1;
}
