/* SPDX-License-Identifier: Apache-2.0 */
/*
 * kvcomp: compressed KV cache for LLM inference.
 *
 * One block of the KV cache (num_tokens x head_dim elements of K or of V, for one kv-head) is
 * quantized with an error bound and entropy coded into a self-delimiting byte block
 * (docs/format.md). This header is the whole public C ABI; it compiles as C99 and as C++.
 *
 * Conventions, for every function unless its comment says otherwise:
 *   - It returns a kvc_status_t; KVC_SUCCESS is 0. On failure, kvc_last_error() holds a message
 *     naming the function, the argument, the value and the limit, and every output argument and
 *     handle is left exactly as it was.
 *   - Memory space follows the codec's backend: KVC_BACKEND_CPU takes host pointers and a NULL
 *     stream; KVC_BACKEND_CUDA takes device pointers (pointer arrays included) and a cudaStream_t
 *     passed as void*. Handles, configs and size queries are always host-side.
 *   - Handles are not internally locked: one handle must not be used by two threads at once.
 *     Distinct handles are independent. Read-only calls (queries, encode/decode with a const
 *     codebook) may share a codebook between threads.
 *   - Nothing crosses the ABI but statuses: no exception, abort, exit or printing.
 */
#ifndef KVCOMP_KVCOMP_H_
#define KVCOMP_KVCOMP_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#if defined(KVC_BUILDING_LIBRARY)
#define KVC_API __declspec(dllexport)
#else
#define KVC_API
#endif
#elif defined(__GNUC__)
#define KVC_API __attribute__((visibility("default")))
#else
#define KVC_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Versions ---------------------------------------------------------------------------- */

#define KVC_VERSION_MAJOR 0
#define KVC_VERSION_MINOR 6
#define KVC_VERSION_PATCH 0
#define KVC_VERSION_NUMBER (KVC_VERSION_MAJOR * 10000 + KVC_VERSION_MINOR * 100 + KVC_VERSION_PATCH)

/* Version of the config-struct ABI. Every config struct carries the value its caller was
 * compiled with; the library rejects another value with KVC_ERROR_ABI_MISMATCH. */
#define KVC_ABI_VERSION 6

/* Version of the compressed block format written by this library (docs/format.md). */
#define KVC_FORMAT_VERSION 1

/* Run-time version of the loaded library, as KVC_VERSION_NUMBER. Cannot fail. */
KVC_API uint32_t kvc_version_number(void);
/* "MAJOR.MINOR.PATCH" of the loaded library; static storage. Cannot fail. */
KVC_API const char* kvc_version_string(void);

/* ---- Status and errors ------------------------------------------------------------------- */

/* Numbered in ranges by cause; values are never renumbered. Every public enum ends in a
 * _MAX_ENUM member so that it is 32 bits wide; the library reads an enum argument as the int32
 * it holds, so any int32 value a C caller passes through it, negative ones included, is
 * rejected with a status (never undefined behaviour). */
typedef enum kvc_status {
  KVC_SUCCESS = 0,
  /* 1xx: the caller's arguments */
  KVC_ERROR_INVALID_ARGUMENT = 100, /* a value out of its documented range */
  KVC_ERROR_NULL_POINTER = 101,     /* a required pointer is NULL */
  KVC_ERROR_BUFFER_TOO_SMALL = 102, /* an output buffer is smaller than needed */
  KVC_ERROR_ABI_MISMATCH = 103,     /* struct_size or abi_version of a config is not accepted */
  KVC_ERROR_NOT_SUPPORTED = 104,    /* valid, but not supported by this build or backend */
  KVC_ERROR_NONFINITE_INPUT = 105,  /* an input element is inf or NaN */
  /* 2xx: the data */
  KVC_ERROR_CORRUPT_DATA = 200,      /* a block or serialized codebook is malformed */
  KVC_ERROR_CODEBOOK_MISMATCH = 201, /* a block was encoded with another codebook */
  KVC_ERROR_FORMAT_VERSION = 202,    /* data written by an unknown format version */
  KVC_ERROR_CONFIG_MISMATCH = 203,   /* a block's shape or kind differs from the codec's */
  KVC_ERROR_UNKNOWN_SEQUENCE = 204,  /* no live sequence has this id */
  /* 3xx: resources */
  KVC_ERROR_OUT_OF_MEMORY = 300,
  KVC_ERROR_OUT_OF_PAGES = 301, /* the store's page pool is full; nothing was changed */
  /* 4xx: the CUDA runtime */
  KVC_ERROR_CUDA = 400,      /* a CUDA call failed; kvc_last_error() names the CUDA error */
  KVC_ERROR_NO_DEVICE = 401, /* the CUDA backend was asked for where no GPU is usable */
  /* 5xx: a bug in kvcomp; please report it with kvc_last_error() */
  KVC_ERROR_INTERNAL = 500,
  KVC_STATUS_MAX_ENUM = 0x7FFFFFFF
} kvc_status;
typedef kvc_status kvc_status_t;

