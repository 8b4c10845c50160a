# SPDX-License-Identifier: Apache-2.0
"""Tests of the Python binding (python/kvcomp) over the C ABI."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kvcomp  # noqa: E402

T, D, H = 64, 64, 3


def _cache(tokens=256, seed=0, dtype=np.float16):
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.2, 6.0, D)  # channels of different spread, like real keys
    x = rng.standard_normal((tokens, H, D)) * scale + rng.standard_normal(D)
    return x.astype(dtype)


def _group_range(x, kind, vgs=D):
    """max - min of each element's quantization group, broadcast to x's shape."""
    t = x.shape[0]
    xb = x.astype(np.float32).reshape(t // T, T, H, D)
    if kind == "key":
        r = xb.max(1, keepdims=True) - xb.min(1, keepdims=True)
        return np.broadcast_to(r, xb.shape).reshape(x.shape)
    xg = xb.reshape(t // T, T, H, D // vgs, vgs)
    r = xg.max(4, keepdims=True) - xg.min(4, keepdims=True)
    return np.broadcast_to(r, xg.shape).reshape(x.shape)


def test_version_and_library():
    assert kvcomp.version().count(".") == 2
    assert Path(kvcomp.library_path()).name.startswith("libkvcomp")


@pytest.mark.parametrize("kind", ["key", "value"])
@pytest.mark.parametrize("eb", [0.01, 0.05, 0.2])
def test_relative_bound_holds_elementwise(kind, eb):
    x = _cache()
    probe = kvcomp.Codec(kind=kind, num_tokens=T, head_dim=D, error_bound=eb)
    cb = kvcomp.build_codebook(probe, x)
    codec = kvcomp.Codec(kind=kind, num_tokens=T, head_dim=D, error_bound=eb, codebook=cb)
    blocks = codec.encode(x)
    assert len(blocks) == (x.shape[0] // T) * H
    y = codec.decode(blocks, dtype=np.float32)
    err = np.abs(y - x.astype(np.float32))
    bound = np.float32(eb) * _group_range(x, kind)
    assert np.all(err <= bound), float((err - bound).max())
    assert blocks.nbytes < x.nbytes


def test_absolute_bound_and_fixed_entropy():
    x = _cache(dtype=np.float32)
    codec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, error_bound=0.1,
                         bound_mode="absolute", entropy="fixed")
    blocks = codec.encode(x)
    y = codec.decode(blocks, dtype=np.float32)
    assert np.abs(y - x).max() <= 0.1
    assert {kvcomp.block_info(blocks.block(i))["encoding"] for i in range(len(blocks))} == \
        {kvcomp.ENCODING_FIXED}


def test_block_sizes_match_headers_and_encoding_is_deterministic():
    x = _cache()
    probe = kvcomp.Codec(kind="value", num_tokens=T, head_dim=D, error_bound=0.05,
                         value_group_size=32)
    cb = kvcomp.build_codebook(probe, x)
    codec = kvcomp.Codec(kind="value", num_tokens=T, head_dim=D, error_bound=0.05,
                         value_group_size=32, codebook=cb)
    a, b = codec.encode(x), codec.encode(x.copy())
    for i in range(len(a)):
        info = kvcomp.block_info(a.block(i))
        assert info["block_bytes"] == a.sizes[i]
        assert info["num_tokens"] == T and info["head_dim"] == D and info["group_size"] == 32
        assert a.block(i) == b.block(i)
        assert a.sizes[i] % 4 == 0
    assert max(a.sizes) <= codec.max_block_bytes()


def test_strided_input_equals_per_head_blocks():
    """A [tokens, heads, dim] cache encodes one block per (token block, head), in that order."""
    x = _cache(128)
    codec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, error_bound=0.05)
    whole = codec.encode(x)
    for h in range(H):
        single = codec.encode(np.ascontiguousarray(x[:, h, :]))
        for blk in range(2):
            assert whole.block(blk * H + h) == single.block(blk)


def test_codebook_serialization_roundtrip():
    x = _cache()
    probe = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, error_bound=0.05)
    cb = kvcomp.build_codebook(probe, x)
    data = cb.serialize()
    assert len(data) == cb.serialized_size
    cb2 = kvcomp.Codebook.deserialize(data)
    assert cb2.id == cb.id
    enc = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, error_bound=0.05, codebook=cb)
    dec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, error_bound=0.05, codebook=cb2)
    blocks = enc.encode(x)
    np.testing.assert_array_equal(dec.decode(blocks), enc.decode(blocks))
    assert any(kvcomp.block_info(blocks.block(i))["encoding"] == kvcomp.ENCODING_HUFFMAN
               for i in range(len(blocks)))
    assert cb.code_length(0) > 0


def test_histogram_counts():
    h = kvcomp.Histogram()
    h.add_counts(-2, [1, 2, 3, 4, 5])
    assert h.total == 15
    cb = kvcomp.Codebook.build(h)
    assert cb.code_length(2) > 0 and cb.code_length(100) == 0


def test_errors_raise_with_status_and_message():
    with pytest.raises(kvcomp.KvcompError) as e:
        kvcomp.Codec(kind="key", num_tokens=0, head_dim=D)
    assert e.value.status == 100 and "num_tokens" in str(e.value)
    with pytest.raises(kvcomp.KvcompError) as e:
        kvcomp.Codebook.deserialize(b"\x00" * 7)
    assert e.value.status in (200, 202)
    x = _cache(64)
    x[3, 1, 5] = np.inf
    codec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D)
    with pytest.raises(kvcomp.KvcompError) as e:
        codec.encode(x)
    assert e.value.status == 105


def test_corrupt_block_is_an_error_not_a_crash():
    x = _cache(64)
    codec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, error_bound=0.05)
    blocks = codec.encode(x)
    blocks.data[blocks.offsets[0] + 16] ^= 0xFF  # the block length field
    with pytest.raises(kvcomp.KvcompError) as e:
        codec.decode(blocks)
    assert 200 <= e.value.status < 300


def test_shape_checks():
    codec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D)
    with pytest.raises(ValueError):
        codec.encode(np.zeros((100, H, D), np.float16))  # not whole blocks
    with pytest.raises(ValueError):
        codec.encode(np.zeros((64, H, 32), np.float16))  # head_dim
    with pytest.raises(TypeError):
        codec.encode(np.zeros((64, H, D), np.float64))


def test_decode_refuses_blocks_that_do_not_fit_together():
    """An EncodedBlocks the caller put together is checked before its pointers reach C."""
    codec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D)
    k = _cache(tokens=4 * T)
    blocks = codec.encode(k)
    assert np.array_equal(codec.decode(blocks), codec.decode(kvcomp.EncodedBlocks(
        blocks.data, blocks.offsets, blocks.sizes, blocks.shape)))
    bad = [
        kvcomp.EncodedBlocks(blocks.data, blocks.offsets, blocks.sizes, (T, 1, D)),  # one block
        kvcomp.EncodedBlocks(blocks.data, blocks.offsets[:1], blocks.sizes, blocks.shape),
        kvcomp.EncodedBlocks(blocks.data, blocks.offsets + blocks.data.nbytes, blocks.sizes,
                             blocks.shape),
        kvcomp.EncodedBlocks(blocks.data, blocks.offsets, blocks.sizes.astype(np.int64) + 2**32,
                             blocks.shape),
        kvcomp.EncodedBlocks(blocks.data.view(np.int8), blocks.offsets, blocks.sizes,
                             blocks.shape),
        kvcomp.EncodedBlocks(blocks.data, blocks.offsets.astype(np.float64), blocks.sizes,
                             blocks.shape),
    ]
    wrapped = blocks.offsets.astype(np.uint64)
    wrapped[0] = np.uint64(2**64 - 8)  # -8 once cast to int64: before data
    bad.append(kvcomp.EncodedBlocks(blocks.data, wrapped, blocks.sizes, blocks.shape))
    for b in bad:
        with pytest.raises(ValueError):
            codec.decode(b)
    frozen = np.frombuffer(bytes(k.nbytes), np.float16).reshape(k.shape)  # read-only
    with pytest.raises(ValueError, match="writeable"):
        codec.decode(blocks, out=frozen)
    assert not frozen.any()


def test_integers_that_c_cannot_hold_are_refused():
    """ctypes would wrap them (2**32 + 1 -> 1) or truncate floats: the binding refuses both."""
    with pytest.raises(ValueError, match="num_tokens"):
        kvcomp.Codec(kind="key", num_tokens=2**32 + T, head_dim=D)
    with pytest.raises(TypeError, match="head_dim"):
        kvcomp.Codec(kind="key", num_tokens=T, head_dim=64.0)
    h = kvcomp.Histogram()
    with pytest.raises(ValueError, match="counts"):
        h.add_counts(0, [3, -1])
    with pytest.raises(ValueError, match="first_symbol"):
        h.add_counts(2**31, [1])
    with pytest.raises(ValueError, match="max_code_length"):
        kvcomp.Codebook.build(h, max_code_length=2**32 + 12)
    with pytest.raises(TypeError, match="float16 or float32"):
        kvcomp.Codec(kind="key", num_tokens=T, head_dim=D).max_block_bytes(np.int8)


def test_handles_of_the_wrong_kind_are_refused():
    """The C functions cannot tell one handle type from another: a Histogram given as a codebook
    (or a Codebook as a histogram) was read as the other's struct, a segfault or worse. The
    binding checks the type, and that the handle is not closed."""
    h = kvcomp.Histogram()
    h.add_counts(-2, [1, 2, 3, 2, 1])
    cb = kvcomp.Codebook.build(h)
    codec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D)
    x = _cache(T)
    for bad in (h, codec, "codebook"):
        with pytest.raises(TypeError, match="codebook"):
            kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, codebook=bad)
    for bad in (cb, codec, 0):
        with pytest.raises(TypeError, match="histogram"):
            kvcomp.Codebook.build(bad)
        with pytest.raises(TypeError, match="histogram"):
            codec.histogram(x, histogram=bad)
    closed = kvcomp.Codebook.deserialize(cb.serialize())
    closed.close()
    with pytest.raises(ValueError, match="closed"):  # not silently a codec without codebook
        kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, codebook=closed)
    assert h.total == 9


def test_arguments_of_the_wrong_form_raise_documented_errors():
    """Unknown enumeration names raise ValueError (were KeyError); a list to encode is taken as
    an array, an output that is not an array and blocks that are not an EncodedBlocks are
    refused (were AttributeError)."""
    for field in ("kind", "bound_mode", "entropy", "block_format"):
        with pytest.raises(ValueError, match=field):
            kvcomp.Codec(**{field: "bogus"}, num_tokens=T, head_dim=D)
    codec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, error_bound=0.5,
                         bound_mode="absolute")
    x = _cache(T, dtype=np.float32)
    with pytest.raises(TypeError, match="float64"):  # a list: float64, as an array
        codec.encode(x.tolist())
    blocks = codec.encode(x)
    assert codec.histogram(x.astype(np.float16)).total == T * H * D
    with pytest.raises(ValueError, match="out"):
        codec.decode(blocks, out=np.zeros(x.shape).tolist())
    with pytest.raises(TypeError, match="EncodedBlocks"):  # was AttributeError
        codec.decode((blocks.data, blocks.offsets, blocks.sizes, blocks.shape))


def test_empty_arrays_allocate_nothing_per_head():
    """An array with no block (0 tokens, or 0 heads) is encoded and decoded without per-head or
    per-block pointer arrays: with 2**31 - 1 heads those took 16 GiB (MemoryError, or 3 GB and
    20 s for 2**31 - 64 tokens of 0 heads). Measured here at 2**24 heads (128 MiB before)."""
    import tracemalloc
    codec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D)
    empty = np.zeros((0, 2**24, D), np.float16)
    tracemalloc.start()
    try:
        blocks = codec.encode(empty)
        assert len(blocks) == 0 and codec.histogram(empty).total == 0
        assert codec.decode(blocks).shape == empty.shape
        no_heads = kvcomp.EncodedBlocks(blocks.data, blocks.offsets, blocks.sizes,
                                        (2**24 * T, 0, D))
        assert codec.decode(no_heads).shape == (2**24 * T, 0, D)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_objects_that_own_a_handle_cannot_be_copied():
    """copy.copy(codebook) gave two objects that each destroyed the same handle when collected
    (a double free: segfault or bus error in the next calls). Copying, deep copying and
    pickling raise TypeError; the original keeps working."""
    import copy
    import gc
    import pickle
    h = kvcomp.Histogram()
    h.add_counts(-2, [1, 2, 3, 2, 1])
    cb = kvcomp.Codebook.build(h)
    codec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, codebook=cb)
    store = kvcomp.Store(num_layers=1, num_kv_heads=1, head_dim=D, block_tokens=T)
    for obj in (h, cb, codec, store):
        for dup in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="cannot be copied"):
                dup(obj)
    gc.collect()
    x = _cache(T)
    assert codec.decode(codec.encode(x)).shape == x.shape
    assert kvcomp.Codebook.deserialize(cb.serialize()).id == cb.id
    assert h.total == 9 and store.add_sequence() == 0


def test_codebooks_are_made_only_by_build_and_deserialize():
    """Codebook(x) took any object as a library handle: Codebook(cb.serialize()) read the bytes
    as a codebook and freed them (a segfault)."""
    cb = kvcomp.Codebook.build(_histogram_of(_cache(T)))
    for arg in (cb.serialize(), cb._h, None):
        with pytest.raises(TypeError, match="Codebook.build"):
            kvcomp.Codebook(arg)
    assert kvcomp.Codebook.deserialize(cb.serialize()).id == cb.id


def _histogram_of(x):
    probe = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, error_bound=0.05)
    return probe.histogram(x)


def test_errors_cross_processes():
    """KvcompError pickles (multiprocessing sends a worker's exceptions so; an error that could
    not be rebuilt left the pool's result waiting forever)."""
    import pickle
    with pytest.raises(kvcomp.KvcompError) as e:
        kvcomp.Codec(kind="key", num_tokens=0, head_dim=D)
    again = pickle.loads(pickle.dumps(e.value))
    assert type(again) is kvcomp.KvcompError
    assert (again.status, str(again)) == (e.value.status, str(e.value))


def test_encoded_blocks_are_packed_and_hold_nothing_else():
    """Blocks lie back to back at 4-byte boundaries, zeros between them: the buffer is what a
    caller stores, and held each block at the largest size it could take, with whatever the
    memory held before in the rest."""
    codec = kvcomp.Codec(kind="value", num_tokens=T, head_dim=D, error_bound=0.05)
    x = _cache(4 * T)
    blocks = codec.encode(x)
    padded = (blocks.sizes.astype(np.int64) + 3) & ~3
    np.testing.assert_array_equal(blocks.offsets, np.cumsum(padded) - padded)
    assert blocks.data.nbytes == padded.sum() < x.nbytes
    gaps = np.ones(blocks.data.nbytes, bool)
    for o, n in zip(blocks.offsets, blocks.sizes):
        gaps[o:o + n] = False
    assert not blocks.data[gaps].any()
    np.testing.assert_array_equal(codec.decode(blocks), codec.decode(codec.encode(x.copy())))


def test_misaligned_arrays_are_copied_or_refused():
    """Arrays at an address their elements cannot sit at (a buffer view at an odd offset): an
    input is copied to aligned memory, an output refused with ValueError; the library refuses
    them (it reads and writes elements as their type)."""
    x = _cache(T)
    raw = np.zeros(x.nbytes + 1, np.uint8)
    odd = np.frombuffer(raw.data, np.float16, count=x.size, offset=1).reshape(x.shape)
    odd[...] = x
    assert not odd.flags.aligned
    codec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, error_bound=0.05)
    blocks = codec.encode(odd)
    assert [blocks.block(i) for i in range(len(blocks))] == \
        [b.block(i) for b in [codec.encode(x)] for i in range(len(b))]
    with pytest.raises(ValueError, match="aligned"):
        codec.decode(blocks, out=odd)
    store = kvcomp.Store(num_layers=1, num_kv_heads=H, head_dim=D, block_tokens=T)
    seq = store.add_sequence()
    store.prefill(seq, odd[None], odd[None])
    keys, _ = store.read(seq, 0)
    np.testing.assert_array_equal(keys, store.read(seq, 0)[0])
    with pytest.raises(ValueError, match="aligned"):
        store.read(seq, 0, keys=odd, values=odd)
