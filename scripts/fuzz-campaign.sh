#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# A long fuzzing campaign over the libFuzzer targets (tests/fuzz): configures and builds the
# fuzz build (clang, CPU only, ASan + UBSan) if needed, generates the seeds, then runs each
# target for a number of executions (or a time), each from its own persistent corpus, and prints
# one summary line per target: executions, seconds, executions per second, corpus size, and
# the crash/leak/timeout reproducers found (none in a clean campaign). Records for
# docs/reliability.md come from this summary.
#
#   ./scripts/fuzz-campaign.sh [target ...]     (default: every target)
#
# Environment:
#   KVC_FUZZ_BUILD_DIR  the fuzz build (default: build-fuzz/ in the repository root)
#   KVC_FUZZ_RUNS       executions per target (default 1000000); 0: run by time only
#   KVC_FUZZ_SECONDS    time limit per target in seconds (default 0: none)
#   KVC_FUZZ_PARALLEL   targets run side by side (default 1; one core each)
#   KVC_FUZZ_OUT        where corpora, logs and reproducers go (default: <build>/fuzz-campaign)
#   KVC_FUZZ_NICE       niceness of the fuzzers (default 10)
# Exits nonzero if any target found anything.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${KVC_FUZZ_BUILD_DIR:-$root/build-fuzz}"
runs="${KVC_FUZZ_RUNS:-1000000}"
seconds="${KVC_FUZZ_SECONDS:-0}"
parallel="${KVC_FUZZ_PARALLEL:-1}"
out="${KVC_FUZZ_OUT:-$build/fuzz-campaign}"
niceness="${KVC_FUZZ_NICE:-10}"
log() { echo "fuzz-campaign: $*"; }
# shellcheck source=scripts/lib/packages.sh
source "$root/scripts/lib/packages.sh"

if [[ "$runs" == 0 ]]; then runs=-1; fi  # libFuzzer: -1 runs until the time limit
targets=("$@")
if ((${#targets[@]} == 0)); then targets=(block_decode codebook tile_decode store_restore store_calls); fi
seed_dir() {
  case "$1" in
    block_decode) echo decode ;;
    codebook) echo codebook ;;
    tile_decode) echo tiles ;;
    store_restore) echo restore ;;
    store_calls) echo calls ;;
    *) log "unknown target $1" >&2; exit 2 ;;
  esac
}

kvc_configure "$root" "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DKVC_ENABLE_CUDA=OFF -DKVC_BUILD_FUZZERS=ON \
  -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=OFF -DKVC_INSTALL=OFF >/dev/null
build_targets=(kvc_fuzz_make_seeds)
for t in "${targets[@]}"; do build_targets+=("kvc_fuzz_$t"); done
nice -n "$niceness" cmake --build "$build" --parallel "${KVC_JOBS:-2}" --target "${build_targets[@]}"
fuzz_dir="$build/tests/fuzz"
"$fuzz_dir/kvc_fuzz_make_seeds" "$out/seeds" >/dev/null

# One target: its corpus persists across campaigns (out/<target>/corpus).
run_one() {
  local name="$1" dir="$out/$1" start end
  mkdir -p "$dir/corpus" "$dir/artifacts"
  start=$(date +%s)
  local status=0
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    nice -n "$niceness" "$fuzz_dir/kvc_fuzz_$name" -runs="$runs" -max_total_time="$seconds" \
    -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$dir/artifacts/" \
    "$dir/corpus" "$out/seeds/$(seed_dir "$name")" >"$dir/log.txt" 2>&1 || status=$?
  end=$(date +%s)
  local execs rate files found
  execs=$(grep -Eo 'stat::number_of_executed_units: [0-9]+' "$dir/log.txt" | awk '{print $2}')
  rate=$(grep -Eo 'stat::average_exec_per_sec: +[0-9]+' "$dir/log.txt" | awk '{print $2}')
  files=$(find "$dir/corpus" -type f | wc -l)
  found=$(find "$dir/artifacts" -type f | wc -l)
  printf '%-14s status %d  executions %s  seconds %d  exec/s %s  corpus %d  reproducers %d\n' \
    "$name" "$status" "${execs:-?}" "$((end - start))" "${rate:-?}" "$files" "$found" \
    | tee "$dir/summary.txt"
  ((status == 0 && found == 0))
}

log "$(date -u '+%Y-%m-%d %H:%M UTC'): ${targets[*]}; runs $runs, seconds $seconds, $parallel at a time"
failed=0
pids=()
for t in "${targets[@]}"; do
  run_one "$t" &
  pids+=($!)
  if ((${#pids[@]} >= parallel)); then
    wait "${pids[0]}" || failed=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p" || failed=1; done
log "$(date -u '+%Y-%m-%d %H:%M UTC'): done; logs and reproducers under $out"
exit "$failed"
