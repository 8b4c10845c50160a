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
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "KvcompError", "Histogram", "Codebook", "Codec", "EncodedBlocks", "build_codebook",
    "library_path", "version", "block_info", "Store", "StoreConfig",
    "KIND_KEY", "KIND_VALUE", "BOUND_ABSOLUTE", "BOUND_RELATIVE",
    "ENTROPY_AUTO", "ENTROPY_FIXED", "ENTROPY_HUFFMAN",
    "ENCODING_RAW", "ENCODING_FIXED", "ENCODING_HUFFMAN", "ENCODING_TILES",
    "BLOCK_FORMAT_V1", "BLOCK_FORMAT_TILES", "BLOCK_FORMAT_AUTO",
    "ROTATION_NONE", "ROTATION_HADAMARD", "ROTATION_HADAMARD_VALUES", "STATUS_OUT_OF_PAGES",
]

# Enumerations of include/kvcomp/kvcomp.h (values never renumbered).
DTYPE_FP16, DTYPE_BF16, DTYPE_FP32 = 1, 2, 3
KIND_KEY, KIND_VALUE = 0, 1
BOUND_ABSOLUTE, BOUND_RELATIVE = 0, 1
ENTROPY_AUTO, ENTROPY_FIXED, ENTROPY_HUFFMAN = 0, 1, 2
BACKEND_CPU, BACKEND_CUDA = 0, 1
ENCODING_RAW, ENCODING_FIXED, ENCODING_HUFFMAN, ENCODING_TILES = 0, 1, 2, 3
BLOCK_FORMAT_V1, BLOCK_FORMAT_TILES, BLOCK_FORMAT_AUTO = 0, 1, 2
ROTATION_NONE, ROTATION_HADAMARD, ROTATION_HADAMARD_VALUES = 0, 1, 2
ABI_VERSION = 6
SUCCESS = 0

_KINDS = {"key": KIND_KEY, "k": KIND_KEY, "value": KIND_VALUE, "v": KIND_VALUE}
_BOUNDS = {"absolute": BOUND_ABSOLUTE, "relative": BOUND_RELATIVE}
_ENTROPIES = {"auto": ENTROPY_AUTO, "fixed": ENTROPY_FIXED, "huffman": ENTROPY_HUFFMAN}
_NP_DTYPES = {np.dtype(np.float16): DTYPE_FP16, np.dtype(np.float32): DTYPE_FP32}
_BACKENDS = {"cpu": BACKEND_CPU, "cuda": BACKEND_CUDA}
_BLOCK_FORMATS = {"v1": BLOCK_FORMAT_V1, "tiles": BLOCK_FORMAT_TILES, "auto": BLOCK_FORMAT_AUTO}
_ROTATIONS = {"none": ROTATION_NONE, "hadamard": ROTATION_HADAMARD,
              "hadamard_values": ROTATION_HADAMARD_VALUES}
_STORE_DTYPES = {"float16": DTYPE_FP16, "fp16": DTYPE_FP16, "bfloat16": DTYPE_BF16,
                 "bf16": DTYPE_BF16}
STATUS_OUT_OF_PAGES = 301
STORE_MAX_BATCH = 1024

# ctypes converts a Python int to a C integer argument or struct field by wrapping it (2**32 + 1
# becomes 1): every integer that reaches C goes through these checks first.
_INT_RANGES = {ctypes.c_int32: (-2**31, 2**31 - 1), ctypes.c_uint32: (0, 2**32 - 1),
               ctypes.c_int64: (-2**63, 2**63 - 1), ctypes.c_uint64: (0, 2**64 - 1),
               ctypes.c_size_t: (0, 2**(8 * ctypes.sizeof(ctypes.c_size_t)) - 1)}


def _int(v, what, ctype=ctypes.c_int32) -> int:
    """v as an integer that the C type holds: no float, no wrap-around. what: the name for the
    message (a callable giving it, so that a passing check builds no string)."""
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{_name(what)} = {v!r}: expected an integer") from None
    lo, hi = _INT_RANGES[ctype]
    if not lo <= i <= hi:
        raise ValueError(f"{_name(what)} = {i} is out of range for the C type {ctype.__name__}")
    return i


def _name(what) -> str:
    """An argument's name for a message: given, or made by a callable (built only on failure)."""
    return what() if callable(what) else what


def _make(struct_type, *values):
    """struct_type(*values), each integer checked against its field's C type."""
    for (name, ctype), v in zip(struct_type._fields_, values):
        if ctype in _INT_RANGES:
            _int(v, name, ctype)
    return struct_type(*values)


def _enum(table, v, what) -> int:
    """The value of an enumeration given by name (a key of table) or as an integer."""
    if isinstance(v, str):
        if v not in table:
            raise ValueError(f"{what} = {v!r}: expected one of {sorted(table)}")
        return table[v]
    return _int(v, what)


def _handle(obj, cls, what):
    """obj's library handle, after checking that obj is a live cls: the C functions cannot tell
    one kind of handle from another, and a closed one is NULL."""
    if not isinstance(obj, cls):
        raise TypeError(f"{what}: expected a kvcomp.{cls.__name__}, got {type(obj).__name__}")
    if not obj._h:
        raise ValueError(f"{what}: the {cls.__name__} is closed")
    return obj._h


