# SPDX-License-Identifier: Apache-2.0
"""Tests of the harness's tile settings (block format t1 through the C ABI), the variants that
share one forward pass, attention sinks kept in fp16 and the per-head Hadamard rotation. No
model needed: synthetic K/V with outlier channels, and a stand-in model for the harness."""
import sys
import types
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[2] / "python")]

import cache as C  # noqa: E402
import harness  # noqa: E402

T, HK, D = 32, 2, 64
ROW = HK * D * 2  # fp16 bytes of one token's K (or V)


def _kv(n=100, seed=0):
    rng = np.random.default_rng(seed)
    scale = np.ones(D)
    scale[[3, 17, 40]] = 12.0  # outlier channels, as real keys have
    k = (rng.standard_normal((n, HK, D)) * scale).astype(np.float16)
    v = rng.standard_normal((n, HK, D)).astype(np.float16)
    return k, v


def _cache(**kw):
    kw.setdefault("bound_mode", {"key": "absolute", "value": "relative"})
    return C.KvcompCache(kw.pop("k", 0.3), kw.pop("v", 0.1), block_tokens=T, **kw)


def test_hadamard_is_orthogonal_and_symmetric():
    for d in (1, 2, 16, 64, 256):
        h = C.hadamard(d)
        np.testing.assert_allclose(h @ h, np.eye(d), atol=1e-6)
        np.testing.assert_array_equal(h, h.T)
        assert np.all(np.abs(np.abs(h) - 1 / np.sqrt(d)) < 1e-7)
    with pytest.raises(ValueError):
        C.hadamard(48)


