// SPDX-License-Identifier: Apache-2.0
// Device side of the CUDA store. An append (a decode step or a prefill) is a fixed chain of
// launches whose shape depends only on host-known sizes, so it can be captured in a graph:
//   stage   (per layer and sequence) new rows into the tail, pointers to the complete blocks
//   encode  (the codec's kernel, K and V, per layer) into scratch; absent blocks cost nothing
//   commit  (one thread block per layer) sizes known: next-fit placement, pages popped from
//           the free stack, block-table entries written past the live count (invisible)
//   copy    scratch -> pages
//   finish  only if nothing failed: the last rows into the tails and the new lengths; the live
//           state changes here and nowhere else, so a failure anywhere changes nothing.
// A layer's uncompressed rows (SequenceView::dense_keys/values, sink_tokens + T rows each) hold
// its tail from row 0 until its first block is compressed, from row sink_tokens after: the
// first block is assembled in rows [0, T), so its first sink_tokens rows, the sinks, are
// already in place when it is compressed.
// A store that rotates its rows (kvc_store_config.rotation) first runs rotate_rows_kernel over
// the call's K and V into scratch, and the chain reads the rotated rows from there: a row that
// leaves the dtype's range becomes inf, which stage reports as non-finite input. Attention
// rotates the queries into scratch before the attention kernel and its outputs back after it;
// a read rotates the decoded rows back.
#pragma once

#include <kvcomp/kvcomp.h>

#include <cstdint>

#include "kernels/attention/attention.cuh"
#include "kernels/codec/device_common.cuh"
#include "kernels/common/hadamard.cuh"
#include "kernels/store/next_fit.cuh"