def _checked_call(name, fn, argtypes):
    """fn, checking its integer arguments against their C types: a last line of defence
    behind the call sites' own checks, which name the argument."""
    ints = [(i, t) for i, t in enumerate(argtypes) if t in _INT_RANGES]
    if not ints:
        return fn

    def call(*args):
        for i, t in ints:
            _int(args[i], lambda: f"{name} argument {i + 1}", t)
        return fn(*args)
    return call


class _CodebookConfig(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("abi_version", ctypes.c_uint32),
                ("max_code_length", ctypes.c_int32), ("max_symbols", ctypes.c_int32)]


class _CodecConfig(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("abi_version", ctypes.c_uint32),
                ("backend", ctypes.c_int32), ("kind", ctypes.c_int32),
                ("num_tokens", ctypes.c_int32), ("head_dim", ctypes.c_int32),
                ("value_group_size", ctypes.c_int32), ("bound_mode", ctypes.c_int32),
                ("error_bound", ctypes.c_float), ("entropy", ctypes.c_int32),
                ("num_substreams", ctypes.c_int32), ("block_format", ctypes.c_int32),
                ("tile_permute_channels", ctypes.c_int32), ("tile_split_widths", ctypes.c_int32)]


class _BlockInfo(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("abi_version", ctypes.c_uint32),
                ("format_version", ctypes.c_uint32), ("block_bytes", ctypes.c_uint32),
                ("encoding", ctypes.c_int32), ("kind", ctypes.c_int32),
                ("num_tokens", ctypes.c_int32), ("head_dim", ctypes.c_int32),
                ("group_size", ctypes.c_int32), ("num_groups", ctypes.c_int32),
                ("num_substreams", ctypes.c_int32), ("code_bits", ctypes.c_int32),
                ("codebook_id", ctypes.c_uint32)]


class _StoreConfig(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("abi_version", ctypes.c_uint32),
                ("backend", ctypes.c_int32), ("num_layers", ctypes.c_int32),
                ("num_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32),
                ("dtype", ctypes.c_int32), ("block_tokens", ctypes.c_int32),
                ("key_bound_mode", ctypes.c_int32), ("key_error_bound", ctypes.c_float),
                ("value_bound_mode", ctypes.c_int32), ("value_error_bound", ctypes.c_float),
                ("value_group_size", ctypes.c_int32), ("entropy", ctypes.c_int32),
                ("page_bytes", ctypes.c_int32), ("capacity_bytes", ctypes.c_int64),
                ("max_sequences", ctypes.c_int32), ("max_sequence_tokens", ctypes.c_int32),
                ("block_format", ctypes.c_int32), ("tile_permute_channels", ctypes.c_int32),
                ("tile_split_widths", ctypes.c_int32), ("num_substreams", ctypes.c_int32),
                ("rotation", ctypes.c_int32), ("sink_tokens", ctypes.c_int32),
                ("key_layer_scales", ctypes.POINTER(ctypes.c_float)),
                ("value_layer_scales", ctypes.POINTER(ctypes.c_float)),
                ("serialized_block_format", ctypes.c_int32)]


class _StoreStats(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("abi_version", ctypes.c_uint32),
                ("num_sequences", ctypes.c_int32), ("reserved", ctypes.c_int32),
                ("num_blocks", ctypes.c_int64), ("block_bytes", ctypes.c_int64),
                ("page_bytes", ctypes.c_int64), ("tail_bytes", ctypes.c_int64),
                ("table_bytes", ctypes.c_int64), ("codebook_bytes", ctypes.c_int64),
                ("dense_bytes", ctypes.c_int64), ("pages_in_use", ctypes.c_int64),
                ("pages_total", ctypes.c_int64), ("last_append_status", ctypes.c_int32),
                ("failed_appends", ctypes.c_int32), ("reserved2", ctypes.c_int32),
                ("decoded_cache_bytes", ctypes.c_int64)]


class KvcompError(RuntimeError):
    """A kvcomp call returned a status other than KVC_SUCCESS."""

    def __init__(self, status: int, name: str, message: str):
        super().__init__(f"{name}: {message}" if message else name)
        self.status, self.name, self.message = status, name, message

    def __reduce__(self):  # so that it crosses processes (multiprocessing pickles it)
        return type(self), (self.status, self.name, self.message)


def _dtype_code(dtype) -> int:
    """The kvc_dtype of a numpy float16 or float32 dtype."""
    try:
        return _NP_DTYPES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise TypeError(f"dtype {dtype!r}: expected float16 or float32") from None


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
        "kvc_store_create": ([ctypes.POINTER(_StoreConfig), ctypes.POINTER(P)], I32),
        "kvc_store_destroy": ([P], I32),
        "kvc_store_set_codebook": ([P, I32, I32, P], I32),
        "kvc_store_get_codebook": ([P, I32, I32, ctypes.POINTER(P)], I32),
        "kvc_store_add_sequence": ([P, ctypes.POINTER(I32)], I32),
        "kvc_store_free_sequence": ([P, I32, P], I32),
        "kvc_store_sequence_length": ([P, I32, I32, ctypes.POINTER(I32)], I32),
        "kvc_store_prefill": ([P, I32, I32, I32, I32, P, P, P], I32),
        "kvc_store_append": ([P, I32, I32, P, P, P, P], I32),
        "kvc_store_read": ([P, I32, I32, I32, I32, P, P, P], I32),
        "kvc_store_get_stats": ([P, ctypes.POINTER(_StoreStats)], I32),
        "kvc_store_serialized_size": ([P, I32, ctypes.POINTER(SZ)], I32),
        "kvc_store_serialize": ([P, I32, P, SZ, ctypes.POINTER(SZ)], I32),
        "kvc_store_restore": ([P, P, SZ, ctypes.POINTER(I32)], I32),
        "kvc_store_attention": ([P, I32, I32, P, I32, ctypes.c_float, P, P, P], I32),
    }
    checked = {}
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res
        checked[name] = _checked_call(name, fn, args)
    _lib = type("_Library", (), checked)
    return _lib


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

    def __reduce_ex__(self, protocol):
        # copy.copy would give two objects that destroy the same handle (a double free).
        raise TypeError(f"a kvcomp.{type(self).__name__} owns a library handle: it cannot be "
                        "copied or pickled (Codebook.serialize and Store.serialize give bytes)")


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
        c = np.atleast_1d(np.asarray(counts))
        if c.size and (c.dtype.kind not in "iu" or c.min() < 0):
            raise ValueError(f"counts: expected non-negative integers, got {c.dtype}")
        c = np.ascontiguousarray(c, dtype=np.uint64)
        _check(_load().kvc_histogram_add_counts(
            self._h, _int(first_symbol, "first_symbol"), c.size,
            c.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64))))

    @property
    def total(self) -> int:
        t = ctypes.c_uint64()
        _check(_load().kvc_histogram_total(self._h, ctypes.byref(t)))
        return t.value



