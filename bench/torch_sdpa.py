# SPDX-License-Identifier: Apache-2.0
"""Times torch's scaled_dot_product_attention for the decode shapes gpu_bench measures.

One query token per sequence, Hq=32, Hkv=8, head_dim 128, fp16; the best of the flash, cuDNN
and memory-efficient back ends, median of 20 CUDA-event timings after a warm-up. Run by
scripts/gpu-check.sh where PyTorch is installed; prints a table and optionally writes JSON.
"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [(1, 4096), (1, 32768), (1, 131072), (8, 4096), (8, 32768), (8, 131072),
          (32, 4096), (32, 32768), (64, 4096), (64, 32768)]
HQ, HKV, DIM, REPS = 32, 8, 128, 20


def median_ms(fn):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    rows = []
    for batch, length in SHAPES:
        q = torch.randn(batch, HQ, 1, DIM, device="cuda", dtype=torch.float16)
        k = torch.randn(batch, HKV, length, DIM, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        best = None
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            except RuntimeError:
                continue
            if best is None or ms < best[1]:
                best = (backend.name, ms)
        rows.append({"batch": batch, "len": length, "backend": best[0] if best else None,
                     "ms": best[1] if best else None})
        del q, k, v
    print(f"\ntorch {torch.__version__} scaled_dot_product_attention, Hq={HQ} Hkv={HKV} "
          f"head_dim {DIM} fp16, median of {REPS}")
    print(f"{'B x L':<14} {'ms':>10} {'backend':>20}")
    for r in rows:
        ms = f"{r['ms']:.4f}" if r["ms"] is not None else "n/a"
        print(f"{r['batch']:>3} x {r['len']:<8} {ms:>10} {str(r['backend']):>20}")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
