// SPDX-License-Identifier: Apache-2.0
// Fuzzes the block decoder: kvc_block_inspect and kvc_codec_decode on arbitrary bytes, with
// codecs (K and V, several shapes, with and without a codebook) chosen by the input's first byte
// (fuzz_common.hpp). The contract (docs/format.md, kvcomp.h): a corrupt block gives a data status,
// never a crash, an out-of-bounds access or undefined behaviour; the decoder reads only the bytes
// it is given. The block is copied into an allocation of exactly its size so that AddressSanitizer
// catches any read past it.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fuzz_common.hpp"

namespace {

using kvc_fuzz::kNumShapes;
using kvc_fuzz::kShapes;

struct Codecs {
  // [shape][kind][with codebook]
  kvc_codec_t codec[kNumShapes][2][2] = {};
  uint32_t codebook_id = 0;

  Codecs() {
    kvc_codebook_t book = kvc_fuzz::make_fixed_codebook();
    KVC_FUZZ_CHECK(kvc_codebook_id(book, &codebook_id) == KVC_SUCCESS);
    for (int s = 0; s < kNumShapes; ++s) {
      for (int k = 0; k < 2; ++k) {
        for (int b = 0; b < 2; ++b) {
          const kvc_codec_config c =
              kvc_fuzz::codec_config(kShapes[s], k, KVC_ENTROPY_AUTO, KVC_BOUND_RELATIVE, 0.05f);
          KVC_FUZZ_CHECK(kvc_codec_create(&c, b ? book : nullptr, &codec[s][k][b]) == KVC_SUCCESS);
        }
      }
    }
    kvc_codebook_destroy(book);
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Codecs codecs;
  if (size < 1 || size > (size_t(1) << 24)) return 0;
  const kvc_fuzz::DecodeSelector sel = kvc_fuzz::parse_selector(data[0]);
  const kvc_fuzz::Shape& shape = kShapes[sel.shape];
  const size_t n = size - 1;

  // Exactly n bytes (malloc's alignment satisfies the decoder's 4-byte alignment).
  const kvc_fuzz::ExactCopy copy(data + 1, n);
  uint8_t* block = copy.p;
  if (block == nullptr) return 0;

  kvc_block_info info = KVC_BLOCK_INFO_INIT;
  const kvc_status_t inspect = kvc_block_inspect(block, n, &info);
  if (inspect == KVC_SUCCESS) {
    // What the header says was checked against the buffer.
    KVC_FUZZ_CHECK(info.format_version == KVC_FORMAT_VERSION);
    KVC_FUZZ_CHECK(info.block_bytes >= 32 && info.block_bytes <= n && info.block_bytes % 4 == 0);
    KVC_FUZZ_CHECK(info.kind == KVC_KIND_KEY || info.kind == KVC_KIND_VALUE);
    KVC_FUZZ_CHECK(info.encoding >= KVC_ENCODING_RAW && info.encoding <= KVC_ENCODING_TILES);
    KVC_FUZZ_CHECK(info.num_tokens >= 1 && info.num_tokens <= KVC_MAX_NUM_TOKENS);
    KVC_FUZZ_CHECK(info.head_dim >= 1 && info.head_dim <= KVC_MAX_HEAD_DIM);
  } else {
    KVC_FUZZ_CHECK(kvc_fuzz::is_data_status(inspect));
  }

  const size_t elem = sel.dtype == KVC_DTYPE_FP32 ? 4 : 2;
  const int64_t stride = shape.head_dim + (sel.padded ? 8 : 0);
  const size_t out_bytes = size_t(shape.num_tokens) * size_t(stride) * elem;
  std::vector<uint8_t> out(out_bytes, 0xA5);
  const void* src[1] = {block};
  void* dst[1] = {out.data()};
  const uint32_t src_bytes = uint32_t(n);
  kvc_status_t block_status = KVC_ERROR_INTERNAL;
  const kvc_status_t st =
      kvc_codec_decode(codecs.codec[sel.shape][sel.kind][sel.with_codebook ? 1 : 0], 1, src,
                       &src_bytes, sel.dtype, dst, stride, &block_status, nullptr);
  KVC_FUZZ_CHECK(st == block_status);
  if (st == KVC_SUCCESS) {
    // A block that decodes has a valid header of the codec's shape and kind.
    KVC_FUZZ_CHECK(inspect == KVC_SUCCESS);
    KVC_FUZZ_CHECK(info.num_tokens == shape.num_tokens && info.head_dim == shape.head_dim);
    KVC_FUZZ_CHECK(info.kind == sel.kind);
    if (info.encoding == KVC_ENCODING_HUFFMAN) {
      KVC_FUZZ_CHECK(sel.with_codebook && info.codebook_id == codecs.codebook_id);
    }
    // Padding between rows is never written.
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