class Codebook(_Handle):
    """A frozen canonical Huffman codebook (kvc_codebook_t)."""

    _destroy = "kvc_codebook_destroy"

    def __init__(self, *args, **kwargs):
        # A handle is not a Python value a caller could hold: taking one here let any object
        # (a codebook's serialized bytes, say) pass for a codebook and be freed as one.
        raise TypeError("make a Codebook with Codebook.build(histogram) or "
                        "Codebook.deserialize(data)")

    @classmethod
    def _adopt(cls, handle: ctypes.c_void_p) -> "Codebook":
        book = cls.__new__(cls)
        book._h = handle
        return book

    @classmethod
    def build(cls, histogram: Histogram, max_code_length: int = 12,
              max_symbols: int = 255) -> "Codebook":
        cfg = _make(_CodebookConfig, ctypes.sizeof(_CodebookConfig), ABI_VERSION,
                    _int(max_code_length, "max_code_length"), _int(max_symbols, "max_symbols"))
        h = ctypes.c_void_p()
        _check(_load().kvc_codebook_build(_handle(histogram, Histogram, "histogram"),
                                          ctypes.byref(cfg), ctypes.byref(h)))
        return cls._adopt(h)

    @classmethod
    def deserialize(cls, data: bytes) -> "Codebook":
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        h = ctypes.c_void_p()
        _check(_load().kvc_codebook_deserialize(buf, len(data), ctypes.byref(h)))
        return cls._adopt(h)

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
        _check(_load().kvc_codebook_code_length(self._h, _int(symbol, "symbol"), ctypes.byref(v)))
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
    "huffman". codebook: a Codebook or None (fixed width only). block_format: "v1" | "tiles"
    (format t1, docs/format.md §17; no codebook, entropy and num_substreams ignored);
    tile_permute_channels, tile_split_widths: the tile encoder's options (api.md).
    """

    _destroy = "kvc_codec_destroy"

    def __init__(self, kind="key", num_tokens: int = 64, head_dim: int = 128,
                 error_bound: float = 0.05, bound_mode="relative", entropy="auto",
                 value_group_size: int = 0, num_substreams: int = 0,
                 codebook: Optional[Codebook] = None, block_format="v1",
                 tile_permute_channels: bool = True, tile_split_widths: bool = True):
        lib = _load()
        self.kind = _enum(_KINDS, kind, "kind")
        self.num_tokens = _int(num_tokens, "num_tokens")
        self.head_dim = _int(head_dim, "head_dim")
        self.error_bound = float(error_bound)
        self.bound_mode = _enum(_BOUNDS, bound_mode, "bound_mode")
        self.entropy = _enum(_ENTROPIES, entropy, "entropy")
        self.value_group_size = _int(value_group_size, "value_group_size")
        cfg = _make(_CodecConfig, ctypes.sizeof(_CodecConfig), ABI_VERSION, BACKEND_CPU,
                    self.kind, self.num_tokens, self.head_dim, self.value_group_size,
                    self.bound_mode, self.error_bound, self.entropy,
                    _int(num_substreams, "num_substreams"),
                    _enum(_BLOCK_FORMATS, block_format, "block_format"),
                    int(bool(tile_permute_channels)),
                    int(bool(tile_split_widths)))
        self.block_format = cfg.block_format
        h = ctypes.c_void_p()
        book = None if codebook is None else _handle(codebook, Codebook, "codebook")
        _check(lib.kvc_codec_create(ctypes.byref(cfg), book, ctypes.byref(h)))
        self._h = h
        self.codebook = codebook

    def max_block_bytes(self, dtype=np.float16) -> int:
        v = ctypes.c_size_t()
        _check(_load().kvc_codec_max_block_bytes(self._h, _dtype_code(dtype),
                                                 ctypes.byref(v)))
        return v.value

    def _src_pointers(self, x: np.ndarray):
        """Block pointers of a [tokens, heads, head_dim] array, (block, head) order."""
        x = _as_3d(np.asarray(x))
        if x.dtype not in _NP_DTYPES:
            raise TypeError(f"dtype {x.dtype} not supported (float16, float32)")
        t, h, d = x.shape
        if d != self.head_dim:
            raise ValueError(f"head_dim {d} != codec head_dim {self.head_dim}")
        if t % self.num_tokens:
            raise ValueError(f"tokens {t} not a multiple of the block's {self.num_tokens}")
        if not (x.strides[2] == x.itemsize and x.strides[1] == d * x.itemsize
                and x.strides[0] == h * d * x.itemsize and x.flags.aligned):
            x = np.require(x, requirements=["C", "A"])
        nb = (t // self.num_tokens) * h
        if not nb:  # (an empty array may still have 2**31 - 1 heads or token blocks)
            return x, np.zeros(0, np.uint64), 0, h * d
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
        room = np.empty(nb * cap, dtype=np.uint8)  # each block at the most it can take
        dst = (room.ctypes.data + np.arange(nb, dtype=np.uint64) * cap).astype(np.uint64)
        sizes = np.zeros(nb, dtype=np.uint32)
        if nb:
            _check(_load().kvc_codec_encode(
                self._h, nb, src.ctypes.data, stride, _NP_DTYPES[x.dtype], dst.ctypes.data,
                cap, sizes.ctypes.data, None))
        # Packed: each block at the 4-byte boundary after the last, zeros between them.
        padded = (sizes.astype(np.int64) + 3) & ~3
        offsets = np.cumsum(padded) - padded
        data = np.zeros(int(padded.sum()), dtype=np.uint8)
        for i, (o, n) in enumerate(zip(offsets.tolist(), sizes.tolist())):
            data[o:o + n] = room[i * cap:i * cap + n]
        return EncodedBlocks(data, offsets, sizes, tuple(_as_3d(x).shape))

    def decode(self, blocks: EncodedBlocks, out: Optional[np.ndarray] = None,
               dtype=np.float16) -> np.ndarray:
        """Decodes blocks into out (or a new array) of the encoded [tokens, heads, head_dim]."""
        if not isinstance(blocks, EncodedBlocks):
            raise TypeError(f"blocks: expected a kvcomp.EncodedBlocks, got {type(blocks).__name__}")
        t, h, d = (_int(n, "blocks.shape") for n in blocks.shape)
        nb = (t // self.num_tokens) * h
        data = blocks.data
        offsets = np.asarray(blocks.offsets)
        sizes = np.asarray(blocks.sizes)
        # An EncodedBlocks may be put together by the caller: the C call trusts its pointers.
        if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1
                or not data.flags.c_contiguous):
            raise ValueError("blocks.data must be a 1-D C-contiguous uint8 array")
        if t % self.num_tokens or d != self.head_dim:
            raise ValueError(f"blocks.shape {blocks.shape} is not [a multiple of "
                             f"{self.num_tokens} tokens, heads, {self.head_dim}]")
        if offsets.shape != (nb,) or sizes.shape != (nb,) or offsets.dtype.kind not in "iu" \
                or sizes.dtype.kind not in "iu":
            raise ValueError(f"blocks.offsets and blocks.sizes must be integer arrays of the "
                             f"{nb} blocks of shape {blocks.shape}")
        # Bounds compared as Python integers, before any cast could wrap (uint64 2**64 - 8 is
        # -8 as int64).
        if nb and not (0 <= int(offsets.min()) and int(offsets.max()) <= data.nbytes
                       and 0 <= int(sizes.min()) and int(sizes.max()) <= data.nbytes
                       and int((offsets.astype(np.int64) + sizes.astype(np.int64)).max())
                       <= data.nbytes):
            raise ValueError("blocks.offsets and blocks.sizes must lie inside blocks.data")
        if out is None:
            out = np.empty((t, h, d), dtype=dtype)
        o3 = _as_3d(out) if isinstance(out, np.ndarray) else None
        if (o3 is None or o3.shape != (t, h, d) or not o3.flags.c_contiguous
                or not o3.flags.aligned or not o3.flags.writeable or o3.dtype not in _NP_DTYPES):
            raise ValueError("out must be a writeable, aligned, C-contiguous float16/float32 "
                             "array of the encoded shape")
        _, dst, _, stride = self._src_pointers(o3)
        src = (data.ctypes.data + offsets.astype(np.int64)).astype(np.uint64)
        sizes = np.ascontiguousarray(sizes, dtype=np.uint32)
        if nb:
            _check(_load().kvc_codec_decode(
                self._h, nb, src.ctypes.data, sizes.ctypes.data, _NP_DTYPES[o3.dtype],
                dst.ctypes.data, stride, None, None))
        return out

    def histogram(self, x: np.ndarray, histogram: Optional[Histogram] = None) -> Histogram:
        """Adds the symbols of x's blocks (as encode would cut them) to a histogram."""
        histogram = Histogram() if histogram is None else histogram
        h = _handle(histogram, Histogram, "histogram")
        x, src, nb, stride = self._src_pointers(x)
        if nb:
            _check(_load().kvc_codec_histogram(self._h, nb, src.ctypes.data, stride,
                                               _NP_DTYPES[x.dtype], h, None))
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


