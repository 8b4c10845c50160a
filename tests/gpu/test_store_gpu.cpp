// SPDX-License-Identifier: Apache-2.0
// The paged store on the CUDA backend: the model-based test of store_model.hpp through device
// copies on a non-default stream; the same serialized bytes as the CPU store for the same
// tokens; a decode step and attention captured in CUDA graphs and replayed; out of pages in the
// middle of a batch reported through the stats, changing nothing; no page leaks; and the
// configuration the CUDA store needs. A store of tile blocks (format t1): the model-based test
// with the tensor-core attention kernel, the same bytes as the CPU tiles store, AUTO choosing
// tiles.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gpu_test.hpp"
#include "store_model.hpp"
#include "test_support.hpp"

namespace kvc::test {
namespace {

bool cuda_ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  ADD_FAILURE() << what << ": " << cudaGetErrorString(e);
  return false;
}

// A device allocation that grows to the largest request; its contents are not kept.
class Scratch {
 public:
  void* get(size_t bytes) {
    if (!buffer_ || buffer_->bytes() < bytes) {
      buffer_.reset();
      buffer_ = std::make_unique<DeviceBuffer>(bytes);
      EXPECT_NE(buffer_->get(), nullptr) << "cudaMalloc of " << bytes << " bytes failed";
    }
    return buffer_->get();
  }

