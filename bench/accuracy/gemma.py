# SPDX-License-Identifier: Apache-2.0
"""Gemma 3 (text) read from a GGUF file: the harness's second architecture, a numpy forward
pass built on model.Model's steps (same window pass, decode step, cache policies).

What differs from Llama, from the public model card / configuration of Gemma 3 and the GGUF's
own metadata (gemma3.* keys):
- embeddings scaled by sqrt(n_embd); tied output (no output.weight);
- a head_dim (key_length) of 256 that need not be n_embd / n_head, and grouped-query attention
  (Gemma 3 270M: 4 query heads on 1 KV head);
- QK normalization: RMSNorm over each head's q and k (attn_q_norm, attn_k_norm) before RoPE;
- interleaved local and global layers: local layers attend over a sliding window
  (gemma3.attention.sliding_window) and rotate with RoPE base 10000, global layers attend
  over everything with gemma3.rope.freq_base; one global layer after every five local ones
  (layers 5, 11, 17 of 18) unless the metadata gives the pattern;
- pre and post norms around attention and the feed-forward (attn_norm, post_attention_norm,
  ffn_norm, post_ffw_norm);
- GeGLU feed-forward (tanh-approximated GELU of the gate times up);
- final logit soft-capping when the metadata has gemma3.final_logit_softcapping (Gemma 3's
  configuration has none).
The GGUF's norm weights already include Gemma's "1 +" (llama.cpp's converter adds it), so they
multiply as stored; its Q/K rows are in the rotate-half (NEOX) order, so they are not permuted.
Attention scales scores by 1/sqrt(head_dim) (Gemma 3 270M's query_pre_attn_scalar is 256, its
head_dim).

Sequences start with <bos> (the GGUF's tokenizer.ggml.add_bos_token): forward() prefixes each
window with it and returns the logits of the window's own tokens, and step() at pos 0 feeds it
first; the cache holds it like any token (so a window of n tokens caches n + 1). Positions
given to step() count the text's tokens. Without <bos> Gemma 3 270M's perplexity on WikiText-2
is about 2.4x higher (measured on one 512-token slice: 34.9 against 14.3).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from model import Model, _field, load_tensors, read_hparams

SWA_PATTERN = 6            # layers per group: 5 local, then 1 global
ROPE_BASE_LOCAL = 10000.0  # RoPE base of the local (sliding-window) layers


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) *
                                    (x + np.float32(0.044715) * x * x * x)))


class Gemma3Model(Model):
    def __init__(self, path: str | Path, reader=None):
        from gguf import GGUFReader

        r = reader if reader is not None else GGUFReader(str(path))
        a = _field(r, "general.architecture")
        if a != "gemma3":
            raise ValueError(f"{path}: architecture {a!r}, expected 'gemma3'")
        if r.fields.get(f"{a}.attn_logit_softcapping") is not None:
            raise ValueError("attention logit soft-capping is not implemented")
        n_layer = int(_field(r, f"{a}.block_count"))
        pattern = int(_field(r, f"{a}.attention.sliding_window_pattern", SWA_PATTERN))
        self.hp = read_hparams(
            r, a, sliding_window=int(_field(r, f"{a}.attention.sliding_window")),
            swa_layers=tuple(i for i in range(n_layer) if (i + 1) % pattern != 0),
            rope_base_local=float(_field(r, f"{a}.rope.freq_base_swa", ROPE_BASE_LOCAL)))
        hp = self.hp
        if hp.rope_dim != hp.head_dim:
            raise ValueError("partial RoPE is not implemented")
        cap = r.fields.get(f"{a}.final_logit_softcapping")
        self.softcap = float(cap.contents()) if cap is not None else None
        t = load_tensors(r)
        self.tok_embd = t["token_embd.weight"]                 # [n_vocab, n_embd]
        self.output = t.get("output.weight", self.tok_embd)    # tied
        self.output_T = self.output.T                          # a view: BLAS reads it as is
        self.output_norm = t["output_norm.weight"]
        self.embd_scale = np.float32(np.sqrt(hp.n_embd))
        self.layers = []
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            self.layers.append(dict(
                attn_norm=t[p + "attn_norm.weight"],
                wqkv=np.ascontiguousarray(np.concatenate(
                    [t[p + "attn_q.weight"], t[p + "attn_k.weight"], t[p + "attn_v.weight"]],
                    0).T),
                q_norm=t[p + "attn_q_norm.weight"],
                k_norm=t[p + "attn_k_norm.weight"],
                wo=np.ascontiguousarray(t[p + "attn_output.weight"].T),
                post_attn_norm=t[p + "post_attention_norm.weight"],
                ffn_norm=t[p + "ffn_norm.weight"],
                w13=np.ascontiguousarray(
                    np.concatenate([t[p + "ffn_gate.weight"], t[p + "ffn_up.weight"]], 0).T),
                w2=np.ascontiguousarray(t[p + "ffn_down.weight"].T),
                post_ffw_norm=t[p + "post_ffw_norm.weight"],
            ))
        self._reader = r
        self._rope_cache = {}
        add_bos = r.fields.get("tokenizer.ggml.add_bos_token")
        self.bos = (int(_field(r, "tokenizer.ggml.bos_token_id"))
                    if add_bos is not None and add_bos.contents() else None)

    def forward(self, tokens, policy, kv_hook=None):
        if self.bos is None:
            return super().forward(tokens, policy, kv_hook)
        x = np.concatenate([[self.bos], np.asarray(tokens, dtype=np.int64)])
        return super().forward(x, policy, kv_hook)[1:]

    def step(self, token, pos, cache, hidden=False):
        if self.bos is None:
            return super().step(token, pos, cache, hidden)
        if pos == 0:
            super().step(self.bos, 0, cache, hidden=True)
        return super().step(token, pos + 1, cache, hidden)

    def is_local(self, li: int) -> bool:
        return li in self.hp.swa_layers

    def _embed(self, tokens):
        return self.tok_embd[tokens] * self.embd_scale

    def _qkv(self, li, L, x, offset=0):
        hp, n = self.hp, len(x)
        H, Hk, d = hp.n_head, hp.n_head_kv, hp.head_dim
        cos, sin = self._rope(n, offset,
                              hp.rope_base_local if self.is_local(li) else hp.rope_base)
        qkv = self._rms(x, L["attn_norm"]) @ L["wqkv"]
        q = self._rms(qkv[:, : H * d].reshape(n, H, d), L["q_norm"])
        k = self._rms(qkv[:, H * d: (H + Hk) * d].reshape(n, Hk, d), L["k_norm"])
        return (self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin),
                qkv[:, (H + Hk) * d:].reshape(n, Hk, d))

    def _block_out(self, L, x, attn):
        h = x + self._rms(attn @ L["wo"], L["post_attn_norm"])
        gu = self._rms(h, L["ffn_norm"]) @ L["w13"]
        g, u = gu[:, : self.hp.n_ff], gu[:, self.hp.n_ff:]
        return h + self._rms((_gelu_tanh(g) * u) @ L["w2"], L["post_ffw_norm"])

    def _logits(self, x):
        y = self._rms(x, self.output_norm) @ self.output_T
        if self.softcap:
            y = np.tanh(y / self.softcap) * self.softcap
        return y
