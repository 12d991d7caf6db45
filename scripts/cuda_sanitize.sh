#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, initcheck, synccheck) over every CUDA test binary (CTest label cuda),
# one binary and tool at a time, each under a time limit; a failure or a timeout is recorded and the next one runs.
#
#   scripts/cuda_sanitize.sh [BUILD_DIR] [OUT_DIR]
#     BUILD_DIR  a configured and built CUDA build (default build)
#     OUT_DIR    where the logs and summary.md go (default $OUT/cuda_sanitize when $OUT is set, else
#                bench/results/cuda_sanitize)
# Environment:
#   TOOLS="memcheck racecheck initcheck synccheck"   which tools
#   TIMEOUT=1800          seconds per binary and tool (the sanitizers slow kernels 10-100x; racecheck the most)
#   GTEST_FILTER=...      passed to every binary (e.g. to skip the full-size cases: -*FullSize*)
#   CS_ARGS="..."         extra compute-sanitizer arguments
#   COMPUTE_SANITIZER=... the binary (default: on PATH, else $CUDA_HOME/bin or /usr/local/cuda/bin)
#   LABEL=cuda            the CTest label whose binaries are run
#   BINARIES="a b ..."    run these test binaries instead of the label's (prebuilt ones carried to the GPU machine;
#                         then BUILD_DIR need not be a configured build)
#   PARALLEL=1            (binary, tool) runs at a time on the one GPU (each is mostly CPU-bound under the tools)
#   PER_TEST=1            one run per test case of each binary (--gtest_list_tests; GTEST_FILTER then ignored): a
#                         binary whose whole run outlasts TIMEOUT under racecheck still gets its short cases checked
# Exit status: 0 when every run finished with no error reported, 1 otherwise (the summary says which).
set -uo pipefail
cd "$(dirname "$0")/.."

BUILD=${1:-build}
if [[ -n ${2:-} ]]; then OUT_DIR=$2
elif [[ -n ${OUT:-} ]]; then OUT_DIR=$OUT/cuda_sanitize
else OUT_DIR=bench/results/cuda_sanitize; fi
TOOLS=${TOOLS:-memcheck racecheck initcheck synccheck}
TIMEOUT=${TIMEOUT:-1800}

CS=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
for d in "${CUDA_HOME:-/usr/local/cuda}/bin" /usr/local/cuda/bin; do
  [[ -z $CS && -x $d/compute-sanitizer ]] && CS=$d/compute-sanitizer
done
[[ -n $CS ]] || { echo "cuda_sanitize: compute-sanitizer not found (set COMPUTE_SANITIZER)" >&2; exit 2; }
[[ -n ${BINARIES:-} || -f $BUILD/CTestTestfile.cmake ]] || { echo "cuda_sanitize: $BUILD is not a configured build" >&2; exit 2; }
mkdir -p "$OUT_DIR"
PARALLEL=${PARALLEL:-1}

# The executables behind the label: ctest lists each discovered gtest case; keep each binary once.
if [[ -n ${BINARIES:-} ]]; then
  read -r -a BINS <<< "$BINARIES"
