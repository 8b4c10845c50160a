# SPDX-License-Identifier: Apache-2.0
"""Python access to kvcomp through its C ABI (ctypes; numpy arrays in and out).

    import numpy as np, kvcomp
    k = np.random.randn(1024, 3, 64).astype(np.float16)        # [tokens, kv_heads, head_dim]
    probe = kvcomp.Codec(kind="key", num_tokens=64, head_dim=64, error_bound=0.05)
    codebook = kvcomp.build_codebook(probe, k)                   # from the prefill's blocks
    codec = kvcomp.Codec(kind="key", num_tokens=64, head_dim=64, error_bound=0.05,
                         codebook=codebook)
    blocks = codec.encode(k)                                     # one block per (block, head)
    k_hat = codec.decode(blocks, out=np.empty_like(k))           # same layout as the input
    print(blocks.nbytes, k.nbytes)                               # exact compressed bytes

The shared library is found through $KVCOMP_LIBRARY (a path to libkvcomp.so), else in the
repository's build folders (build-py, build-release, build, ...), else by the system loader.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "KvcompError", "Histogram", "Codebook", "Codec", "EncodedBlocks", "build_codebook",
    "library_path", "version", "block_info",
    "KIND_KEY", "KIND_VALUE", "BOUND_ABSOLUTE", "BOUND_RELATIVE",
    "ENTROPY_AUTO", "ENTROPY_FIXED", "ENTROPY_HUFFMAN",
    "ENCODING_RAW", "ENCODING_FIXED", "ENCODING_HUFFMAN",
]

# Enumerations of include/kvcomp/kvcomp.h (values never renumbered).
DTYPE_FP16, DTYPE_BF16, DTYPE_FP32 = 1, 2, 3
KIND_KEY, KIND_VALUE = 0, 1
BOUND_ABSOLUTE, BOUND_RELATIVE = 0, 1
ENTROPY_AUTO, ENTROPY_FIXED, ENTROPY_HUFFMAN = 0, 1, 2
BACKEND_CPU, BACKEND_CUDA = 0, 1
ENCODING_RAW, ENCODING_FIXED, ENCODING_HUFFMAN = 0, 1, 2
ABI_VERSION = 2
SUCCESS = 0

_KINDS = {"key": KIND_KEY, "k": KIND_KEY, "value": KIND_VALUE, "v": KIND_VALUE}
_BOUNDS = {"absolute": BOUND_ABSOLUTE, "relative": BOUND_RELATIVE}
_ENTROPIES = {"auto": ENTROPY_AUTO, "fixed": ENTROPY_FIXED, "huffman": ENTROPY_HUFFMAN}
_NP_DTYPES = {np.dtype(np.float16): DTYPE_FP16, np.dtype(np.float32): DTYPE_FP32}


class _CodebookConfig(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("abi_version", ctypes.c_uint32),
                ("max_code_length", ctypes.c_int32), ("max_symbols", ctypes.c_int32)]


class _CodecConfig(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("abi_version", ctypes.c_uint32),
                ("backend", ctypes.c_int32), ("kind", ctypes.c_int32),
                ("num_tokens", ctypes.c_int32), ("head_dim", ctypes.c_int32),
                ("value_group_size", ctypes.c_int32), ("bound_mode", ctypes.c_int32),
                ("error_bound", ctypes.c_float), ("entropy", ctypes.c_int32),
                ("num_substreams", ctypes.c_int32)]


class _BlockInfo(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("abi_version", ctypes.c_uint32),
                ("format_version", ctypes.c_uint32), ("block_bytes", ctypes.c_uint32),
                ("encoding", ctypes.c_int32), ("kind", ctypes.c_int32),
                ("num_tokens", ctypes.c_int32), ("head_dim", ctypes.c_int32),
                ("group_size", ctypes.c_int32), ("num_groups", ctypes.c_int32),
                ("num_substreams", ctypes.c_int32), ("code_bits", ctypes.c_int32),
                ("codebook_id", ctypes.c_uint32)]


class KvcompError(RuntimeError):
    """A kvcomp call returned a status other than KVC_SUCCESS."""

    def __init__(self, status: int, name: str, message: str):
        super().__init__(f"{name}: {message}" if message else name)
        self.status = status


def _candidates() -> list[Path]:
    here = Path(__file__).resolve()
    repo = here.parents[2]  # python/kvcomp/__init__.py -> repo root
    names = ["build-py", "build-release", "build-demo", "build", "build-bench"]
    return [repo / n / "src" / "libkvcomp.so" for n in names]


def library_path() -> str:
    """The path of the shared library this module loads (see the module docstring)."""
    env = os.environ.get("KVCOMP_LIBRARY")
    if env:
        if not Path(env).is_file():
            raise OSError(f"KVCOMP_LIBRARY={env} is not a file")
        return env
    for c in _candidates():
        if c.is_file():
            return str(c)
    found = ctypes.util.find_library("kvcomp")
    if found:
        return found
    raise OSError("libkvcomp.so not found: build it (cmake -S . -B build-py ...) or set "
                  "KVCOMP_LIBRARY to its path")


_lib = None


def _load():
    global _lib
    if _lib is not None:
        return _lib
    lib = ctypes.CDLL(library_path())
    P, I32, U32, U64, SZ, I64 = (ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32,
                                 ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64)
    sigs = {
        "kvc_version_number": ([], U32),
        "kvc_version_string": ([], ctypes.c_char_p),
        "kvc_status_string": ([I32], ctypes.c_char_p),
        "kvc_last_error": ([], ctypes.c_char_p),
        "kvc_clear_last_error": ([], None),
        "kvc_histogram_create": ([ctypes.POINTER(P)], I32),
        "kvc_histogram_destroy": ([P], I32),
        "kvc_histogram_add_counts": ([P, I32, I32, ctypes.POINTER(U64)], I32),
        "kvc_histogram_total": ([P, ctypes.POINTER(U64)], I32),
        "kvc_codebook_build": ([P, ctypes.POINTER(_CodebookConfig), ctypes.POINTER(P)], I32),
        "kvc_codebook_destroy": ([P], I32),
        "kvc_codebook_id": ([P, ctypes.POINTER(U32)], I32),
        "kvc_codebook_code_length": ([P, I32, ctypes.POINTER(I32)], I32),
        "kvc_codebook_serialized_size": ([P, ctypes.POINTER(SZ)], I32),
        "kvc_codebook_serialize": ([P, P, SZ, ctypes.POINTER(SZ)], I32),
        "kvc_codebook_deserialize": ([P, SZ, ctypes.POINTER(P)], I32),
        "kvc_codec_create": ([ctypes.POINTER(_CodecConfig), P, ctypes.POINTER(P)], I32),
        "kvc_codec_destroy": ([P], I32),
        "kvc_codec_max_block_bytes": ([P, I32, ctypes.POINTER(SZ)], I32),
        "kvc_codec_encode": ([P, I32, P, I64, I32, P, SZ, P, P], I32),
        "kvc_codec_decode": ([P, I32, P, P, I32, P, I64, P, P], I32),
        "kvc_codec_histogram": ([P, I32, P, I64, I32, P, P], I32),
        "kvc_block_inspect": ([P, SZ, ctypes.POINTER(_BlockInfo)], I32),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res
    _lib = lib
    return lib


def _check(status: int) -> None:
    if status != SUCCESS:
        lib = _load()
        raise KvcompError(status, lib.kvc_status_string(status).decode(),
                          lib.kvc_last_error().decode(errors="replace"))


class _Handle:
    """Owns a library handle; the subclass names its destroy function."""

    _destroy = ""

    def close(self) -> None:
        if getattr(self, "_h", None):
            getattr(_load(), self._destroy)(self._h)
            self._h = None

    __del__ = close


def version() -> str:
    """Version string of the loaded library ("MAJOR.MINOR.PATCH")."""
    return _load().kvc_version_string().decode()


class Histogram(_Handle):
    """A histogram of quantization symbols (kvc_histogram_t)."""

    _destroy = "kvc_histogram_destroy"

    def __init__(self):
        lib = _load()
        h = ctypes.c_void_p()
        _check(lib.kvc_histogram_create(ctypes.byref(h)))
        self._h = h

    def add_counts(self, first_symbol: int, counts) -> None:
        c = np.ascontiguousarray(counts, dtype=np.uint64)
        _check(_load().kvc_histogram_add_counts(
            self._h, first_symbol, c.size, c.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64))))

    @property
    def total(self) -> int:
        t = ctypes.c_uint64()
        _check(_load().kvc_histogram_total(self._h, ctypes.byref(t)))
        return t.value



class Codebook(_Handle):
    """A frozen canonical Huffman codebook (kvc_codebook_t)."""

    _destroy = "kvc_codebook_destroy"

    def __init__(self, handle: ctypes.c_void_p):
        self._h = handle

    @classmethod
    def build(cls, histogram: Histogram, max_code_length: int = 12,
              max_symbols: int = 255) -> "Codebook":
        cfg = _CodebookConfig(ctypes.sizeof(_CodebookConfig), ABI_VERSION, max_code_length,
                              max_symbols)
        h = ctypes.c_void_p()
        _check(_load().kvc_codebook_build(histogram._h, ctypes.byref(cfg), ctypes.byref(h)))
        return cls(h)

    @classmethod
    def deserialize(cls, data: bytes) -> "Codebook":
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        h = ctypes.c_void_p()
        _check(_load().kvc_codebook_deserialize(buf, len(data), ctypes.byref(h)))
        return cls(h)

    @property
    def id(self) -> int:
        v = ctypes.c_uint32()
        _check(_load().kvc_codebook_id(self._h, ctypes.byref(v)))
        return v.value

    @property
    def serialized_size(self) -> int:
        v = ctypes.c_size_t()
        _check(_load().kvc_codebook_serialized_size(self._h, ctypes.byref(v)))
        return v.value

    def serialize(self) -> bytes:
        n = self.serialized_size
        buf = ctypes.create_string_buffer(n)
        w = ctypes.c_size_t()
        _check(_load().kvc_codebook_serialize(self._h, buf, n, ctypes.byref(w)))
        return buf.raw[: w.value]

    def code_length(self, symbol: int) -> int:
        v = ctypes.c_int32()
        _check(_load().kvc_codebook_code_length(self._h, symbol, ctypes.byref(v)))
        return v.value



@dataclass
class EncodedBlocks:
    """Compressed blocks packed back to back at 4-byte aligned offsets.

    data: uint8 buffer; offsets[i], sizes[i]: where block i starts and its exact length.
    shape: the [tokens, heads, head_dim] shape that was encoded (blocks in (block, head) order).
    """
    data: np.ndarray
    offsets: np.ndarray  # int64 [num_blocks]
    sizes: np.ndarray    # uint32 [num_blocks]
    shape: tuple

    @property
    def nbytes(self) -> int:
        """Exact compressed size: the sum of the blocks' lengths."""
        return int(self.sizes.sum(dtype=np.int64))

    def __len__(self) -> int:
        return len(self.sizes)

    def block(self, i: int) -> bytes:
        o = int(self.offsets[i])
        return self.data[o:o + int(self.sizes[i])].tobytes()


