// SPDX-License-Identifier: Apache-2.0
// Fuzzes kvc_codebook_deserialize on arbitrary bytes (input layout in fuzz_common.hpp). A
// malformed codebook must give a data status; one that parses must be usable:
//   - it serializes back to bytes that parse to the same codebook (same id and bytes);
//   - a block encoded with it (Huffman forced) decodes within the error bound, element by
//     element: whatever code lengths the parser accepts form a working prefix code;
//   - the rest of the input, decoded as a block with a codec of the shape its header states
//     and this codebook, gives a status, never a crash.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fuzz_common.hpp"

namespace {

void check_round_trip(kvc_codebook_t book, uint32_t id, int32_t kind) {
  const kvc_fuzz::Shape shape = {16, 64, 16, 0};
  const float error_bound = 0.05f;
  const kvc_codec_config c =
      kvc_fuzz::codec_config(shape, kind, KVC_ENTROPY_HUFFMAN, KVC_BOUND_ABSOLUTE, error_bound);
  kvc_codec_t codec = nullptr;
  KVC_FUZZ_CHECK(kvc_codec_create(&c, book, &codec) == KVC_SUCCESS);
  std::vector<float> x;
  kvc_fuzz::fill_block(x, shape, id, 0);
  const std::vector<uint8_t> encoded =
      kvc_fuzz::encode_block(codec, x.data(), KVC_DTYPE_FP32, shape.head_dim);
  const uint32_t block_bytes = uint32_t(encoded.size());
  std::vector<float> y(x.size(), NAN);
  const void* enc[1] = {encoded.data()};
  void* out[1] = {y.data()};
  KVC_FUZZ_CHECK(kvc_codec_decode(codec, 1, enc, &block_bytes, KVC_DTYPE_FP32, out, shape.head_dim,
                                  nullptr, nullptr) == KVC_SUCCESS);
  for (size_t i = 0; i < x.size(); ++i) {
    KVC_FUZZ_CHECK(std::fabs(double(x[i]) - double(y[i])) <= double(error_bound));
  }
  kvc_codec_destroy(codec);
}

void decode_rest(kvc_codebook_t book, const uint8_t* data, size_t n) {
  kvc_fuzz::ExactCopy block(data, n);
  if (block.p == nullptr) return;
  kvc_block_info info = KVC_BLOCK_INFO_INIT;
  if (kvc_block_inspect(block.p, n, &info) != KVC_SUCCESS) return;
  // Bound the work per input: large shapes decode slowly and find nothing small ones do not.
  if (int64_t(info.num_tokens) * info.head_dim > (int64_t(1) << 16)) return;
  kvc_codec_config c = KVC_CODEC_CONFIG_INIT;
  c.kind = info.kind;
  c.num_tokens = info.num_tokens;
  c.head_dim = info.head_dim;
  c.value_group_size = info.kind == KVC_KIND_VALUE ? info.group_size : 0;
  c.num_substreams = info.num_substreams;
  kvc_codec_t codec = nullptr;
  if (kvc_codec_create(&c, book, &codec) != KVC_SUCCESS) return;
  std::vector<uint16_t> out(size_t(info.num_tokens) * size_t(info.head_dim));
  const void* src[1] = {block.p};
  void* dst[1] = {out.data()};
  const uint32_t src_bytes = uint32_t(n);
  const kvc_status_t st = kvc_codec_decode(codec, 1, src, &src_bytes, KVC_DTYPE_BF16, dst,
                                           info.head_dim, nullptr, nullptr);
  KVC_FUZZ_CHECK(st == KVC_SUCCESS || kvc_fuzz::is_data_status(st));
  kvc_codec_destroy(codec);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < kvc_fuzz::kCodebookInputHeader || size > (size_t(1) << 20)) return 0;
  const bool fix_checksum = (data[0] & 1) != 0;
  size_t n = size_t(data[1]) | size_t(data[2]) << 8;
  const size_t avail = size - kvc_fuzz::kCodebookInputHeader;
  if (n > avail) n = avail;
  const uint8_t* cb = data + kvc_fuzz::kCodebookInputHeader;

  kvc_fuzz::ExactCopy bytes(cb, n);
  if (bytes.p == nullptr) return 0;
  if (fix_checksum && n >= 8) {
    const uint32_t h = kvc_fuzz::fnv1a32(bytes.p, n - 4);
    for (int i = 0; i < 4; ++i) bytes.p[n - 4 + size_t(i)] = uint8_t(h >> (8 * i));
  }

  kvc_codebook_t book = nullptr;
  const kvc_status_t st = kvc_codebook_deserialize(bytes.p, n, &book);
  if (st != KVC_SUCCESS) {
    KVC_FUZZ_CHECK(kvc_fuzz::is_data_status(st));
    KVC_FUZZ_CHECK(book == nullptr);
    KVC_FUZZ_CHECK(kvc_last_error()[0] != '\0');
    return 0;
  }
  KVC_FUZZ_CHECK(book != nullptr);

  // Serialization round trip.
  uint32_t id = 0, id2 = 1;
  size_t size_bytes = 0, written = 0;
  KVC_FUZZ_CHECK(kvc_codebook_id(book, &id) == KVC_SUCCESS);
  KVC_FUZZ_CHECK(kvc_codebook_serialized_size(book, &size_bytes) == KVC_SUCCESS);
  std::vector<uint8_t> again(size_bytes);
  KVC_FUZZ_CHECK(kvc_codebook_serialize(book, again.data(), again.size(), &written) == KVC_SUCCESS);
  KVC_FUZZ_CHECK(written == size_bytes);
  kvc_codebook_t book2 = nullptr;
  KVC_FUZZ_CHECK(kvc_codebook_deserialize(again.data(), again.size(), &book2) == KVC_SUCCESS);
  KVC_FUZZ_CHECK(kvc_codebook_id(book2, &id2) == KVC_SUCCESS);
  KVC_FUZZ_CHECK(id == id2);
  kvc_codebook_destroy(book2);

  // Code lengths are within the documented limits.
  for (int32_t symbol = -8; symbol <= 8; ++symbol) {
    int32_t length = -1;
    KVC_FUZZ_CHECK(kvc_codebook_code_length(book, symbol, &length) == KVC_SUCCESS);
    KVC_FUZZ_CHECK(length >= 0 && length <= KVC_MAX_CODE_LENGTH);
  }

  check_round_trip(book, id, (data[0] >> 1) & 1 ? KVC_KIND_VALUE : KVC_KIND_KEY);
  decode_rest(book, cb + n, avail - n);
  kvc_codebook_destroy(book);
  return 0;
}
