#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The one-command GPU check: on a machine with a CUDA GPU (no network needed), configure for
# sm_90, build, run every GPU test, run compute-sanitizer (memcheck, racecheck, synccheck) on a fast
# subset, run the GPU benchmarks with their baselines, and print a summary table last.
#
#   scripts/gpu-check.sh --prepare   # on a machine with GoogleTest's sources (Debian: googletest)
#                                    # copy them to .deps/ so they travel with the tree
#   scripts/gpu-check.sh [OUT_DIR]   # on the GPU machine; logs and JSON go to OUT_DIR
#
# Environment: KVC_CUDA_ARCH (default 90), KVC_JOBS (default: all cores).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if [[ "${1:-}" == "--prepare" ]]; then
  src=/usr/src/googletest
  [[ -d $src ]] || { echo "no GoogleTest sources at $src (apt-get install googletest)"; exit 1; }
  mkdir -p .deps && rm -rf .deps/googletest && cp -r "$src" .deps/googletest
  echo "copied GoogleTest sources to .deps/googletest"
  exit 0
fi

out=${1:-${OUT:-$root/build-gpu/out}}
mkdir -p "$out"
build=$root/build-gpu
jobs=${KVC_JOBS:-$(nproc)}
start=$(date +%s)
log() { printf '[gpu-check %4ds] %s\n' $(( $(date +%s) - start )) "$*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader \
  > "$out/gpu.txt" 2>&1 || true
log "GPU: $(head -1 "$out/gpu.txt")"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

gtest_args=()
[[ -d .deps/googletest ]] && gtest_args=(-DKVC_GTEST_SOURCE_DIR="$root/.deps/googletest")
log "configure (sm_${KVC_CUDA_ARCH:-90})"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES="${KVC_CUDA_ARCH:-90}" -DKVC_ENABLE_CUDA=ON \
  -DKVC_BUILD_TESTS=ON -DKVC_BUILD_BENCH=ON -DKVC_BUILD_EXAMPLES=OFF -DKVC_INSTALL=OFF \
  "${gtest_args[@]}" > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
log "build (-j$jobs)"
cmake --build "$build" -j "$jobs" > "$out/build.log" 2>&1 || { grep -E "error" -A3 "$out/build.log" | head -60; exit 1; }

log "GPU tests"
(cd "$build" && ctest -L gpu --output-on-failure --timeout 300 > "$out/gpu-tests.log" 2>&1)
tests_rc=$?
tests_line=$(grep -E "tests passed|tests failed" "$out/gpu-tests.log" | tail -1)
skipped=$(grep -c "Skipped" "$out/gpu-tests.log" || true)
log "$tests_line (skipped: $skipped)"
[[ $tests_rc -ne 0 ]] && grep -E "Failure|FAILED|Expected|Which is" "$out/gpu-tests.log" | head -40

sanitizer_summary=""
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck synccheck; do
    log "compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$build/tests/gpu/gpu_tests" \
      --gtest_filter='*Corrupt*:*Graph*:*NonFinite*:*LargeBlocks*:*Undersized*:StoreGpu.OutOfPages*:StoreGpu.SerializesToTheSameBytes*' \
      > "$out/sanitizer-$tool.log" 2>&1
    rc=$?
    sanitizer_summary+="$tool=$([[ $rc -eq 0 ]] && echo clean || echo "FAILED($rc)") "
    [[ $rc -ne 0 ]] && tail -30 "$out/sanitizer-$tool.log"
  done
else
  sanitizer_summary="compute-sanitizer not found"
fi

log "GPU benchmarks"
"$build/bench/gpu_bench" --json "$out/gpu_bench.json" > "$out/gpu_bench.log" 2>&1
bench_rc=$?
"$build/bench/gpu_store_bench" --json "$out/gpu_store_bench.json" > "$out/gpu_store_bench.log" 2>&1
store_bench_rc=$?
torch_rc=skipped
if python3 -c "import torch; assert torch.cuda.is_available()" > /dev/null 2>&1; then
  log "torch scaled_dot_product_attention on the same shapes"
  python3 bench/torch_sdpa.py "$out/torch_sdpa.json" > "$out/torch_sdpa.log" 2>&1
  torch_rc=$?
fi

echo
echo "=== kvcomp GPU check: commit $commit, $(date -u +%Y-%m-%d), $(head -1 "$out/gpu.txt") ==="
echo "tests:      ${tests_line:-none ran} (skipped: $skipped)"
echo "sanitizer:  $sanitizer_summary"
echo "benchmarks: codec/attention $([[ $bench_rc -eq 0 ]] && echo ok || echo "FAILED($bench_rc)"), store $([[ $store_bench_rc -eq 0 ]] && echo ok || echo "FAILED($store_bench_rc)"), torch: $torch_rc"
tail -n 30 "$out/gpu_bench.log"
tail -n 12 "$out/gpu_store_bench.log"
[[ -f "$out/torch_sdpa.log" ]] && tail -n 13 "$out/torch_sdpa.log"
echo "total: $(( $(date +%s) - start )) s; logs in $out"
[[ $tests_rc -eq 0 && $bench_rc -eq 0 && $store_bench_rc -eq 0 ]]
