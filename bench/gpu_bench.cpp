// SPDX-License-Identifier: Apache-2.0
// gpu_bench: throughput of the CUDA codec on 1 GiB of synthetic fp16 KV (T = 64, head_dim 128),
// against a device-to-device copy of the same bytes in the same run. Timed with CUDA events on
// one non-default stream: median of the repetitions after a warm-up. Each result is verified
// once against the CPU reference before timing (first blocks byte-identical, decode error within
// the bound). Prints a table; --json FILE also writes the numbers.
//
// A plain program rather than Google Benchmark: it must build on GPU machines that have only the
// CUDA toolkit. The CPU benchmarks (bench_codec) use Google Benchmark.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <kvcomp/kvcomp.hpp>
#include <string>
#include <vector>

#include "bench/synthetic_kv.hpp"

namespace {

#define CHECK_CUDA(call)                                                                          \
  do {                                                                                            \
    const cudaError_t e_ = (call);                                                                \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

constexpr uint32_t kTokens = 64, kDim = 128;
constexpr size_t kBlockElems = size_t(kTokens) * kDim;
constexpr size_t kDistinct = 2048;  // distinct synthetic blocks (32 MiB)
constexpr size_t kBlocks = (size_t(1) << 30) / (2 * kBlockElems);  // 1 GiB of fp16
constexpr int kReps = 20;

struct Row {
  std::string name;
  double ms;
  double gbps;  // fp16 bytes (input of encode, output of decode, payload of copy) per second
  double ratio;
};

template <class Launch>
double median_ms(cudaStream_t s, Launch launch) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  launch();  // warm-up
  CHECK_CUDA(cudaStreamSynchronize(s));
  std::vector<float> times;
  for (int r = 0; r < kReps; ++r) {
    CHECK_CUDA(cudaEventRecord(a, s));
    launch();
    CHECK_CUDA(cudaEventRecord(b, s));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    times.push_back(ms);
  }
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

struct Case {
  const char* name;
  kvc_kind kind;
  kvc_entropy entropy;
};

}  // namespace

int main(int argc, char** argv) {
  const char* json = nullptr;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--json") json = argv[i + 1];
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("gpu_bench: no CUDA device, nothing measured\n");
    return 0;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  const size_t fp16_bytes = kBlocks * kBlockElems * 2;

  std::vector<Row> rows;
  void *d_in, *d_copy;
  CHECK_CUDA(cudaMalloc(&d_in, fp16_bytes));
  CHECK_CUDA(cudaMalloc(&d_copy, fp16_bytes));
  {
    const double ms = median_ms(stream, [&] {
      CHECK_CUDA(cudaMemcpyAsync(d_copy, d_in, fp16_bytes, cudaMemcpyDeviceToDevice, stream));
    });
    rows.push_back({"device copy (baseline)", ms, fp16_bytes / ms / 1e6, 1.0});
  }

  const Case cases[] = {{"K encode+decode, huffman", KVC_KIND_KEY, KVC_ENTROPY_AUTO},
                        {"V encode+decode, huffman", KVC_KIND_VALUE, KVC_ENTROPY_AUTO},
                        {"K encode+decode, fixed", KVC_KIND_KEY, KVC_ENTROPY_FIXED},
                        {"V encode+decode, fixed", KVC_KIND_VALUE, KVC_ENTROPY_FIXED}};
  for (const Case& c : cases) {
    const bool is_value = c.kind == KVC_KIND_VALUE;
    // Distinct blocks on the host, tiled over 1 GiB on the device.
    const std::vector<uint16_t> host =
        kvc::bench::synthetic_fp16_blocks(is_value, kDistinct, kTokens, kDim, 1234);
    for (size_t done = 0; done < kBlocks; done += kDistinct) {
      const size_t n = std::min(kDistinct, kBlocks - done);
      CHECK_CUDA(cudaMemcpy(static_cast<uint16_t*>(d_in) + done * kBlockElems, host.data(),
                            n * kBlockElems * 2, cudaMemcpyHostToDevice));
    }
    kvc_codec_config config = KVC_CODEC_CONFIG_INIT;
    config.kind = c.kind;
    config.entropy = c.entropy;
    const kvcomp::Codec cpu(config);
    kvcomp::Histogram histogram;
    for (size_t b = 0; b < 64; ++b) {
      cpu.add_to_histogram(host.data() + b * kBlockElems, KVC_DTYPE_FP16, kDim, histogram);
    }
    const kvcomp::Codebook book = kvcomp::Codebook::build(histogram);
    const kvcomp::Codec cpu_book(config, &book);
    config.backend = KVC_BACKEND_CUDA;
    const kvcomp::Codec gpu(config, &book);
    const size_t cap = gpu.max_block_bytes(KVC_DTYPE_FP16);

    void *d_blocks, *d_out, *d_ptrs;
    uint32_t* d_sizes;
    kvc_status_t* d_status;
    CHECK_CUDA(cudaMalloc(&d_blocks, cap * kBlocks));
    CHECK_CUDA(cudaMalloc(&d_out, fp16_bytes));
    CHECK_CUDA(cudaMalloc(&d_ptrs, 4 * 8 * kBlocks));
    CHECK_CUDA(cudaMalloc(&d_sizes, 4 * kBlocks));
    CHECK_CUDA(cudaMalloc(&d_status, 4 * kBlocks));
    std::vector<void*> ptrs(4 * kBlocks);
    for (size_t b = 0; b < kBlocks; ++b) {
      ptrs[b] = static_cast<uint16_t*>(d_in) + b * kBlockElems;                 // encode src
      ptrs[kBlocks + b] = static_cast<uint8_t*>(d_blocks) + b * cap;            // encode dst
      ptrs[2 * kBlocks + b] = ptrs[kBlocks + b];                                // decode src
      ptrs[3 * kBlocks + b] = static_cast<uint16_t*>(d_out) + b * kBlockElems;  // decode dst
    }
    CHECK_CUDA(cudaMemcpy(d_ptrs, ptrs.data(), ptrs.size() * 8, cudaMemcpyHostToDevice));
    auto** p = static_cast<void**>(d_ptrs);
    auto encode = [&] {
      kvcomp::check(kvc_codec_encode(gpu.get(), int32_t(kBlocks), p, kDim, KVC_DTYPE_FP16,
                                     p + kBlocks, cap, d_sizes, stream));
    };
    auto decode = [&] {
      kvcomp::check(kvc_codec_decode(gpu.get(), int32_t(kBlocks), p + 2 * kBlocks, d_sizes,
                                     KVC_DTYPE_FP16, p + 3 * kBlocks, kDim, d_status, stream));
    };
    const double encode_ms = median_ms(stream, encode);
    const double decode_ms = median_ms(stream, decode);

    // Verify once: sizes, statuses, the first blocks byte for byte, and every element's bound.
    std::vector<uint32_t> sizes(kBlocks);
    std::vector<kvc_status_t> status(kBlocks);
    CHECK_CUDA(cudaMemcpy(sizes.data(), d_sizes, 4 * kBlocks, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(status.data(), d_status, 4 * kBlocks, cudaMemcpyDeviceToHost));
    std::vector<uint8_t> first(cap * 8);
    CHECK_CUDA(cudaMemcpy(first.data(), d_blocks, first.size(), cudaMemcpyDeviceToHost));
    std::vector<uint16_t> decoded(kDistinct * kBlockElems);
    CHECK_CUDA(cudaMemcpy(decoded.data(), d_out, decoded.size() * 2, cudaMemcpyDeviceToHost));
    bool ok = std::all_of(status.begin(), status.end(), [](kvc_status_t s) { return s == 0; });
    for (size_t b = 0; b < 8 && ok; ++b) {
      const auto want = cpu_book.encode(host.data() + b * kBlockElems, KVC_DTYPE_FP16, kDim);
      ok = sizes[b] == want.size() && std::equal(want.begin(), want.end(), &first[b * cap]);
    }
    const double worst =
        kvc::bench::worst_relative_error(is_value, host, decoded, kDistinct, kTokens, kDim);
    ok = ok && worst <= config.error_bound + 1e-3;  // fp16 output rounding on top of the bound
    if (!ok) {
      std::fprintf(stderr, "gpu_bench: %s FAILED verification (worst error %.4g of range)\n",
                   c.name, worst);
      return 1;
    }
    double compressed = 0;
    for (uint32_t s : sizes) compressed += s;
    const double ratio = double(fp16_bytes) / compressed;
    const std::string base =
        std::string(c.name).substr(0, 1) + (c.entropy == KVC_ENTROPY_FIXED ? " fixed" : " huffman");
    rows.push_back({base + " encode", encode_ms, fp16_bytes / encode_ms / 1e6, ratio});
    rows.push_back({base + " decode", decode_ms, fp16_bytes / decode_ms / 1e6, ratio});
    for (void* d :
         {d_blocks, d_out, d_ptrs, static_cast<void*>(d_sizes), static_cast<void*>(d_status)}) {
      CHECK_CUDA(cudaFree(d));
    }
  }

  const double copy_gbps = rows[0].gbps;
  std::printf("\n%s, 1 GiB fp16 KV, T=%u, head_dim %u, relative bound 0.05, median of %d\n",
              prop.name, kTokens, kDim, kReps);
  std::printf("%-26s %10s %12s %8s %9s\n", "benchmark", "ms", "GB/s fp16", "ratio", "vs copy");
  for (const Row& r : rows) {
    std::printf("%-26s %10.3f %12.1f %8.2f %9.2f\n", r.name.c_str(), r.ms, r.gbps, r.ratio,
                r.gbps / copy_gbps);
  }
  if (json) {
    FILE* f = std::fopen(json, "w");
    if (f) {
      std::fprintf(f, "{\"gpu\": \"%s\", \"rows\": [\n", prop.name);
      for (size_t i = 0; i < rows.size(); ++i) {
        std::fprintf(f, "  {\"name\": \"%s\", \"ms\": %.5f, \"gbps\": %.2f, \"ratio\": %.4f}%s\n",
                     rows[i].name.c_str(), rows[i].ms, rows[i].gbps, rows[i].ratio,
                     i + 1 < rows.size() ? "," : "");
      }
      std::fprintf(f, "]}\n");
      std::fclose(f);
    }
  }
  return 0;
}
