# SPDX-License-Identifier: Apache-2.0
"""The WikiText-2 (raw) test split that the harness evaluates on: carried in the repository
(data/wiki.test.raw.xz, see data/README.md for its license) and checked by SHA-256 on load."""
from __future__ import annotations

import hashlib
import lzma
import os
from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "data" / "wiki.test.raw.xz"
SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"


def load(path: Path | str | None = None) -> str:
    """The test split as text. `path` (or $KVCOMP_WIKITEXT) names another copy, raw or .xz;
    any copy must hash to SHA256, so every run evaluates the same text."""
    path = Path(path or os.environ.get("KVCOMP_WIKITEXT") or BUNDLED)
    raw = path.read_bytes()
    if path.suffix == ".xz":
        raw = lzma.decompress(raw)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256:
        raise ValueError(f"{path}: SHA-256 {digest} is not the WikiText-2 test split's {SHA256}")
    return raw.decode("utf-8")
