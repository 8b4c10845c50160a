# SPDX-License-Identifier: Apache-2.0
# Sourced by the Python scripts: builds the shared library (Release, library only) into
# $KVCOMP_PY_BUILD_DIR (default build-py) unless KVCOMP_LIBRARY names one, then exports
# KVCOMP_LIBRARY. The Python module uses the CPU backend, so CUDA is off unless
# KVCOMP_PY_CUDA=AUTO or ON; on a first build only: an existing build directory keeps its
# configuration.
# Expects $root. Re-running only rebuilds what changed.
if [[ -z "${KVCOMP_LIBRARY:-}" ]]; then
  _kvc_build="${KVCOMP_PY_BUILD_DIR:-$root/build-py}"
  for tool in cmake ninja c++; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "$(basename "$0"): $tool is needed to build libkvcomp.so (or set KVCOMP_LIBRARY)" >&2
      exit 1
    fi
  done
  if [[ ! -f "$_kvc_build/build.ninja" ]]; then
    cmake -S "$root" -B "$_kvc_build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=OFF \
      -DKVC_ENABLE_CUDA="${KVCOMP_PY_CUDA:-OFF}" >/dev/null
  fi
  cmake --build "$_kvc_build" --target kvcomp >/dev/null
  export KVCOMP_LIBRARY="$_kvc_build/src/libkvcomp.so"
fi