# ---- Paged store ------------------------------------------------------------------------------

@dataclass
class StoreConfig:
    """kvc_store_config as Python values (defaults: KVC_STORE_CONFIG_INIT).

    backend: "cpu" | "cuda"; dtype: "float16" | "bfloat16" (K, V, queries and outputs);
    key_/value_bound_mode: "relative" | "absolute"; entropy: "auto" | "fixed" | "huffman";
    block_format: "auto" (tiles on CUDA where a tile kernel covers the shape, else v1) | "v1" |
    "tiles" (format t1: no codebooks; entropy and num_substreams ignored); num_substreams:
    Huffman sub-streams of v1 blocks, 0 = automatic (32 where the group size allows);
    rotation: "none" | "hadamard" (K and V rows stored rotated by H / sqrt(head_dim), head_dim a
    power of two; queries and outputs rotated inside attention, reads rotated back; the bounds
    then hold for the rotated rows: docs/api.md, "Rotation") | "hadamard_values" (V rows only);
    sink_tokens: 0 .. block_tokens - 1, the first tokens of every sequence and layer also kept
    uncompressed once their block is compressed, and read and attended from there (docs/api.md,
    "Attention sinks"); key_layer_scales, value_layer_scales: None, or num_layers floats: layer
    l's K (V) bound is key_error_bound * key_layer_scales[l] in fp32 (docs/api.md, "Per-layer
    bounds"); each finite and > 0; serialized_block_format: "auto" (blocks as held) | "v1" (a
    tiles store serializes each tile block as format v1 where that is smaller, restoring to the
    same bytes: docs/api.md, "Serialization") | "tiles".
    """
    num_layers: int = 1
    num_kv_heads: int = 1
    head_dim: int = 128
    dtype: str = "float16"
    block_tokens: int = 64
    key_bound_mode: str = "relative"
    key_error_bound: float = 0.05
    value_bound_mode: str = "relative"
    value_error_bound: float = 0.05
    value_group_size: int = 0
    entropy: str = "auto"
    page_bytes: int = 0
    capacity_bytes: int = 1 << 30
    max_sequences: int = 0
    max_sequence_tokens: int = 0
    backend: str = "cpu"
    block_format: str = "auto"
    tile_permute_channels: int = 1
    tile_split_widths: int = 1
    num_substreams: int = 0
    rotation: str = "none"
    sink_tokens: int = 0
    key_layer_scales: Optional[Sequence[float]] = None
    value_layer_scales: Optional[Sequence[float]] = None
    serialized_block_format: str = "auto"

    def _scales(self, name):
        """The ctypes float array of a layer-scales field (None: NULL), its length checked."""
        scales = getattr(self, name)
        if scales is None:
            return None
        values = [float(x) for x in np.asarray(scales, dtype=np.float64).reshape(-1)]
        if np.ndim(scales) != 1 or len(values) != _int(self.num_layers, "num_layers"):
            raise ValueError(f"{name}: expected a sequence of num_layers = {self.num_layers}"
                             f" floats, got shape {np.shape(scales)}")
        return (ctypes.c_float * len(values))(*values)

    def _struct(self) -> _StoreConfig:
        """The C struct; its scale arrays (kept alive by the struct's _keep) are read by
        kvc_store_create only."""
        def field(name, ctype=ctypes.c_int32):
            return _int(getattr(self, name), name, ctype)
        cfg = _make(
            _StoreConfig,
            ctypes.sizeof(_StoreConfig), ABI_VERSION, _enum(_BACKENDS, self.backend, "backend"),
            field("num_layers"), field("num_kv_heads"), field("head_dim"),
            _enum(_STORE_DTYPES, self.dtype, "dtype"), field("block_tokens"),
            _enum(_BOUNDS, self.key_bound_mode, "key_bound_mode"), float(self.key_error_bound),
            _enum(_BOUNDS, self.value_bound_mode, "value_bound_mode"),
            float(self.value_error_bound), field("value_group_size"),
            _enum(_ENTROPIES, self.entropy, "entropy"), field("page_bytes"),
            field("capacity_bytes", ctypes.c_int64), field("max_sequences"),
            field("max_sequence_tokens"),
            _enum(_BLOCK_FORMATS, self.block_format, "block_format"),
            field("tile_permute_channels"), field("tile_split_widths"),
            field("num_substreams"), _enum(_ROTATIONS, self.rotation, "rotation"),
            field("sink_tokens"))
        keep = (self._scales("key_layer_scales"), self._scales("value_layer_scales"))
        for field, array in zip(("key_layer_scales", "value_layer_scales"), keep):
            if array is not None:
                setattr(cfg, field, ctypes.cast(array, ctypes.POINTER(ctypes.c_float)))
        cfg.serialized_block_format = _enum(_BLOCK_FORMATS, self.serialized_block_format,
                                            "serialized_block_format")
        cfg._keep = keep
        return cfg


