# SPDX-License-Identifier: Apache-2.0
"""Per-layer error-bound scales from measured sensitivity (the store's key_layer_scales and
value_layer_scales).

    python bench/accuracy/calibrate.py \
        --setting kvcomp:k=0.3,v=0.072,kmode=abs,t=128,ns=4,sinks=4 \
        --start-window 40 --windows 4 --out results/scales.json

Probe: on calibration windows (by default outside the 32 windows the tables are measured on),
one forward pass with the setting as given, then one per (layer, K|V) with only that layer's
bound loosened (by --key-factor or --value-factor). Each pass's KL divergence from the fp16
cache's next-token distributions, less the setting's, is that (layer, kind)'s marginal cost.

Allocation: with a quantization error of variance proportional to the bound squared, the KL a
layer adds is about s_l * eb_l^2 (s_l = its probe's KL increase / (factor^2 - 1)), and its bits
per element fall by log2 of the bound. Minimizing the sum of s_l * eb_l^2 at a fixed sum of
log2(eb_l) (the same bytes) gives every layer the same share: eb_l proportional to
1 / sqrt(s_l). The scales are that, normalized to a geometric mean of 1 per kind (so that the
bytes stay about the setting's), clamped to [--min-scale, --max-scale]; a probe increase below
--floor of the kind's largest (noise, or a layer that does not care) counts as that floor.

Tile widths (--value-widths, for tiles with a relative V bound): a V tile's width follows from
its relative bound alone, in steps, so V scales around a setting only cost bytes unless they
land on the tightest bound of another width. With --value-widths 2,3,4 each layer's V gets one
of those widths at its tightest bound; the choice minimizes the summed modelled KL at no more
bits than the setting's width in every layer (a knapsack over layers, solved exactly). A
width other than the setting's is taken at the tightest of the probes' bounds that give it (a
probe with --probe-kinds value --value-factor F), at that probe's measured cost; a width no
probe reached, at its tightest bound, its cost s_l * (scale^2 - 1) from the nearest probe.
Probes at one factor on different windows are pooled, weighted by their windows.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

import harness  # noqa: E402
import modelfile  # noqa: E402
from cache import FP16Cache, KvcompCache  # noqa: E402

KINDS = ("key", "value")
TILE_WIDTHS = (2, 3, 4, 6, 8)  # the coded widths of format t1 with split widths


def probe_policies(setting: str, n_layer: int, factors: dict):
    """[(None, the setting)], then per kind in factors and layer ((kind, layer), a copy of the
    setting with that layer's bound scaled by factors[kind])."""
    base = harness.make_policy(setting)
    if not isinstance(base, KvcompCache) or base.layer_scales:
        raise SystemExit(f"--setting {setting!r}: expected a kvcomp setting without scales=")
    policies = [(None, base)]
    for kind in KINDS:
        if kind not in factors or base.eb[kind] is None:
            continue
        for layer in range(n_layer):
            pol = harness.make_policy(setting)
            scales = [1.0] * n_layer
            scales[layer] = factors[kind]
            pol.layer_scales = {kind: scales}
            policies.append(((kind, layer), pol))
    return policies


def probe(model, ids, setting: str, factors: dict, start: int, windows: int,
          window_tokens: int, progress: bool = True) -> dict:
    """The probe's record: the setting's mean KL over the windows' predictions and its bytes
    summed over the windows, and per kind and layer the KL and bytes it adds when that layer
    alone is loosened by factors[kind]."""
    n_layer = model.hp.n_layer
    policies = probe_policies(setting, n_layer, factors)
    ref = harness.Accumulator("fp16")
    accs = [harness.Accumulator(str(label)) for label, _ in policies]
    t0 = time.time()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=windows * (len(policies) + 1), unit="pass", desc="probe passes",
                   file=sys.stderr)
    for w in range(start, start + windows):
        x = np.asarray(ids[w * window_tokens:(w + 1) * window_tokens], dtype=np.int64)
        fp16 = FP16Cache()
        lp_ref = harness.log_softmax(model.forward(x, fp16)[:-1])
        ref.add(lp_ref, None, x[1:], fp16, 0.0)
        p_ref = np.exp(lp_ref)
        if bar:
            bar.update(1)
        for (_, pol), acc in zip(policies, accs):
            acc.add(harness.log_softmax(model.forward(x, pol)[:-1]), lp_ref, x[1:], pol, 0.0,
                    p_ref)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    base, *loosened = [acc.result(ref) for acc in accs]
    record = dict(setting=setting, factors=factors, start_window=start, windows=windows,
                  window_tokens=window_tokens, n_layer=n_layer, kl=base["kl"],
                  bytes=base["bytes"], seconds=round(time.time() - t0), layers={})
    for ((kind, layer), _), r in zip(policies[1:], loosened):
        record["layers"].setdefault(kind, [None] * n_layer)[layer] = dict(
            dkl=r["kl"] - base["kl"], dbytes=r["bytes"] - base["bytes"])
    return record


