// SPDX-License-Identifier: Apache-2.0
// Header-only C++20 wrapper over the kvcomp C ABI: RAII handles, spans for buffers, and
// kvcomp::Error (status + kvc_last_error() message) thrown for every failed call. It adds no
// behaviour of its own: each method is one C call.
#pragma once

#if __cplusplus < 202002L && !(defined(_MSVC_LANG) && _MSVC_LANG >= 202002L)
#error "kvcomp.hpp needs C++20 (std::span); the C header kvcomp/kvcomp.h needs C99 or C++"
#endif

#include <kvcomp/kvcomp.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace kvcomp {

class Error : public std::runtime_error {
 public:
  Error(kvc_status_t status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  kvc_status_t status() const noexcept { return status_; }

 private:
  kvc_status_t status_;
};

// Throws kvcomp::Error for any status but KVC_SUCCESS.
inline void check(kvc_status_t status) {
  if (status != KVC_SUCCESS) {
    throw Error(status, std::string(kvc_status_string(status)) + ": " + kvc_last_error());
  }
}

namespace detail {
// An error the wrapper finds itself, before any C call, worded as check() words the library's.
inline Error invalid_argument(const std::string& message) {
  return Error(KVC_ERROR_INVALID_ARGUMENT,
               std::string(kvc_status_string(KVC_ERROR_INVALID_ARGUMENT)) + ": kvcomp: " + message);
}
// A span's size as the C ABI's int32 count (the C call would see a larger one truncated).
inline int32_t count(size_t size, const char* what) {
  if (size > size_t(INT32_MAX)) {
    throw invalid_argument(std::string(what) + " holds " + std::to_string(size) +
                           " elements, more than INT32_MAX");
  }
  return int32_t(size);
}
template <class Handle, kvc_status_t (*Destroy)(Handle)>
struct Deleter {
  void operator()(Handle h) const noexcept { Destroy(h); }
};
template <class Handle, kvc_status_t (*Destroy)(Handle)>
using Owned = std::unique_ptr<std::remove_pointer_t<Handle>, Deleter<Handle, Destroy>>;
}  // namespace detail

class Histogram {
 public:
  Histogram() {
    kvc_histogram_t h = nullptr;
    check(kvc_histogram_create(&h));
    handle_.reset(h);
  }
  void add_counts(int32_t first_symbol, std::span<const uint64_t> counts) {
    check(kvc_histogram_add_counts(get(), first_symbol, detail::count(counts.size(), "counts"),
                                   counts.data()));
  }
  uint64_t total() const {
    uint64_t t = 0;
    check(kvc_histogram_total(get(), &t));
    return t;
  }
  kvc_histogram_t get() const noexcept { return handle_.get(); }

 private:
  detail::Owned<kvc_histogram_t, kvc_histogram_destroy> handle_;
};

class Codebook {
 public:
  static Codebook build(const Histogram& histogram, const kvc_codebook_config* config = nullptr) {
    kvc_codebook_t h = nullptr;
    check(kvc_codebook_build(histogram.get(), config, &h));
    return Codebook(h);
  }
  static Codebook deserialize(std::span<const uint8_t> bytes) {
    kvc_codebook_t h = nullptr;
    check(kvc_codebook_deserialize(bytes.data(), bytes.size(), &h));
    return Codebook(h);
  }
  uint32_t id() const {
    uint32_t id = 0;
    check(kvc_codebook_id(get(), &id));
    return id;
  }
  int32_t code_length(int32_t symbol) const {
    int32_t bits = 0;
    check(kvc_codebook_code_length(get(), symbol, &bits));
    return bits;
  }
  std::vector<uint8_t> serialize() const {
    size_t size = 0;
    check(kvc_codebook_serialized_size(get(), &size));
    std::vector<uint8_t> bytes(size);
    check(kvc_codebook_serialize(get(), bytes.data(), bytes.size(), &size));
    return bytes;
  }
  kvc_codebook_t get() const noexcept { return handle_.get(); }

 private:
  friend class Store;
  explicit Codebook(kvc_codebook_t h) : handle_(h) {}
  detail::Owned<kvc_codebook_t, kvc_codebook_destroy> handle_;
};

// A codec on the CPU backend works on host memory; the single-block helpers below are for it.
// The batched methods forward to the C calls and work on either backend.
class Codec {
 public:
  explicit Codec(const kvc_codec_config& config, const Codebook* codebook = nullptr) {
    kvc_codec_t h = nullptr;
    check(kvc_codec_create(&config, codebook ? codebook->get() : nullptr, &h));
    handle_.reset(h);
  }
  size_t max_block_bytes(kvc_dtype src_dtype) const {
    size_t bytes = 0;
    check(kvc_codec_max_block_bytes(get(), src_dtype, &bytes));
    return bytes;
  }
  // One block [num_tokens, head_dim] at src (rows token_stride elements apart) into dst;
  // returns the bytes written.
  size_t encode(const void* src, kvc_dtype src_dtype, int64_t token_stride,
                std::span<uint8_t> dst) const {
    void* dst_ptr = dst.data();
    uint32_t written = 0;
    check(kvc_codec_encode(get(), 1, &src, token_stride, src_dtype, &dst_ptr, dst.size(), &written,
                           nullptr));
    return written;
  }
  // One block into a new buffer of exactly its size.
  std::vector<uint8_t> encode(const void* src, kvc_dtype src_dtype, int64_t token_stride) const {
    std::vector<uint8_t> out(max_block_bytes(src_dtype));
    out.resize(encode(src, src_dtype, token_stride, out));
    return out;
  }
  void decode(std::span<const uint8_t> block, kvc_dtype dst_dtype, void* dst,
              int64_t token_stride) const {
    const void* src = block.data();
    const uint32_t bytes = uint32_t(std::min<size_t>(block.size(), UINT32_MAX));
    check(
        kvc_codec_decode(get(), 1, &src, &bytes, dst_dtype, &dst, token_stride, nullptr, nullptr));
  }
  void add_to_histogram(const void* src, kvc_dtype src_dtype, int64_t token_stride,
                        Histogram& histogram) const {
    check(kvc_codec_histogram(get(), 1, &src, token_stride, src_dtype, histogram.get(), nullptr));
  }

