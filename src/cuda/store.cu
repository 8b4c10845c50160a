// SPDX-License-Identifier: Apache-2.0
// Host side of the CUDA store: device memory, the launch chain of an append (see
// store_kernels.cuh), and the synchronous paths (read, serialize, restore, codebook building).
#include <cuda_runtime.h>

#include <algorithm>
#include <new>
#include <utility>
#include <vector>

#include "core/error.hpp"
#include "cuda/cuda_attention.hpp"
#include "cuda/cuda_codec.hpp"
#include "cuda/cuda_store.hpp"
#include "cuda/launch.hpp"
#include "kernels/store/store_kernels.cuh"

namespace kvc::cuda {
namespace k = kvc::kernels;
namespace ks = kvc::kernels::store;

namespace {

// A device array that frees itself; grows only by replacement. A replaced allocation can be
// kept alive instead (`retired`): graphs captured earlier still point at it.
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t count) { reset(count); }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  // A new allocation of `count` elements; the old one is retired or freed only once it exists,
  // so a failed growth leaves the array as it was.
  void reset(size_t count, std::vector<void*>* retired = nullptr) {
    T* p = nullptr;
    check_cuda(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)), "cudaMalloc (store)");
    DeviceArray fresh;
    fresh.ptr_ = p;
    fresh.count_ = count;
    if (retired != nullptr) retired->reserve(retired->size() + 1);
    adopt(fresh, retired);
  }
  // Takes fresh's allocation (fresh is left empty); the old one is retired or freed as by reset.
  // Does not throw once `retired` has room.
  void adopt(DeviceArray& fresh, std::vector<void*>* retired) {
    release(retired);
    ptr_ = std::exchange(fresh.ptr_, nullptr);
    count_ = std::exchange(fresh.count_, 0);
  }
  T* get() const { return ptr_; }
  size_t size() const { return count_; }
  void upload(const T* host, size_t count, size_t at = 0) {
    copy_to_device(ptr_ + at, host, count * sizeof(T), "cudaMemcpy (store upload)");
  }
  std::vector<T> download(size_t count, size_t at = 0) const {
    std::vector<T> out(count);
    check_cuda(cudaMemcpy(out.data(), ptr_ + at, count * sizeof(T), cudaMemcpyDeviceToHost),
               "cudaMemcpy (store download)");
    return out;
  }

 private:
  // Gives up the allocation: kept alive in `retired` (graphs captured earlier may point at it)
  // or freed.
  void release(std::vector<void*>* retired) {
    if (retired != nullptr && ptr_ != nullptr) {
      retired->push_back(ptr_);
    } else {
      cudaFree(ptr_);
    }
    ptr_ = nullptr;
    count_ = 0;
  }
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

template <class T>
void copy_to_host(T* host, const void* device, size_t count) {
  check_cuda(cudaMemcpy(host, device, count * sizeof(T), cudaMemcpyDeviceToHost),
             "cudaMemcpy (store download)");
}

