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
- KVCompPaperCache, PackKVCache: the published compressors KVComp and PackKV (Jiang et al.),
  re-implemented from their papers and their authors' code (docs/accuracy.md, "Other
  compressors"): error-bounded quantization with a step relative to each group's range, then a
  Huffman code (KVComp) or token repacking and per-pack bit-packing (PackKV); the most recent
  tokens in an fp16 buffer flushed a block at a time (masked_attention).

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


# ---- Published baselines: KVComp (Jiang et al. 2025) and PackKV (Jiang et al. 2025) -----------
# Implemented from the papers' descriptions (docs/accuracy.md, "Other compressors: KVComp and
# PackKV"); every byte a real store would hold is counted.

# Quantization groups over a block laid out [blocks, tokens, kv_heads, head_dim]: the axes reduced
# to one (min, step) pair. "token": one token over every kv-head's channels; "vector": one token of
# one head; "channel": one channel of one head over the block's tokens; "block": the whole block.
GROUP_AXES = {"block": (1, 2, 3), "channel": (1,), "token": (2, 3), "vector": (3,)}
META_BYTES = 2 * F16  # per group: the step and the minimum, fp16 each


def compressed_tokens(L, block, recent):
    """Tokens in compressed blocks once a cache of block-token blocks with a `recent`-token fp16
    buffer holds L tokens (L may be an array): whole blocks leave the buffer as long as at least
    recent - block + (L mod block) tokens stay, i.e. max(0, floor(L / block) + 1 - recent / block)
    blocks (recent a multiple of block; recent = block: every full block is compressed)."""
    L = np.asarray(L)
    nb = np.maximum(0, (L - L % block + block - recent) // block)
    return nb * block


def fp16_step_down(s: np.ndarray) -> np.ndarray:
    """s (float32 >= 0) rounded down to an fp16 value (so the stored step never exceeds the one
    the bound asks for), at least the smallest fp16 subnormal where s > 0. float32."""
    h = s.astype(np.float16)
    over = h.astype(np.float32) > s
    h[over] = np.nextafter(h[over], np.float16(0))
    h = h.astype(np.float32)
    return np.where((s > 0) & (h == 0), np.float32(2.0 ** -24), h)


def quantize_groups(x: np.ndarray, rel: float, group: str):
    """Uniform quantization with a step relative to each group's range, as KVComp and PackKV
    define it: step = rel * (max - min), codes q = round((x - min) / step) >= 0, decoded
    q * step + min, so |x - x_hat| <= step / 2 (before the final rounding to fp16). The step
    (rounded down to fp16) and the minimum (an fp16 element of the group, exact) are stored per
    group. x: float32 [blocks, tokens, kv_heads, head_dim]. Returns (decoded float32, codes int64,
    step float32 broadcastable to x, groups per block)."""
    axes = GROUP_AXES[group]
    lo = x.min(axis=axes, keepdims=True)
    hi = x.max(axis=axes, keepdims=True)
    step = fp16_step_down(np.float32(rel) * (hi - lo))
    safe = np.where(step > 0, step, np.float32(1.0))
    q = np.where(step > 0, np.rint((x - lo) / safe), 0.0)
    dec = q * step + lo
    groups = int(np.prod([x.shape[a] for a in range(1, 4) if a not in axes]))
    return dec, q.astype(np.int64), step, groups


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code lengths (bits) of a Huffman code for symbol counts (0 for absent symbols). A single
    present symbol gets length 0: its count is known from the block shape, no bit is stored."""
    import heapq
    lengths = np.zeros(len(counts), dtype=np.int64)
    present = [int(i) for i in np.nonzero(counts)[0]]
    if len(present) <= 1:
        return lengths
    heap = [(int(counts[i]), i, [i]) for i in present]
    heapq.heapify(heap)
    tie = len(counts)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        lengths[s1] += 1
        lengths[s2] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def _held_bytes(n, block, recent, block_bytes, fixed, row):
    """Bytes a cache holds for one tensor: the compressed blocks so far, `fixed` bytes once one
    exists (a codebook) and the fp16 rows (row bytes each) of the buffer; at the window's end and
    summed over the steps t = 1..n."""
    t = np.arange(1, n + 1)
    ct = compressed_tokens(t, block, recent)
    nb = ct // block
    cum = np.concatenate([[0], np.cumsum(np.asarray(block_bytes, dtype=np.int64))])
    held = cum[nb] + (nb > 0) * int(fixed) + (t - ct) * int(row)
    return int(held[-1]), int(held.sum())


def masked_attention(q, k_fp, v_fp, k_q, v_q, k_fp_mask, v_fp_mask, window=0, chunk=64):
    """Causal attention of q [n, H, d] over n keys where query t reads key s from its fp16 copy
    where k_fp_mask[t, s] (v_fp_mask for V) and from its quantized copy elsewhere. masks: bool
    [n, n], each row's True entries a suffix of its causal part (the fp16 buffer), so the fp16
    corrections are computed `chunk` query rows at a time over the columns from the chunk's first
    fp16 key on. Returns [n, H, d] float32."""
    n, H, d = q.shape
    Hk = k_fp.shape[1]
    g = H // Hk
    qh = (q.transpose(1, 0, 2).reshape(Hk, g, n, d) * np.float32(1.0 / np.sqrt(d)))

    def heads(x):
        return x.transpose(1, 0, 2)[:, None].astype(np.float32)

    def spans(mask):
        """(r0, r1, c0) per chunk of rows with an fp16 key: the rows' first fp16 column."""
        first = np.where(mask.any(1), mask.argmax(1), n)
        return [(r0, min(n, r0 + chunk), int(first[r0:r0 + chunk].min()))
                for r0 in range(0, n, chunk) if first[r0:r0 + chunk].min() < n]

    kq, vq = heads(k_q), heads(v_q)
    s = qh @ kq.swapaxes(-1, -2)
    dk = heads(k_fp) - kq
    for r0, r1, c0 in spans(k_fp_mask):
        s[..., r0:r1, c0:r1] += ((qh[..., r0:r1, :] @ dk[..., c0:r1, :].swapaxes(-1, -2))
                                 * k_fp_mask[r0:r1, c0:r1])
    p = _softmax_causal(s, window)
    out = p @ vq
    dv = heads(v_fp) - vq
    for r0, r1, c0 in spans(v_fp_mask):
        out[..., r0:r1, :] += (p[..., r0:r1, c0:r1] * v_fp_mask[r0:r1, c0:r1]) @ dv[..., c0:r1, :]
    return out.reshape(H, n, d).transpose(1, 0, 2)


def _fp16_mask(n, block, recent):
    """[n, n] bool: query t reads key s in fp16 (s not yet in a compressed block when the cache
    holds t + 1 tokens)."""
    ct = compressed_tokens(np.arange(1, n + 1), block, recent)
    return np.arange(n)[None, :] >= ct[:, None]


class _BaselineCache:
    """Shared bookkeeping of the KVComp and PackKV policies. parts: the bytes held at the
    window's end split into codes (the entropy-coded or bit-packed payload), metadata (steps,
    minimums, pack headers, offsets, codebooks) and the fp16 buffer."""

    def begin_window(self, n):
        FP16Cache.begin_window(self, n)
        self.parts = dict(codes=0.0, metadata=0.0, fp16=0.0)

    def _account(self, k, v, held):
        """held: [(bytes at the end, bytes over the steps)] of K and V."""
        self.bytes += sum(h[0] for h in held)
        self.bytes_time += sum(h[1] for h in held)
        self.fp16_bytes += k.nbytes + v.nbytes
        self.fp16_time += _prefix_sums(k.shape[0]) * (k.nbytes + v.nbytes) // k.shape[0]


class KVCompPaperCache(_BaselineCache):
    """KVComp (Jiang et al., arXiv 2509.00579): error-bounded quantization of blocks (K: blocks of
    kt tokens, one group per block over every kv-head and channel by default; V: blocks of vt
    tokens, one group per token over every kv-head's channels), then Huffman coding of the codes
    with one code per (layer, K|V) built from the window's own blocks. The most recent tokens stay
    fp16 (kr for K, vr for V, as buffers flushed a block at a time).

    Bytes per compressed block: its Huffman bits (rounded up to a byte), 4 bytes per group (step and
    minimum, fp16) and a 4-byte block offset; per (layer, K|V): the canonical codebook, one byte
    (a code length) per symbol from 0 to the largest code; plus the fp16 buffer."""

    def __init__(self, rel_k, rel_v, kt=64, vt=128, kr=128, vr=256, kgroup="block",
                 vgroup="token", name=None):
        self.rel = {"key": rel_k, "value": rel_v}
        self.block = {"key": kt, "value": vt}
        self.recent = {"key": kr, "value": vr}
        self.group = {"key": kgroup, "value": vgroup}
        for kind in ("key", "value"):
            if self.recent[kind] % self.block[kind] or self.recent[kind] < self.block[kind]:
                raise ValueError("the fp16 buffer must be a positive multiple of the block")
            if self.group[kind] not in GROUP_AXES:
                raise ValueError(f"group {self.group[kind]!r}: expected one of "
                                 f"{sorted(GROUP_AXES)}")
        self.name = name or f"KVComp K{rel_k} V{rel_v}"

    def encode(self, kind, x):
        """x [n, Hk, d] fp16 -> (decoded fp16 copy, per-block bytes, codebook bytes, step
        broadcast over the compressed rows or None). Rows past the compressed blocks stay as they
        are."""
        n, Hk, d = x.shape
        T = self.block[kind]
        nt = int(compressed_tokens(n, T, self.recent[kind]))
        out = x.copy()
        if self.rel[kind] is None or not nt:
            return out, np.zeros(0, np.int64), 0, None
        xb = x[:nt].astype(np.float32).reshape(nt // T, T, Hk, d)
        dec, codes, step, groups = quantize_groups(xb, self.rel[kind], self.group[kind])
        out[:nt] = dec.reshape(nt, Hk, d).astype(np.float16)
        counts = np.bincount(codes.ravel())
        lengths = huffman_lengths(counts)
        bits = lengths[codes].reshape(nt // T, -1).sum(1)
        per_block = (bits + 7) // 8 + groups * META_BYTES + 4
        self.code_bytes = int(((bits + 7) // 8).sum())
        return out, per_block, len(counts), np.broadcast_to(step, xb.shape).reshape(nt, Hk, d)

    def attend(self, layer, q, k, v, window=0):
        n, Hk, d = k.shape
        row = Hk * d * F16
        held, dec, masks = [], [], []
        for kind, x in (("key", k), ("value", v)):
            T, R = self.block[kind], self.recent[kind]
            if self.rel[kind] is None:  # that tensor stays fp16
                held.append((x.nbytes, _prefix_sums(n) * row))
                dec.append(x)
                masks.append(np.ones((n, n), dtype=bool))
                self.parts["fp16"] += x.nbytes
                continue
            self.code_bytes = 0
            out, per_block, book, _ = self.encode(kind, x)
            held.append(_held_bytes(n, T, R, per_block, book, row))
            fp16 = (n - int(compressed_tokens(n, T, R))) * row
            self.parts["fp16"] += fp16
            self.parts["codes"] += self.code_bytes
            self.parts["metadata"] += held[-1][0] - fp16 - self.code_bytes
            dec.append(out)
            masks.append(_fp16_mask(n, T, R))
        self._account(k, v, held)
        return masked_attention(q, k, v, dec[0], dec[1], masks[0], masks[1], window)


def width_bits(r) -> np.ndarray:
    """Bits of a non-negative integer range r: ceil(log2(r + 1)), i.e. r's bit length (0 for
    r = 0). Exact through frexp's exponent for r < 2**53."""
    return np.frexp(np.asarray(r, dtype=np.float64))[1].astype(np.int64)


def greedy_repack(codes: np.ndarray, pack: int) -> np.ndarray:
    """PackKV's encode-aware repacking: a permutation of each block's tokens, shared by K and V,
    that groups tokens of similar codes into packs of `pack` consecutive tokens. Per pack: the
    seed is the remaining token most similar (cosine) to the mean of the remaining tokens; then,
    pack - 1 times, the remaining token whose addition increases the pack's summed widths
    (over every K and V channel) least. codes: int64 [blocks, tokens, features]. Returns the
    token order, int64 [blocks, tokens]."""
    nb, N, F = codes.shape
    x = codes.astype(np.float32)
    used = np.zeros((nb, N), dtype=bool)
    order = np.empty((nb, N), dtype=np.int64)
    rows = np.arange(nb)
    pos = 0
    for _ in range(N // pack):
        rem = ~used
        mean = np.rint((x * rem[..., None]).sum(1) / rem.sum(1, keepdims=True))  # [nb, F]
        num = (x * mean[:, None]).sum(-1)
        den = np.linalg.norm(x, axis=-1) * np.linalg.norm(mean, axis=-1)[:, None]
        cos = num / np.maximum(den, 1e-8)
        cos[used] = -np.inf
        seed = cos.argmax(1)
        used[rows, seed] = True
        order[:, pos] = seed
        pos += 1
        lo = codes[rows, seed].copy()
        hi = lo.copy()
        for _ in range(pack - 1):
            cur = width_bits(hi - lo).sum(-1)  # [nb]
            cand = width_bits(np.maximum(hi[:, None], codes) - np.minimum(lo[:, None], codes))
            inc = cand.sum(-1) - cur[:, None]
            inc = np.where(used, np.iinfo(np.int64).max, inc)
            pick = inc.argmin(1)
            used[rows, pick] = True
            order[:, pos] = pick
            pos += 1
            lo = np.minimum(lo, codes[rows, pick])
            hi = np.maximum(hi, codes[rows, pick])
    return order


def median_repack(codes_v: np.ndarray) -> np.ndarray:
    """PackKV's cheaper repacking: the block's tokens sorted by the median of their V codes
    (descending). codes_v: [blocks, tokens, features]. Returns the token order."""
    return np.argsort(-np.median(codes_v, axis=-1), axis=1, kind="stable")


def bitpack_bytes(codes: np.ndarray, pack: int, raw_bits: int, heads: int) -> np.ndarray:
    """Bytes of PackKV's bit-packing of blocks of codes [blocks, tokens, features] (tokens already
    in packing order): each pack (pack consecutive tokens of one channel) stores its minimum
    (raw_bits), its width w (ceil(log2(raw_bits + 1)) bits) and pack * w bits of offsets from the
    minimum; per block, the bits are rounded up to a byte and a 2-byte offset is kept per (row of
    packs, kv-head). Returns int64 [blocks]."""
    nb, N, F = codes.shape
    p = codes.reshape(nb, N // pack, pack, F)
    w = width_bits(p.max(2) - p.min(2))  # [nb, rows, F]
    meta = raw_bits + int(width_bits(np.array(raw_bits)))
    bits = (pack * w + meta).sum((1, 2))
    return (bits + 7) // 8 + 2 * (N // pack) * heads


def bitpack_payload_bits(codes: np.ndarray, pack: int) -> int:
    """The payload part of bitpack_bytes (pack * width bits per pack, no pack headers)."""
    nb, N, F = codes.shape
    p = codes.reshape(nb, N // pack, pack, F)
    return int((pack * width_bits(p.max(2) - p.min(2))).sum())


class PackKVCache(_BaselineCache):
    """PackKV (Jiang et al., arXiv 2512.24449): K and V quantized per token (one group per token
    over every kv-head's channels by default) with a step relative to the group's range, in
    blocks of t tokens; the tokens of a block permuted (one permutation for K and V, which
    attention does not see: RoPE is already in K) so that similar codes share packs of `pack`
    tokens; each pack bit-packed at its own width. The most recent tokens stay fp16 (a buffer of
    buf tokens flushed a block at a time).

    Bytes per block and tensor: bitpack_bytes, plus 4 bytes per group (step and minimum, fp16);
    plus the fp16 buffer. Repacking changes bytes only, never the decoded values."""

    def __init__(self, rel_k, rel_v, block=64, buffer=192, pack=16, repack="greedy",
                 kgroup="token", vgroup="token", name=None):
        if block % pack:
            raise ValueError("the block must hold whole packs")
        if buffer % block or buffer < block:
            raise ValueError("the fp16 buffer must be a positive multiple of the block")
        if repack not in ("greedy", "median", "none"):
            raise ValueError(f"repack {repack!r}: expected greedy, median or none")
        self.rel = {"key": rel_k, "value": rel_v}
        self.group = {"key": kgroup, "value": vgroup}
        for gname in self.group.values():
            if gname not in GROUP_AXES:
                raise ValueError(f"group {gname!r}: expected one of {sorted(GROUP_AXES)}")
        self.T, self.R, self.P, self.repack = block, buffer, pack, repack
        self.name = name or f"PackKV K{rel_k} V{rel_v}"

    def encode(self, k, v):
        """k, v [n, Hk, d] fp16 -> (decoded K, decoded V, [(per-block bytes) of K, of V]);
        None per-block bytes for a tensor kept fp16."""
        n, Hk, d = k.shape
        T = self.T
        nt = int(compressed_tokens(n, T, self.R))
        outs, codes = [k.copy(), v.copy()], [None, None]
        self.code_bytes = 0.0
        if not nt:
            return outs[0], outs[1], [np.zeros(0, np.int64)] * 2
        groups = [0, 0]
        for i, (kind, x) in enumerate((("key", k), ("value", v))):
            if self.rel[kind] is None:
                continue
            xb = x[:nt].astype(np.float32).reshape(nt // T, T, Hk, d)
            dec, c, _, groups[i] = quantize_groups(xb, self.rel[kind], self.group[kind])
            outs[i][:nt] = dec.reshape(nt, Hk, d).astype(np.float16)
            codes[i] = c.reshape(nt // T, T, Hk * d)
        present = [c for c in codes if c is not None]
        if self.repack == "greedy" and present:
            order = greedy_repack(np.concatenate(present, -1), self.P)
        elif self.repack == "median" and present:
            order = median_repack(present[-1])
        else:
            order = np.broadcast_to(np.arange(T), (nt // T, T))
        per_block = []
        for c, g in zip(codes, groups):
            if c is None:
                per_block.append(None)
                continue
            c = np.take_along_axis(c, order[..., None], axis=1)
            self.code_bytes += bitpack_payload_bits(c, self.P) / 8
            raw = max(1, int(width_bits(np.array(int(c.max())))))
            per_block.append(bitpack_bytes(c, self.P, raw, Hk) + g * META_BYTES)
        return outs[0], outs[1], per_block

    def attend(self, layer, q, k, v, window=0):
        n, Hk, d = k.shape
        row = Hk * d * F16
        k_hat, v_hat, per_block = self.encode(k, v)
        held, masks = [], []
        mask = _fp16_mask(n, self.T, self.R)
        fp16 = (n - int(compressed_tokens(n, self.T, self.R))) * row
        for x, pb in zip((k, v), per_block):
            if pb is None:
                held.append((x.nbytes, _prefix_sums(n) * row))
                masks.append(np.ones((n, n), dtype=bool))
                self.parts["fp16"] += x.nbytes
            else:
                held.append(_held_bytes(n, self.T, self.R, pb, 0, row))
                masks.append(mask)
                self.parts["fp16"] += fp16
                self.parts["metadata"] += held[-1][0] - fp16
        self.parts["codes"] += self.code_bytes
        self.parts["metadata"] -= self.code_bytes
        self._account(k, v, held)
        return masked_attention(q, k, v, k_hat, v_hat, masks[0], masks[1], window)
