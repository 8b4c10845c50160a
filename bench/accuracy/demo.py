# SPDX-License-Identifier: Apache-2.0
"""kvcomp on a real LLM, on the CPU: SmolLM2-135M-Instruct with its KV cache held in kvcomp's
paged store (through the C ABI), beside the same model with an fp16 KV cache.

1. A short prompt's continuation, generated greedily with each cache: the prompt is prefilled
   into the store (kvc_store_prefill), each new token appended layer by layer
   (kvc_store_append) and attention computed by the store (kvc_store_attention).
2. Compression ratio, perplexity change, KL divergence and top-1 agreement on a slice of
   WikiText-2, for kvcomp (each window prefilled into the store and read back) and the KIVI
   baselines, printed as a table, with the store's own accounting.

    python bench/accuracy/demo.py                  # a few minutes on 2 cores
    python bench/accuracy/demo.py --full           # the full harness: 32 windows x 1024 tokens
    python bench/accuracy/demo.py --device cuda    # the same through the CUDA store (torch)
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
from cache import FP16Cache, generation_cache  # noqa: E402

# The default kvcomp setting: K with an absolute bound (keys' outlier channels need it: a
# bound relative to each channel's range puts the largest errors where queries are largest),
# V with a bound relative to each token's range; blocks of 128 tokens, Huffman codebooks per
# (layer, K|V) trained on the first blocks. See docs/accuracy.md for the sweep behind it. The
# store uses the library's sub-stream count (32, what the CUDA attention reads); the table in
# docs/accuracy.md used 4 through the codec API (ns=4), about 2% smaller. The first 4 tokens of
# each sequence are kept uncompressed too (kvc_store_config.sink_tokens): the attention sinks,
# which halve the perplexity cost (docs/accuracy.md) for a few fp16 rows per layer.
DEFAULT = "kvcomp:k=0.25,v=0.07,kmode=abs,t=128,sinks=4,path=store"
CONSERVATIVE = "kvcomp:k=0.1,v=0.02,kmode=abs,t=128"
NO_SINKS = "kvcomp:k=0.25,v=0.07,kmode=abs,t=128"
# Per-layer bounds (kvc_store_config.key_/value_layer_scales) calibrated for this model by
# calibrate.py from each layer's measured sensitivity, on windows the table does not use.
PER_LAYER = ("kvcomp:k=0.36,v=0.086,kmode=abs,t=128,sinks=4,path=store,"
             "scales=results/layer_scales_smollm2.json")
DEMO_SETTINGS = [CONSERVATIVE, NO_SINKS, DEFAULT, PER_LAYER, "kivi:2", "kivi:4"]
FULL_SETTINGS = [CONSERVATIVE, "kvcomp:k=0.15,v=0.03,kmode=abs,t=128", NO_SINKS, DEFAULT,
                 PER_LAYER, "kvcomp:k=0.5,v=0.15,kmode=abs,t=128",
                 "kvcomp:k=0.8,v=0.2,kmode=abs,t=128", "kivi:2", "kivi:4", "int8"]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def chat(tok, user: str):
    text = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
            "Hugging Face<|im_end|>\n<|im_start|>user\n" + user +
            "<|im_end|>\n<|im_start|>assistant\n")
    return tok.encode(text).ids


def store_accounting(st, tokens, kv_heads, head_dim):
    """One line of the store's own accounting (kvcomp.Store.stats) for `tokens` per layer."""
    held = st["page_bytes"] + st["tail_bytes"] + st["table_bytes"] + st["codebook_bytes"]
    slack = st["page_bytes"] - st["block_bytes"]
    return (f"store: {tokens} tokens x {st['dense_bytes'] // max(1, tokens)} fp16 B; holds "
            f"{held / tokens:.0f} B/token ({st['dense_bytes'] / held:.2f}x): "
            f"{st['num_blocks']} blocks of {st['block_bytes']} B in {st['pages_in_use']} of "
            f"{st['pages_total']} pages (slack {slack} B), tails {st['tail_bytes']} B, tables "
            f"{st['table_bytes']} B, codebooks {st['codebook_bytes']} B; attention's decoded "
            f"blocks {st['decoded_cache_bytes']} B")


def generate_both(model, tok, prompt, max_new_tokens, device="cpu"):
    from tqdm import tqdm
    ids = chat(tok, prompt)
    stop = {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    outs = {}
    for label, kv in (("fp16 cache", None),
                      ("kvcomp cache", harness.make_policy(DEFAULT, device))):
        cache = generation_cache(model.hp.n_layer, kv)
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
            path = (f"{device.upper()} store: prefill, append, attention"
                    if getattr(cache.kv, "path", "codec") == "store" else "codec API")
            extra = (f"  [{path}; blocks of {T} tokens; {per_layer} per layer, K and V, "
                     f"compressed {cache.ratio():.2f}x; the last {reading} tokens were "
                     f"generated reading compressed blocks]")
        print(f"--- {label}{extra}\n{tok.decode(new).strip()}\n")
        if hasattr(cache, "stats"):
            print(store_accounting(cache.stats(), len(ids) + len(new), model.hp.n_head_kv,
                                   model.hp.head_dim) + "\n")
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
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="the kvcomp store's backend (cuda: needs torch and a GPU)")
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
        generate_both(model, tok, a.prompt, a.max_new_tokens, a.device)

    ids = harness.load_text_ids(tok, a.data)
    print(f"WikiText-2 test: {windows} windows x {a.window_tokens} tokens "
          f"({windows * (a.window_tokens - 1)} predictions), each window a fresh sequence")
    res = harness.evaluate(model, ids, settings, windows, a.window_tokens, progress=True,
                           device=a.device)
    print()
    print(harness.format_table(res))
    print()
    print(harness.format_store(res))
    print("\nratio: fp16 K+V bytes / bytes held at the end of each window (blocks, metadata, "
          "codebooks, fp16 tails);\navg: the same summed over every generation step (tails "
          "weigh more); dPPL%: perplexity change vs the fp16 cache;\nKL: mean KL(fp16 || "
          "setting) of the next-token distributions (nats); top-1: argmax agreement with the "
          f"fp16 cache. kvcomp through the {a.device.upper()} store.")
    print(f"({time.time() - t0:.0f} s)")
    if a.out:
        import json
        Path(a.out).write_text(json.dumps(dict(meta=harness.machine_info(), results=res),
                                          indent=1))
    return res


if __name__ == "__main__":
    main()