 private:
  std::unique_ptr<DeviceBuffer> buffer_;
};

// The CUDA backend for the model: host tensors copied to device buffers, every call on a
// stream of its own (non-blocking, so nothing is ordered by the legacy default stream), then
// that stream synchronized. Prefill and append report their data errors (out of pages, NaN,
// past max_sequence_tokens) only through the stats: a call that returned KVC_SUCCESS but
// raised failed_appends gives last_append_status.
class CudaStoreBackend final : public StoreBackend {
 public:
  explicit CudaStoreBackend(const Shape& shape) : shape_(shape) {
    cuda_ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~CudaStoreBackend() override {
    if (stream_) cudaStreamDestroy(stream_);
  }
  CudaStoreBackend(const CudaStoreBackend&) = delete;
  CudaStoreBackend& operator=(const CudaStoreBackend&) = delete;

  cudaStream_t stream() const { return stream_; }
  kvc_backend backend() const override { return KVC_BACKEND_CUDA; }

  kvc_status_t prefill(kvc_store_t s, int32_t id, int32_t first_layer, int32_t num_layers,
                       int32_t num_tokens, const uint16_t* h_keys,
                       const uint16_t* h_values) override {
    const size_t bytes = size_t(num_layers) * size_t(std::max(num_tokens, 0)) * row_bytes();
    void* d_keys = keys_.get(bytes);
    void* d_values = values_.get(bytes);
    if (!upload(d_keys, h_keys, bytes) || !upload(d_values, h_values, bytes)) {
      return KVC_ERROR_CUDA;
    }
    return with_data_status(s, [&] {
      return kvc_store_prefill(s, id, first_layer, num_layers, num_tokens, d_keys, d_values,
                               stream_);
    });
  }

  kvc_status_t append(kvc_store_t s, int32_t layer, const std::vector<int32_t>& ids,
                      const uint16_t* h_keys, const uint16_t* h_values) override {
    const size_t bytes = ids.size() * row_bytes();
    void* d_keys = keys_.get(bytes);
    void* d_values = values_.get(bytes);
    if (!upload(d_keys, h_keys, bytes) || !upload(d_values, h_values, bytes)) {
      return KVC_ERROR_CUDA;
    }
    return with_data_status(s, [&] {
      return kvc_store_append(s, layer, int32_t(ids.size()), ids.data(), d_keys, d_values, stream_);
    });
  }

  kvc_status_t read(kvc_store_t s, int32_t id, int32_t layer, int32_t capacity_tokens,
                    float* h_keys, float* h_values) override {
    const size_t bytes = size_t(std::max(capacity_tokens, 0)) * shape_.row() * sizeof(float);
    void* d_keys = read_keys_.get(bytes);
    void* d_values = read_values_.get(bytes);
    // Poisoned: an element the store does not write reads back as NaN.
    if (!cuda_ok(cudaMemsetAsync(d_keys, 0xFF, bytes, stream_), "cudaMemsetAsync") ||
        !cuda_ok(cudaMemsetAsync(d_values, 0xFF, bytes, stream_), "cudaMemsetAsync")) {
      return KVC_ERROR_CUDA;
    }
    const kvc_status_t st =
        kvc_store_read(s, id, layer, KVC_DTYPE_FP32, capacity_tokens, d_keys, d_values, stream_);
    if (st == KVC_SUCCESS &&
        (!download(h_keys, d_keys, bytes) || !download(h_values, d_values, bytes))) {
      return KVC_ERROR_CUDA;
    }
    return synchronize() ? st : KVC_ERROR_CUDA;
  }

  kvc_status_t attention(kvc_store_t s, int32_t layer, const std::vector<int32_t>& ids,
                         int32_t num_q_heads, float scale, const uint16_t* h_queries,
                         uint16_t* h_out) override {
    const size_t bytes = ids.size() * size_t(num_q_heads) * size_t(shape_.dim) * 2;
    void* d_queries = queries_.get(bytes);
    void* d_out = out_.get(bytes);
    if (!upload(d_queries, h_queries, bytes) ||
        !cuda_ok(cudaMemsetAsync(d_out, 0xFF, bytes, stream_), "cudaMemsetAsync")) {
      return KVC_ERROR_CUDA;
    }
    const kvc_status_t st = kvc_store_attention(s, layer, int32_t(ids.size()), ids.data(),
                                                num_q_heads, scale, d_queries, d_out, stream_);
    if (st == KVC_SUCCESS && !download(h_out, d_out, bytes)) return KVC_ERROR_CUDA;
    return synchronize() ? st : KVC_ERROR_CUDA;
  }

  kvc_status_t free_sequence(kvc_store_t s, int32_t id) override {
    const kvc_status_t st = kvc_store_free_sequence(s, id, stream_);
    return synchronize() ? st : KVC_ERROR_CUDA;
  }

 private:
  size_t row_bytes() const { return shape_.row() * 2; }
  bool upload(void* d, const void* h, size_t bytes) {
    return bytes == 0 ||
           cuda_ok(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, stream_), "upload");
  }
  bool download(void* h, const void* d, size_t bytes) {
    return bytes == 0 ||
           cuda_ok(cudaMemcpyAsync(h, d, bytes, cudaMemcpyDeviceToHost, stream_), "download");
  }
  bool synchronize() { return cuda_ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

  // The call's own status if it failed; else, once the stream has run it, the data status the
  // device recorded, if the call raised failed_appends.
  template <class Call>
  kvc_status_t with_data_status(kvc_store_t s, Call call) {
    const kvc_store_stats before = store_stats(s);  // exact: the stream is idle between calls
    const kvc_status_t st = call();
    if (!synchronize()) return KVC_ERROR_CUDA;
    if (st != KVC_SUCCESS) return st;
    const kvc_store_stats after = store_stats(s);
    if (after.failed_appends == before.failed_appends) return KVC_SUCCESS;
    EXPECT_EQ(after.failed_appends, before.failed_appends + 1) << "one call, one failure";
    EXPECT_NE(after.last_append_status, KVC_SUCCESS) << "a failure recorded as a success";
    return kvc_status_t(after.last_append_status);
  }

  Shape shape_;
  cudaStream_t stream_ = nullptr;
  Scratch keys_, values_, read_keys_, read_values_, queries_, out_;
};

// The smallest shape the CUDA attention takes: T = 32 (key groups of 32 elements: 32
// sub-streams), head_dim 64 (value groups of 64: 32 sub-streams), GQA group 2.
Shape gpu_shape(int32_t layers = 2) {
  Shape s;
  s.layers = layers;
  s.heads = 2;
  s.dim = 64;
  s.tokens = 32;
  s.group = 2;
  return s;
}

// The largest block of that shape is 32 + 32 * 64 * 2 = 4128 bytes: the smallest page holds
// 4352 bytes, and a page of 16640 (>= 4 * 4128) holds one block step of a sequence (K and V of
// both heads) whatever the data, so each such step takes exactly one new page.
constexpr int32_t kSmallestPage = 4352;
constexpr int32_t kStepPage = 16640;

kvc_store_config cuda_config(const Shape& sh, int64_t capacity, int32_t page_bytes,
                             int32_t max_sequences, int32_t max_sequence_tokens) {
  kvc_store_config c = store_config(sh, capacity, page_bytes);
  c.backend = KVC_BACKEND_CUDA;
  c.block_format = KVC_BLOCK_FORMAT_V1;  // (the tile tests below set TILES)
  c.max_sequences = max_sequences;
  c.max_sequence_tokens = max_sequence_tokens;
  return c;
}

// The fused kernel accumulates in fp32 (products, exp, running sums, split-KV merges) where
// the reference accumulates in double: over a few hundred tokens that is ~1e-5 of the value
// column's magnitude. 2e-3 leaves room for fast exp and merge order, and still fails a wrong
// block, token, head or scale, whose errors are of the order of the values themselves.
AttentionTolerance gpu_tolerance() { return {0.0, 2e-3}; }

ReadBack read_back(StoreBackend& be, kvc_store_t s, const Shape& sh, int32_t id, int32_t layer) {
  int32_t len = 0;
  EXPECT_EQ(kvc_store_sequence_length(s, id, layer, &len), KVC_SUCCESS) << kvc_last_error();
  ReadBack r{std::vector<float>(size_t(len) * sh.row()),
             std::vector<float>(size_t(len) * sh.row())};
  EXPECT_EQ(be.read(s, id, layer, len, r.k.data(), r.v.data()), KVC_SUCCESS) << kvc_last_error();
  return r;
}

class StoreGpu : public GpuTest {};

// The model-based run of a v1 store: about 36 block steps of one layer fit in the pool, so
// exhaustion comes early and often; prefills complete a few blocks at once.
ModelParams gpu_model_params(uint32_t seed, int steps) {
  ModelParams mp;
  mp.shape = gpu_shape();
  mp.page_bytes = 2 * kSmallestPage;
  mp.capacity_bytes = 32 * int64_t(mp.page_bytes);
  mp.max_sequences = 24;
  mp.max_sequence_tokens = 160;
  mp.max_prefill_tokens = 80;
  mp.steps = steps;
  mp.seed = seed;
  mp.tolerance = gpu_tolerance();
  mp.block_format = KVC_BLOCK_FORMAT_V1;
  return mp;
}

void run_gpu_model(const ModelParams& mp) {
  CudaStoreBackend cuda(mp.shape);
  run_model(cuda, mp);
}

TEST_F(StoreGpu, ModelBasedRandomOperations) { run_gpu_model(gpu_model_params(2025, 400)); }

// A rotating store (kvc_store_config.rotation): the GPU rounds the rotated queries and the
// rotated outputs to fp16 (the CPU keeps them in fp32): about 2^-11 of each, which the scores
// amplify by |q| |k| scale; 1e-2 of the value column still fails a query or output left
// unrotated, whose errors are of the order of the values.
AttentionTolerance rotated_gpu_tolerance() { return {0.0, 1e-2}; }

// With rotation = KVC_ROTATION_HADAMARD the CUDA store rotates the rows on the device with the
// arithmetic of the CPU store: the blocks, tails and so the bytes are the same. With sink_tokens,
// both keep the same sinks; with layer_scales, both encode each layer with its own bounds (the
// CUDA store's per-layer device codecs, the codebooks it takes per layer). long_prefill: a second
// sequence prefilled with that many tokens, and the pages in use compared too.
void serializes_like_the_cpu_store(int32_t rotation, int32_t sinks = 0, bool layer_scales = false,
                                   int32_t long_prefill = 0) {
  const Shape sh = gpu_shape();
  std::vector<float> key_scales(size_t(sh.layers)), value_scales(size_t(sh.layers));
  for (size_t l = 0; l < key_scales.size(); ++l) {
    key_scales[l] = 0.5f + 0.75f * float(l);
    value_scales[l] = 2.0f - 0.5f * float(l);
  }
  const int32_t max_tokens = long_prefill > 0 ? long_prefill + 64 : 1024;
  const int64_t capacity = long_prefill > 0 ? 24 << 20 : 8 << 20;
  kvc_store_config on_cpu = cuda_config(sh, capacity, 0, 8, max_tokens);
  kvc_store_config on_gpu = cuda_config(sh, capacity, 0, 8, max_tokens);
  on_cpu.backend = KVC_BACKEND_CPU;
  for (kvc_store_config* c : {&on_cpu, &on_gpu}) {
    c->rotation = rotation;
    c->sink_tokens = sinks;
    if (layer_scales) {
      c->key_layer_scales = key_scales.data();
      c->value_layer_scales = value_scales.data();
    }
  }
  StoreHandle host(on_cpu), device(on_gpu);
  ASSERT_NE(host.s, nullptr);
  ASSERT_NE(device.s, nullptr);
  CpuStoreBackend cpu;
  CudaStoreBackend gpu(sh);
  std::mt19937 rng(41);
  std::vector<int32_t> lengths = {100, 31, 64, 1, 0};
  if (long_prefill > 0) lengths.insert(lengths.begin() + 1, long_prefill);
  std::vector<int32_t> host_ids(lengths.size()), device_ids(lengths.size());
  for (size_t i = 0; i < lengths.size(); ++i) {
    ASSERT_EQ(kvc_store_add_sequence(host.s, &host_ids[i]), KVC_SUCCESS);
    ASSERT_EQ(kvc_store_add_sequence(device.s, &device_ids[i]), KVC_SUCCESS);
    const size_t n = size_t(lengths[i]);
    const Rows k = random_rows(rng, n * size_t(sh.layers), sh);
    const Rows v = random_rows(rng, n * size_t(sh.layers), sh);
    ASSERT_EQ(
        cpu.prefill(host.s, host_ids[i], 0, sh.layers, lengths[i], k.bits.data(), v.bits.data()),
        KVC_SUCCESS)
        << kvc_last_error();
    if (i == 0) {
      // The CPU store built its codebooks from this prefill: the CUDA store takes the same.
      for (int layer = 0; layer < sh.layers; ++layer) {
        for (kvc_kind kind : {KVC_KIND_KEY, KVC_KIND_VALUE}) {
          kvc_codebook_t book = nullptr;
          ASSERT_EQ(kvc_store_get_codebook(host.s, layer, kind, &book), KVC_SUCCESS);
          ASSERT_NE(book, nullptr);
          EXPECT_EQ(kvc_store_set_codebook(device.s, layer, kind, book), KVC_SUCCESS)
              << kvc_last_error();
          kvc_codebook_destroy(book);
        }
      }
    }
    ASSERT_EQ(gpu.prefill(device.s, device_ids[i], 0, sh.layers, lengths[i], k.bits.data(),
                          v.bits.data()),
              KVC_SUCCESS)
        << kvc_last_error();
  }
  // Decode steps of every sequence and layer, across block boundaries.
  for (int step = 0; step < 40; ++step) {
    for (int layer = 0; layer < sh.layers; ++layer) {
      const Rows k = random_rows(rng, lengths.size(), sh), v = random_rows(rng, lengths.size(), sh);
      ASSERT_EQ(cpu.append(host.s, layer, host_ids, k.bits.data(), v.bits.data()), KVC_SUCCESS);
      ASSERT_EQ(gpu.append(device.s, layer, device_ids, k.bits.data(), v.bits.data()), KVC_SUCCESS)
          << "step " << step << " layer " << layer << ": " << kvc_last_error();
    }
  }
  for (size_t i = 0; i < lengths.size(); ++i) {
    std::vector<uint8_t> bytes[2];
    const kvc_store_t stores[2] = {host.s, device.s};
    const int32_t ids[2] = {host_ids[i], device_ids[i]};
    for (int b = 0; b < 2; ++b) {
      ASSERT_NO_FATAL_FAILURE(serialize_sequence(stores[b], ids[b], bytes[b]));
    }
    EXPECT_EQ(bytes[1], bytes[0]) << "sequence " << i << " (prefill of " << lengths[i]
                                  << " tokens, then 40 decode steps)";
  }
  const kvc_store_stats a = store_stats(host.s), b = store_stats(device.s);
  EXPECT_EQ(b.num_blocks, a.num_blocks);
  EXPECT_EQ(b.block_bytes, a.block_bytes);
  EXPECT_EQ(b.dense_bytes, a.dense_bytes);
  if (long_prefill > 0) EXPECT_EQ(b.pages_in_use, a.pages_in_use);
  EXPECT_EQ(b.failed_appends, 0);
  // The reads agree too (fp32: decoded, rotated back, with the same arithmetic).
  for (size_t i = 0; i < lengths.size(); ++i) {
    for (int layer = 0; layer < sh.layers; ++layer) {
      const ReadBack x = read_back(cpu, host.s, sh, host_ids[i], layer);
      const ReadBack y = read_back(gpu, device.s, sh, device_ids[i], layer);
      EXPECT_EQ(y.k, x.k) << "sequence " << i << " layer " << layer;
      EXPECT_EQ(y.v, x.v) << "sequence " << i << " layer " << layer;
    }
  }
}

TEST_F(StoreGpu, SerializesToTheSameBytesAsTheCpuStore) {
  serializes_like_the_cpu_store(KVC_ROTATION_NONE);
}

// A prefill of 2,600 tokens: 81 blocks x 2 heads x K|V, 324 placements per layer, which the
// commit kernel places with the whole thread block (place_by_block) rather than one thread.
// 9,000 tokens: 281 blocks x 2 heads x K|V = 1,124 placements, two chunks of the commit kernel's
// block-wide placement.
TEST_F(StoreGpu, LongPrefillSerializesAndReadsAsTheCpuStore) {
  serializes_like_the_cpu_store(KVC_ROTATION_NONE, 0, false, 9000);
}

TEST_F(StoreGpu, RotatedStoreSerializesAndReadsAsTheCpuStore) {
  serializes_like_the_cpu_store(KVC_ROTATION_HADAMARD);
}

TEST_F(StoreGpu, StoreRotatingValuesSerializesAndReadsAsTheCpuStore) {
  serializes_like_the_cpu_store(KVC_ROTATION_HADAMARD_VALUES);
}

TEST_F(StoreGpu, StoreRotatingValuesModelBasedRandomOperations) {
  ModelParams mp = gpu_model_params(2029, 150);
  mp.tolerance = rotated_gpu_tolerance();
  mp.rotation = KVC_ROTATION_HADAMARD_VALUES;
  run_gpu_model(mp);
}

TEST_F(StoreGpu, StoreWithSinksModelBasedRandomOperations) {
  ModelParams mp = gpu_model_params(2030, 150);
  mp.sink_tokens = 7;
  run_gpu_model(mp);
}

TEST_F(StoreGpu, StoreWithSinksSerializesAndReadsAsTheCpuStore) {
  serializes_like_the_cpu_store(KVC_ROTATION_NONE, 5);
}

TEST_F(StoreGpu, StoreWithLayerScalesSerializesAndReadsAsTheCpuStore) {
  serializes_like_the_cpu_store(KVC_ROTATION_NONE, 0, true);
}

void decode_step_and_attention_graphs(int32_t rotation) {
  const Shape sh = gpu_shape();
  const bool rotated = rotation != KVC_ROTATION_NONE;
  const AttentionTolerance tol = rotated ? rotated_gpu_tolerance() : gpu_tolerance();
  kvc_store_config config = cuda_config(sh, 16 << 20, 0, 8, 1024);
  config.rotation = rotation;
  StoreHandle store(config);
  ASSERT_NE(store.s, nullptr);
  CudaStoreBackend be(sh);
  const cudaStream_t stream = be.stream();
  Shadow shadow{sh, {}, {}};
  std::mt19937 rng(51);
  const std::vector<size_t> prefill = {40, 63, 64, 100};
  std::vector<int32_t> ids;
  for (size_t n : prefill) {
    int32_t id;
    ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
    shadow.add_sequence(id);
    ids.push_back(id);
    const Rows k = random_rows(rng, n * size_t(sh.layers), sh);
    const Rows v = random_rows(rng, n * size_t(sh.layers), sh);
    ASSERT_EQ(be.prefill(store.s, id, 0, sh.layers, int32_t(n), k.bits.data(), v.bits.data()),
              KVC_SUCCESS)
        << kvc_last_error();
    for (int l = 0; l < sh.layers; ++l) shadow.append(id, l, k, v, size_t(l) * n, n);
  }
  const size_t batch = ids.size(), step_bytes = batch * sh.row() * 2;
  // An uncaptured decode step of the same batch sizes the scratch memory (the layers have their
  // codebooks from the prefills).
  for (int l = 0; l < sh.layers; ++l) {
    const Rows k = random_rows(rng, batch, sh), v = random_rows(rng, batch, sh);
    ASSERT_EQ(be.append(store.s, l, ids, k.bits.data(), v.bits.data()), KVC_SUCCESS)
        << kvc_last_error();
    for (size_t b = 0; b < batch; ++b) shadow.append(ids[b], l, k, v, b, 1);
  }

  // One decode step of every layer, captured: [layers, batch, heads, dim] inputs on the device.
  DeviceBuffer d_keys(size_t(sh.layers) * step_bytes), d_values(size_t(sh.layers) * step_bytes);
  const auto layer_keys = [&](int l) { return d_keys.get<char>() + size_t(l) * step_bytes; };
  const auto layer_values = [&](int l) { return d_values.get<char>() + size_t(l) * step_bytes; };
  Graph step;
  KVC_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  std::vector<kvc_status_t> captured;
  for (int l = 0; l < sh.layers; ++l) {
    captured.push_back(kvc_store_append(store.s, l, int32_t(batch), ids.data(), layer_keys(l),
                                        layer_values(l), stream));
  }
  const cudaError_t ended = cudaStreamEndCapture(stream, &step.graph);
  for (int l = 0; l < sh.layers; ++l) {
    ASSERT_EQ(captured[size_t(l)], KVC_SUCCESS) << "layer " << l << ": " << kvc_last_error();
  }
  ASSERT_EQ(ended, cudaSuccess) << cudaGetErrorString(ended);
  KVC_CUDA_CHECK(cudaGraphInstantiate(&step.exec, step.graph, 0));
  const kvc_store_stats before = store_stats(store.s);

  // Each replay appends one token to every sequence and layer at its current length; the inputs
  // are rewritten between replays, outside the graph, in stream order.
  std::vector<Rows> sent;  // host rows kept until the stream has copied them
  const auto replay = [&](int times) {
    for (int r = 0; r < times; ++r) {
      for (int l = 0; l < sh.layers; ++l) {
        Rows k = random_rows(rng, batch, sh), v = random_rows(rng, batch, sh);
        KVC_CUDA_CHECK(cudaMemcpyAsync(layer_keys(l), k.bits.data(), step_bytes,
                                       cudaMemcpyHostToDevice, stream));
        KVC_CUDA_CHECK(cudaMemcpyAsync(layer_values(l), v.bits.data(), step_bytes,
                                       cudaMemcpyHostToDevice, stream));
        for (size_t b = 0; b < batch; ++b) shadow.append(ids[b], l, k, v, b, 1);
        sent.push_back(std::move(k));
        sent.push_back(std::move(v));
      }
      KVC_CUDA_CHECK(cudaGraphLaunch(step.exec, stream));
    }
    KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
  };
  const int replays = 40;  // every sequence crosses a block boundary: pages allocated in-graph
  ASSERT_NO_FATAL_FAILURE(replay(replays));
  const kvc_store_stats after = store_stats(store.s);
  EXPECT_EQ(after.failed_appends, before.failed_appends);
  EXPECT_EQ(after.last_append_status, KVC_SUCCESS);
  for (size_t b = 0; b < batch; ++b) {
    for (int l = 0; l < sh.layers; ++l) {
      int32_t len = -1;
      ASSERT_EQ(kvc_store_sequence_length(store.s, ids[b], l, &len), KVC_SUCCESS);
      EXPECT_EQ(size_t(len), prefill[b] + 1 + replays) << "sequence " << ids[b] << " layer " << l;
    }
  }
  ASSERT_NO_FATAL_FAILURE(
      check_against_shadow(be, store.s, shadow, rng, "after the replays", tol, rotation));

  // Attention of the last layer, captured, then replayed before and after more decode steps:
  // the graph reads the sequences as they are when it runs.
  const int32_t layer = sh.layers - 1, q_heads = sh.heads * sh.group;
  const float scale = 1.0f / std::sqrt(float(sh.dim));
  const Rows q = random_rows(rng, batch * size_t(sh.group), sh);
  DeviceBuffer d_q(q.bits.size() * 2), d_out(q.bits.size() * 2);
  d_q.upload(q.bits.data(), d_q.bytes());
  Graph attend;
  KVC_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const kvc_status_t attention_status = kvc_store_attention(
      store.s, layer, int32_t(batch), ids.data(), q_heads, scale, d_q.get(), d_out.get(), stream);
  const cudaError_t attention_ended = cudaStreamEndCapture(stream, &attend.graph);
  ASSERT_EQ(attention_status, KVC_SUCCESS) << kvc_last_error();
  ASSERT_EQ(attention_ended, cudaSuccess) << cudaGetErrorString(attention_ended);
  KVC_CUDA_CHECK(cudaGraphInstantiate(&attend.exec, attend.graph, 0));
  for (int round = 0; round < 2; ++round) {
    if (round == 1) {
      ASSERT_NO_FATAL_FAILURE(replay(9));
    }
    KVC_CUDA_CHECK(cudaMemsetAsync(d_out.get(), 0xFF, d_out.bytes(), stream));
    KVC_CUDA_CHECK(cudaGraphLaunch(attend.exec, stream));
    KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
    const auto out = d_out.download<uint16_t>(q.bits.size());
    std::vector<ReadBack> kv;
    for (int32_t id : ids) kv.push_back(read_back(be, store.s, sh, id, layer));
    ASSERT_NO_FATAL_FAILURE(check_attention(
        sh, kv, q, out, scale, tol, "attention graph, round " + std::to_string(round), ids));
  }
  ASSERT_NO_FATAL_FAILURE(
      check_against_shadow(be, store.s, shadow, rng, "after all replays", tol, rotated));
}

TEST_F(StoreGpu, DecodeStepAndAttentionReplayFromCudaGraphs) {
  decode_step_and_attention_graphs(KVC_ROTATION_NONE);
}

TEST_F(StoreGpu, RotatedStoreDecodeStepAndAttentionReplayFromCudaGraphs) {
  decode_step_and_attention_graphs(KVC_ROTATION_HADAMARD);
}

TEST_F(StoreGpu, RotatedStoreModelBasedRandomOperations) {
  ModelParams mp = gpu_model_params(2027, 200);
  mp.tolerance = rotated_gpu_tolerance();
  mp.rotation = KVC_ROTATION_HADAMARD;
  run_gpu_model(mp);
}

TEST_F(StoreGpu, RotatedStoreRejectsARowPastFp16AndChangesNothing) {
  // 60000 in every channel: finite, but its first rotated element is 60000 * 8 (the CPU store
  // rejects it the same way). On CUDA the append reports it through the stats.
  const Shape sh = gpu_shape(1);
  kvc_store_config config = cuda_config(sh, 8 << 20, 0, 4, 256);
  config.rotation = KVC_ROTATION_HADAMARD;
  StoreHandle store(config);
  CudaStoreBackend be(sh);
  int32_t id = -1;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  std::vector<uint16_t> big(sh.row(), format::float_to_half(60000.0f)), zero(sh.row(), 0);
  EXPECT_EQ(be.append(store.s, 0, {id}, big.data(), zero.data()), KVC_ERROR_NONFINITE_INPUT);
  int32_t len = -1;
  ASSERT_EQ(kvc_store_sequence_length(store.s, id, 0, &len), KVC_SUCCESS);
  EXPECT_EQ(len, 0);
}

TEST_F(StoreGpu, OutOfPagesInTheMiddleOfABatchIsReportedAndChangesNothing) {
  const Shape sh = gpu_shape(1);
  StoreHandle store(cuda_config(sh, 4 * int64_t(kStepPage), kStepPage, 8, 256));
  ASSERT_NE(store.s, nullptr);
  CudaStoreBackend be(sh);
  Shadow shadow{sh, {}, {}};
  std::mt19937 rng(61);
  // A first sequence of two blocks builds the layer's codebooks; freed, it returns its pages.
  int32_t primer;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &primer), KVC_SUCCESS);
  const Rows pk = random_rows(rng, 64, sh), pv = random_rows(rng, 64, sh);
  ASSERT_EQ(be.prefill(store.s, primer, 0, 1, 64, pk.bits.data(), pv.bits.data()), KVC_SUCCESS)
      << kvc_last_error();
  ASSERT_EQ(be.free_sequence(store.s, primer), KVC_SUCCESS);
  EXPECT_EQ(store_stats(store.s).pages_in_use, 0);
  // Six sequences one token short of a block: the next step compresses a block for each.
  std::vector<int32_t> ids(6);
  for (int32_t& id : ids) {
    ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
    shadow.add_sequence(id);
    const Rows k = random_rows(rng, 31, sh), v = random_rows(rng, 31, sh);
    ASSERT_EQ(be.prefill(store.s, id, 0, 1, 31, k.bits.data(), v.bits.data()), KVC_SUCCESS);
    shadow.append(id, 0, k, v, 0, 31);
  }
  const auto before = snapshot(store.s, shadow);
  const kvc_store_stats stats_before = store_stats(store.s);
  const Rows k = random_rows(rng, ids.size(), sh), v = random_rows(rng, ids.size(), sh);
  DeviceBuffer d_k(k.bits.size() * 2), d_v(v.bits.size() * 2);
  d_k.upload(k.bits.data(), d_k.bytes());
  d_v.upload(v.bits.data(), d_v.bytes());
  // Six pages needed, four free: found on the device, so the call itself succeeds.
  EXPECT_EQ(kvc_store_append(store.s, 0, int32_t(ids.size()), ids.data(), d_k.get(), d_v.get(),
                             be.stream()),
            KVC_SUCCESS)
      << kvc_last_error();
  KVC_CUDA_CHECK(cudaStreamSynchronize(be.stream()));
  const kvc_store_stats failed = store_stats(store.s);
  EXPECT_EQ(failed.last_append_status, KVC_ERROR_OUT_OF_PAGES);
  EXPECT_EQ(failed.failed_appends, stats_before.failed_appends + 1);
  EXPECT_EQ(snapshot(store.s, shadow), before) << "a failed append changed the store";
  ASSERT_NO_FATAL_FAILURE(
      check_against_shadow(be, store.s, shadow, rng, "after the failed step", gpu_tolerance()));
  // The first four fit, a page each.
  EXPECT_EQ(kvc_store_append(store.s, 0, 4, ids.data(), d_k.get(), d_v.get(), be.stream()),
            KVC_SUCCESS)
      << kvc_last_error();
  KVC_CUDA_CHECK(cudaStreamSynchronize(be.stream()));
  const kvc_store_stats fitted = store_stats(store.s);
  EXPECT_EQ(fitted.last_append_status, KVC_SUCCESS);
  EXPECT_EQ(fitted.failed_appends, failed.failed_appends);
  EXPECT_EQ(fitted.pages_in_use, 4);
  for (size_t b = 0; b < 4; ++b) shadow.append(ids[b], 0, k, v, b, 1);
  ASSERT_NO_FATAL_FAILURE(
      check_against_shadow(be, store.s, shadow, rng, "after the four", gpu_tolerance()));
}

