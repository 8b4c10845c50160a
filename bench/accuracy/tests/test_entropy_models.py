# SPDX-License-Identifier: Apache-2.0
"""entropy_models.py: its model of today's blocks is the library's, byte for byte; the ideal
entropy it reports is below the Huffman cost; the RoPE rotating centre follows a rotating key.
A few seconds, no model (the real KV dump in tests/data)."""
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[2] / "python")]

import entropy_models as em  # noqa: E402

KEY, VALUE = em.KEY, em.VALUE


@pytest.fixture(scope="module")
def raw():
    return em.load()


def today_bytes(blocks):
    symbols, context, side = em.today(blocks)
    books = em.codebooks(symbols, context, blocks)
    return em.block_bytes(em.huffman_bits(symbols, context, blocks, books), blocks, side)


@pytest.mark.parametrize("kind, bound", [(KEY, 0.25), (VALUE, 0.07), (KEY, 0.15)])
def test_today_model_is_the_library_encoder(raw, kind, bound):
    """Two blocks per head of the middle layer: one calibrates the codebook, one is measured."""
    tokens = raw[1, kind, :128]
    blocks = em.quantize(tokens, kind, 64, bound)
    mine = today_bytes(blocks)
    assert mine.shape == (em.HEADS, 1)
    np.testing.assert_array_equal(mine, em.library_block_bytes(tokens, kind, 64, bound))


def test_escapes_and_their_width_match_the_library():
    """A measured half far wider than the calibration half: many symbols are escaped, and the
    escape width of each block must be counted as the library writes it."""
    rng = np.random.default_rng(3)
    tokens = rng.laplace(size=(64, 2, 64)).astype(np.float16).astype(np.float32)
    tokens[32:] *= 40
    blocks = em.quantize(tokens, KEY, 32, 0.1)
    symbols = blocks.symbols
    _, escaped = em.Codebook(symbols[:, :1]).cost(symbols[:, 1:])
    assert escaped.mean() > 0.2
    np.testing.assert_array_equal(today_bytes(blocks),
                                  em.library_block_bytes(tokens, KEY, 32, 0.1))


@pytest.mark.parametrize("model", ["today", "per_channel", "classes8", "delta"])
def test_ideal_entropy_is_below_the_huffman_cost(raw, model):
    """The measured half's own entropy bounds any code fixed beforehand, but not by much."""
    blocks = em.quantize(raw[2, KEY], KEY, 64, 0.25)
    symbols, context, _ = em.MODELS[model][1](blocks)
    books = em.codebooks(symbols, context, blocks)
    huffman = em.huffman_bits(symbols, context, blocks, books).mean()
    ideal = em.ideal_bits(symbols, context, blocks).mean()
    assert 0 < ideal < huffman < ideal + 1


def rope(vector, positions):
    """Hugging Face rotate-half RoPE of one vector at each position -> [positions, D]."""
    half = vector.size // 2
    angle = np.outer(positions, em.rope_angles(vector.size))
    x, y = vector[:half], vector[half:]
    return np.concatenate([x * np.cos(angle) - y * np.sin(angle),
                           y * np.cos(angle) + x * np.sin(angle)], axis=1)


def test_rotating_centre_follows_a_rotating_key():
    """K rows that are one vector turned by RoPE, at positions 1000..1063: the rotating centre
    predicts every code to within rounding, while the plain channel centres leave the spread
    of the fast-turning channels."""
    rng = np.random.default_rng(7)
    rows = rope(rng.normal(size=64) * 4, np.arange(1000, 1064)).astype(np.float32)
    blocks = em.quantize(rows[:, None, :], KEY, 64, 0.05)
    symbols, _, _ = em.rope_centre(blocks)
    assert np.abs(symbols).max() <= 3 and symbols.std() < 1
    assert blocks.symbols.std() > 10
