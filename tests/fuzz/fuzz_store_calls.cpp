// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: random sequences of store calls through the C API (create, add, prefill,
// append, read, attention, free, serialize, restore, stats, codebooks) with valid and invalid
// arguments (NULL pointers, zero, negative and huge counts, enum values out of range, unknown
// and repeated ids, non-finite data, a stream on the CPU backend, a full pool, full sequence
// slots), checked after every call against a model of the store (the live sequences and their
// per-layer lengths, the next sequence id):
//   - every status is one the call documents, and one the model allows for these arguments
//     (a call the model knows to be invalid must fail; a valid one may fail only for a reason
//     the model cannot foresee, out of pages);
//   - every failure sets kvc_last_error() and changes nothing (every live sequence's bytes and
//     the stats; a failed prefill or append only records itself in the append record);
//   - after every call, the stats agree with the model (sequences, dense bytes, pages).
// Input: one byte (bits 0-1 and 3: the configuration, fuzz_store.hpp config_of_selector; bits 4-5
// not both 0: the store starts with codebooks; bit 6: the store rotates its rows, whatever the
// configuration), then up to kMaxCalls calls, read with FuzzedDataProvider.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <set>
#include <vector>

#include "c_enum_calls.h"
#include "fuzz_common.hpp"
#include "fuzz_store.hpp"

namespace {

using Statuses = std::set<kvc_status_t>;

void* const kStream = reinterpret_cast<void*>(uintptr_t{0x1000});
constexpr int kMaxCalls = 24;

// One call's expectations: the errors its arguments certainly cause (it must fail with one of
// them), and those it may meet though its arguments are valid.
struct Expect {
  Statuses certain, possible;
  void error(kvc_status_t s) { certain.insert(s); }
  bool fails() const { return !certain.empty(); }
  bool allows(kvc_status_t s) const {
    if (s == KVC_SUCCESS) return !fails();
    return certain.count(s) != 0 || (!fails() && possible.count(s) != 0);
  }
};

struct Model {
  kvc_store_config c;
  std::map<int32_t, std::vector<int64_t>> live;  // id -> tokens per layer
  int32_t next_id = 0;
  struct Saved {
    std::vector<uint8_t> bytes;
    std::vector<int64_t> lengths;
  };
  std::vector<Saved> saved;  // serialized sequences, to restore later

  int64_t limit() const { return c.max_sequence_tokens ? c.max_sequence_tokens : INT32_MAX; }
  bool full() const { return c.max_sequences > 0 && int64_t(live.size()) >= c.max_sequences; }
  std::vector<int32_t> ids() const {
    std::vector<int32_t> out;
    for (const auto& [id, l] : live) out.push_back(id);
    return out;
  }
};

class Driver {
 public:
  // preset: the store starts with the fuzzers' fixed codebooks (else it builds its own at the
  // first compressed block; slower, so only a quarter of the inputs do that).
  Driver(FuzzedDataProvider& in, int which, bool preset, bool rotate) : in_(in) {
    m_.c = kvc_fuzz::store_config(which);
    if (rotate) m_.c.rotation = KVC_ROTATION_HADAMARD;  // every config's head_dim: a power of 2
    KVC_FUZZ_CHECK(kvc_store_create(&m_.c, &s_) == KVC_SUCCESS);
    if (preset) kvc_fuzz::set_store_codebooks(s_, m_.c, fixed_book());
  }
  static kvc_codebook_t fixed_book() {
    static const kvc_codebook_t book = kvc_fuzz::make_fixed_codebook();  // slow: built once
    return book;
  }
  ~Driver() { kvc_store_destroy(s_); }
  Driver(const Driver&) = delete;
  Driver& operator=(const Driver&) = delete;

  void step() {
    switch (in_.ConsumeIntegralInRange<int>(0, 13)) {
      case 0:
        return create();
      case 1:
      case 2:
        return add();
      case 3:
      case 4:
        return prefill();
      case 5:
      case 6:
        return append();
      case 7:
        return read();
      case 8:
        return attention();
      case 9:
        return free_sequence();
      case 10:
        return serialize();
      case 11:
        return restore();
      case 12:
        return stats();
      default:
        return codebooks();
    }
  }

