# SPDX-License-Identifier: Apache-2.0
"""Writes the small real KV dump under tests/data (see tests/data/README.md): the fp16 K and V
caches of a few layers of SmolLM2-135M-Instruct over the first 512 tokens of the WikiText-2
test split, plus a manifest with the ratios and errors kvcomp gives on them.

    python bench/accuracy/dump_kv.py [--out tests/data]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "python")]

import numpy as np  # noqa: E402

import harness  # noqa: E402
import modelfile  # noqa: E402
from cache import FP16Cache  # noqa: E402

LAYERS = (0, 14, 29)
TOKENS = 512
NAME = "smollm2_kv_512.bin"
# (kind, bound mode, error bound) checked in the manifest.
CHECKS = [("key", "absolute", 0.2), ("key", "absolute", 0.1), ("key", "relative", 0.05),
          ("value", "relative", 0.05), ("value", "relative", 0.02)]


def reference(kv: np.ndarray, kind: str, mode: str, eb: float, T: int = 64) -> dict:
    import kvcomp
    x = kv  # [TOKENS, heads, head_dim] fp16
    probe = kvcomp.Codec(kind=kind, num_tokens=T, head_dim=x.shape[2], error_bound=eb,
                         bound_mode=mode)
    cb = kvcomp.build_codebook(probe, x)
    out = {}
    for entropy in ("auto", "fixed"):
        codec = kvcomp.Codec(kind=kind, num_tokens=T, head_dim=x.shape[2], error_bound=eb,
                             bound_mode=mode, entropy=entropy,
                             codebook=cb if entropy == "auto" else None)
        enc = codec.encode(x)
        y = codec.decode(enc, dtype=np.float32)
        err = np.abs(y - x.astype(np.float32))
        out[entropy] = dict(block_bytes=int(enc.nbytes), ratio=round(x.nbytes / enc.nbytes, 4),
                            max_abs_error=float(err.max()))
    out["codebook_bytes"] = cb.serialized_size
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "tests" / "data"))
    a = ap.parse_args(argv)
    from model import Model
    model = Model(modelfile.model_path())
    tok = model.tokenizer()
    ids = np.array(harness.load_text_ids(tok)[:TOKENS])
    got = {}

    def hook(layer, k, v):
        if layer in LAYERS:
            got[layer] = (k.copy(), v.copy())

    model.forward(ids, FP16Cache(), kv_hook=hook)
    arr = np.stack([np.stack(got[layer]) for layer in LAYERS])  # [L, 2, T, Hk, d]
    arr = arr.astype("<f2")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / NAME).write_bytes(arr.tobytes())
    hp = model.hp
    manifest = dict(
        file=NAME,
        sha256=hashlib.sha256(arr.tobytes()).hexdigest(),
        dtype="float16 little-endian",
        shape=list(arr.shape),
        axes=["layer", "kind (0 = K, 1 = V)", "token", "kv_head", "channel"],
        layers=list(LAYERS),
        model=dict(name=hp.name, file=modelfile.FILENAME, sha256=modelfile.GGUF_SHA256,
                   n_layer=hp.n_layer, n_head=hp.n_head, n_head_kv=hp.n_head_kv,
                   head_dim=hp.head_dim, rope_base=hp.rope_base),
        text="first 512 tokens of wikitext-2-raw wiki.test.raw",
        notes="K after RoPE, Hugging Face (rotate-half) channel order; as cached in fp16",
        reference={},
    )
    for li, layer in enumerate(LAYERS):
        for kind, mode, eb in CHECKS:
            x = arr[li, 0 if kind == "key" else 1]
            r = reference(x, kind, mode, eb)
            manifest["reference"][f"layer{layer}/{kind}/{mode}/{eb}"] = r
    (out / "smollm2_kv_512.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {out / NAME} ({arr.nbytes} bytes) and its manifest")


if __name__ == "__main__":
    main()
