// SPDX-License-Identifier: Apache-2.0
#include "cpu/codec_cpu.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/error.hpp"
#include "kernels/common/format.cuh"

namespace kvc::cpu {
namespace f = format;

namespace {

// K groups are channels: one at a time, a pass over a block touches a cache line per token, and
// strides of a power of two put those lines in one cache set. So the passes that read or write
// the input's layout take 16 channels per token.
constexpr uint32_t kChannels = 16;

// Where V group g (a segment of a token) starts in a [tokens, head_dim] array whose tokens are
// `stride` elements apart; its elements follow one another.
size_t value_group_at(const CodecParams& p, uint32_t g, int64_t stride) {
  const f::Coord c = f::element_coord(true, p.head_dim, p.group_size, g, 0);
  return size_t(c.token * stride) + c.channel;
}

}  // namespace

bool all_finite(const void* src, kvc_dtype dtype, size_t first, size_t count) {
  // One flag for the run, no exit inside it: the loops vectorize.
  const auto none_set = [&](const uint16_t* x, uint16_t exponent) {
    uint32_t set = 0;
    for (size_t i = first; i < first + count; ++i) set |= uint32_t((x[i] & exponent) == exponent);
    return set == 0;
  };
  switch (dtype) {
    case KVC_DTYPE_FP16:
      return none_set(static_cast<const uint16_t*>(src), 0x7C00u);
    case KVC_DTYPE_BF16:
      return none_set(static_cast<const uint16_t*>(src), 0x7F80u);
    default: {
      const float* x = static_cast<const float*>(src);
      uint32_t nonfinite = 0;
      for (size_t i = first; i < first + count; ++i) nonfinite |= uint32_t(!f::is_finite(x[i]));
      return nonfinite == 0;
    }
  }
}

namespace {

// Element (t, c) of `channels` channels x `tokens` tokens, from where tokens are from_token
// apart and channels from_channel apart to the same layout in `to`: between a [tokens,
// head_dim] array (token stride, channel 1) and a channel-major stage (1, tokens).
template <class T>
void copy_channels(uint32_t channels, uint32_t tokens, const T* from, size_t from_token,
                   size_t from_channel, T* to, size_t to_token, size_t to_channel) {
  for (uint32_t t = 0; t < tokens; ++t) {
    for (uint32_t c = 0; c < channels; ++c) {
      to[t * to_token + c * to_channel] = from[t * from_token + c * from_channel];
    }
  }
}

// run(stage): a stage of kChannels groups of n elements of dtype (float, or the bits of
// fp16 and bf16).
template <class Run>
void with_stage(kvc_dtype dtype, uint32_t n, Run run) {
  if (dtype == KVC_DTYPE_FP32) {
    std::vector<float> stage(size_t(kChannels) * n);
    run(stage.data());
  } else {
    std::vector<uint16_t> stage(size_t(kChannels) * n);
    run(stage.data());
  }
}

}  // namespace

std::vector<float> gather_groups(const CodecParams& p, const void* src, int64_t stride,
                                 kvc_dtype dtype) {
  std::vector<float> x(p.num_elements());
  const uint32_t n = p.group_size;
  // Conversions in contiguous loops (the compiler vectorizes them): V groups in place, K groups
  // (channels) through a stage, kChannels at a time.
  if (p.is_value) {
    with_loader(src, dtype, [&](auto load) {
      for (uint32_t g = 0; g < p.num_groups; ++g) {
        const size_t at = value_group_at(p, g, stride);
        for (uint32_t e = 0; e < n; ++e) x[size_t(g) * n + e] = load(at + e);
      }
    });
    return x;
  }
  with_stage(dtype, n, [&](auto* stage) {
    using T = std::remove_pointer_t<decltype(stage)>;
    for (uint32_t g0 = 0; g0 < p.num_groups; g0 += kChannels) {
      const uint32_t channels = std::min(kChannels, p.num_groups - g0);
      copy_channels(channels, n, static_cast<const T*>(src) + g0, size_t(stride), 1, stage, 1, n);
      with_loader(stage, dtype, [&](auto load) {
        for (size_t i = 0; i < size_t(channels) * n; ++i) x[size_t(g0) * n + i] = load(i);
      });
    }
  });
  return x;
}

void store_values(const CodecParams& p, const Quantized& q, kvc_dtype dtype, void* dst,
                  int64_t stride) {
  const uint32_t n = p.group_size;
  // Group g's values through store at [at, at + n): a loop the compiler vectorizes.
  const auto store_group = [&](auto store, uint32_t g, size_t at) {
    const int32_t* codes = &q.codes[size_t(g) * n];
    for (uint32_t e = 0; e < n; ++e) store(at + e, f::dequantize(codes[e], q.steps[g]));
  };
  if (p.is_value) {
    with_storer(dst, dtype, [&](auto store) {
      for (uint32_t g = 0; g < p.num_groups; ++g) {
        store_group(store, g, value_group_at(p, g, stride));
      }
    });
    return;
  }
  // K groups (channels) go to a stage kChannels at a time, then to the output token by token.
  with_stage(dtype, n, [&](auto* stage) {
    using T = std::remove_pointer_t<decltype(stage)>;
    for (uint32_t g0 = 0; g0 < p.num_groups; g0 += kChannels) {
      const uint32_t channels = std::min(kChannels, p.num_groups - g0);
      with_storer(stage, dtype, [&](auto store) {
        for (uint32_t c = 0; c < channels; ++c) store_group(store, g0 + c, size_t(c) * n);
      });
      copy_channels(channels, n, stage, 1, n, static_cast<T*>(dst) + g0, size_t(stride), 1);
    }
  });
}

namespace {

// The codes of one group, as f::quantize_element gives them; false if an element has none.
// Almost every element is decided by quantize_element's first test (the nearest code, accepted
// by the float difference alone): this loop takes that test without a branch, so the compiler
// vectorizes it, and a group where it leaves an element undecided goes element by element.
bool quantize_group(const float* x, uint32_t n, f::GroupStep gs, int32_t* codes) {
  // Adding 1.5 * 2^23 rounds |r| < 2^22 to an integer (ties to even) held in the sum's low
  // mantissa bits: rint(r) without a branch or a float-to-int conversion.
  constexpr float kRounder = 0x1.8p23f;
  uint32_t undecided = 0;
  for (uint32_t e = 0; e < n; ++e) {
    const float ratio = x[e] / gs.step;
    const int32_t code = int32_t(f::float_bits(ratio + kRounder) - f::float_bits(kRounder));
    codes[e] = code;
    undecided |= uint32_t(!(std::fabs(ratio) < 0x1p22f)) |
                 uint32_t(!(f::abs_difference(x[e], f::dequantize(code, gs.step)) < gs.bound));
  }
  for (uint32_t e = 0; undecided != 0 && e < n; ++e) {
    if (!f::quantize_element(x[e], gs.step, gs.bound, codes[e])) return false;
  }
  return true;
}

// Read as integers after this flip (its own inverse), the bits of finite floats sort as the
// floats do, -0 just below +0: integer minima and maxima vectorize where float ones, held to
// IEEE's NaN and signed-zero rules, do not.
uint32_t order_flip(uint32_t bits) { return bits ^ (uint32_t(int32_t(bits) >> 31) >> 1); }

}  // namespace

Quantized quantize(const CodecParams& p, const std::vector<float>& x) {
  Quantized q;
  q.steps.resize(p.num_groups);
  q.codes.resize(x.size());
  // Absolute mode: one step for the block, sized for its largest magnitude.
  uint32_t max_abs_bits = 0;
  for (float v : x) max_abs_bits = std::max(max_abs_bits, f::float_bits(v) & 0x7FFFFFFFu);
  const f::GroupStep block_step{f::step_for_bound(p.error_bound, f::bits_float(max_abs_bits)),
                                p.error_bound};
  for (uint32_t g = 0; g < p.num_groups && q.ok; ++g) {
    const float* xs = &x[size_t(g) * p.group_size];
    f::GroupStep gs = block_step;
    if (p.relative) {
      // -0 and +0 both give a zero range and the same largest magnitude: either may be the end.
      int32_t lo = INT32_MAX, hi = INT32_MIN;
      for (uint32_t e = 0; e < p.group_size; ++e) {
        const int32_t k = int32_t(order_flip(f::float_bits(xs[e])));
        lo = std::min(lo, k);
        hi = std::max(hi, k);
      }
      gs = f::relative_group_step(p.error_bound, f::bits_float(order_flip(uint32_t(lo))),
                                  f::bits_float(order_flip(uint32_t(hi))));
    }
    q.steps[g] = gs.step;
    q.ok = quantize_group(xs, p.group_size, gs, &q.codes[size_t(g) * p.group_size]);
  }
  return q;
}

bool codes_in_range(const Quantized& q) {
  return std::all_of(q.codes.begin(), q.codes.end(),
                     [](int32_t c) { return c > -f::kMaxAbsCode && c < f::kMaxAbsCode; });
}

namespace {

// Each group's centre: its smallest code (fixed width) or its mean code (Huffman).
std::vector<int32_t> group_centers(const CodecParams& p, const Quantized& q, bool mean) {
  std::vector<int32_t> centers(p.num_groups);
  for (uint32_t g = 0; g < p.num_groups; ++g) {
    const int32_t* c = &q.codes[size_t(g) * p.group_size];
    if (mean) {
      int64_t sum = 0;
      for (uint32_t e = 0; e < p.group_size; ++e) sum += c[e];
      centers[g] = f::mean_center(sum, p.group_size);
    } else {
      centers[g] = code_range(c, p.group_size).lo;
    }
  }
  return centers;
}

// A candidate encoding, sized before anything is written.
struct Plan {
  f::BlockLayout layout{};
  std::vector<int32_t> centers;
  std::vector<uint32_t> stream_ends;  // Huffman
  std::vector<uint32_t> indices;      // Huffman: each symbol's index in the code, group order
  bool eligible = false;
};

f::BlockLayout layout_of(const CodecParams& p, uint32_t encoding, uint32_t code_bits,
                         const std::vector<int32_t>& centers, uint32_t codebook_id,
                         uint32_t raw_dtype, uint64_t payload_bytes) {
  int32_t base = 0;
  uint32_t bits = 0;
  if (!centers.empty()) {
    const auto [lo, hi] = std::minmax_element(centers.begin(), centers.end());
    base = *lo;
    bits = f::bit_width(uint32_t(int64_t(*hi) - *lo));
  }
  return f::make_layout(p.is_value, p.num_tokens, p.head_dim, p.group_size, encoding, p.relative,
                        code_bits, base, bits, p.num_substreams, codebook_id, raw_dtype,
                        payload_bytes);
}

Plan plan_fixed(const CodecParams& p, const Quantized& q) {
  Plan plan;
  plan.centers = group_centers(p, q, /*mean=*/false);
  uint32_t width = 0;
  for (uint32_t g = 0; g < p.num_groups; ++g) {
    const int32_t* c = &q.codes[size_t(g) * p.group_size];
    const int32_t hi = code_range(c, p.group_size).hi;
    width = std::max(width, f::bit_width(uint32_t(int64_t(hi) - plan.centers[g])));
  }
  plan.layout = layout_of(p, f::kFixed, width, plan.centers, 0, 0,
                          (uint64_t(p.num_elements()) * width + 7) / 8);
  plan.eligible = true;
  return plan;
}

int32_t symbol_of(const Quantized& q, const Plan& plan, uint32_t group_size, uint32_t g,
                  uint32_t e) {
  return q.codes[size_t(g) * group_size + e] - plan.centers[g];
}

Plan plan_huffman(const CodecParams& p, const Codebook& book, const Quantized& q) {
  Plan plan;
  plan.centers = group_centers(p, q, /*mean=*/true);
  plan.indices.resize(q.codes.size());
  // Stream s holds positions [s * per, (s + 1) * per) of every group, position-major; its size
  // is a sum, taken here in group order.
  const uint32_t per = p.group_size / p.num_substreams;
  std::vector<uint64_t> code_bits(p.num_substreams), escapes(p.num_substreams);
  uint32_t escape_bits = 0;
  for (uint32_t g = 0; g < p.num_groups; ++g) {
    for (uint32_t e = 0; e < p.group_size; ++e) {
      const int32_t s = symbol_of(q, plan, p.group_size, g, e);
      const uint32_t index = book.index_of(s);
      plan.indices[size_t(g) * p.group_size + e] = index;
      code_bits[e / per] += book.length(index);
      if (index == book.escape_index()) {
        escape_bits = std::max(escape_bits, f::signed_bit_width(s));
        ++escapes[e / per];
      }
    }
  }
  uint64_t end = 0;
  for (uint32_t s = 0; s < p.num_substreams; ++s) {
    const uint64_t bits = code_bits[s] + escapes[s] * escape_bits;
    end += (bits + 7) / 8;
    plan.stream_ends.push_back(uint32_t(std::min<uint64_t>(end, UINT32_MAX)));
  }
  plan.eligible = end <= f::kMaxStreamEnd;
  plan.layout = layout_of(p, f::kHuffman, escape_bits, plan.centers, book.id(), 0, end);
  return plan;
}

Plan plan_raw(const CodecParams& p, kvc_dtype dtype) {
  Plan plan;
  plan.layout = layout_of(p, f::kRaw, 0, {}, 0, uint32_t(dtype),
                          uint64_t(p.num_elements()) * f::dtype_bytes(dtype));
  plan.eligible = true;
  return plan;
}

void write_steps_and_centers(const CodecParams& p, const Quantized& q, const Plan& plan,
                             uint8_t* dst) {
  const f::BlockLayout& b = plan.layout;
  if (b.per_group_step) {
    for (uint32_t g = 0; g < p.num_groups; ++g) {
      f::store_u16(dst + b.steps_offset + 2 * g, f::float_to_bf16_down(q.steps[g]));
    }
  } else {
    f::store_u32(dst + b.steps_offset, f::float_bits(q.steps[0]));
  }
  f::BitWriter centers(dst + b.centers_offset);
  for (uint32_t g = 0; g < p.num_groups; ++g) {
    centers.write(uint32_t(int64_t(plan.centers[g]) - b.center_base), b.center_bits);
  }
  centers.flush();
}

void write_block(const CodecParams& p, const Codebook* book, const Quantized& q, const void* src,
                 int64_t stride, kvc_dtype dtype, const Plan& plan, uint8_t* dst) {
  const f::BlockLayout& b = plan.layout;
  std::memset(dst, 0, b.block_bytes);
  f::write_header(b, dst);
  uint8_t* payload = dst + b.payload_offset;
  if (b.encoding == f::kRaw) {
    // Row-major [num_tokens, head_dim], verbatim bytes of the input dtype (a little-endian
    // host's bytes are the format's).
    const size_t es = f::dtype_bytes(dtype);
    for (uint32_t t = 0; t < p.num_tokens; ++t) {
      std::memcpy(payload + size_t(t) * p.head_dim * es,
                  static_cast<const uint8_t*>(src) + size_t(t) * size_t(stride) * es,
                  p.head_dim * es);
    }
    return;
  }
  write_steps_and_centers(p, q, plan, dst);
  if (b.encoding == f::kFixed) {
    f::BitWriter out(payload);
    for (uint32_t e = 0; e < p.group_size; ++e) {
      for (uint32_t g = 0; g < p.num_groups; ++g) {
        out.write(uint32_t(symbol_of(q, plan, p.group_size, g, e)), b.code_bits);
      }
    }
    out.flush();
    return;
  }
  const uint32_t per = p.group_size / p.num_substreams;
  for (uint32_t s = 0; s < p.num_substreams; ++s) {
    f::store_u16(dst + b.stream_ends_offset + 2 * s, plan.stream_ends[s]);
    f::BitWriter out(payload + (s == 0 ? 0 : plan.stream_ends[s - 1]));
    for (uint32_t e = s * per; e < (s + 1) * per; ++e) {
      for (uint32_t g = 0; g < p.num_groups; ++g) {
        const uint32_t index = plan.indices[size_t(g) * p.group_size + e];
        out.write(book->reversed_code(index), book->length(index));
        if (index == book->escape_index()) {
          out.write(uint32_t(symbol_of(q, plan, p.group_size, g, e)), b.code_bits);
        }
      }
    }
    out.flush();
  }
}

}  // namespace

void check_finite(const CodecParams& p, int32_t block, const void* src, int64_t stride,
                  kvc_dtype dtype) {
  for (uint32_t t = 0; t < p.num_tokens; ++t) {
    if (all_finite(src, dtype, size_t(t * stride), p.head_dim)) continue;
    for (uint32_t c = 0; c < p.head_dim; ++c) {
      const float v = load_element(src, dtype, size_t(t * stride) + c);
      require(std::isfinite(v), KVC_ERROR_NONFINITE_INPUT, "src_blocks[", block, "] token ", t,
              " channel ", c, " is ", v, " (inputs must be finite)");
    }
  }
}

namespace {

// The chosen encoding of a block: the smallest candidate, preferring fixed, then Huffman, then
// verbatim on equal size.
struct Choice {
  Quantized q;
  Plan plan;
};

// The encodings of quantized codes (q.ok) that the codec's entropy allows, in the order ties
// go: fixed width, then Huffman (with a codebook).
std::vector<Plan> coded_plans(const CodecParams& p, const Codebook* book, const Quantized& q) {
  std::vector<Plan> plans;
  if (p.entropy != KVC_ENTROPY_HUFFMAN) plans.push_back(plan_fixed(p, q));
  if (book != nullptr && p.entropy != KVC_ENTROPY_FIXED) plans.push_back(plan_huffman(p, *book, q));
  return plans;
}

// The smallest eligible plan, the first of equal sizes; none if no plan is eligible.
const Plan* smallest(const std::vector<Plan>& plans) {
  const Plan* best = nullptr;
  for (const Plan& plan : plans) {
    if (plan.eligible && (best == nullptr || plan.layout.block_bytes < best->layout.block_bytes)) {
      best = &plan;
    }
  }
  return best;
}

Choice choose(const CodecParams& p, const Codebook* book, const void* src, int64_t stride,
              kvc_dtype dtype) {
  Choice c{quantize(p, gather_groups(p, src, stride, dtype)), {}};
  std::vector<Plan> plans = c.q.ok ? coded_plans(p, book, c.q) : std::vector<Plan>{};
  plans.push_back(plan_raw(p, dtype));  // always eligible
  c.plan = *smallest(plans);
  return c;
}

}  // namespace

uint32_t encoded_size(const CodecParams& p, const Codebook* book, const void* src, int64_t stride,
                      kvc_dtype dtype) {
  return choose(p, book, src, stride, dtype).plan.layout.block_bytes;
}

uint32_t encode_block(const CodecParams& p, const Codebook* book, const void* src, int64_t stride,
                      kvc_dtype dtype, uint8_t* dst) {
  const Choice c = choose(p, book, src, stride, dtype);
  write_block(p, book, c.q, src, stride, dtype, c.plan, dst);
  return c.plan.layout.block_bytes;
}

std::vector<uint8_t> encode_codes(const CodecParams& p, const Codebook* book, const Quantized& q) {
  require(q.ok, KVC_ERROR_INTERNAL, "encode_codes needs quantized codes");
  const std::vector<Plan> plans = coded_plans(p, book, q);
  const Plan* plan = smallest(plans);
  require(plan != nullptr, KVC_ERROR_INTERNAL, "encode_codes: entropy ", int32_t(p.entropy),
          " without a codebook leaves no encoding but verbatim");
  std::vector<uint8_t> out(plan->layout.block_bytes);
  write_block(p, book, q, nullptr, 0, KVC_DTYPE_FP32, *plan, out.data());
  return out;
}

namespace {

[[noreturn]] void corrupt(const char* what) {
  fail(KVC_ERROR_CORRUPT_DATA, "corrupt block: ", what);
}

const char* parse_error_text(f::ParseError e) {
  switch (e) {
    case f::ParseError::kTruncatedHeader:
      return "fewer bytes than the 32-byte header";
    case f::ParseError::kBadMagic:
      return "bad magic (not a kvcomp block)";
    case f::ParseError::kBadField:
      return "a header field is out of range";
    case f::ParseError::kTruncated:
      return "its stated length exceeds the bytes available";
    case f::ParseError::kBadSections:
      return "its sections do not fit in its stated length";
    default:
      return "unreadable header";
  }
}

}  // namespace

f::BlockLayout parse_header(const uint8_t* src, uint64_t available) {
  f::BlockLayout b{};
  const f::ParseError err = f::parse_block(src, available, b);
  if (err == f::ParseError::kBadVersion) {
    fail(KVC_ERROR_FORMAT_VERSION, "block format version ", f::load_u8(src + f::offset::kVersion),
         " is not supported (this library reads version ", f::kVersion, ")");
  }
  if (err != f::ParseError::kNone) corrupt(parse_error_text(err));
  return b;
}

namespace {

// The header of a block for codec p, parsed and checked against it (shape, codebook).
f::BlockLayout parse_for(const CodecParams& p, const Codebook* book, const uint8_t* src,
                         uint64_t available) {
  const f::BlockLayout b = parse_header(src, available);
  require(b.is_value == p.is_value && b.num_tokens == p.num_tokens && b.head_dim == p.head_dim &&
              b.group_size == p.group_size,
          KVC_ERROR_CONFIG_MISMATCH, "block is ", b.is_value ? "V" : "K", " ", b.num_tokens, "x",
          b.head_dim, " in groups of ", b.group_size, " but the codec is ", p.is_value ? "V" : "K",
          " ", p.num_tokens, "x", p.head_dim, " in groups of ", p.group_size);
  if (b.encoding == f::kHuffman) {
    require(book != nullptr && book->id() == b.codebook_id, KVC_ERROR_CODEBOOK_MISMATCH,
            "block was encoded with codebook ", b.codebook_id, " but the codec has ",
            book ? "codebook " + std::to_string(book->id()) : std::string("none"));
  }
  return b;
}

// Each group's step of a fixed-width or Huffman block.
std::vector<float> read_steps(const f::BlockLayout& b, const uint8_t* src) {
  std::vector<float> steps(b.num_groups);
  for (uint32_t g = 0; g < b.num_groups; ++g) {
    steps[g] = b.per_group_step ? f::bf16_to_float(f::load_u16(src + b.steps_offset + 2 * g))
                                : f::bits_float(f::load_u32(src + b.steps_offset));
  }
  return steps;
}

// The codes and steps of a fixed-width or Huffman block, parsed into b; throws on corrupt
// streams.
Quantized codes_of(const f::BlockLayout& b, const Codebook* book, const uint8_t* src) {
  Quantized q;
  q.steps = read_steps(b, src);
  q.codes.resize(size_t(b.num_groups) * b.group_size);
  std::vector<uint32_t> centers(b.num_groups);  // uint32: corrupt values wrap, never overflow
  f::BitReader center_bits(src + b.centers_offset, b.stream_ends_offset - b.centers_offset);
  for (uint32_t g = 0; g < b.num_groups; ++g) {
    centers[g] = uint32_t(b.center_base) + center_bits.read(b.center_bits);
  }
  auto emit = [&](uint32_t g, uint32_t e, uint32_t symbol) {
    q.codes[size_t(g) * b.group_size + e] = int32_t(centers[g] + symbol);
  };
  const uint8_t* payload = src + b.payload_offset;
  if (b.encoding == f::kFixed) {
    f::BitReader in(payload, b.payload_bytes);
    for (uint32_t e = 0; e < b.group_size; ++e) {
      for (uint32_t g = 0; g < b.num_groups; ++g) emit(g, e, in.read(b.code_bits));
    }
    return q;
  }

  const std::vector<uint32_t>& table = book->decode_table();
  const uint32_t table_bits = book->max_code_length();
  const uint32_t per = b.group_size / b.num_substreams;
  uint32_t start = 0;
  for (uint32_t s = 0; s < b.num_substreams; ++s) {
    const uint32_t end = f::load_u16(src + b.stream_ends_offset + 2 * s);
    f::BitReader in(payload + start, end - start);
    for (uint32_t e = s * per; e < (s + 1) * per; ++e) {
      for (uint32_t g = 0; g < b.num_groups; ++g) {
        const uint32_t entry = table[in.peek(table_bits)];
        const uint32_t length = entry & 0xFFu;
        if (length == 0) corrupt("a bit pattern that is no code of the codebook");
        in.skip(length);
        uint32_t symbol = uint32_t(book->first_symbol()) + (entry >> 8);
        if ((entry >> 8) == book->escape_index()) {
          if (b.code_bits == 0) corrupt("an escape in a block without escape bits");
          symbol = uint32_t(f::sign_extend(in.read(b.code_bits), b.code_bits));
        }
        emit(g, e, symbol);
      }
    }
    if (in.overrun()) corrupt("a sub-stream is shorter than its symbols");
    start = end;
  }
  return q;
}

}  // namespace

void decode_block(const CodecParams& p, const Codebook* book, const uint8_t* src,
                  uint64_t available, kvc_dtype dtype, void* dst, int64_t stride) {
  const f::BlockLayout b = parse_for(p, book, src, available);
  if (b.encoding == f::kRaw) {
    const uint8_t* payload = src + b.payload_offset;
    const uint32_t es = f::dtype_bytes(b.raw_dtype);
    for (uint32_t t = 0; t < b.num_tokens; ++t) {
      for (uint32_t c = 0; c < b.head_dim; ++c) {
        const uint8_t* at = payload + (size_t(t) * b.head_dim + c) * es;
        const uint32_t bits = es == 4 ? f::load_u32(at) : f::load_u16(at);
        store_element(dst, dtype, size_t(t * stride) + c, raw_value(b.raw_dtype, bits));
      }
    }
    return;
  }
  // The codes first, then the values: the store loop has no stream to follow.
  store_values(p, codes_of(b, book, src), dtype, dst, stride);
}

Quantized decode_codes(const CodecParams& p, const Codebook* book, const uint8_t* src,
                       uint64_t available) {
  const f::BlockLayout b = parse_for(p, book, src, available);
  if (b.encoding == f::kRaw) {
    Quantized q;
    q.ok = false;
    return q;
  }
  return codes_of(b, book, src);
}

void histogram_block(const CodecParams& p, const void* src, int64_t stride, kvc_dtype dtype,
                     Histogram& histogram) {
  const Quantized q = quantize(p, gather_groups(p, src, stride, dtype));
  if (q.ok) histogram_codes(p, q, histogram);
}

void histogram_codes(const CodecParams& p, const Quantized& q, Histogram& histogram) {
  const std::vector<int32_t> centers = group_centers(p, q, /*mean=*/true);
  for (uint32_t g = 0; g < p.num_groups; ++g) {
    for (uint32_t e = 0; e < p.group_size; ++e) {
      histogram.add(q.codes[size_t(g) * p.group_size + e] - centers[g]);
    }
  }
}

}  // namespace kvc::cpu
