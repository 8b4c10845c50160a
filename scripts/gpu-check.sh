#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The one-command GPU check, sized for a short GPU lease (docs/gpu-check.md). On a machine with a
# CUDA GPU and no network: configure for sm_90 and build only what the check runs; run every GPU
# test (one process each); compute-sanitizer memcheck, racecheck and synccheck on a subset; the
# GPU benchmarks with their baselines; optional extra steps. Every step has a time limit, and the
# whole run a budget. Writes into OUT_DIR (default $OUT, else build-gpu/out) at most three files:
#   gpu-check.json          everything measured (rewritten after every step, so a run cut short
#                           still leaves its results), see docs/gpu-check.md
#   gpu-check-failures.tgz  the logs of the steps that failed, timed out or found errors (if any)
#   gpu-check.txt           the summary table, which is also printed last
#
#   scripts/gpu-check.sh --prepare      # where GoogleTest's sources are (Debian: googletest):
#                                       # copies them to .deps/googletest (git-ignored; send it
#                                       # along, e.g. as a carried path, to a machine without it)
#   scripts/gpu-check.sh [--quick] [OUT_DIR]
#
# --quick: tests, memcheck on a few tests and one attention shape (a re-run after a fix, about
# 4 minutes). Environment: KVC_CUDA_ARCH (default 90), KVC_JOBS (default: all cores),
# KVC_CHECK_BUDGET (seconds for the whole run; default 540, --quick 240), KVC_COMMIT (the
# commit to record where the tree has no .git), KVC_REPLAY_ARGS (see the optional step below).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1

mode=full
out=""
for arg in "$@"; do
  case "$arg" in
    --prepare)
      src=""
      for d in /usr/src/googletest /usr/src/gtest; do
        [[ -f $d/CMakeLists.txt ]] && src=$d && break
      done
      if [[ -z $src ]]; then
        echo "no GoogleTest sources in /usr/src (apt-get install googletest)"
        exit 1
      fi
      mkdir -p .deps && rm -rf .deps/googletest && cp -r "$src" .deps/googletest
      echo "copied GoogleTest sources ($src) to .deps/googletest ($(du -sh .deps | cut -f1))"
      exit 0
      ;;
    --quick) mode=quick ;;
    -h | --help) sed -n '3,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "unknown option $arg"; exit 2 ;;
    *) out=$arg ;;
  esac
done

out=${out:-${OUT:-$root/build-gpu/out}}
build=$root/build-gpu
work=$build/check  # every log; only failures are copied to $out
mkdir -p "$out" "$build"
rm -rf "$work" && mkdir -p "$work"
rm -f "$out/gpu-check.json" "$out/gpu-check-failures.tgz" "$out/gpu-check.txt"
jobs=${KVC_JOBS:-$(nproc)}
budget=${KVC_CHECK_BUDGET:-540}
[[ $mode == quick ]] && budget=${KVC_CHECK_BUDGET:-240}
start=$SECONDS
deadline=$((start + budget))
log() { printf '[gpu-check %4ds] %s\n' $((SECONDS - start)) "$*"; }

# nvcc where the toolkit installs it, even when it is not on PATH (as scripts/lib/packages.sh).
if ! command -v nvcc > /dev/null 2>&1 && [[ -z "${CUDACXX:-}" ]] &&
  [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
  export PATH="/usr/local/cuda/bin:$PATH"
fi

# ---- What this run is ---------------------------------------------------------------------------
commit=${KVC_COMMIT:-$(git rev-parse --short HEAD 2> /dev/null || echo unknown)}
if [[ $commit != unknown && -z ${KVC_COMMIT:-} ]] && ! git diff --quiet HEAD 2> /dev/null; then
  commit="$commit+dirty"
fi
{
  echo "mode=$mode"
  echo "commit=$commit"
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if command -v nvidia-smi > /dev/null; then
    echo "gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
      --format=csv,noheader 2>&1 | head -1)"
  else
    echo "gpu=none (no nvidia-smi)"
  fi
  echo "cuda=$( (nvcc --version 2> /dev/null || "${CUDACXX:-nvcc}" --version 2>&1) |
    grep -o 'release [0-9.]*' | head -1)"
  echo "cores=$(nproc)"
  echo "budget=$budget"
} > "$work/env.txt"
log "$(grep '^gpu=' "$work/env.txt") | commit $commit | $mode, budget ${budget}s"

