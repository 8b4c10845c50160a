# SPDX-License-Identifier: Apache-2.0
"""Accuracy harness: perplexity, KL divergence and top-1 agreement of a real model whose KV
cache goes through kvcomp (and through the baselines), against the same model with an fp16
KV cache, on WikiText-2; plus the compression ratio with everything counted.

    python bench/accuracy/harness.py --windows 32 --window-tokens 1024 \
        --settings kvcomp:k=0.25,v=0.07,kmode=abs,t=128,ns=4 kivi:2 kivi:4 int8 --out r.json

The text is cut into consecutive non-overlapping windows; each window is a fresh sequence
evaluated on all its next-token predictions. Settings are given as
  fp16 | kvcomp:k=EB,v=EB[,kmode=rel|abs][,vmode=rel|abs][,t=64][,vg=0][,ns=0]
                  [,entropy=auto][,fp16layers=0+1][,path=store|codec]
                  [,fmt=v1|tiles][,perm=1][,split=1][,rot=0|1|k|v][,sinks=0][,also=v1+t11+...]
                  [,scales=FILE]
       | kivi:BITS[,g=32][,r=128] | int8
       | kvcomp-paper:k=STEP,v=STEP[,kt=64][,vt=128][,kr=128][,vr=256][,kg=block][,vg=token]
       | packkv:k=STEP,v=STEP[,t=64][,buf=192][,pack=16][,repack=greedy|median|none]
                [,kg=token][,vg=token]
where EB is an error bound, relative to each quantization group's range (rel, the default) or
absolute (abs), or "none" to keep that tensor fp16; t: tokens per block; vg: V channels per
group; ns: Huffman sub-streams per block (0 = the library's choice); fp16layers: layers whose
cache stays fp16; path: through the paged store (kvc_store_prefill, kvc_store_read; the default
for v1 settings without sinks or rotation) or the codec API (kvc_codec_encode/decode; the default
otherwise, needed for ns=, fp16layers=, k/v=none, rot=k and also=). Both give the same decoded
values (tests/test_harness.py, tests/test_tiles_rotation.py). fmt: block format v1 or tiles (t1,
docs/format.md §17; perm and split: the tile encoder's channel permutation and 3/6-bit widths);
sinks: the first tokens of each window also kept fp16 (through the store: its sink_tokens option);
scales: per-layer bound factors from calibrate.py (a JSON file; through the store: its
key_layer_scales and value_layer_scales);
rot: a normalized Hadamard rotation of each head's K and V (1), K only (k) or V only (v) before
encoding, undone after decoding (the bound then holds in the rotated space; through the store:
its rotation option, which holds the fp16 sinks and tail rotated too).
Codec path only: also: more block formats written from the same input in the same pass, one
row each (v1: v1 with the setting's ns; tPS: tiles with perm=P, split=S), their decoded values
checked equal to the setting's element by element (`mismatched_elements` in the results: 0 means
the row's PPL, KL and top-1 are exactly its own).

kvcomp-paper and packkv are the published compressors KVComp (arXiv 2509.00579) and PackKV
(arXiv 2512.24449) as cache.py re-implements them from the papers (docs/accuracy.md, "Other
compressors: KVComp and PackKV"). STEP is the papers' quantization scale: the step relative to
each group's range (max - min), so the error bound is STEP / 2 of the range (kvcomp's rel bound
0.05 is STEP 0.1), or "none" to keep that tensor fp16. kg, vg: the quantization group of K and V
(block: a block over every kv-head and channel; channel: one channel of one head over the block;
token: one token over every kv-head's channels; vector: one token of one head). kvcomp-paper: kt,
vt tokens per K and V block, kr, vr the fp16 buffers of the most recent tokens; the codes are
Huffman-coded with one code per (layer, K|V) per window. packkv: t tokens per block, buf the fp16
buffer, pack tokens per bit-packed pack, repack the token permutation that fills the packs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "python")]

from cache import (FP16Cache, Int8TokenCache, KiviCache, KvcompCache,  # noqa: E402
                   KVCompPaperCache, PackKVCache)
import modelfile  # noqa: E402
import wikitext  # noqa: E402


MODES = {"rel": "relative", "abs": "absolute"}
ROTATIONS = {"0": False, "1": True, "k": "key", "v": "value"}


def make_policy(spec: str, device: str = "cpu"):
    """The cache policy of a setting string; kvcomp settings run on `device`'s store."""
    kind, _, rest = spec.partition(":")
    opts = dict(kv.split("=", 1) for kv in rest.split(",") if "=" in kv)
    if kind == "fp16":
        return FP16Cache()
    if kind == "kvcomp":
        def eb(x):
            return None if x in (None, "none") else float(x)
        also = [tok for tok in opts.get("also", "").split("+") if tok]
        variants = [parse_variant(tok, opts) for tok in also]  # checks the tokens first
        variants = [(variant_setting(spec, tok), var) for tok, var in zip(also, variants)]
        return KvcompCache(eb(opts.get("k")), eb(opts.get("v")), block_tokens=int(opts.get("t", 64)),
                           value_group_size=int(opts.get("vg", 0)),
                           entropy=opts.get("entropy", "auto"), name=spec,
                           num_substreams=int(opts.get("ns", 0)),
                           path=opts.get("path"), device=device,
                           fp16_layers=[int(i) for i in opts.get("fp16layers", "").split("+")
                                        if i],
                           bound_mode={"key": MODES[opts.get("kmode", opts.get("mode", "rel"))],
                                       "value": MODES[opts.get("vmode", opts.get("mode", "rel"))]},
                           block_format=opts.get("fmt", "v1"),
                           tile_permute=opts.get("perm", "1") == "1",
                           tile_split=opts.get("split", "1") == "1",
                           rotate=ROTATIONS[opts.get("rot", "0")],
                           sinks=int(opts.get("sinks", 0)),
                           variants=variants, layer_scales=load_scales(opts.get("scales")))
    if kind == "kivi":
        bits = int(rest.split(",")[0])
        return KiviCache(bits, group=int(opts.get("g", 32)), residual=int(opts.get("r", 128)),
                         name=spec)
    if kind == "int8":
        return Int8TokenCache()
    if kind in ("kvcomp-paper", "packkv"):
        def rel(x):
            if x is None:
                raise ValueError(f"{spec!r}: k= and v= are required")
            return None if x == "none" else float(x)
        known = {"kvcomp-paper": {"k", "v", "kt", "vt", "kr", "vr", "kg", "vg"},
                 "packkv": {"k", "v", "t", "buf", "pack", "repack", "kg", "vg"}}[kind]
        unknown = set(opts) - known
        if unknown:
            raise ValueError(f"{spec!r}: unknown option(s) {sorted(unknown)}")
        if kind == "kvcomp-paper":
            return KVCompPaperCache(rel(opts.get("k")), rel(opts.get("v")),
                                    kt=int(opts.get("kt", 64)), vt=int(opts.get("vt", 128)),
                                    kr=int(opts.get("kr", 128)), vr=int(opts.get("vr", 256)),
                                    kgroup=opts.get("kg", "block"),
                                    vgroup=opts.get("vg", "token"), name=spec)
        return PackKVCache(rel(opts.get("k")), rel(opts.get("v")), block=int(opts.get("t", 64)),
                           buffer=int(opts.get("buf", 192)), pack=int(opts.get("pack", 16)),
                           repack=opts.get("repack", "greedy"), kgroup=opts.get("kg", "token"),
                           vgroup=opts.get("vg", "token"), name=spec)
    raise ValueError(f"unknown setting {spec!r}")