/* A short constant description of a status ("invalid argument"); static storage, never NULL,
 * "unknown status" for values outside the enum. Cannot fail. */
KVC_API const char* kvc_status_string(kvc_status_t status);

/* The detailed message of the last failed call on this thread ("" if none since the thread
 * began or since kvc_clear_last_error). Valid until the next kvcomp call on this thread. */
KVC_API const char* kvc_last_error(void);
KVC_API void kvc_clear_last_error(void);

/* ---- Enumerations ------------------------------------------------------------------------ */

typedef enum kvc_dtype {
  KVC_DTYPE_FP16 = 1,
  KVC_DTYPE_BF16 = 2,
  KVC_DTYPE_FP32 = 3,
  KVC_DTYPE_MAX_ENUM = 0x7FFFFFFF
} kvc_dtype;

/* Which tensor a block holds; it decides the quantization groups (docs/format.md). */
typedef enum kvc_kind {
  KVC_KIND_KEY = 0,   /* one group per channel, over the block's tokens */
  KVC_KIND_VALUE = 1, /* one group per token and channel group */
  KVC_KIND_MAX_ENUM = 0x7FFFFFFF
} kvc_kind;

/* Choosing: RELATIVE is scale-free and the default. For keys of a real model ABSOLUTE gives
 * better accuracy per byte (the outlier channels, where queries are large too, get no larger
 * errors than the rest); values do well with RELATIVE. docs/accuracy.md has the measurements. */
typedef enum kvc_bound_mode {
  KVC_BOUND_ABSOLUTE = 0, /* |x - x_hat| <= error_bound */
  KVC_BOUND_RELATIVE = 1, /* |x - x_hat| <= fl32(error_bound * fl32(max - min)) over the
                            element's group: the range and product rounded to fp32 */
  KVC_BOUND_MODE_MAX_ENUM = 0x7FFFFFFF
} kvc_bound_mode;

/* Which entropy stage the encoder may choose per block. */
typedef enum kvc_entropy {
  KVC_ENTROPY_AUTO = 0,    /* the smaller of Huffman (if a codebook is given) and fixed width */
  KVC_ENTROPY_FIXED = 1,   /* fixed-width bit packing only */
  KVC_ENTROPY_HUFFMAN = 2, /* Huffman only; needs a codebook */
  KVC_ENTROPY_MAX_ENUM = 0x7FFFFFFF
} kvc_entropy;

typedef enum kvc_backend {
  KVC_BACKEND_CPU = 0,  /* host memory, synchronous */
  KVC_BACKEND_CUDA = 1, /* device memory, asynchronous on the given stream */
  KVC_BACKEND_MAX_ENUM = 0x7FFFFFFF
} kvc_backend;

/* Per-block encoding, as recorded in the block header. */
typedef enum kvc_block_encoding {
  KVC_ENCODING_RAW = 0,     /* elements verbatim in the input dtype (bound not reachable) */
  KVC_ENCODING_FIXED = 1,   /* fixed-width quantization codes */
  KVC_ENCODING_HUFFMAN = 2, /* canonical Huffman coded quantization codes */
  KVC_ENCODING_TILES = 3,   /* a tile block (format t1; kvc_block_inspect reports it) */
  KVC_ENCODING_MAX_ENUM = 0x7FFFFFFF
} kvc_block_encoding;

/* Which block format a codec writes and reads (docs/format.md). The quantizer, and so the
 * error bound, is the same for both. */
typedef enum kvc_block_format {
  KVC_BLOCK_FORMAT_V1 = 0,    /* format v1: the smallest of raw, fixed-width and Huffman */
  KVC_BLOCK_FORMAT_TILES = 1, /* format t1: fixed-width codes (0, 2, 3, 4, 6 or 8 bits per
                                 16-row tile, raw tiles above) laid out in tensor-core operand
                                 order, what the GPU decode attention reads. Needs num_tokens a
                                 power of two in 16..1024, head_dim a power of two in 16..256 and V
                                 groups of head_dim channels (CUDA codecs: T * D up to what a
                                 thread block's shared memory holds, 32K elements on sm_90) */
  KVC_BLOCK_FORMAT_AUTO = 2,  /* stores only (kvc_store_config.block_format): tiles where the
                                 store's attention runs on the GPU (KVC_BACKEND_CUDA), the
                                 shape has a tile kernel and neither entropy HUFFMAN nor a
                                 num_substreams is asked for; format v1 otherwise */
  KVC_BLOCK_FORMAT_MAX_ENUM = 0x7FFFFFFF
} kvc_block_format;

/* ---- Limits ------------------------------------------------------------------------------ */

#define KVC_MAX_NUM_TOKENS 1024 /* tokens per block */
#define KVC_MAX_HEAD_DIM 1024
#define KVC_MAX_CODE_LENGTH 15        /* longest Huffman code, bits */
#define KVC_MAX_CODEBOOK_SYMBOLS 4095 /* symbols of a codebook, escape excluded */

