# SPDX-License-Identifier: Apache-2.0
"""Merges harness results over disjoint windows (one run split over processes with
--start-window) into one result set: sums of log-likelihoods, KL, top-1 hits and bytes.

    python bench/accuracy/merge.py a.json b.json --out merged.json

Parts over the same windows (settings run by separate processes) are first united; --common
keeps only the settings measured on every window.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _add_counts(a, b):
    """Block counts summed key by key (lists, e.g. tiles per width, element by element)."""
    if a is None:
        return {k: list(v) if isinstance(v, list) else v for k, v in b.items()}
    for k, v in b.items():
        if isinstance(v, list):
            a[k] = [x + y for x, y in zip(a.get(k, [0] * len(v)), v)]
        else:
            a[k] = a.get(k, 0) + v
    return a


def merge(parts):
    out = {}
    order = []
    for part in parts:
        for r in part["results"]:
            s = r["setting"]
            if s not in out:
                order.append(s)
                out[s] = dict(setting=s, tokens=0, nll=0.0, kl=0.0, top1=0.0, bytes=0.0,
                              fp16_bytes=0.0, seconds=0.0, ref_nll=0.0, bytes_time=0.0,
                              fp16_time=0.0)
            m = out[s]
            for key in ("pass_of", "path"):  # a variant row's pass (harness.VariantOf)
                if key in r:
                    m[key] = r[key]
            if "mismatched_elements" in r:
                m["mismatched_elements"] = m.get("mismatched_elements", 0) + \
                    r["mismatched_elements"]
            for key in ("blocks", "parts"):
                if key in r:
                    m[key] = _add_counts(m.get(key), r[key])
            n = r["tokens"]
            m["tokens"] += n
            m["nll"] += math.log(r["ppl"]) * n
            m["bytes"] += r["bytes"]
            m["fp16_bytes"] += r["fp16_bytes"]
            m["bytes_time"] += r.get("bytes_time", math.nan)
            m["fp16_time"] += r.get("fp16_time", math.nan)
            m["seconds"] += r["seconds"]
            if "kl" in r:
                m["kl"] += r["kl"] * n
                m["top1"] += r["top1"] * n
                m["ref_nll"] += math.log(r["ppl_fp16"]) * n
    res = []
    for s in order:
        m = out[s]
        n = m["tokens"]
        r = dict(setting=s, tokens=n, ppl=math.exp(m["nll"] / n),
                 ratio=m["fp16_bytes"] / m["bytes"], bytes=m["bytes"],
                 fp16_bytes=m["fp16_bytes"], seconds=round(m["seconds"], 1))
        r.update({key: m[key] for key in ("blocks", "parts", "path", "pass_of",
                                          "mismatched_elements") if key in m})
        if not math.isnan(m["bytes_time"]):
            r.update(ratio_avg=m["fp16_time"] / m["bytes_time"], bytes_time=m["bytes_time"],
                     fp16_time=m["fp16_time"])
        if s != "fp16":
            r["ppl_fp16"] = math.exp(m["ref_nll"] / n)
            r["kl"] = m["kl"] / n
            r["top1"] = m["top1"] / n
            r["dppl_pct"] = 100.0 * (r["ppl"] / r["ppl_fp16"] - 1.0)
        res.append(r)
    return res


def combine_same_windows(parts):
    """Parts that cover the same windows (same start_window and windows_done: settings run in
    separate processes) become one part with the union of their rows; a setting in several
    (fp16 is in every one) keeps its first row. Those rows must agree on fp16's perplexity."""
    groups = {}
    for p in parts:
        key = (p["meta"].get("start_window", 0), p["meta"]["windows_done"])
        if key not in groups:
            groups[key] = dict(meta=dict(p["meta"]), results=list(p["results"]))
            continue
        g = groups[key]
        ref = {r["setting"]: r for r in g["results"]}["fp16"]["ppl"]
        for r in p["results"]:
            if r["setting"] == "fp16" and r["ppl"] != ref:
                raise ValueError(f"parts of windows {key} disagree on fp16's perplexity")
            if r["setting"] not in {x["setting"] for x in g["results"]}:
                g["results"].append(r)
    return list(groups.values())


def common_settings(parts):
    """Only the settings present in every part (so that every row covers all windows)."""
    keep = set.intersection(*({r["setting"] for r in p["results"]} for p in parts))
    return [dict(p, results=[r for r in p["results"] if r["setting"] in keep]) for p in parts]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("parts", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--common", action="store_true",
                    help="keep only the settings measured on every window")
    a = ap.parse_args(argv)
    parts = combine_same_windows([json.loads(Path(p).read_text()) for p in a.parts])
    if a.common:
        parts = common_settings(parts)
    meta = dict(parts[0]["meta"])
    meta["windows_done"] = sum(p["meta"]["windows_done"] for p in parts)
    meta["parts"] = [dict(start_window=p["meta"].get("start_window", 0),
                          windows=p["meta"]["windows_done"]) for p in parts]
    meta.pop("start_window", None)
    Path(a.out).write_text(json.dumps(dict(meta=meta, results=merge(parts)), indent=1))


if __name__ == "__main__":
    main()
