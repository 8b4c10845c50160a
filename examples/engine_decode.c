/* SPDX-License-Identifier: Apache-2.0 */
/* engine_decode: the decode loop of an inference engine over kvcomp's paged store, in plain C99
 * with the public API only. Several sequences of different prompt lengths are prefilled (all
 * layers at once), then every step appends one token per live sequence, layer by layer
 * (kvc_store_append, batched), and computes that layer's decode attention over the store
 * (kvc_store_attention, batched). One sequence is freed midway; its pages return to the pool.
 *
 * The program checks itself and exits 1 on any mismatch: every attention output against a dense
 * double-precision reference over the store's own read-back (kvc_store_read), every read-back key
 * against the absolute error bound, every tail token exactly, and the accounting after the free.
 * Synthetic K/V/queries stand in for a model's (the Python demo runs a real one).
 *
 * It runs the CPU store; built with CUDA (KVC_EXAMPLE_WITH_CUDA) and on a machine with a GPU it
 * then runs the same loop through the CUDA store (tensors in device memory, the fused attention
 * kernel), with a tolerance for its fp32 accumulation. */
#include <kvcomp/kvcomp.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(KVC_EXAMPLE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#define CHECK(call)                                                                      \
  do {                                                                                   \
    kvc_status_t s_ = (call);                                                            \
    if (s_ != KVC_SUCCESS) {                                                             \
      fprintf(stderr, "%s: %s\n  %s\n", #call, kvc_status_string(s_), kvc_last_error()); \
      return 1;                                                                          \
    }                                                                                    \
  } while (0)
#define EXPECT(cond, ...)                      \
  do {                                         \
    if (!(cond)) {                             \
      fprintf(stderr, "FAILED: " __VA_ARGS__); \
      fprintf(stderr, "\n");                   \
      return 1;                                \
    }                                          \
  } while (0)

/* The model's shape: layers, kv-heads, head_dim, query heads per kv-head; the store's blocks. */
enum { L = 3, HK = 2, D = 64, GROUP = 3, HQ = HK * GROUP, T = 32 };
enum { NSEQ = 3, STEPS = 48, FREE_AT = 20, FREED = 1, MAX_TOKENS = 160 };
static const int prompt_len[NSEQ] = {45, 70, 17};
static const float key_bound = 0.1f; /* absolute */

/* ---- fp16 <-> fp32 (round to nearest even), so that the example needs no compiler extension */
static uint16_t to_half(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int32_t e = (int32_t)((x >> 23) & 0xFF) - 127 + 15;
  uint32_t m = x & 0x7FFFFFu;
  if (e >= 31) return (uint16_t)(sign | 0x7C00u); /* overflow: inf (inputs here are small) */
  if (e <= 0) {                                   /* subnormal or zero */
    if (e < -10) return (uint16_t)sign;
    m |= 0x800000u;
    const uint32_t shift = (uint32_t)(14 - e), half = 1u << (shift - 1);
    uint32_t r = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1);
    if (rest > half || (rest == half && (r & 1))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ((uint32_t)e << 10) | (m >> 13);
  const uint32_t rest = m & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (r & 1))) ++r; /* may carry into the exponent */
  return (uint16_t)(sign | r);
}

static float from_half(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FFu;
  float f;
  if (e == 0) {
    f = ldexpf((float)m, -24);
  } else if (e == 31) {
    f = m ? NAN : INFINITY;
  } else {
    f = ldexpf((float)(m | 0x400u), (int)e - 25);
  }
  uint32_t x;
  memcpy(&x, &f, 4);
  x |= sign;
  memcpy(&f, &x, 4);
  return f;
}

/* Roughly normal noise from a fixed-seed LCG: every run is the same. */
static uint32_t rng_state = 2026u;
static float noise(void) {
  float sum = 0.0f;
  for (int i = 0; i < 4; ++i) {
    rng_state = rng_state * 1664525u + 1013904223u;
    sum += (float)(rng_state >> 8) / 16777216.0f;
  }
  return (sum - 2.0f) * 1.7320508f;
}

/* A token's K or V row for one layer, [HK, D] fp16: keys with a few wide outlier channels. */
static void make_row(uint16_t* row, int is_key) {
  for (int h = 0; h < HK; ++h) {
    for (int d = 0; d < D; ++d) {
      const float spread = is_key && d % 16 == 5 ? 4.0f : 1.0f;
      row[h * D + d] = to_half(spread * noise() + (is_key ? 0.3f * (float)(d % 7) : 0.0f));
    }
  }
}

/* Every token the engine appended, as it gave it: [seq][layer][token][HK][D]. */
static uint16_t shadow_k[NSEQ][L][MAX_TOKENS][HK * D], shadow_v[NSEQ][L][MAX_TOKENS][HK * D];
static int length[NSEQ];