  void encode_batch(std::span<const void* const> src_blocks, int64_t src_token_stride,
                    kvc_dtype src_dtype, std::span<void* const> dst_blocks,
                    size_t dst_capacity_bytes, uint32_t* block_bytes,
                    void* stream = nullptr) const {
    require_same_size(src_blocks.size(), dst_blocks.size());
    check(kvc_codec_encode(get(), detail::count(src_blocks.size(), "src_blocks"), src_blocks.data(),
                           src_token_stride, src_dtype, dst_blocks.data(), dst_capacity_bytes,
                           block_bytes, stream));
  }
  void decode_batch(std::span<const void* const> src_blocks, const uint32_t* src_bytes,
                    kvc_dtype dst_dtype, std::span<void* const> dst_blocks,
                    int64_t dst_token_stride, kvc_status_t* block_status = nullptr,
                    void* stream = nullptr) const {
    require_same_size(src_blocks.size(), dst_blocks.size());
    check(kvc_codec_decode(get(), detail::count(src_blocks.size(), "src_blocks"), src_blocks.data(),
                           src_bytes, dst_dtype, dst_blocks.data(), dst_token_stride, block_status,
                           stream));
  }
  kvc_codec_t get() const noexcept { return handle_.get(); }

 private:
  static void require_same_size(size_t a, size_t b) {
    if (a != b) {
      throw detail::invalid_argument("Codec: source and destination block spans differ in size");
    }
  }
  detail::Owned<kvc_codec_t, kvc_codec_destroy> handle_;
};

// The paged store. Tensors are host memory on the CPU backend, device memory on CUDA (with a
// stream); see kvcomp.h for the contract, including how the CUDA backend reports data errors
// (stats().last_append_status) instead of throwing. No method is const: every store call may
// change the handle's state (CPU attention's decoded copies, the serialized bytes kept between
// serialize's two calls), and one store must not be used by two threads at once.
class Store {
 public:
  explicit Store(const kvc_store_config& config) {
    kvc_store_t h = nullptr;
    check(kvc_store_create(&config, &h));
    handle_.reset(h);
  }
  void set_codebook(int32_t layer, kvc_kind kind, const Codebook& codebook) {
    check(kvc_store_set_codebook(get(), layer, kind, codebook.get()));
  }
  std::optional<Codebook> codebook(int32_t layer, kvc_kind kind) {
    kvc_codebook_t h = nullptr;
    check(kvc_store_get_codebook(get(), layer, kind, &h));
    if (h == nullptr) return std::nullopt;
    return Codebook(h);
  }
  int32_t add_sequence() {
    int32_t id = -1;
    check(kvc_store_add_sequence(get(), &id));
    return id;
  }
  void free_sequence(int32_t id, void* stream = nullptr) {
    check(kvc_store_free_sequence(get(), id, stream));
  }
  int32_t length(int32_t id, int32_t layer) {
    int32_t n = 0;
    check(kvc_store_sequence_length(get(), id, layer, &n));
    return n;
  }
  void prefill(int32_t id, int32_t first_layer, int32_t num_layers, int32_t num_tokens,
               const void* keys, const void* values, void* stream = nullptr) {
    check(kvc_store_prefill(get(), id, first_layer, num_layers, num_tokens, keys, values, stream));
  }
  void append(int32_t layer, std::span<const int32_t> ids, const void* keys, const void* values,
              void* stream = nullptr) {
    check(kvc_store_append(get(), layer, detail::count(ids.size(), "ids"), ids.data(), keys, values,
                           stream));
  }
  void read(int32_t id, int32_t layer, kvc_dtype dtype, int32_t capacity_tokens, void* keys,
            void* values, void* stream = nullptr) {
    check(kvc_store_read(get(), id, layer, dtype, capacity_tokens, keys, values, stream));
  }
  void attention(int32_t layer, std::span<const int32_t> ids, int32_t num_q_heads, float scale,
                 const void* queries, void* out, void* stream = nullptr) {
    check(kvc_store_attention(get(), layer, detail::count(ids.size(), "ids"), ids.data(),
                              num_q_heads, scale, queries, out, stream));
  }
  kvc_store_stats stats() {
    kvc_store_stats s = KVC_STORE_STATS_INIT;
    check(kvc_store_get_stats(get(), &s));
    return s;
  }
  std::vector<uint8_t> serialize(int32_t id) {
    size_t size = 0;
    check(kvc_store_serialized_size(get(), id, &size));
    std::vector<uint8_t> bytes(size);
    check(kvc_store_serialize(get(), id, bytes.data(), bytes.size(), &size));
    return bytes;
  }
  int32_t restore(std::span<const uint8_t> bytes) {
    int32_t id = -1;
    check(kvc_store_restore(get(), bytes.data(), bytes.size(), &id));
    return id;
  }
  kvc_store_t get() const noexcept { return handle_.get(); }

 private:
  detail::Owned<kvc_store_t, kvc_store_destroy> handle_;
};

inline kvc_block_info inspect(std::span<const uint8_t> block) {
  kvc_block_info info = KVC_BLOCK_INFO_INIT;
  check(kvc_block_inspect(block.data(), block.size(), &info));
  return info;
}

}  // namespace kvcomp