 private:
  // ---- Arguments -------------------------------------------------------------------------------
  int32_t pick_id() {
    const std::vector<int32_t> ids = m_.ids();
    switch (in_.ConsumeIntegralInRange<int>(0, 7)) {
      case 0:
        return -1 - in_.ConsumeIntegralInRange<int32_t>(0, 3);
      case 1:
        return m_.next_id + in_.ConsumeIntegralInRange<int32_t>(0, 2);  // not (yet) handed out
      case 2:
        return INT32_MAX;
      default:
        if (ids.empty()) return m_.next_id;
        return ids[in_.ConsumeIntegralInRange<size_t>(0, ids.size() - 1)];
    }
  }
  int32_t pick_layer() {
    switch (in_.ConsumeIntegralInRange<int>(0, 9)) {
      case 0:
        return -1;
      case 1:
        return m_.c.num_layers;
      case 2:
        return INT32_MIN;
      default:
        return in_.ConsumeIntegralInRange<int32_t>(0, m_.c.num_layers - 1);
    }
  }
  bool layer_ok(int32_t l) const { return l >= 0 && l < m_.c.num_layers; }
  void* pick_stream() { return in_.ConsumeIntegralInRange<int>(0, 15) == 0 ? kStream : nullptr; }
  // A pointer to buf, or now and then NULL.
  template <class T>
  T* maybe_null(T* p) {
    return in_.ConsumeIntegralInRange<int>(0, 15) == 0 ? nullptr : p;
  }
  size_t row() const { return kvc_fuzz::row_elements(m_.c); }
  // count rows of the store's dtype; now and then one element inf or NaN.
  std::vector<uint8_t> rows(size_t count, bool& nonfinite) {
    std::vector<uint8_t> r =
        kvc_fuzz::store_rows(m_.c, count, in_.ConsumeIntegral<uint32_t>(),
                             in_.ConsumeIntegralInRange<int>(0, 5) == 0 ? 1 : 0);
    nonfinite = count > 0 && in_.ConsumeIntegralInRange<int>(0, 19) == 0;
    if (nonfinite) {
      const size_t at = in_.ConsumeIntegralInRange<size_t>(0, count * row() - 1);
      const uint16_t bad = in_.ConsumeBool() ? 0x7FFF : 0xFF80;  // NaN in fp16 and bf16; -inf bf16
      std::memcpy(&r[2 * at], &bad, 2);
    }
    return r;
  }

  // ---- Checks ----------------------------------------------------------------------------------
  kvc_fuzz::StoreSnapshot snap() { return kvc_fuzz::snapshot(s_, m_.ids()); }

  // The status against the expectation; on failure, a message and no change (the append record
  // aside where `records`).
  void check(kvc_status_t st, const Expect& e, const kvc_fuzz::StoreSnapshot& before,
             bool records = false) {
    if (!e.allows(st)) {
      std::fprintf(stderr, "status %d (%s) not allowed; certain:", int(st), kvc_status_string(st));
      for (kvc_status_t s : e.certain) std::fprintf(stderr, " %d", int(s));
      std::fprintf(stderr, "; possible:");
      for (kvc_status_t s : e.possible) std::fprintf(stderr, " %d", int(s));
      std::fprintf(stderr, "\n");
      KVC_FUZZ_CHECK(e.allows(st));
    }
    if (st == KVC_SUCCESS) return;
    KVC_FUZZ_CHECK(kvc_last_error()[0] != '\0');
    KVC_FUZZ_CHECK(snap() == before);
    if (!records) {
      const kvc_store_stats now = kvc_fuzz::store_stats(s_);
      KVC_FUZZ_CHECK(now.last_append_status == before.stats.last_append_status);
      KVC_FUZZ_CHECK(now.failed_appends == before.stats.failed_appends);
    }
  }

  // The stats and the lengths against the model, after every call.
  void check_model() {
    const kvc_store_stats st = kvc_fuzz::store_stats(s_);
    KVC_FUZZ_CHECK(st.num_sequences == int32_t(m_.live.size()));
    int64_t dense = 0;
    for (const auto& [id, lengths] : m_.live) {
      for (int32_t l = 0; l < m_.c.num_layers; ++l) {
        int32_t n = -1;
        KVC_FUZZ_CHECK(kvc_store_sequence_length(s_, id, l, &n) == KVC_SUCCESS);
        KVC_FUZZ_CHECK(n == lengths[size_t(l)]);
        dense += 2 * int64_t(row()) * 2 * n;
      }
    }
    KVC_FUZZ_CHECK(st.dense_bytes == dense);
    KVC_FUZZ_CHECK(st.pages_in_use >= 0 && st.pages_in_use <= st.pages_total);
    KVC_FUZZ_CHECK(st.page_bytes == st.pages_in_use * m_.c.page_bytes);
    KVC_FUZZ_CHECK(st.block_bytes <= st.page_bytes);
  }

