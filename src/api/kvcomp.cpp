// SPDX-License-Identifier: Apache-2.0
// The C ABI: argument validation and the translation of every failure into a status. The only
// place with extern "C" definitions.
#include <kvcomp/kvcomp.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "api/handles.hpp"
#include "codec/codebook.hpp"
#include "codec/codec_params.hpp"
#include "core/error.hpp"
#include "core/float_env.hpp"
#include "cpu/codec_cpu.hpp"
#include "cpu/tile_codec_cpu.hpp"
#include "kernels/common/format.cuh"
#include "kernels/common/tile_format.cuh"

namespace {

using kvc::fail;
using kvc::require;
using kvc::require_not_null;

// The checks every batched codec call shares; returns the codec's parameters.
const kvc::CodecParams& check_batch(kvc_codec_t codec, int32_t num_blocks, const void* blocks,
                                    const char* blocks_name, void* stream) {
  require_not_null(codec, "codec");
  require(num_blocks >= 0, KVC_ERROR_INVALID_ARGUMENT, "num_blocks = ", num_blocks, " is negative");
  require(num_blocks == 0 || blocks != nullptr, KVC_ERROR_NULL_POINTER, blocks_name, " is NULL");
  if (codec->params.backend == KVC_BACKEND_CPU) {
    require(stream == nullptr, KVC_ERROR_INVALID_ARGUMENT,
            "stream must be NULL on the CPU backend");
  }
  return codec->params;
}

void require_stride(int64_t stride, const kvc::CodecParams& p, const char* name) {
  require(stride >= int64_t(p.head_dim) && stride <= (int64_t(1) << 40), KVC_ERROR_INVALID_ARGUMENT,
          name, " = ", stride, " is out of range [head_dim = ", p.head_dim, ", 2^40]");
}

// Host-side checks of each block pointer: only where the arrays are host memory. Each pointer
// is at a multiple of its alignment (1: any address): the CPU codec reads and writes elements
// as their type, and blocks a word at a time.
void require_block_pointers(const kvc_codec_s& codec, int32_t num_blocks, const void* const* src,
                            uint32_t src_alignment, void* const* dst, uint32_t dst_alignment) {
  if (codec.on_cuda()) return;
  for (int32_t i = 0; i < num_blocks; ++i) {
    require(src[i] != nullptr, KVC_ERROR_NULL_POINTER, "src_blocks[", i, "] is NULL");
    require(reinterpret_cast<uintptr_t>(src[i]) % src_alignment == 0, KVC_ERROR_INVALID_ARGUMENT,
            "src_blocks[", i, "] is not ", src_alignment, "-byte aligned");
    if (dst == nullptr) continue;
    require(dst[i] != nullptr, KVC_ERROR_NULL_POINTER, "dst_blocks[", i, "] is NULL");
    require(reinterpret_cast<uintptr_t>(dst[i]) % dst_alignment == 0, KVC_ERROR_INVALID_ARGUMENT,
            "dst_blocks[", i, "] is not ", dst_alignment, "-byte aligned");
  }
}

}  // namespace