TEST_F(StoreGpu, FreeingReturnsEveryPage) {
  const Shape sh = gpu_shape(1);
  const int32_t max_live = 64;
  StoreHandle store(cuda_config(sh, 48 * int64_t(kStepPage), kStepPage, max_live, 32768));
  ASSERT_NE(store.s, nullptr);
  CudaStoreBackend be(sh);  // for its stream
  const cudaStream_t stream = be.stream();
  std::mt19937 rng(71);
  // Token rows on the device, uploaded once; each call reads a window at a random offset.
  const size_t pool_rows = 4096, row_bytes = sh.row() * 2;
  const Rows rows = random_rows(rng, pool_rows, sh);
  DeviceBuffer d_rows(rows.bits.size() * 2);
  d_rows.upload(rows.bits.data(), d_rows.bytes());
  const auto window = [&](size_t n) {
    return d_rows.get<char>() + (rng() % (pool_rows - n + 1)) * row_bytes;
  };
  std::vector<int32_t> live;
  int64_t most_pages = 0;
  int32_t failures = 0;
  for (int op = 0; op < 4000; ++op) {
    const uint32_t r = rng() % 16;
    if (live.empty() || (r < 2 && live.size() < size_t(max_live))) {
      int32_t id;
      ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS) << kvc_last_error();
      live.push_back(id);
    } else if (r == 2) {
      const size_t i = rng() % live.size();
      ASSERT_EQ(kvc_store_free_sequence(store.s, live[i], stream), KVC_SUCCESS) << kvc_last_error();
      live.erase(live.begin() + long(i));
    } else {
      std::vector<int32_t> batch;
      for (int32_t id : live) {
        if (rng() % 2) batch.push_back(id);
      }
      if (batch.empty()) continue;
      ASSERT_EQ(kvc_store_append(store.s, 0, int32_t(batch.size()), batch.data(),
                                 window(batch.size()), window(batch.size()), stream),
                KVC_SUCCESS)
          << kvc_last_error();
    }
    if (op % 100 == 99) {
      KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
      const kvc_store_stats st = store_stats(store.s);
      most_pages = std::max(most_pages, st.pages_in_use);
      failures = st.failed_appends;
      ASSERT_TRUE(st.failed_appends == 0 || st.last_append_status == KVC_SUCCESS ||
                  st.last_append_status == KVC_ERROR_OUT_OF_PAGES)
          << "op " << op << ": " << kvc_status_string(kvc_status_t(st.last_append_status));
    }
  }
  for (int32_t id : live) {
    ASSERT_EQ(kvc_store_free_sequence(store.s, id, stream), KVC_SUCCESS) << kvc_last_error();
  }
  KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
  kvc_store_stats st = store_stats(store.s);
  EXPECT_EQ(st.pages_in_use, 0);
  EXPECT_EQ(st.num_sequences, 0);
  EXPECT_GT(most_pages, st.pages_total / 2) << "the pool was never under pressure";
  EXPECT_GT(failures, 0) << "the pool never ran out";

  // Every page is usable again: fill the whole pool with one sequence, a block at a time.
  int32_t id;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
  const int32_t failed_before = st.failed_appends;
  for (int i = 0; i < 10000 && st.failed_appends == failed_before; ++i) {
    ASSERT_EQ(kvc_store_prefill(store.s, id, 0, 1, sh.tokens, window(size_t(sh.tokens)),
                                window(size_t(sh.tokens)), stream),
              KVC_SUCCESS)
        << kvc_last_error();
    KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
    st = store_stats(store.s);
  }
  EXPECT_EQ(st.last_append_status, KVC_ERROR_OUT_OF_PAGES);
  EXPECT_EQ(st.pages_in_use, st.pages_total);
}