/* Where the store's tensors live: host buffers on the CPU; device copies on CUDA. */
typedef struct {
  int cuda;
  void *d_k, *d_v, *d_q, *d_out; /* device scratch (CUDA) */
} Memory;

static size_t kv_bytes(int tokens) { return (size_t)tokens * HK * D * 2; }

/* A store pointer for host data: the data itself, or its copy in device buffer `dev`. */
static const void* to_store(const Memory* m, void* dev, const void* host, size_t bytes) {
#if defined(KVC_EXAMPLE_WITH_CUDA)
  if (m->cuda) {
    if (cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice) != cudaSuccess) return NULL;
    return dev;
  }
#endif
  (void)m, (void)dev, (void)bytes;
  return host;
}

static int from_store(const Memory* m, void* host, const void* store_ptr, size_t bytes) {
#if defined(KVC_EXAMPLE_WITH_CUDA)
  if (m->cuda) return cudaMemcpy(host, store_ptr, bytes, cudaMemcpyDeviceToHost) == cudaSuccess;
#endif
  (void)m, (void)host, (void)store_ptr, (void)bytes;
  return 1;
}

/* A CUDA store's page and block counts trail the work queued on its stream (kvcomp.h,
 * kvc_store_get_stats): waits for the stream before they are read. */
static int settle(const Memory* m) {
#if defined(KVC_EXAMPLE_WITH_CUDA)
  if (m->cuda) return cudaStreamSynchronize(0) == cudaSuccess;
#endif
  (void)m;
  return 1;
}

/* Reads (seq, layer) back in fp32 and checks it against what was appended: keys within the
 * absolute bound, tail tokens (the last length % T) exact. */
static int check_read_back(kvc_store_t store, const Memory* m, int s, int id, int layer,
                           int expected, float* k, float* v) {
  int32_t n = 0;
  CHECK(kvc_store_sequence_length(store, id, layer, &n));
  EXPECT(n == expected, "sequence %d layer %d holds %d tokens, not %d", s, layer, n, expected);
  void* dk = m->cuda ? m->d_k : k;
  void* dv = m->cuda ? m->d_v : v;
  CHECK(kvc_store_read(store, id, layer, KVC_DTYPE_FP32, MAX_TOKENS, dk, dv, NULL));
  EXPECT(
      from_store(m, k, dk, (size_t)n * HK * D * 4) && from_store(m, v, dv, (size_t)n * HK * D * 4),
      "copying the read-back to the host");
  const int tail_from = n - n % T;
  for (int t = 0; t < n; ++t) {
    for (int i = 0; i < HK * D; ++i) {
      const float want_k = from_half(shadow_k[s][layer][t][i]);
      const float want_v = from_half(shadow_v[s][layer][t][i]);
      const float got_k = k[(size_t)t * HK * D + i], got_v = v[(size_t)t * HK * D + i];
      EXPECT(fabsf(got_k - want_k) <= key_bound, "seq %d layer %d token %d: key %g vs %g", s, layer,
             t, got_k, want_k);
      if (t >= tail_from) {
        EXPECT(got_k == want_k && got_v == want_v, "seq %d layer %d tail token %d not exact", s,
               layer, t);
      }
    }
  }
  return 0;
}

/* Dense attention over the read-back, in double: out [HQ, D]. */
static void reference_attention(const float* q, const float* k, const float* v, int n, float scale,
                                double* out) {
  double* score = malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
  for (int qh = 0; qh < HQ; ++qh) {
    const int h = qh / GROUP;
    double top = -INFINITY, sum = 0.0;
    for (int t = 0; t < n; ++t) {
      double dot = 0.0;
      for (int d = 0; d < D; ++d) dot += (double)q[qh * D + d] * k[((size_t)t * HK + h) * D + d];
      score[t] = scale * dot;
      if (score[t] > top) top = score[t];
    }
    for (int d = 0; d < D; ++d) out[qh * D + d] = 0.0;
    for (int t = 0; t < n; ++t) {
      const double w = exp(score[t] - top);
      sum += w;
      for (int d = 0; d < D; ++d) out[qh * D + d] += w * v[((size_t)t * HK + h) * D + d];
    }
    for (int d = 0; d < D; ++d) out[qh * D + d] = n ? out[qh * D + d] / sum : 0.0;
  }
  free(score);
}

