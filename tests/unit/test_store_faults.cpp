// SPDX-License-Identifier: Apache-2.0
// Fault injection: every host allocation the CPU store makes during a prefill, an append and a
// restore fails in turn. Each failure must give KVC_ERROR_OUT_OF_MEMORY with a message, and leave
// the store exactly as it was (every sequence's serialized bytes, the stats; a failed prefill or
// append records itself in last_append_status and failed_appends, as documented).
//
// The hook is this test program's own replacement of the global operator new (the library is
// linked statically, so its allocations, those of the standard containers included, come here):
// nothing in the library or its ABI exists for the test.
#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <new>
#include <random>

#include "store_model.hpp"

namespace {

// Allocations left before the one that fails (-1: none fails); while counting, how many so far.
long g_fail_after = -1;
bool g_counting = false;
long g_count = 0;

void* allocate(std::size_t n) {
  if (g_counting) ++g_count;
  if (g_fail_after >= 0 && g_fail_after-- == 0) throw std::bad_alloc();
  void* p = std::malloc(n ? n : 1);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

}  // namespace

void* operator new(std::size_t n) { return allocate(n); }
void* operator new[](std::size_t n) { return allocate(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return allocate(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return allocate(n);
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace kvc::test {
namespace {

// Runs `call` with allocation number `fail_at` (from 0) failing; -1: none. Returns its status.
kvc_status_t with_failing_allocation(long fail_at, const std::function<kvc_status_t()>& call) {
  g_fail_after = fail_at;
  const kvc_status_t st = call();
  g_fail_after = -1;
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

// A store in a fixed state, made afresh for every injected failure: two layers, codebooks built
// (or not) by a first prefill, three sequences with tails of various lengths.
struct Scene {
  Shape sh;
  std::unique_ptr<StoreHandle> store;
  Shadow shadow;
  std::vector<int32_t> ids;
  explicit Scene(bool with_codebooks) : shadow{sh, {}, {}} {  // Shape's default: two layers
    store = std::make_unique<StoreHandle>(store_config(sh, 1 << 20, 1024));
    std::mt19937 rng(42);
    const size_t lengths[] = {with_codebooks ? 17u : 0u, 7u, 3u};
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

// For every allocation of the operation in turn: a fresh scene, that allocation failing, then
// the checks. Returns the number of allocations tried.
long inject_every_failure(bool with_codebooks, const std::function<kvc_status_t(Scene&)>& operation,
                          bool records) {
  long n = 0;
  {
    Scene scene(with_codebooks);
    n = count_allocations([&] { return operation(scene); });
  }
  EXPECT_GT(n, 0);
  long recorded_failures = 0;
  for (long i = 0; i < n; ++i) {
    Scene scene(with_codebooks);
    const auto before = snapshot(scene.store->s, scene.shadow);
    const kvc_store_stats stats_before = store_stats(scene.store->s);
    kvc_clear_last_error();
    const kvc_status_t st = with_failing_allocation(i, [&] { return operation(scene); });
    EXPECT_EQ(st, KVC_ERROR_OUT_OF_MEMORY) << "allocation " << i << " of " << n;
    EXPECT_STRNE(kvc_last_error(), "") << "allocation " << i;
    EXPECT_EQ(snapshot(scene.store->s, scene.shadow), before)
        << "allocation " << i << " of " << n << ": the failed call changed the store";
    const kvc_store_stats stats_after = store_stats(scene.store->s);
    const bool recorded = stats_after.failed_appends != stats_before.failed_appends;
    recorded_failures += recorded;
    if (records && recorded) {  // (not for a failure in the argument checks: api.md, stats)
      EXPECT_EQ(stats_after.last_append_status, KVC_ERROR_OUT_OF_MEMORY) << "allocation " << i;
      EXPECT_EQ(stats_after.failed_appends, stats_before.failed_appends + 1) << "allocation " << i;
    } else {
      EXPECT_EQ(stats_after.last_append_status, stats_before.last_append_status);
      EXPECT_EQ(stats_after.failed_appends, stats_before.failed_appends);
    }
    // The same call then succeeds: nothing was left half done.
    EXPECT_EQ(operation(scene), KVC_SUCCESS) << "allocation " << i << ": " << kvc_last_error();
    if (::testing::Test::HasFailure()) break;
  }
  if (records) EXPECT_GT(recorded_failures, n / 2) << "most failures are past the argument checks";
  return n;
}

TEST(StoreFaults, EveryAllocationOfAPrefillFailsCleanly) {
  for (bool with_codebooks : {false, true}) {
    SCOPED_TRACE(with_codebooks ? "codebooks built" : "first prefill builds the codebooks");
    std::mt19937 rng(1);
    const Shape sh;
    const Rows k = random_rows(rng, 2 * 12, sh), v = random_rows(rng, 2 * 12, sh);
    const long n = inject_every_failure(
        with_codebooks,
        [&](Scene& s) {
          return kvc_store_prefill(s.store->s, s.ids[1], 0, 2, 12, k.bits.data(), v.bits.data(),
                                   nullptr);
        },
        /*records=*/true);
    std::printf("prefill (%s): %ld allocations, each failed in turn\n",
                with_codebooks ? "codebooks built" : "building codebooks", n);
  }
}

TEST(StoreFaults, EveryAllocationOfAnAppendFailsCleanly) {
  for (bool with_codebooks : {false, true}) {
    SCOPED_TRACE(with_codebooks ? "codebooks built" : "the append builds the codebooks");
    std::mt19937 rng(2);
    const Shape sh;
    const Rows k = random_rows(rng, 3, sh), v = random_rows(rng, 3, sh);
    const long n = inject_every_failure(
        with_codebooks,
        [&](Scene& s) {
          // Sequence 1 holds 7 tokens: this token completes its first block.
          return kvc_store_append(s.store->s, 1, 3, s.ids.data(), k.bits.data(), v.bits.data(),
                                  nullptr);
        },
        /*records=*/true);
    std::printf("append (%s): %ld allocations, each failed in turn\n",
                with_codebooks ? "codebooks built" : "building codebooks", n);
  }
}

TEST(StoreFaults, EveryAllocationOfARestoreFailsCleanly) {
  // The sequence to restore: written by a scene's store (same codebooks), 2 blocks and a tail.
  std::vector<uint8_t> bytes;
  {
    Scene writer(true);
    ASSERT_NO_FATAL_FAILURE(serialize_sequence(writer.store->s, writer.ids[0], bytes));
  }
  const long n = inject_every_failure(
      true,
      [&](Scene& s) {
        int32_t id = -1;  // (the scene is not checked after a success)
        return kvc_store_restore(s.store->s, bytes.data(), bytes.size(), &id);
      },
      /*records=*/false);
  std::printf("restore: %ld allocations, each failed in turn\n", n);
}

}  // namespace
}  // namespace kvc::test
