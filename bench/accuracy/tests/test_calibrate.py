# SPDX-License-Identifier: Apache-2.0
"""Per-layer bound scales: calibrate.py's allocation and the harness cache's per-layer bounds,
through the codec API and through the store (key_layer_scales, value_layer_scales). No model."""
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[2] / "python")]

import cache as C  # noqa: E402
import calibrate  # noqa: E402

T, HK, D = 32, 2, 64


class Hp:
    n_layer = 3


def test_allocation_equalizes_the_layers_shares():
    s = np.array([1.0, 4.0, 0.25, 1.0])
    scale = calibrate.allocate(s, floor=0.0, lo=0.1, hi=10.0)
    assert abs(np.log(scale).mean()) < 1e-12  # geometric mean 1: about the same bytes
    share = s * scale ** 2                    # each layer's modelled KL
    np.testing.assert_allclose(share, share[0], rtol=1e-12)
    np.testing.assert_allclose(calibrate.allocate(np.full(5, 3.0), 0.02, 0.5, 2.0), 1.0)


def test_allocation_clamps_and_floors_noise():
    s = np.array([400.0, 10.0, 10.0, -3.0, 0.0])  # a negative probe: noise
    scale = calibrate.allocate(s, floor=0.02, lo=0.5, hi=2.0)
    assert scale.min() >= 0.5 - 1e-12 and scale.max() <= 2.0 + 1e-12
    assert scale[0] == pytest.approx(0.5)                     # the sensitive layer, clamped
    assert scale[3] == scale[4] == pytest.approx(np.sqrt(10 / 8) * scale[1])  # floored: 8
    assert abs(np.log(scale).mean()) < 1e-9
    assert np.all(np.diff(calibrate.allocate(np.array([4.0, 2.0, 1.0]), 0, 0.1, 10)) > 0)


def _kv(n=96, seed=1):
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal((n, HK, D)) * np.linspace(0.5, 4.0, D)).astype(np.float16)
    v = rng.standard_normal((n, HK, D)).astype(np.float16)
    return k, v


def _cache(scales=None, **kw):
    c = C.KvcompCache(kw.pop("k", 0.3), kw.pop("v", 0.1), block_tokens=T,
                      bound_mode={"key": "absolute", "value": "relative"},
                      layer_scales=scales, **kw)
    c.bind_model(Hp)
    return c


def test_a_layers_scale_is_its_bound():
    """Layer l of a scaled cache decodes exactly as an unscaled cache with bound eb * scale[l]
    (float32 product), holds the bound, and a looser layer takes fewer bytes."""
    k, v = _kv()
    scales = {"key": [1.0, 2.0, 0.5], "value": [0.5, 1.0, 2.0]}
    scaled = _cache(scales, path="codec", num_substreams=4)
    scaled.begin_window(len(k))
    held = {}
    for layer in range(3):
        for kind, x in (("key", k), ("value", v)):
            got, held[layer, kind] = scaled._roundtrip(layer, kind, x)
            eb = float(np.float32(scaled.eb[kind]) * np.float32(scales[kind][layer]))
            assert scaled.bound(layer, kind) == eb
            one = _cache(path="codec", num_substreams=4,
                         **{kind[0]: eb, ("v" if kind == "key" else "k"): 0.2})
            one.begin_window(len(k))
            want, _ = one._roundtrip(0, kind, x)
            np.testing.assert_array_equal(got, want)
            if kind == "key":  # absolute: within eb, plus the fp16 rounding of the read-back
                err = np.abs(got.astype(np.float32) - x.astype(np.float32))
                assert np.all(err <= eb * (1 + 1e-6) + np.spacing(np.abs(got)).astype(np.float32))
    assert held[1, "key"] < held[0, "key"] < held[2, "key"]
    assert held[2, "value"] < held[1, "value"] < held[0, "value"]


def test_scales_must_cover_every_layer():
    with pytest.raises(ValueError, match="2 key layer scales for a model of 3 layers"):
        _cache({"key": [1.0, 1.0]})


