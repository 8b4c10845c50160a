# SPDX-License-Identifier: Apache-2.0
"""KV-cache policies for the reference forward pass: what each query token sees of the past.

Every policy reproduces what generation would see, for a whole window at once:

- FP16Cache: the fp16 K/V of every earlier token (the baseline).
- KvcompCache: blocks of T tokens per (layer, kv-head). A query in block b sees blocks < b
  through the library and the tokens of its own block (the uncompressed tail) in fp16.
  Codebooks per (layer, K|V) are built from the first window's blocks (the prefill) and frozen
  for every later window. Two paths give the same values: "store" (the default where the
  setting allows it) prefills each layer's K/V into a paged store (kvc_store_prefill; one
  sequence per window) and reads the decoded blocks back (kvc_store_read); "codec" encodes and
  decodes the blocks with kvc_codec_encode/decode (needed for what a store cannot express:
  a chosen sub-stream count, fp16 layers, one tensor left fp16).
- KiviCache: KIVI (Liu et al. 2024). K per channel in groups of G tokens, flushed R tokens at a
  time: a query sees fp16 keys of its own R-chunk (the residual) and quantized keys before it.
  V per token in groups of G channels; the R most recent tokens stay fp16 (a sliding residual).
  Asymmetric min/max quantization with an fp16 scale and zero point per group.
- Int8TokenCache: 8-bit asymmetric per token (one group per head's channels), fp16 scale and
  zero point, every token quantized as it is appended.

Each policy also reports the bytes its cache holds at the end of the window (compressed
blocks, metadata, codebooks, fp16 tails), to compare with fp16 K+V.
"""
from __future__ import annotations

import numpy as np

F16 = 2  # bytes per fp16 element