  // ---- Calls -----------------------------------------------------------------------------------
  void create() {  // a second store from a damaged configuration; destroyed at once
    kvc_store_config c = m_.c;
    Expect e;
    // A tiles store refuses shapes format t1 lacks (NOT_SUPPORTED).
    if (m_.c.block_format == KVC_BLOCK_FORMAT_TILES) e.possible.insert(KVC_ERROR_NOT_SUPPORTED);
    // A rotated store refuses a head_dim that is not a power of two (NOT_SUPPORTED).
    if (m_.c.rotation != KVC_ROTATION_NONE) e.possible.insert(KVC_ERROR_NOT_SUPPORTED);
    std::vector<float> scales;  // case 15's, read by kvc_store_create below
    switch (in_.ConsumeIntegralInRange<int>(0, 16)) {
      case 0:
        c.struct_size = in_.ConsumeIntegral<uint32_t>();
        if (c.struct_size != sizeof c) e.error(KVC_ERROR_ABI_MISMATCH);
        break;
      case 1:
        c.dtype = in_.ConsumeBool() ? -1 : in_.ConsumeIntegral<int32_t>();
        if (c.dtype != KVC_DTYPE_FP16 && c.dtype != KVC_DTYPE_BF16) {
          e.error(KVC_ERROR_INVALID_ARGUMENT);
        }
        break;
      case 2:
        c.backend = in_.ConsumeIntegral<int32_t>();
        if (c.backend != KVC_BACKEND_CPU) {  // CUDA: NOT_SUPPORTED in a CPU-only build
          e.error(KVC_ERROR_INVALID_ARGUMENT);
          e.error(KVC_ERROR_NOT_SUPPORTED);
        }
        break;
      case 3:
        c.num_layers = in_.ConsumeIntegralInRange<int32_t>(-2, 5000);
        if (c.num_layers < 1 || c.num_layers > 4096) e.error(KVC_ERROR_INVALID_ARGUMENT);
        // Layer scales are num_layers floats: another count cannot keep this store's arrays.
        if (c.num_layers != m_.c.num_layers) c.key_layer_scales = c.value_layer_scales = nullptr;
        break;
      case 4:
        c.capacity_bytes = in_.ConsumeBool()
                               ? INT64_MAX
                               : in_.ConsumeIntegralInRange<int64_t>(INT64_MIN, c.page_bytes - 1);
        e.error(KVC_ERROR_INVALID_ARGUMENT);  // no page, or more than 2^32 - 1 pages
        break;
      case 5:
        c.page_bytes = in_.ConsumeIntegral<int32_t>();
        if (c.page_bytes != 0 && c.page_bytes != m_.c.page_bytes) {
          e.possible.insert(
              KVC_ERROR_INVALID_ARGUMENT);  // a multiple of 256 above the largest block
        }
        if (c.page_bytes < 0 || c.page_bytes % 256 != 0) e.error(KVC_ERROR_INVALID_ARGUMENT);
        // (page_bytes 0: the default page; any valid page: a small pool, fine)
        if (c.page_bytes > (1 << 20) || c.page_bytes == 0) {
          c.capacity_bytes = 1;  // no page: rejected, never a large allocation
          e.error(KVC_ERROR_INVALID_ARGUMENT);
        }
        break;
      case 6:
        c.key_error_bound = in_.ConsumeBool() ? NAN : in_.ConsumeFloatingPoint<float>();
        e.possible.insert(KVC_ERROR_INVALID_ARGUMENT);
        if (!std::isfinite(c.key_error_bound) || c.key_error_bound <= 0) {
          e.error(KVC_ERROR_INVALID_ARGUMENT);
        }
        break;
      case 7:
        c.entropy = in_.ConsumeIntegral<int32_t>();
        if (c.entropy < 0 || c.entropy > KVC_ENTROPY_HUFFMAN) e.error(KVC_ERROR_INVALID_ARGUMENT);
        break;
      case 8:
        c.key_bound_mode = in_.ConsumeIntegral<int32_t>();
        if (c.key_bound_mode != KVC_BOUND_ABSOLUTE && c.key_bound_mode != KVC_BOUND_RELATIVE) {
          e.error(KVC_ERROR_INVALID_ARGUMENT);
        }
        e.possible.insert(KVC_ERROR_INVALID_ARGUMENT);  // a bound out of the new mode's range
        break;
      case 9:
        c.head_dim = in_.ConsumeIntegral<int32_t>();
        c.block_tokens = in_.ConsumeIntegral<int32_t>();
        e.possible.insert(KVC_ERROR_INVALID_ARGUMENT);
        if (c.head_dim <= 0 || c.block_tokens <= 0) e.error(KVC_ERROR_INVALID_ARGUMENT);
        // Valid shapes may need larger pages than this configuration's: rejected as such.
        break;
      case 10:
        c.max_sequences = in_.ConsumeIntegral<int32_t>();
        if (c.max_sequences < 0 || c.max_sequences > (1 << 20)) {
          e.error(KVC_ERROR_INVALID_ARGUMENT);
        }
        break;
      case 11: {
        kvc_store_t t = nullptr;
        const kvc_status_t st = kvc_store_create(nullptr, &t);
        KVC_FUZZ_CHECK(st == KVC_ERROR_NULL_POINTER && t == nullptr);
        KVC_FUZZ_CHECK(kvc_store_create(&c, nullptr) == KVC_ERROR_NULL_POINTER);
        KVC_FUZZ_CHECK(kvc_store_destroy(nullptr) == KVC_SUCCESS);
        return;
      }
      case 12: {  // the rotation: NONE, HADAMARD or HADAMARD_VALUES (every config's head_dim is
                  // a power of two)
        c.rotation = in_.ConsumeBool() ? in_.ConsumeIntegralInRange<int32_t>(-1, 3)
                                       : in_.ConsumeIntegral<int32_t>();
        if (c.rotation < KVC_ROTATION_NONE || c.rotation > KVC_ROTATION_HADAMARD_VALUES) {
          e.error(KVC_ERROR_INVALID_ARGUMENT);
        } else if (in_.ConsumeBool()) {
          c.head_dim = in_.ConsumeIntegralInRange<int32_t>(1, 1024);
          e.possible.insert(KVC_ERROR_INVALID_ARGUMENT);  // the head_dim for other fields
          e.possible.insert(KVC_ERROR_NOT_SUPPORTED);     // tiles' shapes
          if (c.rotation != KVC_ROTATION_NONE && (c.head_dim & (c.head_dim - 1)) != 0) {
            e.error(KVC_ERROR_NOT_SUPPORTED);  // or, checked first, the codec's field checks
            e.error(KVC_ERROR_INVALID_ARGUMENT);
          }
        }
        break;
      }
      case 13: {  // the block format, the tile options and the sub-streams
        const int32_t v = in_.ConsumeBool() ? in_.ConsumeIntegralInRange<int32_t>(-1, 3)
                                            : in_.ConsumeIntegral<int32_t>();
        const bool tiles = c.block_format == KVC_BLOCK_FORMAT_TILES;
        e.possible = {KVC_ERROR_INVALID_ARGUMENT, KVC_ERROR_NOT_SUPPORTED};
        switch (in_.ConsumeIntegralInRange<int>(0, 3)) {
          case 0:  // (tiles where the shape has none: NOT_SUPPORTED; larger blocks: pages)
            c.block_format = v;
            if (v < KVC_BLOCK_FORMAT_V1 || v > KVC_BLOCK_FORMAT_AUTO) {
              e.error(KVC_ERROR_INVALID_ARGUMENT);
            }
            break;
          case 1:
            c.tile_permute_channels = v;
            if (v != 0 && v != 1) e.error(KVC_ERROR_INVALID_ARGUMENT);
            break;
          case 2:
            c.tile_split_widths = v;
            if (v != 0 && v != 1) e.error(KVC_ERROR_INVALID_ARGUMENT);
            break;
          default:  // checked against the group sizes by v1 stores, ignored by tiles
            c.num_substreams = v;
            if (v < 0 && !tiles) e.error(KVC_ERROR_INVALID_ARGUMENT);
            if (tiles) e.possible.clear();
            break;
        }
        break;
      }
      case 14:  // the attention sinks: 0 .. block_tokens - 1
        c.sink_tokens = in_.ConsumeBool() ? in_.ConsumeIntegralInRange<int32_t>(-1, 70)
                                          : in_.ConsumeIntegral<int32_t>();
        if (c.sink_tokens < 0 || c.sink_tokens >= c.block_tokens) {
          e.error(KVC_ERROR_INVALID_ARGUMENT);
        }
        break;
      case 15: {  // per-layer bounds: num_layers scales of K or V, any floats
        for (int32_t l = 0; l < c.num_layers; ++l) {
          scales.push_back(in_.ConsumeBool() ? in_.ConsumeFloatingPointInRange<float>(0.0f, 4.0f)
                                             : in_.ConsumeFloatingPoint<float>());
        }
        (in_.ConsumeBool() ? c.key_layer_scales : c.value_layer_scales) = scales.data();
        const bool valid = std::all_of(scales.begin(), scales.end(),
                                       [](float x) { return std::isfinite(x) && x > 0.0f; });
        if (!valid) e.error(KVC_ERROR_INVALID_ARGUMENT);
        e.possible.insert(KVC_ERROR_INVALID_ARGUMENT);  // a layer's bound the codec refuses
        break;
      }
      default:
        c.value_group_size = in_.ConsumeIntegral<int32_t>();
        e.possible.insert(KVC_ERROR_INVALID_ARGUMENT);
        if (c.value_group_size < 0) e.error(KVC_ERROR_INVALID_ARGUMENT);
        break;
    }
    kvc_store_t t = nullptr;
    kvc_clear_last_error();
    const kvc_status_t st = kvc_store_create(&c, &t);
    KVC_FUZZ_CHECK(e.allows(st));
    KVC_FUZZ_CHECK((st == KVC_SUCCESS) == (t != nullptr));
    if (st != KVC_SUCCESS) KVC_FUZZ_CHECK(kvc_last_error()[0] != '\0');
    kvc_store_destroy(t);
  }