TEST_F(StoreGpu, TheCudaStoreNeedsSequenceLimits) {
  const Shape sh = gpu_shape();
  kvc_store_t s = nullptr;
  kvc_store_config c = cuda_config(sh, 1 << 20, 0, 0, 1024);
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(last_error_names("max_sequences")) << kvc_last_error();
  c = cuda_config(sh, 1 << 20, 0, 8, 0);
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(last_error_names("max_sequence_tokens")) << kvc_last_error();
  EXPECT_EQ(s, nullptr);
  c = cuda_config(sh, 1 << 20, 0, 8, 1024);
  ASSERT_EQ(kvc_store_create(&c, &s), KVC_SUCCESS) << kvc_last_error();
  kvc_store_destroy(s);
}

// A prefill of more tokens than a sequence may hold is refused on the host, before the store
// sizes its scratch memory for it (the device checks the length with the sequence's tokens; a
// scratch sized for 2^30 tokens fails to allocate, which must not leave the scratch half
// replaced either); the store then works as before.
TEST_F(StoreGpu, APrefillPastTheSequenceLimitIsRefusedBeforeAnyAllocation) {
  const Shape sh = gpu_shape();
  StoreHandle store(cuda_config(sh, 1 << 20, 0, 8, 1024));
  ASSERT_NE(store.s, nullptr);
  std::mt19937 rng(83);
  const Rows rows = random_rows(rng, size_t(sh.layers) * sh.tokens, sh);
  DeviceBuffer d_rows(rows.bits.size() * 2);
  d_rows.upload(rows.bits.data(), d_rows.bytes());
  int32_t id = -1;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS) << kvc_last_error();
  for (int32_t n : {1025, 1 << 30}) {
    EXPECT_EQ(kvc_store_prefill(store.s, id, 0, sh.layers, n, d_rows.get<char>(),
                                d_rows.get<char>(), nullptr),
              KVC_ERROR_INVALID_ARGUMENT);
    EXPECT_TRUE(last_error_names("max_sequence_tokens = 1024")) << kvc_last_error();
  }
  ASSERT_EQ(kvc_store_prefill(store.s, id, 0, sh.layers, sh.tokens, d_rows.get<char>(),
                              d_rows.get<char>(), nullptr),
            KVC_SUCCESS)
      << kvc_last_error();
  int32_t length = -1;
  ASSERT_EQ(kvc_store_sequence_length(store.s, id, 1, &length), KVC_SUCCESS) << kvc_last_error();
  EXPECT_EQ(length, sh.tokens);
  EXPECT_EQ(store_stats(store.s).failed_appends, 0);
}

