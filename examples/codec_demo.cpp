// SPDX-License-Identifier: Apache-2.0
// codec_demo: the kvcomp codec on synthetic but realistic KV cache data, through the public C API.
//
// One layer's cache, [tokens, kv_heads, head_dim] fp16, 8 kv-heads x 4096 tokens x 128 channels,
// for K and for V. As in an inference engine, the prefill (the first 1024 tokens) builds one
// codebook per K|V, frozen; then every block of the cache (prefill and the tokens after it) is
// encoded with it. Per setting the table gives the compression ratio against fp16 (block bytes
// plus the serialized codebook), the largest error relative to its bound, encode and decode
// throughput (GB/s of fp16, one CPU thread), and which encoding the blocks chose.
//
// The data are synthetic, not a model's; bench/accuracy measures a real model.
#include <kvcomp/kvcomp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "synthetic_cache.hpp"

namespace {

constexpr int kHeads = 8, kTokens = 4096, kDim = 128, kBlockTokens = 64, kPrefillTokens = 1024;
constexpr int64_t kStride = int64_t(kHeads) * kDim;  // elements between consecutive tokens
constexpr int kNumBlocks = kHeads * (kTokens / kBlockTokens);
constexpr double kFp16Bytes = 2.0 * kHeads * kTokens * kDim;

void check(kvc_status_t status, const char* what) {
  if (status == KVC_SUCCESS) return;
  std::fprintf(stderr, "%s failed: %s\n  %s\n", what, kvc_status_string(status), kvc_last_error());
  std::exit(1);
}

uint16_t float_to_half(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x >= 0x47800000u) return sign | (x > 0x7F800000u ? 0x7E00u : 0x7C00u);
  if (x < 0x38800000u) return sign | uint16_t(std::nearbyint(std::fabs(f) * 16777216.0f));
  uint32_t h = (x - 0x38000000u) >> 13;
  const uint32_t rest = x & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return sign | uint16_t(h);
}

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(float(m), -24);
  const uint32_t x = sign | (e == 31 ? 0x7F800000u : (e + 112) << 23) | (m << 13);
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// One layer's K or V, [kTokens, kHeads, kDim], as fp16 bits and as the floats those bits hold.
struct Tensor {
  std::vector<uint16_t> half;
  std::vector<float> value;
};

Tensor make_tensor(bool is_value, uint32_t seed) {
  Tensor x;
  x.value = synthetic::make_cache(is_value, seed, kTokens, kHeads, kDim);
  x.half.resize(x.value.size());
  for (size_t i = 0; i < x.value.size(); ++i) {
    x.half[i] = float_to_half(x.value[i]);
    x.value[i] = half_to_float(x.half[i]);  // the reference is what the fp16 cache holds
  }
  return x;
}

// Block b is token block b / kHeads of head b % kHeads; prefill blocks come first.
size_t block_offset(int b) {
  return size_t(b / kHeads) * kBlockTokens * kStride + size_t(b % kHeads) * kDim;
}