/* ---- Codebooks --------------------------------------------------------------------------- */

/* A histogram of quantization symbols (the signed code minus its group's centre), gathered
 * from representative blocks (the prefill) to build a codebook. */
typedef struct kvc_histogram_s* kvc_histogram_t;
/* A frozen canonical Huffman code over a range of symbols, plus an escape for the rest. */
typedef struct kvc_codebook_s* kvc_codebook_t;

KVC_API kvc_status_t kvc_histogram_create(kvc_histogram_t* histogram);
/* NULL is a no-op. */
KVC_API kvc_status_t kvc_histogram_destroy(kvc_histogram_t histogram);
/* Adds counts[i] occurrences of symbol (first_symbol + i), i < num_symbols. counts: host.
 * Symbols outside [-2^15, 2^15) can only be escaped: they add to the escape's weight. */
KVC_API kvc_status_t kvc_histogram_add_counts(kvc_histogram_t histogram, int32_t first_symbol,
                                              int32_t num_symbols, const uint64_t* counts);
/* Total number of symbols counted so far. */
KVC_API kvc_status_t kvc_histogram_total(kvc_histogram_t histogram, uint64_t* total);

typedef struct kvc_codebook_config {
  uint32_t struct_size;    /* sizeof(kvc_codebook_config) */
  uint32_t abi_version;    /* KVC_ABI_VERSION */
  int32_t max_code_length; /* 2..KVC_MAX_CODE_LENGTH; the decoder's table has 2^this entries */
  int32_t max_symbols;     /* 1..KVC_MAX_CODEBOOK_SYMBOLS: width of the window of consecutive
                              symbol values with the largest total count that gets codes
                              (also capped at 2^max_code_length - 1) */
} kvc_codebook_config;
#define KVC_CODEBOOK_CONFIG_INIT \
  { sizeof(kvc_codebook_config), KVC_ABI_VERSION, 12, 255 }

/* Builds a length-limited canonical Huffman code from a histogram. The codebook covers the
 * contiguous symbol range around the most frequent symbols (at most max_symbols wide, inside
 * [-2^15, 2^15)); symbols outside it, or never seen, are coded through the escape. An empty
 * histogram gives a codebook that escapes everything. config may be NULL for the defaults. */
KVC_API kvc_status_t kvc_codebook_build(kvc_histogram_t histogram,
                                        const kvc_codebook_config* config,
                                        kvc_codebook_t* codebook);
/* NULL is a no-op. */
KVC_API kvc_status_t kvc_codebook_destroy(kvc_codebook_t codebook);
/* Identifier written into every Huffman block: a hash of the serialized codebook. */
KVC_API kvc_status_t kvc_codebook_id(kvc_codebook_t codebook, uint32_t* id);
/* Code length in bits of a symbol; 0 if the symbol goes through the escape. */
KVC_API kvc_status_t kvc_codebook_code_length(kvc_codebook_t codebook, int32_t symbol,
                                              int32_t* length_bits);
/* Exact size of the serialized codebook. */
KVC_API kvc_status_t kvc_codebook_serialized_size(kvc_codebook_t codebook, size_t* size_bytes);
/* Writes the serialized codebook (docs/format.md) to h_dst. */
KVC_API kvc_status_t kvc_codebook_serialize(kvc_codebook_t codebook, void* h_dst,
                                            size_t dst_capacity_bytes, size_t* written_bytes);
/* Parses a serialized codebook; any malformed input gives KVC_ERROR_CORRUPT_DATA. */
KVC_API kvc_status_t kvc_codebook_deserialize(const void* h_src, size_t src_bytes,
                                              kvc_codebook_t* codebook);

/* ---- Codec ------------------------------------------------------------------------------- */

typedef struct kvc_codec_s* kvc_codec_t;

typedef struct kvc_codec_config {
  uint32_t struct_size;     /* sizeof(kvc_codec_config) */
  uint32_t abi_version;     /* KVC_ABI_VERSION */
  int32_t backend;          /* kvc_backend */
  int32_t kind;             /* kvc_kind */
  int32_t num_tokens;       /* tokens per block T: 1..KVC_MAX_NUM_TOKENS (16, 32, 64, 128 usual) */
  int32_t head_dim;         /* channels D: 1..KVC_MAX_HEAD_DIM (64, 128, 256 usual) */
  int32_t value_group_size; /* V only: channels per group, dividing head_dim; 0 = head_dim */
  int32_t bound_mode;       /* kvc_bound_mode */
  float error_bound;        /* absolute: > 0; relative: in (0, 1] */
  int32_t entropy;          /* kvc_entropy */
  int32_t num_substreams;   /* Huffman sub-streams per block, dividing the group size; 0 = auto */
  int32_t block_format;     /* kvc_block_format; tile codecs ignore entropy, num_substreams and
                               the codebook */
  int32_t tile_permute_channels; /* tiles, K: 1 = sort channels by code width before cutting
                                    16-channel tiles (so that a few wide channels widen one
                                    tile, not all), 0 = keep the channel order */
  int32_t tile_split_widths;     /* tiles: 1 = also 3- and 6-bit tiles, stored as two planes
                                    (2 + 1 and 4 + 2 bits); 0 = only 0, 2, 4 and 8 bits */
} kvc_codec_config;
#define KVC_CODEC_CONFIG_INIT                                                             \
  {                                                                                       \
    sizeof(kvc_codec_config), KVC_ABI_VERSION, KVC_BACKEND_CPU, KVC_KIND_KEY, 64, 128, 0, \
        KVC_BOUND_RELATIVE, 0.05f, KVC_ENTROPY_AUTO, 0, KVC_BLOCK_FORMAT_V1, 1, 1         \
  }