  void add() {
    Expect e;
    const bool null_out = in_.ConsumeIntegralInRange<int>(0, 15) == 0;
    if (null_out) e.error(KVC_ERROR_NULL_POINTER);
    if (m_.full()) e.error(KVC_ERROR_OUT_OF_MEMORY);
    const auto before = snap();
    int32_t id = -1;
    kvc_clear_last_error();
    const kvc_status_t st = kvc_store_add_sequence(s_, null_out ? nullptr : &id);
    check(st, e, before);
    if (st != KVC_SUCCESS) return;
    KVC_FUZZ_CHECK(id == m_.next_id);
    m_.next_id = id + 1;
    m_.live[id].assign(size_t(m_.c.num_layers), 0);
  }

  void prefill() {
    Expect e;
    const int32_t id = pick_id();
    const int32_t first = pick_layer();
    int32_t num_layers = in_.ConsumeIntegralInRange<int32_t>(-1, m_.c.num_layers + 1);
    const int T = m_.c.block_tokens;
    int32_t n = in_.ConsumeIntegralInRange<int32_t>(-1, 3 * T);
    const bool huge = in_.ConsumeIntegralInRange<int>(0, 31) == 0;
    if (huge) n = INT32_MAX;  // only with NULL data or past max_sequence_tokens (below)
    void* stream = pick_stream();
    bool nonfinite_k = false, nonfinite_v = false;
    const size_t layers_in_data = num_layers > 0 ? size_t(num_layers) : 0;
    const size_t count = huge || n <= 0 ? 0 : size_t(n) * layers_in_data;
    std::vector<uint8_t> k = rows(count, nonfinite_k), v = rows(count, nonfinite_v);
    const bool nonfinite = nonfinite_k || nonfinite_v;
    const uint8_t* kp = maybe_null(k.data());
    const uint8_t* vp = maybe_null(v.data());
    if (huge && m_.c.max_sequence_tokens == 0) kp = nullptr;  // never read past the buffers

    bool args_ok = true;
    auto bad = [&](kvc_status_t s) {
      e.error(s);
      args_ok = false;
    };
    if (!layer_ok(first)) {
      bad(KVC_ERROR_INVALID_ARGUMENT);
    } else if (num_layers < 1 || num_layers > m_.c.num_layers - first) {
      bad(KVC_ERROR_INVALID_ARGUMENT);
    }
    if (n < 0) bad(KVC_ERROR_INVALID_ARGUMENT);
    if (stream != nullptr) bad(KVC_ERROR_INVALID_ARGUMENT);
    if (args_ok && n == 0) {  // nothing to add: succeeds whatever the id
    } else {
      if (kp == nullptr || vp == nullptr) bad(KVC_ERROR_NULL_POINTER);
      if (m_.live.count(id) == 0) bad(KVC_ERROR_UNKNOWN_SEQUENCE);
      if (args_ok) {
        const auto& lengths = m_.live[id];
        for (int32_t l = first; l < first + num_layers; ++l) {
          if (lengths[size_t(l)] + int64_t(n) > m_.limit()) e.error(KVC_ERROR_INVALID_ARGUMENT);
          if ((lengths[size_t(l)] % T) + n >= T) e.possible.insert(KVC_ERROR_OUT_OF_PAGES);
        }
        if (nonfinite) e.error(KVC_ERROR_NONFINITE_INPUT);
      }
    }
    const auto before = snap();
    kvc_clear_last_error();
    const kvc_status_t st = kvc_store_prefill(s_, id, first, num_layers, n, kp, vp, stream);
    check(st, e, before, /*records=*/args_ok);
    if (st != KVC_SUCCESS || n == 0) return;
    for (int32_t l = first; l < first + num_layers; ++l) m_.live[id][size_t(l)] += n;
  }

