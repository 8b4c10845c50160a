# SPDX-License-Identifier: Apache-2.0
"""The model's tokenizer, rebuilt from a GGUF file's vocabulary and merges.

tokenizer_from_gguf() gives a Hugging Face `tokenizers` byte-level BPE; ReferenceBPE is an
independent, slow and readable implementation of the same algorithm (regex pre-split, byte to
unicode map, lowest-rank merge first) that the tests compare it with.

Pre-tokenization follows tokenizer.ggml.pre: "smollm" (and the other GPT-2 style
pre-tokenizers that isolate single digits) split every digit on its own, then apply the GPT-2
pattern; "gpt2" applies the GPT-2 pattern alone.
"""
from __future__ import annotations

GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
_DIGIT_SPLIT = {"smollm", "starcoder", "refact", "codeshell"}
TOKEN_TYPE_CONTROL = 3


def _strings(field):
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def gguf_vocab(reader):
    """(tokens, merges, token_types, pre) from the GGUF metadata."""
    model = reader.fields["tokenizer.ggml.model"].contents()
    if model != "gpt2":
        raise ValueError(f"tokenizer model {model!r}: only byte-level BPE ('gpt2') is supported")
    tokens = _strings(reader.fields["tokenizer.ggml.tokens"])
    merges = _strings(reader.fields["tokenizer.ggml.merges"])
    tt = reader.fields.get("tokenizer.ggml.token_type")
    types = [int(tt.parts[i][0]) for i in tt.data] if tt is not None else [1] * len(tokens)
    pre_f = reader.fields.get("tokenizer.ggml.pre")
    pre = pre_f.contents() if pre_f is not None else "default"
    return tokens, merges, types, pre


def tokenizer_from_gguf(reader):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, AddedToken

    tokens, merges, types, pre = gguf_vocab(reader)
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL])
    return tok


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class ReferenceBPE:
    """Plain byte-level BPE over the GGUF vocabulary (no special-token handling)."""

    def __init__(self, reader):
        import regex

        tokens, merges, _, pre = gguf_vocab(reader)
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
        self.pat = regex.compile(GPT2_PATTERN)
        self.digits = regex.compile(r"\p{N}") if pre in _DIGIT_SPLIT else None
        self.b2u = _bytes_to_unicode()
        self.cache = {}

    def _bpe(self, word: str):
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            best, best_rank = None, None
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        ids = [self.vocab[p] for p in parts]
        self.cache[word] = ids
        return ids

    def _pieces(self, text: str):
        chunks = [text]
        if self.digits is not None:
            chunks = []
            last = 0
            for m in self.digits.finditer(text):
                if m.start() > last:
                    chunks.append(text[last:m.start()])
                chunks.append(m.group())
                last = m.end()
            if last < len(text):
                chunks.append(text[last:])
        for c in chunks:
            yield from self.pat.findall(c)

    def encode(self, text: str):
        out = []
        for piece in self._pieces(text):
            out += self._bpe("".join(self.b2u[b] for b in piece.encode("utf-8")))
        return out