report() { python3 "$root/scripts/gpu_check_report.py" "$work" "$out" "$@"; }

# run_step NAME LIMIT CMD...: runs CMD under `timeout`, its output in $work/NAME.log; the limit
# shrinks to the budget left (keeping 20 s for the report), and a step with under step_min
# seconds left (default 10; `step_min=60 run_step ...` for one that needs more) is skipped.
# Records the outcome in steps.tsv and rewrites the result file.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS - 20))
  if ((left < ${step_min:-10})); then
    printf '%s\tskipped\t0\t%s\t-\n' "$name" "$limit" >> "$work/steps.tsv"
    log "$name: skipped, out of time"
    return 125
  fi
  ((limit > left)) && limit=$left
  log "$name (limit ${limit}s)"
  local t0=$SECONDS rc status
  timeout -k 10 "$limit" "$@" > "$work/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" $((SECONDS - t0)) "$limit" "$rc" \
    >> "$work/steps.tsv"
  log "$name: $status (rc $rc, $((SECONDS - t0)) s)"
  report --quiet
  return $rc
}

# ---- 1. Configure and build (only what the check runs) -------------------------------------------
gtest_args=()
for d in "$root/.deps/googletest" /usr/src/googletest; do
  if [[ -f $d/CMakeLists.txt ]]; then gtest_args=(-DKVC_GTEST_SOURCE_DIR="$d"); break; fi
done
configure=(cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
  -DCMAKE_CUDA_ARCHITECTURES="${KVC_CUDA_ARCH:-90}" -DKVC_ENABLE_CUDA=ON
  -DKVC_BUILD_BENCH=ON -DKVC_BUILD_EXAMPLES=OFF -DKVC_INSTALL=OFF -DKVC_BUILD_FUZZERS=OFF)
have_tests=1
if ! run_step configure 120 "${configure[@]}" -DKVC_BUILD_TESTS=ON "${gtest_args[@]}"; then
  if grep -q "GoogleTest not found" "$work/configure.log"; then
    # No GoogleTest here and none brought along: the benchmarks still run.
    log "GoogleTest missing: run scripts/gpu-check.sh --prepare where it is installed," \
      "and send .deps along"
    echo "GoogleTest missing" > "$work/tests-unavailable.txt"
    have_tests=0
    mv "$work/configure.log" "$work/configure-with-tests.log"
    if ! run_step configure-without-tests 120 "${configure[@]}" -DKVC_BUILD_TESTS=OFF; then
      report
      exit 1
    fi
  else
    report
    exit 1
  fi
fi
targets=(gpu_bench gpu_store_bench kvcomp)  # kvcomp: libkvcomp.so for the real-model replay
((have_tests)) && targets+=(gpu_tests)
run_step build 240 cmake --build "$build" -j "$jobs" --target "${targets[@]}" || { report; exit 1; }

# ---- 2. GPU tests: one process per test (a fault cannot take the rest with it) ----------------
if ((have_tests)); then
  run_step tests 180 ctest --test-dir "$build" -L gpu --output-on-failure --timeout 120 \
    -j 4 --no-tests=error
fi

# ---- 3. compute-sanitizer and benchmarks, most wanted first ------------------------------------
# memcheck, the codec/attention benchmark, racecheck, synccheck, the store benchmark, torch: a run
# that runs out of budget loses the least wanted. The sanitizer subsets reach every kernel with
# few launches (racecheck is the slow tool).
memcheck_filter='*Corrupt*:*Graph*:*NonFinite*:*LargeBlocks*:*NearTheDefault*:*Undersized*'
memcheck_filter+=':*Histogram*:StoreGpu.OutOfPages*:StoreGpu.SerializesToTheSameBytes*'
memcheck_filter+=':StoreGpu.FreeingReturnsEveryPage:AttentionGpu.*:TileAttentionGpu.*'
memcheck_filter+=':TileCodecGpu.DamagedBlocks*:StoreGpu.TileStoreSerializes*'
race_filter='CodecGpu.LargeBlocks*:CodecGpu.Corrupt*:CodecGpu.DeviceHistogram*'
race_filter+=':StoreGpu.OutOfPages*:AttentionGpu.CompressedKernel*'
race_filter+=':TileCodecGpu.EncodeAndDecodeReplay*:TileCodecGpu.DamagedBlocks*'
race_filter+=':TileAttentionGpu.Matches*:AttentionGpu.DenseBaseline*'
[[ $mode == quick ]] &&
  memcheck_filter='CodecGpu.LargeBlocks*:CodecGpu.Corrupt*:StoreGpu.OutOfPages*:TileCodecGpu.Damaged*'