  void append() {
    Expect e;
    const int32_t layer = pick_layer();
    int32_t num = in_.ConsumeIntegralInRange<int32_t>(-1, 6);
    if (in_.ConsumeIntegralInRange<int>(0, 31) == 0) num = KVC_STORE_MAX_BATCH + 1;
    std::vector<int32_t> ids(num > 0 && num <= 6 ? size_t(num) : 0);
    for (int32_t& id : ids) id = pick_id();
    void* stream = pick_stream();
    bool nonfinite_k = false, nonfinite_v = false;
    std::vector<uint8_t> k = rows(ids.size(), nonfinite_k), v = rows(ids.size(), nonfinite_v);
    const bool nonfinite = nonfinite_k || nonfinite_v;
    const int32_t* idp = maybe_null(ids.data());
    const uint8_t* kp = maybe_null(k.data());
    const uint8_t* vp = maybe_null(v.data());

    bool args_ok = true;
    auto bad = [&](kvc_status_t s) {
      e.error(s);
      args_ok = false;
    };
    if (!layer_ok(layer)) bad(KVC_ERROR_INVALID_ARGUMENT);
    if (stream != nullptr) bad(KVC_ERROR_INVALID_ARGUMENT);
    if (num < 0 || num > KVC_STORE_MAX_BATCH) bad(KVC_ERROR_INVALID_ARGUMENT);
    const bool have_ids = num > 0 && num <= KVC_STORE_MAX_BATCH;
    if (have_ids && idp == nullptr) bad(KVC_ERROR_NULL_POINTER);
    if (have_ids && idp != nullptr) {
      const std::set<int32_t> distinct(ids.begin(), ids.end());
      if (distinct.size() != ids.size()) bad(KVC_ERROR_INVALID_ARGUMENT);
      for (int32_t id : ids) {
        if (m_.live.count(id) == 0) bad(KVC_ERROR_UNKNOWN_SEQUENCE);
      }
    }
    if (have_ids && (kp == nullptr || vp == nullptr)) bad(KVC_ERROR_NULL_POINTER);
    if (args_ok && have_ids) {
      for (int32_t id : ids) {
        const int64_t len = m_.live[id][size_t(layer)];
        if (len + 1 > m_.limit()) e.error(KVC_ERROR_INVALID_ARGUMENT);
        if (len % m_.c.block_tokens == m_.c.block_tokens - 1) {
          e.possible.insert(KVC_ERROR_OUT_OF_PAGES);
        }
      }
      if (nonfinite) e.error(KVC_ERROR_NONFINITE_INPUT);
    }
    const auto before = snap();
    kvc_clear_last_error();
    const kvc_status_t st = kvc_store_append(s_, layer, num, idp, kp, vp, stream);
    check(st, e, before, /*records=*/args_ok && have_ids);
    if (st != KVC_SUCCESS) return;
    for (int32_t id : ids) ++m_.live[id][size_t(layer)];
  }

