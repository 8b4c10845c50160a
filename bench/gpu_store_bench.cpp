// SPDX-License-Identifier: Apache-2.0
// gpu_store_bench: the CUDA store through the public API, each figure beside a dense fp16 cache
// doing the same job in the same run (Hkv = 8, head_dim 128, T = 64, fp16, bounds 0.05):
//   append   one decode step of one layer for B = 32 sequences (lengths staggered so blocks
//            fill on different steps, as in continuous batching), mean over 256 steps;
//            baseline: scattering the 32 new rows into a dense cache (cudaMemcpy2DAsync, K, V)
//   graph    one decode step of all 32 layers captured in a CUDA graph and replayed;
//            baseline: the 64 scatters in a graph
//   prefill  8192 tokens x 8 layers of one sequence, GB/s of fp16 input; baseline: a copy
//   attention kvc_store_attention (Hq = 32) over the store's 32 sequences; baseline: none here
//            (gpu_bench compares the kernels against the dense kernel)
// Verified once: lengths, no failed appends, and the read-back of a sequence within the bound.
// Timed with CUDA events on one stream; --json FILE writes the numbers. The store holds tile
// blocks (format t1: the default, KVC_BLOCK_FORMAT_AUTO, picks them for this shape); --v1 makes
// it hold format v1 blocks instead.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <kvcomp/kvcomp.hpp>
#include <string>
#include <vector>

#include "bench/gpu_bench_util.hpp"
#include "bench/synthetic_kv.hpp"

namespace {

constexpr uint32_t kLayers = 32, kHeads = 8, kDim = 128, kTokens = 64, kBatch = 32;
constexpr uint32_t kPrompt = 1024, kSteps = 256, kMaxTokens = 16384;
constexpr size_t kRow = size_t(kHeads) * kDim;  // elements of one token's K (or V)

class Timer {
 public:
  explicit Timer(cudaStream_t s) : s_(s) {
    CHECK_CUDA(cudaEventCreate(&a_));
    CHECK_CUDA(cudaEventCreate(&b_));
  }
  ~Timer() {
    cudaEventDestroy(a_);
    cudaEventDestroy(b_);
  }
  // Mean milliseconds per call of f over `reps` calls, enqueued back to back.
  template <class F>
  double mean_ms(int reps, F&& f) {
    CHECK_CUDA(cudaEventRecord(a_, s_));
    for (int r = 0; r < reps; ++r) f(r);
    CHECK_CUDA(cudaEventRecord(b_, s_));
    CHECK_CUDA(cudaEventSynchronize(b_));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a_, b_));
    return ms / reps;
  }

 private:
  cudaStream_t s_;
  cudaEvent_t a_, b_;
};

struct Result {
  std::string name;
  double ms, baseline_ms;
};

cudaGraphExec_t capture(cudaStream_t s, const auto& body) {
  cudaGraph_t graph;
  CHECK_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  body();
  CHECK_CUDA(cudaStreamEndCapture(s, &graph));
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  CHECK_CUDA(cudaGraphDestroy(graph));
  return exec;
}

}  // namespace

