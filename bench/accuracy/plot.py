# SPDX-License-Identifier: Apache-2.0
"""Figure and markdown tables for docs/accuracy.md from the harness's JSON results.

    python bench/accuracy/plot.py --sweep bench/accuracy/results/sweep.json \
        --headline bench/accuracy/results/headline_t128.json \
        --tiles bench/accuracy/results/tiles_t128.json \
            bench/accuracy/results/layer_scales_t128.json \
            bench/accuracy/results/layer_scales_t128_b.json \
            bench/accuracy/results/layer_widths_t128.json \
            bench/accuracy/results/tiles_t64_w32.json \
            bench/accuracy/results/baselines_w32.json \
        --gemma bench/accuracy/results/gemma3_t128.json bench/accuracy/results/gemma3_sinks.json \
        --figure docs/accuracy_pareto.png
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path


def label(setting: str) -> str:
    if setting.startswith("kvcomp:"):
        o = dict(kv.split("=") for kv in setting.split(":", 1)[1].split(","))
        km = "abs" if o.get("kmode", o.get("mode", "rel")) == "abs" else "rel"
        vm = "abs" if o.get("vmode", o.get("mode", "rel")) == "abs" else "rel"
        k = "fp16" if o.get("k", "none") == "none" else f"{km} {o['k']}"
        v = "fp16" if o.get("v", "none") == "none" else f"{vm} {o['v']}"
        extra = f", T={o.get('t', 64)}"
        tiles = o.get("fmt", "v1") == "tiles"
        extra += "".join(f", {x}={o[x]}" for x in ("vg",) if x in o)
        if "ns" in o and not tiles:
            extra += f", ns={o['ns']}"
        if "fp16layers" in o:
            extra += f", layers {o['fp16layers'].replace('+', ',')} fp16"
        if o.get("sinks", "0") != "0":
            extra += f", {o['sinks']} sinks fp16"
        if o.get("rot", "0") != "0":
            extra += ", Hadamard " + {"1": "K+V", "k": "K", "v": "V"}[o["rot"]]
        if "scales" in o:
            extra += scales_label(o["scales"])
        if tiles:
            opts = [nm for nm, x in (("perm", "perm"), ("split", "split"))
                    if o.get(x, "1") == "1"]
            fmt = "tiles" + (f" ({'+'.join(opts)})" if opts else " (no perm, no split)")
        else:
            fmt = "v1"
        return f"kvcomp {fmt} K {k}, V {v}{extra}"
    if setting.startswith(("kvcomp-paper:", "packkv:")):
        return paper_label(setting)
    return {"kivi:2": "KIVI-2", "kivi:4": "KIVI-4", "int8": "int8 per-token",
            "fp16": "fp16"}.get(setting, setting)


# The published compressors' defaults (harness.make_policy), left out of their labels.
PAPER_DEFAULTS = {"kvcomp-paper": dict(kt="64", vt="128", kr="128", vr="256", kg="block",
                                       vg="token"),
                  "packkv": dict(t="64", buf="192", pack="16", repack="greedy", kg="token",
                                 vg="token")}


def paper_label(setting: str) -> str:
    """KVComp (paper) K step 0.02, V step 0.05 [, options that differ from the defaults]: the
    steps relative to each group's range (the bound is half of them)."""
    kind, rest = setting.split(":", 1)
    o = dict(kv.split("=") for kv in rest.split(","))
    name = {"kvcomp-paper": "KVComp (paper)", "packkv": "PackKV (paper)"}[kind]
    k = "fp16" if o.get("k") == "none" else f"step {o.get('k')}"
    v = "fp16" if o.get("v") == "none" else f"step {o.get('v')}"
    extra = "".join(f", {x}={y}" for x, y in o.items()
                    if x not in ("k", "v") and PAPER_DEFAULTS[kind].get(x) != y)
    return f"{name} K {k}, V {v}{extra}"