extern "C" {

uint32_t kvc_version_number(void) { return KVC_VERSION_NUMBER; }

const char* kvc_version_string(void) {
#define KVC_STR2(x) #x
#define KVC_STR(x) KVC_STR2(x)
  return KVC_STR(KVC_VERSION_MAJOR) "." KVC_STR(KVC_VERSION_MINOR) "." KVC_STR(KVC_VERSION_PATCH);
#undef KVC_STR
#undef KVC_STR2
}

const char* kvc_status_string(kvc_status_t status) {
  switch (kvc::c_enum_value(status)) {  // any int32 from C (kvc::c_enum_value)
    case KVC_SUCCESS:
      return "success";
    case KVC_ERROR_INVALID_ARGUMENT:
      return "invalid argument";
    case KVC_ERROR_NULL_POINTER:
      return "null pointer";
    case KVC_ERROR_BUFFER_TOO_SMALL:
      return "buffer too small";
    case KVC_ERROR_ABI_MISMATCH:
      return "config struct ABI mismatch";
    case KVC_ERROR_NOT_SUPPORTED:
      return "not supported";
    case KVC_ERROR_NONFINITE_INPUT:
      return "non-finite input";
    case KVC_ERROR_CORRUPT_DATA:
      return "corrupt data";
    case KVC_ERROR_CODEBOOK_MISMATCH:
      return "codebook mismatch";
    case KVC_ERROR_FORMAT_VERSION:
      return "unsupported format version";
    case KVC_ERROR_CONFIG_MISMATCH:
      return "data does not match the configuration";
    case KVC_ERROR_UNKNOWN_SEQUENCE:
      return "unknown sequence";
    case KVC_ERROR_OUT_OF_MEMORY:
      return "out of memory";
    case KVC_ERROR_OUT_OF_PAGES:
      return "out of pages";
    case KVC_ERROR_CUDA:
      return "CUDA error";
    case KVC_ERROR_NO_DEVICE:
      return "no CUDA device";
    case KVC_ERROR_INTERNAL:
      return "internal error";
    case KVC_STATUS_MAX_ENUM:
      break;
  }
  return "unknown status";
}

const char* kvc_last_error(void) { return kvc::last_error(); }

void kvc_clear_last_error(void) { kvc::clear_last_error(); }

// ---- Histograms and codebooks ---------------------------------------------------------------

kvc_status_t kvc_histogram_create(kvc_histogram_t* histogram) {
  return kvc::api_call(__func__, [&] {
    require_not_null(histogram, "histogram");
    *histogram = new kvc_histogram_s{};
  });
}

kvc_status_t kvc_histogram_destroy(kvc_histogram_t histogram) {
  delete histogram;
  return KVC_SUCCESS;
}

kvc_status_t kvc_histogram_add_counts(kvc_histogram_t histogram, int32_t first_symbol,
                                      int32_t num_symbols, const uint64_t* counts) {
  return kvc::api_call(__func__, [&] {
    require_not_null(histogram, "histogram");
    require(num_symbols >= 0, KVC_ERROR_INVALID_ARGUMENT, "num_symbols = ", num_symbols,
            " is negative");
    require(num_symbols == 0 || counts != nullptr, KVC_ERROR_NULL_POINTER, "counts is NULL");
    require(int64_t(first_symbol) + num_symbols - 1 <= INT32_MAX, KVC_ERROR_INVALID_ARGUMENT,
            "first_symbol + num_symbols - 1 = ", int64_t(first_symbol) + num_symbols - 1,
            " overflows int32");
    uint64_t added = 0;
    for (int32_t i = 0; i < num_symbols; ++i) {
      require(counts[i] <= UINT64_MAX - histogram->histogram.total() - added,
              KVC_ERROR_INVALID_ARGUMENT, "counts would overflow the histogram's 64-bit total");
      added += counts[i];
    }
    // Nothing below can fail (the totals were checked, adding allocates nothing).
    for (int32_t i = 0; i < num_symbols; ++i) {
      if (counts[i] != 0) histogram->histogram.add(first_symbol + i, counts[i]);
    }
  });
}

kvc_status_t kvc_histogram_total(kvc_histogram_t histogram, uint64_t* total) {
  return kvc::api_call(__func__, [&] {
    require_not_null(histogram, "histogram");
    *require_not_null(total, "total") = histogram->histogram.total();
  });
}

kvc_status_t kvc_codebook_build(kvc_histogram_t histogram, const kvc_codebook_config* config,
                                kvc_codebook_t* codebook) {
  return kvc::api_call(__func__, [&] {
    require_not_null(histogram, "histogram");
    require_not_null(codebook, "codebook");
    const kvc_codebook_config defaults = KVC_CODEBOOK_CONFIG_INIT;
    const kvc_codebook_config& c = config ? *config : defaults;
    kvc::check_struct_header(c, "config");
    require(c.max_code_length >= 2 && c.max_code_length <= KVC_MAX_CODE_LENGTH,
            KVC_ERROR_INVALID_ARGUMENT, "config->max_code_length = ", c.max_code_length,
            " is out of range [2, ", KVC_MAX_CODE_LENGTH, "]");
    require(c.max_symbols >= 1 && c.max_symbols <= KVC_MAX_CODEBOOK_SYMBOLS,
            KVC_ERROR_INVALID_ARGUMENT, "config->max_symbols = ", c.max_symbols,
            " is out of range [1, ", KVC_MAX_CODEBOOK_SYMBOLS, "]");
    auto book = std::make_shared<const kvc::Codebook>(
        kvc::Codebook::build(histogram->histogram, c.max_code_length, c.max_symbols));
    *codebook = new kvc_codebook_s{std::move(book)};
  });
}

kvc_status_t kvc_codebook_destroy(kvc_codebook_t codebook) {
  delete codebook;
  return KVC_SUCCESS;
}

kvc_status_t kvc_codebook_id(kvc_codebook_t codebook, uint32_t* id) {
  return kvc::api_call(__func__, [&] {
    require_not_null(codebook, "codebook");
    *require_not_null(id, "id") = codebook->book->id();
  });
}

kvc_status_t kvc_codebook_code_length(kvc_codebook_t codebook, int32_t symbol,
                                      int32_t* length_bits) {
  return kvc::api_call(__func__, [&] {
    require_not_null(codebook, "codebook");
    require_not_null(length_bits, "length_bits");
    const kvc::Codebook& book = *codebook->book;
    const uint32_t index = book.index_of(symbol);
    *length_bits = index == book.escape_index() ? 0 : int32_t(book.length(index));
  });
}

kvc_status_t kvc_codebook_serialized_size(kvc_codebook_t codebook, size_t* size_bytes) {
  return kvc::api_call(__func__, [&] {
    require_not_null(codebook, "codebook");
    *require_not_null(size_bytes, "size_bytes") = codebook->book->serialized().size();
  });
}

kvc_status_t kvc_codebook_serialize(kvc_codebook_t codebook, void* h_dst, size_t dst_capacity_bytes,
                                    size_t* written_bytes) {
  return kvc::api_call(__func__, [&] {
    require_not_null(codebook, "codebook");
    require_not_null(h_dst, "h_dst");
    require_not_null(written_bytes, "written_bytes");
    const std::vector<uint8_t>& bytes = codebook->book->serialized();
    require(dst_capacity_bytes >= bytes.size(), KVC_ERROR_BUFFER_TOO_SMALL,
            "dst_capacity_bytes = ", dst_capacity_bytes, " but the codebook needs ", bytes.size(),
            " bytes (kvc_codebook_serialized_size)");
    std::copy(bytes.begin(), bytes.end(), static_cast<uint8_t*>(h_dst));
    *written_bytes = bytes.size();
  });
}

kvc_status_t kvc_codebook_deserialize(const void* h_src, size_t src_bytes,
                                      kvc_codebook_t* codebook) {
  return kvc::api_call(__func__, [&] {
    require_not_null(h_src, "h_src");
    require_not_null(codebook, "codebook");
    auto book = std::make_shared<const kvc::Codebook>(
        kvc::Codebook::parse(static_cast<const uint8_t*>(h_src), src_bytes));
    *codebook = new kvc_codebook_s{std::move(book)};
  });
}

// ---- Codec ---------------------------------------------------------------------------------

kvc_status_t kvc_codec_create(const kvc_codec_config* config, kvc_codebook_t codebook,
                              kvc_codec_t* codec) {
  return kvc::api_call(__func__, [&] {
    require_not_null(config, "config");
    require_not_null(codec, "codec");
    const kvc::CodecParams params = kvc::CodecParams::from_config(*config, codebook != nullptr);
    auto made = std::make_unique<kvc_codec_s>();
    made->params = params;
    made->book = codebook ? codebook->book : nullptr;
    if (made->on_cuda()) {
#if defined(KVC_WITH_CUDA)
      made->device = kvc::cuda::create_device_codec(params, made->book.get());
#else
      kvc::no_cuda();
#endif
    }
    *codec = made.release();
  });
}

kvc_status_t kvc_codec_destroy(kvc_codec_t codec) {
  delete codec;
  return KVC_SUCCESS;
}

kvc_status_t kvc_codec_max_block_bytes(kvc_codec_t codec, kvc_dtype src_dtype, size_t* size_bytes) {
  return kvc::api_call(__func__, [&] {
    require_not_null(codec, "codec");
    const kvc_dtype dtype = kvc::checked_dtype(src_dtype, "src_dtype");
    *require_not_null(size_bytes, "size_bytes") = codec->params.max_block_bytes(dtype);
  });
}

kvc_status_t kvc_codec_encode(kvc_codec_t codec, int32_t num_blocks, const void* const* src_blocks,
                              int64_t src_token_stride, kvc_dtype src_dtype,
                              void* const* dst_blocks, size_t dst_capacity_bytes,
                              uint32_t* block_bytes, void* stream) {
  return kvc::api_call(__func__, [&] {
    const kvc::CodecParams& p = check_batch(codec, num_blocks, src_blocks, "src_blocks", stream);
    require(num_blocks == 0 || dst_blocks != nullptr, KVC_ERROR_NULL_POINTER, "dst_blocks is NULL");
    require(num_blocks == 0 || block_bytes != nullptr, KVC_ERROR_NULL_POINTER,
            "block_bytes is NULL");
    require_stride(src_token_stride, p, "src_token_stride");
    const kvc_dtype dtype = kvc::checked_dtype(src_dtype, "src_dtype");
    require_block_pointers(*codec, num_blocks, src_blocks, kvc::format::dtype_bytes(dtype),
                           dst_blocks, 4);
    if (codec->on_cuda()) {
      // Sizes are known only on the device: every block must fit whatever it becomes.
      require(num_blocks == 0 || dst_capacity_bytes >= p.max_block_bytes(dtype),
              KVC_ERROR_BUFFER_TOO_SMALL, "dst_capacity_bytes = ", dst_capacity_bytes,
              " but the CUDA backend needs ", p.max_block_bytes(dtype),
              " (kvc_codec_max_block_bytes)");
#if defined(KVC_WITH_CUDA)
      if (num_blocks > 0) {
        kvc::cuda::require_device_arrays(
            *codec->device, stream,
            {{src_blocks, "src_blocks"}, {dst_blocks, "dst_blocks"}, {block_bytes, "block_bytes"}});
      }
      kvc::cuda::encode(*codec->device, num_blocks, src_blocks, src_token_stride, dtype, dst_blocks,
                        block_bytes, stream);
      return;
#else
      kvc::no_cuda();
#endif
    }
    const kvc::DefaultFloatEnvironment ieee;
    // Every input is checked, and every block sized, before the first block is written.
    for (int32_t i = 0; i < num_blocks; ++i) {
      kvc::cpu::check_finite(p, i, src_blocks[i], src_token_stride, dtype);
    }
    if (dst_capacity_bytes < p.max_block_bytes(dtype)) {
      for (int32_t i = 0; i < num_blocks; ++i) {
        const uint32_t need =
            p.tiles ? kvc::cpu::plan_tile_block(p, src_blocks[i], src_token_stride, dtype)
                          .layout.block_bytes
                    : kvc::cpu::encoded_size(p, codec->book.get(), src_blocks[i], src_token_stride,
                                             dtype);
        require(need <= dst_capacity_bytes, KVC_ERROR_BUFFER_TOO_SMALL, "block ", i, " needs ",
                need, " bytes but dst_capacity_bytes = ", dst_capacity_bytes,
                " (kvc_codec_max_block_bytes gives a capacity that always suffices)");
      }
    }
    // Every block is encoded into one buffer before any is written, so that memory running out
    // midway leaves the outputs as they were (the copies at the end cannot fail).
    std::vector<uint8_t> block(p.max_block_bytes(dtype)), encoded;
    std::vector<uint32_t> sizes(static_cast<size_t>(num_blocks));
    for (int32_t i = 0; i < num_blocks; ++i) {
      sizes[size_t(i)] = p.tiles ? kvc::cpu::encode_tile_block(p, src_blocks[i], src_token_stride,
                                                               dtype, block.data())
                                 : kvc::cpu::encode_block(p, codec->book.get(), src_blocks[i],
                                                          src_token_stride, dtype, block.data());
      encoded.insert(encoded.end(), block.begin(), block.begin() + sizes[size_t(i)]);
    }
    const uint8_t* from = encoded.data();
    for (int32_t i = 0; i < num_blocks; ++i) {
      std::copy_n(from, sizes[size_t(i)], static_cast<uint8_t*>(dst_blocks[i]));
      from += sizes[size_t(i)];
      block_bytes[i] = sizes[size_t(i)];
    }
  });
}

kvc_status_t kvc_codec_decode(kvc_codec_t codec, int32_t num_blocks, const void* const* src_blocks,
                              const uint32_t* src_bytes, kvc_dtype dst_dtype,
                              void* const* dst_blocks, int64_t dst_token_stride,
                              kvc_status_t* block_status, void* stream) {
  return kvc::api_call(__func__, [&] {
    const kvc::CodecParams& p = check_batch(codec, num_blocks, src_blocks, "src_blocks", stream);
    require(num_blocks == 0 || src_bytes != nullptr, KVC_ERROR_NULL_POINTER, "src_bytes is NULL");
    require(num_blocks == 0 || dst_blocks != nullptr, KVC_ERROR_NULL_POINTER, "dst_blocks is NULL");
    require_stride(dst_token_stride, p, "dst_token_stride");
    const kvc_dtype dtype = kvc::checked_dtype(dst_dtype, "dst_dtype");
    require_block_pointers(*codec, num_blocks, src_blocks, 1, dst_blocks,
                           kvc::format::dtype_bytes(dtype));
    if (codec->on_cuda()) {
      require(num_blocks == 0 || block_status != nullptr, KVC_ERROR_NULL_POINTER,
              "block_status is NULL (the CUDA backend reports corrupt blocks only there)");
#if defined(KVC_WITH_CUDA)
      if (num_blocks > 0) {
        kvc::cuda::require_device_arrays(*codec->device, stream,
                                         {{src_blocks, "src_blocks"},
                                          {src_bytes, "src_bytes"},
                                          {dst_blocks, "dst_blocks"},
                                          {block_status, "block_status"}});
      }
      kvc::cuda::decode(*codec->device, num_blocks, src_blocks, src_bytes, dtype, dst_blocks,
                        dst_token_stride, block_status, stream);
      return;
#else
      kvc::no_cuda();
#endif
    }
    const kvc::DefaultFloatEnvironment ieee;
    kvc_status_t first_status = KVC_SUCCESS;
    std::string first_message;
    for (int32_t i = 0; i < num_blocks; ++i) {
      kvc_status_t status = KVC_SUCCESS;
      try {
        const auto* block = static_cast<const uint8_t*>(src_blocks[i]);
        if (p.tiles) {
          kvc::cpu::decode_tile_block(p, block, src_bytes[i], dtype, dst_blocks[i],
                                      dst_token_stride);
        } else {
          kvc::cpu::decode_block(p, codec->book.get(), block, src_bytes[i], dtype, dst_blocks[i],
                                 dst_token_stride);
        }
      } catch (const kvc::Error& e) {
        status = e.status();
        if (first_status == KVC_SUCCESS) {
          first_status = status;
          first_message = "block " + std::to_string(i) + ": " + e.what();
        }
      }
      if (block_status != nullptr) block_status[i] = status;
    }
    if (first_status != KVC_SUCCESS) fail(first_status, first_message);
  });
}

kvc_status_t kvc_codec_histogram(kvc_codec_t codec, int32_t num_blocks,
                                 const void* const* src_blocks, int64_t src_token_stride,
                                 kvc_dtype src_dtype, kvc_histogram_t histogram, void* stream) {
  return kvc::api_call(__func__, [&] {
    const kvc::CodecParams& p = check_batch(codec, num_blocks, src_blocks, "src_blocks", stream);
    require_not_null(histogram, "histogram");
    require(!p.tiles, KVC_ERROR_NOT_SUPPORTED,
            "the codec writes tile blocks (KVC_BLOCK_FORMAT_TILES), which have no Huffman "
            "symbols");
    require_stride(src_token_stride, p, "src_token_stride");
    const kvc_dtype dtype = kvc::checked_dtype(src_dtype, "src_dtype");
    require_block_pointers(*codec, num_blocks, src_blocks, kvc::format::dtype_bytes(dtype), nullptr,
                           1);
    kvc::Histogram updated = histogram->histogram;  // all or nothing
    if (codec->on_cuda()) {
#if defined(KVC_WITH_CUDA)
      if (num_blocks > 0) {
        kvc::cuda::require_device_arrays(*codec->device, stream, {{src_blocks, "src_blocks"}});
      }
      kvc::cuda::histogram(*codec->device, num_blocks, src_blocks, src_token_stride, dtype, updated,
                           stream);
#else
      kvc::no_cuda();
#endif
    } else {
      const kvc::DefaultFloatEnvironment ieee;
      for (int32_t i = 0; i < num_blocks; ++i) {
        kvc::cpu::check_finite(p, i, src_blocks[i], src_token_stride, dtype);
      }
      for (int32_t i = 0; i < num_blocks; ++i) {
        kvc::cpu::histogram_block(p, src_blocks[i], src_token_stride, dtype, updated);
      }
    }
    histogram->histogram = std::move(updated);
  });
}

kvc_status_t kvc_block_inspect(const void* h_block, size_t src_bytes, kvc_block_info* info) {
  return kvc::api_call(__func__, [&] {
    require_not_null(h_block, "h_block");
    require_not_null(info, "info");
    kvc::check_struct_header(*info, "info");
    const auto* block = static_cast<const uint8_t*>(h_block);
    kvc_block_info out = *info;
    if (src_bytes >= 4 && kvc::format::load_u32(block) == kvc::tiles::kMagic) {
      const kvc::tiles::TileLayout b = kvc::cpu::parse_tile_header(block, src_bytes);
      uint32_t widest = 0;
      for (uint32_t i = 0; i < b.num_tiles; ++i) {
        const uint32_t w = kvc::tiles::entry_width(kvc::tiles::table_entry(block, b, i));
        widest = std::max(widest, kvc::tiles::element_bits(w, b.raw_dtype));
      }
      out.format_version = kvc::tiles::kVersion;
      out.block_bytes = b.block_bytes;
      out.encoding = KVC_ENCODING_TILES;
      out.kind = b.is_value ? KVC_KIND_VALUE : KVC_KIND_KEY;
      out.num_tokens = int32_t(b.num_tokens);
      out.head_dim = int32_t(b.head_dim);
      out.group_size = int32_t(b.is_value ? b.head_dim : b.num_tokens);
      out.num_groups = int32_t(b.num_groups);
      out.num_substreams = 0;
      out.code_bits = int32_t(widest);
      out.codebook_id = 0;
      *info = out;
      return;
    }
    const kvc::format::BlockLayout b = kvc::cpu::parse_header(block, src_bytes);
    out.format_version = kvc::format::kVersion;
    out.block_bytes = b.block_bytes;
    out.encoding = int32_t(b.encoding);
    out.kind = b.is_value ? KVC_KIND_VALUE : KVC_KIND_KEY;
    out.num_tokens = int32_t(b.num_tokens);
    out.head_dim = int32_t(b.head_dim);
    out.group_size = int32_t(b.group_size);
    out.num_groups = int32_t(b.num_groups);
    out.num_substreams = int32_t(b.num_substreams);
    out.code_bits = int32_t(b.code_bits);
    out.codebook_id = b.codebook_id;
    *info = out;
  });
}

}  // extern "C"