namespace kvc::kernels::store {

// One (sequence slot, layer). `view` is what attention reads; its dense buffers hold
// StoreView::sink_tokens + T rows.
struct LayerState {
  SequenceView view;
  uint32_t open_page;  // the page of the last block (when view.num_blocks > 0)
  uint32_t open_used;  // bytes used in it
};

// Store-wide figures, copied out to pinned host memory after every mutating call.
struct Counters {
  uint32_t free_top;  // free_pages[0, free_top) are free
  int32_t last_status;
  int32_t failed;
  uint32_t reserved;
  unsigned long long num_blocks, block_bytes, tokens;  // over live sequences
};

struct StoreView {
  LayerState* states;    // [max_sequences, num_layers]
  int32_t* slot_ids;     // [max_sequences]: the id living in the slot, or -1
  uint32_t* free_pages;  // [num_pages], a stack
  Counters* counters;
  uint32_t* layer_compressed;  // [num_layers]: a block was compressed (codebooks frozen)
  uint8_t* pool;
  uint32_t page_bytes, num_layers, num_heads, head_dim, block_tokens, max_sequences, max_tokens;
  uint32_t nonfinite_bits;  // exponent bits of the 16-bit dtype: all set is inf or NaN
  uint32_t block_align;     // block_alignment(): 16 for tile blocks, 4 for format v1
  uint32_t sink_tokens;     // kvc_store_config.sink_tokens
};

// The sequences of one call, by value: a captured graph carries its own batch.
struct Batch {
  int32_t ids[KVC_STORE_MAX_BATCH];
};

// One (sequence, layer) of a call.
struct Entry {
  uint32_t slot, layer;
  int32_t status;                       // from staging
  uint32_t old_tail, blocks, new_tail;  // blocks: complete blocks this call compresses
  uint32_t first_page;                  // rank of its first new page among its layer's new pages
  uint32_t open_page, open_used, added_bytes;  // after commit
};

// Set to all ones before a call. A failure is (entry index << 32 | status): the smallest wins,
// so the reported status is the first failing (layer, sequence) in order, as on the CPU.
struct CallState {
  unsigned long long failure;
  uint32_t free_top;  // the free stack as this call's commits leave it
  uint32_t reserved;
};
constexpr unsigned long long kNoFailure = ~0ull;

__device__ inline int32_t status_of(const CallState& call) {
  return call.failure == kNoFailure ? KVC_SUCCESS : int32_t(uint32_t(call.failure));
}

__device__ inline void record_failure(CallState* call, uint64_t entry, int32_t status) {
  atomicMin(&call->failure, (entry << 32) | uint32_t(status));
}

__device__ inline void record_outcome(const StoreView& S, int32_t status) {
  S.counters->last_status = status;
  if (status != KVC_SUCCESS) S.counters->failed += 1;
}

constexpr uint32_t kStoreThreads = 256;

__device__ inline LayerState& state_of(const StoreView& S, uint32_t slot, uint32_t layer) {
  return S.states[size_t(slot) * S.num_layers + layer];
}

__device__ inline bool finite16(uint16_t bits, uint32_t exponent) {
  return (bits & exponent) != exponent;
}

// Grid (batch, layers). keys/values: [layers, batch, n, heads, dim] of a 16-bit dtype.
__global__ void __launch_bounds__(kStoreThreads)
    stage_kernel(StoreView S, Batch batch, uint32_t num_sequences, uint32_t first_layer, uint32_t n,
                 const uint16_t* keys, const uint16_t* values, uint32_t max_blocks, Entry* entries,
                 const void** src_k, const void** src_v, CallState* call) {
  __shared__ Entry e;
  const uint32_t b = blockIdx.x, li = blockIdx.y, tid = threadIdx.x;
  const uint32_t T = S.block_tokens, D = S.head_dim, row = S.num_heads * D;
  if (tid == 0) {
    const int32_t id = batch.ids[b];
    const uint32_t slot = uint32_t(id) % S.max_sequences, layer = first_layer + li;
    const SequenceView& v = state_of(S, slot, layer).view;
    int32_t status = S.slot_ids[slot] == id ? KVC_SUCCESS : KVC_ERROR_UNKNOWN_SEQUENCE;
    const uint64_t length = uint64_t(v.num_blocks) * T + v.tail_tokens;
    if (status == KVC_SUCCESS && length + n > S.max_tokens) status = KVC_ERROR_INVALID_ARGUMENT;
    const uint32_t total = v.tail_tokens + n;
    e = {slot, layer, status, v.tail_tokens, status ? 0u : total / T, total % T, 0, 0, 0, 0};
  }
  __syncthreads();
  const LayerState& st = state_of(S, e.slot, e.layer);
  // The tail starts after the sinks the layer holds (none before its first block).
  const size_t tail_at = size_t(st.view.sink_tokens) * row;
  uint16_t* tail_k = static_cast<uint16_t*>(const_cast<void*>(st.view.dense_keys)) + tail_at;
  uint16_t* tail_v = static_cast<uint16_t*>(const_cast<void*>(st.view.dense_values)) + tail_at;
  const size_t base = (size_t(li) * num_sequences + b) * n * row;
  bool bad = false;
  if (e.status == KVC_SUCCESS) {
    // The first new rows complete the tail (rows past its length: invisible until finish).
    const uint32_t into_tail = min(n, T - e.old_tail);
    for (uint32_t i = tid; i < into_tail * row; i += blockDim.x) {
      tail_k[size_t(e.old_tail) * row + i] = keys[base + i];
      tail_v[size_t(e.old_tail) * row + i] = values[base + i];
    }
    // Every row is checked here, before any layer's pages are counted, so that a call with
    // inf or NaN reports it whatever else fails (as the CPU store does).
    for (size_t i = tid; i < size_t(n) * row; i += blockDim.x) {
      bad = bad || !finite16(keys[base + i], S.nonfinite_bits) ||
            !finite16(values[base + i], S.nonfinite_bits);
    }
  }
  // One barrier that also ORs the threads' verdicts (a shared flag set by every thread that
  // saw one would be a write-write race, however benign).
  const bool ok = !__syncthreads_or(bad) && e.status == KVC_SUCCESS;
  if (tid == 0) {
    Entry out = e;
    if (!ok) out.status = e.status ? e.status : KVC_ERROR_NONFINITE_INPUT;
    entries[size_t(li) * num_sequences + b] = out;
    if (!ok) record_failure(call, size_t(li) * num_sequences + b, out.status);
  }
  // Block j of this call: the completed tail, then whole blocks of the input in place.
  const size_t layer_slots = size_t(num_sequences) * max_blocks * S.num_heads;
  for (uint32_t i = tid; i < max_blocks * S.num_heads; i += blockDim.x) {
    const uint32_t j = i / S.num_heads, h = i % S.num_heads;
    const size_t at = li * layer_slots + (size_t(b) * max_blocks + j) * S.num_heads + h;
    const void *k = nullptr, *v = nullptr;
    if (ok && j < e.blocks) {
      const size_t row0 = j == 0 ? 0 : size_t(T - e.old_tail) + size_t(j - 1) * T;
      k = j == 0 ? static_cast<const void*>(tail_k + h * D) : keys + base + row0 * row + h * D;
      v = j == 0 ? static_cast<const void*>(tail_v + h * D) : values + base + row0 * row + h * D;
    }
    src_k[at] = k;
    src_v[at] = v;
  }
}

// Next-fit over an entry's new blocks in table order (block, head, K|V), as the CPU store
// places them; visit(i, bytes, opens_page, offset) for placement i, which is slot
// b * max_blocks * num_heads + i / 2 of the call's sizes, K where i is even: it is also the
// i-th new row of the block table and, past 2 (b * max_blocks * num_heads), the i-th copy
// destination. Returns the pages opened; used_out: the bytes used in the last page. One thread
// walks a sequence this way only when it has few placements (placed_by_block); the sizes are
// loaded kBatch at a time, so that its walk waits on memory once per batch rather than once
// per block.
template <class Visit>
__device__ uint32_t next_fit(const StoreView& S, const Entry& e, const LayerState& st,
                             uint32_t max_blocks, uint32_t b, const uint32_t* bytes_k,
                             const uint32_t* bytes_v, Visit&& visit, uint32_t& used_out) {
  constexpr uint32_t kBatch = 16;
  uint32_t used = st.view.num_blocks > 0 ? st.open_used : S.page_bytes, opened = 0;
  const size_t first = size_t(b) * max_blocks * S.num_heads;
  const uint32_t n = e.blocks * S.num_heads * 2;  // placements: (block, head) slots x K|V
  for (uint32_t i0 = 0; i0 < n; i0 += kBatch) {
    uint32_t bytes[kBatch];
#pragma unroll
    for (uint32_t k = 0; k < kBatch; ++k) {
      const uint32_t i = i0 + k;
      bytes[k] = i < n ? (i % 2 == 0 ? bytes_k : bytes_v)[first + i / 2] : 0u;
    }
#pragma unroll
    for (uint32_t k = 0; k < kBatch; ++k) {
      const uint32_t i = i0 + k;
      if (i >= n) break;
      uint32_t offset;
      const bool fresh = place_next_fit(used, bytes[k], S.page_bytes, S.block_align, offset);
      opened += fresh;
      visit(i, bytes[k], fresh, offset);
    }
  }
  used_out = used;
  return opened;
}

// A sequence's placements: (block, head) slots x K|V.
__device__ inline uint32_t placements(const StoreView& S, const Entry& e) {
  return e.blocks * S.num_heads * 2;
}

// Which sequences the whole thread block may place (place_by_block), one after another: those
// with more placements than the block has threads (place_group decides). The others are walked
// by one thread each (next_fit), side by side. A decode step compresses at most one block per
// sequence, so it never takes the block's path, whatever its head count.
__device__ inline bool placed_by_block(const StoreView& S, const Entry& e) {
  return e.blocks > 1 && placements(S, e) > kStoreThreads;
}

// place_by_block takes a sequence's placements kPlaceChunk at a time, kPlaceItems consecutive
// ones per thread.
constexpr uint32_t kPlaceItems = 4;
constexpr uint32_t kPlaceChunk = kStoreThreads * kPlaceItems;

struct PlaceScratch {
  typename device::BlockScan<unsigned long long, kStoreThreads>::TempStorage scan;
  unsigned long long before[kPlaceChunk];  // the chunk's earlier placements' rounded bytes
  uint32_t bytes[kPlaceChunk];
  uint32_t next[kPlaceChunk];    // next[c]: the first placement a page opened by c cannot hold
  uint32_t start[kPlaceChunk];   // the chunk's runs (placements sharing a page): where each starts
  uint32_t runs, base;           // runs; the offset of the first run's first placement
  uint32_t fresh;                // whether the first run opens its page
  uint32_t list[kStoreThreads];  // the sequences of a group that place_by_block places
  uint32_t chunks, longest;      // place_group's sums
};

// What one chunk of place_by_block costs (both passes), in placements of one thread's next_fit
// walk (both passes: 21 + 42 SASS per placement, one thread issuing them): a static estimate,
// not a measurement (docs/performance.md, "GPU"). A chunk executes some 1,800 SASS per warp,
// eight warps sharing four schedulers, about ten barriers, and one dependent shared-memory load
// per page opened on one thread: 8-10 K cycles; one thread walks a placement in 60-250 cycles.
// So a chunk is worth 40-160 placements of the walk; taken near the top, so that a close call
// stays with the walk of before.
constexpr uint32_t kChunkWalk = 128;

// The first of a chunk's placements [from, m) that does not fit a page on which placement c
// starts at offset base (every one in (c, from) does), or m. Next fit puts a placement at its
// predecessor's offset plus its predecessor's bytes rounded up to the alignment (offsets stay
// aligned), so c + k sits at base + before[c + k] - before[c] and fits while that plus its
// bytes is at most page_bytes: a condition that, once false, stays false (before[k] + bytes[k]
// <= before[k + 1]). Galloping from `from`: a page's placements are found in about 2 log2 of
// their count probes, and a thread's next placement, whose answer is the same or close, in one
// or two.
__device__ inline uint32_t page_end(const PlaceScratch& w, uint32_t c, uint32_t from, uint32_t m,
                                    uint32_t base, uint32_t page_bytes) {
  const unsigned long long room = w.before[c] + (page_bytes - base);  // base <= page_bytes
  const auto fails = [&](uint32_t k) { return w.before[k] + w.bytes[k] > room; };
  uint32_t lo = from, hi = from, step = 1;  // [from, lo) fit
  while (hi < m && !fails(hi)) {
    lo = hi + 1;
    hi = min(m, hi + step);
    step *= 2;
  }
  while (lo < hi) {  // the first that fails is in [lo, hi], hi when none of [lo, hi) does
    const uint32_t mid = (lo + hi) / 2;
    if (fails(mid)) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return hi;
}

// Next fit over sequence b's placements (as next_fit, the same rule bit for bit), by the whole
// thread block; every thread calls it with the same arguments. Per chunk: a block scan of the
// placements' bytes rounded up to the alignment, then every placement's page end if a page
// opened there (next), in parallel; then one thread follows next from page to page (one
// shared-memory load per page opened, where next_fit spends tens of instructions per
// placement), and then, with kPlace, every thread writes its placements' table rows and copy
// destinations: offset = the run's first offset + before[c] - before[run start], page = the
// free stack's next page for each run that opens one. Returns the pages opened; with kPlace,
// writes entries[b]'s open page, bytes used in it and bytes added (its first_page, the rank of
// its first new page among the layer's, from the count pass).
template <bool kPlace>
__device__ uint32_t place_by_block(const StoreView& S, Entry* entries, uint32_t b,
                                   uint32_t max_blocks, const uint32_t* bytes_k,
                                   const uint32_t* bytes_v, void** copy_dst, uint32_t free_top,
                                   PlaceScratch& w) {
  using Scan = device::BlockScan<unsigned long long, kStoreThreads>;
  const uint32_t tid = threadIdx.x, P = S.page_bytes, align = S.block_align;
  const Entry e = entries[b];
  const LayerState& st = state_of(S, e.slot, e.layer);
  const uint32_t n = placements(S, e), rank = e.first_page;
  const size_t first = size_t(b) * max_blocks * S.num_heads;
  // The table rows past the live ones and this sequence's copy destinations, in placement order.
  auto* rows =
      const_cast<BlockLocation*>(st.view.blocks) + size_t(st.view.num_blocks) * S.num_heads * 2;
  void** dst = copy_dst + first * 2;
  // The state between chunks, the same in every thread: bytes used in the open page (page_bytes
  // when none is open), the open page, the pages opened so far.
  uint32_t used = st.view.num_blocks > 0 ? st.open_used : P, page = st.open_page, opened = 0;
  unsigned long long added = 0;
  for (uint32_t c0 = 0; c0 < n; c0 += kPlaceChunk) {
    const uint32_t m = min(n - c0, kPlaceChunk), mine = tid * kPlaceItems;
    uint32_t bytes[kPlaceItems];
    unsigned long long rounded = 0;
#pragma unroll
    for (uint32_t k = 0; k < kPlaceItems; ++k) {
      const uint32_t i = c0 + mine + k;
      bytes[k] = mine + k < m ? (i % 2 == 0 ? bytes_k : bytes_v)[first + i / 2] : 0u;
      rounded += (bytes[k] + (align - 1ull)) & ~(align - 1ull);
    }
    unsigned long long before;
    Scan(w.scan).ExclusiveSum(rounded, before);
#pragma unroll
    for (uint32_t k = 0; k < kPlaceItems; ++k) {
      w.before[mine + k] = before;
      w.bytes[mine + k] = bytes[k];
      before += (bytes[k] + (align - 1ull)) & ~(align - 1ull);
    }
    __syncthreads();
    uint32_t end = 0;
#pragma unroll
    for (uint32_t k = 0; k < kPlaceItems; ++k) {
      const uint32_t c = mine + k;
      if (c < m) w.next[c] = end = page_end(w, c, max(c + 1, end), m, 0, P);
    }
    __syncthreads();
    if (tid == 0) {
      // The chunk's first placement goes into the open page if it fits there (used rounded up
      // to the alignment, as next fit does), else opens a page; every later run opens one.
      const uint32_t at = uint32_t((used + (align - 1ull)) & ~(align - 1ull));
      const bool fresh = uint64_t(at) + w.bytes[0] > P;
      uint32_t runs = 1, c = fresh ? w.next[0] : page_end(w, 0, 1, m, at, P);
      w.start[0] = 0;
      while (c < m) {
        w.start[runs++] = c;
        c = w.next[c];
      }
      w.runs = runs;
      w.base = fresh ? 0u : at;
      w.fresh = fresh;
    }
    __syncthreads();
    const uint32_t runs = w.runs, base = w.base, kept = w.fresh ? 0u : 1u;  // kept: run 0 on `page`
    if constexpr (kPlace) {
      // The run of this thread's first placement (the last to start at or before it), then of
      // each next one.
      uint32_t q = 0, hi = runs;
      while (hi - q > 1) {
        const uint32_t mid = (q + hi) / 2;
        if (w.start[mid] <= mine) {
          q = mid;
        } else {
          hi = mid;
        }
      }
#pragma unroll
      for (uint32_t k = 0; k < kPlaceItems; ++k) {
        const uint32_t c = mine + k;
        if (c >= m) break;
        while (q + 1 < runs && w.start[q + 1] <= c) ++q;
        const uint32_t at = (q == 0 ? base : 0u) + uint32_t(w.before[c] - w.before[w.start[q]]);
        const uint32_t on =
            q < kept ? page : S.free_pages[free_top - 1 - (rank + opened + q - kept)];
        rows[c0 + c] = {on, at, w.bytes[c]};
        dst[c0 + c] = S.pool + size_t(on) * P + at;
        added += w.bytes[c];
      }
      if (runs > kept) page = S.free_pages[free_top - 1 - (rank + opened + runs - 1 - kept)];
    }
    const uint32_t last = w.start[runs - 1];
    used = (runs == 1 ? base : 0u) + uint32_t(w.before[m - 1] - w.before[last]) + w.bytes[m - 1];
    opened += runs - kept;
    __syncthreads();  // the chunk's scratch is read before the next chunk's writes
  }
  if constexpr (kPlace) {
    unsigned long long ignored, total;
    Scan(w.scan).ExclusiveSum(added, ignored, total);
    if (tid == 0) {
      entries[b].open_page = page;
      entries[b].open_used = used;
      entries[b].added_bytes = uint32_t(total);  // modulo 2^32, as next_fit's sum
    }
    __syncthreads();  // the scan storage is reused
  }
  return opened;
}

// Group [at, at + kStoreThreads) of a call's sequences, by every thread: walk(b) by this
// thread for its sequence b = at + threadIdx.x, unless the whole block takes it; then
// by_block(b, k) for each sequence b = at + k the block takes, one after another. The block
// takes the group's candidates (placed_by_block) when their chunks, costed kChunkWalk each and
// summed (the block takes them one after another), cost less than the longest of their walks
// (the threads walk them side by side): a prefill alone or with a few goes to the block, a batch
// of many long prompts stays with the walks. A group without candidates (every decode step)
// costs one barrier.
template <class Walk, class ByBlock>
__device__ void place_group(const StoreView& S, const Entry* entries, uint32_t num_sequences,
                            uint32_t at, PlaceScratch& w,
                            typename device::BlockScan<uint32_t, kStoreThreads>::TempStorage& scan,
                            Walk&& walk, ByBlock&& by_block) {
  const uint32_t b = at + threadIdx.x;
  const bool candidate = b < num_sequences && placed_by_block(S, entries[b]);
  bool taken = false;  // the same in every thread
  if (__syncthreads_or(candidate)) {
    if (threadIdx.x == 0) w.chunks = w.longest = 0;
    __syncthreads();
    if (candidate) {
      const uint32_t n = placements(S, entries[b]);
      atomicAdd(&w.chunks, (n + kPlaceChunk - 1) / kPlaceChunk);
      atomicMax(&w.longest, n);
    }
    __syncthreads();
    taken = uint64_t(w.chunks) * kChunkWalk < w.longest;
  }
  if (b < num_sequences && !(taken && candidate)) walk(b);
  if (!taken) return;
  // (candidate again: kept in a register across the walk, it was spilled)
  const bool mine = b < num_sequences && placed_by_block(S, entries[b]);
  uint32_t pos, count;
  device::BlockScan<uint32_t, kStoreThreads>(scan).ExclusiveSum(mine ? 1u : 0u, pos, count);
  if (mine) w.list[pos] = threadIdx.x;
  __syncthreads();  // (also before the scan storage's next use)
  for (uint32_t q = 0; q < count; ++q) by_block(at + w.list[q], w.list[q]);
}

// One thread block, for one layer of a call (so one resident block: all registers are its).
__global__ void __launch_bounds__(kStoreThreads, 1)
    commit_kernel(StoreView S, uint32_t num_sequences, uint32_t max_blocks, bool first_layer,
                  Entry* entries, const uint32_t* bytes_k, const uint32_t* bytes_v, void** copy_dst,
                  CallState* call) {
  using Scan = device::BlockScan<uint32_t, kStoreThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ PlaceScratch scratch;
  __shared__ int32_t status;
  __shared__ uint32_t free_top, opened;
  const uint32_t tid = threadIdx.x;
  if (tid == 0) {
    if (first_layer) call->free_top = S.counters->free_top;
    status = status_of(*call);
    free_top = call->free_top;
    opened = 0;
  }
  __syncthreads();
  if (status != KVC_SUCCESS) return;
  // Staging checked every row, so the encoder refuses nothing (a block of 0 bytes) and writes
  // no block larger than a page (the placement's arithmetic assumes it); if it ever did,
  // failing here keeps the store intact. Every thread checks its share of all slots
  // (a prefill's thousands of blocks are one sequence's: a thread per sequence would walk them
  // alone), and the block fails as one: no thread may leave before the others' barriers. The
  // copy destinations of slots past a sequence's blocks are cleared on the way.
  const uint32_t slots = max_blocks * S.num_heads;
  bool unplaceable = false;
  for (size_t s = tid; s < size_t(num_sequences) * slots; s += blockDim.x) {
    const bool used = s % slots < entries[s / slots].blocks * S.num_heads;
    unplaceable |= used && (bytes_k[s] == 0 || bytes_v[s] == 0 || bytes_k[s] > S.page_bytes ||
                            bytes_v[s] > S.page_bytes);
    if (!used) copy_dst[2 * s] = copy_dst[2 * s + 1] = nullptr;
  }
  if (__syncthreads_or(unplaceable)) {
    if (tid == 0) record_failure(call, 0, KVC_ERROR_INTERNAL);
    return;
  }
  const auto count_only = [](uint32_t, uint32_t, bool, uint32_t) {};
  for (uint32_t at = 0; at < num_sequences && status == KVC_SUCCESS; at += blockDim.x) {
    const uint32_t b = at + tid;
    uint32_t need = 0, rank = 0, total = 0;
    place_group(
        S, entries, num_sequences, at, scratch, scan,
        [&](uint32_t sequence) {
          const Entry& e = entries[sequence];
          uint32_t used;
          need = next_fit(S, e, state_of(S, e.slot, e.layer), max_blocks, sequence, bytes_k,
                          bytes_v, count_only, used);
        },
        [&](uint32_t sequence, uint32_t k) {
          const uint32_t pages = place_by_block<false>(S, entries, sequence, max_blocks, bytes_k,
                                                       bytes_v, copy_dst, 0, scratch);
          if (tid == k) need = pages;
        });
    Scan(scan).ExclusiveSum(need, rank, total);
    if (b < num_sequences) entries[b].first_page = opened + rank;
    __syncthreads();  // every thread has read `opened` before it grows
    if (tid == 0) opened += total;
    __syncthreads();
  }
  if (tid == 0 && status == KVC_SUCCESS && opened > free_top) status = KVC_ERROR_OUT_OF_PAGES;
  __syncthreads();
  if (status != KVC_SUCCESS) {
    if (tid == 0) record_failure(call, 0, status);
    return;
  }
  for (uint32_t at = 0; at < num_sequences; at += blockDim.x) {
    const auto walk = [&](uint32_t b) {
      Entry& e = entries[b];
      const LayerState& st = state_of(S, e.slot, e.layer);
      // The table rows past the live ones and this sequence's copy destinations, in placement
      // order, taken once (the walk's stores could alias st).
      auto* rows =
          const_cast<BlockLocation*>(st.view.blocks) + size_t(st.view.num_blocks) * S.num_heads * 2;
      void** dst = copy_dst + size_t(b) * max_blocks * S.num_heads * 2;
      uint32_t page = st.open_page, rank = e.first_page, added = 0, used = 0;
      next_fit(
          S, e, st, max_blocks, b, bytes_k, bytes_v,
          [&](uint32_t i, uint32_t bytes, bool fresh, uint32_t offset) {
            if (fresh) page = S.free_pages[free_top - 1 - rank++];
            rows[i] = {page, offset, bytes};
            dst[i] = S.pool + size_t(page) * S.page_bytes + offset;
            added += bytes;
          },
          used);
      e.open_page = page;
      e.open_used = used;
      e.added_bytes = added;
    };
    place_group(S, entries, num_sequences, at, scratch, scan, walk,
                [&](uint32_t sequence, uint32_t) {
                  place_by_block<true>(S, entries, sequence, max_blocks, bytes_k, bytes_v, copy_dst,
                                       free_top, scratch);
                });
  }
  if (tid == 0) call->free_top = free_top - opened;
}

// Grid: one thread block per (block slot, K|V) of a layer.
__global__ void __launch_bounds__(128)
    copy_kernel(void* const* copy_dst, const uint8_t* encoded_k, const uint8_t* encoded_v,
                size_t stride_k, size_t stride_v, const uint32_t* bytes_k, const uint32_t* bytes_v,
                const CallState* call) {
  const size_t i = blockIdx.x, s = i / 2;
  uint32_t* dst = static_cast<uint32_t*>(copy_dst[i]);
  if (status_of(*call) != KVC_SUCCESS || dst == nullptr) return;
  const bool value = i % 2 != 0;
  const auto* src = reinterpret_cast<const uint32_t*>(value ? encoded_v + s * stride_v
                                                            : encoded_k + s * stride_k);
  const uint32_t words = (value ? bytes_v[s] : bytes_k[s]) / 4;  // blocks are whole words
  for (uint32_t w = threadIdx.x; w < words; w += blockDim.x) dst[w] = src[w];
}

// One thread: a failure the host found (it launches nothing else for the call).
__global__ void record_outcome_kernel(StoreView S, int32_t status) { record_outcome(S, status); }

// Grid: one thread block per entry of the call. Applies everything, or records the failure.
__global__ void __launch_bounds__(kStoreThreads)
    finish_kernel(StoreView S, uint32_t num_sequences, uint32_t n, const uint16_t* keys,
                  const uint16_t* values, const Entry* entries, const CallState* call) {
  const int32_t status = status_of(*call);
  const uint32_t tid = threadIdx.x;
  if (status != KVC_SUCCESS) {
    if (blockIdx.x == 0 && tid == 0) record_outcome(S, status);
    return;
  }
  const Entry& e = entries[blockIdx.x];
  LayerState& st = state_of(S, e.slot, e.layer);
  const uint32_t row = S.num_heads * S.head_dim;
  // With a block the layer holds its sinks: rows [0, sink_tokens) (in place since its first
  // block was assembled), the tail after them.
  const uint32_t sinks = st.view.num_blocks + e.blocks > 0 ? S.sink_tokens : 0u;
  if (e.blocks > 0) {  // the new tail: the input's last rows
    const size_t base = size_t(blockIdx.x) * n * row + size_t(n - e.new_tail) * row;
    auto* tail_k = static_cast<uint16_t*>(const_cast<void*>(st.view.dense_keys)) + sinks * row;
    auto* tail_v = static_cast<uint16_t*>(const_cast<void*>(st.view.dense_values)) + sinks * row;
    for (uint32_t i = tid; i < e.new_tail * row; i += blockDim.x) {
      tail_k[i] = keys[base + i];
      tail_v[i] = values[base + i];
    }
  }
  __syncthreads();  // every thread has read the old block count
  if (tid == 0) {
    st.view.num_blocks += e.blocks;
    st.view.sink_tokens = sinks;
    st.view.tail_tokens = e.new_tail;
    if (e.blocks > 0) {
      st.open_page = e.open_page;
      st.open_used = e.open_used;
      S.layer_compressed[e.layer] = 1;
    }
    Counters& c = *S.counters;
    atomicAdd(&c.num_blocks, 2ull * e.blocks * S.num_heads);
    atomicAdd(&c.block_bytes, (unsigned long long)e.added_bytes);
    atomicAdd(&c.tokens, (unsigned long long)n);
    if (blockIdx.x == 0) {
      c.free_top = call->free_top;
      record_outcome(S, KVC_SUCCESS);
    }
  }
}

// Grid: one thread block. Returns a sequence's pages to the free stack layer by layer, each
// layer's last-allocated page first: the order in which the CPU store pushes them, so that both
// backends hand out the same pages after a free (each page once: a (sequence, layer) fills its
// pages in order, so a page starts wherever the previous block's page differs).
__global__ void __launch_bounds__(kStoreThreads) free_kernel(StoreView S, int32_t id) {
  using Scan = device::BlockScan<uint32_t, kStoreThreads>;
  __shared__ typename Scan::TempStorage scan;
  const uint32_t slot = uint32_t(id) % S.max_sequences;
  if (S.slot_ids[slot] != id) return;  // freed already (a replayed graph)
  Counters& c = *S.counters;
  const uint32_t tid = threadIdx.x;
  uint32_t top = c.free_top;  // every thread's copy; thread 0 writes the new top at the end
  unsigned long long bytes = 0, blocks = 0, tokens = 0;
  for (uint32_t layer = 0; layer < S.num_layers; ++layer) {
    const LayerState& st = state_of(S, slot, layer);
    const uint32_t count = st.view.num_blocks * S.num_heads * 2;
    const BlockLocation* table = st.view.blocks;
    const auto first_on_page = [&](uint32_t i) {
      return i < count && (i == 0 || table[i - 1].page != table[i].page);
    };
    // The layer's pages in allocation order are the pages of its blocks where they change;
    // pushed last-allocated first. Pass 1 counts them, pass 2 ranks and pushes them.
    uint32_t pages = 0;
    for (uint32_t base = 0; base < count; base += kStoreThreads) {
      uint32_t rank, total;
      Scan(scan).ExclusiveSum(first_on_page(base + tid) ? 1u : 0u, rank, total);
      __syncthreads();  // the scan storage is reused
      pages += total;
    }
    uint32_t done = 0;
    for (uint32_t base = 0; base < count; base += kStoreThreads) {
      const uint32_t i = base + tid;
      const bool first = first_on_page(i);
      uint32_t rank, total;
      Scan(scan).ExclusiveSum(first ? 1u : 0u, rank, total);
      __syncthreads();
      if (first) S.free_pages[top + pages - 1 - (done + rank)] = table[i].page;
      if (i < count) bytes += table[i].bytes;
      done += total;
    }
    top += pages;
    blocks += count;
    tokens += uint64_t(st.view.num_blocks) * S.block_tokens + st.view.tail_tokens;
  }
  atomicAdd(&c.block_bytes, 0ull - bytes);
  __syncthreads();  // every thread has read the layer states and the old top
  if (tid == 0) {
    S.slot_ids[slot] = -1;  // a graph that still names the id fails
    c.free_top = top;
    atomicAdd(&c.num_blocks, 0ull - blocks);
    atomicAdd(&c.tokens, 0ull - tokens);
    for (uint32_t layer = 0; layer < S.num_layers; ++layer) {
      LayerState& st = state_of(S, slot, layer);
      st.view.num_blocks = 0;
      st.view.sink_tokens = 0;
      st.view.tail_tokens = 0;
      st.open_used = 0;
    }
  }
}

// ---- Rotation -------------------------------------------------------------------------------

constexpr uint32_t kRotateThreads = 128;

// Element i of a buffer of kvc_dtype `dtype` as a float.
__device__ inline float load_element(const void* p, size_t i, uint32_t dtype) {
  if (dtype == KVC_DTYPE_FP32) return static_cast<const float*>(p)[i];
  return hadamard::load16(static_cast<const uint16_t*>(p)[i], dtype == KVC_DTYPE_BF16);
}

// x rounded to nearest even into element i; saturate: clamped to the dtype's finite range first
// (as the codec's decoded outputs are), else past it is inf.
__device__ inline void store_element(void* p, size_t i, float x, uint32_t dtype, bool saturate) {
  if (dtype == KVC_DTYPE_FP32) {
    static_cast<float*>(p)[i] = x;
    return;
  }
  const bool bf16 = dtype == KVC_DTYPE_BF16;
  static_cast<uint16_t*>(p)[i] = !saturate ? hadamard::store16(x, bf16)
                                 : bf16    ? format::float_to_bf16_saturate(x)
                                           : format::float_to_half_saturate(x);
}

// Rows of head_dim elements: dst row r = R (src row r), R = H / sqrt(head_dim) (its own inverse,
// so the same kernel rotates back), in fp32 in shared memory, the arithmetic of
// hadamard::rotate. src and dst may be the same buffer. Grid-stride: any grid covers every row.
// Not saturating (the rows an append stores), a row whose stored values do not rotate back
// within fp32 (bf16 values above about FLT_MAX / sqrt(head_dim)) gets an inf in its first
// element, so that the append refuses it as non-finite, as the CPU store does.
__global__ void __launch_bounds__(kRotateThreads)
    rotate_rows_kernel(const void* src, uint32_t src_dtype, void* dst, uint32_t dst_dtype,
                       bool saturate, size_t rows, uint32_t head_dim) {
  __shared__ float x[KVC_MAX_HEAD_DIM];
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const size_t base = r * head_dim;
    // Each thread loads and stores the same elements, so one row's stores and the next row's
    // loads need no barrier between them; rotate_block synchronizes around its butterflies.
    for (uint32_t i = threadIdx.x; i < head_dim; i += blockDim.x) {
      x[i] = load_element(src, base + i, src_dtype);
    }
    hadamard::rotate_block(x, head_dim);
    for (uint32_t i = threadIdx.x; i < head_dim; i += blockDim.x) {
      store_element(dst, base + i, x[i], dst_dtype, saturate);
    }
    if (saturate) continue;
    bool lost = false;
    for (uint32_t i = threadIdx.x; i < head_dim; i += blockDim.x) {
      x[i] = load_element(dst, base + i, dst_dtype);  // as stored: rounded to the dtype
    }
    hadamard::rotate_block(x, head_dim);
    for (uint32_t i = threadIdx.x; i < head_dim; i += blockDim.x) {
      lost = lost || !format::is_finite(x[i]);
    }
    if (__syncthreads_or(lost) && threadIdx.x == 0) {
      store_element(dst, base, INFINITY, dst_dtype, false);
    }
  }
}

// Attention's per-sequence views; an id no longer live reads as an empty sequence.
__global__ void __launch_bounds__(kStoreThreads)
    gather_views_kernel(StoreView S, Batch batch, uint32_t num_sequences, uint32_t layer,
                        SequenceView* views) {
  for (uint32_t i = threadIdx.x; i < num_sequences; i += blockDim.x) {
    const int32_t id = batch.ids[i];
    const uint32_t slot = uint32_t(id) % S.max_sequences;
    views[i] = S.slot_ids[slot] == id ? state_of(S, slot, layer).view : SequenceView{};
  }
}

}  // namespace kvc::kernels::store