def test_tiles_decode_like_v1_within_the_bound_and_count_every_byte():
    """A tile cache decodes to the v1 values (format.md §17.6), within the bound; its bytes are
    the blocks' exact sizes plus the fp16 tail (no codebook); v1 adds its codebooks."""
    k, v = _kv()
    n = len(k)
    tiles = _cache(block_format="tiles", path="codec")
    tiles.begin_window(n)
    k_hat, kb = tiles._roundtrip(0, "key", k)
    v_hat, vb = tiles._roundtrip(0, "value", v)
    v1 = _cache(num_substreams=4, path="codec")
    v1.begin_window(n)
    k1, kb1 = v1._roundtrip(0, "key", k)
    v1_hat, vb1 = v1._roundtrip(0, "value", v)
    np.testing.assert_array_equal(k_hat, k1)
    np.testing.assert_array_equal(v_hat, v1_hat)
    assert np.abs(k_hat.astype(np.float32) - k).max() <= 0.3 * (1 + 1e-3)
    n_full = n // T * T
    np.testing.assert_array_equal(k_hat[n_full:], k[n_full:])  # the tail stays fp16
    assert not np.array_equal(k_hat[:n_full], k[:n_full])
    # Bytes: the same blocks encoded directly through the binding.
    import kvcomp
    codec = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, error_bound=0.3,
                         bound_mode="absolute", block_format="tiles")
    blocks = codec.encode(k[:n_full])
    assert kb == blocks.nbytes + (n - n_full) * ROW
    assert all(kvcomp.block_info(blocks.block(i))["encoding"] == kvcomp.ENCODING_TILES
               for i in range(len(blocks)))
    assert tiles.stats["tiles"] == 2 * len(blocks) and tiles.stats["huffman"] == 0
    # Every tile of every block is counted once per width.
    nt = len(blocks) * (D // 16) + len(blocks) * (T // 16)
    assert sum(tiles.stats["tile_widths"]) == nt
    assert tiles.stats["tile_widths"][6] == 0  # no raw tile at these bounds
    # Per block, the widest tile of its table is the widest that kvc_block_inspect reports.
    bits = [0, 2, 3, 4, 6, 8]
    for i in range(len(blocks)):
        one = kvcomp.EncodedBlocks(blocks.data, blocks.offsets[i:i + 1], blocks.sizes[i:i + 1],
                                   (T, 1, D))
        w = C.tile_width_counts(one)
        assert w.sum() == D // 16
        assert bits[max(np.nonzero(w)[0])] == kvcomp.block_info(blocks.block(i))["code_bits"]
    book = v1.codecs[(0, "key", ("v1", 4))][1]
    assert book > 0 and kb1 > book
    assert v1.stats["huffman"] + v1.stats["fixed"] + v1.stats["raw"] == v1.stats["blocks"]


def test_variants_share_the_pass_and_check_their_values():
    """Variants: every block format written beside the primary, bytes each, decoded values
    compared element by element (v1 and tiles agree; a different bound would not)."""
    k, v = _kv()
    n = len(k)
    variants = [("v1", C.CodecVariant("v1", num_substreams=4)),
                ("t00", C.CodecVariant("tiles", permute=False, split=False)),
                ("t11", C.CodecVariant("tiles"))]
    pol = _cache(block_format="tiles", variants=variants)
    assert pol.path == "codec"
    pol.begin_window(n)
    q = np.random.default_rng(3).standard_normal((n, 2 * HK, D)).astype(np.float32)
    pol.attend(0, q, k, v)
    assert pol.variant_mismatch == {"v1": 0, "t00": 0, "t11": 0}
    assert pol.variant_bytes["t11"]["bytes"] == pol.bytes
    assert pol.variant_bytes["t11"]["bytes_time"] == pol.bytes_time
    assert pol.variant_bytes["v1"]["bytes"] < pol.bytes < pol.variant_bytes["t00"]["bytes"]
    assert pol.variant_stats["v1"]["huffman"] > 0 and pol.variant_stats["t00"]["tiles"] > 0
    # A new window starts the byte counts again; mismatch counts add up over windows.
    pol.begin_window(n)
    assert pol.variant_bytes["v1"] == dict(bytes=0, bytes_time=0)
    # A variant that decodes differently is caught: give the variant a tighter bound.
    import kvcomp
    pol2 = _cache(block_format="tiles",
                  variants=[("t10", C.CodecVariant("tiles", split=False))])
    pol2.begin_window(n)
    pol2._roundtrip(0, "key", k)
    assert pol2.variant_mismatch["t10"] == 0
    other = kvcomp.Codec(kind="key", num_tokens=T, head_dim=D, error_bound=0.05,
                         bound_mode="absolute", block_format="tiles", tile_split_widths=False)
    pol2.codecs[(1, "key", ("tiles", True, False))] = (other, 0)
    pol2._roundtrip(1, "key", k)
    assert pol2.variant_mismatch["t10"] > 0


def test_sinks_stay_fp16_and_are_counted():
    k, v = _kv()
    n, S = len(k), 4
    a, b = _cache(block_format="tiles"), _cache(block_format="tiles", sinks=S)
    for p in (a, b):
        p.begin_window(n)
    ka, kba = a._roundtrip(0, "key", k)
    ta = a.bytes_time
    kb_, kbb = b._roundtrip(0, "key", k)
    np.testing.assert_array_equal(kb_[:S], k[:S])
    np.testing.assert_array_equal(kb_[S:], ka[S:])
    assert not np.array_equal(ka[:S], k[:S])
    assert kbb == kba + S * ROW
    done = np.arange(1, n + 1) // T
    assert b.bytes_time == ta + int((done > 0).sum()) * S * ROW
    # A window shorter than a block: nothing compressed, nothing added.
    c = _cache(block_format="tiles", sinks=S)
    c.begin_window(20)
    out, held = c._roundtrip(0, "key", k[:20])
    np.testing.assert_array_equal(out, k[:20])
    assert held == 20 * ROW


@pytest.mark.parametrize("rot", ["key", True])
def test_rotation_bound_holds_in_the_rotated_space(rot):
    """With the rotation the bound holds on H x (fp16), not on x; the decoded copy is rotated
    back; V is rotated only when asked."""
    k, v = _kv()
    n = len(k)
    n_full = n // T * T
    h = C.hadamard(D)
    pol = _cache(block_format="tiles", rotate=rot)
    pol.begin_window(n)
    k_hat, _ = pol._roundtrip(0, "key", k)
    v_hat, _ = pol._roundtrip(0, "value", v)
    assert k_hat.dtype == np.float32
    rk = (k[:n_full].astype(np.float32) @ h).astype(np.float16).astype(np.float32)
    err = np.abs(k_hat[:n_full] @ h - rk).max()
    assert err <= 0.3 * (1 + 1e-3) + 1e-3, err
    np.testing.assert_array_equal(k_hat[n_full:], k[n_full:].astype(np.float32))
    # In the original space the error is no longer bounded element by element by 0.3, but
    # its norm per token is the rotated one's (H is orthogonal).
    e0 = np.linalg.norm(k_hat[:n_full] - k[:n_full], axis=-1)
    e1 = np.linalg.norm(k_hat[:n_full] @ h - rk, axis=-1)
    np.testing.assert_allclose(e0, e1, rtol=0.05, atol=2e-2)
    plain = _cache(block_format="tiles")
    plain.begin_window(n)
    v_plain, _ = plain._roundtrip(0, "value", v)
    if rot is True:
        assert not np.array_equal(v_hat, v_plain)
    else:
        np.testing.assert_array_equal(v_hat, v_plain)


def test_settings_parse_variants_and_refuse_the_store():
    spec = "kvcomp:k=0.25,v=0.07,kmode=abs,t=128,ns=4,fmt=tiles,also=v1+t01,sinks=4,rot=v"
    pol = harness.make_policy(spec)
    assert pol.variant.block_format == "tiles" and pol.sinks == 4 and pol.rotate == {"value"}
    assert [nm for nm, _ in pol.variants] == [
        "kvcomp:k=0.25,v=0.07,kmode=abs,t=128,sinks=4,rot=v,ns=4",
        "kvcomp:k=0.25,v=0.07,kmode=abs,t=128,sinks=4,rot=v,fmt=tiles,perm=0,split=1"]
    assert pol.variants[0][1].num_substreams == 4
    v = pol.variants[1][1]
    assert (v.block_format, v.permute, v.split) == ("tiles", False, True)
    with pytest.raises(ValueError):
        harness.make_policy("kvcomp:k=0.2,v=0.05,also=t2")
    with pytest.raises(ValueError):
        harness.make_policy("kvcomp:k=0.2,v=0.05,fmt=tiles,rot=k,path=store")
    with pytest.raises(ValueError):
        C.GenerationCache(2, harness.make_policy("kvcomp:k=0.2,v=0.05,sinks=4"))


class _StandIn:
    """A tiny 'model' for evaluate(): two layers of attention over random q/k/v derived from
    the tokens, logits from the attention outputs."""

    class hp:
        n_layer = 2
        name = "stand-in"

    def forward(self, x, policy):
        n = len(x)
        policy.bind_model(self.hp) if hasattr(policy, "bind_model") else None
        policy.begin_window(n)
        rng = np.random.default_rng(int(x[0]) + 1)
        w = rng.standard_normal((D * 2 * HK, 50)).astype(np.float32) / 8
        out = 0
        for layer in range(self.hp.n_layer):
            k, v = _kv(n, seed=layer + int(x[0]))
            q = rng.standard_normal((n, 2 * HK, D)).astype(np.float32)
            out = out + policy.attend(layer, q, k, v).reshape(n, -1) @ w
        return out


def test_evaluate_gives_each_variant_a_row_from_one_pass():
    ids = [i % 50 for i in range(1, 400)]
    logged = []
    spec = "kvcomp:k=0.3,v=0.1,kmode=abs,t=32,ns=4,fmt=tiles,also=v1+t00"
    res = harness.evaluate(_StandIn(), ids, [spec, "kvcomp:k=0.3,v=0.1,kmode=abs,t=32,ns=4,"
                                             "path=codec"], windows=2, window_tokens=128,
                           progress=False, log=lambda w, r: logged.append((w, r)))
    by = {r["setting"]: r for r in res}
    # What is logged after each window (and written to --out) says the same as the end.
    assert [w for w, _ in logged] == [0, 1] and logged[-1][1] == res
    assert all("mismatched_elements" in r for r in logged[0][1] if "pass_of" in r)
    prim = by[spec]
    v1 = by["kvcomp:k=0.3,v=0.1,kmode=abs,t=32,ns=4"]
    t00 = by["kvcomp:k=0.3,v=0.1,kmode=abs,t=32,fmt=tiles,perm=0,split=0"]
    alone = by["kvcomp:k=0.3,v=0.1,kmode=abs,t=32,ns=4,path=codec"]
    assert v1["pass_of"] == spec and v1["mismatched_elements"] == 0
    assert t00["mismatched_elements"] == 0 and "pass_of" not in prim
    for r in (v1, t00):
        assert (r["ppl"], r["kl"], r["top1"]) == (prim["ppl"], prim["kl"], prim["top1"])
    # The v1 variant's bytes and accuracy are those of the same setting run on its own.
    assert (v1["ppl"], v1["bytes"], v1["bytes_time"]) == \
        (alone["ppl"], alone["bytes"], alone["bytes_time"])
    assert v1["ratio"] > prim["ratio"] > t00["ratio"] > 1
    assert v1["blocks"]["huffman"] > 0 and prim["blocks"]["tiles"] == prim["blocks"]["blocks"]
    # merge.py keeps what a variant row says about its pass.
    import merge
    parts = [dict(results=res), dict(results=res)]
    m = {r["setting"]: r for r in merge.merge(parts)}
    assert m[v1["setting"]]["pass_of"] == spec
    assert m[v1["setting"]]["mismatched_elements"] == 0
    assert m[spec]["blocks"]["tiles"] == 2 * prim["blocks"]["tiles"]
    assert m[spec]["blocks"]["tile_widths"] == [2 * x for x in prim["blocks"]["tile_widths"]]


def test_merge_unites_parts_of_the_same_windows_and_keeps_common_settings():
    import merge

    def row(s, ppl, n=100):
        return dict(setting=s, tokens=n, ppl=ppl, bytes=10.0, fp16_bytes=40.0, seconds=1.0,
                    kl=0.01, top1=0.9, ppl_fp16=10.0, bytes_time=20.0, fp16_time=80.0)

    def part(start, rows):
        return dict(meta=dict(start_window=start, windows_done=1), results=rows)

    a = part(0, [row("fp16", 10.0), row("x", 11.0)])
    b = part(0, [row("fp16", 10.0), row("y", 12.0)])
    c = part(1, [row("fp16", 10.0), row("x", 11.0)])
    parts = merge.combine_same_windows([a, b, c])
    assert len(parts) == 2
    assert [r["setting"] for r in parts[0]["results"]] == ["fp16", "x", "y"]
    kept = merge.common_settings(parts)
    assert [r["setting"] for r in kept[0]["results"]] == ["fp16", "x"]
    res = {r["setting"]: r for r in merge.merge(kept)}
    assert res["x"]["tokens"] == 200 and abs(res["x"]["ppl"] - 11.0) < 1e-9
    with pytest.raises(ValueError):
        merge.combine_same_windows([a, part(0, [row("fp16", 9.0)])])


def test_paired_table_puts_a_pass_on_one_line_and_refuses_mismatches():
    import plot
    res = harness.evaluate(_StandIn(), [i % 50 for i in range(1, 200)],
                           ["kvcomp:k=0.3,v=0.1,kmode=abs,t=32,ns=4,fmt=tiles,also=v1+t01"],
                           windows=1, window_tokens=128, progress=False)
    lines = plot.paired_table(res).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| K 0.3, V 0.1, T = 32 |")  # T not 128
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    by = {r["setting"]: r for r in res}
    assert cells[1] == f"**{by[res[1]['setting']]['ratio']:.2f}**" and cells[2] == "—"
    t01 = by["kvcomp:k=0.3,v=0.1,kmode=abs,t=32,fmt=tiles,perm=0,split=1"]
    assert cells[3] == f"{t01['ratio']:.2f}"
    assert cells[5] == f"{by['kvcomp:k=0.3,v=0.1,kmode=abs,t=32,ns=4']['ratio']:.2f}"
    res[2]["mismatched_elements"] = 1
    with pytest.raises(ValueError):
        plot.paired_table(res)


@pytest.mark.parametrize("fmt", ["v1", "tiles"])
def test_sinks_through_the_store_equal_the_codec_prototype(fmt):
    """The store's sink_tokens (docs/api.md, "Attention sinks") gives what the harness's sink
    prototype on the codec path gives: the same attention outputs, the same bytes (at the
    window's end and over its steps) and block counts; and the sinks change the outputs."""
    k, v = _kv(n=3 * T + 5, seed=3)
    q = np.random.default_rng(4).standard_normal((len(k), 2 * HK, D)).astype(np.float32)
    runs = {}
    for path, sinks in (("codec", 4), ("store", 4), ("store", 0)):
        kv = _cache(block_format=fmt, sinks=sinks, path=path)
        kv.bind_model(types.SimpleNamespace(n_layer=1))
        kv.begin_window(len(k))
        out = kv.attend(0, q, k, v)
        runs[path, sinks] = (out, kv.bytes, kv.bytes_time,
                             {x: kv.stats[x] for x in ("blocks", "huffman", "fixed", "raw",
                                                       "tiles")})
    (a, *ca), (b, *cb), (c, *cc) = runs["codec", 4], runs["store", 4], runs["store", 0]
    np.testing.assert_array_equal(b, a)
    assert cb == ca
    assert not np.array_equal(b, c)  # the sinks are read, not block 0's first rows
    assert cb[0] == cc[0] + 2 * 4 * ROW  # 4 rows of K and of V, once a block exists