// Host memory where the store takes device pointers: pageable memory is refused before any
// launch on a GPU that cannot read it (a kernel faulting on it would end the process's CUDA
// context), and the store goes on working; pinned memory, which every GPU reads, is taken.
TEST_F(StoreGpu, HostMemoryIsRefusedWhereTheGpuCannotReadIt) {
  const Shape sh = gpu_shape();
  StoreHandle store(cuda_config(sh, 1 << 20, 0, 8, 1024));
  ASSERT_NE(store.s, nullptr);
  std::mt19937 rng(84);
  const Rows rows = random_rows(rng, size_t(sh.layers) * sh.tokens, sh);
  std::vector<uint16_t> host(rows.bits);
  DeviceBuffer d_rows(rows.bits.size() * 2);
  d_rows.upload(rows.bits.data(), d_rows.bytes());
  int32_t id = -1;
  ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS) << kvc_last_error();
  const int32_t q_heads = sh.heads * sh.group;
  const size_t q_elems = size_t(q_heads) * sh.dim, row_elems = size_t(sh.tokens) * sh.row();
  DeviceBuffer d_q(q_elems * 2), d_out(q_elems * 2), d_read(row_elems * 4);
  KVC_CUDA_CHECK(cudaMemset(d_q.get(), 0, d_q.bytes()));
  if (reads_pageable_memory()) {
    std::printf("this GPU reads pageable host memory: the refusals are not tested\n");
  } else {
    EXPECT_EQ(kvc_store_prefill(store.s, id, 0, sh.layers, sh.tokens, host.data(),
                                d_rows.get<char>(), nullptr),
              KVC_ERROR_INVALID_ARGUMENT);
    EXPECT_TRUE(last_error_names("keys is host memory")) << kvc_last_error();
    EXPECT_EQ(kvc_store_append(store.s, 0, 1, &id, d_rows.get<char>(), host.data(), nullptr),
              KVC_ERROR_INVALID_ARGUMENT);
    EXPECT_TRUE(last_error_names("values is host memory")) << kvc_last_error();
  }
  ASSERT_EQ(kvc_store_prefill(store.s, id, 0, sh.layers, sh.tokens, d_rows.get<char>(),
                              d_rows.get<char>(), nullptr),
            KVC_SUCCESS)
      << kvc_last_error();
  if (!reads_pageable_memory()) {
    std::vector<uint16_t> host_out(q_elems);
    EXPECT_EQ(kvc_store_attention(store.s, 0, 1, &id, q_heads, 0.25f, d_q.get<char>(),
                                  host_out.data(), nullptr),
              KVC_ERROR_INVALID_ARGUMENT);
    EXPECT_TRUE(last_error_names("out is host memory")) << kvc_last_error();
    std::vector<float> host_rows(row_elems);
    EXPECT_EQ(kvc_store_read(store.s, id, 0, KVC_DTYPE_FP32, sh.tokens, d_read.get<char>(),
                             host_rows.data(), nullptr),
              KVC_ERROR_INVALID_ARGUMENT);
    EXPECT_TRUE(last_error_names("values is host memory")) << kvc_last_error();
  }
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  int32_t length = -1;
  ASSERT_EQ(kvc_store_sequence_length(store.s, id, 1, &length), KVC_SUCCESS) << kvc_last_error();
  EXPECT_EQ(length, sh.tokens);
  // Device outputs, then pinned host ones (attention's output, read's values): the same bytes.
  DeviceBuffer d_read_v(row_elems * 4);
  ASSERT_EQ(kvc_store_attention(store.s, 0, 1, &id, q_heads, 0.25f, d_q.get<char>(),
                                d_out.get<char>(), nullptr),
            KVC_SUCCESS)
      << kvc_last_error();
  ASSERT_EQ(kvc_store_read(store.s, id, 0, KVC_DTYPE_FP32, sh.tokens, d_read.get<char>(),
                           d_read_v.get<char>(), nullptr),
            KVC_SUCCESS)
      << kvc_last_error();
  KVC_CUDA_CHECK(cudaDeviceSynchronize());
  void *pinned_out = nullptr, *pinned_read = nullptr;
  KVC_CUDA_CHECK(cudaMallocHost(&pinned_out, q_elems * 2));
  KVC_CUDA_CHECK(cudaMallocHost(&pinned_read, row_elems * 4));
  EXPECT_EQ(
      kvc_store_attention(store.s, 0, 1, &id, q_heads, 0.25f, d_q.get<char>(), pinned_out, nullptr),
      KVC_SUCCESS)
      << kvc_last_error();
  EXPECT_EQ(kvc_store_read(store.s, id, 0, KVC_DTYPE_FP32, sh.tokens, d_read.get<char>(),
                           pinned_read, nullptr),
            KVC_SUCCESS)
      << kvc_last_error();
  KVC_CUDA_CHECK(cudaDeviceSynchronize());
  const auto out = d_out.download<uint16_t>(q_elems);
  const auto values = d_read_v.download<float>(row_elems);
  EXPECT_EQ(std::memcmp(out.data(), pinned_out, q_elems * 2), 0) << "attention into pinned memory";
  EXPECT_EQ(std::memcmp(values.data(), pinned_read, row_elems * 4), 0) << "read into pinned memory";
  cudaFreeHost(pinned_out);
  cudaFreeHost(pinned_read);
  EXPECT_EQ(store_stats(store.s).failed_appends, 0);
}