/* Creates a codec for one block shape. codebook may be NULL (fixed width only); the codec
 * keeps its own reference, so the caller may destroy its codebook handle afterwards. */
KVC_API kvc_status_t kvc_codec_create(const kvc_codec_config* config, kvc_codebook_t codebook,
                                      kvc_codec_t* codec);
/* NULL is a no-op. */
KVC_API kvc_status_t kvc_codec_destroy(kvc_codec_t codec);

/* Worst-case size of one compressed block for this codec and input dtype (like
 * ZSTD_compressBound): every block the codec writes from src_dtype input fits in this many bytes
 * (never more than a verbatim copy plus the 32-byte header). A multiple of 4. Tile codecs: a
 * verbatim copy plus the header and tile table rounded up to 16 bytes; a multiple of 16. */
KVC_API kvc_status_t kvc_codec_max_block_bytes(kvc_codec_t codec, kvc_dtype src_dtype,
                                               size_t* size_bytes);

/* Compresses num_blocks blocks.
 *   src_blocks[i]: pointer to block i, elements [num_tokens, head_dim] of src_dtype, row r
 *                  starting src_token_stride elements after row r-1 (>= head_dim). For a cache
 *                  laid out [tokens, kv_heads, head_dim] the stride is kv_heads * head_dim.
 *   dst_blocks[i]: where block i is written; dst_capacity_bytes each, 4-byte aligned.
 *   block_bytes[i]: out, the size written for block i.
 * Memory space per backend (see top). Deterministic: the same input and codebook give the
 * same bytes on every backend.
 * CPU backend: stream must be NULL; synchronous. Inputs must be finite (else
 * KVC_ERROR_NONFINITE_INPUT). If dst_capacity_bytes >= kvc_codec_max_block_bytes() no block
 * can fail for lack of space; otherwise every block is sized first and, if one does not fit,
 * the call fails with KVC_ERROR_BUFFER_TOO_SMALL having written nothing.
 * CUDA backend: src_blocks, dst_blocks and block_bytes are device arrays; asynchronous on
 * stream, no host synchronisation, graph-capturable; the current device must be the codec's.
 * dst_capacity_bytes must be at least kvc_codec_max_block_bytes(). A block whose input holds
 * inf or NaN, or whose src/dst pointer is NULL (or dst not 4-byte aligned), gets
 * block_bytes[i] = 0 and no block; the call itself returns KVC_SUCCESS. Block shapes whose
 * working set exceeds the GPU's shared memory per thread block give KVC_ERROR_NOT_SUPPORTED at
 * kvc_codec_create (e.g. K blocks of 256 x 256). */
KVC_API kvc_status_t kvc_codec_encode(kvc_codec_t codec, int32_t num_blocks,
                                      const void* const* src_blocks, int64_t src_token_stride,
                                      kvc_dtype src_dtype, void* const* dst_blocks,
                                      size_t dst_capacity_bytes, uint32_t* block_bytes,
                                      void* stream);

/* Decompresses num_blocks blocks.
 *   src_blocks[i], src_bytes[i]: block i and the bytes available there. The decoder never
 *                  reads beyond min(src_bytes[i], the block's stated length).
 *   dst_blocks[i]: out, elements [num_tokens, head_dim] of dst_dtype, rows dst_token_stride
 *                  elements apart (>= head_dim).
 *   block_status[i]: out, may be NULL on the CPU backend (required on CUDA); the status of
 *                  each block. On the CPU the call returns the first failure; blocks that decode
 *                  are written either way.
 * A corrupt block gives KVC_ERROR_CORRUPT_DATA (or a more specific data status), never a crash
 * or an out-of-bounds access; the destination of a block that fails is left unspecified.
 * CUDA backend: all arrays are device memory; asynchronous on stream, graph-capturable; the
 * current device must be the codec's. block_status is required and is the only report of data
 * errors (the call itself returns argument errors only); a NULL block pointer or a destination
 * not aligned to its element size gives KVC_ERROR_INVALID_ARGUMENT there. src_bytes may be the
 * block_bytes array an encode call wrote. */