def load_scales(name: str | None):
    """The per-layer bound scales of `scales=FILE` (calibrate.py's output: key_layer_scales,
    value_layer_scales), FILE as given or under bench/accuracy/; None without the option."""
    if not name:
        return None
    path = Path(name)
    if not path.exists() and (HERE / name).exists():
        path = HERE / name
    cal = json.loads(path.read_text())
    return {"key": cal.get("key_layer_scales"), "value": cal.get("value_layer_scales")}


def parse_variant(tok: str, opts: dict):
    """A variant of `also=`: "v1" (format v1 with the setting's ns) or "tPS" (tiles; P, S:
    tile_permute_channels and tile_split_widths, 0 or 1)."""
    from cache import CodecVariant
    if tok == "v1":
        return CodecVariant("v1", num_substreams=int(opts.get("ns", 0)))
    if len(tok) == 3 and tok[0] == "t" and set(tok[1:]) <= {"0", "1"}:
        return CodecVariant("tiles", permute=tok[1] == "1", split=tok[2] == "1")
    raise ValueError(f"also={tok!r}: expected v1 or tPS (P, S: 0 or 1)")


def variant_setting(spec: str, tok: str) -> str:
    """The setting string of `spec`'s variant `tok` (what it would be if run on its own)."""
    kind, _, rest = spec.partition(":")
    items = [kv for kv in rest.split(",")
             if kv.split("=", 1)[0] not in ("fmt", "perm", "split", "also")]
    if tok == "v1":
        items = [kv for kv in items if not kv.startswith("ns=")] + \
            [kv for kv in rest.split(",") if kv.startswith("ns=")]
    else:
        items = [kv for kv in items if not kv.startswith("ns=")] + \
            ["fmt=tiles", f"perm={tok[1]}", f"split={tok[2]}"]
    return f"{kind}:{','.join(items)}"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class Accumulator:
    def __init__(self, name):
        self.name = name
        self.nll = 0.0
        self.kl = 0.0
        self.top1 = 0
        self.n = 0
        self.bytes = 0.0
        self.fp16_bytes = 0.0
        self.bytes_time = 0.0
        self.fp16_time = 0.0
        self.seconds = 0.0
        self.store = None  # the store's own accounting, summed over windows (at their ends)
        self.windows = 0
        self.store_tokens = 0

    def add(self, lp, lp_ref, targets, policy, seconds, p_ref=None):
        m = len(targets)
        self.nll += float(-lp[np.arange(m), targets].sum(dtype=np.float64))
        if lp_ref is not None:
            if p_ref is None:
                p_ref = np.exp(lp_ref)
            self.kl += float((p_ref * (lp_ref - lp)).sum(dtype=np.float64))
            self.top1 += int((lp.argmax(-1) == lp_ref.argmax(-1)).sum())
        self.n += m
        self.bytes += policy.bytes
        self.fp16_bytes += policy.fp16_bytes
        self.bytes_time += policy.bytes_time
        self.fp16_time += policy.fp16_time
        self.seconds += seconds
        self.windows += 1
        parts = getattr(policy, "parts", None)  # the published compressors' byte split
        if parts is not None:
            self.parts = {k: getattr(self, "parts", {}).get(k, 0) + v for k, v in parts.items()}
        st = getattr(policy, "store_stats", None)
        if st is not None:
            self.store_tokens += m + 1
            if self.store is None:
                self.store = dict.fromkeys(st, 0)
            for k, v in st.items():
                self.store[k] += v

    def result(self, ref=None):
        ppl = float(np.exp(self.nll / self.n))
        r = dict(setting=self.name, tokens=self.n, ppl=ppl,
                 ratio=self.fp16_bytes / self.bytes, bytes=self.bytes,
                 fp16_bytes=self.fp16_bytes, ratio_avg=self.fp16_time / self.bytes_time,
                 bytes_time=self.bytes_time, fp16_time=self.fp16_time,
                 seconds=round(self.seconds, 1))
        if self.store is not None:
            r.update(store=dict(self.store), store_tokens=self.store_tokens, windows=self.windows)
        if getattr(self, "parts", None):
            r["parts"] = dict(self.parts)
        if ref is not None:
            r.update(ppl_fp16=ref.result()["ppl"], kl=self.kl / self.n, top1=self.top1 / self.n)
            r["dppl_pct"] = 100.0 * (ppl / r["ppl_fp16"] - 1.0)
        return r


