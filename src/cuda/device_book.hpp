// SPDX-License-Identifier: Apache-2.0
// A codebook's tables in device memory (host side): the decode table, then one entry per
// symbol index (reversed code | length << 24), uploaded once and owned; kernels read them
// through a BookView. Shared by the codec and the attention launchers.
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "codec/codebook.hpp"
#include "cuda/launch.hpp"
#include "kernels/codec/device_common.cuh"

namespace kvc::cuda {

class DeviceBook {
 public:
  explicit DeviceBook(const Codebook& book) {
    std::vector<uint32_t> tables = book.decode_table();
    const size_t codes_at = tables.size();
    for (uint32_t i = 0; i <= book.num_symbols(); ++i) {
      tables.push_back(book.reversed_code(i) | (book.length(i) << 24));
    }
    check_cuda(cudaMalloc(&tables_, tables.size() * 4), "cudaMalloc (codebook tables)");
    try {
      copy_to_device(tables_, tables.data(), tables.size() * 4, "cudaMemcpy (codebook tables)");
    } catch (...) {
      cudaFree(tables_);
      throw;
    }
    view_ = {tables_,
             tables_ + codes_at,
             book.first_symbol(),
             book.num_symbols(),
             book.max_code_length(),
             book.id()};
  }
  ~DeviceBook() { cudaFree(tables_); }
  DeviceBook(const DeviceBook&) = delete;
  DeviceBook& operator=(const DeviceBook&) = delete;

  const kernels::BookView& view() const { return view_; }

 private:
  uint32_t* tables_ = nullptr;
  kernels::BookView view_{};
};

// The view of an optional codebook: table == nullptr when there is none.
inline kernels::BookView view_of(const std::unique_ptr<DeviceBook>& book) {
  return book ? book->view() : kernels::BookView{};
}

}  // namespace kvc::cuda
