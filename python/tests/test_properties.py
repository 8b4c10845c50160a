# SPDX-License-Identifier: Apache-2.0
"""Property-based tests of the Python binding (hypothesis): the public surface driven with valid
and invalid arguments, mutated blocks, codebooks and serialized sequences, and random call
sequences on stores.

The properties: every call succeeds or raises one of the documented types (kvcomp.KvcompError,
TypeError, ValueError), never crashes or hangs; a store call that fails changes none of the
store's sequences (their serialized bytes) or statistics (docs/api.md: "Every store call that
changes the store is all or nothing"); corrupt blocks, codebooks and serialized sequences are
refused with KvcompError, and a restored sequence reads and attends without errors; attention
equals softmax attention in double over what read returns (with rotated keys, where the logits
are small enough that the fp32 rotations' rounding cannot move them).

Deterministic (derandomized, no example database) and sized for CI; hypothesis also draws
constants from the local modules a pytest session has imported, so the examples of this file run
alone differ from those of the whole suite, each reproducible. To hunt with more examples,
or with fresh random ones, run it on its own, with faulthandler so a crash names its call:

    KVCOMP_HYPOTHESIS_EXAMPLES=5000 KVCOMP_HYPOTHESIS_RANDOM=1 \
        python -X faulthandler -m pytest -q -p no:cacheprovider python/tests/test_properties.py

KVCOMP_HYPOTHESIS_EXAMPLES sets every test's max_examples; KVCOMP_HYPOTHESIS_RANDOM=1 draws new
examples on each run (hypothesis prints the failing example and its seed).
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import hypothesis
from hypothesis import HealthCheck, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kvcomp  # noqa: E402

DOCUMENTED = (kvcomp.KvcompError, TypeError, ValueError)
_EXAMPLES = int(os.environ.get("KVCOMP_HYPOTHESIS_EXAMPLES", "0"))
_RANDOM = os.environ.get("KVCOMP_HYPOTHESIS_RANDOM", "") == "1"


def _settings(examples):
    return settings(max_examples=_EXAMPLES or examples, derandomize=not _RANDOM, database=None,
                    deadline=None, print_blob=_RANDOM,
                    suppress_health_check=list(HealthCheck))


def _call(fn, *args, **kwargs):
    """(result, None) or (None, the exception), which must be a documented type."""
    try:
        return fn(*args, **kwargs), None
    except hypothesis.errors.HypothesisException:
        raise  # (some are TypeErrors)
    except DOCUMENTED as e:
        return None, e


def _fnv1a(data) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def _reseal(data: bytes) -> bytes:
    """data with its trailing FNV-1a-32 checksum (codebooks, serialized sequences) made right,
    so that a mutation reaches the checks behind it."""
    if len(data) < 8:
        return data
    return data[:-4] + _fnv1a(data[:-4]).to_bytes(4, "little")


_WORDS = [0, 1, 2, 3, 4, 15, 16, 17, 31, 32, 64, 255, 256, 1024, 2**16, 2**24, 2**24 + 1,
          2**31 - 1, 2**31, 2**32 - 1]


@st.composite
def _mutated(draw, data: bytes, reseal=True):
    """data with a few byte, word, truncation and insertion edits, resealed (mostly)."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["bit", "byte", "word", "cut", "insert", "copy"]))
        at = draw(st.integers(0, max(len(b) - 1, 0)))
        if op == "bit" and b:
            b[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and b:
            b[at] = draw(st.integers(0, 255))
        elif op == "word" and len(b) >= 4:
            at = min(at // 4 * 4, len(b) - 4)
            b[at:at + 4] = draw(st.sampled_from(_WORDS)).to_bytes(4, "little")
        elif op == "cut":
            del b[at:at + draw(st.sampled_from([1, 4, 16, len(b)]))]
        elif op == "insert":
            b[at:at] = bytes(draw(st.sampled_from([1, 4, 8, 64])))
        elif op == "copy" and b:
            n = draw(st.integers(1, 64))
            src = draw(st.integers(0, max(len(b) - n, 0)))
            b[at:at + n] = b[src:src + n]
    out = bytes(b)
    return _reseal(out) if reseal and draw(st.booleans()) or reseal == "always" else out


# ---- values and arrays ------------------------------------------------------------------------

_JUNK_INTS = [-1, 0, 2**31 - 1, 2**31, -2**31 - 1, 2**32 + 16, 2**63, 2**64]
_JUNK = [None, 1.5, "16", [16], np.float64(16.0)]


def _int_arg(valid):
    """Mostly one of the valid integers, sometimes any integer or not an integer at all."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(valid),
                     st.sampled_from(_JUNK_INTS), st.integers(-3, 70), st.sampled_from(_JUNK))


def _enum_arg(names, count):
    return st.one_of(st.sampled_from(names), st.sampled_from(names),
                     st.integers(-1, count), st.sampled_from(["", "bogus", None, 1.0, 2**40]))


_FLOATS = st.one_of(st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0]),
                    st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from([0.0, -0.1, 1.5, 1e-30, 3.4e38, 1e300, float("nan"), "x",
                                     None]))


@st.composite
def _values(draw, shape, dtype, finite=True):
    """float values of a few magnitudes (and some inf/NaN unless finite), as dtype."""
    n = int(np.prod(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 30.0, 6e4]))
    x = np.clip(rng.standard_normal(n) * scale + draw(st.sampled_from([0.0, 1.0, -500.0])),
                -6e4, 6e4)
    if n and not finite and draw(st.booleans()):
        x[draw(st.integers(0, n - 1))] = draw(st.sampled_from([np.inf, -np.inf, np.nan, 1e6]))
    if np.dtype(dtype) == np.uint16:  # bfloat16 bits
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).reshape(shape)
    with np.errstate(over="ignore"):
        return x.astype(dtype).reshape(shape)


@st.composite
def _layout(draw, x):
    """x as given, or the same values in another memory layout (copied to reversed, strided,
    Fortran order, unaligned, read-only or non-native byte order arrays)."""
    how = draw(st.sampled_from(["same", "same", "reversed", "strided", "fortran", "unaligned",
                                "readonly", "swapped"]))
    if how == "reversed" and x.ndim:
        y = np.ascontiguousarray(x[::-1])[::-1]
    elif how == "strided" and x.ndim:
        y = np.repeat(x, 2, axis=0)[::2]
    elif how == "fortran":
        y = np.asfortranarray(x)
    elif how == "unaligned":
        buf = np.zeros(x.nbytes + 1, np.uint8)
        y = np.frombuffer(buf.data, dtype=x.dtype, count=x.size, offset=1).reshape(x.shape)
        y[...] = x
    elif how == "readonly":
        y = x.copy()
        y.flags.writeable = False
    elif how == "swapped":
        y = x.astype(x.dtype.newbyteorder())
    else:
        y = x
    return y


# ---- histograms and codebooks -----------------------------------------------------------------

def _codebook(seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    h = kvcomp.Histogram()
    counts = np.round(1000 * np.exp(-np.arange(-20, 21) ** 2 / (2 * spread ** 2))) + \
        rng.integers(0, 3, 41)
    h.add_counts(-20, counts.astype(np.uint64))
    cb = kvcomp.Codebook.build(h)
    h.close()
    return cb


_CODEBOOK_BYTES = _codebook().serialize()


@_settings(150)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@hypothesis.given(st.lists(st.tuples(
    st.one_of(st.integers(-2**15 - 4, 2**15 + 4), st.sampled_from(_JUNK_INTS + _JUNK)),
    st.one_of(st.lists(st.integers(0, 2**64 - 1), max_size=6),
              st.lists(st.integers(-3, 2**65), max_size=4),
              st.sampled_from([[], [1.5], ["a"], np.array([[1, 2], [3, 4]]), 7, None,
                               np.array([2**63] * 3, np.uint64)]))), max_size=4),
    st.one_of(st.integers(-1, 17), st.sampled_from(_JUNK_INTS)),
    st.one_of(st.integers(-1, 4097), st.sampled_from(_JUNK_INTS)))
def test_histogram_counts_and_codebook_build(adds, max_code_length, max_symbols):
    """add_counts with any symbols and counts adds them all or (a documented error) none; a
    codebook built from any histogram and limits serializes and parses back."""
    h = kvcomp.Histogram()
    total = 0
    for first, counts in adds:
        _, err = _call(h.add_counts, first, counts)
        if err is None:
            total += int(np.sum(np.asarray(counts, dtype=object))) if np.size(counts) else 0
        assert h.total == total  # a failed add changes nothing
    cb, err = _call(kvcomp.Codebook.build, h, max_code_length, max_symbols)
    if err is None:
        data = cb.serialize()
        assert len(data) == cb.serialized_size and cb.id == _fnv1a(data[:-4])
        assert kvcomp.Codebook.deserialize(data).serialize() == data
        for symbol in (-2**31, -1, 0, 5, 2**31 - 1):
            assert 0 <= cb.code_length(symbol) <= 15


@_settings(300)
@hypothesis.given(st.one_of(st.binary(max_size=80), _mutated(_CODEBOOK_BYTES)),
                  st.integers(0, 2**32 - 1))
def test_codebook_from_any_bytes(data, seed):
    """Any bytes deserialize to a codebook that re-serializes to the same bytes, or fail with
    KvcompError; a codebook that parses encodes and decodes like any other."""
    cb, err = _call(kvcomp.Codebook.deserialize, data)
    if err is not None:
        assert isinstance(err, kvcomp.KvcompError), err
        return
    assert cb.serialize() == data and cb.id == _fnv1a(data[:-4])
    x = np.random.default_rng(seed).standard_normal((32, 16)).astype(np.float16)
    codec = kvcomp.Codec(kind="key", num_tokens=16, head_dim=16, error_bound=0.1,
                         bound_mode="absolute", entropy="huffman", codebook=cb)
    y = codec.decode(codec.encode(x), dtype=np.float32).reshape(x.shape)
    assert np.abs(y - x.astype(np.float32)).max() <= 0.1 + 1e-6


# ---- codecs -----------------------------------------------------------------------------------

@_settings(300)
@hypothesis.given(
    kind=_enum_arg(["key", "value", "k", "v"], 2), num_tokens=_int_arg([16, 32, 1, 1024]),
    head_dim=_int_arg([16, 64, 3]), error_bound=_FLOATS,
    bound_mode=_enum_arg(["absolute", "relative"], 2),
    entropy=_enum_arg(["auto", "fixed", "huffman"], 3), value_group_size=_int_arg([0, 8, 16]),
    num_substreams=_int_arg([0, 1, 4, 32]), block_format=_enum_arg(["v1", "tiles"], 3),
    tile_permute_channels=st.sampled_from([True, False, 0, 1, 2, None]),
    tile_split_widths=st.sampled_from([True, False, 0, 1, -1]),
    codebook=st.sampled_from([None, "codebook", "histogram", "closed"]),
    dtype=st.sampled_from([np.float16, np.float32, np.float64, np.int8, "float16", None]))
def test_codec_config_fields(kind, num_tokens, head_dim, error_bound, bound_mode, entropy,
                             value_group_size, num_substreams, block_format,
                             tile_permute_channels, tile_split_widths, codebook, dtype):
    """Codec(...) with any field values builds a codec or raises a documented error; a codec
    that builds encodes a block and decodes it back."""
    if codebook == "codebook":
        codebook = _codebook()
    elif codebook == "histogram":  # not a codebook: refused before its handle reaches C
        codebook = kvcomp.Histogram()
    elif codebook == "closed":
        codebook = _codebook()
        codebook.close()
    codec, err = _call(kvcomp.Codec, kind=kind, num_tokens=num_tokens, head_dim=head_dim,
                       error_bound=error_bound, bound_mode=bound_mode, entropy=entropy,
                       value_group_size=value_group_size, num_substreams=num_substreams,
                       codebook=codebook, block_format=block_format,
                       tile_permute_channels=tile_permute_channels,
                       tile_split_widths=tile_split_widths)
    if err is not None:
        return
    cap, err = _call(codec.max_block_bytes, dtype)
    assert err is None or dtype not in (np.float16, np.float32, "float16")
    if codec.num_tokens * codec.head_dim > 64 * 64:
        return  # valid but large: the encode below is for small blocks
    x = np.random.default_rng(1).standard_normal((codec.num_tokens, 2, codec.head_dim))
    blocks = codec.encode(x.astype(np.float16))
    assert len(blocks) == 2 and int(blocks.sizes.max()) <= codec.max_block_bytes()
    y = codec.decode(blocks)
    assert y.shape == x.shape and np.isfinite(y.astype(np.float32)).all()


@st.composite
def _codec_setup(draw):
    """A valid codec of a small shape, with a codebook where it can use one."""
    kind = draw(st.sampled_from(["key", "value"]))
    head_dim = draw(st.sampled_from([16, 64]))
    block_format = draw(st.sampled_from(["v1", "v1", "tiles"]))
    group = 0 if kind == "key" or block_format == "tiles" else draw(
        st.sampled_from([0, 8, head_dim]))
    bound_mode = draw(st.sampled_from(["absolute", "relative"]))
    eb = draw(st.sampled_from([0.01, 0.1, 0.5] if bound_mode == "absolute" else
                              [0.01, 0.05, 1.0]))
    entropy = draw(st.sampled_from(["auto", "fixed", "huffman"]))
    use_book = entropy == "huffman" or draw(st.booleans())
    args = dict(kind=kind, num_tokens=16, head_dim=head_dim, error_bound=eb,
                bound_mode=bound_mode, entropy=entropy, value_group_size=group,
                block_format=block_format,
                num_substreams=draw(st.sampled_from([0, 0, 1, 2, 4])),
                tile_permute_channels=draw(st.booleans()), tile_split_widths=draw(st.booleans()))
    book = None
    if use_book:
        probe = kvcomp.Codec(**{**args, "entropy": "fixed", "block_format": "v1"})
        sample = draw(_values((64, 2, head_dim), np.float16))
        book = kvcomp.build_codebook(probe, sample)
    return kvcomp.Codec(**args, codebook=book), args


@_settings(250)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@hypothesis.given(_codec_setup(), st.data())
def test_encode_decode_any_array(setup, data):
    """encode and histogram take any array (dtype, shape, layout, values): a documented error
    or blocks that decode within the bound (absolute mode) into any valid output."""
    codec, args = setup
    d = args["head_dim"]
    dtype = data.draw(st.sampled_from([np.float16, np.float16, np.float32, np.float64, np.int8,
                                       np.uint16, np.bool_]))
    tokens = data.draw(st.sampled_from([0, 16, 32, 16, 17]))
    shape = data.draw(st.sampled_from([(tokens, 2, d), (tokens, d), (tokens, 1, d),
                                       (tokens, 2, d + 1), (tokens, 1, 2, d), (d,), (),
                                       (0, 2**31 - 1, d), (tokens, 0, d)]))
    x = data.draw(_layout(data.draw(_values(shape, dtype, finite=False))))
    if data.draw(st.booleans()):
        _call(codec.histogram, x)
    blocks, err = _call(codec.encode, x)
    if err is not None:
        return
    assert blocks.nbytes == int(blocks.sizes.sum()) and all(s % 4 == 0 for s in blocks.sizes)
    assert len(blocks) == 0 or int(blocks.sizes.max()) <= codec.max_block_bytes(x.dtype)
    out_dtype = data.draw(st.sampled_from([np.float16, np.float32]))
    y = codec.decode(blocks, dtype=out_dtype)
    x3 = np.asarray(x, np.float64).reshape(y.shape)
    assert np.isfinite(y).all()
    if args["bound_mode"] == "absolute" and out_dtype == np.float32:
        slack = np.abs(x3) * 2.0 ** -22 + 1e-6
        assert np.all(np.abs(y - x3) <= args["error_bound"] * (1 + 2.0 ** -20) + slack)
    # The same blocks into an output given in another form.
    out = data.draw(st.sampled_from(["2d", "readonly", "fortran", "float64", "list", "wide"]))
    if out == "2d":
        out = np.empty((y.shape[0], y.shape[2]), np.float16)
    elif out == "readonly":
        out = np.zeros(y.shape, np.float16)
        out.flags.writeable = False
    elif out == "fortran":
        out = np.asfortranarray(np.zeros(y.shape, np.float32))
    elif out == "float64":
        out = np.zeros(y.shape, np.float64)
    elif out == "list":
        out = np.zeros(y.shape).tolist()
    else:
        out = np.zeros(y.shape[:2] + (y.shape[2] + 1,), np.float32)
    got, err = _call(codec.decode, blocks, out=out)
    if err is None:
        np.testing.assert_array_equal(np.asarray(got).reshape(y.shape).astype(np.float32),
                                      codec.decode(blocks, dtype=np.asarray(got).dtype)
                                      .astype(np.float32))
    else:
        assert not isinstance(err, kvcomp.KvcompError), err


@st.composite
def _array_mutation(draw, a, length):
    """An integer array like a (offsets or sizes), mostly a few entries changed, sometimes
    another dtype or shape, or not integers."""
    how = draw(st.sampled_from(["entry", "entry", "entry", "dtype", "shape", "float"]))
    b = np.array(a)
    if how == "entry" and len(b):
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(b) - 1))
            v = draw(st.one_of(st.integers(-8, length + 8), st.sampled_from(
                [int(x) for x in a] + [-2**31, 2**32 - 1, 2**32, 2**63 - 1])))
            b = b.astype(np.int64) if v < 0 or v > np.iinfo(b.dtype).max else b
            b[i] = v
        return b
    if how == "dtype":
        return b.astype(draw(st.sampled_from([np.uint8, np.int16, np.uint64, np.int32])))
    if how == "shape":
        return draw(st.sampled_from([b[:-1], np.concatenate([b, b[:1]]), b.reshape(1, -1)]))
    return b.astype(np.float64)


@_settings(300)
@hypothesis.given(_codec_setup(), st.data())
def test_decode_mutated_blocks(setup, data):
    """Decoding blocks whose bytes, offsets, sizes, shape or data array were changed raises a
    documented error or decodes; changed bytes alone (the rest consistent) raise KvcompError
    only, with a data status."""
    codec, args = setup
    x = data.draw(_values((32, 2, args["head_dim"]), np.float16))
    blocks = codec.encode(x)
    length = blocks.data.nbytes
    raw = bytes(blocks.data)
    what = data.draw(st.sampled_from(["bytes", "bytes", "bytes", "offsets", "sizes", "shape",
                                      "data", "codec"]))
    offsets, sizes, shape, arr, other = blocks.offsets, blocks.sizes, blocks.shape, None, codec
    if what == "bytes":
        arr = np.frombuffer(bytearray(data.draw(_mutated(raw, reseal=False))), np.uint8)
        if len(arr) != length:
            arr = np.resize(arr, length)
    elif what == "offsets":
        offsets = data.draw(_array_mutation(offsets, length))
    elif what == "sizes":
        sizes = data.draw(_array_mutation(sizes, length))
    elif what == "shape":
        shape = data.draw(st.sampled_from([(0, 2, 16), (16, 4, args["head_dim"]),
                                           (-16, -2, args["head_dim"]), (32, 2), (32, 2.0, 16),
                                           (48, 2, args["head_dim"]), (2**31, 0, 16),
                                           (2**31 - 16, 0, args["head_dim"]),
                                           (0, 2**31 - 1, args["head_dim"])]))
    elif what == "data":
        arr = data.draw(st.sampled_from([blocks.data.view(np.int8), blocks.data[::2],
                                         blocks.data.reshape(1, -1), blocks.data[:length // 2],
                                         blocks.data.astype(np.uint16), raw]))
    else:  # decoded by a codec of another kind, shape or codebook
        other_args = dict(args)
        change = data.draw(st.sampled_from(["kind", "head_dim", "codebook", "format"]))
        if change == "kind":
            other_args["kind"] = "value" if args["kind"] == "key" else "key"
            other_args["value_group_size"] = 0
        elif change == "head_dim":
            other_args["head_dim"] = 80 - args["head_dim"]
            other_args["value_group_size"] = 0
        elif change == "format":
            other_args["block_format"] = "tiles" if args["block_format"] == "v1" else "v1"
            other_args["value_group_size"] = 0
        other_args["entropy"] = "auto"
        book = _codebook(seed=1) if change == "codebook" else codec.codebook
        other = kvcomp.Codec(**other_args, codebook=book)
        shape = (shape[0], shape[1], other.head_dim)
    if arr is None:
        arr = blocks.data
    mutated = kvcomp.EncodedBlocks(arr, offsets, sizes, shape)
    if what != "bytes" and data.draw(st.integers(0, 9)) == 0:  # not an EncodedBlocks
        mutated = data.draw(st.sampled_from([None, (arr, offsets, sizes, shape), arr]))
    _, err = _call(other.decode, mutated)
    if what == "bytes" and err is not None:
        assert isinstance(err, kvcomp.KvcompError) and 200 <= err.status < 300, err
    if what == "bytes":  # and each block alone, through the header parser
        for i in range(len(blocks)):
            o, n = int(blocks.offsets[i]), int(blocks.sizes[i])
            _call(kvcomp.block_info, arr[o:o + n].tobytes())
            _call(kvcomp.block_info, arr[o:].tobytes())


# ---- stores -----------------------------------------------------------------------------------

@st.composite
def _store_config(draw, junk=True):
    """A small StoreConfig: mostly valid values, sometimes one field out of range or of the
    wrong type."""
    d = draw(st.sampled_from([16, 64]))
    layers = draw(st.sampled_from([1, 2]))
    fmt = draw(st.sampled_from(["v1", "v1", "tiles", "auto"]))
    cfg = dict(
        num_layers=layers, num_kv_heads=draw(st.sampled_from([1, 2])), head_dim=d,
        dtype=draw(st.sampled_from(["float16", "float16", "bfloat16"])), block_tokens=16,
        key_bound_mode=draw(st.sampled_from(["absolute", "relative"])),
        key_error_bound=draw(st.sampled_from([0.05, 0.2])),
        value_bound_mode=draw(st.sampled_from(["absolute", "relative"])),
        value_error_bound=draw(st.sampled_from([0.02, 0.1])),
        value_group_size=0 if fmt == "tiles" else draw(st.sampled_from([0, 0, 8])),
        entropy=draw(st.sampled_from(["auto", "auto", "fixed", "huffman"])),
        page_bytes=draw(st.sampled_from([0, 2304, 2304, 4352])),
        max_sequences=draw(st.sampled_from([0, 0, 2, 3])),
        max_sequence_tokens=draw(st.sampled_from([0, 0, 40])),
        block_format=fmt, tile_permute_channels=draw(st.sampled_from([0, 1])),
        tile_split_widths=draw(st.sampled_from([0, 1])),
        num_substreams=draw(st.sampled_from([0, 0, 2])),
        rotation=draw(st.sampled_from(["none", "none", "hadamard", "hadamard_values"])),
        sink_tokens=draw(st.sampled_from([0, 0, 3])),
        key_layer_scales=draw(st.sampled_from([None, None, [0.5] * layers])),
        value_layer_scales=draw(st.sampled_from([None, None, [2.0] * layers])),
        serialized_block_format=draw(st.sampled_from(["auto", "auto", "v1"])))
    cfg["capacity_bytes"] = (cfg["page_bytes"] or 1 << 16) * draw(st.sampled_from([1, 3, 8, 64]))
    if junk and draw(st.integers(0, 3)) == 0:
        field = draw(st.sampled_from(sorted(cfg)))
        cfg[field] = draw(st.one_of(st.sampled_from(_JUNK_INTS + _JUNK + ["bogus", 2.0, -0.5]),
                                    st.integers(-2, 300), st.sampled_from([[1.0], [0.0, 1.0],
                                                                           [np.nan] * 2])))
    return cfg


def _attention(q, k, v, scale, limit):
    """softmax(scale * q K^T) V per query head (grouped over the kv-heads), in float64, rounded
    to fp32 and saturated at limit (the largest value of the store's dtype) as the store does;
    zeros for no tokens. q [Hq, D], k and v [n, H, D]."""
    hq, (n, h, _) = q.shape[0], k.shape
    if n == 0:
        return np.zeros(q.shape)
    kv = np.arange(hq) // (hq // h)
    logits = np.float64(np.float32(scale)) * np.einsum("qd,nqd->qn", q, k[:, kv].astype(
        np.float64))
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    out = np.einsum("qn,nqd->qd", w, v[:, kv].astype(np.float64)) / w.sum(axis=1)[:, None]
    return np.clip(out.astype(np.float32), -limit, limit).astype(np.float64)


def _state(store, live):
    """What a failed call must leave as it was: every live sequence's bytes and the stats
    (but the failure record, and the decoded-block cache, which a failed attention may fill:
    docs/api.md, kvc_store_get_stats)."""
    stats = store.stats()
    for k in ("last_append_status", "failed_appends", "decoded_cache_bytes"):
        del stats[k]
    return stats, {s: store.serialize(s) for s in sorted(live)}


class _Run:
    """One random call on a store (arguments valid or not), checked against a model of the
    sequences' lengths."""

    def __init__(self, store, cfg, data):
        self.store, self.cfg, self.data = store, cfg, data
        self.live = {}  # id -> [length per layer]
        self.gone = set()
        self.L, self.H, self.D = store.num_layers, store.num_kv_heads, store.head_dim
        self.dtype = np.float16 if store.dtype_code == kvcomp.DTYPE_FP16 else np.uint16

    def draw(self, strategy):
        return self.data.draw(strategy)

    def bad(self):
        """Whether to make this argument wrong (one time in ten)."""
        return self.draw(st.integers(0, 9)) == 0

    def seq_id(self):
        known = sorted(self.live) * 3 + sorted(self.gone)
        if known and not self.bad():
            return self.draw(st.sampled_from(known))
        return self.draw(st.sampled_from([0, 1, -1, 2**31 - 1, 1000, 2**31, 1.0, None, "0"]))

    def layer(self):
        if self.bad():
            return self.draw(st.sampled_from([-1, self.L, 2**31, 1.0, None]))
        return self.draw(st.integers(0, self.L - 1))

    def rows(self, shape, finite=True):
        dtype = self.draw(st.sampled_from([np.float32, np.int16])) if self.bad() else self.dtype
        if self.bad():
            shape = self.draw(st.sampled_from([shape[:-1] + (shape[-1] + 1,), shape[1:],
                                               (0,) + shape[1:], shape + (1,)]))
        x = self.draw(_values(shape, dtype, finite=finite or not self.bad()))
        return self.draw(_layout(x)) if self.bad() else x

    def op_add(self):
        s = self.store.add_sequence()
        assert s not in self.live and s not in self.gone and s >= 0
        self.live[s] = [0] * self.L

    def op_free(self):
        s = self.seq_id()
        self.store.free_sequence(s)
        del self.live[s]
        self.gone.add(s)

    def op_prefill(self):
        s = self.seq_id()
        first = self.draw(st.sampled_from([-1, self.L])) if self.bad() else self.layer()
        layers = self.draw(st.sampled_from([None, 1, self.L]))
        tokens = self.draw(st.sampled_from([0, 1, 5, 16, 20, 35]))
        shape = (tokens, self.H, self.D) if layers is None else (layers, tokens, self.H, self.D)
        k = self.rows(shape, finite=False)
        v = k if self.draw(st.booleans()) else self.rows(shape)
        self.store.prefill(s, k, v, first_layer=first)
        n, tokens = (1, k.shape[0]) if k.ndim == 3 else k.shape[:2]
        for layer in range(first, first + n):
            if tokens:  # (0 tokens: no call on the sequence, which may be unknown)
                self.live[s][layer] += tokens

    def op_append(self):
        ids = [self.seq_id() for _ in range(self.draw(st.integers(0, 3)))]
        layer = self.layer()
        k = self.rows((len(ids), self.H, self.D), finite=False)
        v = self.rows((len(ids), self.H, self.D))
        self.store.append(layer, ids, k, v)
        for s in ids:
            self.live[s][layer] += 1

    def op_read(self):
        s, layer = self.seq_id(), self.layer()
        dtype = self.draw(st.sampled_from([np.float16, np.float32, "bfloat16", "bf16", np.int8,
                                           "float32", "half"]))
        given = self.draw(st.sampled_from([None, None, 0, -1, +1, "scalar"]))
        keys = values = None
        if given is not None and s in self.live and layer in range(self.L):
            if given == "scalar":
                keys = np.float16(0)
            else:
                n = max(self.live[s][layer] + given, 0)
                np_dtype = np.uint16 if dtype in ("bfloat16", "bf16") else dtype
                keys = np.zeros((n, self.H, self.D), np_dtype)
                values = np.zeros_like(keys)
        k, v = self.store.read(s, layer, dtype=dtype, keys=keys, values=values)
        assert k.shape[0] >= self.live[s][layer] and k.shape == v.shape
        if k.dtype != np.uint16:
            assert np.isfinite(k[:self.live[s][layer]].astype(np.float32)).all()

    def op_attention(self):
        ids = [self.seq_id() for _ in range(self.draw(st.sampled_from([0, 1, 1, 2, 3])))]
        group = self.draw(st.sampled_from([0, 65] if self.bad() else [1, 2]))
        shape = (len(ids), group * self.H, self.D)
        if self.bad():
            shape = self.draw(st.sampled_from([(len(ids), self.H, self.D + 1), (len(ids),
                                               self.H), (len(ids) + 1, self.H, self.D)]))
        q = self.rows(shape)
        scale = self.draw(st.sampled_from([0.0, -1.0, 1e30, float("nan"), float("inf"), "0.5"]
                                          if self.bad() else [None, 0.125, 1.0]))
        layer = self.layer()
        out = self.store.attention(layer, ids, q, scale=scale)
        assert out.shape == q.shape  # (rows() may have changed the shape it was given)
        rotated_keys = (kvcomp._ROTATIONS.get(self.cfg["rotation"], self.cfg["rotation"])
                        == kvcomp.ROTATION_HADAMARD)
        scale = 1 / np.sqrt(self.D) if scale is None else float(scale)
        for i, sid in enumerate(ids):  # the documented arithmetic over what read returns
            k, v = self.store.read(sid, layer, dtype=np.float32)
            qi = self._float(q[i])
            # Rotated keys: the store's logits are (R q) . k', the reference's q . (R k'), each
            # rotation in fp32; checked where their rounding (a few fp32 ulps of |q| |k| D)
            # moves no logit by more than 1e-3.
            logit_error = 1e-6 * scale * self.D * np.abs(qi).max() * np.abs(k).max(initial=0)
            if rotated_keys and not logit_error <= 1e-3:
                hypothesis.event("rotated keys: logits too large to compare")
                continue
            limit = 65504.0 if self.dtype == np.float16 else 3.3895e38
            want = _attention(qi, k, v, scale, limit)
            got = self._float(out[i])
            hypothesis.event(f"attention checked over {'no' if len(k) == 0 else 'some'} tokens"
                             f"{', rotated keys' if rotated_keys else ''}")
            tol = 1e-2 * np.abs(want) + 1e-3 * (1 + np.abs(v).max(initial=0))
            assert np.all(np.abs(got - want) <= tol), (sid, layer, np.abs(got - want).max())

    def _float(self, x):
        """Store-dtype elements as float64 (bfloat16 from its bits)."""
        if x.dtype == np.uint16:
            return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return x.astype(np.float64)

    def op_restore(self):
        if not self.live:
            return
        src = self.draw(st.sampled_from(sorted(self.live)))
        data = self.store.serialize(src)
        data = self.draw(st.one_of(st.just(data), _mutated(data)))
        s = self.store.restore(data)
        assert s not in self.live and s not in self.gone
        self.live[s] = [self.store.sequence_length(s, layer) for layer in range(self.L)]
        for layer in range(self.L):  # restored: reads and attends without errors
            k, v = self.store.read(s, layer, dtype=np.float32)
            assert np.isfinite(k).all() and np.isfinite(v).all()
            q = np.ones((1, self.H, self.D), self.dtype)
            self.store.attention(layer, [s], q)

    def op_codebook(self):
        layer, kind = self.layer(), self.draw(st.sampled_from(["key", "value", 0, 1, 2,
                                                               "keys"]))
        book = self.draw(st.sampled_from(["own", "new", "parsed", "codec", None]))
        if book == "own":
            book, err = _call(self.store.get_codebook, layer, kind)
            if err is not None or book is None:
                return
        elif book == "new":
            book = _codebook(seed=2)
        elif book == "parsed":
            book = kvcomp.Codebook.deserialize(_CODEBOOK_BYTES)
        elif book == "codec":
            book = kvcomp.Codec(num_tokens=16, head_dim=16)
        self.store.set_codebook(layer, kind, book)

    def op_serialize(self):
        s = self.seq_id()
        data = self.store.serialize(s)
        assert len(data) == self.store.serialized_size(s)
        sizes = self.store.block_sizes(s, encodings=self.draw(st.booleans()))
        sizes = sizes[0] if isinstance(sizes, tuple) else sizes
        assert [x.shape for x in sizes] == [(n // self.store.block_tokens, self.H, 2)
                                            for n in self.live[s]]

    def op_length(self):
        s, layer = self.seq_id(), self.layer()
        assert self.store.sequence_length(s, layer) == self.live[s][layer]

    OPS = ["add", "add", "free", "prefill", "prefill", "prefill", "append", "append", "read",
           "attention", "attention", "restore", "restore", "codebook", "length", "serialize"]

    def step(self):
        op = self.draw(st.sampled_from(self.OPS))
        before = _state(self.store, self.live)
        live = {s: list(n) for s, n in self.live.items()}
        _, err = _call(getattr(self, "op_" + op))
        hypothesis.event(f"{op}: {getattr(err, 'status', type(err).__name__) if err else 'ok'}")
        if err is not None:
            self.live = live  # the model keeps what it had
            assert _state(self.store, self.live) == before, (op, err)
        for s, lengths in self.live.items():
            assert [self.store.sequence_length(s, layer) for layer in range(self.L)] == lengths
        assert self.store.stats()["num_sequences"] == len(self.live)


@_settings(300)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@hypothesis.given(_store_config(), st.data())
def test_store_call_sequences(cfg, data):
    """Random calls with valid and invalid arguments on a store of any (small) configuration:
    documented errors only, a failed call changes nothing, lengths follow the calls."""
    store, err = _call(kvcomp.Store, **cfg)
    if err is not None:
        return
    run = _Run(store, cfg, data)
    _call(run.op_add)
    for s in list(run.live):  # a first prefill of every layer, so that later calls find tokens
        tokens = data.draw(st.sampled_from([3, 16, 21, 40]))
        k = data.draw(_values((run.L, tokens, run.H, run.D), run.dtype))
        if _call(store.prefill, s, k, k)[1] is None:
            run.live[s] = [tokens] * run.L
    for _ in range(data.draw(st.integers(1, 12))):
        run.step()
    for s in sorted(run.live):  # every sequence moves to a fresh store with the same codebooks
        fresh = kvcomp.Store(**cfg)
        for layer in range(run.L):
            for kind in ("key", "value"):
                book = store.get_codebook(layer, kind)
                if book is not None:
                    fresh.set_codebook(layer, kind, book)
        t = fresh.restore(store.serialize(s))
        assert [fresh.sequence_length(t, layer) for layer in range(run.L)] == run.live[s]


@_settings(300)
@hypothesis.given(_store_config(junk=False), st.data())
def test_restore_mutated_sequences(cfg, data):
    """A serialized sequence with a few bytes changed (resealed: the checks behind the checksum
    see them) is refused with KvcompError and changes nothing, or restores into a sequence that
    reads and attends; never a crash."""
    store, err = _call(kvcomp.Store, **cfg)
    if err is not None:
        return
    run = _Run(store, cfg, data)
    s = store.add_sequence()
    run.live[s] = [0] * run.L
    tokens = data.draw(st.sampled_from([5, 16, 20, 37]))
    k = data.draw(_values((run.L, tokens, run.H, run.D), run.dtype))
    v = data.draw(_values((run.L, tokens, run.H, run.D), run.dtype))
    if _call(store.prefill, s, k, v)[1] is not None:
        return
    run.live[s] = [tokens] * run.L
    original = store.serialize(s)
    for _ in range(3):
        mutated = data.draw(_mutated(original, reseal="always"))
        others = dict(run.live)
        before = _state(store, others)
        t, err = _call(store.restore, mutated)
        hypothesis.event(f"restore: {getattr(err, 'status', 'ok')}")
        if err is not None:
            assert isinstance(err, kvcomp.KvcompError), err
            assert _state(store, others) == before
            continue
        run.live[t] = [store.sequence_length(t, layer) for layer in range(run.L)]
        for layer in range(run.L):
            kk, vv = store.read(t, layer, dtype=np.float32)
            assert np.isfinite(kk).all() and np.isfinite(vv).all()
            q = np.ones((1, run.H, run.D), run.dtype)
            assert np.isfinite(store.attention(layer, [t], q).astype(np.float32)).all()
        assert _state(store, others)[1] == before[1]  # the other sequences untouched
