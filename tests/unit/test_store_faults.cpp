// SPDX-License-Identifier: Apache-2.0
// Fault injection: every host allocation the CPU store makes during a call fails in turn — a
// prefill, an append, a restore, attention, a read, a serialization, a codebook set, adding and
// freeing a sequence — in stores of format v1, of tiles, of tiles serialized as v1, and with
// rotation, sinks and per-layer bounds. Each failure must give KVC_ERROR_OUT_OF_MEMORY and leave
// the store exactly as it was (every sequence's serialized bytes, the stats; a failed prefill or
// append records itself in last_append_status and failed_appends, as documented); the same call
// then succeeds and gives what it gives on a store that never failed. Failures come one at a time
// (with a message), or from one allocation on for the rest of the call, as when memory is
// exhausted (the message may then be empty, but the call must still return). The handle-making
// calls and the codec's encode and decode fail the same way.
//
// The hook is this test program's own replacement of the global operator new (the library is
// linked statically, so its allocations, those of the standard containers included, come here):
// nothing in the library or its ABI exists for the test.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <functional>
#include <new>
#include <random>
#include <string>

#include "store_model.hpp"

namespace {

// Allocations left before the one that fails (-1: none fails); whether every later one fails
// too; while counting, how many so far.
long g_fail_after = -1;
bool g_fail_persists = false;
bool g_counting = false;
long g_count = 0;

void* allocate(std::size_t n) {
  if (g_counting) ++g_count;
  if (g_fail_after >= 0 && g_fail_after-- == 0) {
    if (g_fail_persists) g_fail_after = 0;
    throw std::bad_alloc();
  }
  void* p = std::malloc(n ? n : 1);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

}  // namespace

void* operator new(std::size_t n) { return allocate(n); }
void* operator new[](std::size_t n) { return allocate(n); }
// The nothrow forms are left alone: their callers (std::stable_sort's buffer) go on without
// the memory, and the call succeeds.
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return std::malloc(n ? n : 1); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  return std::malloc(n ? n : 1);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace kvc::test {
namespace {

// Runs `call` with allocation number `fail_at` (from 0) failing, and with `persists` every one
// after it too; -1: none. Returns its status.
kvc_status_t with_failing_allocation(long fail_at, bool persists,
                                     const std::function<kvc_status_t()>& call) {
  g_fail_after = fail_at;
  g_fail_persists = persists;
  const kvc_status_t st = call();
  g_fail_after = -1;
  g_fail_persists = false;
  return st;
}

// How many allocations `call` makes (on a store in the state `setup` leaves).
long count_allocations(const std::function<kvc_status_t()>& call) {
  g_count = 0;
  g_counting = true;
  const kvc_status_t st = call();
  g_counting = false;
  EXPECT_EQ(st, KVC_SUCCESS) << kvc_last_error();
  return g_count;
}

// The store configurations faults are injected into.
enum class Variant { kV1, kTiles, kTilesServedAsV1, kRotatedWithSinksAndLayerScales };

const char* name(Variant v) {
  switch (v) {
    case Variant::kV1:
      return "format v1";
    case Variant::kTiles:
      return "tiles";
    case Variant::kTilesServedAsV1:
      return "tiles, serialized as format v1";
    case Variant::kRotatedWithSinksAndLayerScales:
      return "v1, rotated, sinks, layer scales";
  }
  return "?";
}

// Tiles need blocks of at least 16 tokens and 16 channels: the default shape's 8 tokens are
// doubled for them.
Shape shape_of(Variant v) {
  Shape sh;
  if (v == Variant::kTiles || v == Variant::kTilesServedAsV1) sh.tokens = 16;
  return sh;
}

const float kLayerScales[] = {0.5f, 2.0f};

kvc_store_config config_of(Variant v) {
  kvc_store_config c = store_config(shape_of(v), 1 << 20, 1024);
  if (v != Variant::kV1 && v != Variant::kRotatedWithSinksAndLayerScales) {
    c.block_format = KVC_BLOCK_FORMAT_TILES;
  }
  if (v == Variant::kTilesServedAsV1) c.serialized_block_format = KVC_BLOCK_FORMAT_V1;
  if (v == Variant::kRotatedWithSinksAndLayerScales) {
    c.rotation = KVC_ROTATION_HADAMARD;
    c.sink_tokens = 2;
    c.key_layer_scales = kLayerScales;
    c.value_layer_scales = kLayerScales;
  }
  return c;
}

// A store in a fixed state, made afresh for every injected failure: two layers, codebooks built
// (or not) by a first prefill, three sequences holding 2T + 1 (or no), T - 1 and 3 tokens.
struct Scene {
  Variant variant;
  Shape sh;
  std::unique_ptr<StoreHandle> store;
  Shadow shadow;
  std::vector<int32_t> ids;
  explicit Scene(bool with_codebooks, Variant v = Variant::kV1)
      : variant(v), sh(shape_of(v)), shadow{sh, {}, {}} {  // Shape's default: two layers
    store = std::make_unique<StoreHandle>(config_of(v));
    std::mt19937 rng(42);
    const size_t T = size_t(sh.tokens);
    const size_t lengths[] = {with_codebooks ? 2 * T + 1 : 0u, T - 1, 3u};
    for (size_t n : lengths) {
      int32_t id = -1;
      EXPECT_EQ(kvc_store_add_sequence(store->s, &id), KVC_SUCCESS);
      shadow.add_sequence(id);
      ids.push_back(id);
      if (n == 0) continue;
      const Rows k = random_rows(rng, n * 2, sh), v = random_rows(rng, n * 2, sh);
      EXPECT_EQ(
          kvc_store_prefill(store->s, id, 0, 2, int32_t(n), k.bits.data(), v.bits.data(), nullptr),
          KVC_SUCCESS)
          << kvc_last_error();
    }
  }
};

// An operation on a scene, and what it gives when it succeeds (output bytes, a new sequence's
// serialization; empty if nothing beyond the store's state). `prepare` runs right before each
// call, outside the injection.
struct Operation {
  std::function<kvc_status_t(Scene&)> call;
  std::function<std::vector<uint8_t>(Scene&)> result = [](Scene&) {
    return std::vector<uint8_t>{};
  };
  bool records = false;  // a failure past the argument checks counts in the stats (api.md)
  std::function<void(Scene&)> prepare = [](Scene&) {};
  bool caches = false;  // may keep decoded copies of the sequences it reached (attention)
  // After a failed call, whether its outputs hold what it found there (empty: not checked).
  std::function<bool()> outputs_untouched;
};

// The store's state as the checks compare it (`snapshot`), less the decoded copies' size where
// the operation may keep some.
std::vector<uint8_t> state(Scene& scene, const Operation& op) {
  std::vector<uint8_t> out = snapshot(scene.store->s, scene.shadow);
  if (op.caches) {
    kvc_store_stats st{};
    const size_t at = out.size() - sizeof st + offsetof(kvc_store_stats, decoded_cache_bytes);
    std::fill_n(out.begin() + long(at), sizeof st.decoded_cache_bytes, uint8_t(0));
  }
  return out;
}

// For every allocation of the operation in turn, alone or with every later one: a fresh scene,
// the failure, then the checks. Returns the number of allocations tried.
long inject_every_failure(bool with_codebooks, const Operation& op,
                          Variant variant = Variant::kV1) {
  long n = 0;
  std::vector<uint8_t> expected;  // what the call gives on a store that never failed
  {
    Scene scene(with_codebooks, variant);
    op.prepare(scene);
    n = count_allocations([&] { return op.call(scene); });
    expected = op.result(scene);
  }
  long recorded_failures = 0;
  for (const bool persists : {false, true}) {
    for (long i = 0; i < n; ++i) {
      const std::string where = std::string(name(variant)) + ", allocation " + std::to_string(i) +
                                " of " + std::to_string(n) +
                                (persists ? " and every later one" : "");
      Scene scene(with_codebooks, variant);
      const auto before = state(scene, op);
      const kvc_store_stats stats_before = store_stats(scene.store->s);
      op.prepare(scene);
      kvc_clear_last_error();
      const kvc_status_t st = with_failing_allocation(i, persists, [&] { return op.call(scene); });
      EXPECT_EQ(st, KVC_ERROR_OUT_OF_MEMORY) << where;
      if (!persists) EXPECT_STRNE(kvc_last_error(), "") << where;
      EXPECT_EQ(state(scene, op), before) << where << ": the failed call changed the store";
      if (op.outputs_untouched) {
        EXPECT_TRUE(op.outputs_untouched()) << where << ": the failed call wrote its outputs";
      }
      const kvc_store_stats stats_after = store_stats(scene.store->s);
      const bool recorded = stats_after.failed_appends != stats_before.failed_appends;
      recorded_failures += recorded;
      if (op.records && recorded) {  // (not for a failure in the argument checks: api.md, stats)
        EXPECT_EQ(stats_after.last_append_status, KVC_ERROR_OUT_OF_MEMORY) << where;
        EXPECT_EQ(stats_after.failed_appends, stats_before.failed_appends + 1) << where;
      } else {
        EXPECT_EQ(stats_after.last_append_status, stats_before.last_append_status) << where;
        EXPECT_EQ(stats_after.failed_appends, stats_before.failed_appends) << where;
      }
      // The same call then succeeds, with what it gives on a store that never failed: nothing
      // was left half done.
      EXPECT_EQ(op.call(scene), KVC_SUCCESS) << where << ": " << kvc_last_error();
      EXPECT_EQ(op.result(scene), expected) << where << ": the call's result differs";
      if (::testing::Test::HasFailure()) return n;
    }
  }
  if (op.records) EXPECT_GT(recorded_failures, n) << "most failures are past the argument checks";
  return n;
}

constexpr Variant kVariants[] = {Variant::kV1, Variant::kTiles, Variant::kTilesServedAsV1,
                                 Variant::kRotatedWithSinksAndLayerScales};

TEST(StoreFaults, EveryAllocationOfAPrefillFailsCleanly) {
  for (Variant variant : kVariants) {
    for (bool with_codebooks : {false, true}) {
      SCOPED_TRACE(with_codebooks ? "codebooks built" : "first prefill builds the codebooks");
      std::mt19937 rng(1);
      const Shape sh = shape_of(variant);
      const Rows k = random_rows(rng, 2 * 12, sh), v = random_rows(rng, 2 * 12, sh);
      Operation op{[&](Scene& s) {
        return kvc_store_prefill(s.store->s, s.ids[1], 0, 2, 12, k.bits.data(), v.bits.data(),
                                 nullptr);
      }};
      op.records = true;
      const long n = inject_every_failure(with_codebooks, op, variant);
      std::printf("prefill (%s, %s): %ld allocations, each failed in turn\n", name(variant),
                  with_codebooks ? "codebooks built" : "building codebooks", n);
    }
  }
}

TEST(StoreFaults, EveryAllocationOfAnAppendFailsCleanly) {
  for (Variant variant : kVariants) {
    for (bool with_codebooks : {false, true}) {
      SCOPED_TRACE(with_codebooks ? "codebooks built" : "the append builds the codebooks");
      std::mt19937 rng(2);
      const Shape sh = shape_of(variant);
      const Rows k = random_rows(rng, 3, sh), v = random_rows(rng, 3, sh);
      // Sequence 1 holds T - 1 tokens: this token completes its first block.
      Operation op{[&](Scene& s) {
        return kvc_store_append(s.store->s, 1, 3, s.ids.data(), k.bits.data(), v.bits.data(),
                                nullptr);
      }};
      op.records = true;
      const long n = inject_every_failure(with_codebooks, op, variant);
      std::printf("append (%s, %s): %ld allocations, each failed in turn\n", name(variant),
                  with_codebooks ? "codebooks built" : "building codebooks", n);
    }
  }
}

TEST(StoreFaults, EveryAllocationOfARestoreFailsCleanly) {
  for (Variant variant : kVariants) {
    // The sequence to restore: written by a scene's store (same codebooks), 2 blocks and a tail.
    std::vector<uint8_t> bytes;
    {
      Scene writer(true, variant);
      ASSERT_NO_FATAL_FAILURE(serialize_sequence(writer.store->s, writer.ids[0], bytes));
    }
    int32_t id = -1;
    Operation op{
        [&](Scene& s) { return kvc_store_restore(s.store->s, bytes.data(), bytes.size(), &id); },
        [&](Scene& s) {  // the restored sequence, as it serializes
          std::vector<uint8_t> out;
          serialize_sequence(s.store->s, id, out);
          return out;
        }};
    const long n = inject_every_failure(true, op, variant);
    std::printf("restore (%s): %ld allocations, each failed in turn\n", name(variant), n);
  }
}

// Attention decodes blocks into fp32 copies it keeps (decoded_cache_bytes), extended as the
// sequences grow: a failed call may leave the copies of the sequences it reached before the
// failure (a cache, not the store's state: the snapshot leaves its size out), but none half
// made, or a later call reads the wrong rows. So the result is the output, and the output again
// after every sequence has grown by a block and more; a failed call writes no output.
TEST(StoreFaults, EveryAllocationOfAttentionFailsCleanly) {
  for (Variant variant : kVariants) {
    std::mt19937 rng(3);
    const Shape sh = shape_of(variant);
    const int32_t q_heads = sh.heads * sh.group, grow = sh.tokens + 3;
    std::vector<uint16_t> q(size_t(3) * q_heads * sh.dim);
    for (auto& x : q) x = format::float_to_half(std::normal_distribution<float>()(rng));
    const Rows k = random_rows(rng, size_t(grow), sh), v = random_rows(rng, size_t(grow), sh);
    std::vector<uint16_t> out(q.size());
    auto attend = [&](Scene& s) {
      std::fill(out.begin(), out.end(), uint16_t(0xFFFF));
      return kvc_store_attention(s.store->s, 1, 3, s.ids.data(), q_heads, 0.25f, q.data(),
                                 out.data(), nullptr);
    };
    auto output = [&] {
      const auto* p = reinterpret_cast<const uint8_t*>(out.data());
      return std::vector<uint8_t>(p, p + out.size() * 2);
    };
    Operation op{attend, [&](Scene& s) {
                   std::vector<uint8_t> result = output();
                   for (int32_t id : s.ids) {
                     EXPECT_EQ(kvc_store_prefill(s.store->s, id, 1, 1, grow, k.bits.data(),
                                                 v.bits.data(), nullptr),
                               KVC_SUCCESS);
                   }
                   EXPECT_EQ(attend(s), KVC_SUCCESS) << kvc_last_error();
                   const std::vector<uint8_t> again = output();
                   result.insert(result.end(), again.begin(), again.end());
                   return result;
                 }};
    op.caches = true;
    op.outputs_untouched = [&] {
      return std::all_of(out.begin(), out.end(), [](uint16_t x) { return x == 0xFFFF; });
    };
    const long n = inject_every_failure(true, op, variant);
    std::printf("attention (%s): %ld allocations, each failed in turn\n", name(variant), n);
  }
}

TEST(StoreFaults, EveryAllocationOfTheOtherCallsFailsCleanly) {
  for (Variant variant : kVariants) {
    const Shape sh = shape_of(variant);
    const size_t len = 2 * size_t(sh.tokens) + 1;  // sequence 0
    std::vector<float> k(len * sh.row()), v(len * sh.row());
    Operation read{[&](Scene& s) {
                     return kvc_store_read(s.store->s, s.ids[0], 1, KVC_DTYPE_FP32, int32_t(len),
                                           k.data(), v.data(), nullptr);
                   },
                   [&](Scene&) {
                     std::vector<uint8_t> out(
                         reinterpret_cast<const uint8_t*>(k.data()),
                         reinterpret_cast<const uint8_t*>(k.data() + k.size()));
                     const auto* pv = reinterpret_cast<const uint8_t*>(v.data());
                     out.insert(out.end(), pv, pv + v.size() * sizeof(float));
                     return out;
                   }};
    std::printf("read (%s): %ld allocations\n", name(variant),
                inject_every_failure(true, read, variant));

    // The size, then the serialization (a store of tiles served as v1 keeps the bytes the size
    // call wrote for it): each call's allocations in turn.
    std::vector<uint8_t> bytes;
    size_t size = 0, written = 0;
    Operation sized{
        [&](Scene& s) { return kvc_store_serialized_size(s.store->s, s.ids[0], &size); },
        [&](Scene&) {
          const auto* p = reinterpret_cast<const uint8_t*>(&size);
          return std::vector<uint8_t>(p, p + sizeof size);
        }};
    std::printf("serialized size (%s): %ld allocations\n", name(variant),
                inject_every_failure(true, sized, variant));
    Operation serialized{[&](Scene& s) {
                           return kvc_store_serialize(s.store->s, s.ids[0], bytes.data(),
                                                      bytes.size(), &written);
                         },
                         [&](Scene&) { return bytes; }};
    serialized.prepare = [&](Scene& s) {
      ASSERT_EQ(kvc_store_serialized_size(s.store->s, s.ids[0], &size), KVC_SUCCESS);
      bytes.assign(size, 0);
    };
    std::printf("serialize after its size (%s): %ld allocations\n", name(variant),
                inject_every_failure(true, serialized, variant));

    Operation free_one{[&](Scene& s) {
      const kvc_status_t st = kvc_store_free_sequence(s.store->s, s.ids[0], nullptr);
      if (st == KVC_SUCCESS) s.shadow.erase(s.ids[0]);  // (the snapshot reads live sequences)
      return st;
    }};
    std::printf("free sequence (%s): %ld allocations\n", name(variant),
                inject_every_failure(true, free_one, variant));
    if (variant != Variant::kTiles && variant != Variant::kTilesServedAsV1) {  // (no codebooks)
      kvc_codebook_t book = nullptr;
      {
        Scene writer(true, variant);
        ASSERT_EQ(kvc_store_get_codebook(writer.store->s, 1, KVC_KIND_VALUE, &book), KVC_SUCCESS);
      }
      ASSERT_NE(book, nullptr);
      Operation set{
          [&](Scene& s) { return kvc_store_set_codebook(s.store->s, 1, KVC_KIND_VALUE, book); }};
      std::printf("set codebook (%s): %ld allocations\n", name(variant),
                  inject_every_failure(false, set, variant));
      kvc_codebook_destroy(book);
    }
    Operation add{[&](Scene& s) {
      int32_t id = -1;
      return kvc_store_add_sequence(s.store->s, &id);
    }};
    std::printf("add sequence (%s): %ld allocations\n", name(variant),
                inject_every_failure(true, add, variant));
  }
}

// Calls that make a handle or fill caller memory (no store state): each allocation fails in turn,
// alone and with the rest; the call returns KVC_ERROR_OUT_OF_MEMORY and leaves its out-handle
// NULL (the sanitizer builds also see that nothing leaks).
long inject_into_call(const char* what, const std::function<kvc_status_t(void**)>& call,
                      const std::function<void(void*)>& destroy) {
  void* handle = nullptr;
  const long n = count_allocations([&] { return call(&handle); });
  destroy(handle);
  for (const bool persists : {false, true}) {
    for (long i = 0; i < n; ++i) {
      handle = nullptr;
      const kvc_status_t st = with_failing_allocation(i, persists, [&] { return call(&handle); });
      EXPECT_EQ(st, KVC_ERROR_OUT_OF_MEMORY)
          << what << ", allocation " << i << " of " << n << (persists ? " and later" : "");
      EXPECT_EQ(handle, nullptr) << what << ", allocation " << i;
      destroy(handle);
    }
  }
  return n;
}

TEST(StoreFaults, EveryAllocationOfTheHandlesAndTheCodecFailsCleanly) {
  std::mt19937 rng(4);
  const Shape sh;
  for (Variant variant : kVariants) {
    const kvc_store_config config = config_of(variant);
    std::printf(
        "store create (%s): %ld allocations\n", name(variant),
        inject_into_call(
            "kvc_store_create",
            [&](void** h) { return kvc_store_create(&config, reinterpret_cast<kvc_store_t*>(h)); },
            [](void* h) { kvc_store_destroy(static_cast<kvc_store_t>(h)); }));
  }
  // A codebook from a real block's histogram, then a codec over it; encode and decode.
  kvc_codec_config cc = make_config(KVC_KIND_KEY, 64, 64, KVC_BOUND_RELATIVE, 0.05f);
  const Rows rows = random_rows(rng, 2 * 64 * 64 / sh.row(), sh);  // two 64 x 64 blocks
  const void* src = rows.bits.data();
  const void* srcs[2] = {src, rows.bits.data() + 64 * 64};
  kvc_codec_t plain = nullptr;
  ASSERT_EQ(kvc_codec_create(&cc, nullptr, &plain), KVC_SUCCESS);
  kvc_histogram_t hist = nullptr;
  ASSERT_EQ(kvc_histogram_create(&hist), KVC_SUCCESS);
  ASSERT_EQ(kvc_codec_histogram(plain, 1, &src, 64, KVC_DTYPE_FP16, hist, nullptr), KVC_SUCCESS);
  kvc_codec_destroy(plain);
  auto destroy_book = [](void* h) { kvc_codebook_destroy(static_cast<kvc_codebook_t>(h)); };
  std::printf("codebook build: %ld allocations\n",
              inject_into_call(
                  "kvc_codebook_build",
                  [&](void** h) {
                    return kvc_codebook_build(hist, nullptr, reinterpret_cast<kvc_codebook_t*>(h));
                  },
                  destroy_book));
  kvc_codebook_t book = nullptr;
  ASSERT_EQ(kvc_codebook_build(hist, nullptr, &book), KVC_SUCCESS);
  kvc_histogram_destroy(hist);
  size_t book_bytes = 0;
  ASSERT_EQ(kvc_codebook_serialized_size(book, &book_bytes), KVC_SUCCESS);
  std::vector<uint8_t> serialized(book_bytes);
  ASSERT_EQ(kvc_codebook_serialize(book, serialized.data(), book_bytes, &book_bytes), KVC_SUCCESS);
  std::printf("codebook deserialize: %ld allocations\n",
              inject_into_call(
                  "kvc_codebook_deserialize",
                  [&](void** h) {
                    return kvc_codebook_deserialize(serialized.data(), serialized.size(),
                                                    reinterpret_cast<kvc_codebook_t*>(h));
                  },
                  destroy_book));
  for (const int32_t format : {KVC_BLOCK_FORMAT_V1, KVC_BLOCK_FORMAT_TILES}) {
    cc.block_format = format;
    kvc_codebook_t with = format == KVC_BLOCK_FORMAT_V1 ? book : nullptr;
    std::printf("codec create (format %d): %ld allocations\n", format,
                inject_into_call(
                    "kvc_codec_create",
                    [&](void** h) {
                      return kvc_codec_create(&cc, with, reinterpret_cast<kvc_codec_t*>(h));
                    },
                    [](void* h) { kvc_codec_destroy(static_cast<kvc_codec_t>(h)); }));
    // Encode and decode write only the caller's buffers: they must still fail cleanly, and a
    // failed encode (of two blocks: the second can fail after the first is done) must leave
    // them as they were.
    kvc_codec_t codec = nullptr;
    ASSERT_EQ(kvc_codec_create(&cc, with, &codec), KVC_SUCCESS);
    size_t cap = 0;
    ASSERT_EQ(kvc_codec_max_block_bytes(codec, KVC_DTYPE_FP16, &cap), KVC_SUCCESS);
    std::vector<uint8_t> blocks(2 * cap, 0xA5);
    void* dsts[2] = {blocks.data(), blocks.data() + cap};
    uint32_t written[2] = {7, 7};
    auto encode = [&] {
      return kvc_codec_encode(codec, 2, srcs, 64, KVC_DTYPE_FP16, dsts, cap, written, nullptr);
    };
    const long encodes = count_allocations(encode);
    const std::vector<uint8_t> encoded = blocks;
    const void* block_ptr = blocks.data();
    std::vector<float> out(64 * 64);
    void* out_ptr = out.data();
    auto decode = [&] {
      return kvc_codec_decode(codec, 1, &block_ptr, written, KVC_DTYPE_FP32, &out_ptr, 64, nullptr,
                              nullptr);
    };
    const long decodes = count_allocations(decode);
    for (const bool persists : {false, true}) {
      for (long i = 0; i < encodes; ++i) {
        std::fill(blocks.begin(), blocks.end(), uint8_t(0xA5));
        written[0] = written[1] = 7;
        EXPECT_EQ(with_failing_allocation(i, persists, encode), KVC_ERROR_OUT_OF_MEMORY) << i;
        EXPECT_TRUE(std::all_of(blocks.begin(), blocks.end(), [](uint8_t b) { return b == 0xA5; }))
            << "allocation " << i << ": a failed encode wrote a block";
        EXPECT_EQ(written[0], 7u) << i;
        EXPECT_EQ(written[1], 7u) << i;
      }
      blocks = encoded;
      ASSERT_EQ(encode(), KVC_SUCCESS) << kvc_last_error();
      EXPECT_EQ(blocks, encoded) << "the call then writes what it wrote before";
      for (long i = 0; i < decodes; ++i) {
        EXPECT_EQ(with_failing_allocation(i, persists, decode), KVC_ERROR_OUT_OF_MEMORY) << i;
      }
    }
    std::printf("encode, decode (format %d): %ld, %ld allocations\n", format, encodes, decodes);
    kvc_codec_destroy(codec);
  }
  kvc_codebook_destroy(book);
}

}  // namespace
}  // namespace kvc::test
