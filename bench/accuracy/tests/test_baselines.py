# SPDX-License-Identifier: Apache-2.0
"""Tests of the published-compressor baselines (cache.KVCompPaperCache, cache.PackKVCache): the
error bound on every element, byte counts against hand-computed examples, the fp16 buffer's
schedule and the attention that mixes fp16 and quantized keys. No model; seconds."""
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[2] / "python")]

import cache as C  # noqa: E402
import harness  # noqa: E402


def _kv(n=256, Hk=2, d=16, seed=3):
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal((n, Hk, d)) * rng.uniform(0.1, 8, (1, Hk, d))).astype(np.float16)
    v = (rng.standard_normal((n, Hk, d)) + rng.uniform(-2, 2, (n, 1, 1))).astype(np.float16)
    return k, v


def _check_bound(x, x_hat, T, nt, rel, group):
    """Every element of the compressed rows within half a step of the original, the step at most
    rel times its group's range; the final rounding to fp16 allowed on top."""
    n, Hk, d = x.shape
    xb = x[:nt].astype(np.float32).reshape(nt // T, T, Hk, d)
    axes = C.GROUP_AXES[group]
    rng = xb.max(axes, keepdims=True) - xb.min(axes, keepdims=True)
    step = C.fp16_step_down(np.float32(rel) * rng)
    assert np.all(step <= np.float32(rel) * rng + 2.0 ** -24)
    err = np.abs(x_hat[:nt].astype(np.float32).reshape(xb.shape) - xb)
    half_ulp = np.abs(xb).astype(np.float16).astype(np.float32) * 2.0 ** -11 + 2.0 ** -25
    assert np.all(err <= step / 2 * (1 + 1e-6) + half_ulp), float((err - step / 2).max())
    assert np.array_equal(x_hat[nt:], x[nt:])  # the fp16 buffer untouched


@pytest.mark.parametrize("kg,vg", [("block", "token"), ("channel", "vector"),
                                   ("token", "channel")])
@pytest.mark.parametrize("rel", [0.02, 0.1, 0.4])
def test_kvcomp_paper_error_bound(kg, vg, rel):
    k, v = _kv()
    pol = C.KVCompPaperCache(rel, rel, kt=32, vt=64, kr=64, vr=128, kgroup=kg, vgroup=vg)
    for kind, x, T, g, nt in (("key", k, 32, kg, 224), ("value", v, 64, vg, 192)):
        out, per_block, book, _ = pol.encode(kind, x)
        assert len(per_block) == nt // T and book > 0
        _check_bound(x, out, T, nt, rel, g)


@pytest.mark.parametrize("kg,vg", [("token", "token"), ("vector", "channel")])
@pytest.mark.parametrize("repack", ["greedy", "median", "none"])
def test_packkv_error_bound_and_repacking_changes_bytes_only(kg, vg, repack):
    k, v = _kv()
    rel = 0.15
    pol = C.PackKVCache(rel, rel, block=32, buffer=96, pack=8, repack=repack, kgroup=kg,
                        vgroup=vg)
    k_hat, v_hat, per_block = pol.encode(k, v)
    nt = int(C.compressed_tokens(len(k), 32, 96))
    assert nt == 192
    _check_bound(k, k_hat, 32, nt, rel, kg)
    _check_bound(v, v_hat, 32, nt, rel, vg)
    ref = C.PackKVCache(rel, rel, block=32, buffer=96, pack=8, repack="none", kgroup=kg,
                        vgroup=vg)
    k0, v0, pb0 = ref.encode(k, v)
    assert np.array_equal(k0, k_hat) and np.array_equal(v0, v_hat)
    if repack == "greedy":  # the greedy packs never widen these blocks' packs in total
        assert sum(int(b.sum()) for b in per_block) <= sum(int(b.sum()) for b in pb0)


def test_greedy_repack_is_a_permutation():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 9, (3, 32, 10))
    order = C.greedy_repack(codes, 8)
    assert all(sorted(o) == list(range(32)) for o in order)


def test_compressed_tokens_follows_a_buffer_flushed_a_block_at_a_time():
    for T, R in ((64, 128), (128, 256), (64, 192), (16, 16)):
        buffered, done = 0, 0
        for L in range(1, 700):
            buffered += 1
            while buffered >= R:  # a full buffer sends its oldest block to compression
                buffered -= T
                done += T
            assert C.compressed_tokens(L, T, R) == done, (T, R, L)


