#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Static figures of the attention, codec or store kernels, no GPU needed: builds
# src/cuda/attention.cu (or, with --codec, src/cuda/codec.cu; with --store, src/cuda/store.cu)
# for sm_90 with line info (build-sass/), extracts its cubin, and prints per kernel
# instantiation the registers, stack and local memory, and for attention the HMMA/LDSM counts
# and the SASS per K and V element of the main loop, for the codec and the store the
# slow-pattern instructions and every innermost loop (scripts/sass_report.py says how they are
# counted). cuobjdump and nvdisasm come from NVIDIA's
# PyPI wheels (pinned below), fetched once into ${KVCOMP_CACHE:-~/.cache/kvcomp}/nvtools.
# Needs the CUDA toolkit (nvcc).
#   ./scripts/sass-report.sh [--codec | --store] [--markdown]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "sass-report.sh: $*" >&2; }
# shellcheck source=scripts/lib/packages.sh
source "$root/scripts/lib/packages.sh"
kvc_require_packages cmake ninja-build g++ unzip >&2

tools_version=13.5.37
cache="${KVCOMP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvcomp}/nvtools-$tools_version"
bin="$cache/nvidia/cu13/bin"
if [[ ! -x "$bin/nvdisasm" || ! -x "$bin/cuobjdump" ]]; then
  log "fetching cuobjdump and nvdisasm $tools_version from PyPI into $cache"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" \
    "nvidia-cuda-cuobjdump==$tools_version" "nvidia-cuda-nvdisasm==$tools_version"
  mkdir -p "$cache"
  for wheel in "$tmp"/*.whl; do unzip -qo "$wheel" -d "$cache"; done
  chmod +x "$bin/nvdisasm" "$bin/cuobjdump"
fi

build="$root/build-sass"
kvc_configure "$root" "$build" -DCMAKE_BUILD_TYPE=Release -DKVC_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_FLAGS=-lineinfo -DKVC_BUILD_TESTS=OFF \
  -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=OFF -DKVC_INSTALL=OFF >/dev/null
codec=0
store=0
args=()
for a in "$@"; do
  if [[ "$a" == --codec ]]; then
    codec=1
  elif [[ "$a" == --store ]]; then
    store=1
  else
    args+=("$a")
  fi
done
if ((codec)); then stem=codec; elif ((store)); then stem=store; else stem=attention; fi
unit="src/cuda/$stem.cu"
object="src/CMakeFiles/kvcomp_objects.dir/cuda/$stem.cu.o"
cmake --build "$build" --target "$object" >&2
rm -f "$build/$stem".*.cubin
(cd "$build" && "$bin/cuobjdump" -xelf all "$object" >/dev/null)
cubin="$(ls "$build/$stem".sm_90*.cubin | head -n 1)"
echo "sm_90 machine code of $unit at $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%d), $("$bin/nvdisasm" --version | tail -n 1)"
if ((codec || store)); then
  python3 "$root/scripts/sass_report.py" "--$stem" --cubin "$cubin" --nvdisasm "$bin/nvdisasm" \
    --cuobjdump "$bin/cuobjdump" ${args[@]+"${args[@]}"}
else
  python3 "$root/scripts/sass_report.py" --cubin "$cubin" --nvdisasm "$bin/nvdisasm" \
    --cuobjdump "$bin/cuobjdump" --source "$root/kernels/attention/attention.cuh" \
    ${args[@]+"${args[@]}"}
fi