// Largest |error| / bound over every element (decoded as fp32, so no output rounding).
double worst_error_ratio(const kvc_codec_config& cfg, const Tensor& x,
                         const std::vector<float>& decoded) {
  double worst = 0.0;
  for (int b = 0; b < kNumBlocks; ++b) {
    const float* ref = &x.value[block_offset(b)];
    const float* out = &decoded[block_offset(b)];
    // Groups: K one per channel over the block's tokens, V one per token over the channels.
    const int num_groups = cfg.kind == KVC_KIND_KEY ? kDim : kBlockTokens;
    const int group_size = cfg.kind == KVC_KIND_KEY ? kBlockTokens : kDim;
    for (int g = 0; g < num_groups; ++g) {
      auto at = [&](int e) {
        return cfg.kind == KVC_KIND_KEY ? size_t(e) * kStride + g : size_t(g) * kStride + e;
      };
      float lo = ref[at(0)], hi = lo;
      for (int e = 1; e < group_size; ++e) {
        lo = std::min(lo, ref[at(e)]);
        hi = std::max(hi, ref[at(e)]);
      }
      const float bound =
          cfg.bound_mode == KVC_BOUND_ABSOLUTE ? cfg.error_bound : cfg.error_bound * (hi - lo);
      for (int e = 0; e < group_size; ++e) {
        const double err = std::fabs(double(out[at(e)]) - double(ref[at(e)]));
        if (err > 0.0) worst = std::max(worst, err / bound);
      }
    }
  }
  return worst;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct Row {
  double ratio, fixed_ratio, worst, encode_gbs, decode_gbs;
  int count[3];  // blocks per kvc_block_encoding
};

Row run(kvc_codec_config cfg, const Tensor& x) {
  std::vector<const void*> src(kNumBlocks);
  for (int b = 0; b < kNumBlocks; ++b) src[b] = &x.half[block_offset(b)];
  const int prefill_blocks = kHeads * (kPrefillTokens / kBlockTokens);

  // Prefill: histogram of its blocks, then the frozen codebook.
  kvc_codec_t fixed_codec, codec;
  kvc_histogram_t histogram;
  kvc_codebook_t codebook;
  cfg.entropy = KVC_ENTROPY_FIXED;
  check(kvc_codec_create(&cfg, nullptr, &fixed_codec), "kvc_codec_create");
  check(kvc_histogram_create(&histogram), "kvc_histogram_create");
  check(kvc_codec_histogram(fixed_codec, prefill_blocks, src.data(), kStride, KVC_DTYPE_FP16,
                            histogram, nullptr),
        "kvc_codec_histogram");
  check(kvc_codebook_build(histogram, nullptr, &codebook), "kvc_codebook_build");
  size_t codebook_bytes;
  check(kvc_codebook_serialized_size(codebook, &codebook_bytes), "kvc_codebook_serialized_size");
  cfg.entropy = KVC_ENTROPY_AUTO;  // per block the smaller of Huffman and fixed width
  check(kvc_codec_create(&cfg, codebook, &codec), "kvc_codec_create");

  size_t capacity;
  check(kvc_codec_max_block_bytes(codec, KVC_DTYPE_FP16, &capacity), "kvc_codec_max_block_bytes");
  std::vector<uint8_t> store(capacity * kNumBlocks);
  std::vector<void*> dst(kNumBlocks);
  std::vector<const void*> enc(kNumBlocks);
  for (int b = 0; b < kNumBlocks; ++b) enc[b] = dst[b] = &store[capacity * b];
  std::vector<uint32_t> bytes(kNumBlocks);
  std::vector<uint16_t> out_half(x.half.size());
  std::vector<float> out_float(x.value.size());
  std::vector<void*> out(kNumBlocks);

  // Best of 3 runs of all blocks in one call each; decode to fp16, as attention would read it.
  Row row{};
  double encode_s = 1e30, decode_s = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    auto start = std::chrono::steady_clock::now();
    check(kvc_codec_encode(codec, kNumBlocks, src.data(), kStride, KVC_DTYPE_FP16, dst.data(),
                           capacity, bytes.data(), nullptr),
          "kvc_codec_encode");
    encode_s = std::min(encode_s, seconds_since(start));
    for (int b = 0; b < kNumBlocks; ++b) out[b] = &out_half[block_offset(b)];
    start = std::chrono::steady_clock::now();
    check(kvc_codec_decode(codec, kNumBlocks, enc.data(), bytes.data(), KVC_DTYPE_FP16, out.data(),
                           kStride, nullptr, nullptr),
          "kvc_codec_decode");
    decode_s = std::min(decode_s, seconds_since(start));
  }
  row.encode_gbs = kFp16Bytes / encode_s * 1e-9;
  row.decode_gbs = kFp16Bytes / decode_s * 1e-9;

  double total = double(codebook_bytes);
  for (int b = 0; b < kNumBlocks; ++b) {
    total += bytes[b];
    kvc_block_info info = KVC_BLOCK_INFO_INIT;
    check(kvc_block_inspect(enc[b], bytes[b], &info), "kvc_block_inspect");
    ++row.count[info.encoding];
  }
  row.ratio = kFp16Bytes / total;

  for (int b = 0; b < kNumBlocks; ++b) out[b] = &out_float[block_offset(b)];
  check(kvc_codec_decode(codec, kNumBlocks, enc.data(), bytes.data(), KVC_DTYPE_FP32, out.data(),
                         kStride, nullptr, nullptr),
        "kvc_codec_decode");
  row.worst = worst_error_ratio(cfg, x, out_float);

  // The same blocks with fixed-width packing only, for comparison.
  check(kvc_codec_encode(fixed_codec, kNumBlocks, src.data(), kStride, KVC_DTYPE_FP16, dst.data(),
                         capacity, bytes.data(), nullptr),
        "kvc_codec_encode");
  double fixed_total = 0.0;
  for (uint32_t n : bytes) fixed_total += n;
  row.fixed_ratio = kFp16Bytes / fixed_total;

  kvc_codec_destroy(codec);
  kvc_codec_destroy(fixed_codec);
  kvc_codebook_destroy(codebook);
  kvc_histogram_destroy(histogram);
  return row;
}

}  // namespace

