// SPDX-License-Identifier: Apache-2.0
// bench_codec: CPU encode and decode throughput of the kvcomp codec on synthetic K and V blocks,
// against a memcpy of the same fp16 bytes measured in the same process.
//
// Data: one layer's cache [tokens, kv_heads, head_dim] = [2048, 8, 128] fp16, cut into 256
// blocks of 64 tokens (4 MiB of fp16 per call, so call overhead does not dominate). Keys have
// per-channel offsets and a few outlier channels; values have per-token scales spread
// log-normally. The Huffman codebook is built from the first 512 tokens (the "prefill"). The
// tiles rows encode the same blocks in format t1 (fixed-width tensor-core tiles, no codebook).
//
// Counters: bytes_per_second on uncompressed fp16 bytes; ratio = fp16 bytes / compressed block
// bytes (codebook excluded); vs_memcpy = this benchmark's throughput / memcpy's (both in bytes of
// fp16 per second; memcpy timed once at startup). The 4 MiB of a call fit in a server CPU's
// last-level cache, for the codec and for memcpy alike.
#include <benchmark/benchmark.h>
#include <kvcomp/kvcomp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "examples/synthetic_cache.hpp"
#include "kernels/common/format.cuh"

namespace {

constexpr int kHeads = 8, kTokens = 2048, kDim = 128, kBlockTokens = 64, kPrefillTokens = 512;
constexpr int64_t kStride = int64_t(kHeads) * kDim;
constexpr int kNumBlocks = kHeads * (kTokens / kBlockTokens);  // 256
constexpr size_t kFp16Bytes = size_t(2) * kTokens * kStride;

using kvc::format::float_to_half;
using kvc::format::half_to_float;

// [kTokens, kHeads, kDim] fp16 bits: codec_demo's data.
std::vector<uint16_t> make_cache(bool is_value, uint32_t seed) {
  std::vector<uint16_t> x;
  for (float v : synthetic::make_cache(is_value, seed, kTokens, kHeads, kDim)) {
    x.push_back(float_to_half(v));
  }
  return x;
}

const std::vector<uint16_t>& cache(bool is_value) {
  static const std::vector<uint16_t> keys = make_cache(false, 1), values = make_cache(true, 2);
  return is_value ? values : keys;
}

// Block b: token block b / kHeads of head b % kHeads (prefill blocks first).
size_t block_offset(int b) {
  return size_t(b / kHeads) * kBlockTokens * kStride + size_t(b % kHeads) * kDim;
}

// memcpy of kFp16Bytes between two buffers, in bytes per second: the median of 51 copies
// (comparable with the mean time Google Benchmark reports), taken in 9 rounds, the fastest round
// kept so that a moment of contention on a shared machine does not lower the baseline.
double memcpy_bytes_per_second() {
  static const double rate = [] {
    std::vector<uint8_t> src(kFp16Bytes, 1), dst(kFp16Bytes);
    double best = 0.0;
    for (int round = 0; round < 9; ++round) {
      std::vector<double> seconds;
      for (int rep = 0; rep < 51; ++rep) {
        const auto start = std::chrono::steady_clock::now();
        std::memcpy(dst.data(), src.data(), kFp16Bytes);
        benchmark::DoNotOptimize(dst.data());
        benchmark::ClobberMemory();
        seconds.push_back(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
      std::nth_element(seconds.begin(), seconds.begin() + 25, seconds.end());
      best = std::max(best, double(kFp16Bytes) / seconds[25]);
    }
    return best;
  }();
  return rate;
}

struct Setting {
  const char* name;
  int32_t kind, bound_mode, entropy;
  float bound;
  int32_t block_format = KVC_BLOCK_FORMAT_V1;
};

// A codec for the setting (with its codebook for AUTO), the encoded blocks, and the buffers both
// directions need; everything is built here, before any timed loop.
struct Fixture {
  kvc_codec_t codec = nullptr;
  std::vector<const void*> src;
  std::vector<uint8_t> store;
  std::vector<void*> dst;
  std::vector<const void*> enc;
  std::vector<uint32_t> bytes;
  size_t capacity = 0;
  std::vector<uint16_t> out;
  std::vector<void*> out_blocks;
  std::string error;  // set when setup or the round-trip check failed

  ~Fixture() { kvc_codec_destroy(codec); }

  bool fail(const char* what, kvc_status_t status) {
    error = std::string(what) + ": " + kvc_status_string(status) + ": " + kvc_last_error();
    return false;
  }

  bool setup(const Setting& s) {
    const std::vector<uint16_t>& x = cache(s.kind == KVC_KIND_VALUE);
    kvc_codec_config cfg = KVC_CODEC_CONFIG_INIT;
    cfg.kind = s.kind;
    cfg.num_tokens = kBlockTokens;
    cfg.head_dim = kDim;
    cfg.bound_mode = s.bound_mode;
    cfg.error_bound = s.bound;
    cfg.entropy = s.entropy;
    cfg.block_format = s.block_format;
    src.resize(kNumBlocks);
    for (int b = 0; b < kNumBlocks; ++b) src[b] = &x[block_offset(b)];

    kvc_codebook_t codebook = nullptr;
    kvc_status_t st;
    if (s.block_format == KVC_BLOCK_FORMAT_V1 && s.entropy != KVC_ENTROPY_FIXED) {
      kvc_codec_config probe_cfg = cfg;
      probe_cfg.entropy = KVC_ENTROPY_FIXED;
      kvc_codec_t probe = nullptr;
      kvc_histogram_t histogram = nullptr;
      const int prefill_blocks = kHeads * (kPrefillTokens / kBlockTokens);
      if ((st = kvc_codec_create(&probe_cfg, nullptr, &probe)) != KVC_SUCCESS ||
          (st = kvc_histogram_create(&histogram)) != KVC_SUCCESS ||
          (st = kvc_codec_histogram(probe, prefill_blocks, src.data(), kStride, KVC_DTYPE_FP16,
                                    histogram, nullptr)) != KVC_SUCCESS ||
          (st = kvc_codebook_build(histogram, nullptr, &codebook)) != KVC_SUCCESS) {
        kvc_codec_destroy(probe);
        kvc_histogram_destroy(histogram);
        return fail("building the codebook", st);
      }
      kvc_codec_destroy(probe);
      kvc_histogram_destroy(histogram);
    }
    st = kvc_codec_create(&cfg, codebook, &codec);
    kvc_codebook_destroy(codebook);  // the codec keeps its own reference
    if (st != KVC_SUCCESS) return fail("kvc_codec_create", st);
    if ((st = kvc_codec_max_block_bytes(codec, KVC_DTYPE_FP16, &capacity)) != KVC_SUCCESS) {
      return fail("kvc_codec_max_block_bytes", st);
    }
    store.assign(capacity * kNumBlocks, 0);
    dst.resize(kNumBlocks);
    enc.resize(kNumBlocks);
    for (int b = 0; b < kNumBlocks; ++b) enc[b] = dst[b] = &store[capacity * b];
    bytes.assign(kNumBlocks, 0);
    out.assign(x.size(), 0);
    out_blocks.resize(kNumBlocks);
    for (int b = 0; b < kNumBlocks; ++b) out_blocks[b] = &out[block_offset(b)];
    if ((st = encode()) != KVC_SUCCESS) return fail("kvc_codec_encode", st);
    if ((st = decode()) != KVC_SUCCESS) return fail("kvc_codec_decode", st);
    return check_round_trip(s, x);
  }

  kvc_status_t encode() {
    return kvc_codec_encode(codec, kNumBlocks, src.data(), kStride, KVC_DTYPE_FP16, dst.data(),
                            capacity, bytes.data(), nullptr);
  }
  kvc_status_t decode() {
    return kvc_codec_decode(codec, kNumBlocks, enc.data(), bytes.data(), KVC_DTYPE_FP16,
                            out_blocks.data(), kStride, nullptr, nullptr);
  }

  // Every element of the fp16 decode within its bound, allowing the final rounding to fp16
  // (half an fp16 ulp of the decoded value).
  bool check_round_trip(const Setting& s, const std::vector<uint16_t>& x) {
    const bool key = s.kind == KVC_KIND_KEY;
    const int num_groups = key ? kDim : kBlockTokens, group_size = key ? kBlockTokens : kDim;
    for (int b = 0; b < kNumBlocks; ++b) {
      for (int g = 0; g < num_groups; ++g) {
        auto at = [&](int e) {
          return block_offset(b) + (key ? size_t(e) * kStride + g : size_t(g) * kStride + e);
        };
        float lo = half_to_float(x[at(0)]), hi = lo;
        for (int e = 1; e < group_size; ++e) {
          lo = std::min(lo, half_to_float(x[at(e)]));
          hi = std::max(hi, half_to_float(x[at(e)]));
        }
        const float bound = s.bound_mode == KVC_BOUND_ABSOLUTE ? s.bound : s.bound * (hi - lo);
        for (int e = 0; e < group_size; ++e) {
          const float ref = half_to_float(x[at(e)]), got = half_to_float(out[at(e)]);
          const float half_ulp = std::ldexp(1.0f, std::max(std::ilogb(got), -14) - 11);
          if (!(std::fabs(double(got) - double(ref)) <= double(bound) + double(half_ulp))) {
            error = "round trip: block " + std::to_string(b) + " group " + std::to_string(g) +
                    " element " + std::to_string(e) + " is " + std::to_string(got) + ", expected " +
                    std::to_string(ref) + " within " + std::to_string(bound);
            return false;
          }
        }
      }
    }
    return true;
  }

  double compressed_bytes() const {
    double total = 0.0;
    for (uint32_t n : bytes) total += n;
    return total;
  }
};

// Times the benchmark loop itself (the loop's own overhead is nothing next to a call on 4 MiB).
class LoopTimer {
 public:
  LoopTimer() : start_(std::chrono::steady_clock::now()) {}
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

void set_counters(benchmark::State& state, const LoopTimer& timer, double ratio) {
  const double bytes = double(state.iterations()) * double(kFp16Bytes);
  state.SetBytesProcessed(int64_t(bytes));
  state.counters["ratio"] = ratio;
  state.counters["vs_memcpy"] = bytes / timer.seconds() / memcpy_bytes_per_second();
}

// Google Benchmark calls a benchmark function several times while it sizes the iteration count:
// each setting's fixture is built and checked once, on first use.
Fixture* fixture(const Setting& s) {
  static std::map<std::string, std::unique_ptr<Fixture>> fixtures;
  std::unique_ptr<Fixture>& f = fixtures[s.name];
  if (!f) {
    f = std::make_unique<Fixture>();
    f->setup(s);
  }
  return f.get();
}

// Times one pass of the codec (encode or decode) over the whole cache.
void BM_Codec(benchmark::State& state, Setting s, kvc_status_t (Fixture::*pass)()) {
  Fixture& f = *fixture(s);
  if (!f.error.empty()) {
    state.SkipWithError(f.error.c_str());
    return;
  }
  const void* written = pass == &Fixture::encode ? static_cast<const void*>(f.store.data())
                                                 : static_cast<const void*>(f.out.data());
  const LoopTimer timer;
  for (auto _ : state) {
    const kvc_status_t st = (f.*pass)();
    if (st != KVC_SUCCESS) {
      state.SkipWithError(kvc_last_error());
      break;
    }
    benchmark::DoNotOptimize(written);
    benchmark::ClobberMemory();
  }
  set_counters(state, timer, double(kFp16Bytes) / f.compressed_bytes());
}

// Baseline: copying the same fp16 bytes (what an uncompressed cache append or read moves).
void BM_Memcpy(benchmark::State& state) {
  std::vector<uint8_t> src(kFp16Bytes, 1), dst(kFp16Bytes);
  const LoopTimer timer;
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), kFp16Bytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, timer, 1.0);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("kvcomp_version", kvc_version_string());
  benchmark::AddCustomContext("data", "fp16 [2048 tokens, 8 kv-heads, 128], 256 blocks of 64");
  benchmark::AddCustomContext("memcpy_GBps", std::to_string(memcpy_bytes_per_second() * 1e-9));

  const Setting settings[] = {
      {"K/huffman/rel0.05", KVC_KIND_KEY, KVC_BOUND_RELATIVE, KVC_ENTROPY_AUTO, 0.05f},
      {"K/fixed/rel0.05", KVC_KIND_KEY, KVC_BOUND_RELATIVE, KVC_ENTROPY_FIXED, 0.05f},
      {"K/huffman/abs0.03", KVC_KIND_KEY, KVC_BOUND_ABSOLUTE, KVC_ENTROPY_AUTO, 0.03f},
      {"K/fixed/abs0.03", KVC_KIND_KEY, KVC_BOUND_ABSOLUTE, KVC_ENTROPY_FIXED, 0.03f},
      {"V/huffman/rel0.05", KVC_KIND_VALUE, KVC_BOUND_RELATIVE, KVC_ENTROPY_AUTO, 0.05f},
      {"V/fixed/rel0.05", KVC_KIND_VALUE, KVC_BOUND_RELATIVE, KVC_ENTROPY_FIXED, 0.05f},
      {"V/huffman/abs0.03", KVC_KIND_VALUE, KVC_BOUND_ABSOLUTE, KVC_ENTROPY_AUTO, 0.03f},
      {"V/fixed/abs0.03", KVC_KIND_VALUE, KVC_BOUND_ABSOLUTE, KVC_ENTROPY_FIXED, 0.03f},
      {"K/tiles/rel0.05", KVC_KIND_KEY, KVC_BOUND_RELATIVE, KVC_ENTROPY_FIXED, 0.05f,
       KVC_BLOCK_FORMAT_TILES},
      {"K/tiles/abs0.03", KVC_KIND_KEY, KVC_BOUND_ABSOLUTE, KVC_ENTROPY_FIXED, 0.03f,
       KVC_BLOCK_FORMAT_TILES},
      {"V/tiles/rel0.05", KVC_KIND_VALUE, KVC_BOUND_RELATIVE, KVC_ENTROPY_FIXED, 0.05f,
       KVC_BLOCK_FORMAT_TILES},
      {"V/tiles/abs0.03", KVC_KIND_VALUE, KVC_BOUND_ABSOLUTE, KVC_ENTROPY_FIXED, 0.03f,
       KVC_BLOCK_FORMAT_TILES},
  };
  benchmark::RegisterBenchmark("BM_Memcpy", BM_Memcpy)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  for (const Setting& s : settings) {
    for (const auto& [name, pass] :
         {std::pair{"BM_Encode/", &Fixture::encode}, std::pair{"BM_Decode/", &Fixture::decode}}) {
      benchmark::RegisterBenchmark((name + std::string(s.name)).c_str(), BM_Codec, s, pass)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