def evaluate(model, ids, settings, windows, window_tokens, progress=True, log=None,
             start_window=0, device="cpu"):
    """Runs fp16 and every setting over the same windows (windows start_window, ...,
    start_window + windows - 1); returns a list of result dicts. kvcomp's codebooks are
    trained on the first window evaluated (its prefill) and frozen for the others. With
    device "cuda" each store-backed kvcomp setting runs on the CPU store and on the CUDA store
    ("<setting> [cpu store]", "<setting> [cuda store]")."""
    names, policies = [], []
    for s in settings:
        pol = make_policy(s, device)
        if getattr(pol, "variants", None):
            # One forward pass, several rows: the variants' bytes beside the primary's.
            names.append(s)
            policies.append(pol)
            for nm, _ in pol.variants:
                names.append(nm)
                policies.append(VariantOf(pol, nm))
        elif device != "cpu" and getattr(pol, "path", None) == "store":
            # The same setting through the CPU store too, to print the two side by side.
            names += [f"{s} [cpu store]", f"{s} [{device} store]"]
            policies += [make_policy(s, "cpu"), pol]
        else:
            names.append(s)
            policies.append(pol)
    ref = Accumulator("fp16")
    accs = [Accumulator(s) for s in names]
    need = (start_window + windows) * window_tokens
    if len(ids) < need:
        raise ValueError(f"text has {len(ids)} tokens, {need} needed")
    bar = None
    if progress:
        from tqdm import tqdm
        passes = 1 + sum(not isinstance(p, VariantOf) for p in policies)
        bar = tqdm(total=windows * passes, unit="pass", desc="forward passes",
                   file=sys.stderr)
    for w in range(start_window, start_window + windows):
        x = np.asarray(ids[w * window_tokens:(w + 1) * window_tokens], dtype=np.int64)
        targets = x[1:]
        base = FP16Cache()
        t0 = time.time()
        lp_ref = log_softmax(model.forward(x, base)[:-1])
        ref.add(lp_ref, None, targets, base, time.time() - t0)
        p_ref = np.exp(lp_ref)
        if bar:
            bar.update(1)
        lp = None
        for pol, acc in zip(policies, accs):
            t0 = time.time()
            if not isinstance(pol, VariantOf):  # a variant reuses its primary's pass
                lp = log_softmax(model.forward(x, pol)[:-1])
                if bar:
                    bar.update(1)
            acc.add(lp, lp_ref, targets, pol, time.time() - t0, p_ref)
        if log:
            log(w - start_window, _results(ref, accs, policies))
    if bar:
        bar.close()
    return _results(ref, accs, policies)