@pytest.mark.parametrize("fmt", ["v1", "tiles"])
def test_store_scales_equal_the_codec_paths(fmt):
    """Through the store (key_layer_scales, value_layer_scales) every layer decodes to what the
    codec path gives with the same per-layer bounds, and takes the same block bytes."""
    k, v = _kv(n=100)
    scales = {"key": [0.5, 1.0, 1.75], "value": [1.5, 0.75, 1.0]}
    store = _cache(scales, path="store", block_format=fmt)
    codec = _cache(scales, path="codec", block_format=fmt)
    unscaled = _cache(path="store", block_format=fmt)
    for kv in (store, codec, unscaled):
        kv.begin_window(len(k))
    for layer in range(3):
        kl, vl = k * (layer + 1), v  # layers that differ
        for kv in (store, unscaled):
            kv.open_store(HK, D).prefill(kv.seq, kl, vl, first_layer=layer)
        got = store.read(layer)
        sizes = store.store.block_sizes(store.seq)[layer]  # [blocks, heads, K|V]
        for i, (kind, x) in enumerate((("key", kl), ("value", vl))):
            want, _ = codec._roundtrip(layer, kind, x)
            np.testing.assert_array_equal(got[i], want, err_msg=f"layer {layer} {kind}")
            blocks = codec.codecs[layer, kind, codec.variant.key][0].encode(x[:len(x) // T * T])
            assert sizes[:, :, i].sum() == blocks.sizes.sum()
        if layer == 2:  # K 1.75x looser: smaller K blocks than the unscaled store's
            base = unscaled.store.block_sizes(unscaled.seq)[layer]
            assert sizes[:, :, 0].sum() < base[:, :, 0].sum()


class _Layered:
    """A stand-in model of 3 attention layers whose outputs weigh 4, 1 and 1/4 in the logits:
    the same error costs layer 0 the most."""

    class hp:
        n_layer = 3
        name = "stand-in"

    def forward(self, x, policy):
        n = len(x)
        if hasattr(policy, "bind_model"):
            policy.bind_model(self.hp)
        policy.begin_window(n)
        rng = np.random.default_rng(7)
        w = rng.standard_normal((HK * 2 * D, 40)).astype(np.float32) / 4
        out = 0
        for layer, weight in enumerate((4.0, 1.0, 0.25)):
            k, v = _kv(n, seed=layer)
            q = rng.standard_normal((n, 2 * HK, D)).astype(np.float32)
            out = out + weight * policy.attend(layer, q, k, v).reshape(n, -1) @ w
        return out


def test_probe_finds_the_sensitive_layer():
    ids = [i % 40 for i in range(1, 200)]  # tokens of the stand-in's 40-token vocabulary
    setting = "kvcomp:k=0.3,v=0.1,kmode=abs,t=32,ns=4,path=codec"
    rec = calibrate.probe(_Layered(), ids, setting, {"key": 2.0, "value": 1.5}, start=0,
                          windows=1, window_tokens=160, progress=False)
    assert rec["kl"] > 0 and rec["bytes"] > 0 and rec["n_layer"] == 3
    for kind in ("key", "value"):
        dkl = [x["dkl"] for x in rec["layers"][kind]]
        assert dkl[0] > 4 * max(dkl[1:]), (kind, dkl)  # layers 1, 2: small, maybe noise
        assert all(x["dbytes"] < 0 for x in rec["layers"][kind])  # looser: fewer bytes
        s = calibrate.allocate(np.array(dkl), 0.02, 0.25, 4.0)
        assert s[0] < min(s[1:]) and abs(np.log(s).mean()) < 1e-9


def test_settings_read_their_scales_file(tmp_path):
    """scales=FILE in a harness setting: calibrate.py's output (a kind may be absent, as with
    --kinds key); the probe refuses a setting that already has scales."""
    import harness
    f = tmp_path / "s.json"
    f.write_text('{"key_layer_scales": [0.5, 1.0, 2.0], "floor": 0.02}')
    pol = harness.make_policy(f"kvcomp:k=0.3,v=0.1,kmode=abs,t=32,scales={f}")
    pol.bind_model(Hp)
    assert pol.bound(2, "key") == float(np.float32(0.3) * np.float32(2.0))
    assert pol.bound(2, "value") == 0.1 and pol.path == "store"
    with pytest.raises(SystemExit, match="without scales"):
        calibrate.probe_policies(f"kvcomp:k=0.3,v=0.1,scales={f}", 3, {"key": 2, "value": 2})


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_tile_width_bits_is_the_encoders(bits):
    """V tiles at the tightest relative bound of a width are that wide (tokens of every range
    and offset), and a bound 1% tighter needs more bits somewhere."""
    rng = np.random.default_rng(bits)
    v = (rng.standard_normal((128, HK, D)) * rng.lognormal(0, 2, (128, HK, 1))
         + rng.standard_normal((128, HK, 1)) * 3).astype(np.float16)
    widest = {}
    for rel in (calibrate.tightest_rel_bound(bits), 0.99 * calibrate.tightest_rel_bound(bits)):
        c = _cache(v=rel, block_format="tiles", path="codec")
        c.begin_window(len(v))
        counts = C.tile_width_counts(c._codec(0, "value", v)[0].encode(v))
        widest[rel] = (0, 2, 3, 4, 6, 8, 99)[np.flatnonzero(counts).max()]
        assert calibrate.tile_width_bits(rel) >= widest[rel]
    tight, looser = sorted(widest)
    assert widest[looser] == bits and widest[tight] > bits
    assert calibrate.tile_width_bits(0.072) == 3  # the tables' setting


def test_width_allocation_is_the_best_within_the_budget():
    import itertools
    rng = np.random.default_rng(3)
    bits = [2, 3, 4]
    for _ in range(20):
        cost = rng.standard_normal((6, 3))
        budget = int(rng.integers(12, 25))
        pick = calibrate.allocate_widths(cost, bits, budget)
        best = min((sum(cost[l, i] for l, i in enumerate(p)), p)
                   for p in itertools.product(range(3), repeat=6)
                   if sum(bits[i] for i in p) <= budget)
        assert sum(bits[i] for i in pick) <= budget
        assert cost[np.arange(6), pick].sum() == pytest.approx(best[0])


def test_value_widths_trade_insensitive_layers_for_sensitive_ones():
    """Two probes of V at a 2-bit factor on different windows (pooled by windows) and one of
    K and V at 1.5: the sensitive layer goes to 4 bits, the cheapest to 2, within the bits of
    3 everywhere; 2 bits is used at the probed scale, 4 bits at its tightest bound."""
    setting = "kvcomp:k=0.3,v=0.072,kmode=abs,t=128"
    layer = lambda dkl: [dict(dkl=x, dbytes=-1.0) for x in dkl]  # noqa: E731
    wide = dict(setting=setting, factors={"key": 2.0, "value": 1.5}, windows=4, n_layer=4,
                layers={"key": layer([1e-4] * 4), "value": layer([8e-4, 1e-4, 1e-5, 1e-4])})
    down = [dict(setting=setting, factors={"value": 2.3611}, windows=w, n_layer=4,
                 layers={"value": layer(dkl)})
            for w, dkl in ((1, [9e-3, 2e-3, 0.0, 1e-3]), (3, [9e-3, 2e-3, 4e-4, 1e-3]))]
    costs = calibrate.pooled_costs([wide] + down, "value")
    np.testing.assert_allclose(costs[2.3611], [9e-3, 2e-3, 3e-4, 1e-3])
    out = calibrate.value_width_scales([wide] + down, "2,3,4", pytest.fail)
    assert out["value_layer_widths"] == [4, 3, 2, 3]
    sc = out["value_layer_scales"]
    assert sc[1] == sc[3] == 1.0 and sc[2] == 2.3611
    assert sc[0] == pytest.approx(calibrate.tightest_rel_bound(4) / 0.072)
    # No 2-bit layer is worth it where every layer costs as much as layer 0 to loosen.
    down[1]["layers"]["value"] = layer([9e-3] * 4)
    down[0]["layers"]["value"] = layer([9e-3] * 4)
    assert calibrate.value_width_scales([wide] + down, "2,3,4", pytest.fail)[
        "value_layer_widths"] == [3] * 4