KVC_API kvc_status_t kvc_codec_decode(kvc_codec_t codec, int32_t num_blocks,
                                      const void* const* src_blocks, const uint32_t* src_bytes,
                                      kvc_dtype dst_dtype, void* const* dst_blocks,
                                      int64_t dst_token_stride, kvc_status_t* block_status,
                                      void* stream);

/* Adds the symbols the codec would Huffman-code for these blocks to a histogram (same input
 * conventions as kvc_codec_encode). Blocks that cannot be quantized within the bound (stored
 * verbatim) add nothing. CUDA backend: counts on the GPU (a NULL block pointer adds nothing),
 * then copies the counts back and synchronises stream: a prefill-time call, not
 * graph-capturable. */
KVC_API kvc_status_t kvc_codec_histogram(kvc_codec_t codec, int32_t num_blocks,
                                         const void* const* src_blocks, int64_t src_token_stride,
                                         kvc_dtype src_dtype, kvc_histogram_t histogram,
                                         void* stream);

/* What a block header says, parsed and checked against the buffer (host memory). */
typedef struct kvc_block_info {
  uint32_t struct_size;    /* sizeof(kvc_block_info), set by the caller */
  uint32_t abi_version;    /* KVC_ABI_VERSION, set by the caller */
  uint32_t format_version; /* KVC_FORMAT_VERSION */
  uint32_t block_bytes;    /* exact length of the block */
  int32_t encoding;        /* kvc_block_encoding */
  int32_t kind;            /* kvc_kind */
  int32_t num_tokens;
  int32_t head_dim;
  int32_t group_size;
  int32_t num_groups;
  int32_t num_substreams;
  int32_t code_bits;    /* fixed-width code bits, or Huffman escape payload bits */
  uint32_t codebook_id; /* Huffman blocks; 0 otherwise */
} kvc_block_info;
#define KVC_BLOCK_INFO_INIT \
  { sizeof(kvc_block_info), KVC_ABI_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }

/* Parses and validates a block header in h_block (src_bytes available). */
KVC_API kvc_status_t kvc_block_inspect(const void* h_block, size_t src_bytes, kvc_block_info* info);

/* ---- Paged compressed KV store ------------------------------------------------------------ */
/*
 * The object an inference engine holds instead of its fp16 KV cache. For every sequence and
 * layer it keeps the compressed blocks of all complete T-token blocks (one K and one V block
 * per kv-head, in fixed-size pages of a pool) and an uncompressed tail of fewer than T tokens.
 * Codebooks are per (layer, K|V): built from the first blocks a layer compresses (usually the
 * first prefill) unless set beforehand, then frozen. Every call is all-or-nothing: a failure
 * (out of pages included) leaves every sequence exactly as before.
 * Tensors passed to and from the store: K and V [num_tokens, num_kv_heads, head_dim] of the
 * store's dtype, rows contiguous; sequence ids are host values on both backends.
 *
 * Backends:
 *   KVC_BACKEND_CPU: host memory, synchronous; every `stream` argument must be NULL.
 *   KVC_BACKEND_CUDA: pool, tables and tails in device memory of the device current at
 *     creation; tensors are device pointers. kvc_store_prefill, kvc_store_append,
 *     kvc_store_free_sequence and kvc_store_attention are asynchronous on `stream` and make no
 *     host-device synchronization (except where a layer must build its codebooks: every prefill or
 *     append on it until its first block compresses, see kvc_store_prefill; a store of tile blocks
 *     builds none); kvc_store_append and kvc_store_attention can be captured in a CUDA graph, page
 *     allocation included. Their data errors (out of pages, inf or NaN input, a sequence past
 *     max_sequence_tokens, a sequence freed since capture) are found on the device: the call
 *     returns KVC_SUCCESS and kvc_store_get_stats reports them (last_append_status, failed_appends)
 *     once the stream has run; the failed operation changed nothing, as on the CPU. add_sequence,
 *     sequence_length, read, serialize, restore and set_codebook wait for the device
 *     (cudaDeviceSynchronize) and must not be captured. All calls on one store must be ordered: one
 *     stream at a time, or streams the caller orders. Memory a captured graph uses stays allocated
 *     until kvc_store_destroy.
 */
typedef struct kvc_store_s* kvc_store_t;

/* How the store rotates K and V rows before compressing them (kvc_store_config.rotation). */
typedef enum kvc_rotation {
  KVC_ROTATION_NONE = 0,            /* rows stored as given */
  KVC_ROTATION_HADAMARD = 1,        /* K and V: x' = H x / sqrt(head_dim), H the Sylvester Hadamard
                                       matrix: orthonormal and its own inverse. Queries are rotated
                                       the same way and attention outputs rotated back (q'.k' = q.k);
                                       reads return rows rotated back. Spreads outlier channels over
                                       the row, which suits a uniform quantizer */
  KVC_ROTATION_HADAMARD_VALUES = 2, /* V rows only (K stored as given, queries not rotated):
                                       what measured best on the models of docs/accuracy.md */
  KVC_ROTATION_MAX_ENUM = 0x7FFFFFFF
} kvc_rotation;

