# SPDX-License-Identifier: Apache-2.0
"""Tests of the accuracy harness: attention semantics (no model), the tokenizer against an
independent BPE, the window forward pass against token-by-token decoding through a real
compressed cache, and a smoke run of the harness on a tiny slice of WikiText-2.

The model tests need the GGUF (scripts/setup-python.sh fetches it; set KVCOMP_SKIP_MODEL=1 to
skip them); the WikiText-2 text is the repository's copy (bench/accuracy/data)."""
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


def _naive_attention(q, k_for, v_for):
    """Per query t: keys/values as k_for(t, s), v_for(t, s) give them; plain softmax."""
    n, H, d = q.shape
    Hk = k_for(0, 0).shape[0]
    g = H // Hk
    out = np.zeros((n, H, d), np.float64)
    for t in range(n):
        ks = np.stack([k_for(t, s) for s in range(t + 1)])  # [t+1, Hk, d]
        vs = np.stack([v_for(t, s) for s in range(t + 1)])
        for h in range(H):
            sc = ks[:, h // g] @ q[t, h] / np.sqrt(d)
            p = np.exp(sc - sc.max())
            p /= p.sum()
            out[t, h] = p @ vs[:, h // g]
    return out


@pytest.mark.parametrize("mode", ["block", "window"])
def test_mixed_attention_matches_per_query_loop(mode):
    rng = np.random.default_rng(1)
    n, H, Hk, d, B = 45, 6, 2, 8, 8
    q = rng.standard_normal((n, H, d)).astype(np.float32)
    kf, vf, kq, vq = (rng.standard_normal((n, Hk, d)).astype(np.float32) for _ in range(4))
    if mode == "block":
        got = C.mixed_attention(q, kf, vf, kq, vq, k_block=B, v_block=B)
        k_for = lambda t, s: kf[s] if s // B == t // B else kq[s]  # noqa: E731
        v_for = lambda t, s: vf[s] if s // B == t // B else vq[s]  # noqa: E731
    else:
        got = C.mixed_attention(q, kf, vf, kq, vq, k_block=B, v_window=B)
        k_for = lambda t, s: kf[s] if s // B == t // B else kq[s]  # noqa: E731
        v_for = lambda t, s: vf[s] if t - s < B else vq[s]  # noqa: E731
    want = _naive_attention(q, k_for, v_for)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_kivi_quantizer_levels_and_bytes():
    x = np.random.default_rng(2).standard_normal((256, 2, 64)).astype(np.float32)
    for bits in (2, 4):
        y = C.quantize_minmax(x.reshape(8, 32, 2, 64), bits, axis=1).reshape(x.shape)
        per_group = len(np.unique(y.reshape(8, 32, 2, 64)[:, :, 0, 0][0]))
        assert per_group <= 2 ** bits
        rng = np.ptp(x.reshape(8, 32, 2, 64), axis=1).max()
        assert np.abs(y - x).max() <= rng / (2 ** bits - 1) * 0.51 + 1e-2
    kivi = C.KiviCache(2)
    kivi.begin_window(256)
    k = x.astype(np.float16)
    kivi.attend(0, np.zeros((256, 4, 64), np.float32), k, k)
    # K: 2 flushed R-chunks (256 tokens), V: 128 quantized + 128 fp16; 12 bytes per 32 elems.
    assert kivi.bytes == 256 * 2 * 2 * 12 + 128 * 2 * 2 * 12 + 128 * 2 * 64 * 2


needs_model = pytest.mark.skipif(os.environ.get("KVCOMP_SKIP_MODEL") == "1",
                                 reason="KVCOMP_SKIP_MODEL=1")


@pytest.fixture(scope="module")
def model():
    from model import Model
    return Model(modelfile.model_path())


@pytest.fixture(scope="module")
def text():
    return wikitext.load()


def test_wikitext_is_bundled_and_checked(text, tmp_path):
    assert len(text.encode("utf-8")) == 1290547
    assert text.startswith(" = Robert Boulter = \r\n")
    damaged = tmp_path / "wiki.test.raw"
    damaged.write_bytes(text.replace("Boulter", "Boulder", 1).encode("utf-8"))
    with pytest.raises(ValueError, match="SHA-256"):
        wikitext.load(damaged)


@needs_model
def test_text_tokenizes_as_stored(model, text):
    """Its \r\n line endings are tokens too: read in text mode (\r\n -> \n) the text gave
    301,948 ids, the first run's different token stream (docs/accuracy.md); as stored, 304,830."""
    assert len(model.tokenizer().encode(text).ids) == 304830


@needs_model
def test_tokenizer_matches_reference_bpe(model, text):
    pytest.importorskip("regex")
    from tokenizer import ReferenceBPE
    tok = model.tokenizer()
    ref = ReferenceBPE(model._reader)
    sample = text[:20000] + " 3.14159 x² café — naïve 日本語 \t tabs\n\n  spaces  "
    assert tok.encode(sample).ids == ref.encode(sample)
    assert tok.decode(tok.encode(sample).ids) == sample
    # Control tokens of the chat template are single tokens.
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2


@needs_model
def test_window_forward_equals_token_by_token_decoding(model, text):
    """The whole-window pass (cache.KvcompCache) gives each token the same view of the cache
    as a real decode loop over compressed blocks + fp16 tail (cache.GenerationCache)."""
    ids = np.array(model.tokenizer().encode(text[:3000]).ids[:132])
    for eb in (None, 0.3):
        if eb is None:
            win_pol, gen = C.FP16Cache(), C.GenerationCache(model.hp.n_layer, None)
        else:
            win_pol = C.KvcompCache(eb, 0.1, bound_mode={"key": "absolute", "value": "relative"})
            gen_kv = C.KvcompCache(eb, 0.1, bound_mode={"key": "absolute", "value": "relative"})
            gen = C.GenerationCache(model.hp.n_layer, gen_kv)
        win = model.forward(ids, win_pol)
        steps = np.stack([model.step(int(t), i, gen) for i, t in enumerate(ids)])
        tol = 2e-3 * np.abs(win).max()
        if eb is None:
            np.testing.assert_allclose(steps, win, rtol=0, atol=tol)
        else:
            # Before the first block is compressed both read fp16 only: equal to float noise.
            np.testing.assert_allclose(steps[:64], win[:64], rtol=0, atol=tol)
            # After, float noise between the two paths can move an element across a
            # quantization boundary (one step apart), so compare the predictions instead.
            lw, ls = harness.log_softmax(win[64:]), harness.log_softmax(steps[64:])
            kl = float((np.exp(lw) * (lw - ls)).sum(-1).mean())
            assert kl < 1e-3, kl
            assert (steps.argmax(-1) == win.argmax(-1)).mean() > 0.95


@needs_model
def test_fp16_perplexity_is_plausible(model, text):
    ids = np.array(model.tokenizer().encode(text[:20000]).ids[:512])
    lp = harness.log_softmax(model.forward(ids, C.FP16Cache())[:-1])
    ppl = float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))
    assert 5 < ppl < 40, ppl


