#!/usr/bin/env bash
# Builds (when needed) and runs every libFuzzer target of tests/fuzz, one at a time, and records per target the
# executions, coverage (libFuzzer's final cov / ft) and crashes.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   each target runs until SECONDS (default 600) or FUZZ_RUNS executions
#                                           (default 10,000,000), whichever comes first
# Environment:
#   FUZZ_RUNS=N          execution cap per target (default 10000000)
#   FUZZ_RESULTS=FILE    where the table goes (default bench/results/fuzz.md; "-" for stdout only)
#   FUZZ_BUILD=DIR       build directory (default build-fuzz); CC/CXX default to clang-19/clang++-19
#   FUZZ_JOBS=N          ninja -j for the build (default: nproc)
#   FUZZ_PARALLEL=N      targets fuzzed at the same time (default 1; CI's smoke runs 2 on its 2 cores)
# Needs clang-19 and libclang-rt-19-dev (Debian). Corpora grow in DIR/corpus/<target> (seeded from the committed
# fixtures by tests/fuzz/make_seeds.py, reproducers in tests/data/fuzz/ included); a crashing input is saved in
# DIR/artifacts/<target>/. Exit status 1 when any target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=${1:-600}
shift || true
RUNS=${FUZZ_RUNS:-10000000}
RESULTS=${FUZZ_RESULTS:-bench/results/fuzz.md}
BUILD=${FUZZ_BUILD:-build-fuzz}
JOBS=${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 2)}
PARALLEL=${FUZZ_PARALLEL:-1}
ALL_TARGETS=(fuzz_safetensors fuzz_safetensors_index fuzz_config fuzz_tokenizer_json fuzz_tokenizer fuzz_jinja
             fuzz_glm_output fuzz_exl3 fuzz_server_request)
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=("${ALL_TARGETS[@]}")

if [[ ! -f "$BUILD/build.ninja" ]]; then
  CC=${CC:-clang-19} CXX=${CXX:-clang++-19} cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DTRELLM_CUDA=OFF -DTRELLM_FUZZ=ON -DTRELLM_SANITIZE=address,undefined -DBUILD_TESTING=OFF >/dev/null
fi
ninja -C "$BUILD" -j "$JOBS" "${TARGETS[@]}"

seeds="$BUILD/seeds"
rm -rf "$seeds"
python3 tests/fuzz/make_seeds.py "$seeds" >/dev/null

# Leaks are findings too (detect_leaks); a sanitizer report aborts so libFuzzer saves the input.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

# One target: its log, and its table row and exit status in $BUILD/logs/$t.row / .rc.
fuzz_one() {
  local t=$1
  local corpus="$BUILD/corpus/$t" artifacts="$BUILD/artifacts/$t" log="$BUILD/logs/$t.log"
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  local dict="$BUILD/dict/$t.dict"
  mkdir -p "$(dirname "$dict")"
  cat tests/fuzz/dict/json.dict > "$dict"
  [[ -f tests/fuzz/dict/$t.dict ]] && cat "tests/fuzz/dict/$t.dict" >> "$dict"
  [[ $t == fuzz_tokenizer || $t == fuzz_glm_output ]] && cp "tests/fuzz/dict/$t.dict" "$dict"  # not JSON
  echo "=== $t: up to $RUNS executions or $SECONDS_PER_TARGET s"
  local t0=$SECONDS
  local stamp="$BUILD/logs/$t.start"
  touch "$stamp"
  set +e
  # -timeout: one input taking 30 s is a finding (a hang); -rss_limit_mb: so is a 2 GB allocation.
  "$BUILD/tests/fuzz/$t" "$corpus" "$seeds/$t" -runs="$RUNS" -max_total_time="$SECONDS_PER_TARGET" -dict="$dict" \
    -artifact_prefix="$artifacts/" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 -close_fd_mask=1 >"$log" 2>&1
  local rc=$?
  set -e
  local wall=$((SECONDS - t0))
  local execs eps rss cov ft corp found slow status
  execs=$(grep -oE 'stat::number_of_executed_units:[[:space:]]+[0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$' || echo 0)
  eps=$(grep -oE 'stat::average_exec_per_sec:[[:space:]]+[0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$' || echo 0)
  rss=$(grep -oE 'stat::peak_rss_mb:[[:space:]]+[0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$' || echo 0)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo 0)
  ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo 0)
  corp=$(find "$corpus" -type f | wc -l)
  found=$(find "$artifacts" -type f ! -name 'slow-unit-*' -newer "$stamp" | wc -l)  # this run's
  slow=$(grep -oE 'stat::slowest_unit_time_sec:[[:space:]]+[0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$' || echo 0)
  status=ok
  if ((rc != 0)); then
    status="crash (rc $rc): $(grep -m1 -oE 'ERROR: [A-Za-z]+: [^ ]+( [^ ]+)?|deadly signal|timeout after [0-9]+ seconds|out-of-memory' "$log" || echo see log)"
    echo "    $t: $status; log $log, inputs in $artifacts/"
  fi
  printf '    %s: %s executions in %s s (%s/s), cov %s, ft %s, corpus %s, peak RSS %s MB, slowest input %s s\n' \
    "$t" "$execs" "$wall" "$eps" "$cov" "$ft" "$corp" "$rss" "$slow"
  echo "| \`$t\` | $execs | $wall | $eps | $cov | $ft | $corp | $rss | $slow | $found | $status |" > "$BUILD/logs/$t.row"
  echo "$rc" > "$BUILD/logs/$t.rc"
}

# FUZZ_PARALLEL targets at a time (each libFuzzer process is one thread).
t_start=$SECONDS
running=0
for t in "${TARGETS[@]}"; do
  if ((running >= PARALLEL)); then
    wait -n || true
    running=$((running - 1))
  fi
  fuzz_one "$t" &
  running=$((running + 1))
done
wait || true
rows=()
crashed=0
for t in "${TARGETS[@]}"; do
  rows+=("$(cat "$BUILD/logs/$t.row")")
  [[ $(cat "$BUILD/logs/$t.rc") == 0 ]] || crashed=1
done
total=$((SECONDS - t_start))

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit-dirty"
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //' || uname -m)
table=$(
  echo "## $(date -u +%Y-%m-%d) · commit \`$commit\` · $(nproc) cores of $cpu · clang $("${CXX:-clang++-19}" -dumpversion 2>/dev/null || echo ?)"
  echo
  echo "Command: \`scripts/fuzz.sh $SECONDS_PER_TARGET${*:+ $*}\` (FUZZ_RUNS=$RUNS; ASan + UBSan, -jobs=1, $PARALLEL target(s) at a time; $total s in all)"
  echo
  echo "| target | executions | s | exec/s | cov | ft | corpus | peak RSS MB | slowest input s | crash inputs | result |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  printf '%s\n' "${rows[@]}"
)
echo
echo "$table"
if [[ $RESULTS != "-" ]]; then
  mkdir -p "$(dirname "$RESULTS")"
  if [[ ! -f $RESULTS ]]; then
    printf '# Fuzzing (libFuzzer, tests/fuzz)\n\nWritten by `scripts/fuzz.sh`; newest run first. cov / ft: libFuzzer'"'"'s final coverage (edges) and\nfeatures. Findings and their fixes: the notes under each run.\n\n' > "$RESULTS"
  fi
  { head -n 5 "$RESULTS"; echo "$table"; echo; tail -n +6 "$RESULTS"; } > "$RESULTS.tmp" && mv "$RESULTS.tmp" "$RESULTS"
  echo "recorded in $RESULTS"
fi
exit $crashed