typedef struct kvc_store_config {
  uint32_t struct_size;   /* sizeof(kvc_store_config) */
  uint32_t abi_version;   /* KVC_ABI_VERSION */
  int32_t backend;        /* kvc_backend */
  int32_t num_layers;     /* >= 1 */
  int32_t num_kv_heads;   /* >= 1 */
  int32_t head_dim;       /* 1..KVC_MAX_HEAD_DIM */
  int32_t dtype;          /* KVC_DTYPE_FP16 or KVC_DTYPE_BF16: K, V, queries and outputs */
  int32_t block_tokens;   /* T: 1..KVC_MAX_NUM_TOKENS */
  int32_t key_bound_mode; /* kvc_bound_mode */
  float key_error_bound;
  int32_t value_bound_mode; /* kvc_bound_mode */
  float value_error_bound;
  int32_t value_group_size;      /* as kvc_codec_config; 0 = head_dim */
  int32_t entropy;               /* kvc_entropy: AUTO uses the layer's codebooks once built */
  int32_t page_bytes;            /* page size, a multiple of 256, >= the largest block (64 KiB is
                                    usually right; 0 = the smallest multiple of 64 KiB that fits) */
  int64_t capacity_bytes;        /* pool size in bytes, rounded down to whole pages */
  int32_t max_sequences;         /* live sequences at most; 0 = no limit (CPU only). The CUDA
                                    backend needs it: it sizes the device tables and tails */
  int32_t max_sequence_tokens;   /* tokens per (sequence, layer) at most; 0 = no limit (CPU
                                    only). The CUDA backend needs it: it sizes the block tables */
  int32_t block_format;          /* kvc_block_format of the compressed blocks (AUTO: see there).
                                    Tiles (format t1) need block_tokens a power of two in
                                    [16, 1024], head_dim a power of two in [16, 256] and
                                    value_group_size 0 (or head_dim); on the CUDA backend also
                                    block_tokens 64 or 128, head_dim 64, 128 or 256 and
                                    block_tokens * head_dim <= 16384 (the tile attention
                                    kernel), else KVC_ERROR_NOT_SUPPORTED. A tiles store uses
                                    no codebooks: entropy is checked then ignored,
                                    num_substreams ignored, kvc_store_set_codebook refused */
  int32_t tile_permute_channels; /* tiles: as kvc_codec_config (1 = sort K channels by width) */
  int32_t tile_split_widths;     /* tiles: as kvc_codec_config (1 = 3- and 6-bit tiles too) */
  int32_t num_substreams;        /* format v1: Huffman sub-streams per block, dividing the group
                                    size, as kvc_codec_config; 0 = automatic (32 where the group
                                    size allows: what the CUDA attention kernel reads). Fewer
                                    give a slightly better ratio */
  int32_t rotation;              /* kvc_rotation: an orthonormal rotation of every K and V row
                                    (or V row only) per token and kv-head, over head_dim, before
                                    it is stored; needs head_dim a power of two. The error
                                    bounds then hold in the rotated space (docs/api.md,
                                    "Rotation") */
  int32_t sink_tokens;           /* 0..block_tokens - 1: the first sink_tokens tokens of every
                                    (sequence, layer), the "attention sinks", are also kept
                                    uncompressed once their block is compressed; attention and
                                    reads take them from there (exact), and the first block is
                                    still compressed whole (docs/api.md, "Attention sinks") */

  /* Per-layer bounds (ABI 5; docs/api.md, "Per-layer bounds"). */
  const float* key_layer_scales;   /* NULL, or num_layers factors: layer l's K blocks use the
                                      bound key_error_bound * key_layer_scales[l] (same mode, a
                                      float multiply); each finite and > 0, and each such bound
                                      one the codec takes (as key_error_bound itself must be).
                                      Read during kvc_store_create (copied) */
  const float* value_layer_scales; /* likewise for V (value_error_bound) */

  /* Serialization (ABI 6; docs/api.md, "Serialization"). */
  int32_t serialized_block_format; /* kvc_block_format of the blocks kvc_store_serialize writes:
                                      AUTO or the store's own format = its blocks as held (a
                                      copy); KVC_BLOCK_FORMAT_V1 on a tiles store = each tile
                                      block entropy-coded as format v1 where that is smaller
                                      and restores to the same bytes (about a fifth smaller;
                                      serializing then costs a CPU encode of every block).
                                      TILES on a format v1 store: KVC_ERROR_NOT_SUPPORTED */
} kvc_store_config;
#define KVC_STORE_CONFIG_INIT                                                                     \
  {                                                                                               \
    sizeof(kvc_store_config), KVC_ABI_VERSION, KVC_BACKEND_CPU, 1, 1, 128, KVC_DTYPE_FP16, 64,    \
        KVC_BOUND_RELATIVE, 0.05f, KVC_BOUND_RELATIVE, 0.05f, 0, KVC_ENTROPY_AUTO, 0,             \
        (int64_t)1 << 30, 0, 0, KVC_BLOCK_FORMAT_AUTO, 1, 1, 0, KVC_ROTATION_NONE, 0, NULL, NULL, \
        KVC_BLOCK_FORMAT_AUTO                                                                     \
  }

