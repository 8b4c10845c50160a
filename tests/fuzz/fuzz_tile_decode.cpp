// SPDX-License-Identifier: Apache-2.0
// Fuzzes the tile block decoder (format t1): kvc_block_inspect and kvc_codec_decode through tile
// codecs on arbitrary bytes. Input: one selector byte (fuzz_common.hpp, parse_tile_selector),
// then the block. The contract (docs/format.md, "Tile format (t1)"): a corrupt block gives a data
// status, never a crash, an out-of-bounds access or undefined behaviour; the decoder reads only
// the bytes it is given (the block is copied into an allocation of exactly its size so that
// AddressSanitizer catches any read past it).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fuzz_common.hpp"

namespace {

using kvc_fuzz::kNumTileShapes;
using kvc_fuzz::kTileShapes;

struct Codecs {
  kvc_codec_t codec[kNumTileShapes][2] = {};  // [shape][kind]
  Codecs() {
    for (int s = 0; s < kNumTileShapes; ++s) {
      for (int k = 0; k < 2; ++k) {
        const kvc_codec_config c =
            kvc_fuzz::tile_codec_config(kTileShapes[s], k, KVC_BOUND_RELATIVE, 0.05f);
        KVC_FUZZ_CHECK(kvc_codec_create(&c, nullptr, &codec[s][k]) == KVC_SUCCESS);
      }
    }
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Codecs codecs;
  if (size < 1 || size > (size_t(1) << 24)) return 0;
  const kvc_fuzz::DecodeSelector sel = kvc_fuzz::parse_tile_selector(data[0]);
  const kvc_fuzz::Shape& shape = kTileShapes[sel.shape];
  const size_t n = size - 1;
  const kvc_fuzz::ExactCopy copy(data + 1, n);
  uint8_t* block = copy.p;
  if (block == nullptr) return 0;

  kvc_block_info info = KVC_BLOCK_INFO_INIT;
  const kvc_status_t inspect = kvc_block_inspect(block, n, &info);
  if (inspect == KVC_SUCCESS && info.encoding == KVC_ENCODING_TILES) {
    KVC_FUZZ_CHECK(info.block_bytes >= 32 && info.block_bytes <= n && info.block_bytes % 16 == 0);
    KVC_FUZZ_CHECK(info.kind == KVC_KIND_KEY || info.kind == KVC_KIND_VALUE);
    KVC_FUZZ_CHECK(info.num_tokens >= 16 && info.num_tokens <= 1024);
    KVC_FUZZ_CHECK(info.head_dim >= 16 && info.head_dim <= 256);
  } else if (inspect != KVC_SUCCESS) {
    KVC_FUZZ_CHECK(kvc_fuzz::is_data_status(inspect));
  }

  const size_t elem = sel.dtype == KVC_DTYPE_FP32 ? 4 : 2;
  const int64_t stride = shape.head_dim + (sel.padded ? 8 : 0);
  std::vector<uint8_t> out(size_t(shape.num_tokens) * size_t(stride) * elem, 0xA5);
  const void* src[1] = {block};
  void* dst[1] = {out.data()};
  const uint32_t src_bytes = uint32_t(n);
  kvc_status_t block_status = KVC_ERROR_INTERNAL;
  const kvc_status_t st = kvc_codec_decode(codecs.codec[sel.shape][sel.kind], 1, src, &src_bytes,
                                           sel.dtype, dst, stride, &block_status, nullptr);
  KVC_FUZZ_CHECK(st == block_status);
  if (st == KVC_SUCCESS) {
    KVC_FUZZ_CHECK(inspect == KVC_SUCCESS && info.encoding == KVC_ENCODING_TILES);
    KVC_FUZZ_CHECK(info.num_tokens == shape.num_tokens && info.head_dim == shape.head_dim);
    KVC_FUZZ_CHECK(info.kind == sel.kind);
    if (sel.padded) {
      for (int32_t t = 0; t < shape.num_tokens; ++t) {
        for (size_t i = size_t(shape.head_dim) * elem; i < size_t(stride) * elem; ++i) {
          KVC_FUZZ_CHECK(out[size_t(t) * size_t(stride) * elem + i] == 0xA5);
        }
      }
    }
  } else {
    KVC_FUZZ_CHECK(kvc_fuzz::is_data_status(st));
    KVC_FUZZ_CHECK(kvc_last_error()[0] != '\0');
  }
  return 0;
}