@needs_model
def test_harness_smoke(model, text):
    ids = model.tokenizer().encode(text[:20000]).ids
    tiles = "kvcomp:k=0.2,v=0.05,kmode=abs,fmt=tiles,also=v1"
    res = harness.evaluate(model, ids, ["kvcomp:k=0.2,v=0.05,kmode=abs", "kivi:2", "int8",
                                        tiles], windows=1, window_tokens=256, progress=False)
    by = {r["setting"]: r for r in res}
    # Tiles (t1 blocks) decode to v1's values: the same predictions, fewer bytes saved.
    tv1 = by["kvcomp:k=0.2,v=0.05,kmode=abs"]
    assert by[tiles]["blocks"]["tiles"] == by[tiles]["blocks"]["blocks"] > 0
    assert tv1["ppl"] == by[tiles]["ppl"] and tv1["kl"] == by[tiles]["kl"]
    v1_variant = [r for r in res if r.get("pass_of") == tiles]
    assert len(v1_variant) == 1 and v1_variant[0]["mismatched_elements"] == 0
    assert 2 < by[tiles]["ratio"] < v1_variant[0]["ratio"]
    assert by["fp16"]["ratio"] == 1.0
    kv = by["kvcomp:k=0.2,v=0.05,kmode=abs"]
    assert kv["ratio"] > 3 and kv["tokens"] == 255
    assert 0 <= kv["kl"] < 0.2 and kv["top1"] > 0.8 and abs(kv["dppl_pct"]) < 10
    assert 1.8 < by["int8"]["ratio"] < 1.9 and by["int8"]["kl"] < 0.01
    assert "ratio" in harness.format_table(res)
    # Averaged over the window's prefixes, fp16 tails weigh in: below the end-of-window ratio.
    assert by["fp16"]["ratio_avg"] == 1.0
    assert 1.5 < kv["ratio_avg"] < kv["ratio"]
    assert by["kivi:2"]["ratio_avg"] < by["kivi:2"]["ratio"]
    assert abs(by["int8"]["ratio_avg"] - by["int8"]["ratio"]) < 1e-9


def _kvcomp(path, T=64):
    return C.KvcompCache(0.3, 0.1, block_tokens=T, path=path,
                         bound_mode={"key": "absolute", "value": "relative"})