def _softmax_causal(s: np.ndarray, window: int = 0) -> np.ndarray:
    """In place: causal mask, softmax over the last axis. s: [..., n, n] float32. window > 0:
    a sliding window too, query t sees keys s with t - s < window (Gemma 3's local layers)."""
    n = s.shape[-1]
    s[..., np.triu(np.ones((n, n), dtype=bool), 1)] = -np.inf
    if 0 < window < n:
        s[..., np.tril(np.ones((n, n), dtype=bool), -window)] = -np.inf
    s -= s.max(-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(-1, keepdims=True)
    return s


def mixed_attention(q, k_fp, v_fp, k_q=None, v_q=None, k_block=0, v_block=0, v_window=0,
                    window=0):
    """Causal attention of q [n, H, d] over n keys, each (query, key) pair reading either the
    fp16 copy or the quantized copy of K and of V.

    K: with k_q given, query t reads k_fp for keys in its own k_block-token block and k_q
    before it (k_block = 0: k_q everywhere). V likewise with v_block; or with v_window > 0,
    v_fp for the v_window most recent keys (t - s < v_window) and v_q for older ones.
    k_*/v_*: [n, Hk, d]. window > 0: sliding-window attention (query t sees keys s with
    t - s < window; the cache still holds every key). Returns [n, H, d] float32."""
    n, H, d = q.shape
    Hk = k_fp.shape[1]
    g = H // Hk
    qh = (q.transpose(1, 0, 2).reshape(Hk, g, n, d) * np.float32(1.0 / np.sqrt(d)))

    def heads(x):  # [n, Hk, d] -> [Hk, 1, n, d] float32
        return x.transpose(1, 0, 2)[:, None].astype(np.float32)

    kf, vf = heads(k_fp), heads(v_fp)
    if k_q is None:
        s = qh @ kf.swapaxes(-1, -2)
    else:
        s = qh @ heads(k_q).swapaxes(-1, -2)
        if k_block:
            for b0 in range(0, n, k_block):
                b1 = min(n, b0 + k_block)
                s[..., b0:b1, b0:b1] = qh[..., b0:b1, :] @ kf[..., b0:b1, :].swapaxes(-1, -2)
    p = _softmax_causal(s, window)
    if v_q is None:
        out = p @ vf
    elif v_window:
        # p @ v_q, corrected by (v_fp - v_q) on the band of recent keys (t - s < v_window),
        # one query block of v_window rows at a time.
        vq = heads(v_q)
        out = p @ vq
        dv = vf - vq
        t = np.arange(n)
        for b0 in range(0, n, v_window):
            b1 = min(n, b0 + v_window)
            s0 = max(0, b0 - v_window + 1)
            band = (t[b0:b1, None] - t[None, s0:b1]) < v_window
            out[..., b0:b1, :] += (p[..., b0:b1, s0:b1] * band) @ dv[..., s0:b1, :]
    elif v_block:
        diag = []
        for b0 in range(0, n, v_block):
            b1 = min(n, b0 + v_block)
            diag.append(p[..., b0:b1, b0:b1] @ vf[..., b0:b1, :])
            p[..., b0:b1, b0:b1] = 0.0
        out = p @ heads(v_q) + np.concatenate(diag, axis=-2)
    else:
        out = p @ heads(v_q)
    return out.reshape(H, n, d).transpose(1, 0, 2)


def _prefix_sums(n):
    """sum over t = 1..n of t: the fp16 bytes summed over the window's prefixes, per byte of
    one token."""
    return n * (n + 1) // 2


def _fp16_rows_held(n, T, sinks, row):
    """Bytes of the fp16 rows a cache of T-token blocks holds for a window of n tokens: the tail
    (< T tokens) and, once the first block is compressed, the sinks; at the window's end and
    summed over the steps t = 1..n (a block is compressed as soon as it is full). row: the bytes
    of one token."""
    n_full = n // T * T
    t = np.arange(1, n + 1)
    done = t // T  # blocks complete after step t
    held = (n - n_full + (sinks if n_full else 0)) * row
    return held, int(((t - done * T) * row).sum()) + int((done > 0).sum()) * sinks * row


class FP16Cache:
    name = "fp16"

    def begin_window(self, n):
        # bytes: held at the window's end. *_time: summed over every prefix length t = 1..n
        # (the cache as generation holds it after each step), for a time-averaged ratio.
        self.bytes = 0
        self.fp16_bytes = 0
        self.bytes_time = 0
        self.fp16_time = 0

    def attend(self, layer, q, k, v, window=0):
        n = k.shape[0]
        self.fp16_bytes += k.nbytes + v.nbytes
        self.bytes += k.nbytes + v.nbytes
        self.fp16_time += _prefix_sums(n) * (k.nbytes + v.nbytes) // n
        self.bytes_time += _prefix_sums(n) * (k.nbytes + v.nbytes) // n
        return mixed_attention(q, k, v, window=window)


def hadamard(d: int) -> np.ndarray:
    """The normalized Hadamard matrix of order d, a power of two (Sylvester's construction):
    symmetric and orthogonal, so H @ H = I. float32 [d, d]."""
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    if h.shape[0] != d:
        raise ValueError(f"head_dim {d} is not a power of two")
    return (h / np.sqrt(d)).astype(np.float32)


def tile_width_counts(blocks) -> np.ndarray:
    """Tiles per width code (0..6: 0, 2, 3, 4, 6, 8 bits, raw) over tile blocks, from each
    block's tile table (docs/format.md §17.2-17.3: NT at byte 7, table at 32, width in bits
    0-3 of each u32 entry)."""
    counts = np.zeros(7, dtype=np.int64)
    for o in blocks.offsets:
        o = int(o)
        nt = int(blocks.data[o + 7])
        table = blocks.data[o + 32:o + 32 + 4 * nt].view(np.uint32)
        counts += np.bincount(table & 0xF, minlength=7)[:7]
    return counts


class CodecVariant:
    """How a kvcomp cache's blocks are written: block format v1 (num_substreams Huffman
    sub-streams, 0 = the library's choice; a codebook per (layer, K|V) unless entropy is
    "fixed") or tiles (format t1; permute: tile_permute_channels, split: tile_split_widths)."""

    def __init__(self, block_format="v1", permute=True, split=True, num_substreams=0):
        if block_format not in ("v1", "tiles"):
            raise ValueError(f"block format {block_format!r}: expected 'v1' or 'tiles'")
        self.block_format = block_format
        self.permute, self.split = bool(permute), bool(split)
        self.num_substreams = int(num_substreams)

    @property
    def key(self):
        if self.block_format == "v1":
            return ("v1", self.num_substreams)
        return ("tiles", self.permute, self.split)

    def codec_args(self):
        if self.block_format == "v1":
            return dict(num_substreams=self.num_substreams)
        return dict(block_format="tiles", tile_permute_channels=self.permute,
                    tile_split_widths=self.split)


class KvcompCache:
    """kvcomp through its C ABI. eb_k / eb_v: error bounds (None: keep that tensor fp16).
    path: "store" | "codec" | None (the store for v1 settings without sinks where it allows
    them, else the codec, as the earlier tables were measured). device: "cpu" | "cuda" (the
    store's backend; the codec path is CPU only).

    Either path: block_format "v1" | "tiles" (tile_permute, tile_split: the tile encoder's
    options); sinks: the first `sinks` tokens of each window (the attention sinks) are also
    kept in fp16, and attention reads them from there once their block is compressed (the
    blocks are unchanged; the fp16 rows are counted on top): through the store, its
    sink_tokens option (docs/api.md, "Attention sinks"); through the codec, the harness keeps
    the copy. layer_scales: {"key": [...], "value": [...]} (either may be absent), one factor
    per layer: layer l's bound is eb * factor (through the store, its key_layer_scales and
    value_layer_scales; calibrate.py measures them). rotate: each head's K and V (or one of
    them) multiplied by the normalized
    Hadamard matrix over head_dim before they are encoded, and the decoded blocks multiplied by
    it again (H H = I), the error bound then holding in the rotated space: through the store,
    its rotation option for K and V or V alone (which also rotates the fp16 sinks and tail,
    rounded to fp16); through the codec, a prototype that keeps them unrotated. Codec path only:
    variants: (name, CodecVariant)
    pairs whose blocks are written from the same input beside the primary's, to count their
    bytes; each variant's decoded values are compared with the primary's element by element
    (`variant_mismatch`), so that one forward pass serves every variant that decodes to the
    same values (v1 and tiles do, format.md §17.6)."""

    def __init__(self, eb_k, eb_v, block_tokens=64, value_group_size=0, bound_mode="relative",
                 entropy="auto", name=None, num_substreams=0, fp16_layers=(), path=None,
                 device="cpu", block_format="v1", tile_permute=True, tile_split=True,
                 rotate=False, sinks=0, variants=(), layer_scales=None):
        import kvcomp

        self.kvcomp = kvcomp
        self.eb = {"key": eb_k, "value": eb_v}
        self.T = block_tokens
        self.vgs = value_group_size
        # bound_mode: "relative" | "absolute", or a dict per kind.
        self.bound_mode = (bound_mode if isinstance(bound_mode, dict)
                           else {"key": bound_mode, "value": bound_mode})
        self.entropy = entropy
        self.num_substreams = num_substreams
        self.fp16_layers = set(fp16_layers)  # layers whose cache stays fp16
        self.variant = CodecVariant(block_format, tile_permute, tile_split, num_substreams)
        # rotate: False/True (K and V) or "key" / "value" (that tensor only).
        self.rotate = ({"key", "value"} if rotate is True else
                       {rotate} if isinstance(rotate, str) else set())
        self.sinks = int(sinks)
        self.layer_scales = {k: list(map(float, v)) for k, v in (layer_scales or {}).items() if v}
        self.variants = list(variants)
        storable = (eb_k is not None and eb_v is not None and not self.fp16_layers
                    and num_substreams == 0 and self.rotate != {"key"} and not self.variants)
        if path is None:
            path = ("store" if storable and block_format == "v1" and not self.sinks
                    and not self.rotate else "codec")
        if path == "store" and not storable:
            raise ValueError("the store compresses K and V of every layer with the library's "
                             "sub-stream count, and rotates K and V or V alone: ns=, "
                             "fp16layers=, k/v=none, rot=k and also= need path=codec")
        if path not in ("store", "codec"):
            raise ValueError(f"path {path!r}: expected 'store' or 'codec'")
        if path == "codec" and device != "cpu":
            raise ValueError("the codec path runs on the CPU only")
        self.path = path
        self.device = device
        self.codecs = {}   # (layer, kind, variant key) -> (codec, codebook bytes)
        self.name = name or f"kvcomp K{eb_k} V{eb_v}"
        self.stats = self._new_stats()
        # Per variant: bytes at the windows' ends and over their steps (this window), stats and
        # elements that decoded differently from the primary (all windows).
        self.variant_bytes = {nm: dict(bytes=0, bytes_time=0) for nm, _ in self.variants}
        self.variant_stats = {nm: self._new_stats() for nm, _ in self.variants}
        self.variant_mismatch = {nm: 0 for nm, _ in self.variants}
        self.n_layer = None     # the model's layer count (bind_model)
        self.store = None       # kvcomp.Store, created at first use
        self.dev = None
        self.seq = None         # the store's sequence of the current window
        self.book_bytes = {}    # (layer, kind) -> serialized codebook size (frozen)
        self.store_stats = None  # the store's own accounting after the latest layer
        self._hadamard = {}

    @staticmethod
    def _new_stats():
        return {"blocks": 0, "huffman": 0, "fixed": 0, "raw": 0, "tiles": 0,
                "tile_widths": [0] * 7}

    def bound(self, layer, kind):
        """The error bound of (layer, kind): the setting's, times the layer's scale if any,
        multiplied in float32 as the store does."""
        scales = self.layer_scales.get(kind)
        if scales is None:
            return self.eb[kind]
        return float(np.float32(self.eb[kind]) * np.float32(scales[layer]))

    def bind_model(self, hp):
        """The model whose cache this is (the store needs its layer count)."""
        for kind, scales in self.layer_scales.items():
            if len(scales) != hp.n_layer:
                raise ValueError(f"{len(scales)} {kind} layer scales for a model of "
                                 f"{hp.n_layer} layers")
        self.n_layer = hp.n_layer

    def _codec(self, layer, kind, x, variant: CodecVariant | None = None):
        variant = variant or self.variant
        key = (layer, kind, variant.key)
        if key not in self.codecs:
            kv = self.kvcomp
            args = dict(kind=kind, num_tokens=self.T, head_dim=x.shape[2],
                        error_bound=self.bound(layer, kind), bound_mode=self.bound_mode[kind],
                        value_group_size=self.vgs if kind == "value" else 0)
            args.update(variant.codec_args())
            cb = None
            if self.entropy != "fixed" and variant.block_format == "v1":
                # Prefill: the first window's complete blocks train this (layer, kind)'s codebook.
                cb = kv.build_codebook(kv.Codec(**args), x)
            codec = kv.Codec(**args, entropy=self.entropy, codebook=cb)
            self.codecs[key] = (codec, cb.serialized_size if cb is not None else 0)
        return self.codecs[key]

    # ---- the store -------------------------------------------------------------------------
    def open_store(self, kv_heads, head_dim):
        """The store of this setting (created once: its codebooks are those of the first
        layer blocks it compresses, frozen after) and a live sequence in it."""
        if self.store is None:
            if self.n_layer is None:
                raise RuntimeError("KvcompCache(path='store'): bind_model(hp) first")
            from device import Device
            self.dev = Device(self.device)
            cfg = self.dev.store_config(
                num_layers=self.n_layer, num_kv_heads=kv_heads, head_dim=head_dim,
                block_tokens=self.T, key_bound_mode=self.bound_mode["key"],
                key_error_bound=self.eb["key"], value_bound_mode=self.bound_mode["value"],
                value_error_bound=self.eb["value"], value_group_size=self.vgs,
                entropy=self.entropy, capacity_bytes=256 << 20,
                page_bytes=self._smallest_page(head_dim),
                block_format=self.variant.block_format,
                tile_permute_channels=int(self.variant.permute),
                tile_split_widths=int(self.variant.split), sink_tokens=self.sinks,
                key_layer_scales=self.layer_scales.get("key"),
                value_layer_scales=self.layer_scales.get("value"),
                rotation=("hadamard" if self.rotate == {"key", "value"} else
                          "hadamard_values" if self.rotate else "none"))
            self.store = self.kvcomp.Store(**cfg)
        if self.seq is None:
            self.seq = self.store.add_sequence()
        return self.store

    def _smallest_page(self, head_dim):
        """The smallest page that holds the largest block (pages are per (sequence, layer), so
        small ones keep the slack at page ends small)."""
        largest = max(self.kvcomp.Codec(kind=kind, num_tokens=self.T, head_dim=head_dim,
                                        value_group_size=self.vgs if kind == "value" else 0,
                                        entropy="fixed",
                                        block_format=self.variant.block_format).max_block_bytes()
                      for kind in ("key", "value"))
        return (largest + 255) // 256 * 256

    def codebook_bytes(self, layer, kind):
        key = (layer, kind)
        if key not in self.book_bytes:
            book = self.store.get_codebook(layer, kind)
            if book is None:
                return 0
            self.book_bytes[key] = book.serialized_size
            book.close()
        return self.book_bytes[key]

    def read(self, layer, dtype=np.float16):
        """The store's (K, V) of the current sequence at `layer`, decoded, on the host."""
        st, dev = self.store, self.dev
        if not dev.cuda:
            return st.read(self.seq, layer, dtype=dtype)
        n = st.sequence_length(self.seq, layer)
        shape = (n, st.num_kv_heads, st.head_dim)
        k, v = st.read(self.seq, layer, dtype=dtype, keys=dev.empty(shape, dtype),
                       values=dev.empty(shape, dtype))
        return dev.get(k), dev.get(v)

    def begin_window(self, n):
        FP16Cache.begin_window(self, n)
        if self.seq is not None:  # each window is a fresh sequence
            self.store.free_sequence(self.seq)
            self.seq = None

    def _attend_store(self, layer, q, k, v, window=0):
        n, Hk, d = k.shape
        st = self.open_store(Hk, d)
        st.prefill(self.seq, self.dev.put(k), self.dev.put(v), first_layer=layer)
        k_hat, v_hat = self.read(layer)
        row = Hk * d * F16
        sizes, enc = st.block_sizes(self.seq, encodings=True)
        sizes, enc = sizes[layer], enc[layer]     # [blocks, Hk, K|V]
        done = np.arange(1, n + 1) // self.T  # blocks complete after step t
        fp16_held, fp16_time = _fp16_rows_held(n, self.T, self.sinks, row)
        for i, kind in enumerate(("key", "value")):
            cb = self.codebook_bytes(layer, kind) if len(sizes) else 0
            per_block = sizes[:, :, i].sum(1, dtype=np.int64)
            self.bytes += int(per_block.sum()) + cb + fp16_held
            cum = np.concatenate([[0], np.cumsum(per_block)])
            self.bytes_time += fp16_time + int(cum[done].sum()) + int((done > 0).sum()) * cb
            self.stats["blocks"] += per_block.size * Hk
            if self.variant.block_format == "tiles":  # flags bit 3: quantized (format.md §17.2)
                quantized = (enc[:, :, i] & 0x8) != 0
                self.stats["tiles"] += int(quantized.sum())
                self.stats["raw"] += int((~quantized).sum())
            else:
                for e, nm in ((2, "huffman"), (1, "fixed"), (0, "raw")):
                    self.stats[nm] += int((enc[:, :, i] == e).sum())
        self.fp16_bytes += k.nbytes + v.nbytes
        self.fp16_time += _prefix_sums(n) * (k.nbytes + v.nbytes) // n
        self.store_stats = st.stats()
        return mixed_attention(q, k, v, k_hat, v_hat, k_block=self.T, v_block=self.T,
                               window=window)

    # ---- the codec -------------------------------------------------------------------------
    def _rotation(self, d):
        if d not in self._hadamard:
            self._hadamard[d] = hadamard(d)
        return self._hadamard[d]

    @staticmethod
    def _count(stats, variant, blocks):
        stats["blocks"] += len(blocks)
        if variant.block_format == "tiles":
            quantized = (blocks.data[blocks.offsets + 5] & 0x8) != 0  # flags bit 3 (§17.2)
            stats["tiles"] += int(quantized.sum())
            stats["raw"] += int((~quantized).sum())
            w = tile_width_counts(blocks)
            stats["tile_widths"] = [a + int(b) for a, b in zip(stats["tile_widths"], w)]
        else:
            enc = blocks.data[blocks.offsets + 5]  # header byte 5: encoding (format.md §3)
            for e, nm in ((2, "huffman"), (1, "fixed"), (0, "raw")):
                stats[nm] += int((enc == e).sum())

    def _held(self, blocks, nb, cb_bytes, done):
        """Bytes of `blocks` (nb blocks of T tokens, all heads) plus the codebook: held at the
        window's end, and summed over the steps (done[t]: blocks complete after step t)."""
        per_block = blocks.sizes.reshape(nb, -1).sum(1, dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(per_block)])
        return (blocks.nbytes + cb_bytes,
                int(cum[done].sum()) + int((done > 0).sum()) * cb_bytes)

    def _roundtrip(self, layer, kind, x):
        """x [n, Hk, d] fp16 -> (decoded copy, bytes held for x at the window's end).
        Also adds to bytes_time the bytes held after each step t = 1..n: the blocks completed
        by then (a block is compressed as soon as it is full) plus the fp16 sinks and tail."""
        n = x.shape[0]
        row = x.shape[1] * x.shape[2] * F16  # fp16 bytes of one token
        if self.eb[kind] is None or layer in self.fp16_layers:
            self.bytes_time += _prefix_sums(n) * row
            for acc in self.variant_bytes.values():
                acc["bytes"] += x.nbytes
                acc["bytes_time"] += _prefix_sums(n) * row
            return None, x.nbytes
        nb = n // self.T
        n_full = nb * self.T
        S = min(self.sinks, n_full)              # sinks: an fp16 copy once their block is full
        held_fp16, fp16_time = _fp16_rows_held(n, self.T, self.sinks, row)
        done = np.arange(1, n + 1) // self.T     # blocks complete after step t
        self.bytes_time += fp16_time
        for acc in self.variant_bytes.values():
            acc["bytes"] += held_fp16
            acc["bytes_time"] += fp16_time
        if not nb:
            return x.copy(), held_fp16
        blk = x[:n_full]
        rotate = kind in self.rotate
        if rotate:
            H = self._rotation(x.shape[2])
            blk = (blk.astype(np.float32) @ H).astype(np.float16)
        codec, cb_bytes = self._codec(layer, kind, blk)
        blocks = codec.encode(blk)
        dec = codec.decode(blocks, out=np.empty_like(blk))
        held, held_time = self._held(blocks, nb, cb_bytes, done)
        self.bytes_time += held_time
        self._count(self.stats, self.variant, blocks)
        for nm, var in self.variants:
            vcodec, vcb = self._codec(layer, kind, blk, var)
            vblocks = vcodec.encode(blk)
            vdec = vcodec.decode(vblocks, out=np.empty_like(blk))
            self.variant_mismatch[nm] += int(
                (vdec.view(np.uint16) != dec.view(np.uint16)).sum())
            vheld, vtime = self._held(vblocks, nb, vcb, done)
            self.variant_bytes[nm]["bytes"] += vheld
            self.variant_bytes[nm]["bytes_time"] += vtime
            self._count(self.variant_stats[nm], var, vblocks)
        if rotate:
            out = x.astype(np.float32)
            out[:n_full] = dec.astype(np.float32) @ self._rotation(x.shape[2])
        else:
            out = x.copy()
            out[:n_full] = dec
        out[:S] = x[:S]                          # the sinks, read from their fp16 copy
        return out, held_fp16 + held

    def begin_window(self, n):
        FP16Cache.begin_window(self, n)
        for acc in self.variant_bytes.values():
            acc["bytes"] = acc["bytes_time"] = 0
        if self.seq is not None:  # each window is a fresh sequence
            self.store.free_sequence(self.seq)
            self.seq = None

    def attend(self, layer, q, k, v, window=0):
        if self.path == "store":
            return self._attend_store(layer, q, k, v, window)
        k_hat, kb = self._roundtrip(layer, "key", k)
        v_hat, vb = self._roundtrip(layer, "value", v)
        self.bytes += kb + vb
        self.fp16_bytes += k.nbytes + v.nbytes
        self.fp16_time += _prefix_sums(k.shape[0]) * (k.nbytes + v.nbytes) // k.shape[0]
        return mixed_attention(q, k, v, k_hat, v_hat, k_block=self.T, v_block=self.T,
                               window=window)