/* What the store holds, all of it counted. */
typedef struct kvc_store_stats {
  uint32_t struct_size; /* sizeof(kvc_store_stats), set by the caller */
  uint32_t abi_version; /* KVC_ABI_VERSION, set by the caller */
  int32_t num_sequences;
  int32_t reserved;
  int64_t num_blocks;     /* compressed blocks (K and V, all heads) */
  int64_t block_bytes;    /* their bytes */
  int64_t page_bytes;     /* bytes of pages in use (blocks + slack at page ends) */
  int64_t tail_bytes;     /* uncompressed rows: tails and attention sinks */
  int64_t table_bytes;    /* block tables */
  int64_t codebook_bytes; /* serialized codebooks */
  int64_t dense_bytes;    /* the same tokens as a dense cache of the store's dtype */
  int64_t pages_in_use;
  int64_t pages_total;
  int32_t last_append_status; /* kvc_status of the latest prefill or append (on CUDA: the
                                 latest to have run on the device) */
  int32_t failed_appends;     /* prefills and appends that failed past their argument checks
                                 (changing nothing); docs/api.md */
  int32_t reserved2;
  int64_t decoded_cache_bytes; /* CPU: fp32 copies of decoded blocks that kvc_store_attention
                                  keeps per (sequence, layer) so that it decodes each block
                                  once (host memory outside the pool, freed with the
                                  sequence); 0 on CUDA */
} kvc_store_stats;
#define KVC_STORE_STATS_INIT \
  { sizeof(kvc_store_stats), KVC_ABI_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }

/* Most sequences one kvc_store_append or kvc_store_attention call takes. */
#define KVC_STORE_MAX_BATCH 1024

KVC_API kvc_status_t kvc_store_create(const kvc_store_config* config, kvc_store_t* store);
/* NULL is a no-op. */
KVC_API kvc_status_t kvc_store_destroy(kvc_store_t store);

/* Uses a codebook for (layer, kind) from now on. Only before that layer has compressed a block
 * and (CUDA) before an append or attention of it was captured into a graph
 * (KVC_ERROR_INVALID_ARGUMENT after). The store keeps its own reference. */
KVC_API kvc_status_t kvc_store_set_codebook(kvc_store_t store, int32_t layer, kvc_kind kind,
                                            kvc_codebook_t codebook);
/* A new handle to the codebook of (layer, kind), or *codebook = NULL if none is built yet.
 * The caller destroys it. */
KVC_API kvc_status_t kvc_store_get_codebook(kvc_store_t store, int32_t layer, kvc_kind kind,
                                            kvc_codebook_t* codebook);

/* A new empty sequence; its id (>= 0) is never reused while the store lives. More than
 * max_sequences live sequences: KVC_ERROR_OUT_OF_MEMORY. */
KVC_API kvc_status_t kvc_store_add_sequence(kvc_store_t store, int32_t* sequence_id);
/* Frees a sequence; its pages return to the pool (CUDA: once the stream runs the free; the id
 * is invalid at once, and a captured graph that still names it reports
 * KVC_ERROR_UNKNOWN_SEQUENCE). */
KVC_API kvc_status_t kvc_store_free_sequence(kvc_store_t store, int32_t sequence_id, void* stream);
/* Tokens held for (sequence, layer). */
KVC_API kvc_status_t kvc_store_sequence_length(kvc_store_t store, int32_t sequence_id,
                                               int32_t layer, int32_t* num_tokens);

/* Appends num_tokens tokens to one sequence for layers [first_layer, first_layer + num_layers):
 * keys and values are [num_layers, num_tokens, num_kv_heads, head_dim] (the layer stride is
 * num_tokens * num_kv_heads * head_dim). Complete blocks are compressed; the rest stays in the
 * tail. All layers or none. CUDA: a layer that has no codebooks yet (entropy not FIXED, blocks
 * of format v1, not tiles) builds them from its first compressed blocks, which synchronizes
 * `stream`; every later call is asynchronous. Scratch memory grows to the largest call (cudaMalloc,
 * outside capture). */
KVC_API kvc_status_t kvc_store_prefill(kvc_store_t store, int32_t sequence_id, int32_t first_layer,
                                       int32_t num_layers, int32_t num_tokens, const void* keys,
                                       const void* values, void* stream);