def test_store_step_attention_equals_codec_step_attention():
    """No model: the same K, V and queries through GenerationCache (codec API, dense numpy
    attention) and StoreGenerationCache (kvc_store_append + kvc_store_attention): equal up to
    the store's fp16 queries and outputs and its unrounded fp32 reconstruction."""
    rng = np.random.default_rng(5)
    Hk, H, d, T, n = 3, 9, 64, 32, 100

    class Hp:
        n_layer = 2
    scale = np.linspace(0.5, 3.0, d)
    ks = (rng.standard_normal((n, 2, Hk, d)) * scale).astype(np.float16)
    vs = rng.standard_normal((n, 2, Hk, d)).astype(np.float16)
    qs = rng.standard_normal((n, 2, H, d)).astype(np.float32)
    codec_kv, store_kv = _kvcomp("codec", T), _kvcomp("store", T)
    store_kv.bind_model(Hp)
    a, b = C.generation_cache(2, codec_kv), C.generation_cache(2, store_kv)
    assert isinstance(a, C.GenerationCache) and isinstance(b, C.StoreGenerationCache)
    for t in range(n):
        for layer in range(2):
            k, v, q = ks[t, layer][None], vs[t, layer][None], qs[t, layer]
            want = a.attend_step(layer, q, k, v)
            got = b.attend_step(layer, q, k, v)
            np.testing.assert_allclose(got, want, rtol=0, atol=4e-3 * np.abs(want).max() + 1e-3,
                                       err_msg=f"step {t} layer {layer}")
    # Same blocks: the store's bytes are the codec's (same codebooks, same sub-streams).
    st = b.stats()
    assert st["num_blocks"] == 2 * (n // T) * Hk * 2
    np.testing.assert_array_equal(store_kv.read(0)[0][:n // T * T].astype(np.float32),
                                  a.done[0]["key"])
    assert abs(a.ratio() - b.ratio()) < 1e-12


@needs_model
def test_store_path_equals_codec_path_on_the_model(model, text):
    """The harness's kvcomp cache through the paged store (prefill + read-back) gives the same
    logits, bytes and block counts as through the codec API, bit for bit, over two windows (the
    second with the first's frozen codebooks); generation through the store (append +
    kvc_store_attention) follows generation through the codec API within float noise."""
    ids = np.array(model.tokenizer().encode(text[:5000]).ids[:400])
    codec, store = _kvcomp("codec"), _kvcomp("store")
    for w in range(2):
        x = ids[w * 200:(w + 1) * 200]
        np.testing.assert_array_equal(model.forward(x, store), model.forward(x, codec))
        assert (store.bytes, store.bytes_time, store.fp16_bytes, store.fp16_time) == \
            (codec.bytes, codec.bytes_time, codec.fp16_bytes, codec.fp16_time)
        assert store.stats == codec.stats
    st = store.store_stats
    assert st["num_sequences"] == 1 and st["dense_bytes"] == store.fp16_bytes
    # Generation: prompt prefilled through the window pass, then decode steps.
    gens = []
    for path in ("codec", "store"):
        kv = _kvcomp(path)
        cache = C.generation_cache(model.hp.n_layer, kv)
        prompt, forced = ids[:50], ids[50:110]
        rows = {}
        logits = [model.forward(prompt, kv,
                                kv_hook=lambda li, k, v: rows.__setitem__(li, (k, v)))[-1]]
        if path == "codec":  # the store path's window pass has prefilled the store already
            for li, (k, v) in rows.items():
                for i in range(len(k)):
                    cache.append(li, k[i:i + 1], v[i:i + 1])
        for i, t in enumerate(forced):
            logits.append(model.step(int(t), 50 + i, cache))
        gens.append(np.stack(logits))
    a, b = gens
    tol = 2e-3 * np.abs(a).max()
    # Up to token 63 nothing is compressed: only the store's fp16 queries/outputs differ.
    np.testing.assert_allclose(b[:14], a[:14], rtol=0, atol=tol)
    # After, float noise can move an element across a quantization boundary.
    la, lb = harness.log_softmax(a), harness.log_softmax(b)
    kl = (np.exp(la) * (la - lb)).sum(-1)
    assert kl.mean() < 1e-3, kl.mean()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("block_format", ["v1", "tiles"])
def test_replay_of_the_recorded_decode_on_the_cpu_store(block_format):
    """The recorded real-model decode (bench/accuracy/data/smollm2_decode.npz) through the CPU
    store twice, per block format: identical outputs (what the GPU check holds the CUDA store
    to, within its tolerance); the last step's outputs against dense attention over the store's
    read-back."""
    import replay_kv
    rec = replay_kv.load()
    config = replay_kv.FORMATS[block_format]
    a, b = replay_kv.replay(rec, "cpu", **config), replay_kv.replay(rec, "cpu", **config)
    np.testing.assert_array_equal(a["out"], b["out"])
    assert replay_kv.compare(a["out"], b["out"]) == 0.0
    steps, L = rec["step_q"].shape[:2]
    assert a["lengths"] == [rec["prompt_k"].shape[1] + steps, replay_kv.SHORT_PROMPT + steps]
    for layer in range(L):
        q = rec["step_q"][steps - 1, layer].astype(np.float32)
        for s in range(2):
            k, v = a["readback"][layer][s]
            want = C.dense_step_attention(q, k, v)
            got = a["out"][steps - 1, layer, s].astype(np.float32)
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())
    assert replay_kv.main(["--formats", block_format]) == 0