else
mapfile -t BINS < <(ctest --test-dir "$BUILD" -L "${LABEL:-cuda}" --show-only=json-v1 2>/dev/null | python3 -c '
import json, os, sys
seen = []
for t in json.load(sys.stdin).get("tests", []):
    cmd = t.get("command") or []
    if cmd and cmd[0] not in seen and not os.path.basename(cmd[0]).startswith("python"):  # gtest binaries only
        seen.append(cmd[0])
print("\n".join(seen))' | sed '/^$/d')
fi
((${#BINS[@]})) || { echo "cuda_sanitize: no tests with label ${LABEL:-cuda} in $BUILD (built without CUDA?)" >&2; exit 2; }

summary=$OUT_DIR/summary.md
{
  echo "# compute-sanitizer over the CUDA tests"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ) · commit \`$(git rev-parse --short HEAD 2>/dev/null || echo ?)$(git diff --quiet HEAD 2>/dev/null || echo -dirty)\`" \
       "· $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo 'GPU ?')" \
       "· $("$CS" --version 2>/dev/null | grep -oE 'Version [^ ]+' | head -1)"
  echo
  echo "Command: \`scripts/cuda_sanitize.sh $BUILD $OUT_DIR\` (TOOLS=\"$TOOLS\", TIMEOUT=$TIMEOUT${GTEST_FILTER:+, GTEST_FILTER=$GTEST_FILTER}${CS_ARGS:+, CS_ARGS=$CS_ARGS})"
  echo
  echo "| binary | tool | result | errors | s | log |"
  echo "|---|---|---|---:|---:|---|"
} > "$summary"

# One (binary, tool) run: its log, and its table row in $OUT_DIR/rows/ (sorted into the summary at the end).
one() {
  local bin=$1 tool=$2 test=${3:-} name log args gt t0 rc secs errors hazards result
  name=$(basename "$bin")${3:+.$(echo "$3" | tr '/' '_')}
  log=$OUT_DIR/$name.$tool.log
  args=(--tool "$tool" --error-exitcode 99 --print-limit 100)
  case $tool in
    memcheck) args+=(--leak-check full) ;;
    racecheck) args+=(--racecheck-report analysis) ;;
  esac
  # shellcheck disable=SC2206
  [[ -n ${CS_ARGS:-} ]] && args+=($CS_ARGS)
  gt=()
  [[ -n ${GTEST_FILTER:-} ]] && gt=(--gtest_filter="$GTEST_FILTER")
  [[ -n $test ]] && gt=(--gtest_filter="$test")
  t0=$SECONDS
  timeout -k 30 "$TIMEOUT" "$CS" "${args[@]}" "$bin" "${gt[@]}" > "$log" 2>&1
  rc=$?
  secs=$((SECONDS - t0))
  errors=$(grep -oE 'ERROR SUMMARY: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$' || true)
  if [[ $tool == racecheck ]]; then
    hazards=$(grep -oE 'RACECHECK SUMMARY: [0-9]+ hazard' "$log" | tail -1 | grep -oE '[0-9]+' || true)
    [[ -n $hazards ]] && errors=$hazards
  fi
  if ((rc == 124 || rc == 137)); then result="timeout after ${TIMEOUT} s"
  elif ((rc == 99)) || [[ -n $errors && $errors != 0 ]]; then result="**errors**"
  elif ((rc != 0)); then result="test failed (rc $rc)"
  else result=clean; fi
  echo "=== $name: $tool: $result, ${errors:-?} errors, $secs s ($log)"
  echo "| \`$name\` | $tool | $result | ${errors:-?} | $secs | \`$(basename "$log")\` |" > "$OUT_DIR/rows/$name.$tool"
}
export -f one
export OUT_DIR CS TIMEOUT CS_ARGS GTEST_FILTER
rm -rf "$OUT_DIR/rows"; mkdir -p "$OUT_DIR/rows"
# The units: "binary" or, with PER_TEST=1, "binary test" for each of its test cases.
UNITS=()
for bin in "${BINS[@]}"; do
  if [[ ${PER_TEST:-0} == 1 ]]; then
    while read -r t; do UNITS+=("$bin $t"); done < <("$bin" --gtest_list_tests | awk '/^[^ ]/{s=$1} /^  /{print s $1}')
  else
    UNITS+=("$bin")
  fi
done
for u in "${UNITS[@]}"; do read -r b t <<< "$u"; for tool in $TOOLS; do printf '%s %s %s\n' "$b" "$tool" "$t"; done; done |
  xargs -P "$PARALLEL" -L 1 bash -c 'one "$0" "$1" "${2:-}"'
status=0
for u in "${UNITS[@]}"; do
  read -r b t <<< "$u"
  name=$(basename "$b")${t:+.$(echo "$t" | tr '/' '_')}
  for tool in $TOOLS; do
    row=$OUT_DIR/rows/$name.$tool
    if [[ -f $row ]]; then cat "$row" >> "$summary"; else echo "| \`$name\` | $tool | not run | ? | | |" >> "$summary"; fi
    grep -q '| clean |' "$row" 2>/dev/null || status=1
  done
done
rm -rf "$OUT_DIR/rows"
echo
cat "$summary"
exit $status