sanitizer_ok=0
if ((have_tests)) && command -v compute-sanitizer > /dev/null; then
  sanitizer_ok=1
elif ((have_tests)); then
  echo "compute-sanitizer not found" > "$work/sanitizer-unavailable.txt"
fi
# sanitize TOOL FILTER LIMIT
sanitize() {
  ((sanitizer_ok)) || return 0
  run_step "sanitizer-$1" "$3" compute-sanitizer --tool "$1" --error-exitcode 9 \
    "$build/tests/gpu/gpu_tests" --gtest_filter="$2" --gtest_output="json:$work/sanitizer-$1.json"
  # A tool that refuses the device (seen on gVisor) refuses it for every tool.
  if grep -qiE "Device not supported|device is not supported" "$work/sanitizer-$1.log"; then
    log "compute-sanitizer refuses this device: the other tools are skipped"
    sanitizer_ok=0
  fi
}

sanitize memcheck "$memcheck_filter" 120
if [[ $mode == quick ]]; then
  run_step bench-gpu 90 "$build/bench/gpu_bench" --quick --json "$work/gpu_bench.json"
else
  run_step bench-gpu 150 "$build/bench/gpu_bench" --json "$work/gpu_bench.json"
  sanitize racecheck "$race_filter" 90
  sanitize synccheck "$race_filter" 80
  run_step bench-store 90 "$build/bench/gpu_store_bench" --json "$work/gpu_store_bench.json"
  run_step bench-store-v1 90 "$build/bench/gpu_store_bench" --v1 \
    --json "$work/gpu_store_bench_v1.json"
  if python3 -c "import torch; assert torch.cuda.is_available()" > /dev/null 2>&1; then
    run_step bench-torch-sdpa 90 python3 bench/torch_sdpa.py "$work/torch_sdpa.json"
  fi
fi

# ---- 4. Optional extra steps -------------------------------------------------------------------
# >>> Real-model replay: a real model's recorded decode (bench/accuracy/data/smollm2_decode.npz:
# per-layer queries, keys and values of SmolLM2-135M) replayed through the CPU store and the CUDA
# store with its fused attention, for v1 blocks and for tile blocks, every output compared (bench/accuracy/replay_kv.py exits 1 past
# 1% relative difference or if block bytes differ). Needs numpy and torch with CUDA. Not run in
# --quick mode unless KVC_REPLAY_QUICK=1; extra arguments through KVC_REPLAY_ARGS.
replay_args=${KVC_REPLAY_ARGS:-}
if [[ $mode == full || ${KVC_REPLAY_QUICK:-0} == 1 ]] &&
  python3 -c "import numpy, torch; assert torch.cuda.is_available()" 2> /dev/null; then
  # shellcheck disable=SC2086  # the arguments are meant to split
  step_min=60 run_step extra-replay 150 env KVCOMP_LIBRARY="$build/src/libkvcomp.so" \
    PYTHONUNBUFFERED=1 python3 bench/accuracy/replay_kv.py --device cuda \
    --json "$work/replay.json" $replay_args
fi
# <<< end of the optional steps

# ---- 5. Result file, failure logs, summary (last) -----------------------------------------------
report
# Exit status: 0 only when every step that ran succeeded, compute-sanitizer aside (its verdicts
# are in the result file).
! grep -v '^sanitizer-' "$work/steps.tsv" | cut -f2 | grep -qE '^(failed|timeout)$'