# The device arrays each dtype takes: typestrs of __cuda_array_interface__, and where the array
# is a torch tensor, its torch dtype. torch exports bfloat16 as "<V2" (2 opaque bytes), but some
# versions exported it as "<f2", float16's typestr, so for a tensor the typestr alone does not
# tell the two apart. A bfloat16 store also takes tensors viewed as int16 or uint16.
_CUDA_TYPES = {
    DTYPE_FP16: (("f2",), ("torch.float16",)),
    DTYPE_BF16: (("V2", "i2", "u2"), ("torch.bfloat16", "torch.int16", "torch.uint16")),
    DTYPE_FP32: (("f4",), ("torch.float32",)),
}


def _cuda_pointer(x, shape, dtype_code, name, written=False):
    """Device pointer of an array exposing __cuda_array_interface__ (torch, cupy, ...) of
    elements of dtype_code, after checking its shape, element type and contiguity, and that
    it is not read-only if the call writes it."""
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"{name}: the CUDA store takes device arrays with "
                        f"__cuda_array_interface__ (e.g. torch.Tensor on cuda), got {type(x)}")
    if tuple(cai["shape"]) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(cai['shape'])}, expected {tuple(shape)}")
    typestrs, torch_dtypes = _CUDA_TYPES[dtype_code]
    if cai["typestr"][1:] not in typestrs:
        raise TypeError(f"{name}: element type {cai['typestr']}, expected one of {typestrs}")
    torch_dtype = str(getattr(x, "dtype", ""))
    if torch_dtype.startswith("torch.") and torch_dtype not in torch_dtypes:
        raise TypeError(f"{name}: {torch_dtype}, expected one of {torch_dtypes}")
    strides = cai.get("strides")
    if strides is not None:
        item = int(cai["typestr"][2:])
        want, acc = [], item
        for n in reversed(shape):
            want.append(acc)
            acc *= n
        if tuple(strides) != tuple(reversed(want)) and int(np.prod(shape)) > 1:
            raise ValueError(f"{name}: must be C-contiguous")
    if written and cai["data"][1]:
        raise ValueError(f"{name}: the array is read-only")
    return int(cai["data"][0])