static int run(kvc_backend backend, Memory* m) {
  const char* name = backend == KVC_BACKEND_CPU ? "CPU" : "CUDA";
  /* The CPU reference rounds its double result to fp16; CUDA accumulates in fp32 from
   * fp16-rounded probabilities: both are far inside these tolerances, and a wrong block, head or
   * token is far outside them. */
  const double tolerance = backend == KVC_BACKEND_CPU ? 2e-3 : 1e-2;
  kvc_store_config cfg = KVC_STORE_CONFIG_INIT;
  cfg.backend = backend;
  cfg.num_layers = L;
  cfg.num_kv_heads = HK;
  cfg.head_dim = D;
  cfg.block_tokens = T;
  cfg.key_bound_mode = KVC_BOUND_ABSOLUTE;
  cfg.key_error_bound = key_bound;
  cfg.value_bound_mode = KVC_BOUND_RELATIVE;
  cfg.value_error_bound = 0.05f;
  cfg.capacity_bytes = (int64_t)64 << 20;
  cfg.max_sequences = NSEQ; /* the CUDA store sizes its tables from these two */
  cfg.max_sequence_tokens = MAX_TOKENS;
  kvc_store_t store = NULL;
  CHECK(kvc_store_create(&cfg, &store));

  /* Prefill: each sequence's prompt, all layers in one call, [L, n, HK, D]. */
  int32_t ids[NSEQ];
  int live[NSEQ];
  rng_state = 2026u;
  static uint16_t prompt_k[L * MAX_TOKENS * HK * D], prompt_v[L * MAX_TOKENS * HK * D];
  for (int s = 0; s < NSEQ; ++s) {
    CHECK(kvc_store_add_sequence(store, &ids[s]));
    live[s] = 1;
    length[s] = prompt_len[s];
    for (int l = 0; l < L; ++l) {
      for (int t = 0; t < prompt_len[s]; ++t) {
        make_row(shadow_k[s][l][t], 1);
        make_row(shadow_v[s][l][t], 0);
        memcpy(&prompt_k[((size_t)l * prompt_len[s] + t) * HK * D], shadow_k[s][l][t], kv_bytes(1));
        memcpy(&prompt_v[((size_t)l * prompt_len[s] + t) * HK * D], shadow_v[s][l][t], kv_bytes(1));
      }
    }
    const size_t bytes = (size_t)L * kv_bytes(prompt_len[s]);
    const void* k = to_store(m, m->d_k, prompt_k, bytes);
    const void* v = to_store(m, m->d_v, prompt_v, bytes);
    EXPECT(k && v, "copying the prompt to the device");
    CHECK(kvc_store_prefill(store, ids[s], 0, L, prompt_len[s], k, v, NULL));
  }

  /* Decode steps. */
  static uint16_t step_k[NSEQ * HK * D], step_v[NSEQ * HK * D], q16[NSEQ * HQ * D],
      out16[NSEQ * HQ * D];
  static float k32[MAX_TOKENS * HK * D], v32[MAX_TOKENS * HK * D], q32[HQ * D];
  double ref[HQ * D];
  const float scale = 1.0f / sqrtf((float)D);
  double worst = 0.0;
  kvc_store_stats before_free = KVC_STORE_STATS_INIT;
  for (int step = 0; step < STEPS; ++step) {
    if (step == FREE_AT) {
      EXPECT(settle(m), "waiting for the stream");
      CHECK(kvc_store_get_stats(store, &before_free));
      CHECK(kvc_store_free_sequence(store, ids[FREED], NULL));
      live[FREED] = 0;
      kvc_store_stats after = KVC_STORE_STATS_INIT;
      EXPECT(settle(m), "waiting for the stream");
      CHECK(kvc_store_get_stats(store, &after));
      EXPECT(after.num_sequences == NSEQ - 1 && after.pages_in_use < before_free.pages_in_use &&
                 after.num_blocks < before_free.num_blocks,
             "freeing sequence %d: %d sequences, %lld pages, %lld blocks (before: %lld, %lld)",
             (int)ids[FREED], (int)after.num_sequences, (long long)after.pages_in_use,
             (long long)after.num_blocks, (long long)before_free.pages_in_use,
             (long long)before_free.num_blocks);
      int32_t n = 0;
      EXPECT(kvc_store_sequence_length(store, ids[FREED], 0, &n) == KVC_ERROR_UNKNOWN_SEQUENCE,
             "a freed sequence is unknown");
    }
    int32_t batch[NSEQ];
    int slot[NSEQ], num = 0;
    for (int s = 0; s < NSEQ; ++s) {
      if (live[s]) slot[num] = s, batch[num++] = ids[s];
    }
    for (int l = 0; l < L; ++l) {
      for (int b = 0; b < num; ++b) {
        const int s = slot[b];
        make_row(shadow_k[s][l][length[s]], 1);
        make_row(shadow_v[s][l][length[s]], 0);
        memcpy(&step_k[b * HK * D], shadow_k[s][l][length[s]], kv_bytes(1));
        memcpy(&step_v[b * HK * D], shadow_v[s][l][length[s]], kv_bytes(1));
        for (int i = 0; i < HQ * D; ++i) q16[b * HQ * D + i] = to_half(noise());
      }
      const void* k = to_store(m, m->d_k, step_k, (size_t)num * kv_bytes(1));
      const void* v = to_store(m, m->d_v, step_v, (size_t)num * kv_bytes(1));
      EXPECT(k && v, "copying a step to the device");
      CHECK(kvc_store_append(store, l, num, batch, k, v, NULL));
      const void* q = to_store(m, m->d_q, q16, (size_t)num * HQ * D * 2);
      void* out = m->cuda ? m->d_out : (void*)out16;
      EXPECT(q != NULL, "copying the queries to the device");
      CHECK(kvc_store_attention(store, l, num, batch, HQ, scale, q, out, NULL));
      EXPECT(from_store(m, out16, out, (size_t)num * HQ * D * 2), "copying the output back");
      for (int b = 0; b < num; ++b) {
        const int s = slot[b];
        const int n = length[s] + 1; /* this layer has the new token; later ones not yet */
        if (check_read_back(store, m, s, batch[b], l, n, k32, v32)) return 1;
        for (int i = 0; i < HQ * D; ++i) q32[i] = from_half(q16[b * HQ * D + i]);
        reference_attention(q32, k32, v32, n, scale, ref);
        for (int i = 0; i < HQ * D; ++i) {
          const double got = from_half(out16[b * HQ * D + i]);
          const double err = fabs(got - ref[i]) / (1.0 + fabs(ref[i]));
          if (err > worst) worst = err;
          EXPECT(err <= tolerance,
                 "%s step %d layer %d sequence %d element %d: attention %.6f, reference %.6f", name,
                 step, l, s, i, got, ref[i]);
        }
      }
    }
    for (int b = 0; b < num; ++b) ++length[slot[b]];
  }

  kvc_store_stats st = KVC_STORE_STATS_INIT;
  CHECK(kvc_store_get_stats(store, &st));
  int64_t tokens = 0;
  for (int s = 0; s < NSEQ; ++s) tokens += live[s] ? length[s] : 0;
  const int64_t held = st.page_bytes + st.tail_bytes + st.table_bytes + st.codebook_bytes;
  printf("%s store: %d sequences (one freed at step %d), %d layers, %d steps\n", name,
         (int)st.num_sequences, FREE_AT, L, STEPS);
  printf(
      "  %lld tokens per layer: %lld blocks, %lld block bytes in %lld of %lld pages (%lld page "
      "bytes), tails %lld, tables %lld, codebooks %lld bytes\n",
      (long long)tokens, (long long)st.num_blocks, (long long)st.block_bytes,
      (long long)st.pages_in_use, (long long)st.pages_total, (long long)st.page_bytes,
      (long long)st.tail_bytes, (long long)st.table_bytes, (long long)st.codebook_bytes);
  printf(
      "  dense fp16 %lld bytes: %.2fx in blocks and tails, %.2fx with everything (short sequences: "
      "the "
      "pages and tails dominate); attention's decoded blocks: %lld bytes\n",
      (long long)st.dense_bytes,
      st.block_bytes ? (double)st.dense_bytes / (double)(st.block_bytes + st.tail_bytes) : 0.0,
      (double)st.dense_bytes / (double)held, (long long)st.decoded_cache_bytes);
  printf(
      "  attention vs the dense reference over the read-back: worst |error| / (1 + |ref|) = "
      "%.2e (tolerance %.0e)\n",
      worst, tolerance);
  EXPECT(st.last_append_status == KVC_SUCCESS && st.failed_appends == 0, "failed appends");
  CHECK(kvc_store_destroy(store));
  return 0;
}