def allocate(sensitivity: np.ndarray, floor: float, lo: float, hi: float) -> np.ndarray:
    """Scales c / sqrt(sensitivity) clamped to [lo, hi], c such that their geometric mean is 1
    (bisection: the clamped mean grows with c), so that unclamped layers keep their ratios."""
    s = np.maximum(sensitivity, floor * max(sensitivity.max(), 0.0) + 1e-12)
    raw = -0.5 * np.log(s)

    def mean_log(c):
        return np.clip(raw + c, np.log(lo), np.log(hi)).mean()

    a, b = np.log(lo) - raw.max(), np.log(hi) - raw.min()  # all at lo .. all at hi
    for _ in range(200):
        m = 0.5 * (a + b)
        a, b = (m, b) if mean_log(m) < 0 else (a, m)
    return np.exp(np.clip(raw + 0.5 * (a + b), np.log(lo), np.log(hi)))


def tile_width_bits(rel: float) -> int:
    """Bits of a V tile at relative bound rel, at most: the step is 2 * rel * (hi - lo)
    rounded down to bf16 (by less than 2^-7), so a token's codes span r = (hi - lo) / step
    below 1 / (2 * rel * (1 - 2^-7)), and its rounded codes take at most floor(r) + 2 values;
    the tile takes the narrowest width (2, 3, 4, 6, 8 bits) that holds them."""
    levels = int(np.floor(1.0 / (2.0 * rel * (1.0 - 2.0 ** -7)))) + 2
    bits = int(np.ceil(np.log2(levels)))
    return next(w for w in TILE_WIDTHS + (bits,) if w >= bits)


def tightest_rel_bound(bits: int) -> float:
    """The tightest relative bound whose V tiles are `bits` wide (a hair above the edge)."""
    return 1.001 / (2.0 * (2 ** bits - 1) * (1.0 - 2.0 ** -7))


def pooled_costs(records: list, kind: str) -> dict:
    """{probe factor: per-layer KL increase} over the records that probed `kind`, probes at
    one factor on different windows averaged by their window counts."""
    sums = {}
    for rec in records:
        if kind not in rec["layers"]:
            continue
        f = rec["factors"][kind]
        dkl = np.array([x["dkl"] for x in rec["layers"][kind]]) * rec["windows"]
        total, n = sums.get(f, (0.0, 0))
        sums[f] = (total + dkl, n + rec["windows"])
    return {f: total / n for f, (total, n) in sums.items()}


def modelled_cost(costs: dict, scale: float) -> np.ndarray:
    """Per-layer KL increase at `scale`, s_l * (scale^2 - 1), from the probe at the nearest
    factor f (s_l = its dkl / (f^2 - 1))."""
    f = min(costs, key=lambda f: abs(np.log(f / scale)))
    return costs[f] / (f * f - 1.0) * (scale * scale - 1.0)


