#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# End-to-end demo: builds kvcomp (Release; CUDA backend if a CUDA compiler is found) and runs
# examples/codec_demo, which compresses synthetic KV cache data and prints compression ratio,
# error against the bound and throughput. Works from any directory; safe to re-run.
#   KVC_DEMO_BUILD_DIR  build directory (default: build-demo in the repository root)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${KVC_DEMO_BUILD_DIR:-$root/build-demo}"

# Build tools, installed through apt only when missing.
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v ninja >/dev/null 2>&1 || missing+=(ninja-build)
{ command -v g++ >/dev/null 2>&1 && command -v gcc >/dev/null 2>&1; } || missing+=(g++)
if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "demo.sh: please install ${missing[*]} (no apt-get here)" >&2
    exit 1
  fi
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
  install=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
           --no-install-recommends "${missing[@]}")
  echo "demo.sh: installing ${missing[*]}"
  # apt-get update once: first if there are no package lists yet, else only if install fails.
  if ! compgen -G "/var/lib/apt/lists/*_Packages" >/dev/null; then
    "${sudo[@]}" apt-get update -qq
    "${install[@]}"
  else
    "${install[@]}" || { "${sudo[@]}" apt-get update -qq && "${install[@]}"; }
  fi
fi

# The top-level CMakeLists needs CMake 3.24 or newer.
cmake_version="$(cmake --version | head -n1 | awk '{print $3}')"
if [[ "$(printf '%s\n' 3.24 "$cmake_version" | sort -V | head -n1)" != 3.24 ]]; then
  echo "demo.sh: CMake $cmake_version is older than 3.24; try: python3 -m pip install cmake" >&2
  exit 1
fi

# The generator is fixed at the first configure; later runs reuse the cache.
generator=()
if [[ ! -f "$build/CMakeCache.txt" ]]; then generator=(-G Ninja); fi
cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=ON -DKVC_ENABLE_CUDA=AUTO
cmake --build "$build" --target codec_demo

echo
"$build/examples/codec_demo"
