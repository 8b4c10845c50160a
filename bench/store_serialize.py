# SPDX-License-Identifier: Apache-2.0
"""Serialized size and time of one sequence of a paged store (CPU backend), on the real SmolLM2
KV cache in tests/data: a tiles store writing its blocks as held, the same store writing them as
format v1 (serialized_block_format="v1", version 6), and a format v1 store, in one process.

    KVCOMP_LIBRARY=build/src/libkvcomp.so .venv/bin/python bench/store_serialize.py

Each time is the best of --repeat calls; ratio: the fp16 K and V bytes over the serialized bytes.
The binding's serialize() calls kvc_store_serialized_size and then kvc_store_serialize; the size
call is also timed alone. Every restore is checked to read back what the sequence held.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
import kvcomp  # noqa: E402

DUMP = ROOT / "tests" / "data" / "smollm2_kv_512.bin"  # [3 layers, K|V, 512, 3 heads, 64] fp16


def best(f, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return out, min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    x = np.fromfile(DUMP, dtype="<f2").reshape(3, 2, 512, 3, 64)
    k, v = np.ascontiguousarray(x[:, 0]), np.ascontiguousarray(x[:, 1])
    dense = k.nbytes + v.nbytes
    common = dict(num_layers=3, num_kv_heads=3, head_dim=64, block_tokens=128,
                  key_bound_mode="absolute", key_error_bound=0.3, value_bound_mode="relative",
                  value_error_bound=0.072, sink_tokens=4)
    print(f"{'store':24s} {'bytes':>8s} {'ratio':>6s} {'size ms':>8s} {'serialize ms':>13s} "
          f"{'restore ms':>11s}")
    for label, kw in (("tiles, as held", dict(block_format="tiles")),
                      ("tiles, as format v1", dict(block_format="tiles",
                                                   serialized_block_format="v1")),
                      ("format v1", dict(block_format="v1"))):
        store = kvcomp.Store(**common, **kw)
        seq = store.add_sequence()
        store.prefill(seq, k, v)
        _, t_size = best(lambda: store.serialized_size(seq), a.repeat)
        data, t_write = best(lambda: store.serialize(seq), a.repeat)
        ids, t_read = best(lambda: store.restore(data), a.repeat)
        for layer in range(3):
            for got, want in zip(store.read(ids, layer), store.read(seq, layer)):
                np.testing.assert_array_equal(got, want)
        print(f"{label:24s} {len(data):8d} {dense / len(data):5.2f}x {t_size * 1e3:8.1f} "
              f"{t_write * 1e3:13.1f} {t_read * 1e3:11.1f}")


if __name__ == "__main__":
    main()
