# SPDX-License-Identifier: Apache-2.0
"""kvcomp on a real LLM, on the CPU: SmolLM2-135M-Instruct with its KV cache compressed by
kvcomp (through the C ABI), beside the same model with an fp16 KV cache.

1. A short prompt's continuation, generated greedily with each cache.
2. Compression ratio, perplexity change, KL divergence and top-1 agreement on a slice of
   WikiText-2, for kvcomp and the KIVI baselines, printed as a table.

    python bench/accuracy/demo.py            # a few minutes on 2 cores
    python bench/accuracy/demo.py --full     # the full harness: 32 windows x 1024 tokens
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "python")]

import numpy as np  # noqa: E402

import harness  # noqa: E402
import modelfile  # noqa: E402
from cache import FP16Cache, GenerationCache  # noqa: E402

# The default kvcomp setting: K with an absolute bound (keys' outlier channels need it: a
# bound relative to each channel's range puts the largest errors where queries are largest),
# V with a bound relative to each token's range; blocks of 128 tokens, Huffman codebooks per
# (layer, K|V) trained on the first blocks. See docs/accuracy.md for the sweep behind it.
DEFAULT = "kvcomp:k=0.25,v=0.07,kmode=abs,t=128,ns=4"
CONSERVATIVE = "kvcomp:k=0.1,v=0.02,kmode=abs,t=128,ns=4"
DEMO_SETTINGS = [CONSERVATIVE, DEFAULT, "kivi:2", "kivi:4"]
FULL_SETTINGS = [CONSERVATIVE, "kvcomp:k=0.15,v=0.03,kmode=abs,t=128,ns=4", DEFAULT,
                 "kvcomp:k=0.5,v=0.15,kmode=abs,t=128,ns=4",
                 "kvcomp:k=0.8,v=0.2,kmode=abs,t=128,ns=4", "kivi:2", "kivi:4", "int8"]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def chat(tok, user: str):
    text = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
            "Hugging Face<|im_end|>\n<|im_start|>user\n" + user +
            "<|im_end|>\n<|im_start|>assistant\n")
    return tok.encode(text).ids


def generate_both(model, tok, prompt, max_new_tokens):
    from tqdm import tqdm
    ids = chat(tok, prompt)
    stop = {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    outs = {}
    for label, kv in (("fp16 cache", None), ("kvcomp cache", harness.make_policy(DEFAULT))):
        cache = GenerationCache(model.hp.n_layer, kv)
        bar = tqdm(total=1 + max_new_tokens, desc=f"generating ({label})", unit="tok",
                   file=sys.stderr, leave=False)
        try:
            new = model.generate(ids, max_new_tokens, cache, stop_ids=stop,
                                 on_step=lambda: bar.update(1),
                                 prefill_policy=kv if kv is not None else FP16Cache())
        finally:
            bar.close()
        outs[label] = (new, cache)
    print(f"\nPrompt ({len(ids)} tokens with the chat template): {prompt}\n")
    for label, (new, cache) in outs.items():
        extra = ""
        if label.startswith("kvcomp"):
            per_layer = cache.num_blocks(0)
            T = cache.T
            reading = min(len(new), max(0, len(ids) + len(new) - 1 - T))
            extra = (f"  [blocks of {T} tokens; {per_layer} per layer, K and V, compressed "
                     f"{cache.ratio():.2f}x; the last {reading} tokens were generated reading "
                     f"compressed blocks]")
        print(f"--- {label}{extra}\n{tok.decode(new).strip()}\n")
    a, b = outs["fp16 cache"][0], outs["kvcomp cache"][0]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print(f"The two continuations agree on their first {same} of {len(a)} tokens.\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true",
                    help="run the full harness (32 windows x 1024 tokens, all baselines)")
    ap.add_argument("--windows", type=int, default=None, help="windows of WikiText-2")
    ap.add_argument("--window-tokens", type=int, default=1024)
    ap.add_argument("--settings", nargs="+", default=None)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    windows = a.windows or (32 if a.full else 6)
    settings = a.settings or (FULL_SETTINGS if a.full else DEMO_SETTINGS)

    from model import Model
    t0 = time.time()
    model = Model(modelfile.model_path())
    tok = model.tokenizer()
    import kvcomp
    print(f"model: {model.hp.name} ({model.hp.n_layer} layers, {model.hp.n_head} query heads, "
          f"{model.hp.n_head_kv} KV heads, head_dim {model.hp.head_dim}); "
          f"kvcomp {kvcomp.version()} from {kvcomp.library_path()}")

    if not a.no_generate:
        generate_both(model, tok, a.prompt, a.max_new_tokens)

    ids = harness.load_text_ids(tok, a.data)
    print(f"WikiText-2 test: {windows} windows x {a.window_tokens} tokens "
          f"({windows * (a.window_tokens - 1)} predictions), each window a fresh sequence")
    res = harness.evaluate(model, ids, settings, windows, a.window_tokens, progress=True)
    print()
    print(harness.format_table(res))
    print("\nratio: fp16 K+V bytes / bytes held at the end of each window (blocks, metadata, "
          "codebooks, fp16 tails);\navg: the same summed over every generation step (tails "
          "weigh more); dPPL%: perplexity change vs the fp16 cache;\nKL: mean KL(fp16 || "
          "setting) of the next-token distributions (nats); top-1: argmax agreement with the "
          "fp16 cache.")
    print(f"({time.time() - t0:.0f} s)")
    if a.out:
        import json
        Path(a.out).write_text(json.dumps(dict(meta=harness.machine_info(), results=res),
                                          indent=1))
    return res


if __name__ == "__main__":
    main()
