# SPDX-License-Identifier: Apache-2.0
"""Figure and markdown tables for docs/accuracy.md from the harness's JSON results.

    python bench/accuracy/plot.py bench/accuracy/results/sweep.json \
        --headline bench/accuracy/results/headline.json --figure docs/accuracy_pareto.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def label(setting: str) -> str:
    if setting.startswith("kvcomp:"):
        o = dict(kv.split("=") for kv in setting.split(":", 1)[1].split(","))
        km = "abs" if o.get("kmode", o.get("mode", "rel")) == "abs" else "rel"
        vm = "abs" if o.get("vmode", o.get("mode", "rel")) == "abs" else "rel"
        k = "fp16" if o.get("k", "none") == "none" else f"{km} {o['k']}"
        v = "fp16" if o.get("v", "none") == "none" else f"{vm} {o['v']}"
        extra = "".join(f", {x}={o[x]}" for x in ("t", "vg") if x in o)
        return f"kvcomp K {k}, V {v}{extra}"
    return {"kivi:2": "KIVI-2", "kivi:4": "KIVI-4", "int8": "int8 per-token",
            "fp16": "fp16"}.get(setting, setting)


def group(setting: str) -> str:
    if not setting.startswith("kvcomp:"):
        return setting
    o = dict(kv.split("=") for kv in setting.split(":", 1)[1].split(","))
    if o.get("k", "none") == "none":
        return "kvcomp V only"
    if o.get("v", "none") == "none":
        return "kvcomp K only"
    if o.get("kmode", o.get("mode", "rel")) != "abs":
        return "kvcomp K rel"
    return "kvcomp K+V"


def table(results, tokens_note=True) -> str:
    rows = ["| setting | ratio | PPL | ΔPPL | mean KL (nats) | top-1 agreement |",
            "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["setting"] == "fp16":
            rows.append(f"| fp16 KV cache | 1.00 | {r['ppl']:.3f} | — | — | — |")
            continue
        rows.append(f"| {label(r['setting'])} | {r['ratio']:.2f} | {r['ppl']:.3f} | "
                    f"{r['dppl_pct']:+.2f}% | {r['kl']:.4f} | {100 * r['top1']:.2f}% |")
    return "\n".join(rows)


def figure(results, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "kvcomp K+V": dict(color="tab:blue", marker="o", ls="-"),
        "kvcomp K only": dict(color="tab:cyan", marker="^", ls=":"),
        "kvcomp V only": dict(color="tab:purple", marker="v", ls=":"),
        "kvcomp K rel": dict(color="tab:gray", marker="s", ls="none"),
        "kivi:2": dict(color="tab:red", marker="X", ls="none", ms=11),
        "kivi:4": dict(color="tab:orange", marker="X", ls="none", ms=11),
        "int8": dict(color="tab:green", marker="D", ls="none", ms=8),
    }
    names = {"kvcomp K+V": "kvcomp (K abs, V rel bound)", "kvcomp K only": "kvcomp, K only",
             "kvcomp V only": "kvcomp, V only", "kvcomp K rel": "kvcomp, K rel bound",
             "kivi:2": "KIVI-2", "kivi:4": "KIVI-4", "int8": "int8 per-token"}
    fig, ax = plt.subplots(figsize=(8, 5.2))
    by = {}
    for r in results:
        if r["setting"] != "fp16":
            by.setdefault(group(r["setting"]), []).append(r)
    for g, rs in by.items():
        rs = sorted(rs, key=lambda r: r["ratio"])
        st = dict(styles.get(g, dict(marker="o")))
        ax.plot([r["ratio"] for r in rs], [r["dppl_pct"] for r in rs], label=names.get(g, g),
                **st)
        if g == "kvcomp K+V":
            for r in rs:
                o = dict(kv.split("=") for kv in r["setting"].split(":", 1)[1].split(","))
                ax.annotate(f"K{o['k']}/V{o['v']}", (r["ratio"], r["dppl_pct"]),
                            textcoords="offset points", xytext=(6, -10), fontsize=7,
                            color="tab:blue")
    ax.axhline(1.0, color="k", lw=0.6, ls="--")
    ax.axhline(3.0, color="k", lw=0.6, ls=":")
    ax.axvline(5.0, color="k", lw=0.6, ls="--")
    ax.axvline(8.0, color="k", lw=0.6, ls=":")
    ax.set_yscale("symlog", linthresh=1.0, linscale=1.5)
    ticks = [-0.5, 0, 0.5, 1, 2, 3, 5, 10, 20, 40]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_ylim(-0.6, max(45, max(r.get("dppl_pct", 0) for r in results) * 1.2))
    ax.set_xlabel("compression ratio vs fp16 K+V (everything counted)")
    ax.set_ylabel("perplexity change vs fp16 cache (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep")
    ap.add_argument("--headline", default=None)
    ap.add_argument("--figure", default="docs/accuracy_pareto.png")
    a = ap.parse_args(argv)
    sweep = json.loads(Path(a.sweep).read_text())
    m = sweep["meta"]
    tok = sweep["results"][0]["tokens"]
    figure(sweep["results"], Path(a.figure),
           f"SmolLM2-135M-Instruct, WikiText-2 test: {m['windows_done']} windows x "
           f"{m['window_tokens']} tokens ({tok} predictions), T = 64")
    print(f"## sweep ({tok} predictions)\n")
    print(table(sweep["results"]))
    if a.headline:
        h = json.loads(Path(a.headline).read_text())
        print(f"\n## headline ({h['results'][0]['tokens']} predictions, "
              f"{h['meta']['windows_done']} windows)\n")
        print(table(h["results"]))


if __name__ == "__main__":
    main()