def _results(ref, accs, policies):
    """The result dicts so far (fp16 first), with each kvcomp row's block counts and, for a
    variant row, its pass and mismatch count."""
    results = [ref.result()] + [a.result(ref) for a in accs]
    for pol, r in zip(policies, results[1:]):
        if isinstance(pol, KvcompCache):
            r["blocks"] = dict(pol.stats)
            r["path"] = pol.path
        elif isinstance(pol, VariantOf):
            r["blocks"] = dict(pol.primary.variant_stats[pol.name])
            r["path"] = pol.primary.path
            r["pass_of"] = pol.primary.name
            # Elements that decoded differently from the primary's: 0 means the row's PPL,
            # KL and top-1 are exactly this variant's own.
            r["mismatched_elements"] = pol.primary.variant_mismatch[pol.name]
    return results


class VariantOf:
    """A row that shares its primary KvcompCache's forward pass and counts the bytes of one
    of its variants (KvcompCache.variants)."""

    def __init__(self, primary: KvcompCache, name: str):
        self.primary, self.name = primary, name

    def __getattr__(self, attr):
        if attr in ("bytes", "bytes_time"):
            return self.primary.variant_bytes[self.name][attr]
        if attr in ("fp16_bytes", "fp16_time"):
            return getattr(self.primary, attr)
        raise AttributeError(attr)


