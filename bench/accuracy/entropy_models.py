# SPDX-License-Identifier: Apache-2.0
"""How many bits per element better entropy models would save over block format v1, at the same
quantization (the same codes, so the same reconstruction and accuracy).

    python bench/accuracy/entropy_models.py [--out bench/accuracy/results/entropy_models.json]

Data: the real KV dump tests/data/smollm2_kv_512.bin (SmolLM2-135M, layers 0, 14 and 29, 512
tokens, 3 KV heads, head_dim 64; tests/data/README.md). Each (layer, K|V) is cut into blocks of
T tokens per KV head and quantized exactly as the library does (docs/format.md §6): K with an
absolute bound (one step per block), V with a relative bound (one bf16 step per token).
Codebooks and every other fitted table are built on the first half of the tokens (calibration)
and the cost is measured on the second half.

Models (each keeps v1's block header, steps, stream ends, byte-aligned sub-streams and the fixed
and raw candidates; what differs is the symbol each code is coded as, the codebook it is coded
with and, for the rotating centre, the per-block side information):

- today: v1 as the library writes it (symbol = code - group centre, one codebook per layer and
  kind). The model's block sizes are checked byte for byte against the library's encoder
  through the Python binding; any difference stops the script.
- today, ideal: the entropy of today's symbols on the measured half under their own histogram,
  the bound for any single static code on them (tables free).
- per_channel: one codebook per (KV head, channel) (the tables themselves not counted).
- classes8: channels ranked by the spread of their calibration symbols, cut into 8 equal
  classes, one codebook per class.
- delta: each code against the previous token's code (V: rescaled to this token's step); a
  block's first token as today.
- rope_centre (K): K is stored after RoPE, which turns channel pair (i, i + D/2) by t * theta_i
  from token to token. Per block and pair, b = rint(mean_t z_t e^(-j t theta_i)) with
  z = code_i + j code_(i+D/2) replaces the pair's two centres (the same count of integers,
  packed like the centres), and each code is coded against rint(b e^(j t theta_i)).
- rope_centre_classes8 (K): the same with 8 channel classes.
- value_bias_context (V): a per-channel bias (the calibration mean of x minus its token's
  centre value, in units of each token's step) subtracted from today's symbols; one codebook
  per (4 channel classes x 5 contexts from the previous token's symbol in the channel).
- best: rope_centre_classes8 for K with value_bias_context for V.

Bits per element count whole blocks (header, steps, centres or the rotating centre, stream ends,
padding, payload) over the measured tokens, averaged over the three layers; no fp16 tail. The
projected ratio is 32 / (K bits + V bits); a row for one kind pairs it with today's other kind.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = REPO / "tests" / "data" / "smollm2_kv_512.bin"
LAYERS = (0, 14, 29)
TOKENS, HEADS, HEAD_DIM = 512, 3, 64
ROPE_BASE = 100000.0
KEY, VALUE = 0, 1
KIND_NAMES = ("K", "V")
MAX_CODE_LENGTH, MAX_SYMBOLS = 12, 255  # kvc_codebook_build's defaults
HEADER_BYTES = 32
F32 = np.float32


# ---------------------------------------------------------------- quantization (format.md §6)

def ulp(y):
    """Spacing of fp32 values at |y| (§6.1)."""
    exponent = ((np.asarray(y, F32).view(np.uint32) >> 23) & 0xFF).astype(np.int32)
    return np.ldexp(F32(1), np.maximum(exponent, 1) - 150).astype(F32)


def step_for_bound(bound, magnitude):
    """§6.1, every operation in fp32."""
    half = (bound - ulp((magnitude + bound).astype(F32))).astype(F32)
    return (F32(2) * half).astype(F32)


def steps_and_bounds(x, kind, error_bound):
    """x [H, B, T, D] fp32. K: one step per block (absolute bound, §6.2); V: one bf16 step per
    token, rounded down (relative bound, §6.3). Returns step and bound broadcastable to x."""
    eb = F32(error_bound)
    if kind == KEY:
        return step_for_bound(eb, np.abs(x).max(axis=(2, 3), keepdims=True)), eb
    lo, hi = x.min(axis=3, keepdims=True), x.max(axis=3, keepdims=True)
    assert (hi > lo).all(), "a constant V token: not modelled here"
    bound = (eb * (hi - lo)).astype(F32)
    wanted = step_for_bound(bound, np.maximum(np.abs(lo), np.abs(hi)))
    return (wanted.view(np.uint32) & np.uint32(0xFFFF0000)).view(F32), bound


def codes(x, step, bound):
    """§6.4: rint(x / step), else the neighbour below, else above, that keeps the bound."""
    def keeps_bound(c):
        return np.abs(x.astype(np.float64) - (c * step).astype(F32)) <= bound

    first = np.rint((x / step).astype(F32))
    code, ok = first.copy(), keeps_bound(first)
    for other in (first - 1, first + 1):
        take = ~ok & keeps_bound(other)
        code[take] = other[take]
        ok |= take
    assert ok.all(), "an element no code reaches: the library would write the block raw"
    return code.astype(np.int64)


@dataclass
class Blocks:
    """One (layer, kind)'s blocks, [heads, blocks, tokens, channels]; the first half of the
    blocks calibrates, the second half is measured."""
    kind: int
    x: np.ndarray      # fp32 input
    code: np.ndarray   # int64 quantization codes
    step: np.ndarray   # fp32, broadcastable to code

    @property
    def group_axis(self):
        """The axis a group spans: K groups are channels over the tokens, V groups tokens."""
        return 2 if self.kind == KEY else 3

    @property
    def centre(self):
        """§6.5: the mean code of each group rounded to nearest, ties upward."""
        size = self.code.shape[self.group_axis]
        total = self.code.sum(axis=self.group_axis, keepdims=True)
        return np.floor_divide(total + size // 2, size)

    @property
    def symbols(self):
        return self.code - self.centre

    @property
    def calibration_blocks(self):
        return self.code.shape[1] // 2


def load(path=DATA):
    """The dump as fp32 [layer, K|V, token, head, channel]."""
    raw = np.fromfile(path, "<f2").reshape(len(LAYERS), 2, TOKENS, HEADS, HEAD_DIM)
    return raw.astype(F32)


def quantize(tokens, kind, block_tokens, error_bound):
    """tokens [N, heads, D] fp32 (N a multiple of 2 * block_tokens) -> Blocks."""
    n, heads, dim = tokens.shape
    x = tokens.reshape(n // block_tokens, block_tokens, heads, dim).transpose(2, 0, 1, 3)
    step, bound = steps_and_bounds(x, kind, error_bound)
    return Blocks(kind, x, codes(x, step, bound), step)


# ------------------------------------------------------------- codebooks (format.md §9, §10)

def huffman_lengths(weights):
    """Code lengths of a Huffman tree that always joins the two smallest (weight, id) nodes."""
    if len(weights) == 1:
        return [1]
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = {}
    next_id = len(weights)
    while len(heap) > 1:
        (wa, a), (wb, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = next_id
        heapq.heappush(heap, (wa + wb, next_id))
        next_id += 1
    depth = [0] * next_id
    for node in range(next_id - 2, -1, -1):  # parents have larger ids: root first
        depth[node] = depth[parent[node]] + 1
    return depth[:len(weights)]


def limited_lengths(weights):
    """§10 step 6: halve the weights until no code is longer than the limit."""
    weights = [int(w) for w in weights]
    while True:
        lengths = huffman_lengths(weights)
        if max(lengths) <= MAX_CODE_LENGTH:
            return lengths
        weights = [max(1, w >> 1) for w in weights]


class Codebook:
    """kvc_codebook_build's construction (§10) from a sample of symbols, and what coding a symbol
    with it costs (§7.4)."""

    def __init__(self, sample):
        sample = np.ravel(sample)
        binned = sample[(sample >= -2**15) & (sample < 2**15)]
        values, counts = np.unique(binned, return_counts=True)
        self.first, self.lengths = 0, np.zeros(0, np.int64)
        if not values.size:
            self.escape = 1  # only the escape: a lone leaf
            return
        width = min(MAX_SYMBOLS, 2**MAX_CODE_LENGTH - 1)
        ends = np.searchsorted(values, values + width)
        running = np.concatenate([[0], np.cumsum(counts)])
        in_window = running[ends] - running[:-1]
        lo = int(np.argmax(in_window))  # the first of the largest windows
        hi = int(ends[lo])
        escape_weight = max(1, sample.size - int(in_window[lo]))
        lengths = limited_lengths(list(counts[lo:hi]) + [escape_weight])
        self.first = int(values[lo])
        self.lengths = np.zeros(int(values[hi - 1]) - self.first + 1, np.int64)
        self.lengths[values[lo:hi] - self.first] = lengths[:-1]
        self.escape = lengths[-1]

    @property
    def serialized_bytes(self):
        """§9.1: header, 4-bit lengths, checksum."""
        return 20 + align4((self.lengths.size + 1) // 2)

    def cost(self, symbols):
        """(bits of each symbol's code, whether it is escaped); an escaped symbol also costs its
        block's escape width, added by the caller."""
        index = symbols - self.first
        inside = (index >= 0) & (index < self.lengths.size)
        length = np.zeros(symbols.shape, np.int64)
        length[inside] = self.lengths[index[inside]]
        escaped = length == 0  # outside the window, or a length of 0 inside it
        return np.where(escaped, self.escape, length), escaped


# ----------------------------------------------------------------- block sizes (format.md §5)

def align4(n):
    return 4 * ((n + 3) // 4)


def bitlen(v):
    """Bits of non-negative integers without leading zeros (exact below 2^53)."""
    return np.frexp(np.asarray(v, np.float64))[1].astype(np.int64)


def signed_bits(s):
    """sbits(s) of §6.5: the shortest two's complement width holding s."""
    return bitlen(np.where(s >= 0, s, -s - 1)) + 1


def packed_bytes(values, axis):
    """A section of bit-packed offsets from the smallest value, as the centres section (§5.1)."""
    width = bitlen(values.max(axis=axis) - values.min(axis=axis))
    return 4 * ((values.shape[axis] * width + 31) // 32)


def substreams(group_size):
    """The encoder's default S: the largest divisor of G not above 32."""
    return max(s for s in range(1, 33) if group_size % s == 0)


def steps_bytes(blocks):
    tokens = blocks.code.shape[2]
    return 4 if blocks.kind == KEY else align4(2 * tokens)


def entropy_coded_bytes(bits, blocks, side_bytes):
    """Bytes of Huffman-layout blocks [H, B] from per-element bits: S byte-aligned sub-streams,
    each a range of positions of every group (§7.4)."""
    h, b, t, d = bits.shape
    if blocks.kind == KEY:  # positions are tokens
        s = substreams(t)
        per_stream = bits.reshape(h, b, s, t // s, d).sum(axis=(3, 4))
    else:                   # positions are channels
        s = substreams(d)
        per_stream = bits.reshape(h, b, t, s, d // s).sum(axis=(2, 4))
    payload = align4(np.ceil(per_stream / 8).astype(np.int64).sum(axis=2))
    return HEADER_BYTES + steps_bytes(blocks) + side_bytes + align4(2 * s) + payload


def fixed_bytes(blocks):
    """The fixed-width candidate (§7.3): offsets from each group's minimum."""
    low = blocks.code.min(axis=blocks.group_axis)
    high = blocks.code.max(axis=blocks.group_axis)
    width = bitlen(high - low).max(axis=2)
    elements = blocks.code.shape[2] * blocks.code.shape[3]
    payload = align4((elements * width + 7) // 8)
    return HEADER_BYTES + steps_bytes(blocks) + packed_bytes(low, axis=2) + payload


def raw_bytes(blocks):
    return HEADER_BYTES + align4(blocks.code.shape[2] * blocks.code.shape[3] * 2)


def measured(a, blocks):
    """The measured half of an [H, B, ...] array."""
    return a[:, blocks.calibration_blocks:]


# ------------------------------------------------------------------------- coding costs

def codebooks(symbols, context, blocks):
    """{context: its codebook, built from the calibration blocks}."""
    split = blocks.calibration_blocks
    context = np.broadcast_to(context, symbols.shape)
    fit_symbols, fit_context = symbols[:, :split], context[:, :split]
    return {c: Codebook(fit_symbols[fit_context == c]) for c in np.unique(context)}


def huffman_bits(symbols, context, blocks, books):
    """Per-element bits on the measured blocks, each coded with its context's codebook; escapes
    pay their block's escape width (the largest sbits escaped)."""
    test_symbols = measured(symbols, blocks)
    test_context = measured(np.broadcast_to(context, symbols.shape), blocks)
    bits = np.zeros(test_symbols.shape, np.int64)
    escaped = np.zeros(test_symbols.shape, bool)
    for c in np.unique(test_context):
        where = test_context == c
        bits[where], escaped[where] = books[c].cost(test_symbols[where])
    width = np.where(escaped, signed_bits(test_symbols), 0).max(axis=(2, 3), keepdims=True)
    return bits + np.where(escaped, width, 0)


def ideal_bits(symbols, context, blocks):
    """Per-element -log2 p of each measured symbol under its context's histogram of the
    measured symbols themselves."""
    test_symbols = measured(symbols, blocks)
    test_context = measured(np.broadcast_to(context, symbols.shape), blocks)
    bits = np.zeros(test_symbols.shape)
    for c in np.unique(test_context):
        where = test_context == c
        _, index, counts = np.unique(test_symbols[where], return_inverse=True,
                                     return_counts=True)
        bits[where] = -np.log2(counts / where.sum())[index]
    return bits


def block_bytes(bits, blocks, side_bytes):
    """The encoder's choice (§13): the smallest of fixed, the entropy-coded layout and raw."""
    coded = entropy_coded_bytes(bits, blocks, measured(side_bytes, blocks))
    fixed = measured(fixed_bytes(blocks), blocks)
    return np.minimum(np.minimum(fixed, coded), raw_bytes(blocks))


# ------------------------------------------------------------------------------- models
# Each returns (symbols [H, B, T, D], context broadcastable to it, side bytes [H, B]).

def channel_classes(symbols, blocks, n):
    """Class 0..n-1 of each (head, channel): ranked by the spread of its calibration symbols,
    equal counts per class. Shape [H, 1, 1, D]."""
    spread = symbols[:, :blocks.calibration_blocks].std(axis=(1, 2))
    rank = np.empty(spread.size, np.int64)
    rank[np.argsort(spread, axis=None, kind="stable")] = np.arange(spread.size)
    return (rank * n // spread.size).reshape(spread.shape[0], 1, 1, -1)


def centres_bytes(blocks):
    return packed_bytes(blocks.centre.squeeze(blocks.group_axis), axis=2)


def today(blocks):
    return blocks.symbols, 0, centres_bytes(blocks)


def per_channel(blocks):
    h, _, _, d = blocks.code.shape
    return blocks.symbols, np.arange(h * d).reshape(h, 1, 1, d), centres_bytes(blocks)


def classes8(blocks):
    symbols = blocks.symbols
    return symbols, channel_classes(symbols, blocks, 8), centres_bytes(blocks)


def previous_token(a, first):
    """a shifted one token later within each block; `first` at a block's first token."""
    return np.concatenate([np.full_like(a[:, :, :1], first), a[:, :, :-1]], axis=2)


def first_token(code):
    """True at each block's first token, broadcastable to code."""
    return np.arange(code.shape[2]).reshape(1, 1, -1, 1) == 0


def delta(blocks):
    step = np.broadcast_to(blocks.step, blocks.code.shape)
    predicted = np.rint(previous_token(blocks.code, 0) * (previous_token(step, 1) / step))
    first = first_token(blocks.code)
    symbols = np.where(first, blocks.symbols, blocks.code - predicted.astype(np.int64))
    return symbols, first.astype(np.int64), centres_bytes(blocks)


def rope_angles(dim):
    return ROPE_BASE ** (-2.0 * np.arange(dim // 2) / dim)


def rotating_centre(code):
    """K codes [H, B, T, D] -> (the per-block, per-pair rotating centre b as D integers
    [H, B, D] (real parts, then imaginary), its prediction of every code [H, B, T, D])."""
    half = code.shape[3] // 2
    z = code[..., :half] + 1j * code[..., half:]
    turn = np.exp(1j * np.outer(np.arange(code.shape[2]), rope_angles(2 * half)))  # [T, D/2]
    mean = (z * turn.conj()).mean(axis=2, keepdims=True)
    b = np.rint(mean.real) + 1j * np.rint(mean.imag)
    predicted = b * turn
    stored = np.concatenate([b.real, b.imag], axis=3)[:, :, 0].astype(np.int64)
    prediction = np.concatenate([np.rint(predicted.real), np.rint(predicted.imag)], axis=3)
    return stored, prediction.astype(np.int64)


def rope_centre(blocks):
    stored, prediction = rotating_centre(blocks.code)
    return blocks.code - prediction, 0, packed_bytes(stored, axis=2)


def rope_centre_classes8(blocks):
    symbols, _, side = rope_centre(blocks)
    return symbols, channel_classes(symbols, blocks, 8), side


def value_bias_context(blocks):
    """Today's symbols less each V channel's calibrated offset from its token's centre, coded
    with a codebook per (channel class, |previous token's symbol| clipped to 3, or 4 at a
    block's first token)."""
    split = blocks.calibration_blocks
    offset = blocks.x - blocks.centre * blocks.step          # value units
    bias = offset[:, :split].mean(axis=(1, 2), keepdims=True)  # per (head, channel)
    symbols = blocks.symbols - np.rint(bias / blocks.step).astype(np.int64)
    before = np.minimum(np.abs(previous_token(symbols, 0)), 3)
    context = channel_classes(symbols, blocks, 4) * 5 + np.where(first_token(symbols), 4, before)
    return symbols, context, centres_bytes(blocks)


MODELS = {  # name: (kinds, model)
    "today": ((KEY, VALUE), today),
    "per_channel": ((KEY, VALUE), per_channel),
    "classes8": ((KEY, VALUE), classes8),
    "delta": ((KEY, VALUE), delta),
    "rope_centre": ((KEY,), rope_centre),
    "rope_centre_classes8": ((KEY,), rope_centre_classes8),
    "value_bias_context": ((VALUE,), value_bias_context),
}
BEST = {KEY: "rope_centre_classes8", VALUE: "value_bias_context"}


# ------------------------------------------------------------------ the library's bytes

def kvcomp_module():
    """The repository's binding (it finds libkvcomp.so through $KVCOMP_LIBRARY)."""
    sys.path.insert(0, str(REPO / "python"))
    import kvcomp

    return kvcomp


def library_block_bytes(tokens, kind, block_tokens, error_bound):
    """Block sizes [H, B/2] of the measured half as the library encodes it, with a codebook
    the library builds from the calibration half."""
    kvcomp = kvcomp_module()
    args = dict(kind="key" if kind == KEY else "value", num_tokens=block_tokens,
                head_dim=tokens.shape[2], error_bound=error_bound,
                bound_mode="absolute" if kind == KEY else "relative")
    half = tokens.shape[0] // 2
    x16 = tokens.astype(np.float16)
    book = kvcomp.build_codebook(kvcomp.Codec(**args), x16[:half])
    sizes = kvcomp.Codec(**args, codebook=book).encode(x16[half:]).sizes
    return sizes.reshape(-1, tokens.shape[1]).T.astype(np.int64)  # (block, head) -> [H, B]


def check_today(blocks, tokens, error_bound):
    """Stops unless the today model's block sizes are the library's, block for block."""
    symbols, context, side = today(blocks)
    books = codebooks(symbols, context, blocks)
    mine = block_bytes(huffman_bits(symbols, context, blocks, books), blocks, side)
    library = library_block_bytes(tokens, blocks.kind, blocks.code.shape[2], error_bound)
    if not np.array_equal(mine, library):
        raise SystemExit(f"today model != library ({KIND_NAMES[blocks.kind]}, "
                         f"T={blocks.code.shape[2]}, bound {error_bound}): "
                         f"{mine.ravel().tolist()} vs {library.ravel().tolist()}")
    return mine.size


# ---------------------------------------------------------------------------------- run

def measure(raw, block_tokens, kind, error_bound):
    """Per model, averaged over the layers: bits per element (huffman: codebooks from the
    calibration half; ideal), side bytes per block and codebook bytes; and the blocks checked."""
    per_layer = {}
    checked = 0
    for layer in range(len(LAYERS)):
        tokens = raw[layer, kind]
        blocks = quantize(tokens, kind, block_tokens, error_bound)
        checked += check_today(blocks, tokens, error_bound)
        elements = measured(blocks.code, blocks).size
        for name, (kinds, model) in MODELS.items():
            if kind not in kinds:
                continue
            symbols, context, side = model(blocks)
            books = codebooks(symbols, context, blocks)
            bits = dict(huffman=huffman_bits(symbols, context, blocks, books),
                        ideal=ideal_bits(symbols, context, blocks))
            found = {cost: 8 * block_bytes(b, blocks, side).sum() / elements
                     for cost, b in bits.items()}
            found["side_bytes_per_block"] = measured(side, blocks).mean()
            found["codebook_bytes"] = sum(book.serialized_bytes for book in books.values())
            for key, value in found.items():
                per_layer.setdefault(name, {}).setdefault(key, []).append(float(value))
    result = {name: {key: float(np.mean(v)) for key, v in found.items()}
              for name, found in per_layer.items()}
    for name, found in per_layer.items():
        result[name]["huffman_per_layer"] = [round(v, 4) for v in found["huffman"]]
    return result, checked


def ratios(bits, key_bounds, value_bounds):
    """Projected ratio (fp16 over K bits + V bits) per (K bound, V bound) and row."""
    def pick(kind, bound, name, cost="huffman"):
        models = bits[KIND_NAMES[kind]][str(bound)]
        return models[name][cost] if name in models else models["today"]["huffman"]

    out = {}
    for kb in key_bounds:
        for vb in value_bounds:
            row = {name: 32 / (pick(KEY, kb, name) + pick(VALUE, vb, name)) for name in MODELS}
            row["today_ideal"] = 32 / (pick(KEY, kb, "today", "ideal")
                                      + pick(VALUE, vb, "today", "ideal"))
            row["best"] = 32 / (pick(KEY, kb, BEST[KEY]) + pick(VALUE, vb, BEST[VALUE]))
            out[f"K{kb}/V{vb}"] = row
    return out


ROWS = (  # (label, model, cost); "best" is BEST's model for each kind
    ("v1 today (library-exact)", "today", "huffman"),
    ("today's symbols, ideal entropy", "today", "ideal"),
    ("one codebook per channel", "per_channel", "huffman"),
    ("8 channel classes", "classes8", "huffman"),
    ("temporal delta", "delta", "huffman"),
    ("K: RoPE rotating centre", "rope_centre", "huffman"),
    ("K: rotating centre + 8 classes", "rope_centre_classes8", "huffman"),
    ("V: channel bias + 4 classes x previous token", "value_bias_context", "huffman"),
    ("best: K rotating centre + 8 classes, V bias + context", "best", "huffman"),
)


def markdown(result, block_tokens, key_bounds, value_bounds, ratio_pairs):
    """One table: bits per element per bound, then the projected ratio at ratio_pairs."""
    bits, ratio = result["bits"][f"T{block_tokens}"], result["ratio"][f"T{block_tokens}"]
    columns = [(KEY, b) for b in key_bounds] + [(VALUE, b) for b in value_bounds]
    head = [f"{KIND_NAMES[k]} {b}" for k, b in columns]
    head += [f"ratio K{k}/V{v}" for k, v in ratio_pairs]
    lines = [f"T = {block_tokens}: bits per element (blocks and side info) and projected ratio",
             "", "| model | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for label, name, cost in ROWS:
        cells = []
        for kind, bound in columns:
            models = bits[KIND_NAMES[kind]][str(bound)]
            model = BEST[kind] if name == "best" else name
            cells.append(f"{models[model][cost]:.3f}" if model in models else "—")
        key = "today_ideal" if cost == "ideal" else name
        cells += [f"{ratio[f'K{k}/V{v}'][key]:.2f}" for k, v in ratio_pairs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results" / "entropy_models.json"))
    ap.add_argument("--block-tokens", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--key-bounds", type=float, nargs="+", default=[0.15, 0.25, 0.36],
                    help="absolute K bounds")
    ap.add_argument("--value-bounds", type=float, nargs="+", default=[0.03, 0.07],
                    help="relative V bounds")
    ap.add_argument("--ratio-pairs", nargs="+", default=["0.25/0.07", "0.15/0.03"],
                    help="K/V bound pairs whose ratio the printed tables show (the JSON has "
                         "every pair)")
    args = ap.parse_args(argv)
    start = time.time()
    raw = load()
    result = dict(meta={}, bits={}, ratio={})
    checked = 0
    for t in args.block_tokens:
        per_kind = {}
        for kind, bounds in ((KEY, args.key_bounds), (VALUE, args.value_bounds)):
            per_kind[KIND_NAMES[kind]] = {}
            for bound in bounds:
                bits, n = measure(raw, t, kind, bound)
                per_kind[KIND_NAMES[kind]][str(bound)] = bits
                checked += n
        result["bits"][f"T{t}"] = per_kind
        result["ratio"][f"T{t}"] = ratios(per_kind, args.key_bounds, args.value_bounds)
    result["meta"].update(
        date=time.strftime("%Y-%m-%d"), machine=platform.machine(), cpus=os.cpu_count(),
        python=platform.python_version(), numpy=np.__version__,
        kvcomp=kvcomp_module().version(),
        data=str(DATA.relative_to(REPO)), layers=list(LAYERS),
        calibration_tokens=[0, TOKENS // 2 - 1], measured_tokens=[TOKENS // 2, TOKENS - 1],
        rope_base=ROPE_BASE, library_checked_blocks=checked,
        seconds=round(time.time() - start, 1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    pairs = [tuple(float(b) for b in pair.split("/")) for pair in args.ratio_pairs]
    for t in args.block_tokens:
        print(markdown(result, t, args.key_bounds, args.value_bounds, pairs), end="\n\n")
    print(f"{checked} blocks byte-identical to the library; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
