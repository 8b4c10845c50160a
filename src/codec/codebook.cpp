// SPDX-License-Identifier: Apache-2.0
#include "codec/codebook.hpp"

#include <algorithm>
#include <queue>

#include "core/error.hpp"
#include "kernels/common/format.cuh"

namespace kvc {

Histogram::Histogram() : bins_(2 * kHalfWidth, 0) {}

void Histogram::add(int32_t symbol, uint64_t count) {
  if (symbol >= -kHalfWidth && symbol < kHalfWidth) bins_[size_t(symbol + kHalfWidth)] += count;
  total_ += count;
}

std::vector<std::pair<int32_t, uint64_t>> Histogram::nonzero() const {
  std::vector<std::pair<int32_t, uint64_t>> out;
  for (size_t i = 0; i < bins_.size(); ++i) {
    if (bins_[i] != 0) out.emplace_back(int32_t(i) - kHalfWidth, bins_[i]);
  }
  return out;
}

uint32_t fnv1a32(const uint8_t* data, size_t size) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < size; ++i) h = (h ^ data[i]) * 16777619u;
  return h;
}

namespace {

// Huffman code lengths for the given weights (all > 0). Ties break on the lower node id, so the
// result depends only on the weights.
std::vector<uint8_t> huffman_lengths(const std::vector<uint64_t>& weights) {
  const size_t n = weights.size();
  if (n == 1) return {1};
  struct Node {
    uint64_t weight;
    uint32_t id;
    bool operator>(const Node& o) const {
      return weight != o.weight ? weight > o.weight : id > o.id;
    }
  };
  std::priority_queue<Node, std::vector<Node>, std::greater<Node>> queue;
  std::vector<uint32_t> parent(2 * n - 1, 0);
  for (size_t i = 0; i < n; ++i) queue.push({weights[i], uint32_t(i)});
  uint32_t next = uint32_t(n);
  while (queue.size() > 1) {
    const Node a = queue.top();
    queue.pop();
    const Node b = queue.top();
    queue.pop();
    parent[a.id] = parent[b.id] = next;
    queue.push({a.weight + b.weight, next++});
  }
  // Parents always have larger ids than their children: depths in one backward sweep.
  std::vector<uint8_t> depth(2 * n - 1, 0);
  for (size_t i = 2 * n - 2; i-- > 0;) depth[i] = uint8_t(depth[parent[i]] + 1);
  return std::vector<uint8_t>(depth.begin(), depth.begin() + long(n));
}

// Lengths limited to max_length by halving the weights until the tree is shallow enough;
// at all-ones weights the depth is ceil(log2(n)) <= max_length, so this terminates.
std::vector<uint8_t> limited_lengths(std::vector<uint64_t> weights, uint32_t max_length) {
  for (;;) {
    std::vector<uint8_t> lengths = huffman_lengths(weights);
    if (*std::max_element(lengths.begin(), lengths.end()) <= max_length) return lengths;
    for (uint64_t& w : weights) w = std::max<uint64_t>(1, w >> 1);
  }
}

}  // namespace

Codebook Codebook::build(const Histogram& histogram, int32_t max_code_length, int32_t max_symbols) {
  // A code of max_code_length bits has room for 2^max_code_length - 1 symbols and the escape.
  const int64_t width = std::min<int64_t>(max_symbols, (int64_t(1) << max_code_length) - 1);
  const auto counts = histogram.nonzero();

  // The window of at most `width` consecutive symbols holding the most occurrences.
  size_t best_lo = 0, best_hi = 0;  // [lo, hi) into counts
  uint64_t best_sum = 0, sum = 0;
  for (size_t lo = 0, hi = 0; lo < counts.size(); sum -= counts[lo++].second) {
    while (hi < counts.size() && int64_t(counts[hi].first) - counts[lo].first < width) {
      sum += counts[hi++].second;
    }
    if (sum > best_sum) {
      best_sum = sum;
      best_lo = lo;
      best_hi = hi;
    }
  }

  const int32_t first = best_hi > best_lo ? counts[best_lo].first : 0;
  const size_t num_symbols =
      best_hi > best_lo ? size_t(int64_t(counts[best_hi - 1].first) - first + 1) : 0;
  // Coded entries: symbols seen inside the window, then the escape, weighted by what it
  // replaces (at least 1 so it always has a code).
  std::vector<uint32_t> entries;
  std::vector<uint64_t> weights;
  for (size_t i = best_lo; i < best_hi; ++i) {
    entries.push_back(uint32_t(counts[i].first - first));
    weights.push_back(counts[i].second);
  }
  entries.push_back(uint32_t(num_symbols));
  weights.push_back(std::max<uint64_t>(1, histogram.total() - best_sum));

  const std::vector<uint8_t> coded = limited_lengths(weights, uint32_t(max_code_length));
  std::vector<uint8_t> lengths(num_symbols + 1, 0);
  for (size_t i = 0; i < entries.size(); ++i) lengths[entries[i]] = coded[i];
  return Codebook(first, uint32_t(max_code_length), std::move(lengths));
}