def format_table(results) -> str:
    w = max(len(r["setting"]) for r in results)
    head = (f"{'setting':<{w}} {'ratio':>6} {'avg':>6} {'PPL':>8} {'dPPL%':>7} {'KL':>8} "
            f"{'top-1':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        line = (f"{r['setting']:<{w}} {r['ratio']:6.2f} {r.get('ratio_avg', float('nan')):6.2f} "
                f"{r['ppl']:8.3f} ")
        if "dppl_pct" in r:
            line += f"{r['dppl_pct']:+7.2f} {r['kl']:8.5f} {100 * r['top1']:6.2f}%"
        lines.append(line.rstrip())
    return "\n".join(lines)


def format_store(results) -> str:
    """The store's own accounting of each store-backed setting at the windows' ends: bytes per
    token (all layers, K and V: pages + tails + tables + codebooks) against fp16, pages in use
    and the slack at page ends (kvcomp.Store.stats)."""
    lines = []
    for r in results:
        st = r.get("store")
        if not st or not st["dense_bytes"]:
            continue
        held = st["page_bytes"] + st["tail_bytes"] + st["table_bytes"] + st["codebook_bytes"]
        tokens, windows = r["store_tokens"], r["windows"]
        lines.append(
            f"{r['setting']}: the store holds {held / tokens:.0f} B/token against fp16's "
            f"{st['dense_bytes'] / tokens:.0f} ({st['dense_bytes'] / held:.2f}x with page slack, "
            f"tails, tables, codebooks); {st['pages_in_use'] / windows:.0f} of "
            f"{st['pages_total'] // windows} pages in use, slack "
            f"{100 * (1 - st['block_bytes'] / st['page_bytes']):.1f}% of their bytes")
    return "\n".join(lines)


def machine_info() -> dict:
    import kvcomp
    return dict(date=time.strftime("%Y-%m-%d"), machine=platform.machine(),
                cpus=os.cpu_count(), python=platform.python_version(),
                numpy=np.__version__, kvcomp=kvcomp.version())


def load_text_ids(tok, path: Path | str | None = None):
    """The WikiText-2 test split (the repository's copy unless `path`), tokenized."""
    return tok.encode(wikitext.load(path)).ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(modelfile.MODELS),
                    help="the model (modelfile.py fetches and verifies it; default smollm2)")
    ap.add_argument("--gguf", default=None, help="another GGUF file of a supported "
                    "architecture (llama, gemma3) instead of --model's")
    ap.add_argument("--data", default=None, help="another copy of wiki.test.raw[.xz] "
                    "(default: the repository's, or $KVCOMP_WIKITEXT; SHA-256 checked)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--start-window", type=int, default=0,
                    help="first window (to split a run over processes; see merge.py)")
    ap.add_argument("--window-tokens", type=int, default=1024)
    ap.add_argument("--settings", nargs="+",
                    default=["kvcomp:k=0.1,v=0.02,kmode=abs,t=128,ns=4",
                             "kvcomp:k=0.25,v=0.07,kmode=abs,t=128,ns=4", "kivi:2", "kivi:4",
                             "int8"],
                    help="settings: fp16, kvcomp:..., kivi:BITS, int8, and the published "
                    "compressors kvcomp-paper:k=STEP,v=STEP[,...] (KVComp) and "
                    "packkv:k=STEP,v=STEP[,...] (PackKV), STEP the quantization step relative "
                    "to each group's range; the module docstring gives every option")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="the kvcomp store's backend (cuda: needs torch and a GPU)")
    a = ap.parse_args(argv)

    from model import load
    model = load(a.gguf or modelfile.model_path(model=a.model))
    ids = load_text_ids(model.tokenizer(), a.data)
    out = Path(a.out) if a.out else None

    def log(w, res):
        if out:
            out.write_text(json.dumps(dict(meta=dict(machine_info(), windows_done=w + 1,
                                                     window_tokens=a.window_tokens,
                                                     start_window=a.start_window,
                                                     model=model.hp.name),
                                           results=res), indent=1))

    res = evaluate(model, ids, a.settings, a.windows, a.window_tokens,
                   progress=not a.no_progress, log=log, start_window=a.start_window,
                   device=a.device)
    print(format_table(res))
    return res


if __name__ == "__main__":
    main()
