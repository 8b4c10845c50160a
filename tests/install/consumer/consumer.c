/* SPDX-License-Identifier: Apache-2.0 */
/* A consumer of the installed package: checks the loaded library's version and round-trips one
 * block through the public API, checking the error bound on every element. */
#include <kvcomp/kvcomp.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { kTokens = 64, kHeadDim = 128 };

static int fail(const char* what, kvc_status_t status) {
  fprintf(stderr, "consumer: %s: %s: %s\n", what, kvc_status_string(status), kvc_last_error());
  return 1;
}

int main(void) {
  static float src[kTokens * kHeadDim];
  static float out[kTokens * kHeadDim];
  const float error_bound = 0.01f;
  kvc_codec_config config = KVC_CODEC_CONFIG_INIT;
  kvc_codec_t codec = NULL;
  size_t max_bytes = 0;
  void* block = NULL;
  const void* src_blocks[1];
  void* dst_blocks[1];
  const void* enc_blocks[1];
  uint32_t block_bytes = 0;
  double max_error = 0.0;
  kvc_status_t st;
  int i;

  if (kvc_version_number() != KVC_VERSION_NUMBER) {
    fprintf(stderr, "consumer: header version %d but library %u\n", KVC_VERSION_NUMBER,
            (unsigned)kvc_version_number());
    return 1;
  }
  for (i = 0; i < kTokens * kHeadDim; ++i) src[i] = (float)sin(0.01 * i) * (1.0f + (i % 7));

  config.num_tokens = kTokens;
  config.head_dim = kHeadDim;
  config.bound_mode = KVC_BOUND_ABSOLUTE;
  config.error_bound = error_bound;
  config.entropy = KVC_ENTROPY_FIXED;
  if ((st = kvc_codec_create(&config, NULL, &codec)) != KVC_SUCCESS) return fail("create", st);
  if ((st = kvc_codec_max_block_bytes(codec, KVC_DTYPE_FP32, &max_bytes)) != KVC_SUCCESS) {
    return fail("max_block_bytes", st);
  }
  block = malloc(max_bytes);
  if (block == NULL) return 1;
  src_blocks[0] = src;
  dst_blocks[0] = block;
  st = kvc_codec_encode(codec, 1, src_blocks, kHeadDim, KVC_DTYPE_FP32, dst_blocks, max_bytes,
                        &block_bytes, NULL);
  if (st != KVC_SUCCESS) return fail("encode", st);
  enc_blocks[0] = block;
  dst_blocks[0] = out;
  st = kvc_codec_decode(codec, 1, enc_blocks, &block_bytes, KVC_DTYPE_FP32, dst_blocks, kHeadDim,
                        NULL, NULL);
  if (st != KVC_SUCCESS) return fail("decode", st);
  for (i = 0; i < kTokens * kHeadDim; ++i) {
    const double e = fabs((double)src[i] - (double)out[i]);
    if (e > max_error) max_error = e;
  }
  printf("kvcomp %s: %u -> %u bytes (ratio %.2f), max error %.3g (bound %.3g)\n",
         kvc_version_string(), (unsigned)sizeof src, (unsigned)block_bytes,
         (double)sizeof src / block_bytes, max_error, (double)error_bound);
  free(block);
  kvc_codec_destroy(codec);
  return max_error <= error_bound ? 0 : 1;
}