def quantize_minmax(x: np.ndarray, bits: int, axis: int):
    """Asymmetric min/max quantization of x (float32) over `axis` with fp16 scale and zero
    point, as KIVI stores them; returns the dequantized float32 array."""
    lo = x.min(axis, keepdims=True).astype(np.float16).astype(np.float32)
    hi = x.max(axis, keepdims=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).astype(np.float16).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    qv = np.clip(np.rint((x - lo) / safe), 0, levels)
    return np.where(scale > 0, qv * scale + lo, lo)


class KiviCache:
    def __init__(self, bits, group=32, residual=128, name=None):
        self.bits, self.G, self.R = bits, group, residual
        self.name = name or f"KIVI-{bits}"

    begin_window = FP16Cache.begin_window

    def held_bytes(self, t, Hk, d):
        """Bytes KIVI holds for one layer's K+V after t tokens (t may be an array)."""
        R, G = self.R, self.G
        per_group = G * self.bits / 8 + 2 * F16
        nk = (t // R) * R
        nv = np.maximum(0, t - R)
        return ((nk + nv) * Hk * d / G * per_group + ((t - nk) + (t - nv)) * Hk * d * F16)

    def attend(self, layer, q, k, v, window=0):
        n, Hk, d = k.shape
        G, R, b = self.G, self.R, self.bits
        kf, vf = k.astype(np.float32), v.astype(np.float32)
        # K: per channel over groups of G tokens, for every flushed R-chunk.
        nk = (n // R) * R
        k_q = kf.copy()
        if nk:
            kg = kf[:nk].reshape(nk // G, G, Hk, d)
            k_q[:nk] = quantize_minmax(kg, b, axis=1).reshape(nk, Hk, d)
        # V: per token over groups of G channels (every token; the window picks fp16 ones).
        v_q = quantize_minmax(vf.reshape(n, Hk, d // G, G), b, axis=3).reshape(n, Hk, d)
        self.bytes += float(self.held_bytes(n, Hk, d))
        self.bytes_time += float(self.held_bytes(np.arange(1, n + 1), Hk, d).sum())
        self.fp16_bytes += k.nbytes + v.nbytes
        self.fp16_time += _prefix_sums(n) * (k.nbytes + v.nbytes) // n
        return mixed_attention(q, k, v, k_q, v_q, k_block=R, v_window=R, window=window)


class Int8TokenCache:
    name = "int8 per-token"

    begin_window = FP16Cache.begin_window

    def attend(self, layer, q, k, v, window=0):
        n, Hk, d = k.shape
        k_q = quantize_minmax(k.astype(np.float32), 8, axis=2)
        v_q = quantize_minmax(v.astype(np.float32), 8, axis=2)
        self.bytes += 2 * n * Hk * (d + 2 * F16)
        self.bytes_time += 2 * _prefix_sums(n) * Hk * (d + 2 * F16)
        self.fp16_bytes += k.nbytes + v.nbytes
        self.fp16_time += _prefix_sums(n) * (k.nbytes + v.nbytes) // n
        return mixed_attention(q, k_q, v_q, window=window)


def dense_step_attention(q, kk, vv, window=0):
    """One query token's attention in float32: q [H, d] over kk, vv [n, Hk, d]. [H, d].
    window > 0: over the last `window` keys only (a sliding-window layer)."""
    if window > 0:
        kk, vv = kk[-window:], vv[-window:]
    H, d = q.shape
    Hk = kk.shape[1]
    qh = q.reshape(Hk, H // Hk, d) / np.float32(np.sqrt(d))
    s = np.einsum("hgd,nhd->hgn", qh, kk)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return np.einsum("hgn,nhd->hgd", s, vv).reshape(H, d)


class GenerationCache:
    """A growing KV cache for token-by-token decoding: per layer, full blocks of T tokens
    (kept as the bytes kvcomp wrote, plus their decoded copy for attention) and an fp16 tail.
    kv: a KvcompCache whose codecs compress the blocks (its first block per (layer, K|V)
    trains that codebook), or None for a plain fp16 cache."""

    def __init__(self, n_layer, kv: KvcompCache | None, block_tokens=64):
        if kv is not None and (kv.rotate or kv.sinks or kv.variants):
            raise ValueError("GenerationCache: rotation, sinks and variants are window-pass "
                             "(harness) prototypes only")
        self.kv = kv
        self.T = kv.T if kv is not None else block_tokens
        # Decoded full blocks as float32 [tokens, Hk, d], grown once per block (not per step).
        self.done = [{"key": None, "value": None} for _ in range(n_layer)]
        self.tail = [{"key": [], "value": []} for _ in range(n_layer)]  # fp16 rows
        self.bytes = 0      # compressed bytes of full blocks (incl. codebooks once)
        self.fp16_bytes = 0
        self._codebooks_counted = set()

    def append(self, layer, k, v):
        """k, v: [1, Hk, d] fp16 of the new token. A full tail is compressed when the next
        token arrives, so the tokens of a block always see their own block in fp16."""
        for kind, x in (("key", k), ("value", v)):
            tail = self.tail[layer][kind]
            if len(tail) == self.T:
                blk = np.concatenate(tail, 0)
                if (self.kv is None or self.kv.eb[kind] is None
                        or layer in self.kv.fp16_layers):
                    kept = blk
                    self.bytes += blk.nbytes
                else:
                    codec, cb_bytes = self.kv._codec(layer, kind, blk)
                    enc = codec.encode(blk)
                    kept = codec.decode(enc)
                    self.bytes += enc.nbytes
                    if (layer, kind) not in self._codebooks_counted:
                        self._codebooks_counted.add((layer, kind))
                        self.bytes += cb_bytes
                done = self.done[layer][kind]
                kept = kept.astype(np.float32)
                self.done[layer][kind] = kept if done is None else np.concatenate([done, kept], 0)
                self.fp16_bytes += blk.nbytes
                tail.clear()
            tail.append(x)

    def attend_step(self, layer, q, k, v, window=0):
        """Appends the new token's k, v [1, Hk, d] fp16, then its attention: q [H, d] float32
        (RoPE applied) over every token so far (the last `window` if window > 0). Returns
        [H, d] float32."""
        self.append(layer, k, v)
        kk, vv = self.kv_for_attention(layer)
        return dense_step_attention(q, kk, vv, window)

    def kv_for_attention(self, layer):
        out = []
        for kind in ("key", "value"):
            done = self.done[layer][kind]
            tail = np.concatenate(self.tail[layer][kind], 0).astype(np.float32)
            out.append(tail if done is None else np.concatenate([done, tail], 0))
        return out

    def num_blocks(self, layer):
        """Full blocks of `layer` (compressed unless the layer or kind stays fp16)."""
        done = self.done[layer]["key"]
        return 0 if done is None else len(done) // self.T

    def ratio(self):
        """fp16 bytes / stored bytes over the compressed blocks (the tails are equal)."""
        return self.fp16_bytes / self.bytes if self.bytes else 1.0


class StoreGenerationCache:
    """A growing KV cache for token-by-token decoding held in the paged store of a KvcompCache
    (path "store"): the prompt is prefilled (by the KvcompCache's window pass, or token by
    token), each new token is appended layer by layer (kvc_store_append) and its attention is
    kvc_store_attention over the store's blocks and tail.

    One step keeps GenerationCache's view exactly: a token that fills a block sees that block in
    fp16 (the codec path compresses a full tail when the next token arrives, while the store
    compresses a block as soon as it is full). So that token is held back one step: its
    attention is computed from the store's read-back plus its own fp16 row (dense, as
    GenerationCache does), and it is appended before the next token's."""

    def __init__(self, n_layer, kv: KvcompCache):
        if kv.path != "store":
            raise ValueError("StoreGenerationCache needs a KvcompCache with path='store'")
        self.kv = kv
        self.T = kv.T
        self.n_layer = n_layer
        if kv.n_layer is None:
            kv.n_layer = n_layer
        self.pending = [None] * n_layer  # a held-back (k, v) per layer

    def _open(self, k):
        return self.kv.open_store(k.shape[1], k.shape[2])

    def attend_step(self, layer, q, k, v, window=0):
        st = self._open(k)
        kv, dev, seq = self.kv, self.kv.dev, self.kv.seq
        if window > 0 and st.sequence_length(seq, layer) + 1 > window:
            raise NotImplementedError("kvc_store_attention has no sliding window: decode a "
                                      "sliding-window model through GenerationCache")
        if self.pending[layer] is not None:
            st.append(layer, [seq], *(dev.put(x) for x in self.pending[layer]))
            self.pending[layer] = None
        if (st.sequence_length(seq, layer) + 1) % self.T == 0:
            kk, vv = kv.read(layer)
            kk = np.concatenate([kk, k]).astype(np.float32)
            vv = np.concatenate([vv, v]).astype(np.float32)
            self.pending[layer] = (k, v)
            return dense_step_attention(q, kk, vv)
        st.append(layer, [seq], dev.put(k), dev.put(v))
        H, d = q.shape
        out = st.attention(layer, [seq], dev.put(q[None].astype(np.float16)),
                           scale=1.0 / float(np.sqrt(d)), out=dev.empty((1, H, d)))
        return dev.get(out)[0].astype(np.float32)

    def flush(self):
        """Appends the held-back tokens, so that the store holds every token."""
        for layer, p in enumerate(self.pending):
            if p is not None:
                self.kv.store.append(layer, [self.kv.seq], *(self.kv.dev.put(x) for x in p))
                self.pending[layer] = None

    def num_blocks(self, layer):
        return self.kv.store.sequence_length(self.kv.seq, layer) // self.T if self.kv.seq \
            is not None else 0

    def stats(self):
        """The store's own accounting (kvcomp.Store.stats) with every token appended."""
        self.flush()
        return self.kv.store.stats()

    def ratio(self):
        """fp16 bytes / stored bytes over the compressed blocks (as GenerationCache.ratio)."""
        st = self.stats()
        blocks = st["num_blocks"] // (2 * self.kv.store.num_kv_heads) * self.T
        row = 2 * self.kv.store.num_kv_heads * self.kv.store.head_dim * F16  # K+V, one token
        held = st["block_bytes"] + st["codebook_bytes"]
        return blocks * row / held if held else 1.0


def generation_cache(n_layer, kv: KvcompCache | None, block_tokens=64):
    """The growing cache for `kv`: in its store (path "store"), else GenerationCache."""
    if kv is not None and kv.path == "store":
        return StoreGenerationCache(n_layer, kv)
    return GenerationCache(n_layer, kv, block_tokens)