Codebook::Codebook(int32_t first_symbol, uint32_t max_code_length, std::vector<uint8_t> lengths)
    : first_symbol_(first_symbol),
      num_symbols_(uint32_t(lengths.size() - 1)),
      max_code_length_(max_code_length),
      lengths_(std::move(lengths)) {
  using format::store_u16;
  using format::store_u32;
  using format::store_u8;
  // Canonical codes (as in DEFLATE): shorter first, then by index.
  std::vector<uint32_t> count_per_length(max_code_length_ + 1, 0);
  for (uint8_t l : lengths_) count_per_length[l]++;
  count_per_length[0] = 0;
  std::vector<uint32_t> next_code(max_code_length_ + 2, 0);
  for (uint32_t l = 1, code = 0; l <= max_code_length_; ++l) {
    code = (code + count_per_length[l - 1]) << 1;
    next_code[l] = code;
  }
  reversed_codes_.assign(lengths_.size(), 0);
  decode_table_.assign(size_t(1) << max_code_length_, 0);
  for (uint32_t i = 0; i < lengths_.size(); ++i) {
    const uint32_t l = lengths_[i];
    if (l == 0) continue;
    const uint32_t code = next_code[l]++;
    uint32_t reversed = 0;
    for (uint32_t b = 0; b < l; ++b) reversed |= ((code >> b) & 1u) << (l - 1 - b);
    reversed_codes_[i] = reversed;
    for (uint32_t fill = reversed; fill < decode_table_.size(); fill += 1u << l) {
      decode_table_[fill] = (i << 8) | l;
    }
  }

  namespace cf = codebook_format;
  const size_t nibble_bytes = format::align4(uint32_t((num_symbols_ + 1) / 2));
  serialized_.assign(cf::kHeaderBytes + nibble_bytes + 4, 0);
  uint8_t* p = serialized_.data();
  store_u32(p, cf::kMagic);
  store_u8(p + 4, cf::kVersion);
  store_u8(p + 5, max_code_length_);
  store_u16(p + 6, num_symbols_);
  store_u32(p + 8, uint32_t(first_symbol_));
  store_u8(p + 12, lengths_[num_symbols_]);
  for (uint32_t i = 0; i < num_symbols_; ++i) {
    p[cf::kHeaderBytes + i / 2] |= uint8_t(lengths_[i] << (4 * (i % 2)));
  }
  const size_t body = serialized_.size() - 4;
  id_ = fnv1a32(p, body);
  store_u32(p + body, id_);
}

Codebook Codebook::parse(const uint8_t* data, size_t size) {
  namespace cf = codebook_format;
  using format::load_u16;
  using format::load_u32;
  using format::load_u8;
  auto corrupt = [](const char* what) { fail(KVC_ERROR_CORRUPT_DATA, "codebook: ", what); };
  if (size < cf::kHeaderBytes + 4) corrupt("shorter than its 20-byte minimum");
  if (load_u32(data) != cf::kMagic) corrupt("bad magic (not a serialized kvcomp codebook)");
  if (load_u8(data + 4) != cf::kVersion) {
    fail(KVC_ERROR_FORMAT_VERSION, "codebook: format version ", load_u8(data + 4),
         " is not supported (this library reads version ", cf::kVersion, ")");
  }
  const uint32_t max_length = load_u8(data + 5);
  const uint32_t num_symbols = load_u16(data + 6);
  const int32_t first = int32_t(load_u32(data + 8));
  const uint32_t escape_length = load_u8(data + 12);
  if (max_length < 2 || max_length > KVC_MAX_CODE_LENGTH) corrupt("max code length out of range");
  if (num_symbols > KVC_MAX_CODEBOOK_SYMBOLS) corrupt("too many symbols");
  if ((load_u8(data + 13) | load_u8(data + 14) | load_u8(data + 15)) != 0) {
    corrupt("reserved bytes not zero");
  }
  const size_t expected = cf::kHeaderBytes + format::align4((num_symbols + 1) / 2) + 4;
  if (size != expected) corrupt("size does not match its symbol count");
  if (fnv1a32(data, size - 4) != load_u32(data + size - 4)) corrupt("checksum mismatch");
  if (int64_t(first) + num_symbols - 1 > INT32_MAX) corrupt("symbol range overflows");

  std::vector<uint8_t> lengths(num_symbols + 1);
  for (uint32_t i = 0; i < num_symbols; ++i) {
    lengths[i] = (data[cf::kHeaderBytes + i / 2] >> (4 * (i % 2))) & 0xFu;
  }
  lengths[num_symbols] = uint8_t(escape_length);
  if (escape_length == 0) corrupt("the escape has no code");
  // Kraft's inequality: the lengths must form a prefix code.
  uint64_t kraft = 0;
  for (uint8_t l : lengths) {
    if (l > max_length) corrupt("a code is longer than the stated maximum");
    if (l != 0) kraft += uint64_t(1) << (max_length - l);
  }
  if (kraft > (uint64_t(1) << max_length)) corrupt("code lengths over-subscribe the code space");
  Codebook book(first, max_length, std::move(lengths));
  if (book.serialized_.size() != size ||
      !std::equal(book.serialized_.begin(), book.serialized_.end(), data)) {
    corrupt("non-canonical encoding (padding bits not zero)");
  }
  return book;
}

}  // namespace kvc
