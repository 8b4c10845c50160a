// SPDX-License-Identifier: Apache-2.0
// A C++ consumer of the installed package: the header-only wrapper (kvcomp/kvcomp.hpp, C++20)
// round-trips one block, checking the error bound on every element, and prefills a store.
#include <cmath>
#include <cstdio>
#include <kvcomp/kvcomp.hpp>
#include <vector>

int main() {
  constexpr int32_t kTokens = 64, kHeadDim = 64;
  constexpr float kBound = 0.01f;
  std::vector<float> src(kTokens * kHeadDim), out(src.size());
  for (size_t i = 0; i < src.size(); ++i) src[i] = float(std::sin(0.01 * double(i))) * (1 + i % 7);
  try {
    kvc_codec_config config = KVC_CODEC_CONFIG_INIT;
    config.num_tokens = kTokens;
    config.head_dim = kHeadDim;
    config.bound_mode = KVC_BOUND_ABSOLUTE;
    config.error_bound = kBound;
    config.entropy = KVC_ENTROPY_FIXED;
    const kvcomp::Codec codec(config);
    const std::vector<uint8_t> block = codec.encode(src.data(), KVC_DTYPE_FP32, kHeadDim);
    codec.decode(block, KVC_DTYPE_FP32, out.data(), kHeadDim);
    for (size_t i = 0; i < src.size(); ++i) {
      if (!(std::fabs(out[i] - src[i]) <= kBound)) {
        std::fprintf(stderr, "consumer_cpp: element %zu off by %g\n", i, out[i] - src[i]);
        return 1;
      }
    }
    kvc_store_config store_config = KVC_STORE_CONFIG_INIT;
    store_config.num_kv_heads = 1;
    store_config.head_dim = kHeadDim;
    store_config.capacity_bytes = 1 << 20;
    kvcomp::Store store(store_config);
    const int32_t id = store.add_sequence();
    const std::vector<uint16_t> rows(3 * kHeadDim, 0x3C00);  // three tokens of fp16 1.0
    store.prefill(id, 0, 1, 3, rows.data(), rows.data());
    std::printf("kvcomp.hpp consumer: %zu-byte block within %g; a store sequence of %d tokens\n",
                block.size(), double(kBound), store.length(id, 0));
  } catch (const kvcomp::Error& e) {
    std::fprintf(stderr, "consumer_cpp: %s\n", e.what());
    return 1;
  }
  return 0;
}
