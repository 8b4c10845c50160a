// SPDX-License-Identifier: Apache-2.0
// API misuse through the C ABI: every bad argument gives the right status, a message naming
// the problem, and leaves outputs and handles as they were.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <kvcomp/kvcomp.hpp>
#include <string>
#include <thread>
#include <vector>

#include "kernels/common/format.cuh"

namespace {

// Expects a status and a last-error message containing `needle`.
#define EXPECT_FAILS(call, status, needle)                                         \
  do {                                                                             \
    kvc_clear_last_error();                                                        \
    EXPECT_EQ((call), (status));                                                   \
    EXPECT_NE(std::string(kvc_last_error()).find(needle), std::string::npos)       \
        << "message: \"" << kvc_last_error() << "\" lacks \"" << (needle) << "\""; \
  } while (0)

TEST(Api, VersionsAndStatusStrings) {
  EXPECT_EQ(kvc_version_number(), uint32_t(KVC_VERSION_NUMBER));
  EXPECT_EQ(std::string(kvc_version_string()), std::to_string(KVC_VERSION_MAJOR) + "." +
                                                   std::to_string(KVC_VERSION_MINOR) + "." +
                                                   std::to_string(KVC_VERSION_PATCH));
  const kvc_status_t all[] = {KVC_SUCCESS,
                              KVC_ERROR_INVALID_ARGUMENT,
                              KVC_ERROR_NULL_POINTER,
                              KVC_ERROR_BUFFER_TOO_SMALL,
                              KVC_ERROR_ABI_MISMATCH,
                              KVC_ERROR_NOT_SUPPORTED,
                              KVC_ERROR_NONFINITE_INPUT,
                              KVC_ERROR_CORRUPT_DATA,
                              KVC_ERROR_CODEBOOK_MISMATCH,
                              KVC_ERROR_FORMAT_VERSION,
                              KVC_ERROR_CONFIG_MISMATCH,
                              KVC_ERROR_UNKNOWN_SEQUENCE,
                              KVC_ERROR_OUT_OF_PAGES,
                              KVC_ERROR_OUT_OF_MEMORY,
                              KVC_ERROR_CUDA,
                              KVC_ERROR_NO_DEVICE,
                              KVC_ERROR_INTERNAL};
  std::vector<std::string> seen;
  for (kvc_status_t s : all) {
    const std::string text = kvc_status_string(s);
    EXPECT_NE(text, "unknown status") << s;
    EXPECT_EQ(std::count(seen.begin(), seen.end(), text), 0) << text;
    seen.push_back(text);
  }
  EXPECT_STREQ(kvc_status_string(kvc_status_t(12345)), "unknown status");
}

TEST(Api, DestroyNullIsANoOp) {
  EXPECT_EQ(kvc_codec_destroy(nullptr), KVC_SUCCESS);
  EXPECT_EQ(kvc_codebook_destroy(nullptr), KVC_SUCCESS);
  EXPECT_EQ(kvc_histogram_destroy(nullptr), KVC_SUCCESS);
}

kvc_codec_config valid_config() {
  kvc_codec_config c = KVC_CODEC_CONFIG_INIT;
  c.num_tokens = 16;
  c.head_dim = 64;
  return c;
}

TEST(Api, CodecCreateRejectsEachBadField) {
  kvc_codec_t untouched = reinterpret_cast<kvc_codec_t>(0x1234);
  auto with = [](auto mutate) {
    kvc_codec_config c = valid_config();
    mutate(c);
    return c;
  };
  struct Case {
    kvc_codec_config config;
    kvc_status_t status;
    const char* needle;
  };
  const Case cases[] = {
      {with([](auto& c) { c.struct_size = 8; }), KVC_ERROR_ABI_MISMATCH, "struct_size = 8"},
      {with([](auto& c) { c.abi_version = 99; }), KVC_ERROR_ABI_MISMATCH, "abi_version = 99"},
      {with([](auto& c) { c.backend = 7; }), KVC_ERROR_INVALID_ARGUMENT, "backend = 7"},
      {with([](auto& c) { c.kind = 2; }), KVC_ERROR_INVALID_ARGUMENT, "kind = 2"},
      {with([](auto& c) { c.num_tokens = 0; }), KVC_ERROR_INVALID_ARGUMENT, "num_tokens = 0"},
      {with([](auto& c) { c.num_tokens = 5000; }), KVC_ERROR_INVALID_ARGUMENT, "[1, 1024]"},
      {with([](auto& c) { c.head_dim = -3; }), KVC_ERROR_INVALID_ARGUMENT, "head_dim = -3"},
      {with([](auto& c) { c.bound_mode = 4; }), KVC_ERROR_INVALID_ARGUMENT, "bound_mode = 4"},
      {with([](auto& c) { c.error_bound = 0; }), KVC_ERROR_INVALID_ARGUMENT, "error_bound = 0"},
      {with([](auto& c) { c.error_bound = 1.5f; }), KVC_ERROR_INVALID_ARGUMENT, "(0, 1]"},
      {with([](auto& c) {
         c.bound_mode = KVC_BOUND_ABSOLUTE;
         c.error_bound = INFINITY;
       }),
       KVC_ERROR_INVALID_ARGUMENT, "finite"},
      {with([](auto& c) { c.entropy = 9; }), KVC_ERROR_INVALID_ARGUMENT, "entropy = 9"},
      {with([](auto& c) { c.entropy = KVC_ENTROPY_HUFFMAN; }), KVC_ERROR_INVALID_ARGUMENT,
       "needs a codebook"},
      {with([](auto& c) { c.value_group_size = 8; }), KVC_ERROR_INVALID_ARGUMENT,
       "must be 0 for keys"},
      {with([](auto& c) {
         c.kind = KVC_KIND_VALUE;
         c.value_group_size = 48;
       }),
       KVC_ERROR_INVALID_ARGUMENT, "must divide head_dim"},
      {with([](auto& c) { c.num_substreams = 3; }), KVC_ERROR_INVALID_ARGUMENT,
       "num_substreams = 3"},
  };
  for (const Case& k : cases) {
    EXPECT_FAILS(kvc_codec_create(&k.config, nullptr, &untouched), k.status, k.needle);
    EXPECT_EQ(untouched, reinterpret_cast<kvc_codec_t>(0x1234));
  }
  EXPECT_FAILS(kvc_codec_create(nullptr, nullptr, &untouched), KVC_ERROR_NULL_POINTER, "config");
  const kvc_codec_config good = valid_config();
  EXPECT_FAILS(kvc_codec_create(&good, nullptr, nullptr), KVC_ERROR_NULL_POINTER, "codec");
}

TEST(Api, CudaBackendWithoutAGpuIsAClearError) {
  kvc_codec_config c = valid_config();
  c.backend = KVC_BACKEND_CUDA;
  kvc_codec_t codec = nullptr;
  const kvc_status_t s = kvc_codec_create(&c, nullptr, &codec);
  if (s == KVC_SUCCESS) {
    kvc_codec_destroy(codec);
    GTEST_SKIP() << "a GPU is present: the CUDA backend is tested in tests/gpu";
  }
  // A CPU-only build says so; a CUDA build on a machine without a GPU says that.
  EXPECT_TRUE(s == KVC_ERROR_NOT_SUPPORTED || s == KVC_ERROR_NO_DEVICE) << kvc_status_string(s);
  EXPECT_NE(std::string(kvc_last_error()).find(s == KVC_ERROR_NO_DEVICE ? "GPU" : "CUDA"),
            std::string::npos)
      << kvc_last_error();
  EXPECT_EQ(codec, nullptr);
}

class CodecApi : public ::testing::Test {
 protected:
  void SetUp() override {
    const kvc_codec_config c = valid_config();
    ASSERT_EQ(kvc_codec_create(&c, nullptr, &codec_), KVC_SUCCESS);
    ASSERT_EQ(kvc_codec_max_block_bytes(codec_, KVC_DTYPE_FP32, &capacity_), KVC_SUCCESS);
    input_.assign(16 * 64, 0.5f);
    output_.assign(capacity_, 0);
    src_ = input_.data();
    dst_ = output_.data();
  }
  void TearDown() override { kvc_codec_destroy(codec_); }
  kvc_status_t encode(int32_t n, int64_t stride, kvc_dtype dtype, size_t capacity,
                      void* stream = nullptr) {
    return kvc_codec_encode(codec_, n, &src_, stride, dtype, &dst_, capacity, &written_, stream);
  }
  kvc_codec_t codec_ = nullptr;
  size_t capacity_ = 0;
  std::vector<float> input_;
  std::vector<uint8_t> output_;
  const void* src_ = nullptr;
  void* dst_ = nullptr;
  uint32_t written_ = 777;
};

TEST_F(CodecApi, EncodeRejectsBadArguments) {
  EXPECT_FAILS(
      kvc_codec_encode(nullptr, 1, &src_, 64, KVC_DTYPE_FP32, &dst_, capacity_, &written_, nullptr),
      KVC_ERROR_NULL_POINTER, "codec is NULL");
  EXPECT_FAILS(encode(-1, 64, KVC_DTYPE_FP32, capacity_), KVC_ERROR_INVALID_ARGUMENT,
               "num_blocks = -1");
  EXPECT_FAILS(kvc_codec_encode(codec_, 1, nullptr, 64, KVC_DTYPE_FP32, &dst_, capacity_, &written_,
                                nullptr),
               KVC_ERROR_NULL_POINTER, "src_blocks");
  EXPECT_FAILS(kvc_codec_encode(codec_, 1, &src_, 64, KVC_DTYPE_FP32, nullptr, capacity_, &written_,
                                nullptr),
               KVC_ERROR_NULL_POINTER, "dst_blocks");
  EXPECT_FAILS(
      kvc_codec_encode(codec_, 1, &src_, 64, KVC_DTYPE_FP32, &dst_, capacity_, nullptr, nullptr),
      KVC_ERROR_NULL_POINTER, "block_bytes");
  EXPECT_FAILS(encode(1, 63, KVC_DTYPE_FP32, capacity_), KVC_ERROR_INVALID_ARGUMENT,
               "src_token_stride = 63");
  EXPECT_FAILS(encode(1, 64, kvc_dtype(0), capacity_), KVC_ERROR_INVALID_ARGUMENT, "src_dtype = 0");
  int dummy = 0;
  EXPECT_FAILS(encode(1, 64, KVC_DTYPE_FP32, capacity_, &dummy), KVC_ERROR_INVALID_ARGUMENT,
               "stream must be NULL");
  EXPECT_FAILS(encode(1, 64, KVC_DTYPE_FP32, 40), KVC_ERROR_BUFFER_TOO_SMALL, "block 0");
  const void* null_block = nullptr;
  EXPECT_FAILS(kvc_codec_encode(codec_, 1, &null_block, 64, KVC_DTYPE_FP32, &dst_, capacity_,
                                &written_, nullptr),
               KVC_ERROR_NULL_POINTER, "src_blocks[0]");
  void* misaligned = output_.data() + 1;
  EXPECT_FAILS(kvc_codec_encode(codec_, 1, &src_, 64, KVC_DTYPE_FP32, &misaligned, capacity_ - 1,
                                &written_, nullptr),
               KVC_ERROR_INVALID_ARGUMENT, "dst_blocks[0] is not 4-byte aligned");
  const void* odd_src = reinterpret_cast<const uint8_t*>(input_.data()) + 2;  // fp32 elements
  EXPECT_FAILS(kvc_codec_encode(codec_, 1, &odd_src, 64, KVC_DTYPE_FP32, &dst_, capacity_,
                                &written_, nullptr),
               KVC_ERROR_INVALID_ARGUMENT, "src_blocks[0] is not 4-byte aligned");
  EXPECT_EQ(written_, 777u);  // no failed call wrote its output
  EXPECT_EQ(encode(0, 64, KVC_DTYPE_FP32, capacity_), KVC_SUCCESS);  // an empty batch is fine
  EXPECT_EQ(written_, 777u);
  EXPECT_EQ(encode(1, 64, KVC_DTYPE_FP32, capacity_), KVC_SUCCESS);
  EXPECT_LE(written_, capacity_);
}

TEST_F(CodecApi, TooSmallCapacityWritesNoBlock) {
  // Block 0 compresses to little; block 1 (noise at a tiny bound) stays nearly verbatim.
  std::vector<float> noise(16 * 64);
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = float((i * 2654435761u) % 1000) * 1.37f;
  kvc_codec_config c = valid_config();
  c.bound_mode = KVC_BOUND_ABSOLUTE;
  c.error_bound = 1e-4f;
  kvc_codec_t codec = nullptr;
  ASSERT_EQ(kvc_codec_create(&c, nullptr, &codec), KVC_SUCCESS);
  const void* src[2] = {input_.data(), noise.data()};
  std::vector<uint8_t> a(capacity_, 0x11), b(capacity_, 0x22);
  void* dst[2] = {a.data(), b.data()};
  uint32_t sizes[2] = {5, 5};
  EXPECT_FAILS(kvc_codec_encode(codec, 2, src, 64, KVC_DTYPE_FP32, dst, 512, sizes, nullptr),
               KVC_ERROR_BUFFER_TOO_SMALL, "block 1 needs");
  EXPECT_EQ(sizes[0], 5u);
  EXPECT_TRUE(std::all_of(a.begin(), a.end(), [](uint8_t v) { return v == 0x11; }));
  kvc_codec_destroy(codec);
}

TEST_F(CodecApi, DecodeRejectsBadArguments) {
  ASSERT_EQ(encode(1, 64, KVC_DTYPE_FP32, capacity_), KVC_SUCCESS);
  std::vector<float> out(16 * 64);
  void* out_ptr = out.data();
  const void* block = output_.data();
  const uint32_t size = written_;
  EXPECT_FAILS(
      kvc_codec_decode(codec_, 1, &block, nullptr, KVC_DTYPE_FP32, &out_ptr, 64, nullptr, nullptr),
      KVC_ERROR_NULL_POINTER, "src_bytes");
  EXPECT_FAILS(
      kvc_codec_decode(codec_, 1, &block, &size, KVC_DTYPE_FP32, &out_ptr, 10, nullptr, nullptr),
      KVC_ERROR_INVALID_ARGUMENT, "dst_token_stride = 10");
  EXPECT_FAILS(
      kvc_codec_decode(codec_, 1, &block, &size, kvc_dtype(4), &out_ptr, 64, nullptr, nullptr),
      KVC_ERROR_INVALID_ARGUMENT, "dst_dtype = 4");
  void* odd_out = reinterpret_cast<uint8_t*>(out.data()) + 1;
  EXPECT_FAILS(
      kvc_codec_decode(codec_, 1, &block, &size, KVC_DTYPE_FP16, &odd_out, 64, nullptr, nullptr),
      KVC_ERROR_INVALID_ARGUMENT, "dst_blocks[0] is not 2-byte aligned");
  const uint32_t short_size = size - 4;
  EXPECT_FAILS(kvc_codec_decode(codec_, 1, &block, &short_size, KVC_DTYPE_FP32, &out_ptr, 64,
                                nullptr, nullptr),
               KVC_ERROR_CORRUPT_DATA, "exceeds the bytes available");
  EXPECT_EQ(
      kvc_codec_decode(codec_, 1, &block, &size, KVC_DTYPE_FP32, &out_ptr, 64, nullptr, nullptr),
      KVC_SUCCESS);
  EXPECT_EQ(out, input_);
}

TEST_F(CodecApi, HistogramAndCodebookCallsValidate) {
  kvc_histogram_t h = nullptr;
  ASSERT_EQ(kvc_histogram_create(&h), KVC_SUCCESS);
  EXPECT_FAILS(kvc_codec_histogram(codec_, 1, &src_, 64, KVC_DTYPE_FP32, nullptr, nullptr),
               KVC_ERROR_NULL_POINTER, "histogram");
  const void* odd_src = reinterpret_cast<const uint8_t*>(input_.data()) + 1;
  EXPECT_FAILS(kvc_codec_histogram(codec_, 1, &odd_src, 64, KVC_DTYPE_FP16, h, nullptr),
               KVC_ERROR_INVALID_ARGUMENT, "src_blocks[0] is not 2-byte aligned");
  std::vector<float> bad = input_;
  bad[100] = NAN;
  const void* bad_ptr = bad.data();
  EXPECT_FAILS(kvc_codec_histogram(codec_, 1, &bad_ptr, 64, KVC_DTYPE_FP32, h, nullptr),
               KVC_ERROR_NONFINITE_INPUT, "token 1 channel 36");
  uint64_t total = 99;
  ASSERT_EQ(kvc_histogram_total(h, &total), KVC_SUCCESS);
  EXPECT_EQ(total, 0u);  // the failed call added nothing
  const uint64_t huge[] = {UINT64_MAX, 1};
  EXPECT_FAILS(kvc_histogram_add_counts(h, 0, 2, huge), KVC_ERROR_INVALID_ARGUMENT, "overflow");
  ASSERT_EQ(kvc_histogram_total(h, &total), KVC_SUCCESS);
  EXPECT_EQ(total, 0u);
  EXPECT_FAILS(kvc_histogram_add_counts(h, INT32_MAX, 2, huge), KVC_ERROR_INVALID_ARGUMENT,
               "overflows int32");
  EXPECT_FAILS(kvc_histogram_add_counts(h, 0, 2, nullptr), KVC_ERROR_NULL_POINTER, "counts");

  kvc_codebook_config bad_config = KVC_CODEBOOK_CONFIG_INIT;
  bad_config.max_code_length = 16;
  kvc_codebook_t book = nullptr;
  EXPECT_FAILS(kvc_codebook_build(h, &bad_config, &book), KVC_ERROR_INVALID_ARGUMENT,
               "max_code_length = 16");
  bad_config = KVC_CODEBOOK_CONFIG_INIT;
  bad_config.max_symbols = 0;
  EXPECT_FAILS(kvc_codebook_build(h, &bad_config, &book), KVC_ERROR_INVALID_ARGUMENT,
               "max_symbols = 0");
  bad_config = KVC_CODEBOOK_CONFIG_INIT;
  bad_config.struct_size = 4;
  EXPECT_FAILS(kvc_codebook_build(h, &bad_config, &book), KVC_ERROR_ABI_MISMATCH, "struct_size");
  EXPECT_EQ(book, nullptr);

  ASSERT_EQ(kvc_codebook_build(h, nullptr, &book), KVC_SUCCESS);
  size_t size = 0, written = 0;
  ASSERT_EQ(kvc_codebook_serialized_size(book, &size), KVC_SUCCESS);
  std::vector<uint8_t> bytes(size);
  EXPECT_FAILS(kvc_codebook_serialize(book, bytes.data(), size - 1, &written),
               KVC_ERROR_BUFFER_TOO_SMALL, "needs");
  EXPECT_EQ(written, 0u);
  EXPECT_EQ(kvc_codebook_serialize(book, bytes.data(), size, &written), KVC_SUCCESS);
  EXPECT_EQ(written, size);
  kvc_codebook_t parsed = nullptr;
  EXPECT_FAILS(kvc_codebook_deserialize(bytes.data(), size - 1, &parsed), KVC_ERROR_CORRUPT_DATA,
               "codebook");
  EXPECT_EQ(parsed, nullptr);
  EXPECT_FAILS(kvc_codebook_deserialize(nullptr, size, &parsed), KVC_ERROR_NULL_POINTER, "h_src");
  kvc_codebook_destroy(book);
  kvc_histogram_destroy(h);
}

TEST_F(CodecApi, InspectValidatesItsStruct) {
  ASSERT_EQ(encode(1, 64, KVC_DTYPE_FP32, capacity_), KVC_SUCCESS);
  kvc_block_info info = KVC_BLOCK_INFO_INIT;
  info.struct_size = 3;
  EXPECT_FAILS(kvc_block_inspect(output_.data(), written_, &info), KVC_ERROR_ABI_MISMATCH,
               "info->struct_size = 3");
  info = KVC_BLOCK_INFO_INIT;
  ASSERT_EQ(kvc_block_inspect(output_.data(), written_, &info), KVC_SUCCESS);
  EXPECT_EQ(info.block_bytes, written_);
  EXPECT_EQ(info.num_tokens, 16);
  EXPECT_EQ(info.head_dim, 64);
  EXPECT_EQ(info.kind, KVC_KIND_KEY);
  EXPECT_EQ(info.num_groups, 64);
  EXPECT_EQ(info.format_version, uint32_t(KVC_FORMAT_VERSION));
}

TEST(Api, LastErrorIsPerThread) {
  kvc_clear_last_error();
  std::string other;
  std::thread t([&] {
    kvc_codec_t c = nullptr;
    EXPECT_EQ(kvc_codec_create(nullptr, nullptr, &c), KVC_ERROR_NULL_POINTER);
    other = kvc_last_error();
  });
  t.join();
  EXPECT_NE(other.find("kvc_codec_create: config is NULL"), std::string::npos) << other;
  EXPECT_STREQ(kvc_last_error(), "");
}

TEST(Api, CppWrapperThrowsStatusAndMessage) {
  kvc_codec_config c = valid_config();
  c.head_dim = 0;
  try {
    kvcomp::Codec codec(c);
    FAIL() << "expected kvcomp::Error";
  } catch (const kvcomp::Error& e) {
    EXPECT_EQ(e.status(), KVC_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("head_dim = 0"), std::string::npos) << e.what();
  }
  // An error the wrapper finds itself is worded the same way: "<status string>: <message>".
  const kvcomp::Codec codec(valid_config());
  const void* src[2] = {nullptr, nullptr};
  void* dst[1] = {nullptr};
  uint32_t bytes[2];
  try {
    codec.encode_batch(src, 64, KVC_DTYPE_FP32, dst, 1024, bytes);
    FAIL() << "expected kvcomp::Error";
  } catch (const kvcomp::Error& e) {
    EXPECT_EQ(e.status(), KVC_ERROR_INVALID_ARGUMENT);
    EXPECT_EQ(std::string(e.what()),
              "invalid argument: kvcomp: Codec: source and destination block spans differ in size");
  }
}

TEST(Api, CppStoreWrapsTheStoreCalls) {
  kvc_store_config c = KVC_STORE_CONFIG_INIT;
  c.num_kv_heads = 2;
  c.head_dim = 32;
  c.block_tokens = 16;
  c.capacity_bytes = 1 << 20;
  kvcomp::Store store(c);
  EXPECT_FALSE(store.codebook(0, KVC_KIND_KEY).has_value());
  const int32_t id = store.add_sequence();
  const size_t tokens = 20, row = 2 * 32;
  std::vector<uint16_t> k(tokens * row), v(tokens * row);
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = kvc::format::float_to_half(float(i % 13) * 0.25f - 1.0f);
    v[i] = kvc::format::float_to_half(float(i % 7) * 0.5f);
  }
  store.prefill(id, 0, 1, int32_t(tokens), k.data(), v.data());
  EXPECT_EQ(store.length(id, 0), int32_t(tokens));
  ASSERT_TRUE(store.codebook(0, KVC_KIND_VALUE).has_value());
  std::vector<float> rk(tokens * row), rv(tokens * row);
  store.read(id, 0, KVC_DTYPE_FP32, int32_t(tokens), rk.data(), rv.data());
  EXPECT_EQ(rk[row * 19], kvc::format::half_to_float(k[row * 19]));  // a tail token: exact
  const int32_t copy = store.restore(store.serialize(id));
  EXPECT_EQ(store.length(copy, 0), int32_t(tokens));
  const int32_t ids[] = {id, copy};
  std::vector<uint16_t> q(2 * row, kvc::format::float_to_half(0.1f)), out(2 * row);
  store.attention(0, ids, 2, 0.125f, q.data(), out.data());
  EXPECT_EQ(out[0], out[row]);  // same sequence, same query
  EXPECT_EQ(store.stats().num_sequences, 2);
  store.free_sequence(copy);
  try {
    store.length(copy, 0);
    FAIL() << "expected kvcomp::Error";
  } catch (const kvcomp::Error& e) {
    EXPECT_EQ(e.status(), KVC_ERROR_UNKNOWN_SEQUENCE);
  }
}

}  // namespace
