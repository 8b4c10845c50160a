# SPDX-License-Identifier: Apache-2.0
"""Per-layer error-bound scales from measured sensitivity (the store's key_layer_scales and
value_layer_scales).

    python bench/accuracy/calibrate.py --setting kvcomp:k=0.3,v=0.072,kmode=abs,t=128,ns=4,sinks=4 \
        --start-window 40 --windows 4 --out results/scales.json

Probe: on calibration windows (by default outside the 32 windows the tables are measured on),
one forward pass with the setting as given, then one per (layer, K|V) with only that layer's
bound loosened (by --key-factor or --value-factor). Each pass's KL divergence from the fp16 cache's next-token
distributions, less the setting's, is that (layer, kind)'s marginal cost.

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
    """The setting itself, then one copy per (kind, layer) with that layer's bound loosened."""
    base = harness.make_policy(setting)
    if not isinstance(base, KvcompCache) or base.layer_scales:
        raise SystemExit(f"--setting {setting!r}: expected a kvcomp setting without scales=")
    policies = [base]
    for kind in KINDS:
        if base.eb[kind] is None:
            continue
        for layer in range(n_layer):
            pol = harness.make_policy(setting)
            scales = [1.0] * n_layer
            scales[layer] = factors[kind]
            pol.layer_scales = {kind: scales}
            pol.name = f"{kind} {layer}"
            policies.append(pol)
    return policies


def run_probe(model, ids, policies, windows, window_tokens, start):
    """Per policy, the mean KL over the windows' predictions and the bytes held at their ends."""
    from tqdm import tqdm
    kl = np.zeros(len(policies))
    held = np.zeros(len(policies))
    n = 0
    with tqdm(total=windows * (len(policies) + 1), unit="pass", desc="probe passes",
              file=sys.stderr) as bar:
        for w in range(start, start + windows):
            x = np.asarray(ids[w * window_tokens:(w + 1) * window_tokens], dtype=np.int64)
            lp_ref = harness.log_softmax(model.forward(x, FP16Cache())[:-1])
            p_ref = np.exp(lp_ref)
            bar.update(1)
            for i, pol in enumerate(policies):
                lp = harness.log_softmax(model.forward(x, pol)[:-1])
                kl[i] += float((p_ref * (lp_ref - lp)).sum(dtype=np.float64))
                held[i] += pol.bytes
                bar.update(1)
            n += len(x) - 1
    return kl / n, held


def allocate(sensitivity: np.ndarray, floor: float, lo: float, hi: float) -> np.ndarray:
    """Scales proportional to 1 / sqrt(sensitivity), geometric mean 1, within [lo, hi]."""
    s = np.maximum(sensitivity, floor * max(sensitivity.max(), 0.0) + 1e-12)
    scale = 1.0 / np.sqrt(s)
    for _ in range(50):  # renormalize and clamp until the clamped set settles
        scale = np.clip(scale / np.exp(np.log(scale).mean()), lo, hi)
    return scale


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(modelfile.MODELS))
    ap.add_argument("--setting", required=True, help="the kvcomp setting to calibrate")
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
    ap.add_argument("--probe", default=None,
                    help="reuse a probe from this earlier output instead of running one")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    if a.probe:
        probe = json.loads(Path(a.probe).read_text())["probe"]
    else:
        from model import load
        model = load(modelfile.model_path(model=a.model))
        ids = harness.load_text_ids(model.tokenizer())
        factors = {"key": a.key_factor, "value": a.value_factor}
        policies = probe_policies(a.setting, model.hp.n_layer, factors)
        t0 = time.time()
        kl, held = run_probe(model, ids, policies, a.windows, a.window_tokens, a.start_window)
        probe = dict(setting=a.setting, factors=factors, start_window=a.start_window,
                     windows=a.windows, window_tokens=a.window_tokens, n_layer=model.hp.n_layer,
                     kl=float(kl[0]), bytes=float(held[0]), seconds=round(time.time() - t0),
                     machine=harness.machine_info(), layers={})
        for pol, k, b in zip(policies[1:], kl[1:], held[1:]):
            kind, layer = pol.name.split()
            probe["layers"].setdefault(kind, [None] * model.hp.n_layer)[int(layer)] = dict(
                dkl=float(k - kl[0]), dbytes=float(b - held[0]))
    out = dict(probe=probe, floor=a.floor, min_scale=a.min_scale, max_scale=a.max_scale)
    for kind, layers in probe["layers"].items():
        dkl = np.array([x["dkl"] for x in layers])
        sensitivity = dkl / (probe["factors"][kind] ** 2 - 1.0)
        scales = allocate(sensitivity, a.floor, a.min_scale, a.max_scale)
        out[f"{kind}_layer_scales"] = [round(float(x), 4) for x in scales]
        print(f"{kind}: probe KL increase x1e4 " + " ".join(f"{x * 1e4:.1f}" for x in dkl))
        print(f"{kind}: scales " + " ".join(f"{x:.2f}" for x in scales))
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
