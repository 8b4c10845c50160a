# SPDX-License-Identifier: Apache-2.0
"""Tests of kvcomp.Store (the paged store through the C ABI): round trips, decode steps,
attention against the reference arithmetic, accounting, serialization, and failures that must
change nothing."""
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kvcomp  # noqa: E402

L, H, D, T = 2, 3, 64, 32


def _store(**kw):
    args = dict(num_layers=L, num_kv_heads=H, head_dim=D, block_tokens=T,
                key_bound_mode="absolute", key_error_bound=0.1, value_error_bound=0.05)
    args.update(kw)
    return kvcomp.Store(**args)


def _kv(tokens, seed=0, layers=L):
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.3, 4.0, D)
    k = (rng.standard_normal((layers, tokens, H, D)) * scale).astype(np.float16)
    v = rng.standard_normal((layers, tokens, H, D)).astype(np.float16)
    return k, v


def _reference_attention(q, k, v, scale):
    """The store's documented CPU arithmetic in the same order: per head, dot in channel order
    in double, softmax weights by libm exp, sums in token order. q [Hq, D] fp16; k, v [n, H, D]
    fp32 read-back. Returns [Hq, D] fp16."""
    hq = q.shape[0]
    group = hq // H
    out = np.zeros((hq, D), np.float16)
    for qh in range(hq):
        h = qh // group
        kk, vv = k[:, h].astype(np.float64), v[:, h].astype(np.float64)
        dot = np.zeros(len(kk))
        for d in range(D):
            dot += float(q[qh, d]) * kk[:, d]
        s = float(np.float32(scale)) * dot
        w = np.array([math.exp(x - s.max()) for x in s])
        total = np.cumsum(w)[-1]
        acc = np.cumsum(w[:, None] * vv, axis=0)[-1]
        out[qh] = (acc / total).astype(np.float32).astype(np.float16)
    return out


def test_prefill_read_within_bound_and_tail_exact():
    s = _store()
    k, v = _kv(100)
    seq = s.add_sequence()
    s.prefill(seq, k, v)
    assert [s.sequence_length(seq, layer) for layer in range(L)] == [100, 100]
    for layer in range(L):
        kk, vv = s.read(seq, layer, dtype=np.float32)
        assert kk.shape == (100, H, D)
        assert np.abs(kk - k[layer].astype(np.float32)).max() <= 0.1 + 1e-3
        # The last 100 % 32 = 4 tokens are the uncompressed tail: exact.
        np.testing.assert_array_equal(kk[96:], k[layer, 96:].astype(np.float32))
        np.testing.assert_array_equal(vv[96:], v[layer, 96:].astype(np.float32))
    st = s.stats()
    assert st["num_sequences"] == 1 and st["num_blocks"] == L * 3 * H * 2
    assert st["dense_bytes"] == k.nbytes + v.nbytes
    assert st["tail_bytes"] == 2 * L * 4 * H * D * 2
    assert 0 < st["block_bytes"] <= st["page_bytes"] and st["pages_in_use"] >= 1
    assert s.get_codebook(0, "key") is not None and s.get_codebook(1, "value") is not None


def test_one_layer_prefill_and_decode_steps_equal_a_bulk_prefill():
    """Prefilling layer by layer and appending token by token (batched over sequences) stores
    exactly what one bulk prefill stores: same read-back, same bytes."""
    k, v = _kv(80, seed=1)
    bulk = _store()
    a = bulk.add_sequence()
    bulk.prefill(a, k, v)
    steps = _store()
    b, c = steps.add_sequence(), steps.add_sequence()
    for layer in range(L):  # 40-token prompt per layer (codebooks from its first block)
        steps.prefill(b, k[layer, :40], v[layer, :40], first_layer=layer)
        steps.prefill(c, k[layer, :40], v[layer, :40], first_layer=layer)
    for t in range(40, 80):
        for layer in range(L):
            kb = np.stack([k[layer, t], k[layer, t]])
            vb = np.stack([v[layer, t], v[layer, t]])
            steps.append(layer, [b, c], kb, vb)
    for layer in range(L):
        for seq in (b, c):
            for x, y in zip(steps.read(seq, layer), bulk.read(a, layer)):
                np.testing.assert_array_equal(x, y)
    assert steps.serialize(b) == steps.serialize(c)