int main(void) {
  Memory cpu = {0, NULL, NULL, NULL, NULL};
  if (run(KVC_BACKEND_CPU, &cpu)) return 1;
#if defined(KVC_EXAMPLE_WITH_CUDA)
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    printf("no GPU: the CUDA store was not run\n");
    return 0;
  }
  Memory gpu = {1, NULL, NULL, NULL, NULL};
  const size_t big = (size_t)L * MAX_TOKENS * HK * D * 4;
  if (cudaMalloc(&gpu.d_k, big) != cudaSuccess || cudaMalloc(&gpu.d_v, big) != cudaSuccess ||
      cudaMalloc(&gpu.d_q, (size_t)NSEQ * HQ * D * 2) != cudaSuccess ||
      cudaMalloc(&gpu.d_out, (size_t)NSEQ * HQ * D * 2) != cudaSuccess) {
    fprintf(stderr, "cudaMalloc failed\n");
    return 1;
  }
  const int failed = run(KVC_BACKEND_CUDA, &gpu);
  cudaFree(gpu.d_k), cudaFree(gpu.d_v), cudaFree(gpu.d_q), cudaFree(gpu.d_out);
  if (failed) return 1;
#else
  printf("built without CUDA: the CUDA store was not run\n");
#endif
  return 0;
}
