# SPDX-License-Identifier: Apache-2.0
"""Records what a real model gives its KV cache during decoding, for replay through a store
without the model (replay_kv.py): SmolLM2-135M-Instruct's per-layer fp16 K and V of a prompt
(the start of the WikiText-2 test split) and, for each of the following decode steps, each
layer's query (RoPE applied, rounded to fp16) and new K and V row. The model runs on the CPU with
an fp16 cache, so the recording does not depend on kvcomp.

    python bench/accuracy/record_kv.py [--out bench/accuracy/data/smollm2_decode.npz]

The file (numpy .npz, compressed) holds: prompt_k, prompt_v [layers, prompt, kv_heads, head_dim]
fp16; step_q [steps, layers, q_heads, head_dim] fp16; step_k, step_v [steps, layers, kv_heads,
head_dim] fp16; layers (the model's layer index of each recorded layer); tokens (the ids).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "python")]

import numpy as np  # noqa: E402

import modelfile  # noqa: E402
import wikitext  # noqa: E402
from cache import FP16Cache, GenerationCache  # noqa: E402

DEFAULT_OUT = HERE / "data" / "smollm2_decode.npz"


class Recorder(GenerationCache):
    """An fp16 GenerationCache that keeps each step's query, k and v of the chosen layers."""

    def __init__(self, n_layer, layers):
        super().__init__(n_layer, None)
        self.layers = list(layers)
        self.q, self.k, self.v = [], [], []

    def attend_step(self, layer, q, k, v):
        if layer == 0:
            self.q.append([]), self.k.append([]), self.v.append([])
        if layer in self.layers:
            self.q[-1].append(q.astype(np.float16))
            self.k[-1].append(k[0])
            self.v[-1].append(v[0])
        return super().attend_step(layer, q, k, v)


def record(model, prompt_tokens=96, steps=32, layers=None):
    layers = list(range(model.hp.n_layer)) if layers is None else list(layers)
    ids = np.array(model.tokenizer().encode(wikitext.load()[:20000]).ids[:prompt_tokens + steps])
    rows = {}
    model.forward(ids[:prompt_tokens], FP16Cache(),
                  kv_hook=lambda li, k, v: rows.__setitem__(li, (k, v)))
    rec = Recorder(model.hp.n_layer, layers)
    for li, (k, v) in rows.items():
        for i in range(len(k)):
            rec.append(li, k[i:i + 1], v[i:i + 1])
    for i in range(steps):  # teacher forcing: the text's next tokens
        model.step(int(ids[prompt_tokens + i]), prompt_tokens + i, rec)
    return dict(prompt_k=np.stack([rows[li][0] for li in layers]),
                prompt_v=np.stack([rows[li][1] for li in layers]),
                step_q=np.array(rec.q), step_k=np.array(rec.k), step_v=np.array(rec.v),
                layers=np.array(layers, np.int32), tokens=ids.astype(np.int32))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--layers", default="0:30:3", help="start:stop:step of the model's layers")
    a = ap.parse_args(argv)
    from model import Model
    model = Model(modelfile.model_path())
    start, stop, step = (int(x) for x in a.layers.split(":"))
    data = record(model, a.prompt_tokens, a.steps, range(start, min(stop, model.hp.n_layer), step))
    np.savez_compressed(a.out, **data)
    print(f"{a.out}: {Path(a.out).stat().st_size} bytes; "
          + ", ".join(f"{k} {v.shape}" for k, v in data.items()))


if __name__ == "__main__":
    main()