void wait_for_device() { check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

size_t round16(size_t bytes) { return (bytes + 15) / 16 * 16; }
size_t round256(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

struct CudaStore::Impl {
  StoreParams p;
  int device = 0;
  uint32_t table_blocks = 0;  // block-table capacity of one (sequence, layer), in token blocks

  // Host-side decisions.
  StoreBooks books;
  std::vector<DeviceCodecPtr> codecs;               // [layer * 2 + kind]
  std::vector<DeviceCodebooksPtr> attention_books;  // [layer]
  // Replaced device memory, freed with the store: captured graphs may still read it.
  std::vector<void*> retired;
  std::vector<DeviceCodecPtr> retired_codecs;
  std::vector<DeviceCodebooksPtr> retired_books;
  std::vector<int32_t> slot_ids;        // live id per slot, -1 if free
  std::vector<uint32_t> free_slots;     // a stack
  std::vector<uint32_t> generations;    // per slot: ids issued there so far
  std::vector<uint8_t> layer_captured;  // per layer: an append or attention of it was captured

  // Device state.
  DeviceArray<uint8_t> pool;
  DeviceArray<uint32_t> free_pages;
  DeviceArray<ks::Counters> counters;
  DeviceArray<ks::LayerState> states;
  DeviceArray<int32_t> d_slot_ids;
  DeviceArray<BlockLocation> tables;
  DeviceArray<uint8_t> dense;  // the uncompressed rows: sinks and tails
  DeviceArray<uint32_t> layer_compressed;
  ks::Counters* mirror = nullptr;  // pinned: the counters as last copied out

  // Scratch of one call, sized by the largest call so far.
  struct Scratch {
    DeviceArray<ks::Entry> entries;
    DeviceArray<const void*> src_k, src_v;  // [layers, layer_slots]
    DeviceArray<void*> dst_k, dst_v;        // [layer_slots], into encoded_k/v
    DeviceArray<uint8_t> encoded_k, encoded_v;
    DeviceArray<uint32_t> bytes_k, bytes_v;
    DeviceArray<void*> copy_dst;  // [layer_slots, 2]
    DeviceArray<ks::CallState> call;
    DeviceArray<SequenceView> views;  // [KVC_STORE_MAX_BATCH]
    DeviceArray<uint8_t> workspace;
    // A rotating store (p.rotated()): an append's rotated K then V rows (of the kinds it
    // rotates), and an attention's rotated queries then its outputs in the rotated space.
    DeviceArray<uint8_t> rotated_rows, rotated_queries;
  } scratch;
  size_t stride_k = 0, stride_v = 0;  // encoded slot sizes

  explicit Impl(const StoreParams& params);
  ~Impl() {
    cudaFreeHost(mirror);
    for (void* p : retired) cudaFree(p);
  }

  ks::StoreView view() {
    return {states.get(),
            d_slot_ids.get(),
            free_pages.get(),
            counters.get(),
            layer_compressed.get(),
            pool.get(),
            p.page_bytes,
            p.num_layers,
            p.num_heads,
            p.head_dim,
            p.block_tokens,
            p.max_sequences,
            p.max_sequence_tokens,
            p.dtype == KVC_DTYPE_BF16 ? 0x7F80u : 0x7C00u,
            block_alignment(p.tiles()),
            p.sink_tokens};
  }
  uint32_t slot_of(int32_t id) const { return uint32_t(id) % p.max_sequences; }
  size_t live() const { return p.max_sequences - free_slots.size(); }
  // Rows of a (slot, layer)'s uncompressed K (or V) buffer: sinks, then a tail.
  size_t dense_rows() const { return size_t(p.sink_tokens) + p.block_tokens; }
  // Where (slot, layer)'s block table and uncompressed rows are: fixed at creation.
  SequenceView layout(uint32_t slot, uint32_t layer) const {
    const size_t i = size_t(slot) * p.num_layers + layer, rows = dense_rows() * p.token_bytes();
    return {tables.get() + i * table_blocks * p.num_heads * 2,
            0,
            0,
            0,
            dense.get() + 2 * i * rows,
            dense.get() + (2 * i + 1) * rows};
  }
  // The states of all a slot's layers.
  std::vector<ks::LayerState> download_states(uint32_t slot) const {
    return states.download(p.num_layers, size_t(slot) * p.num_layers);
  }
  // Makes the slot next_sequence() gave the live home of sid (host side; cannot throw).
  void take_slot(uint32_t slot, int32_t sid) noexcept {
    free_slots.pop_back();
    slot_ids[slot] = sid;
    ++generations[slot];
  }
  // The slot the next sequence gets, and its id; throws if there is none.
  std::pair<uint32_t, int32_t> next_sequence() const {
    require(!free_slots.empty(), KVC_ERROR_OUT_OF_MEMORY,
            "the store holds config->max_sequences = ", p.max_sequences, " live sequences");
    const uint32_t slot = free_slots.back();
    const uint64_t id = uint64_t(generations[slot]) * p.max_sequences + slot;
    require(id <= INT32_MAX, KVC_ERROR_OUT_OF_MEMORY, "sequence ids are exhausted");
    return {slot, int32_t(id)};
  }
  void copy_out_counters(cudaStream_t s) {
    check_cuda(
        cudaMemcpyAsync(mirror, counters.get(), sizeof(ks::Counters), cudaMemcpyDeviceToHost, s),
        "cudaMemcpyAsync (store counters)");
  }
  // New codebooks go in two steps, so that a failure changes nothing: everything that can fail
  // first (the codecs, the attention kernel's tables of the layer's K and V books with the new
  // ones, room among the retired), then install_books, which moves only. Replaced codecs and
  // tables are retired, not freed: captured graphs may point at them.
  struct NewBooks {
    uint32_t layer;
    std::shared_ptr<const Codebook> books[2];  // K, V; null: the layer's keeps its own
    DeviceCodecPtr codecs[2];
    DeviceCodebooksPtr attention;
  };
  void prepare_books(NewBooks& n) const {
    const Codebook* k = n.books[0] ? n.books[0].get() : books[n.layer * 2].get();
    const Codebook* v = n.books[1] ? n.books[1].get() : books[n.layer * 2 + 1].get();
    n.attention = upload_codebooks(k, v);
  }
  // Room among the retired for installing the new books of `layers` layers.
  void make_room(size_t layers) {
    retired_codecs.reserve(retired_codecs.size() + 2 * layers);
    retired_books.reserve(retired_books.size() + layers);
  }
  void install_books(NewBooks& n) noexcept {
    for (uint32_t kind = 0; kind < 2; ++kind) {
      if (!n.books[kind]) continue;
      retired_codecs.push_back(std::move(codecs[n.layer * 2 + kind]));
      codecs[n.layer * 2 + kind] = std::move(n.codecs[kind]);
      books[n.layer * 2 + kind] = std::move(n.books[kind]);
    }
    retired_books.push_back(std::move(attention_books[n.layer]));
    attention_books[n.layer] = std::move(n.attention);
  }
  // Whether (layer, kind) still has to build its codebook, which synchronizes. Tile blocks
  // use none: a tiles store never synchronizes to build one.
  bool needs_book(uint32_t layer, uint32_t kind) const {
    return !books[layer * 2 + kind] && !p.tiles() &&
           p.codec(layer, kind).entropy != KVC_ENTROPY_FIXED;
  }
  void record_host_failure(kvc_status_t status, cudaStream_t s) {
    launch(ks::record_outcome_kernel, dim3(1), 1, 0, s, view(), int32_t(status));
    copy_out_counters(s);
  }
  void ensure_scratch(size_t entries, size_t layer_slots, size_t all_slots, bool captured);
  void ensure_workspace(size_t bytes, bool captured);
  // Grows a rotation scratch buffer to at least `bytes` (outside capture only).
  void ensure_rotation_scratch(DeviceArray<uint8_t>& buffer, size_t bytes, bool captured);
  // rows rows of head_dim elements from src (src_dtype) rotated into dst (dst_dtype) on s.
  void rotate(const void* src, kvc_dtype src_dtype, void* dst, kvc_dtype dst_dtype, bool saturate,
              size_t rows, cudaStream_t s) const;
  ks::Batch batch_of(const std::vector<int32_t>& ids) const;
  void run_append(uint32_t first_layer, uint32_t num_layers, const std::vector<int32_t>& ids,
                  uint32_t n, const void* keys, const void* values, cudaStream_t s);
  DeviceCodecPtr build_book(uint32_t layer, uint32_t kind, const void* const* d_src, size_t count,
                            std::shared_ptr<const Codebook>& book, cudaStream_t s);
};

CudaStore::Impl::Impl(const StoreParams& params) : p(params) {
  // The codecs check that a GPU is usable and the block shapes fit its shared memory. Each has
  // its layer's bound (kvc_store_config.key_/value_layer_scales).
  for (uint32_t i = 0; i < 2 * p.num_layers; ++i) {
    codecs.push_back(create_device_codec(p.codec(i / 2, i % 2), nullptr));
  }
  device = current_device();
  scratch.call.reset(1);
  scratch.views.reset(KVC_STORE_MAX_BATCH);
  books.resize(size_t(p.num_layers) * 2);
  layer_captured.assign(p.num_layers, 0);
  for (uint32_t l = 0; l < p.num_layers; ++l)
    attention_books.push_back(upload_codebooks(nullptr, nullptr));
  table_blocks = (p.max_sequence_tokens + p.block_tokens - 1) / p.block_tokens;
  stride_k = round16(p.key.max_block_bytes(p.dtype));
  stride_v = round16(p.value.max_block_bytes(p.dtype));

  const size_t layers = size_t(p.max_sequences) * p.num_layers;
  pool.reset(size_t(p.num_pages) * p.page_bytes);
  tables.reset(layers * table_blocks * p.num_heads * 2);
  dense.reset(layers * 2 * dense_rows() * p.token_bytes());
  std::vector<ks::LayerState> init(layers);
  for (size_t i = 0; i < layers; ++i) {
    init[i].view = layout(uint32_t(i / p.num_layers), uint32_t(i % p.num_layers));
  }
  states.reset(layers);
  states.upload(init.data(), layers);
  std::vector<uint32_t> stack(p.num_pages);
  for (uint32_t i = 0; i < p.num_pages; ++i) stack[i] = p.num_pages - 1 - i;  // page 0 on top
  free_pages.reset(p.num_pages);
  free_pages.upload(stack.data(), stack.size());
  slot_ids.assign(p.max_sequences, -1);
  d_slot_ids.reset(p.max_sequences);
  d_slot_ids.upload(slot_ids.data(), slot_ids.size());
  generations.assign(p.max_sequences, 0);
  for (uint32_t i = p.max_sequences; i-- > 0;) free_slots.push_back(i);
  const std::vector<uint32_t> zeros(p.num_layers, 0);
  layer_compressed.reset(p.num_layers);
  layer_compressed.upload(zeros.data(), zeros.size());
  const ks::Counters start{p.num_pages, KVC_SUCCESS, 0, 0, 0, 0, 0};
  counters.reset(1);
  counters.upload(&start, 1);
  check_cuda(cudaMallocHost(&mirror, sizeof(ks::Counters)), "cudaMallocHost (store counters)");
  *mirror = start;
}

void CudaStore::Impl::ensure_scratch(size_t entries, size_t layer_slots, size_t all_slots,
                                     bool captured) {
  Scratch& S = scratch;
  if (entries <= S.entries.size() && layer_slots <= S.bytes_k.size() &&
      all_slots <= S.src_k.size()) {
    return;
  }
  require(!captured, KVC_ERROR_INVALID_ARGUMENT,
          "the store's scratch memory must grow for this call, which cannot happen during stream "
          "capture: make one uncaptured call of this size first");
  // At least doubling: the replaced buffers stay allocated (for captured graphs), so this
  // bounds them by the final size.
  entries = std::max(entries, 2 * S.entries.size());
  layer_slots = std::max(layer_slots, 2 * S.bytes_k.size());
  all_slots = std::max(all_slots, 2 * S.src_k.size());
  // Every new buffer is allocated and filled before the first replaces its predecessor: a
  // failure (out of device memory) frees them and leaves the scratch as it was, every buffer
  // sized as its callers expect.
  DeviceArray<ks::Entry> new_entries(entries);
  DeviceArray<const void*> src_k(all_slots), src_v(all_slots);
  DeviceArray<uint8_t> encoded_k(layer_slots * stride_k), encoded_v(layer_slots * stride_v);
  DeviceArray<uint32_t> bytes_k(layer_slots), bytes_v(layer_slots);
  DeviceArray<void*> copy_dst(layer_slots * 2), dst_k(layer_slots), dst_v(layer_slots);
  std::vector<void*> dst(layer_slots);
  for (size_t i = 0; i < layer_slots; ++i) dst[i] = encoded_k.get() + i * stride_k;
  dst_k.upload(dst.data(), layer_slots);
  for (size_t i = 0; i < layer_slots; ++i) dst[i] = encoded_v.get() + i * stride_v;
  dst_v.upload(dst.data(), layer_slots);
  retired.reserve(retired.size() + 10);
  S.entries.adopt(new_entries, &retired);
  S.src_k.adopt(src_k, &retired);
  S.src_v.adopt(src_v, &retired);
  S.encoded_k.adopt(encoded_k, &retired);
  S.encoded_v.adopt(encoded_v, &retired);
  S.bytes_k.adopt(bytes_k, &retired);
  S.bytes_v.adopt(bytes_v, &retired);
  S.copy_dst.adopt(copy_dst, &retired);
  S.dst_k.adopt(dst_k, &retired);
  S.dst_v.adopt(dst_v, &retired);
}

void CudaStore::Impl::ensure_workspace(size_t bytes, bool captured) {
  if (bytes <= scratch.workspace.size()) return;
  require(!captured, KVC_ERROR_INVALID_ARGUMENT,
          "the attention workspace must grow for this call, which cannot happen during stream "
          "capture: make one uncaptured call of this shape first");
  scratch.workspace.reset(std::max(bytes, 2 * scratch.workspace.size()), &retired);
}

void CudaStore::Impl::ensure_rotation_scratch(DeviceArray<uint8_t>& buffer, size_t bytes,
                                              bool captured) {
  if (bytes <= buffer.size()) return;
  require(!captured, KVC_ERROR_INVALID_ARGUMENT,
          "the store's rotation scratch must grow for this call, which cannot happen during "
          "stream capture: make one uncaptured call of this size first");
  buffer.reset(std::max(bytes, 2 * buffer.size()), &retired);
}

void CudaStore::Impl::rotate(const void* src, kvc_dtype src_dtype, void* dst, kvc_dtype dst_dtype,
                             bool saturate, size_t rows, cudaStream_t s) const {
  if (rows == 0) return;
  const uint32_t grid = uint32_t(std::min<size_t>(rows, 4096));
  launch(ks::rotate_rows_kernel, dim3(grid), ks::kRotateThreads, 0, s, src, uint32_t(src_dtype),
         dst, uint32_t(dst_dtype), saturate, rows, p.head_dim);
}

ks::Batch CudaStore::Impl::batch_of(const std::vector<int32_t>& ids) const {
  ks::Batch batch{};
  std::copy(ids.begin(), ids.end(), batch.ids);
  return batch;
}

// Builds the codebook of (layer, kind) from the call's complete blocks (as the CPU store does),
// returning a codec that uses it; null (and no book) if there is nothing to count. Synchronous.
DeviceCodecPtr CudaStore::Impl::build_book(uint32_t layer, uint32_t kind, const void* const* d_src,
                                           size_t count, std::shared_ptr<const Codebook>& book,
                                           cudaStream_t s) {
  Histogram counts;  // absent blocks (NULL) count nothing
  histogram(*codecs[layer * 2 + kind], int32_t(count), d_src, int64_t(p.num_heads) * p.head_dim,
            p.dtype, counts, s);
  if (counts.total() == 0) return nullptr;
  book = build_layer_codebook(counts);
  return create_device_codec(p.codec(layer, kind), book.get());
}

void CudaStore::Impl::run_append(uint32_t first_layer, uint32_t num_layers,
                                 const std::vector<int32_t>& ids, uint32_t n, const void* keys,
                                 const void* values, cudaStream_t s) {
  require_device(device, "the CUDA store");
  const uint32_t B = uint32_t(ids.size()), H = p.num_heads, T = p.block_tokens;
  const uint32_t max_blocks = (T - 1 + n) / T;  // complete blocks one sequence can reach
  const size_t layer_slots = size_t(B) * max_blocks * H;
  const bool captured = capturing(s);
  if (!captured) {
    require_device_memory(keys, device, "keys");
    require_device_memory(values, device, "values");
  }
  // Layers without codebooks build them from this call's blocks: a synchronous step.
  bool any_book = false;
  for (uint32_t layer = first_layer; layer < first_layer + num_layers; ++layer) {
    any_book = any_book || needs_book(layer, 0) || needs_book(layer, 1);
  }
  require(!(captured && any_book), KVC_ERROR_INVALID_ARGUMENT,
          "a layer of this call has no codebooks yet, and building them synchronizes: prefill "
          "the layer (or set its codebooks) before capturing");
  ensure_scratch(size_t(num_layers) * B, layer_slots, num_layers * layer_slots, captured);
  Scratch& S = scratch;
  const size_t rows = size_t(num_layers) * B * n * H;  // of K, and of V
  const size_t rotated_bytes = round256(rows * p.head_dim * format::dtype_bytes(p.dtype));
  if (p.rotated()) ensure_rotation_scratch(S.rotated_rows, 2 * rotated_bytes, captured);
  if (captured) {
    std::fill_n(layer_captured.begin() + first_layer, num_layers, uint8_t(1));
  }
  const ks::StoreView V = view();
  // The chain reads the rotated rows of the kinds the store rotates (rounded to the dtype, not
  // saturated), the others as given.
  const void* given[2] = {keys, values};
  const uint16_t* rows16[2];
  for (uint32_t kind = 0; kind < 2; ++kind) {
    rows16[kind] = static_cast<const uint16_t*>(given[kind]);
    if (!p.rotates[kind]) continue;
    uint8_t* rotated = S.rotated_rows.get() + kind * rotated_bytes;  // aligned as an allocation
    rotate(given[kind], p.dtype, rotated, p.dtype, false, rows, s);
    rows16[kind] = reinterpret_cast<const uint16_t*>(rotated);
  }
  const uint16_t *k16 = rows16[0], *v16 = rows16[1];
  check_cuda(cudaMemsetAsync(S.call.get(), 0xFF, sizeof(ks::CallState), s), "cudaMemsetAsync");
  launch(ks::stage_kernel, dim3(B, num_layers), ks::kStoreThreads, 0, s, V, batch_of(ids), B,
         first_layer, n, k16, v16, max_blocks, S.entries.get(), S.src_k.get(), S.src_v.get(),
         S.call.get());
  // The codebooks this call builds, per layer that builds any (in layer order).
  std::vector<NewBooks> built_books;
  const int64_t stride = int64_t(H) * p.head_dim;
  // The call has begun on the device: a host failure from here until finish_kernel (the kernel
  // that commits) is recorded there too, as a failed call (api_call's status for each kind).
  try {
    for (uint32_t li = 0; li < num_layers; ++li) {
      const uint32_t layer = first_layer + li;
      for (uint32_t kind = 0; kind < 2; ++kind) {
        const void* const* src = (kind == 0 ? S.src_k : S.src_v).get() + li * layer_slots;
        const DeviceCodec* codec = codecs[layer * 2 + kind].get();
        if (needs_book(layer, kind)) {
          std::shared_ptr<const Codebook> book;
          DeviceCodecPtr built = build_book(layer, kind, src, layer_slots, book, s);
          if (built) {
            codec = built.get();
            if (built_books.empty() || built_books.back().layer != layer) {
              built_books.push_back({layer, {}, {}, {}});
            }
            built_books.back().books[kind] = std::move(book);
            built_books.back().codecs[kind] = std::move(built);
          }
        }
        encode(*codec, int32_t(layer_slots), src, stride, p.dtype,
               (kind == 0 ? S.dst_k : S.dst_v).get(), (kind == 0 ? S.bytes_k : S.bytes_v).get(), s);
      }
      launch(ks::commit_kernel, dim3(1), ks::kStoreThreads, 0, s, V, B, max_blocks, li == 0,
             S.entries.get() + size_t(li) * B, S.bytes_k.get(), S.bytes_v.get(), S.copy_dst.get(),
             S.call.get());
      launch(ks::copy_kernel, dim3(uint32_t(layer_slots * 2)), 128, 0, s, S.copy_dst.get(),
             S.encoded_k.get(), S.encoded_v.get(), stride_k, stride_v, S.bytes_k.get(),
             S.bytes_v.get(), S.call.get());
    }
    // Everything that can fail for the new codebooks comes before the call commits: a host
    // failure after finish_kernel would leave the layers' blocks naming books the store never
    // kept.
    for (NewBooks& b : built_books) prepare_books(b);
    make_room(built_books.size());
    launch(ks::finish_kernel, dim3(num_layers * B), ks::kStoreThreads, 0, s, V, B, n, k16, v16,
           S.entries.get(), S.call.get());
  } catch (const Error& e) {
    record_host_failure(e.status(), s);
    throw;
  } catch (const std::bad_alloc&) {
    record_host_failure(KVC_ERROR_OUT_OF_MEMORY, s);
    throw;
  }
  copy_out_counters(s);
  if (built_books.empty()) return;
  // The new codebooks freeze only if the call committed.
  ks::CallState call{};
  check_cuda(cudaMemcpyAsync(&call, S.call.get(), sizeof(call), cudaMemcpyDeviceToHost, s),
             "cudaMemcpyAsync (call status)");
  check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize (codebook)");
  if (call.failure != ks::kNoFailure) return;
  for (NewBooks& b : built_books) install_books(b);
}

CudaStore::CudaStore(const StoreParams& params) : impl_(std::make_unique<Impl>(params)) {}
CudaStore::~CudaStore() = default;

size_t CudaStore::num_sequences() const { return impl_->live(); }

void CudaStore::require_live(int32_t id) const {
  const Impl& m = *impl_;
  require(id >= 0 && m.slot_ids[m.slot_of(id)] == id, KVC_ERROR_UNKNOWN_SEQUENCE,
          "sequence_id = ", id, " is not a live sequence");
}

int32_t CudaStore::add_sequence() {
  Impl& m = *impl_;
  require_device(m.device, "the CUDA store");
  const auto [slot, sid] = m.next_sequence();
  wait_for_device();  // a free of this slot may still be queued
  m.d_slot_ids.upload(&sid, 1, slot);
  m.take_slot(slot, sid);
  return sid;
}

void CudaStore::free_sequence(int32_t id, void* stream) {
  Impl& m = *impl_;
  require_device(m.device, "the CUDA store");
  require_live(id);
  const auto s = static_cast<cudaStream_t>(stream);
  const uint32_t slot = m.slot_of(id);
  // The kernel also marks the slot free on the device (a graph that still names the id
  // fails). Once it is queued the sequence is gone: the host follows at once (free_slots has
  // room for every slot), before the counters' copy, which could fail.
  launch(ks::free_kernel, dim3(1), ks::kStoreThreads, 0, s, m.view(), id);
  m.slot_ids[slot] = -1;
  m.free_slots.push_back(slot);
  m.copy_out_counters(s);
}

uint32_t CudaStore::length(int32_t id, uint32_t layer) {
  Impl& m = *impl_;
  require_device(m.device, "the CUDA store");
  require_live(id);
  wait_for_device();
  const ks::LayerState st =
      m.states.download(1, size_t(m.slot_of(id)) * m.p.num_layers + layer).front();
  return st.view.num_blocks * m.p.block_tokens + st.view.tail_tokens;
}

void CudaStore::set_codebook(uint32_t layer, uint32_t kind, std::shared_ptr<const Codebook> book) {
  Impl& m = *impl_;
  require_device(m.device, "the CUDA store");
  wait_for_device();
  require(m.layer_compressed.download(1, layer)[0] == 0, KVC_ERROR_INVALID_ARGUMENT, "layer ",
          layer, " has compressed blocks already: its codebooks are frozen");
  require(!m.layer_captured[layer], KVC_ERROR_INVALID_ARGUMENT, "layer ", layer,
          " has been captured into a CUDA graph, which keeps the codebooks it was captured with: "
          "set codebooks before capturing");
  Impl::NewBooks n{layer, {}, {}, {}};
  n.codecs[kind] = create_device_codec(m.p.codec(layer, kind), book.get());
  n.books[kind] = std::move(book);
  m.prepare_books(n);
  m.make_room(1);
  m.install_books(n);
}

std::shared_ptr<const Codebook> CudaStore::codebook(uint32_t layer, uint32_t kind) const {
  return impl_->books[layer * 2 + kind];
}

void CudaStore::prefill(int32_t id, uint32_t first_layer, uint32_t num_layers, uint32_t num_tokens,
                        const void* keys, const void* values, void* stream) {
  // The device checks the sequence's length with the new tokens; more tokens than any sequence
  // may hold are refused here, before the scratch is sized for them.
  require(num_tokens <= impl_->p.token_limit(), KVC_ERROR_INVALID_ARGUMENT,
          "num_tokens = ", num_tokens,
          " is more than a sequence holds (config->max_sequence_tokens = ", impl_->p.token_limit(),
          ")");
  impl_->run_append(first_layer, num_layers, {id}, num_tokens, keys, values,
                    static_cast<cudaStream_t>(stream));
}

void CudaStore::append(uint32_t layer, const std::vector<int32_t>& ids, const void* keys,
                       const void* values, void* stream) {
  impl_->run_append(layer, 1, ids, 1, keys, values, static_cast<cudaStream_t>(stream));
}

void CudaStore::read(int32_t id, uint32_t layer, kvc_dtype dtype, uint32_t length, void* keys,
                     void* values, void* stream) {
  Impl& m = *impl_;
  const auto s = static_cast<cudaStream_t>(stream);
  require_device(m.device, "the CUDA store");
  require_device_memory(keys, m.device, "keys");
  require_device_memory(values, m.device, "values");
  const SequenceView st = m.layout(m.slot_of(id), layer);
  const uint32_t nb = length / m.p.block_tokens, tail = length % m.p.block_tokens;
  const uint32_t H = m.p.num_heads;
  const size_t row = size_t(H) * m.p.head_dim;
  // Where each kind's rows go: a kind the store rotates decodes to fp32 scratch, rotated back
  // into the output at the end (one rounding, to dtype, saturating), as the CPU store does.
  void* const out[2] = {keys, values};
  DeviceArray<float> rotated[2];
  void* dst[2] = {keys, values};
  kvc_dtype dst_dtype[2] = {dtype, dtype};
  for (uint32_t kind = 0; kind < 2; ++kind) {
    if (!m.p.rotates[kind]) continue;
    rotated[kind].reset(size_t(length) * row);
    dst[kind] = rotated[kind].get();
    dst_dtype[kind] = KVC_DTYPE_FP32;
  }
  const size_t count = size_t(nb) * H;
  if (count > 0) {
    std::vector<BlockLocation> table(count * 2);
    copy_to_host(table.data(), st.blocks, table.size());
    for (uint32_t kind = 0; kind < 2; ++kind) {
      const size_t es = format::dtype_bytes(dst_dtype[kind]);
      std::vector<const void*> src(count);
      std::vector<void*> at(count);
      std::vector<uint32_t> bytes(count);
      for (size_t i = 0; i < count; ++i) {
        const BlockLocation& b = table[i * 2 + kind];
        src[i] = m.pool.get() + size_t(b.page) * m.p.page_bytes + b.offset;
        bytes[i] = b.bytes;
        const size_t block = i / H, h = i % H;
        at[i] = static_cast<uint8_t*>(dst[kind]) +
                (block * m.p.block_tokens * row + h * m.p.head_dim) * es;
      }
      DeviceArray<const void*> d_src(count);
      DeviceArray<void*> d_out(count);
      DeviceArray<uint32_t> d_bytes(count);
      DeviceArray<kvc_status_t> d_status(count);
      d_src.upload(src.data(), count);
      d_out.upload(at.data(), count);
      d_bytes.upload(bytes.data(), count);
      decode(*m.codecs[layer * 2 + kind], int32_t(count), d_src.get(), d_bytes.get(),
             dst_dtype[kind], d_out.get(), int64_t(row), d_status.get(), s);
      check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize (read)");
      for (kvc_status_t status : d_status.download(count)) {
        require(status == KVC_SUCCESS, status, "a block of sequence ", id, " layer ", layer,
                " does not decode: the store's memory was damaged");
      }
    }
  }
  // count uncompressed rows from row `first` of the buffers to token `token` of the output:
  // the sinks over block 0's first rows, the tail after the blocks.
  auto put_rows = [&](uint32_t first, uint32_t count, uint32_t token) {
    std::vector<uint8_t> rows(count * m.p.token_bytes());
    for (uint32_t kind = 0; kind < 2; ++kind) {
      const size_t es = format::dtype_bytes(dst_dtype[kind]);
      std::vector<uint8_t> converted(count * row * es);
      const auto* src = static_cast<const uint8_t*>(kind == 0 ? st.dense_keys : st.dense_values);
      copy_to_host(rows.data(), src + first * m.p.token_bytes(), rows.size());
      convert_elements(rows.data(), m.p.dtype, converted.data(), dst_dtype[kind], count * row);
      copy_to_device(static_cast<uint8_t*>(dst[kind]) + token * row * es, converted.data(),
                     converted.size(), "cudaMemcpy (store upload)");
    }
  };
  const uint32_t sinks = m.p.sinks_held(nb);
  if (sinks > 0) put_rows(0, sinks, 0);
  if (tail > 0) put_rows(sinks, tail, nb * m.p.block_tokens);
  if (!m.p.rotated()) return;
  for (uint32_t kind = 0; kind < 2; ++kind) {
    if (m.p.rotates[kind]) {
      m.rotate(dst[kind], KVC_DTYPE_FP32, out[kind], dtype, true, size_t(length) * H, s);
    }
  }
  check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize (read)");
}

void CudaStore::attention(uint32_t layer, const std::vector<int32_t>& ids, uint32_t q_heads,
                          float scale, const void* queries, void* out, void* stream) {
  Impl& m = *impl_;
  require_device(m.device, "the CUDA store");
  const auto s = static_cast<cudaStream_t>(stream);
  const uint32_t B = uint32_t(ids.size());
  const AttentionShape shape{B,         m.p.num_heads, q_heads / m.p.num_heads, m.p.head_dim,
                             m.p.dtype, scale};
  // Everything that can fail comes before the first launch: nothing half-captured. (A tiles
  // store's shape was checked against the tile kernel at creation; plan_attention checks the
  // group.)
  const CodecParams &key = m.p.codec(layer, KVC_KIND_KEY),
                    &value = m.p.codec(layer, KVC_KIND_VALUE);
  if (!m.p.tiles()) require_attention_support(shape, key, value);
  const uint32_t max_units = k::max_attention_units(m.table_blocks, m.p.sink_tokens);
  const AttentionPlan plan = plan_attention(shape, max_units);
  const bool captured = capturing(s);
  if (!captured) {
    require_device_memory(queries, m.device, "queries");
    require_device_memory(out, m.device, "out");
  }
  require(!captured || !(m.needs_book(layer, 0) || m.needs_book(layer, 1)),
          KVC_ERROR_INVALID_ARGUMENT, "layer ", layer,
          " has no codebooks yet, and a captured graph would keep reading without them: "
          "prefill the layer (or set its codebooks) before capturing");
  if (plan.workspace_bytes > m.scratch.workspace.size()) {
    // Sized for every smaller batch too, so that a later (captured) call of one fits.
    m.ensure_workspace(attention_workspace_bound(shape, max_units), captured);
  }
  // A rotated store attends in the rotated space: q' = R q into scratch where K is rotated, o'
  // from the kernel into scratch where V is, o = R o' into out (each rounded to the dtype,
  // saturating).
  const size_t rows = size_t(B) * q_heads;
  const size_t rotated_bytes = round256(rows * m.p.head_dim * format::dtype_bytes(m.p.dtype));
  const void* q = queries;
  void* o = out;
  if (m.p.rotated()) {
    m.ensure_rotation_scratch(m.scratch.rotated_queries, 2 * rotated_bytes, captured);
    if (m.p.rotates[KVC_KIND_KEY]) q = m.scratch.rotated_queries.get();
    if (m.p.rotates[KVC_KIND_VALUE]) {
      o = m.scratch.rotated_queries.get() + rotated_bytes;  // aligned as an allocation
    }
  }
  if (captured) m.layer_captured[layer] = 1;
  launch(ks::gather_views_kernel, dim3(1), ks::kStoreThreads, 0, s, m.view(), m.batch_of(ids), B,
         layer, m.scratch.views.get());
  if (m.p.rotates[KVC_KIND_KEY]) {
    m.rotate(queries, m.p.dtype, const_cast<void*>(q), m.p.dtype, true, rows, s);
  }
  if (m.p.tiles()) {  // the tensor-core kernel over tile blocks (16-byte aligned in the pool)
    attention_tiles(shape, plan, m.p.block_tokens, m.pool.get(), m.p.page_bytes,
                    m.scratch.views.get(), q, o, m.scratch.workspace.get(), stream);
  } else {
    attention_compressed(shape, plan, key, value, *m.attention_books[layer], m.pool.get(),
                         m.p.page_bytes, m.scratch.views.get(), q, o, m.scratch.workspace.get(),
                         stream);
  }
  if (m.p.rotates[KVC_KIND_VALUE]) m.rotate(o, m.p.dtype, out, m.p.dtype, true, rows, s);
}

StoreStats CudaStore::stats() const {
  const Impl& m = *impl_;
  const ks::Counters c = *m.mirror;
  StoreStats st;
  st.num_blocks = int64_t(c.num_blocks);
  st.block_bytes = int64_t(c.block_bytes);
  st.pages_in_use = int64_t(m.p.num_pages) - c.free_top;
  st.page_bytes = st.pages_in_use * m.p.page_bytes;
  // Uncompressed rows and tables are reserved in full for every live sequence: count what is
  // reserved.
  const int64_t layers = int64_t(m.live()) * m.p.num_layers;
  st.tail_bytes = layers * 2 * int64_t(m.dense_rows() * m.p.token_bytes());
  st.table_bytes =
      layers * int64_t(m.table_blocks) * m.p.num_heads * 2 * int64_t(sizeof(BlockLocation));
  st.dense_bytes = int64_t(c.tokens) * 2 * int64_t(m.p.token_bytes());
  for (const auto& b : m.books) {
    if (b) st.codebook_bytes += int64_t(b->serialized().size());
  }
  st.last_append_status = kvc_status(c.last_status);
  st.failed_appends = c.failed;
  return st;
}

std::vector<uint8_t> CudaStore::serialize(int32_t id) {
  Impl& m = *impl_;
  require_device(m.device, "the CUDA store");
  require_live(id);
  wait_for_device();
  SequenceImage image;
  std::vector<uint8_t> page(m.p.page_bytes);
  for (const ks::LayerState& st : m.download_states(m.slot_of(id))) {
    SequenceImage::Layer& out = image.layers.emplace_back();
    out.num_blocks = st.view.num_blocks;
    out.tail_tokens = st.view.tail_tokens;
    std::vector<BlockLocation> table(size_t(out.num_blocks) * m.p.num_heads * 2);
    copy_to_host(table.data(), st.view.blocks, table.size());
    for (size_t i = 0; i < table.size(); ++i) {
      if (i == 0 || table[i].page != table[i - 1].page) {  // each page once
        copy_to_host(page.data(), m.pool.get() + size_t(table[i].page) * m.p.page_bytes,
                     page.size());
      }
      const uint8_t* block = page.data() + table[i].offset;
      out.blocks.emplace_back(block, block + table[i].bytes);
    }
    const size_t sinks = size_t(st.view.sink_tokens) * m.p.token_bytes();
    const size_t tail = size_t(out.tail_tokens) * m.p.token_bytes();
    for (uint32_t kind = 0; kind < 2; ++kind) {
      const auto* src =
          static_cast<const uint8_t*>(kind == 0 ? st.view.dense_keys : st.view.dense_values);
      std::vector<uint8_t>& sink_rows = kind == 0 ? out.sink_k : out.sink_v;
      std::vector<uint8_t>& tail_rows = kind == 0 ? out.tail_k : out.tail_v;
      sink_rows.resize(sinks);
      tail_rows.resize(tail);
      copy_to_host(sink_rows.data(), src, sinks);
      copy_to_host(tail_rows.data(), src + sinks, tail);
    }
  }
  return serialize_image(m.p, m.books, image);
}

size_t CudaStore::serialized_size(int32_t id) {
  Impl& m = *impl_;
  require_device(m.device, "the CUDA store");
  require_live(id);
  require(!m.p.transcodes, KVC_ERROR_INTERNAL, "a store that transcodes knows a size by writing");
  wait_for_device();
  SerializedSize size(m.p, m.books.size());
  for (const ks::LayerState& st : m.download_states(m.slot_of(id))) {
    size.add_layer(st.view.sink_tokens, st.view.tail_tokens);
    std::vector<BlockLocation> table(size_t(st.view.num_blocks) * m.p.num_heads * 2);
    copy_to_host(table.data(), st.view.blocks, table.size());
    for (const BlockLocation& b : table) size.add_block(b.bytes);
  }
  return size.bytes();
}

int32_t CudaStore::restore(const uint8_t* data, size_t size) {
  Impl& m = *impl_;
  require_device(m.device, "the CUDA store");
  SequenceImage image = parse_image(m.p, m.books, data, size);
  const auto [slot, sid] = m.next_sequence();
  wait_for_device();
  ks::Counters c = m.counters.download(1)[0];
  const ks::Counters counters_before = c;
  // Next-fit on the host, over pages taken from the top of the free stack.
  struct Placed {
    uint32_t layer, rank, offset, bytes;
  };
  std::vector<Placed> placed;
  std::vector<std::pair<uint32_t, uint32_t>> open(m.p.num_layers);  // (rank, used) per layer
  uint32_t opened = 0;
  for (uint32_t l = 0; l < m.p.num_layers; ++l) {
    uint32_t used = m.p.page_bytes, rank = 0, offset;
    for (const auto& block : image.layers[l].blocks) {
      const uint32_t bytes = uint32_t(block.size());
      // parse_image keeps blocks below max_block_bytes, which fits a page; a block is copied
      // into one page, so this is what keeps it inside the page.
      require(bytes <= m.p.page_bytes, KVC_ERROR_INTERNAL, "a block of ", bytes,
              " bytes does not fit a page of ", m.p.page_bytes);
      if (place_next_fit(used, bytes, m.p.page_bytes, block_alignment(m.p.tiles()), offset)) {
        rank = opened++;
      }
      placed.push_back({l, rank, offset, bytes});
    }
    open[l] = {rank, used};
  }
  require(opened <= c.free_top, KVC_ERROR_OUT_OF_PAGES, "needs ", opened, " more pages of ",
          m.p.page_bytes, " bytes but ", c.free_top, " are free (nothing was restored)");
  std::vector<uint32_t> pages =
      opened ? m.free_pages.download(opened, c.free_top - opened) : std::vector<uint32_t>{};
  std::reverse(pages.begin(), pages.end());  // rank 0: the top of the stack
  std::vector<std::vector<uint8_t>> contents(opened, std::vector<uint8_t>(m.p.page_bytes));
  std::vector<std::vector<BlockLocation>> tables(m.p.num_layers);
  size_t i = 0;
  for (uint32_t l = 0; l < m.p.num_layers; ++l) {
    for (const auto& block : image.layers[l].blocks) {
      const Placed& at = placed[i++];
      std::copy(block.begin(), block.end(), contents[at.rank].begin() + at.offset);
      tables[l].push_back({pages[at.rank], at.offset, at.bytes});
      c.block_bytes += at.bytes;
    }
  }
  // What the slot's states, the layers' flags and the counters become, and were; then the
  // uploads, each a single copy, the slot's id last: a failure part-way puts back what it can
  // (a copy that fails here most likely found the CUDA context lost).
  const uint32_t L = m.p.num_layers;
  std::vector<ks::LayerState> states, empty;
  std::vector<uint32_t> compressed = m.layer_compressed.download(L);
  const std::vector<uint32_t> compressed_before = compressed;
  for (uint32_t l = 0; l < L; ++l) {
    const SequenceImage::Layer& in = image.layers[l];
    ks::LayerState& st = states.emplace_back(ks::LayerState{m.layout(slot, l), 0, 0});
    empty.push_back(st);
    st.view.num_blocks = in.num_blocks;
    st.view.sink_tokens = m.p.sinks_held(in.num_blocks);
    st.view.tail_tokens = in.tail_tokens;
    if (in.num_blocks > 0) {
      st.open_page = pages[open[l].first];
      st.open_used = open[l].second;
    }
    if (in.has_huffman) compressed[l] = 1;  // only blocks that name the codebooks freeze them
    c.num_blocks += tables[l].size();
    c.tokens += uint64_t(in.num_blocks) * m.p.block_tokens + in.tail_tokens;
  }
  c.free_top -= opened;
  try {
    for (uint32_t r = 0; r < opened; ++r) {
      copy_to_device(m.pool.get() + size_t(pages[r]) * m.p.page_bytes, contents[r].data(),
                     m.p.page_bytes, "cudaMemcpy (store upload)");
    }
    for (uint32_t l = 0; l < L; ++l) {  // the slot's own table and uncompressed rows
      const SequenceImage::Layer& in = image.layers[l];
      const SequenceView& v = states[l].view;
      copy_to_device(const_cast<BlockLocation*>(v.blocks), tables[l].data(),
                     tables[l].size() * sizeof(BlockLocation), "cudaMemcpy (store upload)");
      for (uint32_t kind = 0; kind < 2; ++kind) {  // the sinks, then the tail
        auto* dst =
            static_cast<uint8_t*>(const_cast<void*>(kind == 0 ? v.dense_keys : v.dense_values));
        const std::vector<uint8_t>& sinks = kind == 0 ? in.sink_k : in.sink_v;
        const std::vector<uint8_t>& tail = kind == 0 ? in.tail_k : in.tail_v;
        copy_to_device(dst, sinks.data(), sinks.size(), "cudaMemcpy (store upload)");
        copy_to_device(dst + sinks.size(), tail.data(), tail.size(), "cudaMemcpy (store upload)");
      }
    }
    m.states.upload(states.data(), L, size_t(slot) * L);
    m.layer_compressed.upload(compressed.data(), L);
    m.counters.upload(&c, 1);
    m.d_slot_ids.upload(&sid, 1, slot);
  } catch (...) {
    try {
      m.states.upload(empty.data(), L, size_t(slot) * L);
      m.layer_compressed.upload(compressed_before.data(), L);
      m.counters.upload(&counters_before, 1);
      const int32_t none = -1;
      m.d_slot_ids.upload(&none, 1, slot);
    } catch (...) {
    }
    (void)cudaGetLastError();
    throw;
  }
  *m.mirror = c;
  m.take_slot(slot, sid);
  return sid;
}

}  // namespace kvc::cuda