// ---- Tile blocks (format t1) -------------------------------------------------------------------

// A shape the tile attention kernel takes: 64-token blocks of head_dim 64 (largest tile block
// align16(32 + 4 * 4) + 64 * 64 * 2 = 8240 bytes, in pages of 8448).
Shape tile_gpu_shape() {
  Shape s = gpu_shape();
  s.tokens = 64;
  return s;
}
constexpr int32_t kTilePage = 8448;

// The tile kernel rounds the step-scaled query and the probabilities to fp16 (the MMA's inputs):
// errors of a few 1e-3 of the value column's magnitude, where a wrong block, token or head is
// off by the values themselves.
AttentionTolerance tile_gpu_tolerance() { return {0.0, 1e-2}; }

kvc_store_config tile_cuda_config(const Shape& sh, int64_t capacity, int32_t page_bytes,
                                  int32_t max_sequences, int32_t max_sequence_tokens) {
  kvc_store_config c = cuda_config(sh, capacity, page_bytes, max_sequences, max_sequence_tokens);
  c.block_format = KVC_BLOCK_FORMAT_TILES;
  return c;
}

TEST_F(StoreGpu, TileStoreShapesAndAuto) {
  const Shape sh = tile_gpu_shape();
  kvc_store_t s = nullptr;
  kvc_store_config c = tile_cuda_config(sh, 1 << 22, 0, 4, 1024);
  ASSERT_EQ(kvc_store_create(&c, &s), KVC_SUCCESS) << kvc_last_error();
  kvc_store_destroy(s);
  // Shapes without a tile kernel: TILES refused, AUTO falls back to format v1 (which builds
  // codebooks), where the kernel's shapes get tiles (no codebooks) unless Huffman entropy is
  // asked for.
  c.block_tokens = 32;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_NOT_SUPPORTED);
  EXPECT_TRUE(last_error_names("block_tokens")) << kvc_last_error();
  c.block_tokens = 128;
  c.head_dim = 256;
  EXPECT_EQ(kvc_store_create(&c, &s), KVC_ERROR_NOT_SUPPORTED);
  std::mt19937 rng(3);
  const std::pair<int32_t, kvc_entropy> cases[] = {
      {32, KVC_ENTROPY_AUTO}, {64, KVC_ENTROPY_AUTO}, {64, KVC_ENTROPY_HUFFMAN}};
  for (const auto& [tokens, entropy] : cases) {
    Shape shape = tile_gpu_shape();
    shape.tokens = tokens;
    kvc_store_config a = tile_cuda_config(shape, 1 << 22, 0, 4, 1024);
    a.block_format = KVC_BLOCK_FORMAT_AUTO;
    a.entropy = entropy;
    StoreHandle store(a);
    ASSERT_NE(store.s, nullptr);
    CudaStoreBackend gpu(shape);
    int32_t id = -1;
    ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
    const Rows k = random_rows(rng, 64 * size_t(shape.layers), shape);
    const Rows v = random_rows(rng, 64 * size_t(shape.layers), shape);
    ASSERT_EQ(gpu.prefill(store.s, id, 0, shape.layers, 64, k.bits.data(), v.bits.data()),
              KVC_SUCCESS);
    kvc_codebook_t book = nullptr;
    ASSERT_EQ(kvc_store_get_codebook(store.s, 0, KVC_KIND_KEY, &book), KVC_SUCCESS);
    const bool v1 = tokens == 32 || entropy == KVC_ENTROPY_HUFFMAN;
    EXPECT_EQ(book != nullptr, v1) << "T = " << tokens << ", entropy " << entropy;
    kvc_codebook_destroy(book);
  }
}