int main() {
  std::printf("kvcomp %s codec demo: synthetic KV, %d kv-heads x %d tokens x head_dim %d, fp16,\n",
              kvc_version_string(), kHeads, kTokens, kDim);
  std::printf("blocks of %d tokens; codebooks from the first %d tokens; CPU backend, 1 thread.\n",
              kBlockTokens, kPrefillTokens);
  std::printf("ratio: fp16 bytes / (block bytes + codebook); err/bound: worst element (<= 1).\n\n");
  const Tensor keys = make_tensor(false, 1), values = make_tensor(true, 2);

  struct Setting {
    int32_t mode;
    float bound;
  };
  const Setting settings[] = {{KVC_BOUND_RELATIVE, 0.02f},
                              {KVC_BOUND_RELATIVE, 0.05f},
                              {KVC_BOUND_RELATIVE, 0.1f},
                              {KVC_BOUND_ABSOLUTE, 0.03f}};
  std::printf("%-2s %-9s %6s %11s %10s %9s %9s %8s %6s %5s\n", "", "bound", "ratio", "fixed-only",
              "err/bound", "enc GB/s", "dec GB/s", "Huffman", "fixed", "raw");
  bool ok = true;
  for (const Setting& s : settings) {
    for (int kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
      kvc_codec_config cfg = KVC_CODEC_CONFIG_INIT;
      cfg.kind = kind;
      cfg.num_tokens = kBlockTokens;
      cfg.head_dim = kDim;
      cfg.bound_mode = s.mode;
      cfg.error_bound = s.bound;
      const Row r = run(cfg, kind == KVC_KIND_KEY ? keys : values);
      ok = ok && r.worst <= 1.0;
      std::printf("%-2s %-3s %5.2f %6.2fx %10.2fx %10.3f %9.3f %9.3f %7.0f%% %5.0f%% %4.0f%%\n",
                  kind == KVC_KIND_KEY ? "K" : "V", s.mode == KVC_BOUND_RELATIVE ? "rel" : "abs",
                  s.bound, r.ratio, r.fixed_ratio, r.worst, r.encode_gbs, r.decode_gbs,
                  100.0 * r.count[KVC_ENCODING_HUFFMAN] / kNumBlocks,
                  100.0 * r.count[KVC_ENCODING_FIXED] / kNumBlocks,
                  100.0 * r.count[KVC_ENCODING_RAW] / kNumBlocks);
    }
  }
  if (!ok) std::printf("\nFAILED: an element exceeds its error bound\n");
  return ok ? 0 : 1;
}