@functools.lru_cache
def scaled_kinds(name: str) -> tuple:
    """K and/or V: the kinds a scales= file (under bench/accuracy/) gives scales for ("V
    widths" where V's are per-layer tile widths, calibrate.py --value-widths)."""
    cal = json.loads((Path(__file__).resolve().parent / name).read_text())
    v = "V widths" if cal.get("value_layer_widths") else "V"
    return tuple(k for k, kind in (("K", "key"), (v, "value")) if cal.get(f"{kind}_layer_scales"))


def scales_label(name: str) -> str:
    """A row label's mention of a scales= file: the kinds it scales and its name."""
    return f", per-layer {'+'.join(scaled_kinds(name))} ({Path(name).name})"


def group(setting: str) -> str:
    if setting.startswith(("kvcomp-paper:", "packkv:")):
        kind, rest = setting.split(":", 1)
        o = dict(kv.split("=") for kv in rest.split(","))
        other = any(PAPER_DEFAULTS[kind].get(x) != y for x, y in o.items() if x not in ("k", "v"))
        return kind + (" other" if other else "")
    if not setting.startswith("kvcomp:"):
        return setting
    o = dict(kv.split("=") for kv in setting.split(":", 1)[1].split(","))
    if o.get("t") == "64" and o.get("sinks", "0") != "0":  # the tiles run at T = 64
        return f"kvcomp {o.get('fmt', 'v1')} T=64, sinks"
    if "scales" in o:
        fmt, kinds = o.get("fmt", "v1"), scaled_kinds(o["scales"])
        if o.get("sinks", "0") != "0" and (fmt, kinds) in (("v1", ("K", "V")), ("tiles", ("K",))):
            return f"kvcomp {fmt}, sinks, per-layer"
        if o.get("sinks", "0") != "0" and (fmt, kinds) == ("tiles", ("K", "V widths")):
            return "kvcomp tiles, sinks, per-layer, V widths"
        return "kvcomp per-layer, other"
    if o.get("k", "none") == "none":
        return "kvcomp V only"
    if o.get("v", "none") == "none":
        return "kvcomp K only"
    if o.get("kmode", o.get("mode", "rel")) != "abs":
        return "kvcomp K rel"
    if o.get("rot", "0") != "0":
        return "kvcomp tiles rotated" if o.get("fmt", "v1") == "tiles" else "kvcomp v1 rotated"
    sinks = ", sinks" if o.get("sinks", "0") != "0" else ""
    if o.get("fmt", "v1") == "tiles":
        if o.get("perm", "1") == "1" and o.get("split", "1") == "1":
            return "kvcomp tiles" + sinks
        return "kvcomp tiles ablation"
    return f"kvcomp K+V T={o.get('t', '64')}{sinks}"


def table(results) -> str:
    avg = all("ratio_avg" in r for r in results)
    rows = ["| setting | ratio | " + ("ratio, avg over steps | " if avg else "") +
            "PPL | ΔPPL | mean KL (nats) | top-1 agreement |",
            "|---|---:|" + ("---:|" if avg else "") + "---:|---:|---:|---:|"]
    for r in results:
        a = f" {r['ratio_avg']:.2f} |" if avg else ""
        if r["setting"] == "fp16":
            rows.append(f"| fp16 KV cache | 1.00 |{a} {r['ppl']:.3f} | — | — | — |")
            continue
        rows.append(f"| {label(r['setting'])} | {r['ratio']:.2f} |{a} {r['ppl']:.3f} | "
                    f"{r['dppl_pct']:+.2f}% | {r['kl']:.4f} | {100 * r['top1']:.2f}% |")
    return "\n".join(rows)