/* One decode step of one layer: appends one token to each of num_sequences (at most
 * KVC_STORE_MAX_BATCH) distinct sequences. keys, values: [num_sequences, num_kv_heads,
 * head_dim]; sequence_ids: host. CUDA: graph-capturable once the layer has codebooks (or entropy
 * is FIXED, or the store holds tiles) and an uncaptured call of at least this batch size has sized
 * the scratch memory; a replayed graph appends to the sequences it was captured with, at their
 * current lengths. */
KVC_API kvc_status_t kvc_store_append(kvc_store_t store, int32_t layer, int32_t num_sequences,
                                      const int32_t* sequence_ids, const void* keys,
                                      const void* values, void* stream);

/* Decompresses (sequence, layer) into keys, values: [num_tokens, num_kv_heads, head_dim] of
 * dtype (fp16, bf16 or fp32), each with room for capacity_tokens >= kvc_store_sequence_length()
 * tokens. CUDA: device pointers; waits for the device, then decodes on `stream` and waits for
 * it. A block that fails to decode gives its status (the store's bytes were damaged). A store
 * with config->rotation rotates the rows back (in fp32) before converting them to dtype. */
KVC_API kvc_status_t kvc_store_read(kvc_store_t store, int32_t sequence_id, int32_t layer,
                                    kvc_dtype dtype, int32_t capacity_tokens, void* keys,
                                    void* values, void* stream);

/* CUDA: no synchronization: the figures are those the device last copied out (after every
 * prefill, append and free), so they trail work still queued; exact once the stream is idle. */
KVC_API kvc_status_t kvc_store_get_stats(kvc_store_t store, kvc_store_stats* stats);

/* Exact size of a sequence serialized by kvc_store_serialize (from the block lengths; a store
 * writing tile blocks as format v1, serialized_block_format, serializes to know it, and on the
 * CPU keeps the bytes for a kvc_store_serialize of the same sequence that directly follows). */
KVC_API kvc_status_t kvc_store_serialized_size(kvc_store_t store, int32_t sequence_id,
                                               size_t* size_bytes);
/* Writes one sequence (all layers: compressed blocks as they are, tails, codebook ids) as a
 * versioned, checksummed byte string (docs/format.md, "Serialized sequence") to h_dst. */
KVC_API kvc_status_t kvc_store_serialize(kvc_store_t store, int32_t sequence_id, void* h_dst,
                                         size_t dst_capacity_bytes, size_t* written_bytes);
/* Restores a serialized sequence as a new sequence of a store with the same configuration and
 * codebooks; no re-encoding. Corrupt or mismatched input is rejected (KVC_ERROR_CORRUPT_DATA,
 * KVC_ERROR_FORMAT_VERSION, KVC_ERROR_CONFIG_MISMATCH, KVC_ERROR_CODEBOOK_MISMATCH) and changes
 * nothing; so does a store already at max_sequences (KVC_ERROR_OUT_OF_MEMORY), without the
 * pages it needs (KVC_ERROR_OUT_OF_PAGES), or a sequence past max_sequence_tokens
 * (KVC_ERROR_INVALID_ARGUMENT). */
KVC_API kvc_status_t kvc_store_restore(kvc_store_t store, const void* h_src, size_t src_bytes,
                                       int32_t* sequence_id);

/* ---- Decode attention over the store ------------------------------------------------------ */

/* Batched decode attention of one layer: for each of num_sequences sequences, one query token
 * with num_q_heads = group * num_kv_heads heads (query head h uses kv-head h / group) attends
 * to all the sequence's tokens (compressed blocks and tail): out = softmax(scale * q K^T) V.
 * queries, out: [num_sequences, num_q_heads, head_dim] of the store's dtype; sequence_ids: host,
 * at most KVC_STORE_MAX_BATCH. A sequence with no tokens gives zeros. CPU: fp32 reconstruction
 * of K and V, double accumulation (the reference); each block is decoded once and kept in fp32
 * (kvc_store_stats.decoded_cache_bytes) until its sequence is freed. CUDA, format v1 blocks: the
 * fused kernel decodes the blocks in shared memory and accumulates in fp32; it needs T of 32, 64 or
 * 128, 32 sub-streams and value groups of a multiple of 32 channels (else KVC_ERROR_NOT_SUPPORTED),
 * head_dim 64, 128 or 256, group <= 16. CUDA, tile blocks: the tensor-core kernel (shapes checked
 * at kvc_store_create), group <= 16. Both graph-capturable once the layer has codebooks (or
 * entropy is FIXED, or the store holds tiles) and an uncaptured call with at least as many
 * sequences and query heads has sized its workspace (a replay reads the sequences' current lengths;
 * one freed since capture reads as empty). */
KVC_API kvc_status_t kvc_store_attention(kvc_store_t store, int32_t layer, int32_t num_sequences,
                                         const int32_t* sequence_ids, int32_t num_q_heads,
                                         float scale, const void* queries, void* out, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVCOMP_KVCOMP_H_ */
