# SPDX-License-Identifier: Apache-2.0
"""The model's tokenizer, rebuilt from a GGUF file's vocabulary (and merges, or scores).

Two kinds, after tokenizer.ggml.model:
- "gpt2" (SmolLM2): tokenizer_from_gguf() gives a Hugging Face `tokenizers` byte-level BPE;
  ReferenceBPE is an independent, slow and readable implementation of the same algorithm
  (regex pre-split, byte to unicode map, lowest-rank merge first) that the tests compare it
  with.
- "llama" (SentencePiece BPE with byte fallback; Gemma 3): tokenizer_from_gguf() gives a
  `tokenizers` BPE whose merges are derived from the vocabulary's scores (every split of a
  piece into two pieces, ranked by the whole piece's score), spaces mapped to U+2581, the
  user-defined pieces (newline, space and tab runs, ...) and control pieces matched first on
  the raw text; ReferenceSPM is the independent one: SentencePiece's own rule (repeatedly merge
  the adjacent pair whose concatenation is the highest-scoring piece), then byte fallback.

Pre-tokenization follows tokenizer.ggml.pre: "smollm" (and the other GPT-2 style
pre-tokenizers that isolate single digits) split every digit on its own, then apply the GPT-2
pattern; "gpt2" applies the GPT-2 pattern alone.
"""
from __future__ import annotations

GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
_DIGIT_SPLIT = {"smollm", "starcoder", "refact", "codeshell"}
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
SPM_SPACE = "\u2581"


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


def spm_vocab(reader):
    """(tokens, scores, token_types) of a SentencePiece ("llama") vocabulary."""
    model = reader.fields["tokenizer.ggml.model"].contents()
    if model != "llama":
        raise ValueError(f"tokenizer model {model!r}: not SentencePiece ('llama')")
    tokens = _strings(reader.fields["tokenizer.ggml.tokens"])
    sc = reader.fields["tokenizer.ggml.scores"]
    tt = reader.fields["tokenizer.ggml.token_type"]
    return (tokens, [float(sc.parts[i][0]) for i in sc.data],
            [int(tt.parts[i][0]) for i in tt.data])


def spm_merges(tokens, scores, types):
    """BPE merges equivalent to SentencePiece's score rule: (a, b) for every normal piece
    a + b whose parts are normal pieces, best-scoring result first."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == TOKEN_TYPE_NORMAL}
    merges = []
    for p, i in normal.items():
        for j in range(1, len(p)):
            if p[:j] in normal and p[j:] in normal:
                merges.append((-scores[i], i, j, p[:j], p[j:]))
    merges.sort()
    return [(a, b) for *_, a, b in merges]


def _spm_tokenizer(reader):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tokens, scores, types = spm_vocab(reader)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk = reader.fields.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types),
                     unk_token=tokens[int(unk.contents())] if unk is not None else None,
                     fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", SPM_SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL])
    return tok


def tokenizer_from_gguf(reader):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, AddedToken

    if reader.fields["tokenizer.ggml.model"].contents() == "llama":
        return _spm_tokenizer(reader)
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


class ReferenceSPM:
    """Plain SentencePiece BPE over the GGUF vocabulary: user-defined and control pieces
    matched first (longest at each position) on the raw text; each stretch between them with
    spaces as U+2581, split into characters, then the adjacent pair whose concatenation is the
    highest-scoring normal piece merged (leftmost on ties) until none is; a symbol that is not a
    piece becomes its UTF-8 bytes (<0xXX> pieces)."""

    def __init__(self, reader):
        tokens, scores, types = spm_vocab(reader)
        self.normal = {}
        self.special = {}
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty == TOKEN_TYPE_NORMAL:
                self.normal.setdefault(t, (scores[i], i))
            elif ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
                self.special.setdefault(t, i)
        self.by_first = {}
        for t in self.special:
            self.by_first.setdefault(t[0], []).append(t)
        for c in self.by_first.values():
            c.sort(key=len, reverse=True)
        self.bytes = {t: i for i, t in enumerate(tokens) if len(t) == 6 and t.startswith("<0x")}
        self.unk = tokens.index("<unk>") if "<unk>" in tokens else None

    def _merge(self, text: str):
        import heapq

        sym = list(text.replace(" ", SPM_SPACE))
        n = len(sym)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []

        def push(i):
            j = nxt[i]
            if j < n:
                hit = self.normal.get(sym[i] + sym[j])
                if hit is not None:
                    heapq.heappush(heap, (-hit[0], i, sym[i], sym[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i] if i < n and alive[i] else n
            if j >= n or sym[i] != a or sym[j] != b:
                continue  # stale: one side has merged since
            sym[i] = a + b
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        out = []
        i = 0
        while i < n:
            p = self.normal.get(sym[i])
            if p is not None:
                out.append(p[1])
            else:
                out += [self.bytes[f"<0x{b:02X}>"] for b in sym[i].encode("utf-8")]
            i = nxt[i]
        return out

    def encode(self, text: str):
        out = []
        start = i = 0
        while i < len(text):
            for t in self.by_first.get(text[i], ()):
                if text.startswith(t, i):
                    if i > start:
                        out += self._merge(text[start:i])
                    out.append(self.special[t])
                    i += len(t)
                    start = i
                    break
            else:
                i += 1
        if start < len(text):
            out += self._merge(text[start:])
        return out