def paired_table(results) -> str:
    """One line per forward pass of the tile runs: a tile setting and the variants that shared
    its pass (same decoded values, so the same PPL, KL and top-1): each format's ratio side by
    side. Rows whose variants did not decode identically are refused."""
    passes = {}
    for r in results:
        if r["setting"] == "fp16" or not r["setting"].startswith("kvcomp:"):
            continue
        if r.get("mismatched_elements", 0):
            raise ValueError(f"{r['setting']} decoded differently from {r.get('pass_of')}")
        # The pass: the setting without its block format (results written before pass_of
        # existed are grouped the same way).
        key = ",".join(sorted(kv for kv in r["setting"].split(":", 1)[1].split(",")
                              if kv.split("=")[0] not in ("fmt", "perm", "split", "also", "ns")))
        passes.setdefault(key, []).append(r)
    cols = [("tiles (perm+split)", "1", "1"), ("perm only", "1", "0"), ("split only", "0", "1"),
            ("neither", "0", "0")]
    rows = ["| setting (K abs, V rel, T = 128) | " + " | ".join(c for c, _, _ in cols) +
            " | v1 Huffman (4 sub-streams) | ΔPPL | mean KL | top-1 |",
            "|---|" + "---:|" * (len(cols) + 4)]
    for key, rs in passes.items():
        o = dict(kv.split("=") for kv in key.split(","))
        name = f"K {o['k']}, V {o['v']}"
        if o.get("t", "64") != "128":
            name += f", T = {o.get('t', '64')}"
        if o.get("sinks", "0") != "0":
            name += f", {o['sinks']} sinks fp16"
        if o.get("rot", "0") != "0":
            name += ", Hadamard " + {"1": "K+V", "k": "K", "v": "V"}[o["rot"]]
        if "scales" in o:
            name += scales_label(o["scales"])
        ratio = {}
        for r in rs:
            p = dict(kv.split("=") for kv in r["setting"].split(":", 1)[1].split(",")
                     if "=" in kv)
            fmt = p.get("fmt", "v1")
            ratio[(fmt, p.get("perm", "1"), p.get("split", "1")) if fmt == "tiles"
                  else "v1"] = r["ratio"]
        cells = [f"{ratio[('tiles', pp, sp)]:.2f}" if ("tiles", pp, sp) in ratio else "—"
                 for _, pp, sp in cols]
        cells[0] = f"**{cells[0]}**" if cells[0] != "—" else cells[0]
        r = rs[0]
        v1 = f"{ratio['v1']:.2f}" if "v1" in ratio else "—"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {v1} | {r['dppl_pct']:+.2f}% | "
                    f"{r['kl']:.4f} | {100 * r['top1']:.2f}% |")
    return "\n".join(rows)