// The model-based run of a tiles store: the v1 run's pool and limits scaled to its blocks.
ModelParams tile_gpu_model_params(uint32_t seed, int steps) {
  ModelParams mp = gpu_model_params(seed, steps);
  mp.shape = tile_gpu_shape();
  mp.page_bytes = 2 * kTilePage;
  mp.capacity_bytes = 32 * int64_t(mp.page_bytes);
  mp.max_sequence_tokens = 320;
  mp.max_prefill_tokens = 160;
  mp.tolerance = tile_gpu_tolerance();
  mp.block_format = KVC_BLOCK_FORMAT_TILES;
  return mp;
}

TEST_F(StoreGpu, TileStoreModelBasedRandomOperations) {
  run_gpu_model(tile_gpu_model_params(2026, 300));
}

// Attention sinks: the first block's first rows read back exactly and attended from the
// uncompressed rows (masked in the block), sinks and tail then spanning two attention units.
TEST_F(StoreGpu, TileStoreWithSinksModelBasedRandomOperations) {
  ModelParams mp = tile_gpu_model_params(2028, 200);
  mp.sink_tokens = 40;
  run_gpu_model(mp);
}

TEST_F(StoreGpu, TileStoreAppendsAndAttendsInCudaGraphsFromTheFirstToken) {
  // A tiles store builds no codebooks: a decode step is capturable from the first token on
  // (after one uncaptured step sizes the scratch), and no step synchronizes, a block's
  // compression included (a synchronization inside a capture would fail it).
  const Shape sh = tile_gpu_shape();
  StoreHandle store(tile_cuda_config(sh, 8 << 20, 0, 4, 1024));
  ASSERT_NE(store.s, nullptr);
  CudaStoreBackend be(sh);
  const cudaStream_t stream = be.stream();
  Shadow shadow{sh, {}, {}};
  std::mt19937 rng(53);
  std::vector<int32_t> ids(3);
  for (int32_t& id : ids) {
    ASSERT_EQ(kvc_store_add_sequence(store.s, &id), KVC_SUCCESS);
    shadow.add_sequence(id);
  }
  const size_t batch = ids.size(), step_bytes = batch * sh.row() * 2;
  for (int l = 0; l < sh.layers; ++l) {  // sizes the scratch memory
    const Rows k = random_rows(rng, batch, sh), v = random_rows(rng, batch, sh);
    ASSERT_EQ(be.append(store.s, l, ids, k.bits.data(), v.bits.data()), KVC_SUCCESS)
        << kvc_last_error();
    for (size_t b = 0; b < batch; ++b) shadow.append(ids[b], l, k, v, b, 1);
  }
  DeviceBuffer d_keys(size_t(sh.layers) * step_bytes), d_values(size_t(sh.layers) * step_bytes);
  Graph step;
  KVC_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  std::vector<kvc_status_t> captured;
  for (int l = 0; l < sh.layers; ++l) {
    captured.push_back(kvc_store_append(store.s, l, int32_t(batch), ids.data(),
                                        d_keys.get<char>() + size_t(l) * step_bytes,
                                        d_values.get<char>() + size_t(l) * step_bytes, stream));
  }
  const cudaError_t ended = cudaStreamEndCapture(stream, &step.graph);
  for (kvc_status_t st : captured) ASSERT_EQ(st, KVC_SUCCESS) << kvc_last_error();
  ASSERT_EQ(ended, cudaSuccess) << cudaGetErrorString(ended);
  KVC_CUDA_CHECK(cudaGraphInstantiate(&step.exec, step.graph, 0));
  std::vector<Rows> sent;
  const int replays = 140;  // two block boundaries (T = 64) per sequence and layer
  for (int r = 0; r < replays; ++r) {
    for (int l = 0; l < sh.layers; ++l) {
      Rows k = random_rows(rng, batch, sh), v = random_rows(rng, batch, sh);
      KVC_CUDA_CHECK(cudaMemcpyAsync(d_keys.get<char>() + size_t(l) * step_bytes, k.bits.data(),
                                     step_bytes, cudaMemcpyHostToDevice, stream));
      KVC_CUDA_CHECK(cudaMemcpyAsync(d_values.get<char>() + size_t(l) * step_bytes, v.bits.data(),
                                     step_bytes, cudaMemcpyHostToDevice, stream));
      for (size_t b = 0; b < batch; ++b) shadow.append(ids[b], l, k, v, b, 1);
      sent.push_back(std::move(k));
      sent.push_back(std::move(v));
    }
    KVC_CUDA_CHECK(cudaGraphLaunch(step.exec, stream));
  }
  KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
  const kvc_store_stats st = store_stats(store.s);
  EXPECT_EQ(st.failed_appends, 0);
  EXPECT_EQ(st.codebook_bytes, 0);
  EXPECT_EQ(st.num_blocks, int64_t(batch) * 2 * sh.heads * 2 * sh.layers);
  ASSERT_NO_FATAL_FAILURE(
      check_against_shadow(be, store.s, shadow, rng, "after the replays", tile_gpu_tolerance()));

  // Attention captured and replayed: the tile kernel over the blocks and the tails.
  const int32_t q_heads = sh.heads * sh.group;
  const float scale = 1.0f / std::sqrt(float(sh.dim));
  const Rows q = random_rows(rng, batch * size_t(sh.group), sh);
  DeviceBuffer d_q(q.bits.size() * 2), d_out(q.bits.size() * 2);
  d_q.upload(q.bits.data(), d_q.bytes());
  std::vector<uint16_t> warm(q.bits.size());
  ASSERT_EQ(be.attention(store.s, 0, ids, q_heads, scale, q.bits.data(), warm.data()),
            KVC_SUCCESS)
      << kvc_last_error();  // sizes the workspace
  Graph attend;
  KVC_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const kvc_status_t status = kvc_store_attention(store.s, 0, int32_t(batch), ids.data(), q_heads,
                                                  scale, d_q.get(), d_out.get(), stream);
  const cudaError_t attention_ended = cudaStreamEndCapture(stream, &attend.graph);
  ASSERT_EQ(status, KVC_SUCCESS) << kvc_last_error();
  ASSERT_EQ(attention_ended, cudaSuccess) << cudaGetErrorString(attention_ended);
  KVC_CUDA_CHECK(cudaGraphInstantiate(&attend.exec, attend.graph, 0));
  KVC_CUDA_CHECK(cudaMemsetAsync(d_out.get(), 0xFF, d_out.bytes(), stream));
  KVC_CUDA_CHECK(cudaGraphLaunch(attend.exec, stream));
  KVC_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<ReadBack> kv;
  for (int32_t id : ids) kv.push_back(read_back(be, store.s, sh, id, 0));
  ASSERT_NO_FATAL_FAILURE(check_attention(sh, kv, q, d_out.download<uint16_t>(q.bits.size()), scale,
                                          tile_gpu_tolerance(), "tile attention graph", ids));
}

