# SPDX-License-Identifier: Apache-2.0
"""Where the store's tensors live: the CPU (numpy arrays) or a CUDA GPU (torch tensors, whose
__cuda_array_interface__ gives kvcomp.Store its device pointers). torch is imported only for
--device cuda, so CPU-only machines need nothing beyond numpy."""
from __future__ import annotations

import numpy as np


class Device:
    def __init__(self, name: str = "cpu"):
        if name not in ("cpu", "cuda"):
            raise ValueError(f"device {name!r}: expected 'cpu' or 'cuda'")
        self.name = name
        self.torch = None
        if name == "cuda":
            try:
                import torch
            except ImportError as e:
                raise SystemExit("--device cuda needs PyTorch with CUDA (pip install torch); it is "
                                 "not installed, and the CPU path does not need it") from e
            if not torch.cuda.is_available():
                raise SystemExit("--device cuda: torch finds no usable CUDA GPU")
            self.torch = torch

    @property
    def cuda(self) -> bool:
        return self.name == "cuda"

    def put(self, x: np.ndarray):
        """A host array on the device (the array itself on the CPU)."""
        if not self.cuda:
            return np.ascontiguousarray(x)
        return self.torch.from_numpy(np.ascontiguousarray(x)).to("cuda")

    def empty(self, shape, dtype=np.float16):
        """A device output array; None on the CPU (the store allocates a numpy array)."""
        if not self.cuda:
            return None
        dt = {np.dtype(np.float16): self.torch.float16, np.dtype(np.float32): self.torch.float32}
        return self.torch.empty(tuple(shape), dtype=dt[np.dtype(dtype)], device="cuda")

    def get(self, x) -> np.ndarray:
        """A device array back on the host (waits for it)."""
        if not self.cuda:
            return x
        return x.cpu().numpy()

    def store_config(self, **cfg) -> dict:
        """kvcomp.StoreConfig fields for this device: the CUDA store sizes its device tables from
        max_sequences and max_sequence_tokens."""
        cfg = dict(cfg, backend=self.name)
        if self.cuda:
            cfg.setdefault("max_sequences", 4)
            cfg.setdefault("max_sequence_tokens", 8192)
        return cfg
