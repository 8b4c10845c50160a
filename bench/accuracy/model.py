# SPDX-License-Identifier: Apache-2.0
"""A Llama-architecture model read from a GGUF file: weights (dequantized to float32), the
tokenizer built from the GGUF's own vocabulary and merges, and a numpy reference forward pass
over one window whose attention reads the KV cache through a pluggable cache policy
(cache.py): fp16, kvcomp-compressed, KIVI, int8.

Hyperparameters come from the GGUF metadata (llama.* keys); nothing about SmolLM2 is assumed
beyond the Llama architecture. The forward pass is written as steps (embedding, q/k/v, block
output, logits) that gemma.py's Gemma 3 overrides; load() picks the class from the file's
general.architecture.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Hparams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int
    rope_base: float
    rms_eps: float
    n_vocab: int
    context_length: int
    name: str
    # Sliding-window attention (Gemma 3): window (tokens, 0 = none) and which layers use it;
    # those layers rotate with rope_base_local.
    sliding_window: int = 0
    swa_layers: tuple = ()
    rope_base_local: float = 0.0


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise KeyError(f"GGUF metadata lacks {key}")
        return default
    return f.contents()


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF (llama.cpp's converter) stores Q and K rows of each head interleaved (pairs
    (2j, 2j+1) rotate together); the Hugging Face layout has halves (j, j + d/2). Undo it, so
    that K is the model's own (HF) key layout and RoPE is the rotate-half form."""
    out, inp = w.shape
    d = out // n_head
    return w.reshape(n_head, d // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def read_hparams(r, a: str, **extra) -> Hparams:
    """The hyperparameters under the GGUF's `a.*` keys (a: the architecture)."""
    n_embd = int(_field(r, f"{a}.embedding_length"))
    n_head = int(_field(r, f"{a}.attention.head_count"))
    head_dim = int(_field(r, f"{a}.attention.key_length", n_embd // n_head))
    return Hparams(
        n_layer=int(_field(r, f"{a}.block_count")),
        n_embd=n_embd,
        n_ff=int(_field(r, f"{a}.feed_forward_length")),
        n_head=n_head,
        n_head_kv=int(_field(r, f"{a}.attention.head_count_kv", n_head)),
        head_dim=head_dim,
        rope_dim=int(_field(r, f"{a}.rope.dimension_count", head_dim)),
        rope_base=float(_field(r, f"{a}.rope.freq_base", 10000.0)),
        rms_eps=float(_field(r, f"{a}.attention.layer_norm_rms_epsilon")),
        n_vocab=len(r.fields["tokenizer.ggml.tokens"].data),
        context_length=int(_field(r, f"{a}.context_length")),
        name=str(_field(r, "general.name", "?")),
        **extra,
    )


def load_tensors(reader) -> dict:
    """Every tensor of the GGUF, dequantized (gguf.quants) to float32, in numpy's row-major
    shape (GGUF lists dimensions fastest first)."""
    from gguf.quants import dequantize

    t = {}
    for x in reader.tensors:
        w = dequantize(x.data, x.tensor_type)
        t[x.name] = np.ascontiguousarray(w.reshape([int(s) for s in reversed(x.shape)]),
                                         dtype=np.float32)
    return t


def load(path: str | Path):
    """The model of a GGUF file: Model (llama) or gemma.Gemma3Model (gemma3)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = _field(r, "general.architecture")
    if arch == "gemma3":
        from gemma import Gemma3Model
        return Gemma3Model(path, reader=r)
    return Model(path, reader=r)


class Model:
    def __init__(self, path: str | Path, reader=None):
        from gguf import GGUFReader

        r = reader if reader is not None else GGUFReader(str(path))
        arch = _field(r, "general.architecture")
        if arch != "llama":
            raise ValueError(f"{path}: architecture {arch!r}, this reference supports 'llama'")
        self.hp = read_hparams(r, arch)
        hp = self.hp
        if hp.rope_dim != hp.head_dim:
            raise ValueError("partial RoPE is not implemented")
        t = load_tensors(r)
        self.tok_embd = t["token_embd.weight"]                 # [n_vocab, n_embd]
        self.output = t.get("output.weight", self.tok_embd)    # tied embeddings if absent
        self.output_T = np.ascontiguousarray(self.output.T)    # [n_embd, n_vocab]
        self.output_norm = t["output_norm.weight"]
        self.layers = []
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            wq = _unpermute_rope_rows(t[p + "attn_q.weight"], hp.n_head)
            wk = _unpermute_rope_rows(t[p + "attn_k.weight"], hp.n_head_kv)
            wv = t[p + "attn_v.weight"]
            self.layers.append(dict(
                attn_norm=t[p + "attn_norm.weight"],
                # One fused [n_embd, (H + 2 Hkv) * d] projection: x @ wqkv -> q | k | v.
                wqkv=np.ascontiguousarray(np.concatenate([wq, wk, wv], 0).T),
                wo=np.ascontiguousarray(t[p + "attn_output.weight"].T),
                ffn_norm=t[p + "ffn_norm.weight"],
                w13=np.ascontiguousarray(
                    np.concatenate([t[p + "ffn_gate.weight"], t[p + "ffn_up.weight"]], 0).T),
                w2=np.ascontiguousarray(t[p + "ffn_down.weight"].T),
            ))
        self._reader = r
        self._rope_cache = {}

    # ---- tokenizer --------------------------------------------------------------------------
    def tokenizer(self):
        from tokenizer import tokenizer_from_gguf
        return tokenizer_from_gguf(self._reader)

    # ---- forward ----------------------------------------------------------------------------
    def _rope(self, n: int, offset: int = 0, base: float | None = None):
        """cos, sin [n, 1, head_dim] of positions offset..offset+n-1 (rotate-half layout)."""
        base = self.hp.rope_base if base is None else base
        key = (n, offset, base)
        if key not in self._rope_cache:
            d = self.hp.head_dim
            inv_freq = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
            ang = np.arange(offset, offset + n, dtype=np.float64)[:, None] * inv_freq[None, :]
            cos = np.cos(ang).astype(np.float32)
            sin = np.sin(ang).astype(np.float32)
            if len(self._rope_cache) > 8:
                self._rope_cache.clear()
            self._rope_cache[key] = (np.concatenate([cos, cos], 1)[:, None, :],
                                     np.concatenate([sin, sin], 1)[:, None, :])
        return self._rope_cache[key]

    @staticmethod
    def _apply_rope(x, cos, sin):
        h = x.shape[-1] // 2
        rot = np.concatenate([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin

    def _rms(self, x, w):
        var = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(var + self.hp.rms_eps) * w

    def _qkv(self, li, L, x, offset=0):
        """Layer li's (L's) q, k (both with RoPE) and v of x [n, n_embd] at positions offset..:
        [n, heads, head_dim]."""
        hp, n = self.hp, len(x)
        H, Hk, d = hp.n_head, hp.n_head_kv, hp.head_dim
        cos, sin = self._rope(n, offset)
        qkv = self._rms(x, L["attn_norm"]) @ L["wqkv"]
        q = self._apply_rope(qkv[:, : H * d].reshape(n, H, d), cos, sin)
        k = self._apply_rope(qkv[:, H * d: (H + Hk) * d].reshape(n, Hk, d), cos, sin)
        return q, k, qkv[:, (H + Hk) * d:].reshape(n, Hk, d)

    def _embed(self, tokens):
        return self.tok_embd[tokens]

    def _block_out(self, L, x, attn):
        """The residual stream after the layer, from x and its attention output [n, H*d]."""
        return self._mlp(L, x + attn @ L["wo"])

    def _logits(self, x):
        return self._rms(x, self.output_norm) @ self.output_T

    def _attend_kw(self, li: int, n: int) -> dict:
        """Extra arguments of the cache policy's attend for layer li when n tokens are cached:
        the sliding window where one applies (only then, so that policies without it still
        serve models without it)."""
        hp = self.hp
        if hp.sliding_window and li in hp.swa_layers and n > hp.sliding_window:
            return {"window": hp.sliding_window}
        return {}

    def _mlp(self, L, x):
        """x plus layer L's SwiGLU feed-forward of it."""
        gu = self._rms(x, L["ffn_norm"]) @ L["w13"]
        g, u = gu[:, : self.hp.n_ff], gu[:, self.hp.n_ff:]
        return x + ((g / (1.0 + np.exp(-g))) * u) @ L["w2"]

    def forward(self, tokens: np.ndarray, policy, kv_hook=None) -> np.ndarray:
        """Logits [n, n_vocab] (float32) of one window that starts a fresh sequence.

        policy.attend(layer, q, k, v) -> [n, n_head, head_dim] implements attention over the
        KV cache as generation would see it (cache.py). kv_hook(layer, k, v), if given, sees
        each layer's fp16-rounded K and V [n, n_head_kv, head_dim] (used for the KV dump)."""
        n = len(tokens)
        x = self._embed(tokens)
        if hasattr(policy, "bind_model"):
            policy.bind_model(self.hp)
        policy.begin_window(n)
        for li, L in enumerate(self.layers):
            q, k, v = self._qkv(li, L, x)
            # The cache holds fp16 K/V (the baseline is an fp16 cache).
            k = k.astype(np.float16)
            v = v.astype(np.float16)
            if kv_hook is not None:
                kv_hook(li, k, v)
            attn = policy.attend(li, q, k, v, **self._attend_kw(li, n))
            x = self._block_out(L, x, attn.reshape(n, -1))
        return self._logits(x)

    # ---- generation -------------------------------------------------------------------------
    def step(self, token: int, pos: int, cache, hidden: bool = False) -> np.ndarray:
        """One decoding step: the new token at position pos attends to cache (cache.py:
        GenerationCache or StoreGenerationCache, which it is appended to first). Returns the
        logits [n_vocab], or with hidden the last layer's output [n_embd] (logits() of a stack
        of them: one matrix product instead of one pass over the output matrix per step)."""
        hp = self.hp
        x = self._embed(np.array([token]))
        for li, L in enumerate(self.layers):
            q, k, v = self._qkv(li, L, x, pos)
            attn = cache.attend_step(li, q[0], k.astype(np.float16), v.astype(np.float16),
                                     **self._attend_kw(li, pos + 1))
            x = self._block_out(L, x, attn.reshape(1, hp.n_head * hp.head_dim))
        return x[0] if hidden else self._logits(x)[0]

    def logits(self, h: np.ndarray) -> np.ndarray:
        """Logits [n, n_vocab] of last-layer outputs h [n, n_embd] (step(hidden=True))."""
        return self._logits(h)

    def generate(self, prompt_ids, max_new_tokens, cache, stop_ids=(), on_token=None,
                 on_step=None, prefill_policy=None):
        """Greedy decoding. The prompt is either fed token by token (every token goes through
        the cache as in a decode loop) or, with prefill_policy (cache.py; for kvcomp the
        KvcompCache whose codecs `cache` uses), run as one window whose K/V then fill the
        cache: the same view of the past for every token, in one pass. Returns the new ids.
        on_token(id) sees each generated token, on_step() each forward step."""
        logits = None
        if prefill_policy is not None and getattr(cache, "kv", None) is prefill_policy \
                and getattr(prefill_policy, "path", None) == "store":
            # The window pass prefills the prompt into the store the cache continues.
            logits = self.forward(np.asarray(prompt_ids), prefill_policy)[-1]
            if on_step:
                on_step()
        elif prefill_policy is not None:
            kvs = {}
            logits = self.forward(np.asarray(prompt_ids), prefill_policy,
                                  kv_hook=lambda li, k, v: kvs.__setitem__(li, (k, v)))[-1]
            for li, (k, v) in kvs.items():
                for i in range(len(k)):
                    cache.append(li, k[i:i + 1], v[i:i + 1])
            if on_step:
                on_step()
        else:
            for pos, t in enumerate(prompt_ids):
                logits = self.step(int(t), pos, cache)
                if on_step:
                    on_step()
        out = []
        pos = len(prompt_ids)
        for _ in range(max_new_tokens):
            t = int(np.argmax(logits))
            if t in stop_ids:
                break
            out.append(t)
            if on_token:
                on_token(t)
            logits = self.step(t, pos, cache)
            if on_step:
                on_step()
            pos += 1
        return out