def _as_3d(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        return x[:, None, :]
    if x.ndim != 3:
        raise ValueError(f"expected [tokens, head_dim] or [tokens, heads, head_dim], got {x.shape}")
    return x


class Codec(_Handle):
    """A codec for one block shape (kvc_codec_t); CPU backend.

    kind: "key" | "value"; bound_mode: "relative" | "absolute"; entropy: "auto" | "fixed" |
    "huffman". codebook: a Codebook or None (fixed width only).
    """

    _destroy = "kvc_codec_destroy"

    def __init__(self, kind="key", num_tokens: int = 64, head_dim: int = 128,
                 error_bound: float = 0.05, bound_mode="relative", entropy="auto",
                 value_group_size: int = 0, num_substreams: int = 0,
                 codebook: Optional[Codebook] = None):
        lib = _load()
        self.kind = _KINDS[kind] if isinstance(kind, str) else int(kind)
        self.num_tokens, self.head_dim = int(num_tokens), int(head_dim)
        self.error_bound = float(error_bound)
        self.bound_mode = _BOUNDS[bound_mode] if isinstance(bound_mode, str) else int(bound_mode)
        self.entropy = _ENTROPIES[entropy] if isinstance(entropy, str) else int(entropy)
        self.value_group_size = int(value_group_size)
        cfg = _CodecConfig(ctypes.sizeof(_CodecConfig), ABI_VERSION, BACKEND_CPU, self.kind,
                           self.num_tokens, self.head_dim, self.value_group_size,
                           self.bound_mode, self.error_bound, self.entropy, int(num_substreams))
        h = ctypes.c_void_p()
        _check(lib.kvc_codec_create(ctypes.byref(cfg), codebook._h if codebook else None,
                                    ctypes.byref(h)))
        self._h = h
        self.codebook = codebook


    def max_block_bytes(self, dtype=np.float16) -> int:
        v = ctypes.c_size_t()
        _check(_load().kvc_codec_max_block_bytes(self._h, _NP_DTYPES[np.dtype(dtype)],
                                                 ctypes.byref(v)))
        return v.value

    def _src_pointers(self, x: np.ndarray):
        """Block pointers of a [tokens, heads, head_dim] array, (block, head) order."""
        x = _as_3d(x)
        if x.dtype not in _NP_DTYPES:
            raise TypeError(f"dtype {x.dtype} not supported (float16, float32)")
        t, h, d = x.shape
        if d != self.head_dim:
            raise ValueError(f"head_dim {d} != codec head_dim {self.head_dim}")
        if t % self.num_tokens:
            raise ValueError(f"tokens {t} not a multiple of the block's {self.num_tokens}")
        if not (x.strides[2] == x.itemsize and x.strides[1] == d * x.itemsize
                and x.strides[0] == h * d * x.itemsize):
            x = np.ascontiguousarray(x)
        nb = (t // self.num_tokens) * h
        base = x.ctypes.data
        b = np.arange(t // self.num_tokens, dtype=np.uint64)[:, None]
        hh = np.arange(h, dtype=np.uint64)[None, :]
        ptrs = (base + (b * self.num_tokens * h * d + hh * d) * x.itemsize).reshape(-1)
        return x, ptrs.astype(np.uint64), nb, h * d

    def encode(self, x: np.ndarray) -> EncodedBlocks:
        """Encodes x [tokens, heads, head_dim] (or [tokens, head_dim]), tokens a multiple of
        num_tokens, into one block per (token block, head)."""
        x, src, nb, stride = self._src_pointers(x)
        cap = self.max_block_bytes(x.dtype)
        data = np.empty(nb * cap, dtype=np.uint8)
        offsets = np.arange(nb, dtype=np.int64) * cap
        dst = (data.ctypes.data + offsets).astype(np.uint64)
        sizes = np.zeros(nb, dtype=np.uint32)
        if nb:
            _check(_load().kvc_codec_encode(
                self._h, nb, src.ctypes.data, stride, _NP_DTYPES[x.dtype], dst.ctypes.data,
                cap, sizes.ctypes.data, None))
        return EncodedBlocks(data, offsets, sizes, tuple(_as_3d(x).shape))

    def decode(self, blocks: EncodedBlocks, out: Optional[np.ndarray] = None,
               dtype=np.float16) -> np.ndarray:
        """Decodes blocks into out (or a new array) of the encoded [tokens, heads, head_dim]."""
        t, h, d = blocks.shape
        if out is None:
            out = np.empty((t, h, d), dtype=dtype)
        o3 = _as_3d(out)
        if o3.shape != (t, h, d) or not o3.flags.c_contiguous or o3.dtype not in _NP_DTYPES:
            raise ValueError("out must be a C-contiguous float16/float32 array of the encoded shape")
        nb = len(blocks)
        _, dst, _, stride = self._src_pointers(o3)
        src = (blocks.data.ctypes.data + blocks.offsets).astype(np.uint64)
        sizes = np.ascontiguousarray(blocks.sizes, dtype=np.uint32)
        if nb:
            _check(_load().kvc_codec_decode(
                self._h, nb, src.ctypes.data, sizes.ctypes.data, _NP_DTYPES[o3.dtype],
                dst.ctypes.data, stride, None, None))
        return out

    def histogram(self, x: np.ndarray, histogram: Optional[Histogram] = None) -> Histogram:
        """Adds the symbols of x's blocks (as encode would cut them) to a histogram."""
        histogram = histogram or Histogram()
        x, src, nb, stride = self._src_pointers(x)
        if nb:
            _check(_load().kvc_codec_histogram(self._h, nb, src.ctypes.data, stride,
                                               _NP_DTYPES[x.dtype], histogram._h, None))
        return histogram


def build_codebook(codec: Codec, x: np.ndarray, max_code_length: int = 12,
                   max_symbols: int = 255) -> Codebook:
    """Histogram of x's blocks through codec (a probe codec of the right shape and bound), then
    a codebook: the prefill step of the typical flow."""
    h = codec.histogram(x)
    try:
        return Codebook.build(h, max_code_length, max_symbols)
    finally:
        h.close()


def block_info(block: bytes) -> dict:
    """Parses a block header (kvc_block_inspect) into a dict."""
    info = _BlockInfo()
    info.struct_size, info.abi_version = ctypes.sizeof(_BlockInfo), ABI_VERSION
    buf = ctypes.create_string_buffer(bytes(block), len(block))
    _check(_load().kvc_block_inspect(buf, len(block), ctypes.byref(info)))
    return {name: getattr(info, name) for name, _ in _BlockInfo._fields_[2:]}
