#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The project's test command: installs the build tools it lacks (apt-get, Debian/Ubuntu),
# configures a Release build in build/ with the CUDA backend when nvcc is found, builds every
# target and runs ctest; then the Python tests (scripts/python-tests.sh: the binding, and the
# accuracy harness on a tiny slice of WikiText-2 with the real model, set up on first use).
# Idempotent; works from any directory. GPU tests skip without a GPU.
#
#   ./scripts/test.sh [extra CMake configure arguments, e.g. -DKVC_ENABLE_CUDA=OFF]
#
# Environment:
#   KVC_BUILD_DIR       build directory (default: build/ in the repository root)
#   KVC_BUILD_TYPE      CMake build type (default: Release)
#   KVC_JOBS            parallel build and test jobs (default: 2)
#   KVC_EXTRA_PACKAGES  more Debian packages to install when missing (used by .ci/run)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${KVC_BUILD_DIR:-$root/build}"
build_type="${KVC_BUILD_TYPE:-Release}"
jobs="${KVC_JOBS:-2}"

log() { echo "test.sh: $*"; }

# ---- Tools: installed only when missing, with one apt-get update ----------------------------
# shellcheck source=scripts/lib/packages.sh
source "$root/scripts/lib/packages.sh"
read -r -a extra <<< "${KVC_EXTRA_PACKAGES:-}"
kvc_require_packages cmake ninja-build g++ libgtest-dev libbenchmark-dev pkg-config clang \
  "${extra[@]}"

# ---- Configure, build, test --------------------------------------------------------------------
kvc_configure "$root" "$build" \
  -DCMAKE_BUILD_TYPE="$build_type" \
  -DKVC_ENABLE_CUDA=AUTO \
  -DKVC_BUILD_TESTS=ON -DKVC_BUILD_BENCH=ON -DKVC_BUILD_EXAMPLES=ON \
  "$@"
cmake --build "$build" --config "$build_type" --parallel "$jobs"
ctest --test-dir "$build" --build-config "$build_type" --output-on-failure --parallel "$jobs"

# ---- The Python module and the accuracy harness (smoke run on the real model) ----------------
log "Python tests (the binding over this build's libkvcomp.so, the harness on a tiny slice)"
KVCOMP_LIBRARY="$build/src/libkvcomp.so" "$root/scripts/python-tests.sh"
