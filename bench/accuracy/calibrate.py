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


def probe_policies(setting: str, n_layer: int, factors: dict):
    """[(None, the setting)], then per (kind, layer) ((kind, layer), a copy of the setting with
    that layer's bound loosened by factors[kind])."""
    base = harness.make_policy(setting)
    if not isinstance(base, KvcompCache) or base.layer_scales:
        raise SystemExit(f"--setting {setting!r}: expected a kvcomp setting without scales=")
    policies = [(None, base)]
    for kind in KINDS:
        if base.eb[kind] is None:
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
    ap.add_argument("--floor", type=float, default=0.02,
                    help="least sensitivity counted, as a share of the kind's largest")
    ap.add_argument("--min-scale", type=float, default=0.5)
    ap.add_argument("--max-scale", type=float, default=2.0)
    ap.add_argument("--kinds", default="key,value",
                    help="which kinds get scales (e.g. key: tiles' V widths step at fixed bounds)")
    ap.add_argument("--probe", default=None,
                    help="reuse a probe from this earlier output instead of running one")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if not a.probe and not a.setting:
        ap.error("--setting is needed to run a probe")
    if not a.min_scale <= 1.0 <= a.max_scale:
        ap.error("--min-scale <= 1 <= --max-scale, or no geometric mean of 1 (the same bytes)")

    if a.probe:
        record = json.loads(Path(a.probe).read_text())["probe"]
    else:
        from model import load
        model = load(modelfile.model_path(model=a.model))
        ids = harness.load_text_ids(model.tokenizer())
        record = probe(model, ids, a.setting, {"key": a.key_factor, "value": a.value_factor},
                       a.start_window, a.windows, a.window_tokens)
        record["machine"] = harness.machine_info()
    out = dict(probe=record, floor=a.floor, min_scale=a.min_scale, max_scale=a.max_scale)
    for kind, layers in record["layers"].items():
        if kind not in a.kinds.split(","):
            continue
        dkl = np.array([x["dkl"] for x in layers])
        sensitivity = dkl / (record["factors"][kind] ** 2 - 1.0)
        scales = allocate(sensitivity, a.floor, a.min_scale, a.max_scale)
        out[f"{kind}_layer_scales"] = [round(float(x), 4) for x in scales]
        print(f"{kind}: probe KL increase x1e4 " + " ".join(f"{x * 1e4:.1f}" for x in dkl))
        print(f"{kind}: scales " + " ".join(f"{x:.2f}" for x in scales))
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