STYLES = {
    "kvcomp K+V T=64": dict(color="tab:blue", marker="o", ls="-"),
    "kvcomp K+V T=128": dict(color="navy", marker="o", ls="--", mfc="white"),
    "kvcomp K only": dict(color="tab:cyan", marker="^", ls=":"),
    "kvcomp V only": dict(color="tab:purple", marker="v", ls=":"),
    "kvcomp K rel": dict(color="tab:gray", marker="s", ls="none"),
    "kvcomp K+V T=128, sinks": dict(color="tab:blue", marker="*", ls="-", ms=10),
    "kvcomp tiles": dict(color="darkgreen", marker="s", ls="--", mfc="white"),
    "kvcomp tiles, sinks": dict(color="tab:olive", marker="P", ls="-", ms=9),
    "kvcomp tiles ablation": dict(color="tab:brown", marker="<", ls="none"),
    "kvcomp tiles rotated": dict(color="tab:pink", marker="d", ls="none", ms=8),
    "kvcomp v1 rotated": dict(color="tab:pink", marker="d", ls="none", ms=8),
    "kvcomp v1, sinks, per-layer": dict(color="black", marker="*", ls="-", ms=11),
    "kvcomp tiles, sinks, per-layer": dict(color="darkgreen", marker="P", ls="-", ms=10),
    "kvcomp tiles, sinks, per-layer, V widths": dict(color="lime", marker="P", ls="-", ms=9,
                                                     mec="darkgreen"),
    "kvcomp per-layer, other": dict(color="tab:gray", marker=".", ls="none", ms=9),
    "kvcomp tiles T=64, sinks": dict(color="teal", marker="h", ls="-", ms=9),
    "kvcomp v1 T=64, sinks": dict(color="tab:blue", marker="h", ls="-", ms=9, mfc="white"),
    "kvcomp-paper": dict(color="tab:red", marker="o", ls="-.", mfc="white"),
    "kvcomp-paper other": dict(color="tab:red", marker=".", ls="none"),
    "packkv": dict(color="darkorange", marker="s", ls="-.", mfc="white"),
    "packkv other": dict(color="darkorange", marker=".", ls="none"),
    "kivi:2": dict(color="tab:red", marker="X", ls="none", ms=11),
    "kivi:4": dict(color="tab:orange", marker="X", ls="none", ms=11),
    "int8": dict(color="tab:green", marker="D", ls="none", ms=8),
}
NAMES = {"kvcomp K+V T=64": "kvcomp, T=64 (K abs, V rel bound)",
         "kvcomp K+V T=128": "kvcomp, T=128, 4 sub-streams",
         "kvcomp K only": "kvcomp K only (V fp16)", "kvcomp V only": "kvcomp V only (K fp16)",
         "kvcomp K rel": "kvcomp, K rel bound",
         "kvcomp K+V T=128, sinks": "kvcomp v1, T=128, 4 sinks in fp16",
         "kvcomp tiles": "kvcomp tiles (t1, perm + split), T=128",
         "kvcomp tiles, sinks": "kvcomp tiles, T=128, 4 sinks in fp16",
         "kvcomp tiles ablation": "tiles without perm and/or split",
         "kvcomp tiles T=64, sinks": "tiles, T=64, 4 sinks (with, without per-layer scales)",
         "kvcomp v1 T=64, sinks": "v1, T=64, 4 sinks (with, without per-layer scales)",
         "kvcomp tiles rotated": "tiles with a Hadamard rotation (K+V, K or V)",
         "kvcomp v1 rotated": "v1 with a Hadamard rotation (K+V, K or V)",
         "kvcomp v1, sinks, per-layer": "v1, 4 sinks, per-layer K and V bounds",
         "kvcomp tiles, sinks, per-layer": "tiles, 4 sinks, per-layer K bounds",
         "kvcomp tiles, sinks, per-layer, V widths": "the same, and per-layer V tile widths",
         "kvcomp per-layer, other": "other per-layer bound rows",
         "kivi:2": "KIVI-2", "kivi:4": "KIVI-4",
         "int8": "int8 per-token",
         "kvcomp-paper": "KVComp (Jiang et al. 2025), re-implemented",
         "kvcomp-paper other": "KVComp, other options",
         "packkv": "PackKV (Jiang et al. 2025), re-implemented",
         "packkv other": "PackKV, other options"}


def _panel(ax, results, title, targets=((5.0, 1.0), (8.0, 3.0))):
    """targets: (ratio, ΔPPL %) points drawn as dashed, then dotted, lines."""
    by = {}
    for r in results:
        if r["setting"] != "fp16":
            by.setdefault(group(r["setting"]), []).append(r)
    for g, rs in by.items():
        rs = sorted(rs, key=lambda r: r["ratio"])
        ax.plot([r["ratio"] for r in rs], [r["dppl_pct"] for r in rs], label=NAMES.get(g, g),
                **STYLES.get(g, dict(marker="o")))
        if g.startswith("kvcomp K+V") or g.startswith("kvcomp tiles,") or g == "kvcomp tiles" \
                or g == "kvcomp v1, sinks, per-layer":
            for r in rs:
                o = dict(kv.split("=") for kv in r["setting"].split(":", 1)[1].split(","))
                ax.annotate(f"K{o['k']}/V{o['v']}", (r["ratio"], r["dppl_pct"]),
                            textcoords="offset points", xytext=(5, -11), fontsize=6.5,
                            color=STYLES[g]["color"])
    for (x, y), ls in zip(targets, ("--", ":")):
        ax.axhline(y, color="k", lw=0.6, ls=ls)
        ax.axvline(x, color="k", lw=0.6, ls=ls)
    ax.set_yscale("symlog", linthresh=1.0, linscale=1.5)
    ticks = [-0.5, 0, 0.5, 1, 2, 3, 5, 10, 20, 40]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_ylim(-0.6, max(45, max(r.get("dppl_pct", 0) for r in results) * 1.2))
    ax.set_xlabel("compression ratio vs fp16 K+V (end of window, everything counted)")
    ax.set_ylabel("perplexity change vs fp16 cache (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")