  void read() {
    Expect e;
    const int32_t id = pick_id();
    const int32_t layer = pick_layer();
    static constexpr int32_t kDtypes[] = {KVC_DTYPE_FP32, KVC_DTYPE_FP16, KVC_DTYPE_BF16, -1, 0, 4,
                                          INT32_MIN,      INT32_MAX};
    const int choice = in_.ConsumeIntegralInRange<int>(0, 11);  // valid two times in three
    const int32_t dtype = kDtypes[choice < 8 ? choice : choice % 3];
    void* stream = pick_stream();
    const int64_t length = m_.live.count(id) && layer_ok(layer) ? m_.live[id][size_t(layer)] : 0;
    int32_t capacity = int32_t(length) + in_.ConsumeIntegralInRange<int32_t>(-2, 2);
    const bool claims_more = in_.ConsumeIntegralInRange<int>(0, 15) == 0;
    std::vector<float> k(size_t(std::max<int64_t>(length, 0)) * row() + 1);
    std::vector<float> v(k.size());
    float* kp = maybe_null(k.data());
    float* vp = maybe_null(v.data());
    if (claims_more) capacity = INT32_MAX;  // the buffers hold `length` tokens: all it writes

    const bool dtype_ok =
        dtype == KVC_DTYPE_FP16 || dtype == KVC_DTYPE_BF16 || dtype == KVC_DTYPE_FP32;
    if (!layer_ok(layer) || !dtype_ok || stream != nullptr) e.error(KVC_ERROR_INVALID_ARGUMENT);
    if (m_.live.count(id) == 0) e.error(KVC_ERROR_UNKNOWN_SEQUENCE);
    if (capacity < length) e.error(KVC_ERROR_BUFFER_TOO_SMALL);
    if (length > 0 && (kp == nullptr || vp == nullptr)) e.error(KVC_ERROR_NULL_POINTER);
    const auto before = snap();
    kvc_clear_last_error();
    const kvc_status_t st = kvc_fuzz_store_read(s_, id, layer, dtype, capacity, kp, vp, stream);
    check(st, e, before);
    if (st == KVC_SUCCESS && dtype == KVC_DTYPE_FP32) {
      for (size_t i = 0; i + 1 < k.size(); ++i) {
        KVC_FUZZ_CHECK(std::isfinite(k[i]) && std::isfinite(v[i]));
      }
    }
    KVC_FUZZ_CHECK(snap() == before);  // reading changes nothing, ever
  }

  void attention() {
    Expect e;
    const int32_t layer = pick_layer();
    int32_t num = in_.ConsumeIntegralInRange<int32_t>(-1, 4);
    if (in_.ConsumeIntegralInRange<int>(0, 31) == 0) num = KVC_STORE_MAX_BATCH + 1;
    std::vector<int32_t> ids(num > 0 && num <= 4 ? size_t(num) : 0);
    for (int32_t& id : ids) id = pick_id();  // repeats are allowed here
    const int32_t H = m_.c.num_kv_heads;
    static constexpr int32_t kGroups[] = {1, 2, 64, 0, 65, -1};
    int32_t q_heads = H * kGroups[in_.ConsumeIntegralInRange<int>(0, 5)];
    if (in_.ConsumeIntegralInRange<int>(0, 15) == 0) q_heads += 1;
    float scale = 0.125f;
    if (in_.ConsumeIntegralInRange<int>(0, 15) == 0) scale = in_.ConsumeBool() ? INFINITY : NAN;
    void* stream = pick_stream();
    const size_t group = q_heads > 0 ? size_t(q_heads) : 0;
    std::vector<uint16_t> q(ids.size() * group * size_t(m_.c.head_dim) + 1, 0x3C00);
    std::vector<uint16_t> out(q.size());
    const int32_t* idp = maybe_null(ids.data());
    const uint16_t* qp = maybe_null(q.data());
    uint16_t* op = maybe_null(out.data());

    const bool heads_ok = q_heads >= H && q_heads % H == 0 && q_heads / H <= 64;
    if (!layer_ok(layer) || !heads_ok || !std::isfinite(scale) || stream != nullptr || num < 0 ||
        num > KVC_STORE_MAX_BATCH) {
      e.error(KVC_ERROR_INVALID_ARGUMENT);
    }
    const bool have_ids = num > 0 && num <= KVC_STORE_MAX_BATCH;
    if (have_ids && idp == nullptr) e.error(KVC_ERROR_NULL_POINTER);
    if (have_ids && idp != nullptr) {
      for (int32_t id : ids) {
        if (m_.live.count(id) == 0) e.error(KVC_ERROR_UNKNOWN_SEQUENCE);
      }
    }
    if (have_ids && (qp == nullptr || op == nullptr)) e.error(KVC_ERROR_NULL_POINTER);
    const auto before = snap();
    kvc_clear_last_error();
    const kvc_status_t st =
        kvc_store_attention(s_, layer, num, idp, q_heads, scale, qp, op, stream);
    check(st, e, before);
    KVC_FUZZ_CHECK(snap() == before);
  }