@pytest.mark.parametrize("tokens", [0, 5, 64, 77])
def test_attention_equals_reference_arithmetic(tokens):
    s = _store()
    seqs = [s.add_sequence() for _ in range(2)]
    k, v = _kv(max(tokens, 1), seed=tokens)
    if tokens:
        s.prefill(seqs[0], k[:, :tokens], v[:, :tokens])
    s.prefill(seqs[1], *_kv(40, seed=9))
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 2 * H, D)).astype(np.float16)
    for rep in range(2):  # the second call reads the decoded-block cache
        out = s.attention(1, seqs, q, scale=0.125)
        for i, seq in enumerate(seqs):
            kk, vv = s.read(seq, 1, dtype=np.float32)
            if len(kk) == 0:
                np.testing.assert_array_equal(out[i], 0)
            else:
                np.testing.assert_array_equal(out[i], _reference_attention(q[i], kk, vv, 0.125))
    assert s.stats()["decoded_cache_bytes"] >= (tokens // T + 40 // T) * H * T * D * 2 * 4
    # A step that completes a block: the cache takes the new block, still exact.
    more_k, more_v = _kv(T, seed=11, layers=1)
    for t in range(T):
        s.append(1, [seqs[1]], more_k[0, t:t + 1], more_v[0, t:t + 1])
        s.append(0, [seqs[1]], more_k[0, t:t + 1], more_v[0, t:t + 1])
    out = s.attention(1, [seqs[1]], q[1:])
    kk, vv = s.read(seqs[1], 1, dtype=np.float32)
    np.testing.assert_array_equal(out[0], _reference_attention(q[1], kk, vv, 1 / math.sqrt(D)))
    before = s.stats()["decoded_cache_bytes"]
    s.free_sequence(seqs[1])
    assert s.stats()["decoded_cache_bytes"] < before


def test_bfloat16_store_takes_uint16_bits():
    s = _store(dtype="bfloat16")
    seq = s.add_sequence()
    k32 = np.random.default_rng(4).standard_normal((L, 40, H, D)).astype(np.float32)
    bits = (k32.view(np.uint32) >> 16).astype(np.uint16)  # truncation is a valid bf16 value
    s.prefill(seq, bits, bits)
    kk, _ = s.read(seq, 0, dtype="bfloat16")
    assert kk.dtype == np.uint16
    np.testing.assert_array_equal(kk[32:], bits[0, 32:])
    with pytest.raises(TypeError):
        s.prefill(seq, k32.astype(np.float16), k32.astype(np.float16))


def test_serialize_restore_round_trip():
    s = _store()
    seq = s.add_sequence()
    k, v = _kv(70, seed=5)
    s.prefill(seq, k, v)
    data = s.serialize(seq)
    assert len(data) == s.serialized_size(seq)
    # Into the same store and into a fresh store given the same codebooks.
    other = _store()
    for layer in range(L):
        for kind in ("key", "value"):
            other.set_codebook(layer, kind, s.get_codebook(layer, kind))
    for dst in (s, other):
        back = dst.restore(data)
        for layer in range(L):
            for x, y in zip(dst.read(back, layer), s.read(seq, layer)):
                np.testing.assert_array_equal(x, y)
        assert dst.serialize(back) == data
    # Without the codebooks: rejected, nothing added.
    bare = _store()
    with pytest.raises(kvcomp.KvcompError) as e:
        bare.restore(data)
    assert e.value.status == 201 and bare.stats()["num_sequences"] == 0
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0x5A
    with pytest.raises(kvcomp.KvcompError) as e:
        s.restore(bytes(damaged))
    assert e.value.status == 200


def _snapshot(s, seqs):
    st = s.stats()
    reads = [[np.concatenate(s.read(q, layer)) for layer in range(L)] for q in seqs]
    return st, reads


def test_out_of_pages_changes_nothing():
    # The smallest page that holds the largest block (4128 bytes), and 6 of them.
    s = _store(page_bytes=4352, capacity_bytes=6 * 4352, entropy="fixed")
    a, b = s.add_sequence(), s.add_sequence()
    k, v = _kv(40, seed=6)
    s.prefill(a, k[:, :32], v[:, :32])  # one block per (layer, head, K|V): 12 blocks
    s.prefill(b, k[:, :20], v[:, :20])  # tails only
    st0, reads0 = _snapshot(s, [a, b])
    assert st0["pages_in_use"] >= 2
    big_k, big_v = _kv(32 * 8, seed=7)
    with pytest.raises(kvcomp.KvcompError) as e:
        s.prefill(b, big_k, big_v)
    assert e.value.status == kvcomp.STATUS_OUT_OF_PAGES
    assert "page" in str(e.value)
    st1, reads1 = _snapshot(s, [a, b])
    for x, y in zip(reads0, reads1):
        for p, r in zip(x, y):
            np.testing.assert_array_equal(p, r)
    for key in st0:
        if key not in ("last_append_status", "failed_appends"):
            assert st0[key] == st1[key], key
    assert st1["last_append_status"] == kvcomp.STATUS_OUT_OF_PAGES and st1["failed_appends"] == 1
    # Fill the pool with decode steps until one fails: that step appends to no sequence.
    step_k, step_v = _kv(1000, seed=8, layers=1)
    failed = None
    for t in range(1000):
        before = [s.sequence_length(q, 0) for q in (a, b)]
        snap = _snapshot(s, [a, b])
        try:
            s.append(0, [a, b], np.stack([step_k[0, t]] * 2), np.stack([step_v[0, t]] * 2))
        except kvcomp.KvcompError as err:
            failed = err
            break
    assert failed is not None and failed.status == kvcomp.STATUS_OUT_OF_PAGES
    assert [s.sequence_length(q, 0) for q in (a, b)] == before
    after = _snapshot(s, [a, b])
    for x, y in zip(snap[1], after[1]):
        for p, r in zip(x, y):
            np.testing.assert_array_equal(p, r)
    assert {k2: v2 for k2, v2 in snap[0].items() if k2 not in ("last_append_status",
                                                                "failed_appends")} == \
        {k2: v2 for k2, v2 in after[0].items() if k2 not in ("last_append_status",
                                                              "failed_appends")}
    # Freeing a sequence returns its pages: the step now fits.
    s.free_sequence(a)
    s.append(0, [b], step_k[0, t:t + 1], step_v[0, t:t + 1])


def test_bad_arguments_raise_with_status():
    s = _store()
    seq = s.add_sequence()
    k, v = _kv(10)
    with pytest.raises(kvcomp.KvcompError) as e:
        kvcomp.Store(num_layers=0, num_kv_heads=H, head_dim=D)
    assert e.value.status == 100 and "num_layers" in str(e.value)
    with pytest.raises(ValueError):
        kvcomp.Store(num_layers=1, dtype="float8")
    with pytest.raises(kvcomp.KvcompError) as e:
        s.prefill(seq + 100, k, v)
    assert e.value.status == 204
    with pytest.raises(kvcomp.KvcompError) as e:
        s.prefill(seq, k, v, first_layer=1)  # two layers from layer 1
    assert e.value.status == 100
    with pytest.raises(ValueError):
        s.prefill(seq, k[:, :, :2], v[:, :, :2])  # wrong head count
    with pytest.raises(TypeError):
        s.prefill(seq, k.astype(np.float32), v.astype(np.float32))
    with pytest.raises(kvcomp.KvcompError) as e:
        s.append(0, [seq, seq], np.concatenate([k[0, :1]] * 2), np.concatenate([v[0, :1]] * 2))
    assert e.value.status == 100 and "twice" in str(e.value)
    with pytest.raises(ValueError):
        s.append(0, [seq], k[0, :2], v[0, :2])  # two rows for one sequence
    q = np.zeros((1, 2 * H + 1, D), np.float16)
    with pytest.raises(kvcomp.KvcompError) as e:
        s.attention(0, [seq], q)
    assert e.value.status == 100 and "num_q_heads" in str(e.value)
    with pytest.raises(ValueError):
        s.attention(0, [seq, seq], np.zeros((1, H, D), np.float16))
    with pytest.raises(kvcomp.KvcompError) as e:
        s.sequence_length(seq, 5)
    assert e.value.status == 100
    with pytest.raises(ValueError):
        s.free_sequence(seq, stream=1)
    s.free_sequence(seq)
    with pytest.raises(kvcomp.KvcompError) as e:
        s.free_sequence(seq)
    assert e.value.status == 204
    assert s.stats()["num_sequences"] == 0


def test_cuda_stream_argument_forms():
    """A CUDA store takes a stream as a handle or as an object holding one in .cuda_stream
    (torch.cuda.Stream); checked on the conversion itself, which needs no GPU."""
    cuda = types.SimpleNamespace(cuda=True)
    assert kvcomp.Store._stream(cuda, None) is None
    assert kvcomp.Store._stream(cuda, 0x1234).value == 0x1234
    assert kvcomp.Store._stream(cuda, types.SimpleNamespace(cuda_stream=0x5678)).value == 0x5678
    assert kvcomp.Store._stream(cuda, types.SimpleNamespace(cuda_stream=0)) is None  # default
    with pytest.raises(ValueError):
        kvcomp.Store._stream(types.SimpleNamespace(cuda=False),
                             types.SimpleNamespace(cuda_stream=1))


def test_cuda_arrays_of_a_bfloat16_store():
    """A bfloat16 CUDA store takes torch's bfloat16 export ("<V2") and int16/uint16 views, and
    nothing else of two bytes; checked on the pointer extraction, which needs no GPU."""
    def device_array(typestr, shape=(2, 3), dtype=None):
        a = types.SimpleNamespace(__cuda_array_interface__=dict(
            shape=shape, typestr=typestr, data=(0xABC0, False), strides=None, version=3))
        if dtype is not None:
            a.dtype = dtype
        return a
    for typestr in ("<V2", "<i2", "<u2"):
        assert kvcomp._cuda_pointer(device_array(typestr), (2, 3), kvcomp.DTYPE_BF16,
                                    "keys") == 0xABC0
    with pytest.raises(TypeError):
        kvcomp._cuda_pointer(device_array("<f2"), (2, 3), kvcomp.DTYPE_BF16, "keys")
    with pytest.raises(ValueError):
        kvcomp._cuda_pointer(device_array("<V2", (3, 2)), (2, 3), kvcomp.DTYPE_BF16, "keys")
    # torch versions that export bfloat16 as "<f2": the tensor's own dtype decides.
    bf16 = device_array("<f2", dtype="torch.bfloat16")
    with pytest.raises(TypeError, match="torch.bfloat16"):
        kvcomp._cuda_pointer(bf16, (2, 3), kvcomp.DTYPE_FP16, "keys")
    assert kvcomp._cuda_pointer(device_array("<f2", dtype="torch.float16"), (2, 3),
                                kvcomp.DTYPE_FP16, "keys") == 0xABC0


def test_tiles_store_round_trip_attention_and_serialization():
    # Format t1 blocks (T = 32 and D = 64 are tile shapes): no codebooks, the same bound, the
    # same attention arithmetic, serialization exact; a v1 store refuses its sequences.
    s = _store(block_format="tiles")
    k, v = _kv(100, seed=11)
    seq = s.add_sequence()
    s.prefill(seq, k, v)
    for layer in range(L):
        kk, vv = s.read(seq, layer, dtype=np.float32)
        assert np.abs(kk - k[layer].astype(np.float32)).max() <= 0.1
        np.testing.assert_array_equal(kk[96:], k[layer, 96:].astype(np.float32))
        np.testing.assert_array_equal(vv[96:], v[layer, 96:].astype(np.float32))
    st = s.stats()
    assert st["num_blocks"] == L * 3 * H * 2 and st["codebook_bytes"] == 0
    assert 0 < st["block_bytes"] <= st["page_bytes"] and st["block_bytes"] % 16 == 0
    assert s.get_codebook(0, "key") is None
    v1 = _store()
    v1.prefill(v1.add_sequence(), k, v)
    with pytest.raises(kvcomp.KvcompError) as e:
        s.set_codebook(0, "key", v1.get_codebook(0, "key"))
    assert e.value.status == 104  # KVC_ERROR_NOT_SUPPORTED
    q = np.random.default_rng(3).standard_normal((1, 2 * H, D)).astype(np.float16)
    out = s.attention(0, [seq], q, scale=1.0 / math.sqrt(D))
    kk, vv = s.read(seq, 0, dtype=np.float32)
    np.testing.assert_array_equal(out[0], _reference_attention(q[0], kk, vv, 1.0 / math.sqrt(D)))
    data = s.serialize(seq)
    fresh = _store(block_format="tiles")
    fresh.restore(data)
    for layer in range(L):
        for x, y in zip(fresh.read(0, layer), s.read(seq, layer)):
            np.testing.assert_array_equal(x, y)
    assert fresh.serialize(0) == data
    with pytest.raises(kvcomp.KvcompError) as e:
        _store(block_format="v1").restore(data)
    assert e.value.status == 203  # KVC_ERROR_CONFIG_MISMATCH


def test_tiles_store_shape_and_option_checks():
    with pytest.raises(kvcomp.KvcompError) as e:
        _store(block_format="tiles", block_tokens=24)
    assert e.value.status == 104 and "block_format" in str(e.value)
    with pytest.raises(ValueError):
        _store(block_format="huffman")
    with pytest.raises(kvcomp.KvcompError) as e:
        _store(num_substreams=5)
    assert e.value.status == 100 and "num_substreams" in str(e.value)
    # Fewer sub-streams: valid for a v1 store, ignored by a tiles store.
    _store(num_substreams=4)
    _store(block_format="tiles", num_substreams=5)


def _hadamard(n):
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def test_rotated_store_reads_attends_and_serializes_in_the_original_space():
    # Keys with an outlier channel: what the rotation spreads over the row.
    rng = np.random.default_rng(21)
    k, v = _kv(70, seed=4)
    k[..., 5] *= 30
    plain, rotated = _store(entropy="fixed"), _store(entropy="fixed", rotation="hadamard")
    assert kvcomp.StoreConfig().rotation == "none"
    seqs = []
    for s in (plain, rotated):
        seqs.append(s.add_sequence())
        s.prefill(seqs[-1], k, v)
    r = _hadamard(D)
    for layer in range(L):
        kk, vv = rotated.read(seqs[1], layer, dtype=np.float32)
        exact = k[layer].astype(np.float64)
        err = kk - exact
        # The K bound (0.1, absolute) holds on the rotated rows: rotated into that space, every
        # element of the compressed tokens is within it, plus the fp16 rounding of the rows.
        rotated_err = (kk.astype(np.float64) - exact) @ r
        ulp = np.abs(exact @ r) * 2.0 ** -11
        assert np.all(np.abs(rotated_err[:64]) <= 0.1 + ulp[:64] + 1e-4)
        # In the original space: the L2 error per row within sqrt(D) * bound (plus rounding).
        row_err = np.sqrt((err ** 2).sum(-1))
        row_norm = np.sqrt((exact ** 2).sum(-1))
        assert np.all(row_err <= math.sqrt(D) * 0.1 + row_norm * 2.0 ** -10 + 1e-5)
        # Tails carry only the rounding of the rotated rows.
        assert np.all(row_err[64:] <= row_norm[64:] * 2.0 ** -10 + 1e-5)
    q = rng.standard_normal((2, 2 * H, D)).astype(np.float16)
    out = rotated.attention(1, [seqs[1], seqs[1]], q, scale=0.125)
    kk, vv = rotated.read(seqs[1], 1, dtype=np.float32)
    ref = _reference_attention(q[0], kk, vv, 0.125).astype(np.float32)
    np.testing.assert_allclose(out[0].astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    # Without the query rotated, the output would be unrelated: check it is the right one.
    wrong = _reference_attention(q[0], (kk @ r).astype(np.float32), vv, 0.125)
    assert np.abs(out[0].astype(np.float32) - wrong.astype(np.float32)).max() > 0.05
    # Serialized: restores into a rotated store, not into a plain one.
    data = rotated.serialize(seqs[1])
    copy = _store(entropy="fixed", rotation="hadamard")
    got = copy.restore(data)
    np.testing.assert_array_equal(copy.read(got, 0, dtype=np.float32)[0],
                                  rotated.read(seqs[1], 0, dtype=np.float32)[0])
    with pytest.raises(kvcomp.KvcompError) as e:
        plain.restore(data)
    assert "rotated" in str(e.value)
    with pytest.raises(kvcomp.KvcompError):
        _store(head_dim=48, rotation="hadamard")
    with pytest.raises(ValueError):
        _store(rotation="givens")


@pytest.mark.parametrize("block_format", ["v1", "tiles"])
@pytest.mark.parametrize("rotation", ["none", "hadamard", "hadamard_values"])
@pytest.mark.parametrize("sinks", [0, 3])
def test_block_sizes_read_every_serialized_version(block_format, rotation, sinks):
    """Store.block_sizes walks the serialized sequence of every version a store writes (1 and
    2: v1 and tile blocks, 3: rotated rows, 4: sinks): its sizes add up to the store's block
    bytes, and reads give the sinks exactly."""
    s = _store(entropy="fixed", block_format=block_format, rotation=rotation, sink_tokens=sinks)
    k, v = _kv(2 * T + 5, seed=7)
    seq = s.add_sequence()
    s.prefill(seq, k, v)
    version = int(np.frombuffer(s.serialize(seq)[4:8], "<u4")[0])
    assert version == (4 if sinks else 3 if rotation != "none" else
                       2 if block_format == "tiles" else 1)
    sizes = s.block_sizes(seq)
    assert [x.shape for x in sizes] == [(2, H, 2)] * L
    assert sum(int(x.sum()) for x in sizes) == s.stats()["block_bytes"]
    if sinks and rotation == "none":
        kk, vv = s.read(seq, 1)
        np.testing.assert_array_equal(kk[:sinks], k[1, :sinks])
        np.testing.assert_array_equal(vv[:sinks], v[1, :sinks])


def test_rotating_values_only_keeps_keys_as_given():
    """rotation="hadamard_values": K rows stored as given (the K bound per element, as without
    rotation), V rows rotated (its bound holds in the rotated space), attention as the
    reference over the rows read back."""
    k, v = _kv(70, seed=9)
    s, plain = _store(entropy="fixed", rotation="hadamard_values"), _store(entropy="fixed")
    seq = s.add_sequence()
    s.prefill(seq, k, v)
    plain.prefill(plain.add_sequence(), k, v)
    kk, vv = s.read(seq, 0, dtype=np.float32)
    k_plain, v_plain = plain.read(0, 0, dtype=np.float32)
    np.testing.assert_array_equal(kk, k_plain)  # K: the same blocks as without rotation
    assert np.abs(kk[:64] - k[0, :64].astype(np.float32)).max() <= 0.1
    # V: compressed in the rotated space, so not the plain store's values; within what the
    # bound implies after rotating back (L2 per row; relative 0.05 of each group's range).
    assert not np.array_equal(vv, v_plain)
    exact = v[0].astype(np.float64)
    r = _hadamard(D)
    spread = np.ptp(exact @ r, axis=0).max()
    row_err = np.sqrt(((vv - exact) ** 2).sum(-1))
    assert np.all(row_err[:64] <= math.sqrt(D) * 0.05 * spread + 1e-3)
    q = np.random.default_rng(3).standard_normal((1, 2 * H, D)).astype(np.float16)
    out = s.attention(0, [seq], q, scale=0.125)
    ref = _reference_attention(q[0], kk, vv, 0.125).astype(np.float32)
    np.testing.assert_allclose(out[0].astype(np.float32), ref, rtol=2e-3, atol=2e-3)


def test_layer_scales_give_each_layer_its_bound():
    """key_layer_scales / value_layer_scales: a wrong length is a ValueError naming the field
    (before the library is called); valid scales give each layer the bound scalar * scale (fp32
    multiply), hold within it, change the bytes in the expected direction, and the sequence
    round-trips (serialized version 5) into a store of the same scales only."""
    for field in ("key_layer_scales", "value_layer_scales"):
        for bad in ([1.0] * (L + 1), [1.0] * (L - 1), [], 2.0, [[1.0] * L]):
            with pytest.raises(ValueError, match=field):
                _store(**{field: bad})
    with pytest.raises(kvcomp.KvcompError, match=r"key_layer_scales\[1\]"):
        _store(key_layer_scales=[1.0, 0.0])
    assert kvcomp.StoreConfig().key_layer_scales is None
    ks, vs = [0.5, 2.0], (3.0, 0.25)
    k, v = _kv(2 * T + 5, seed=11)
    k[1], v[1] = k[0], v[0]  # the same rows in both layers: only the bound differs
    s = _store(entropy="fixed", key_layer_scales=ks, value_layer_scales=np.array(vs))
    plain = _store(entropy="fixed")
    seq = s.add_sequence()
    s.prefill(seq, k, v)
    plain.prefill(plain.add_sequence(), k, v)
    for layer in range(L):
        kk, vv = s.read(seq, layer, dtype=np.float32)
        kb = np.float32(0.1) * np.float32(ks[layer])
        vb = np.float32(0.05) * np.float32(vs[layer])  # relative: of each group's range
        assert np.abs(kk - k[layer].astype(np.float32)).max() <= kb
        exact = v[layer].astype(np.float32)
        spread = np.ptp(exact[:2 * T], axis=-1, keepdims=True)
        assert np.all(np.abs(vv[:2 * T] - exact[:2 * T]) <= vb * spread + 1e-6)
    sizes = s.block_sizes(seq)
    k_bytes = [int(x[..., 0].sum()) for x in sizes]
    v_bytes = [int(x[..., 1].sum()) for x in sizes]
    assert k_bytes[0] > k_bytes[1] and v_bytes[0] < v_bytes[1]
    data = s.serialize(seq)
    assert int(np.frombuffer(data[4:8], "<u4")[0]) == 5
    same = _store(entropy="fixed", key_layer_scales=list(ks), value_layer_scales=list(vs))
    back = same.restore(data)
    for layer in range(L):
        for x, y in zip(same.read(back, layer), s.read(seq, layer)):
            np.testing.assert_array_equal(x, y)
    for other in (plain, _store(entropy="fixed", key_layer_scales=ks)):
        with pytest.raises(kvcomp.KvcompError, match="layer_scales"):
            other.restore(data)
    # Scales of 1: the store without scales, byte for byte.
    ones = _store(entropy="fixed", key_layer_scales=[1.0] * L, value_layer_scales=[1.0] * L)
    one_seq = ones.add_sequence()
    ones.prefill(one_seq, k, v)
    assert ones.serialize(one_seq) == plain.serialize(0)


def test_tiles_store_serializes_as_format_v1_on_request():
    """serialized_block_format="v1": a tiles store writes version 6, smaller than its blocks as
    held, which restores into a store of either setting to the same blocks (serialized the same
    as the writer's own) and the same reads; block_sizes says it cannot read such a sequence."""
    k, v = _kv(3 * T + 7, seed=4)
    small = _store(block_format="tiles", serialized_block_format="v1")
    held = _store(block_format="tiles")
    a, b = small.add_sequence(), held.add_sequence()
    small.prefill(a, k, v)
    held.prefill(b, k, v)
    data, as_held = small.serialize(a), held.serialize(b)
    assert int(np.frombuffer(data[4:8], "<u4")[0]) == 6
    assert len(data) < len(as_held)
    back = held.restore(data)
    assert held.serialize(back) == as_held
    for layer in range(L):
        for x, y in zip(held.read(back, layer), held.read(b, layer)):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="serialized_block_format"):
        small.block_sizes(a)
    with pytest.raises(ValueError, match="serialized_block_format"):
        _store(serialized_block_format="huffman")
    with pytest.raises(kvcomp.KvcompError, match="serialized_block_format"):
        _store(block_format="v1", serialized_block_format="tiles")


def test_integers_that_c_cannot_hold_are_refused():
    """Ids, layers and configuration fields that ctypes would wrap (2**32 + 1 -> 1) or truncate
    (0.9 -> 0) are refused before the call: nothing else changes."""
    with pytest.raises(ValueError, match="num_layers"):
        kvcomp.Store(num_layers=2**32 + 2, num_kv_heads=2, head_dim=64)
    store = kvcomp.Store(num_layers=2, num_kv_heads=2, head_dim=64, block_tokens=64)
    a, b = store.add_sequence(), store.add_sequence()
    kv = np.zeros((1, 2, 64), np.float16)
    for call, error in [
            (lambda: store.free_sequence(2**32 + b), ValueError),
            (lambda: store.free_sequence(float(b)), TypeError),
            (lambda: store.append(2**32 + 1, [a], kv, kv), ValueError),
            (lambda: store.append(1.0, [a], kv, kv), TypeError),
            (lambda: store.append(0, [2**32 + a], kv, kv), ValueError),
            (lambda: store.append(0, [0.9], kv, kv), ValueError),
            (lambda: store.sequence_length(a, 2**32), ValueError),
            (lambda: store.read(a, 0, dtype=np.int8), TypeError)]:
        with pytest.raises(error):
            call()
    assert store.stats()["num_sequences"] == 2
    assert store.sequence_length(a) == store.sequence_length(b) == 0


def test_read_only_device_outputs_are_refused():
    """A CUDA output array flagged read-only in __cuda_array_interface__ (data[1]) is refused;
    checked on the pointer extraction, which needs no GPU."""
    def device_array(read_only):
        return types.SimpleNamespace(__cuda_array_interface__=dict(
            shape=(2, 3), typestr="<f2", data=(0xABC0, read_only), strides=None, version=3))
    fp16 = kvcomp.DTYPE_FP16
    assert kvcomp._cuda_pointer(device_array(True), (2, 3), fp16, "keys") == 0xABC0
    assert kvcomp._cuda_pointer(device_array(False), (2, 3), fp16, "out", written=True)
    with pytest.raises(ValueError, match="read-only"):
        kvcomp._cuda_pointer(device_array(True), (2, 3), fp16, "out", written=True)


def test_arguments_of_the_wrong_kind_are_refused():
    """set_codebook took any object with a handle: a Codec given as the codebook was read as
    one by the library (a segfault). Wrong kinds of codebook, enumeration names, configuration
    and read buffers raise TypeError or ValueError, and change nothing."""
    store = _store()
    codec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D)
    for bad in (codec, kvcomp.Histogram(), store, None):
        with pytest.raises(TypeError, match="codebook"):
            store.set_codebook(0, "key", bad)
    with pytest.raises(ValueError, match="kind"):  # was KeyError
        store.set_codebook(0, "keys", kvcomp.Codebook.build(kvcomp.Histogram()))
    with pytest.raises(ValueError, match="kind"):
        store.get_codebook(0, "keys")
    assert store.get_codebook(0, "key") is None
    with pytest.raises(TypeError, match="StoreConfig"):  # was AttributeError
        kvcomp.Store(dict(num_layers=L))
    seq = store.add_sequence()
    store.prefill(seq, *_kv(5))
    with pytest.raises(ValueError, match="keys"):  # a 0-d buffer: was IndexError
        store.read(seq, 0, keys=np.float16(0))
    assert store.sequence_length(seq, 0) == 5