def figure(panels, path: Path, suptitle: str):
    """panels: [(results, title)], two to a row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7.2 * cols, 5.4 * rows), squeeze=False)
    for ax, (results, title, *targets) in zip(axes.flat, panels):
        _panel(ax, results, title, *targets)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _load(paths):
    """Results of one or more JSON files over the same windows (a setting measured in several
    keeps its first row: fp16 and the baselines are deterministic)."""
    res, meta = [], None
    for p in paths:
        d = json.loads(Path(p).read_text())
        meta = meta or d["meta"]
        seen = {r["setting"] for r in res}
        res += [r for r in d["results"] if r["setting"] not in seen]
    return meta, res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", nargs="+", required=True, help="the error-bound sweep's JSON")
    ap.add_argument("--headline", nargs="*", default=[],
                    help="JSON files of the long run (same windows)")
    ap.add_argument("--tiles", nargs="*", default=[],
                    help="JSON files of the tile/sink run over the headline's windows")
    ap.add_argument("--gemma", nargs="*", default=[],
                    help="JSON files of the second model's run (same windows)")
    ap.add_argument("--figure", default="docs/accuracy_pareto.png")
    a = ap.parse_args(argv)
    sm, sweep = _load(a.sweep)
    panels = [(sweep, f"SmolLM2 sweep: {sm['windows_done']} windows x {sm['window_tokens']} tokens "
                      f"({sweep[0]['tokens']} predictions)")]
    print(f"## sweep ({sweep[0]['tokens']} predictions)\n")
    print(table(sweep))
    if a.headline:
        hm, head = _load(a.headline)
        panels.append((head, f"SmolLM2: {hm['windows_done']} windows x "
                             f"{hm['window_tokens']} tokens "
                             f"({head[0]['tokens']} predictions)"))
        print(f"\n## headline ({head[0]['tokens']} predictions)\n")
        print(table(head))
    if a.tiles:
        tm, tiles = _load(a.tiles)
        n = tiles[0]["tokens"]
        partial = [r["setting"] for r in tiles if r["tokens"] != n]
        if partial:
            print(f"left out (fewer predictions than fp16's {n}): {partial}")
        tiles = [r for r in tiles if r["tokens"] == n]
        # Rows of another run join this panel only if that run's fp16 baseline is this one's
        # (same windows, same text and model); else the panels stay apart.
        same = a.headline and head[0]["tokens"] == n and \
            abs(head[0]["ppl"] / tiles[0]["ppl"] - 1) < 1e-9
        if a.headline and not same:
            print(f"note: the headline's fp16 PPL {head[0]['ppl']:.3f} is not this run's "
                  f"{tiles[0]['ppl']:.3f}: panels kept apart")
        base = []
        if same:
            base = [r for r in head if not r["setting"].startswith("kvcomp:")
                    or group(r["setting"]) == "kvcomp K+V T=128"]
        panels.append((tiles + [r for r in base if r["setting"] not in
                                {t["setting"] for t in tiles}],
                       f"SmolLM2 tiles: {tm['windows_done']} windows x "
                       f"{tm['window_tokens']} tokens "
                       f"({n} predictions); lines: the 4x / 1.5% target",
                       ((4.0, 1.5),)))
        print(f"\n## tiles, sinks ({n} predictions)\n")
        print(table(tiles))
        print("\n## the same, one line per pass\n")
        print(paired_table(tiles))
    if a.gemma:
        gm, gemma = _load(a.gemma)
        n = gemma[0]["tokens"]
        panels.append((gemma, f"Gemma 3 270M (GGUF Q4_K_M): {gm['windows_done']} windows x "
                              f"{gm['window_tokens']} tokens ({n} predictions)"))
        print(f"\n## Gemma 3 270M ({n} predictions)\n")
        print(table(gemma))
    figure(panels, Path(a.figure),
           "WikiText-2 test, KV cache through kvcomp vs KIVI vs fp16: SmolLM2-135M-Instruct "
           "(GGUF Q4_1)" + (" and Gemma 3 270M" if a.gemma else ""))


if __name__ == "__main__":
    main()