int main(int argc, char** argv) {
  const char* json = kvc::bench::json_path(argc, argv);
  const bool v1 = kvc::bench::has_flag(argc, argv, "--v1");
  const char* format = v1 ? "v1" : "tiles";
  if (!kvc::bench::have_gpu("gpu_store_bench")) return 0;
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t s;
  CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  Timer timer(s);

  kvc_store_config c = KVC_STORE_CONFIG_INIT;
  c.backend = KVC_BACKEND_CUDA;
  c.num_layers = kLayers;
  c.num_kv_heads = kHeads;
  c.head_dim = kDim;
  c.block_tokens = kTokens;
  c.capacity_bytes = int64_t(8) << 30;
  c.max_sequences = kBatch + 1;
  c.max_sequence_tokens = kMaxTokens;
  c.block_format = v1 ? KVC_BLOCK_FORMAT_V1 : KVC_BLOCK_FORMAT_TILES;
  kvcomp::Store store(c);

  // Synthetic K and V with per-channel structure: [tokens, heads, dim], a pool reused below.
  constexpr uint32_t kPool = 8192;
  const std::vector<uint16_t> host_k =
      kvc::bench::synthetic_fp16_blocks(false, kPool / kTokens, kTokens, uint32_t(kRow), 11);
  const std::vector<uint16_t> host_v =
      kvc::bench::synthetic_fp16_blocks(true, kPool / kTokens, kTokens, uint32_t(kRow), 12);
  uint16_t *d_k, *d_v;
  const size_t pool_bytes = host_k.size() * 2;
  CHECK_CUDA(cudaMalloc(&d_k, pool_bytes * kLayers));
  CHECK_CUDA(cudaMalloc(&d_v, pool_bytes * kLayers));
  for (uint32_t l = 0; l < kLayers; ++l) {
    CHECK_CUDA(
        cudaMemcpy(d_k + l * host_k.size(), host_k.data(), pool_bytes, cudaMemcpyHostToDevice));
    CHECK_CUDA(
        cudaMemcpy(d_v + l * host_v.size(), host_v.data(), pool_bytes, cudaMemcpyHostToDevice));
  }

  // Prompts of staggered lengths (all layers in one prefill call each).
  std::vector<int32_t> ids(kBatch);
  const size_t prompt_bytes = size_t(kLayers) * (kPrompt + 2 * kBatch) * kRow * 2;
  uint16_t *d_pk, *d_pv;
  CHECK_CUDA(cudaMalloc(&d_pk, prompt_bytes));
  CHECK_CUDA(cudaMalloc(&d_pv, prompt_bytes));
  for (uint32_t b = 0; b < kBatch; ++b) {
    ids[b] = store.add_sequence();
    const uint32_t n = kPrompt + b * 2;
    for (uint32_t l = 0; l < kLayers; ++l) {  // layer l of the prompt: pool rows from l
      CHECK_CUDA(cudaMemcpyAsync(d_pk + size_t(l) * n * kRow, d_k + size_t(l) * kRow, n * kRow * 2,
                                 cudaMemcpyDeviceToDevice, s));
      CHECK_CUDA(cudaMemcpyAsync(d_pv + size_t(l) * n * kRow, d_v + size_t(l) * kRow, n * kRow * 2,
                                 cudaMemcpyDeviceToDevice, s));
    }
    store.prefill(ids[b], 0, kLayers, int32_t(n), d_pk, d_pv, s);
  }
  CHECK_CUDA(cudaStreamSynchronize(s));

  // Dense baseline cache: [sequence, max tokens, heads, dim] for one layer.
  uint16_t* d_dense;
  const size_t seq_pitch = size_t(kMaxTokens) * kRow * 2;
  CHECK_CUDA(cudaMalloc(&d_dense, seq_pitch * kBatch * 2));
  const auto dense_append = [&](uint32_t layer, uint32_t step) {
    for (int kind = 0; kind < 2; ++kind) {
      const uint16_t* src = (kind ? d_v : d_k) + (size_t(layer) * kPool + step % kPool) * kRow;
      uint8_t* dst = reinterpret_cast<uint8_t*>(d_dense) + kind * seq_pitch * kBatch +
                     size_t(kPrompt + step) * kRow * 2;
      CHECK_CUDA(cudaMemcpy2DAsync(dst, seq_pitch, src, kRow * 2, kRow * 2, kBatch,
                                   cudaMemcpyDeviceToDevice, s));
    }
  };
  std::vector<Result> results;

  // One layer's decode step: rows of the pool as the new tokens (a fresh slice per step).
  const auto step_rows = [&](uint16_t* base, uint32_t layer, uint32_t step) {
    return base + (size_t(layer) * kPool + (step * kBatch) % (kPool - kBatch)) * kRow;
  };
  {
    const double ms = timer.mean_ms(int(kSteps), [&](int r) {
      store.append(0, ids, step_rows(d_k, 0, uint32_t(r)), step_rows(d_v, 0, uint32_t(r)), s);
    });
    const double base = timer.mean_ms(int(kSteps), [&](int r) { dense_append(0, uint32_t(r)); });
    results.push_back({"append, 1 layer, B=32", ms, base});
  }
  // All layers of a step in one graph (the other layers catch up with layer 0 first).
  for (uint32_t l = 1; l < kLayers; ++l) {
    for (uint32_t r = 0; r < kSteps; ++r) {
      store.append(int32_t(l), ids, step_rows(d_k, l, r), step_rows(d_v, l, r), s);
    }
  }
  {
    const cudaGraphExec_t step = capture(s, [&] {
      for (uint32_t l = 0; l < kLayers; ++l) {
        store.append(int32_t(l), ids, step_rows(d_k, l, 7), step_rows(d_v, l, 7), s);
      }
    });
    const cudaGraphExec_t dense = capture(s, [&] {
      for (uint32_t l = 0; l < kLayers; ++l) dense_append(l, 7);
    });
    const double ms =
        timer.mean_ms(int(kSteps), [&](int) { CHECK_CUDA(cudaGraphLaunch(step, s)); });
    const double base =
        timer.mean_ms(int(kSteps), [&](int) { CHECK_CUDA(cudaGraphLaunch(dense, s)); });
    results.push_back({"append, 32 layers, graph", ms, base});
    CHECK_CUDA(cudaGraphExecDestroy(step));
    CHECK_CUDA(cudaGraphExecDestroy(dense));
  }
  CHECK_CUDA(cudaStreamSynchronize(s));
  const kvc_store_stats after = store.stats();
  const uint32_t expect = kPrompt + 2 * kSteps;  // sequence 0: prompt, uncaptured, replays
  bool ok = after.failed_appends == 0 && after.last_append_status == KVC_SUCCESS &&
            store.length(ids[0], 0) == int32_t(expect) &&
            store.length(ids[0], kLayers - 1) == int32_t(expect);

  // Read-back of sequence 0, layer 0: the prompt's rows within the bound of their group (K: a
  // channel over a block's tokens; V: one token's channels of one head).
  {
    uint16_t *d_rk, *d_rv;
    CHECK_CUDA(cudaMalloc(&d_rk, size_t(expect) * kRow * 2));
    CHECK_CUDA(cudaMalloc(&d_rv, size_t(expect) * kRow * 2));
    store.read(ids[0], 0, KVC_DTYPE_FP16, int32_t(expect), d_rk, d_rv, s);
    std::vector<uint16_t> rk(size_t(kPrompt) * kRow), rv(rk.size());
    CHECK_CUDA(cudaMemcpy(rk.data(), d_rk, rk.size() * 2, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(rv.data(), d_rv, rv.size() * 2, cudaMemcpyDeviceToHost));
    const std::vector<uint16_t> want_k(host_k.begin(), host_k.begin() + long(rk.size()));
    const std::vector<uint16_t> want_v(host_v.begin(), host_v.begin() + long(rv.size()));
    const double worst_k = kvc::bench::worst_relative_error(false, want_k, rk, kPrompt / kTokens,
                                                            kTokens, uint32_t(kRow));
    const double worst_v = kvc::bench::worst_relative_error(
        true, want_v, rv, size_t(kPrompt) * kHeads / kTokens, kTokens, kDim);
    // fp16 output rounding on top of the bound
    ok = ok && worst_k <= c.key_error_bound + 1e-3 && worst_v <= c.value_error_bound + 1e-3;
    CHECK_CUDA(cudaFree(d_rk));
    CHECK_CUDA(cudaFree(d_rv));
  }

  // Prefill throughput: 8192 tokens x 8 layers into a fresh sequence, freed between runs.
  {
    constexpr uint32_t kPrefill = 8192, kPrefillLayers = 8;
    const size_t bytes = size_t(kPrefill) * kRow * 2 * kPrefillLayers;  // of K (and of V)
    uint16_t* d_copy;
    CHECK_CUDA(cudaMalloc(&d_copy, 2 * bytes));
    double ms = 0, base = 0;
    constexpr int kReps = 5;
    for (int r = 0; r <= kReps; ++r) {  // run 0 warms up
      const int32_t id = store.add_sequence();
      const double t = timer.mean_ms(1, [&](int) {
        store.prefill(id, 0, int32_t(kPrefillLayers), int32_t(kPrefill), d_k, d_v, s);
      });
      store.free_sequence(id, s);
      const double b = timer.mean_ms(1, [&](int) {
        CHECK_CUDA(cudaMemcpyAsync(d_copy, d_k, bytes, cudaMemcpyDeviceToDevice, s));
        CHECK_CUDA(cudaMemcpyAsync(d_copy + bytes / 2, d_v, bytes, cudaMemcpyDeviceToDevice, s));
      });
      if (r > 0) {
        ms += t / kReps;
        base += b / kReps;
      }
    }
    results.push_back({"prefill 8192 x 8 layers", ms, base});
    std::printf("prefill: %.1f GB/s of fp16 K+V (copy: %.1f GB/s)\n", 2 * bytes / ms / 1e6,
                2 * bytes / base / 1e6);
    CHECK_CUDA(cudaFree(d_copy));
  }

  // Attention of layer 0 over the store's 32 sequences.
  {
    constexpr uint32_t kGroup = 4;
    uint16_t *d_q, *d_out;
    CHECK_CUDA(cudaMalloc(&d_q, size_t(kBatch) * kRow * kGroup * 2));
    CHECK_CUDA(cudaMalloc(&d_out, size_t(kBatch) * kRow * kGroup * 2));
    CHECK_CUDA(cudaMemcpy(d_q, d_k, size_t(kBatch) * kRow * kGroup * 2, cudaMemcpyDeviceToDevice));
    const float scale = 1.0f / std::sqrt(float(kDim));
    store.attention(0, ids, int32_t(kHeads * kGroup), scale, d_q, d_out, s);  // sizes workspace
    const double ms = timer.mean_ms(
        50, [&](int) { store.attention(0, ids, int32_t(kHeads * kGroup), scale, d_q, d_out, s); });
    results.push_back({"attention, 32 x ~1.5K", ms, NAN});
    CHECK_CUDA(cudaFree(d_q));
    CHECK_CUDA(cudaFree(d_out));
  }
  const kvc_store_stats st = store.stats();

  std::printf(
      "\n%s, CUDA store of %s blocks: %u layers, Hkv=%u, head_dim %u, T=%u, fp16, "
      "bounds 0.05\n",
      prop.name, format, kLayers, kHeads, kDim, kTokens);
  std::printf("%-28s %12s %14s %8s\n", "operation", "us", "dense fp16 us", "ratio");
  for (const Result& r : results) {
    std::printf("%-28s %12.2f %14.2f %8.2f\n", r.name.c_str(), r.ms * 1e3, r.baseline_ms * 1e3,
                r.ms / r.baseline_ms);
  }
  // Per token and layer, everything counted (pages with their slack, reserved tails and
  // tables, codebooks) against the dense fp16 K and V of the same tokens.
  const double per_token =
      double(st.page_bytes + st.tail_bytes + st.table_bytes + st.codebook_bytes) /
      (double(st.dense_bytes) / (2.0 * kRow * 2));
  std::printf("bytes per token per layer, all counted: %.0f vs %.0f fp16 (%.2fx)\n", per_token,
              2.0 * kRow * 2, 2.0 * kRow * 2 / per_token);
  std::printf("verification: %s\n", ok ? "passed" : "FAILED");
  if (json) {
    if (FILE* f = std::fopen(json, "w")) {
      std::fprintf(f, "{\"gpu\": \"%s\", \"format\": \"%s\", \"verified\": %s, \"rows\": [\n",
                   prop.name, format, ok ? "true" : "false");
      for (size_t i = 0; i < results.size(); ++i) {
        std::fprintf(f, "  {\"name\": \"%s\", \"us\": %.3f, \"baseline_us\": %.3f}%s\n",
                     results[i].name.c_str(), results[i].ms * 1e3,
                     std::isnan(results[i].baseline_ms) ? -1.0 : results[i].baseline_ms * 1e3,
                     i + 1 < results.size() ? "," : "");
      }
      std::fprintf(f, "], \"bytes_per_token\": %.1f}\n", per_token);
      std::fclose(f);
    }
  }
  return ok ? 0 : 1;
}