def test_huffman_lengths_are_a_complete_prefix_code():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 50, 40)
    counts[3] = 1000
    L = C.huffman_lengths(counts)
    present = counts > 0
    assert np.isclose((2.0 ** -L[present]).sum(), 1.0)  # Kraft equality
    p = counts[present] / counts.sum()
    mean = (p * L[present]).sum()
    entropy = -(p * np.log2(p)).sum()
    assert entropy <= mean < entropy + 1
    assert C.huffman_lengths(np.array([0, 7, 0])).tolist() == [0, 0, 0]


def test_kvcomp_paper_bytes_by_hand():
    # Hk = 1, d = 2, K blocks of 2 tokens, every full block compressed (kr = kt), V fp16.
    k = np.array([[0, 1], [2, 3], [4, 4], [4, 4]], np.float16)[:, None, :]
    v = np.ones((4, 1, 2), np.float16)
    pol = C.KVCompPaperCache(1 / 3, None, kt=2, kr=2)
    out, per_block, book, _ = pol.encode("key", k)
    assert np.array_equal(out, k)  # step 1 (block 0), constant block 1: exact
    # Codes 0,1,2,3 | 0,0,0,0: counts {0: 5, 1: 1, 2: 1, 3: 1} -> lengths 1, 3, 3, 2 bits.
    # Block 0: 9 bits -> 2 bytes; block 1: 4 bits -> 1 byte; + 4 (step, min) + 4 (offset) each.
    assert per_block.tolist() == [10, 9] and book == 4
    pol.begin_window(4)
    pol.attend(0, np.zeros((4, 1, 2), np.float32), k, v)
    assert pol.bytes == 10 + 9 + 4 + 16  # K blocks + codebook, V in fp16
    # Steps t = 1..4: K holds 1 fp16 row (4 B), block 0 + book, + 1 row, both blocks + book.
    assert pol.bytes_time == (4 + 14 + 18 + 23) + 4 * (1 + 2 + 3 + 4)
    assert pol.fp16_bytes == 32
    assert pol.parts == dict(codes=3, metadata=8 + 8 + 4, fp16=16)


@pytest.mark.parametrize("repack,want", [("greedy", 22), ("none", 23)])
def test_packkv_bytes_by_hand(repack, want):
    # One block of 4 tokens, packs of 2, token groups: codes [0,3], [0,0], [0,3], [0,0].
    k = np.array([[0, 3], [1, 1], [0, 3], [1, 1]], np.float16)[:, None, :]
    v = np.ones((4, 1, 2), np.float16)
    pol = C.PackKVCache(1 / 3, None, block=4, buffer=4, pack=2, repack=repack)
    # Raw codes need 2 bits: each pack stores its minimum (2 bits) and width (2 bits). greedy
    # pairs tokens 0+2 and 1+3: every pack width 0, 16 bits of pack metadata = 2 bytes; in order,
    # channel 1's packs {3,0} are 2 bits wide: + 2 * 2 * 2 bits = 24 bits = 3 bytes. Then 2 bytes
    # per row of packs (2 rows) and 4 bytes per token (step, min).
    pol.begin_window(4)
    pol.attend(0, np.zeros((4, 1, 2), np.float32), k, v)
    assert pol.bytes == want + 16
    assert pol.parts == dict(codes=want - 22, metadata=22, fp16=16)
    assert pol.bytes_time == (4 + 8 + 12 + want) + 4 * (1 + 2 + 3 + 4)


def test_constant_tensors_compress_to_metadata_only():
    n, Hk, d = 512, 2, 16
    k = np.full((n, Hk, d), 1.5, np.float16)
    v = np.full((n, Hk, d), -0.25, np.float16)
    row = Hk * d * 2
    pol = C.KVCompPaperCache(0.05, 0.05)  # K 64/128, V 128/256, K block groups, V token groups
    pol.begin_window(n)
    pol.attend(0, np.zeros((n, 4, d), np.float32), k, v)
    k_bytes = 7 * (4 + 4) + 1 + (n - 448) * row          # 7 blocks: one group + offset each
    v_bytes = 3 * (128 * 4 + 4) + 1 + (n - 384) * row    # 3 blocks: 128 token groups each
    assert pol.bytes == k_bytes + v_bytes
    pk = C.PackKVCache(0.05, 0.05)  # blocks of 64, buffer 192, packs of 16
    pk.begin_window(n)
    pk.attend(0, np.zeros((n, 4, d), np.float32), k, v)
    # 6 blocks; per block and tensor: 4 rows x 32 packs x (1 + 1) bits = 32 bytes, 4 x 2 x 2
    # bytes of row offsets, 64 tokens x 4 bytes (step, min).
    per_block = 32 + 16 + 64 * 4
    assert pk.bytes == 2 * (6 * per_block + (n - 384) * row)
    assert pk.parts["codes"] == 0 and pol.parts["codes"] == 0
    assert sum(pk.parts.values()) == pk.bytes and sum(pol.parts.values()) == pol.bytes


