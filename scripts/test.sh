#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The project's test command: installs the build tools it lacks (apt-get, Debian/Ubuntu),
# configures a Release build in build/ with the CUDA backend when nvcc is found, builds every
# target and runs ctest. Idempotent; works from any directory. GPU tests skip without a GPU.
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
packages=(cmake ninja-build g++ libgtest-dev libbenchmark-dev pkg-config clang)
read -r -a extra <<< "${KVC_EXTRA_PACKAGES:-}"
packages+=("${extra[@]}")
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
else
  for tool in cmake ninja g++ pkg-config; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
fi
if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null 2>&1; then
    log "please install: ${missing[*]} (no apt-get here)" >&2
    exit 1
  fi
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
  log "installing ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends "${missing[@]}"
fi

cmake_version="$(cmake --version | head -n1 | awk '{print $3}')"
if [[ "$(printf '%s\n' 3.24 "$cmake_version" | sort -V | head -n1)" != 3.24 ]]; then
  log "CMake $cmake_version is older than 3.24; try: python3 -m pip install cmake" >&2
  exit 1
fi

# nvcc where the CUDA toolkit installs it, even when it is not on PATH.
if ! command -v nvcc >/dev/null 2>&1 && [[ -z "${CUDACXX:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi

# ---- Configure, build, test --------------------------------------------------------------------
# The generator is fixed at the first configure; later runs reuse the cache.
generator=()
if [[ ! -f "$build/CMakeCache.txt" ]]; then generator=(-G Ninja); fi
cmake -S "$root" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE="$build_type" \
  -DKVC_ENABLE_CUDA=AUTO \
  -DKVC_BUILD_TESTS=ON -DKVC_BUILD_BENCH=ON -DKVC_BUILD_EXAMPLES=ON \
  "$@"
cmake --build "$build" --config "$build_type" --parallel "$jobs"
ctest --test-dir "$build" --build-config "$build_type" --output-on-failure --parallel "$jobs"