class Store(_Handle):
    """The paged compressed KV store (kvc_store_t).

        store = kvcomp.Store(num_layers=30, num_kv_heads=3, head_dim=64, block_tokens=128,
                             key_bound_mode="absolute", key_error_bound=0.25,
                             value_error_bound=0.07)
        seq = store.add_sequence()
        store.prefill(seq, keys, values)          # [num_layers, tokens, kv_heads, head_dim]
        store.append(layer, [seq], k, v)          # one decode step: [batch, kv_heads, head_dim]
        out = store.attention(layer, [seq], q)    # q: [batch, q_heads, head_dim]

    Configuration: a StoreConfig or its fields as keyword arguments. Tensors are of the store's
    dtype: numpy float16, or uint16 holding bfloat16 bits for a bfloat16 store (CPU backend);
    on the CUDA backend, device arrays exposing __cuda_array_interface__ (torch.Tensor,
    bfloat16 ones included) and an optional stream: a cudaStream_t as an int, or an object
    with one in .cuda_stream (torch.cuda.Stream); without one, the legacy default stream. The
    calls queue their work on that stream and return: keep their inputs alive, unchanged,
    until it has run (on another stream than the tensors' own, torch may reuse the memory of a
    tensor that was freed in the meantime: see torch's Tensor.record_stream).
    Failures raise KvcompError with .status and the library's message; a failed call changes
    nothing (out of pages included). On the CUDA backend, prefill's and append's data errors
    (out of pages, inf or NaN) are found on the GPU: they show in stats() once the stream has
    run, not as an exception. One Store must not be used by two threads at once.
    """

    _destroy = "kvc_store_destroy"

    def __init__(self, config: Optional[StoreConfig] = None, **kwargs):
        if config is None:
            config = StoreConfig(**kwargs)
        elif not isinstance(config, StoreConfig):
            raise TypeError(f"config: expected a kvcomp.StoreConfig, got {type(config).__name__}")
        elif kwargs:
            raise TypeError("give a StoreConfig or keyword arguments, not both")
        self.config = config
        cfg = config._struct()
        h = ctypes.c_void_p()
        _check(_load().kvc_store_create(ctypes.byref(cfg), ctypes.byref(h)))
        self._h = h
        self.cuda = cfg.backend == BACKEND_CUDA
        self.dtype_code = cfg.dtype
        self.num_layers, self.num_kv_heads = cfg.num_layers, cfg.num_kv_heads
        self.head_dim, self.block_tokens = cfg.head_dim, cfg.block_tokens

    # -- tensors ---------------------------------------------------------------------------------
    def _np_dtype(self):
        return np.dtype(np.float16) if self.dtype_code == DTYPE_FP16 else np.dtype(np.uint16)

    def _in(self, x, shape, name):
        """(pointer, keep-alive) of an input tensor of the store's dtype."""
        if self.cuda:
            return _cuda_pointer(x, shape, self.dtype_code, name), x
        x = np.asarray(x)
        if x.dtype != self._np_dtype():
            raise TypeError(f"{name}: dtype {x.dtype}, the store holds {self._np_dtype()}"
                            + (" (bfloat16 bits)" if self.dtype_code == DTYPE_BF16 else ""))
        if x.shape != tuple(shape):
            raise ValueError(f"{name}: shape {x.shape}, expected {tuple(shape)}")
        x = np.require(x, requirements=["C", "A"])
        return x.ctypes.data, x

    def _out(self, out, shape, dtype_code, name):
        if self.cuda:
            if out is None:
                raise ValueError(f"{name}: the CUDA store needs a device output array")
            return _cuda_pointer(out, shape, dtype_code, name, written=True), out
        np_dtype = {DTYPE_FP16: np.float16, DTYPE_BF16: np.uint16, DTYPE_FP32: np.float32}
        if out is None:
            out = np.empty(shape, dtype=np_dtype[dtype_code])
        if (not isinstance(out, np.ndarray) or out.shape != tuple(shape)
                or out.dtype != np_dtype[dtype_code] or not out.flags.c_contiguous
                or not out.flags.aligned or not out.flags.writeable):
            raise ValueError(f"{name}: must be a writeable, aligned, C-contiguous "
                             f"{np.dtype(np_dtype[dtype_code])} array of shape {tuple(shape)}")
        return out.ctypes.data, out

    def _stream(self, stream):
        handle = getattr(stream, "cuda_stream", stream)  # torch.cuda.Stream holds its handle
        if handle and not self.cuda:
            raise ValueError("stream: the CPU store takes none (None or 0)")
        return ctypes.c_void_p(int(handle)) if handle else None

    def _shape(self, x):
        if self.cuda and hasattr(x, "__cuda_array_interface__"):
            return tuple(int(n) for n in x.__cuda_array_interface__["shape"])
        return tuple(np.shape(x))

    @staticmethod
    def _ids(ids):
        a = np.atleast_1d(np.asarray(ids))
        if a.ndim != 1:
            raise ValueError("sequence ids: expected a 1-D list")
        if a.size and (a.dtype.kind not in "iu" or a.min() < -2**31 or a.max() >= 2**31):
            raise ValueError(f"sequence ids: expected int32 integers, got {a.dtype} "
                             f"{a.tolist() if a.size <= 8 else ''}".rstrip())
        return np.ascontiguousarray(a, dtype=np.int32)

    # -- codebooks and sequences -----------------------------------------------------------------
    def set_codebook(self, layer: int, kind, codebook: Codebook) -> None:
        _check(_load().kvc_store_set_codebook(self._h, _int(layer, "layer"),
                                              _enum(_KINDS, kind, "kind"),
                                              _handle(codebook, Codebook, "codebook")))

    def get_codebook(self, layer: int, kind) -> Optional[Codebook]:
        """The codebook of (layer, kind), or None while the layer has built none."""
        k = _enum(_KINDS, kind, "kind")
        h = ctypes.c_void_p()
        _check(_load().kvc_store_get_codebook(self._h, _int(layer, "layer"), k, ctypes.byref(h)))
        return Codebook._adopt(h) if h.value else None

    def add_sequence(self) -> int:
        v = ctypes.c_int32()
        _check(_load().kvc_store_add_sequence(self._h, ctypes.byref(v)))
        return v.value

    def free_sequence(self, sequence_id: int, stream=None) -> None:
        _check(_load().kvc_store_free_sequence(self._h, _int(sequence_id, "sequence_id"),
                                               self._stream(stream)))

    def sequence_length(self, sequence_id: int, layer: int = 0) -> int:
        v = ctypes.c_int32()
        _check(_load().kvc_store_sequence_length(self._h, _int(sequence_id, "sequence_id"),
                                                 _int(layer, "layer"), ctypes.byref(v)))
        return v.value

    # -- appending -------------------------------------------------------------------------------
    def prefill(self, sequence_id: int, keys, values, first_layer: int = 0, stream=None) -> None:
        """Appends tokens to one sequence: keys, values [num_layers, tokens, kv_heads, head_dim]
        (layers first_layer, ...), or [tokens, kv_heads, head_dim] for the one layer
        first_layer."""
        shape = self._shape(keys)
        if len(shape) == 3:
            shape = (1,) + shape
        if len(shape) != 4 or shape[2:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"keys: shape {self._shape(keys)}, expected [num_layers,] tokens, "
                             f"{self.num_kv_heads}, {self.head_dim}")
        layers, tokens = shape[:2]
        want = self._shape(keys)
        pk, k = self._in(keys, want, "keys")
        pv, v = self._in(values, want, "values")
        _check(_load().kvc_store_prefill(self._h, _int(sequence_id, "sequence_id"),
                                         _int(first_layer, "first_layer"), layers,
                                         tokens, pk, pv, self._stream(stream)))

    def append(self, layer: int, sequence_ids, keys, values, stream=None) -> None:
        """One decode step of one layer: keys, values [len(sequence_ids), kv_heads, head_dim]."""
        ids = self._ids(sequence_ids)
        shape = (len(ids), self.num_kv_heads, self.head_dim)
        pk, k = self._in(keys, shape, "keys")
        pv, v = self._in(values, shape, "values")
        _check(_load().kvc_store_append(self._h, _int(layer, "layer"), len(ids), ids.ctypes.data,
                                        pk, pv,
                                        self._stream(stream)))

    # -- reading ---------------------------------------------------------------------------------
    def read(self, sequence_id: int, layer: int, dtype=np.float16, keys=None, values=None,
             stream=None):
        """(keys, values) of (sequence, layer), decompressed: [length, kv_heads, head_dim] of
        dtype (np.float16, np.float32, or "bfloat16" as uint16 bits). On CUDA, pass device
        arrays of at least that length (their first dimension is the capacity)."""
        code = DTYPE_BF16 if isinstance(dtype, str) and dtype in ("bfloat16", "bf16") \
            else _dtype_code(dtype)
        n = self.sequence_length(sequence_id, layer)
        cap = n
        if keys is not None:
            if not self._shape(keys):
                raise ValueError(f"keys: expected an array of [capacity, {self.num_kv_heads}, "
                                 f"{self.head_dim}], got a scalar")
            cap = int(self._shape(keys)[0])
        shape = (cap, self.num_kv_heads, self.head_dim)
        pk, k = self._out(keys, shape, code, "keys")
        pv, v = self._out(values, shape, code, "values")
        _check(_load().kvc_store_read(self._h, _int(sequence_id, "sequence_id"),
                                      _int(layer, "layer"), code, cap, pk, pv,
                                      self._stream(stream)))
        return k, v

    def attention(self, layer: int, sequence_ids, queries, scale: Optional[float] = None,
                  out=None, stream=None):
        """Decode attention of one layer: queries [len(sequence_ids), q_heads, head_dim] (one
        token per sequence) over each sequence's tokens; returns out (same shape, store dtype).
        scale defaults to 1/sqrt(head_dim)."""
        ids = self._ids(sequence_ids)
        shape = self._shape(queries)
        if len(shape) != 3 or shape[0] != len(ids) or shape[2] != self.head_dim:
            raise ValueError(f"queries: shape {shape}, expected [{len(ids)}, q_heads, "
                             f"{self.head_dim}]")
        if scale is None:
            scale = 1.0 / float(np.sqrt(self.head_dim))
        pq, q = self._in(queries, shape, "queries")
        po, o = self._out(out, shape, self.dtype_code, "out")
        _check(_load().kvc_store_attention(self._h, _int(layer, "layer"), len(ids), ids.ctypes.data,
                                           shape[1], float(scale), pq, po,
                                           self._stream(stream)))
        return o

    # -- accounting and transport ----------------------------------------------------------------
    def stats(self) -> dict:
        """kvc_store_get_stats as a dict (bytes, blocks, pages, last_append_status, ...)."""
        st = _StoreStats()
        st.struct_size, st.abi_version = ctypes.sizeof(_StoreStats), ABI_VERSION
        _check(_load().kvc_store_get_stats(self._h, ctypes.byref(st)))
        return {name: getattr(st, name) for name, _ in _StoreStats._fields_[2:]
                if not name.startswith("reserved")}

    def serialized_size(self, sequence_id: int) -> int:
        v = ctypes.c_size_t()
        _check(_load().kvc_store_serialized_size(self._h, _int(sequence_id, "sequence_id"),
                                                 ctypes.byref(v)))
        return v.value

    def serialize(self, sequence_id: int) -> bytes:
        n = self.serialized_size(sequence_id)
        buf = ctypes.create_string_buffer(max(n, 1))
        w = ctypes.c_size_t()
        _check(_load().kvc_store_serialize(self._h, _int(sequence_id, "sequence_id"), buf, n,
                                           ctypes.byref(w)))
        return buf.raw[: w.value]

    def block_sizes(self, sequence_id: int, encodings: bool = False):
        """Per layer, the exact length of each compressed block, [num_blocks, kv_heads, 2 (K,
        V)] uint32, read from the serialized sequence (docs/format.md, "Serialized
        sequence"). With encodings=True, also each block's encoding (ENCODING_*; for tile
        blocks their flags byte instead), same shape."""
        data = self.serialize(sequence_id)
        words = np.frombuffer(data, dtype="<u4")
        raw = np.frombuffer(data, dtype=np.uint8)
        version = int(words[1])
        if version == 6:
            raise ValueError("block_sizes reads the held blocks from the serialized sequence, "
                             "but this store writes them as format v1 "
                             "(serialized_block_format='v1')")
        fingerprint = {1: 12, 2: 13, 3: 14, 4: 15, 5: 15 + 2 * self.num_layers}[version]  # words
        # (format.md §16.2)
        at = 2 + fingerprint + 4 * self.num_layers  # magic, version, fingerprint, codebooks
        row = self.num_kv_heads * self.head_dim * 2
        sinks = int(words[2 + 14]) if version >= 4 else 0  # fingerprint word 14
        sizes_out, enc_out = [], []
        for _ in range(self.num_layers):
            num_blocks, tail = int(words[at]), int(words[at + 1])
            at += 2
            sizes = np.empty(num_blocks * self.num_kv_heads * 2, np.uint32)
            enc = np.empty(len(sizes), np.uint8)
            for i in range(len(sizes)):
                sizes[i] = words[at]
                # Block header byte 5: a v1 block's encoding, a tile block's flags (§17.2).
                enc[i] = raw[4 * (at + 1) + 5]
                at += 1 + (int(sizes[i]) + 3) // 4
            held = sinks if num_blocks else 0  # the sink rows, then the tail (format.md §16.4)
            at += 2 * ((held * row + 3) // 4) + 2 * ((tail * row + 3) // 4)
            shape = (num_blocks, self.num_kv_heads, 2)
            sizes_out.append(sizes.reshape(shape))
            enc_out.append(enc.reshape(shape))
        return (sizes_out, enc_out) if encodings else sizes_out

    def restore(self, data: bytes) -> int:
        """Restores a serialized sequence (same configuration and codebooks) as a new one."""
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        v = ctypes.c_int32()
        _check(_load().kvc_store_restore(self._h, buf, len(data), ctypes.byref(v)))
        return v.value