def test_masked_attention_matches_a_per_query_loop():
    rng = np.random.default_rng(4)
    n, H, Hk, d = 45, 6, 2, 8
    q = rng.standard_normal((n, H, d)).astype(np.float32)
    kf, vf, kq, vq = (rng.standard_normal((n, Hk, d)).astype(np.float32) for _ in range(4))
    mk, mv = C._fp16_mask(n, 4, 8), C._fp16_mask(n, 8, 16)
    got = C.masked_attention(q, kf, vf, kq, vq, mk, mv, chunk=4)
    want = np.zeros_like(got, dtype=np.float64)
    g = H // Hk
    for t in range(n):
        ks = np.stack([kf[s] if mk[t, s] else kq[s] for s in range(t + 1)])
        vs = np.stack([vf[s] if mv[t, s] else vq[s] for s in range(t + 1)])
        for h in range(H):
            sc = ks[:, h // g] @ q[t, h] / np.sqrt(d)
            p = np.exp(sc - sc.max())
            want[t, h] = (p / p.sum()) @ vs[:, h // g]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_fp16_settings_reproduce_the_fp16_cache():
    k, v = _kv(n=200)
    q = np.random.default_rng(0).standard_normal((200, 4, 16)).astype(np.float32)
    ref = C.FP16Cache()
    ref.begin_window(200)
    want = ref.attend(0, q, k, v)
    for spec in ("kvcomp-paper:k=none,v=none", "packkv:k=none,v=none"):
        pol = harness.make_policy(spec)
        pol.begin_window(200)
        assert np.array_equal(pol.attend(0, q, k, v), want)
        assert pol.bytes == pol.fp16_bytes and pol.bytes_time == pol.fp16_time


def test_setting_strings():
    p = harness.make_policy("kvcomp-paper:k=0.05,v=0.1,kg=channel,kt=32,kr=64")
    assert isinstance(p, C.KVCompPaperCache) and p.group["key"] == "channel"
    assert p.block == {"key": 32, "value": 128} and p.recent == {"key": 64, "value": 256}
    p = harness.make_policy("packkv:k=0.09,v=0.2,repack=median,pack=8")
    assert isinstance(p, C.PackKVCache) and (p.P, p.repack, p.T, p.R) == (8, "median", 64, 192)
    for bad in ("packkv:k=0.1,v=0.1,t=48,pack=32", "packkv:k=0.1", "kvcomp-paper:k=0.1,v=0.1,x=1",
                "kvcomp-paper:k=0.1,v=0.1,kg=row", "kvcomp-paper:k=0.1,v=0.1,kr=100"):
        with pytest.raises(ValueError):
            harness.make_policy(bad)


def test_byte_split_is_summed_over_windows_and_merged():
    import merge
    k, v = _kv(n=256)
    q = np.zeros((256, 4, 16), np.float32)
    pol = harness.make_policy("packkv:k=0.1,v=0.1")
    lp = np.log(np.full((3, 5), 0.2))
    parts = []
    for _ in range(2):
        acc = harness.Accumulator(pol.name)
        for _ in range(2):
            pol.begin_window(256)
            pol.attend(0, q, k, v)
            acc.add(lp, lp, np.zeros(3, np.int64), pol, 0.0)
        r = acc.result(acc)
        assert np.isclose(sum(r["parts"].values()), r["bytes"])
        parts.append(dict(meta=dict(start_window=len(parts) * 2, windows_done=2), results=[r]))
    m = merge.merge(merge.combine_same_windows(parts))[0]
    assert np.isclose(sum(m["parts"].values()), m["bytes"]) and m["bytes"] == 2 * r["bytes"]


def test_plot_labels_and_groups():
    import plot
    assert plot.label("kvcomp-paper:k=0.02,v=0.05") == "KVComp (paper) K step 0.02, V step 0.05"
    assert plot.label("packkv:k=0.04,v=none,repack=none") == \
        "PackKV (paper) K step 0.04, V fp16, repack=none"
    assert plot.group("packkv:k=0.04,v=0.08") == "packkv"
    assert plot.group("kvcomp-paper:k=0.1,v=0.05,kg=channel") == "kvcomp-paper other"
    assert all(g in plot.STYLES and g in plot.NAMES for g in
               ("kvcomp-paper", "kvcomp-paper other", "packkv", "packkv other"))
