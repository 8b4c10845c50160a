#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Tests of the Python module (python/tests) and the accuracy harness (bench/accuracy/tests,
# including a smoke run of the harness on a tiny slice of WikiText-2 with the real model).
# Builds libkvcomp.so when missing (Release, library only, in build-py), sets up .venv and the
# model (scripts/setup-python.sh), then runs pytest. Extra arguments go to pytest.
#   KVCOMP_LIBRARY    use this libkvcomp.so instead of building one
#   KVCOMP_PY_BUILD_DIR  build directory (default: build-py in the repository root)
#   KVCOMP_WIKITEXT   another copy of wiki.test.raw (default: bench/accuracy/data/, SHA-256 checked)
#   KVCOMP_GEMMA=1    also the second model's checks (Gemma 3 270M: fetched, 253 MB; a few
#                     minutes more), e.g. KVCOMP_GEMMA=1 scripts/python-tests.sh -k gemma
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/build-python-lib.sh
source "$root/scripts/build-python-lib.sh"
bash "$root/scripts/setup-python.sh"
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider python/tests bench/accuracy/tests "$@"
