// SPDX-License-Identifier: Apache-2.0
// Histograms of quantization symbols and the frozen canonical Huffman codebooks built from them.
#pragma once

#include <kvcomp/kvcomp.h>

#include <cstdint>
#include <vector>

namespace kvc {

// Counts of the symbols in [-2^15, 2^15): a codebook's window always lies there. Symbols
// outside can only ever be escaped, so they add to the total (the escape's weight) and nothing
// else. The CPU and GPU histograms bin the same way, so they build the same codebooks.
class Histogram {
 public:
  static constexpr int32_t kHalfWidth = 1 << 15;

  Histogram();
  void add(int32_t symbol, uint64_t count = 1);
  void add_unbinned(uint64_t count) { total_ += count; }
  uint64_t total() const { return total_; }
  // Non-zero bins in increasing symbol order.
  std::vector<std::pair<int32_t, uint64_t>> nonzero() const;

 private:
  std::vector<uint64_t> bins_;
  uint64_t total_ = 0;
};

// Serialized codebook layout (docs/format.md, "Codebook").
namespace codebook_format {
constexpr uint32_t kMagic = 0x6863766Bu;  // bytes "kvch"
constexpr uint32_t kVersion = 1;
constexpr uint32_t kHeaderBytes = 16;
}  // namespace codebook_format

// Symbols first_symbol .. first_symbol + num_symbols - 1 have indices 0..num_symbols-1; the
// escape has index num_symbols. A code length of 0 means "not in the code" (escaped).
class Codebook {
 public:
  static Codebook build(const Histogram& histogram, int32_t max_code_length, int32_t max_symbols);
  static Codebook parse(const uint8_t* data, size_t size);  // throws KVC_ERROR_CORRUPT_DATA

  int32_t first_symbol() const { return first_symbol_; }
  uint32_t num_symbols() const { return num_symbols_; }
  uint32_t escape_index() const { return num_symbols_; }
  uint32_t max_code_length() const { return max_code_length_; }
  uint32_t id() const { return id_; }
  const std::vector<uint8_t>& serialized() const { return serialized_; }

  // Index of a symbol in the code, or the escape index if the code lacks it.
  uint32_t index_of(int64_t symbol) const {
    const int64_t i = symbol - first_symbol_;
    return (i >= 0 && i < int64_t(num_symbols_) && lengths_[size_t(i)] != 0) ? uint32_t(i)
                                                                             : num_symbols_;
  }
  uint32_t length(uint32_t index) const { return lengths_[index]; }
  // The code of an index with its bits reversed, ready for an LSB-first bit stream.
  uint32_t reversed_code(uint32_t index) const { return reversed_codes_[index]; }

  // Decode table with 2^max_code_length entries, indexed by the next max_code_length stream
  // bits: index << 8 | length; length 0 marks a bit pattern that no code starts.
  const std::vector<uint32_t>& decode_table() const { return decode_table_; }

 private:
  Codebook(int32_t first_symbol, uint32_t max_code_length, std::vector<uint8_t> lengths);

  int32_t first_symbol_;
  uint32_t num_symbols_;
  uint32_t max_code_length_;
  std::vector<uint8_t> lengths_;  // num_symbols + 1 entries, escape last
  std::vector<uint32_t> reversed_codes_;
  std::vector<uint32_t> decode_table_;
  std::vector<uint8_t> serialized_;
  uint32_t id_;
};

uint32_t fnv1a32(const uint8_t* data, size_t size);

}  // namespace kvc