  void free_sequence() {
    Expect e;
    const int32_t id = pick_id();
    void* stream = pick_stream();
    if (stream != nullptr) e.error(KVC_ERROR_INVALID_ARGUMENT);
    if (m_.live.count(id) == 0) e.error(KVC_ERROR_UNKNOWN_SEQUENCE);
    const auto before = snap();
    kvc_clear_last_error();
    const kvc_status_t st = kvc_store_free_sequence(s_, id, stream);
    check(st, e, before);
    if (st == KVC_SUCCESS) m_.live.erase(id);
  }

  void serialize() {
    Expect e;
    const int32_t id = pick_id();
    const bool live = m_.live.count(id) != 0;
    size_t size = 0;
    const bool null_size = in_.ConsumeIntegralInRange<int>(0, 15) == 0;
    kvc_clear_last_error();
    kvc_status_t st = kvc_store_serialized_size(s_, id, null_size ? nullptr : &size);
    if (null_size) {
      KVC_FUZZ_CHECK(st == KVC_ERROR_NULL_POINTER);
    } else {
      KVC_FUZZ_CHECK(st == (live ? KVC_SUCCESS : KVC_ERROR_UNKNOWN_SEQUENCE));
    }
    if (st != KVC_SUCCESS) KVC_FUZZ_CHECK(kvc_last_error()[0] != '\0');
    if (null_size && live) KVC_FUZZ_CHECK(kvc_store_serialized_size(s_, id, &size) == KVC_SUCCESS);
    if (!live) size = 64;
    const size_t capacity = size - std::min<size_t>(size, in_.ConsumeIntegralInRange<int>(0, 1));
    std::vector<uint8_t> dst(std::max<size_t>(capacity, 1), 0xA5);
    uint8_t* dp = maybe_null(dst.data());
    size_t written = 7;
    size_t* wp = maybe_null(&written);
    if (dp == nullptr || wp == nullptr) e.error(KVC_ERROR_NULL_POINTER);
    if (!live) e.error(KVC_ERROR_UNKNOWN_SEQUENCE);
    if (live && capacity < size) e.error(KVC_ERROR_BUFFER_TOO_SMALL);
    const auto before = snap();
    kvc_clear_last_error();
    st = kvc_store_serialize(s_, id, dp, capacity, wp);
    check(st, e, before);
    if (st != KVC_SUCCESS) {
      KVC_FUZZ_CHECK(written == 7);  // untouched
      return;
    }
    KVC_FUZZ_CHECK(written == size);
    dst.resize(size);
    if (m_.saved.size() >= 4) m_.saved.erase(m_.saved.begin());
    m_.saved.push_back({dst, m_.live[id]});
  }

  void restore() {
    Expect e;
    std::vector<uint8_t> bytes;
    std::vector<int64_t> lengths;
    const int how = in_.ConsumeIntegralInRange<int>(0, 3);
    if (!m_.saved.empty() && how <= 1) {
      const Model::Saved& s = m_.saved[in_.ConsumeIntegralInRange<size_t>(0, m_.saved.size() - 1)];
      bytes = s.bytes;
      lengths = s.lengths;
      if (how == 1 && !bytes.empty()) {  // one byte changed, resealed half of the time
        bytes[in_.ConsumeIntegralInRange<size_t>(0, bytes.size() - 1)] ^=
            in_.ConsumeIntegralInRange<uint8_t>(1, 255);
        if (in_.ConsumeBool() && bytes.size() >= 4) {
          const uint32_t h = kvc_fuzz::fnv1a32(bytes.data(), bytes.size() - 4);
          std::memcpy(&bytes[bytes.size() - 4], &h, 4);
        }
        lengths.clear();
      }
    } else {
      bytes = in_.ConsumeBytes<uint8_t>(in_.ConsumeIntegralInRange<size_t>(0, 256));
    }
    const kvc_fuzz::ExactCopy copy(bytes.data(), bytes.size());
    const uint8_t* src = maybe_null(copy.p);
    int32_t id = -1;
    int32_t* idp = maybe_null(&id);
    if (src == nullptr || idp == nullptr) e.error(KVC_ERROR_NULL_POINTER);
    if (lengths.empty()) {  // any bytes: any data error
      e.possible = {KVC_ERROR_CORRUPT_DATA,     KVC_ERROR_FORMAT_VERSION,
                    KVC_ERROR_CONFIG_MISMATCH,  KVC_ERROR_CODEBOOK_MISMATCH,
                    KVC_ERROR_INVALID_ARGUMENT, KVC_ERROR_OUT_OF_PAGES};
    } else {
      e.possible = {KVC_ERROR_OUT_OF_PAGES};
    }
    if (m_.full()) {
      e.possible.insert(KVC_ERROR_OUT_OF_MEMORY);
      if (!lengths.empty()) e.error(KVC_ERROR_OUT_OF_MEMORY);  // found after the checks: certain
    }
    const auto before = snap();
    kvc_clear_last_error();
    const kvc_status_t st = kvc_store_restore(s_, src, bytes.size(), idp);
    check(st, e, before);
    if (st != KVC_SUCCESS) {
      KVC_FUZZ_CHECK(id == -1);
      return;
    }
    KVC_FUZZ_CHECK(id == m_.next_id);
    m_.next_id = id + 1;
    if (lengths.empty()) {  // what it holds: from the store, checked against the limit
      for (int32_t l = 0; l < m_.c.num_layers; ++l) {
        int32_t n = -1;
        KVC_FUZZ_CHECK(kvc_store_sequence_length(s_, id, l, &n) == KVC_SUCCESS);
        KVC_FUZZ_CHECK(n >= 0 && n <= m_.limit());
        lengths.push_back(n);
      }
    }
    m_.live[id] = lengths;
  }

