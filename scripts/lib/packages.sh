# SPDX-License-Identifier: Apache-2.0
# Sourced by the project's scripts: kvc_require_packages PKG... installs the Debian packages that
# are missing (one apt-get update, only when something is missing), then checks CMake's version
# and finds nvcc where the CUDA toolkit installs it; kvc_apt_install PKG... installs packages
# (fails where there is no apt-get). Both expect a log function. kvc_configure SRC BUILD ARGS...
# runs CMake, with Ninja at the first configure (later runs reuse the cache's generator).

kvc_configure() {
  local src="$1" build="$2" generator=()
  shift 2
  if [[ ! -f "$build/CMakeCache.txt" ]]; then generator=(-G Ninja); fi
  cmake -S "$src" -B "$build" "${generator[@]}" "$@"
}

kvc_apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
  log "installing $*"
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends "$@"
}

kvc_require_packages() {
  local missing=() p
  if command -v dpkg-query >/dev/null 2>&1; then
    for p in "$@"; do
      if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
      fi
    done
  else
    for p in cmake ninja g++; do
      command -v "$p" >/dev/null 2>&1 || missing+=("$p")
    done
  fi
  if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
      log "please install: ${missing[*]} (no apt-get here)" >&2
      exit 1
    fi
    kvc_apt_install "${missing[@]}"
  fi

  local cmake_version
  cmake_version="$(cmake --version | head -n1 | awk '{print $3}')"
  if [[ "$(printf '%s\n' 3.24 "$cmake_version" | sort -V | head -n1)" != 3.24 ]]; then
    log "CMake $cmake_version is older than 3.24; try: python3 -m pip install cmake" >&2
    exit 1
  fi

  # nvcc where the CUDA toolkit installs it, even when it is not on PATH.
  if ! command -v nvcc >/dev/null 2>&1 && [[ -z "${CUDACXX:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDACXX=/usr/local/cuda/bin/nvcc
  fi
}