// serialized_block_format: the tile blocks as held (AUTO), or as format v1 (V1, version 6:
// transcoded on the host, so the same bytes again).
TEST_F(StoreGpu, TileStoreSerializesToTheSameBytesAsTheCpuTileStore) {
  for (int32_t format : {KVC_BLOCK_FORMAT_AUTO, KVC_BLOCK_FORMAT_V1}) {
    SCOPED_TRACE(format);
    const Shape sh = tile_gpu_shape();
    kvc_store_config on_cpu = tile_cuda_config(sh, 8 << 20, 0, 8, 1024);
    kvc_store_config on_gpu = on_cpu;
    on_cpu.backend = KVC_BACKEND_CPU;
    on_cpu.serialized_block_format = on_gpu.serialized_block_format = format;
    StoreHandle host(on_cpu), device(on_gpu);
    ASSERT_NE(host.s, nullptr);
    ASSERT_NE(device.s, nullptr);
    CpuStoreBackend cpu;
    CudaStoreBackend gpu(sh);
    std::mt19937 rng(43);
    for (int32_t n : {200, 63, 64, 1, 0}) {
      int32_t h = -1, d = -1;
      ASSERT_EQ(kvc_store_add_sequence(host.s, &h), KVC_SUCCESS);
      ASSERT_EQ(kvc_store_add_sequence(device.s, &d), KVC_SUCCESS);
      const Rows k = random_rows(rng, size_t(n) * size_t(sh.layers), sh);
      const Rows v = random_rows(rng, size_t(n) * size_t(sh.layers), sh);
      ASSERT_EQ(cpu.prefill(host.s, h, 0, sh.layers, n, k.bits.data(), v.bits.data()), KVC_SUCCESS);
      ASSERT_EQ(gpu.prefill(device.s, d, 0, sh.layers, n, k.bits.data(), v.bits.data()),
                KVC_SUCCESS);
      std::vector<uint8_t> a, b, c;
      ASSERT_NO_FATAL_FAILURE(serialize_sequence(host.s, h, a));
      ASSERT_NO_FATAL_FAILURE(serialize_sequence(device.s, d, b));
      EXPECT_EQ(a, b) << n << " tokens: the CUDA and CPU tile stores wrote different bytes";
      // And each restores into the other backend, to the same blocks.
      int32_t r = -1;
      EXPECT_EQ(kvc_store_restore(device.s, a.data(), a.size(), &r), KVC_SUCCESS)
          << kvc_last_error();
      ASSERT_NO_FATAL_FAILURE(serialize_sequence(device.s, r, c));
      EXPECT_EQ(c, a);
      EXPECT_EQ(kvc_store_restore(host.s, b.data(), b.size(), &r), KVC_SUCCESS) << kvc_last_error();
    }
    const kvc_store_stats sh_stats = store_stats(host.s), sd_stats = store_stats(device.s);
    EXPECT_EQ(sh_stats.block_bytes, sd_stats.block_bytes);
    EXPECT_EQ(sd_stats.codebook_bytes, 0);
  }
}

}  // namespace
}  // namespace kvc::test