  void stats() {
    kvc_store_stats st = KVC_STORE_STATS_INIT;
    const int how = in_.ConsumeIntegralInRange<int>(0, 7);
    kvc_clear_last_error();
    if (how == 0) {
      KVC_FUZZ_CHECK(kvc_store_get_stats(s_, nullptr) == KVC_ERROR_NULL_POINTER);
    } else if (how == 1) {
      st.struct_size = in_.ConsumeIntegral<uint32_t>();
      const kvc_status_t s = kvc_store_get_stats(s_, &st);
      KVC_FUZZ_CHECK(s == (st.struct_size == sizeof st ? KVC_SUCCESS : KVC_ERROR_ABI_MISMATCH));
    } else if (how == 2) {
      KVC_FUZZ_CHECK(kvc_store_get_stats(nullptr, &st) == KVC_ERROR_NULL_POINTER);
    } else {
      KVC_FUZZ_CHECK(kvc_store_get_stats(s_, &st) == KVC_SUCCESS);
      return;
    }
    KVC_FUZZ_CHECK(kvc_last_error()[0] != '\0' || how == 1);
  }

  void codebooks() {
    const int32_t layer = pick_layer();
    static constexpr int32_t kKinds[] = {KVC_KIND_KEY, KVC_KIND_VALUE, -1, 2, INT32_MIN};
    const int32_t kind = kKinds[in_.ConsumeIntegralInRange<int>(0, 4)];
    const bool ok = layer_ok(layer) && (kind == KVC_KIND_KEY || kind == KVC_KIND_VALUE);
    Expect e;
    if (!ok) e.error(KVC_ERROR_INVALID_ARGUMENT);
    const auto before = snap();
    kvc_clear_last_error();
    if (in_.ConsumeBool()) {
      kvc_codebook_t book = reinterpret_cast<kvc_codebook_t>(uintptr_t{1});
      const bool null_out = in_.ConsumeIntegralInRange<int>(0, 7) == 0;
      if (null_out) e.error(KVC_ERROR_NULL_POINTER);
      const kvc_status_t st =
          kvc_fuzz_store_get_codebook(s_, layer, kind, null_out ? nullptr : &book);
      check(st, e, before);
      if (st == KVC_SUCCESS) kvc_codebook_destroy(book);
      return;
    }
    // Set a codebook: the writer's own (unless it has none), or the fuzzers' fixed one, or NULL.
    kvc_codebook_t book = in_.ConsumeIntegralInRange<int>(0, 7) > 0 ? fixed_book() : nullptr;
    if (book == nullptr) e.error(KVC_ERROR_NULL_POINTER);
    // A tiles store uses no codebooks.
    if (book != nullptr && ok && m_.c.block_format == KVC_BLOCK_FORMAT_TILES) {
      e.error(KVC_ERROR_NOT_SUPPORTED);
    }
    // A layer whose codebooks are frozen refuses; the model does not track freezing.
    e.possible = {KVC_ERROR_INVALID_ARGUMENT};
    const kvc_status_t st = kvc_fuzz_store_set_codebook(s_, layer, kind, book);
    if (st == KVC_SUCCESS) {
      KVC_FUZZ_CHECK(e.allows(st));
      // The saved sequences' codebook tables may now differ from the store's: informative only.
      return;
    }
    check(st, e, before);
    KVC_FUZZ_CHECK(std::strlen(kvc_fuzz_status_string(int32_t(st))) > 0);
    KVC_FUZZ_CHECK(std::strlen(kvc_fuzz_status_string(in_.ConsumeIntegral<int32_t>())) > 0);
  }

 public:
  void check_after_step() { check_model(); }

 private:
  FuzzedDataProvider& in_;
  Model m_;
  kvc_store_t s_ = nullptr;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  FuzzedDataProvider in(data + 1, size - 1);
  Driver d(in, kvc_fuzz::config_of_selector(data[0]), (data[0] & 0x30) != 0, (data[0] & 0x40) != 0);
  // Short programs: each call is checked against the model, so a few suffice to reach any state
  // the store can be in (a small pool, small limits), and executions stay fast.
  for (int step = 0; step < kMaxCalls && in.remaining_bytes() > 0; ++step) {
    d.step();
    d.check_after_step();
  }
  return 0;
}
