# SPDX-License-Identifier: Apache-2.0
"""Replays a recorded decode (record_kv.py) through kvcomp's paged store and compares every
attention output with the CPU store's on the same data: the real model's K, V and queries, no
model needed (so it fits a machine without network or the 94 MB model).

Two sequences share the recording (the second with a shorter prompt, so the batch has unequal
lengths): each is prefilled (all recorded layers at once), then each step appends the step's
K/V row to both, layer by layer, and runs batched decode attention.

    python bench/accuracy/replay_kv.py                     # CPU store, twice: must be identical
    python bench/accuracy/replay_kv.py --device cuda       # CUDA store against the CPU store

Each block format is replayed (--formats): format v1 at T = 32, tile blocks (format t1, read by
the tensor-core tile kernel on CUDA) at T = 64; both stores of a comparison hold the same format,
so their block bytes must be equal too.

Exit status 1 if an output differs by more than the tolerance (0 for CPU against CPU; for CUDA,
its fp32 accumulation against the CPU's double: --tolerance, relative to the largest |output| of
the layer and step), if the block bytes or the sequences' lengths differ, if an append failed
(a CUDA store records it in its stats, kvc_store_get_stats), or if the K and V read back at the
end differ (the same blocks decode to the same values). --json writes every figure to a file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "python")]

import numpy as np  # noqa: E402

from device import Device  # noqa: E402

DEFAULT_FILE = HERE / "data" / "smollm2_decode.npz"
# The demo's bounds, and per block format a T for which the CUDA store has an attention kernel
# and the short recording fills several blocks (v1: T of 32, 64 or 128; tiles: 64 or 128).
CONFIG = dict(key_bound_mode="absolute", key_error_bound=0.25,
              value_bound_mode="relative", value_error_bound=0.07)
FORMATS = {"v1": dict(block_format="v1", block_tokens=32),
           "tiles": dict(block_format="tiles", block_tokens=64)}
SHORT_PROMPT = 70


def load(path=DEFAULT_FILE) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def replay(rec: dict, device: str = "cpu", **config) -> dict:
    """Outputs [steps, layers, 2 sequences, q_heads, head_dim] fp16, the store's stats, the
    sequences' lengths and their final read-back ([layer][sequence] -> (K, V) fp32, host)."""
    import kvcomp
    dev = Device(device)
    pk, pv = rec["prompt_k"], rec["prompt_v"]          # [L, n, Hk, d]
    sq, sk, sv = rec["step_q"], rec["step_k"], rec["step_v"]
    L, n, Hk, d = pk.shape
    steps, Hq = sq.shape[0], sq.shape[2]
    cfg = dev.store_config(num_layers=L, num_kv_heads=Hk, head_dim=d,
                           capacity_bytes=64 << 20, **dict(CONFIG, **config))
    store = kvcomp.Store(**cfg)
    seqs = [store.add_sequence(), store.add_sequence()]
    store.prefill(seqs[0], dev.put(pk), dev.put(pv))
    store.prefill(seqs[1], dev.put(pk[:, :SHORT_PROMPT]), dev.put(pv[:, :SHORT_PROMPT]))
    out = np.empty((steps, L, 2, Hq, d), np.float16)
    scale = 1.0 / float(np.sqrt(d))
    for t in range(steps):
        for layer in range(L):
            k2 = np.stack([sk[t, layer]] * 2)
            v2 = np.stack([sv[t, layer]] * 2)
            store.append(layer, seqs, dev.put(k2), dev.put(v2))
            q2 = np.stack([sq[t, layer]] * 2)
            o = store.attention(layer, seqs, dev.put(q2), scale=scale,
                                out=dev.empty((2, Hq, d)))
            out[t, layer] = dev.get(o)
    lengths = [store.sequence_length(s, 0) for s in seqs]
    readback = []
    for layer in range(L):
        readback.append([])
        for s, n in zip(seqs, lengths):
            kv = (dev.empty((n, Hk, d), np.float32), dev.empty((n, Hk, d), np.float32))
            k, v = store.read(s, layer, dtype=np.float32, keys=kv[0], values=kv[1])
            readback[-1].append((dev.get(k), dev.get(v)))
    return dict(out=out, stats=store.stats(), lengths=lengths, readback=readback)


def compare(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| over each (step, layer), relative to that step and layer's largest
    |a|; the worst of them."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    axes = tuple(range(2, a.ndim))
    scale = np.maximum(np.abs(a32).max(axis=axes), 1e-6)
    return float((np.abs(a32 - b32).max(axis=axes) / scale).max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", default=str(DEFAULT_FILE))
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="relative tolerance (default: 0 on the CPU, 1e-2 on CUDA)")
    ap.add_argument("--formats", default="v1,tiles",
                    help="comma-separated block formats to replay (v1, tiles)")
    ap.add_argument("--json", default=None, help="write the figures of every format here")
    a = ap.parse_args(argv)
    rec = load(a.file)
    tol = a.tolerance if a.tolerance is not None else (0.0 if a.device == "cpu" else 1e-2)
    L, steps = rec["prompt_k"].shape[0], rec["step_q"].shape[0]
    print(f"replay of {a.file}: {L} layers (model layers {rec['layers'].tolist()}), prompt "
          f"{rec['prompt_k'].shape[1]} and {SHORT_PROMPT} tokens, {steps} decode steps, "
          f"{steps * L} batched attention calls per format")
    ok = True
    figures = dict(file=a.file, device=a.device, tolerance=tol, formats={})
    for name in a.formats.split(","):
        if name not in FORMATS:
            ap.error(f"--formats: unknown block format {name!r} (known: {', '.join(FORMATS)})")
        ref = replay(rec, "cpu", **FORMATS[name])
        got = replay(rec, a.device, **FORMATS[name])
        err = compare(ref["out"], got["out"])
        readback = max(float(np.abs(x - y).max()) if x.size else 0.0
                       for rl, gl in zip(ref["readback"], got["readback"])
                       for rs, gs in zip(rl, gl) for x, y in zip(rs, gs))
        checks = dict(outputs=err <= tol,
                      block_bytes=got["stats"]["block_bytes"] == ref["stats"]["block_bytes"],
                      lengths=got["lengths"] == ref["lengths"],
                      appends=got["stats"]["failed_appends"] == 0,
                      readback=readback == 0.0)
        passed = all(checks.values())
        print(f"{name} (T = {FORMATS[name]['block_tokens']}): {a.device} store vs CPU store: "
              f"worst |difference| / max |output| per (step, layer) = {err:.3e} (tolerance "
              f"{tol:g}); blocks {got['stats']['num_blocks']}, {got['stats']['block_bytes']} "
              f"bytes (CPU: {ref['stats']['block_bytes']}); sequences end at {got['lengths']} "
              f"tokens (CPU: {ref['lengths']}); failed appends "
              f"{got['stats']['failed_appends']}; largest |difference| of the K and V read back "
              f"{readback:g}: {'PASS' if passed else 'FAIL'}"
              + ("" if passed else f" ({', '.join(k for k, v in checks.items() if not v)})"))
        figures["formats"][name] = dict(
            block_tokens=FORMATS[name]["block_tokens"], output_error=err,
            blocks=got["stats"]["num_blocks"], block_bytes=got["stats"]["block_bytes"],
            cpu_block_bytes=ref["stats"]["block_bytes"], lengths=got["lengths"],
            cpu_lengths=ref["lengths"], failed_appends=got["stats"]["failed_appends"],
            readback_error=readback, checks=checks, passed=passed)
        ok = ok and passed
    figures["passed"] = ok
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1) + "\n")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