def allocate_widths(cost: np.ndarray, bits: list, budget: int) -> np.ndarray:
    """Per layer an index into bits, minimizing the sum of cost[layer, choice] with the chosen
    bits summing to at most budget (dynamic programming over layers and bits spent)."""
    n_layer = cost.shape[0]
    best = {0: (0.0, [])}  # bits spent -> (least cost, choices)
    for layer in range(n_layer):
        nxt = {}
        for spent, (c, picks) in best.items():
            for i, b in enumerate(bits):
                key = spent + b
                if key <= budget and (key not in nxt or c + cost[layer, i] < nxt[key][0]):
                    nxt[key] = (c + cost[layer, i], picks + [i])
        best = nxt
    return np.array(min(best.values(), key=lambda x: x[0])[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(modelfile.MODELS))
    ap.add_argument("--setting", help="the kvcomp setting to calibrate (unless --probe)")
    ap.add_argument("--start-window", type=int, default=40,
                    help="first calibration window (default 40: past the tables' 32)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window-tokens", type=int, default=1024)
    ap.add_argument("--key-factor", type=float, default=2.0, help="the probe's K loosening")
    ap.add_argument("--value-factor", type=float, default=1.5, help="the probe's V loosening")
    ap.add_argument("--probe-kinds", default="key,value", help="which kinds the probe loosens")
    ap.add_argument("--floor", type=float, default=0.02,
                    help="least sensitivity counted, as a share of the kind's largest")
    ap.add_argument("--min-scale", type=float, default=0.5)
    ap.add_argument("--max-scale", type=float, default=2.0)
    ap.add_argument("--kinds", default="key,value",
                    help="which kinds get scales (e.g. key: tiles' V widths step at fixed bounds)")
    ap.add_argument("--value-widths", default=None,
                    help="tiles: V tile widths to choose from per layer (e.g. 2,3,4)")
    ap.add_argument("--probe", action="append", default=[],
                    help="reuse the probe of an earlier output instead of running one (repeat: "
                         "probes at other factors or on other windows of the same setting)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if not a.probe and not a.setting:
        ap.error("--setting is needed to run a probe")
    if not a.min_scale <= 1.0 <= a.max_scale:
        ap.error("--min-scale <= 1 <= --max-scale, or no geometric mean of 1 (the same bytes)")

    if a.probe:
        records = [json.loads(Path(p).read_text())["probe"] for p in a.probe]
        records = [r for rec in records for r in (rec if isinstance(rec, list) else [rec])]
        if len({r["setting"] for r in records}) != 1:
            ap.error("--probe: the probes are of different settings")
    else:
        from model import load
        model = load(modelfile.model_path(model=a.model))
        ids = harness.load_text_ids(model.tokenizer())
        factors = {"key": a.key_factor, "value": a.value_factor}
        factors = {k: f for k, f in factors.items() if k in a.probe_kinds.split(",")}
        records = [probe(model, ids, a.setting, factors, a.start_window, a.windows,
                         a.window_tokens)]
        records[0]["machine"] = harness.machine_info()
    out = dict(probe=records[0] if len(records) == 1 else records, floor=a.floor,
               min_scale=a.min_scale, max_scale=a.max_scale)
    for kind in KINDS:
        costs = pooled_costs(records, kind)
        if not costs or kind not in a.kinds.split(",") or (kind == "value" and a.value_widths):
            continue
        if len(costs) != 1:
            ap.error(f"--probe: {kind} probed at factors {sorted(costs)}; scales need one")
        (factor, dkl), = costs.items()
        scales = allocate(dkl / (factor ** 2 - 1.0), a.floor, a.min_scale, a.max_scale)
        out[f"{kind}_layer_scales"] = [round(float(x), 4) for x in scales]
        print(f"{kind}: probe KL increase x1e4 " + " ".join(f"{x * 1e4:.1f}" for x in dkl))
        print(f"{kind}: scales " + " ".join(f"{x:.2f}" for x in scales))
    if a.value_widths:
        out.update(value_width_scales(records, a.value_widths, ap.error))
    Path(a.out).write_text(json.dumps(out, indent=1))


def value_width_scales(records: list, widths: str, error) -> dict:
    """--value-widths: per layer the V scale of the chosen tile width, and the widths."""
    widths = sorted({int(w) for w in widths.split(",")})
    if not set(widths) <= set(TILE_WIDTHS):
        error(f"--value-widths {widths}: tile widths are {TILE_WIDTHS}")
    pol = harness.make_policy(records[0]["setting"])
    eb = pol.eb["value"]
    if eb is None or pol.bound_mode["value"] != "relative":
        error("--value-widths needs a setting with a relative V bound")
    base = tile_width_bits(eb)
    if base not in widths:
        error(f"--value-widths {widths}: the setting's V tiles are {base} bits")
    costs = pooled_costs(records, "value")
    if not costs:
        error("--value-widths needs a probe of V")
    scales, cost = [], []
    for w in widths:  # a probe at a bound of that width, measured; else the tightest, modelled
        probed = [f for f in costs if tile_width_bits(eb * f) == w]
        if w == base:
            scales.append(1.0)
            cost.append(np.zeros(records[0]["n_layer"]))
        elif probed:
            scales.append(min(probed))
            cost.append(costs[min(probed)])
        else:
            scales.append(tightest_rel_bound(w) / eb)
            cost.append(modelled_cost(costs, scales[-1]))
    cost = np.stack(cost, axis=1)
    pick = allocate_widths(cost, widths, base * len(cost))
    print("value: tile scales " + ", ".join(f"{w} bits {sc:.4f}" for w, sc in zip(widths, scales)))
    print("value: widths " + " ".join(str(widths[i]) for i in pick)
          + f" (modelled KL change x1e4 {cost[np.arange(len(cost)), pick].sum() * 1e4:+.1f})")
    return dict(value_layer_scales=[scales[i] for i in pick],
                value_layer_widths=[widths[i] for i in pick])


if __name__ == "__main__":
    main()
