#!/usr/bin/env bash
# The measurements behind bench/results/default_model_quality.md, in one run on a machine with a GPU:
#   - trellis K = 4, 3, 8, 2, 5, 6: `trellm quantize` of models/tiny-glm with calibration (LDLQ), the Viterbi on
#     the GPU (--device cuda), the 6-bit lm_head of the shipped model. K = 4 captures the calibration Hessians
#     (a CPU forward pass over 262,144 tokens) into a cache the other five reuse (same f32 Hessians, same files).
#   - K = 3 again and compared byte for byte with the shipped models/tiny-glm-3bit (made with the CPU encoder):
#     MATCH says the GPU encoder and the cache reproduce it.
#   - RTN int4 / int3 g128 baselines (scripts/rtn_quantize.py; needs python3 + numpy), and K = 3 without
#     calibration (plain per-tile Viterbi) as an ablation.
#   - for every variant `trellm perplexity --ref models/tiny-glm --device cpu --json` on the held-out Austen text
#     (CPU, f32: the numbers do not depend on the thread count, so they compare with rows measured elsewhere),
#     and the relative weight error (scripts/exl3_weight_error.py, numpy).
# Perplexities run in the background, PPL_JOBS at a time with PPL_THREADS threads each, while the next variant
# is quantized (the GPU encoder then needs little CPU).
#
# Usage (from the repository root):
#   scripts/quality_table.sh TRELLM OUT CALIB_IDS [WORK]
#     TRELLM     trellm built with CUDA (e.g. build-q7/trellm); test_trellis_viterbi_cuda and
#                test_trellis_encode_cuda beside it, if present, run at the end as diagnostics
#     OUT        results: summary.txt, results.jsonl (one record per variant), table.md, logs.tar.gz (<= 8 files,
#                rewritten as each step ends, so a run cut short still leaves what was finished)
#     CALIB_IDS  the calibration rows: 256 x 1024 token ids of the Austen training split, made by
#                scripts/austen_calibration.py (models/tiny-glm-3bit/README.md); checked against its sha256 below
#     WORK       quantized models and the Hessian cache (default /tmp/trellm_quality; ~100 MB)
# Settings from the environment: KS (the trellis K, in order), PPL_JOBS, PPL_THREADS, Q_THREADS, QUANT_DEADLINE
# (no quantize starts after this many seconds, so that a 10-minute limit still sees every perplexity finish).
# Time: estimated 3-5 min on a 16-core H100 machine (the first quantize's capture ~30 s of CPU, then the GPU
# Viterbi: ~3,600 calls a model, each 16-row LDLQ block one latency-bound launch, K = 8 slowest); summary.txt
# has the time of every step.
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
fi
TRELLM=$(realpath "$1")
OUT=$(realpath -m "$2")
CALIB=$(realpath "$3")
WORK=$(realpath -m "${4:-/tmp/trellm_quality}")
KS=${KS:-"4 3 8 2 5 6"}     # K = 4 first: it fills the Hessian cache; 3 next: the check against the shipped model
QUANT_DEADLINE=${QUANT_DEADLINE:-420}  # seconds: no quantize starts later, so the perplexities end inside 10 min
PPL_JOBS=${PPL_JOBS:-3}
PPL_THREADS=${PPL_THREADS:-4}
Q_THREADS=${Q_THREADS:-4}   # quantize after the first (the capture of the first uses every core)
CALIB_SHA256=eee20822874a52c9e184c71bdf7ebeae289e9cc9772f2b8df9a886ee18e422d5
SRC=models/tiny-glm
TEXT=tests/data/text/austen_heldout.txt

[ -f "$SRC/config.json" ] && [ -f "$TEXT" ] || { echo "run from the repository root ($SRC, $TEXT)" >&2; exit 2; }
[ -x "$TRELLM" ] || { echo "$TRELLM: not an executable" >&2; exit 2; }
sha=$(sha256sum "$CALIB" | cut -d' ' -f1)
if [ "$sha" != "$CALIB_SHA256" ]; then
  echo "$CALIB: sha256 $sha, expected $CALIB_SHA256 (scripts/austen_calibration.py --rows 256 --seq-len 1024)" >&2
  exit 2
fi
mkdir -p "$OUT" "$WORK/logs"
SUMMARY="$OUT/summary.txt"
T0=$(date +%s)
say() { printf '[%4ds] %s\n' $(( $(date +%s) - T0 )) "$*" | tee -a "$SUMMARY"; }
have_numpy=0
python3 -c "import numpy" 2>/dev/null && have_numpy=1

: > "$SUMMARY"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
[ "$commit" != '?' ] && ! git diff --quiet HEAD -- src tools scripts 2>/dev/null && commit="$commit (modified)"
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
say "trellm quality table at commit $commit; binary $TRELLM ($("$TRELLM" --version 2>&1 | head -1))"
say "calibration $CALIB (sha256 ok); work folder $WORK"
say "host $(hostname): $(nproc) CPUs ($cpu); GPU ${gpu:-none}"
say "perplexity: $PPL_JOBS jobs x $PPL_THREADS threads; quantize: $Q_THREADS threads after the first; numpy: $([ $have_numpy = 1 ] && echo yes || echo 'no (RTN rows and weight errors skipped)')"
{ echo "date=$(date -u +%Y-%m-%d)"; echo "commit=$commit"; echo "ppl_threads=$PPL_THREADS"
  echo "machine=CPU: $cpu, $(nproc) CPUs (perplexity $PPL_JOBS jobs x $PPL_THREADS threads); GPU: ${gpu:-none} (quantize --device cuda)"
} > "$WORK/logs/env.txt"

# Results: one JSON object per variant in $WORK/logs/<name>.record.json, gathered into $OUT at every step.
# Several background jobs publish: one at a time (flock).
publish() {
  (
    flock 9 2> /dev/null || true
    (cd "$WORK/logs" && tar czf "$OUT/logs.tar.gz.tmp" --exclude='*.tmp' . && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz") || true
    python3 scripts/quality_table.py --logs "$WORK/logs" --jsonl "$OUT/results.jsonl" --markdown "$OUT/table.md" \
      > /dev/null 2>> "$WORK/logs/quality_table_py.log" || true
  ) 9> "$WORK/publish.lock" || true
}

# perplexity NAME DIR, in the background (at most PPL_JOBS at once); then the weight error and the record.
ppl_pids=()
perplexity() {
  local name=$1 dir=$2
  while [ "$(jobs -rp | wc -l)" -ge "$PPL_JOBS" ]; do wait -n || true; done
  (
    local t=$(date +%s)
    if "$TRELLM" --threads "$PPL_THREADS" perplexity --model "$dir" --ref "$SRC" --text "$TEXT" --device cpu --json \
         > "$WORK/logs/$name.ppl.json.tmp" 2> "$WORK/logs/$name.ppl.log"; then
      mv "$WORK/logs/$name.ppl.json.tmp" "$WORK/logs/$name.ppl.json"
      say "$name: perplexity done in $(( $(date +%s) - t )) s: $(python3 -c "import json;j=json.load(open('$WORK/logs/$name.ppl.json'));print('ppl %.4f  mean KL %.6f  max KL %.4f  top-1 %.4f' % (j['perplexity'], j['mean_kl'], j['max_kl'], j['top1_agree']))" 2>/dev/null || cat "$WORK/logs/$name.ppl.json")"
    else
      say "$name: perplexity FAILED (see $name.ppl.log)"
    fi
    if [ $have_numpy = 1 ] && [ -f "$dir/quantization_config.json" ]; then
      python3 scripts/exl3_weight_error.py --model "$dir" --source "$SRC" --json > "$WORK/logs/$name.werr.json" \
        2> "$WORK/logs/$name.werr.log" || say "$name: weight error FAILED"
    fi
    publish
  ) &
  ppl_pids+=($!)
}

# quantize NAME K [extra trellm quantize args]: GPU Viterbi, 6-bit head.
CAL=(--calibration "$CALIB" --seq-len 1024 --calibration-rows 256 --hessian-cache "$WORK/hessians")
first_quant=1
quantize() {
  local name=$1 k=$2; shift 2
  local threads=$Q_THREADS t=$(date +%s)
  if [ $(( t - T0 )) -gt "$QUANT_DEADLINE" ]; then
    say "$name: SKIPPED (past QUANT_DEADLINE = $QUANT_DEADLINE s)"
    return 1
  fi
  [ $first_quant = 1 ] && threads=$(nproc)
  first_quant=0
  rm -rf "$WORK/$name" "$WORK/$name.partial"
  if "$TRELLM" quantize --model "$SRC" --out "$WORK/$name" --bits "$k" --head-bits 6 --device cuda \
       --threads "$threads" "$@" > "$WORK/logs/$name.quant.log" 2>&1; then
    echo "$(( $(date +%s) - t ))" > "$WORK/logs/$name.quant_seconds"
    say "$name: quantized in $(( $(date +%s) - t )) s ($threads threads): $(grep 'wrote' "$WORK/logs/$name.quant.log" | sed 's/^trellm quantize: //')"
    return 0
  fi
  say "$name: quantize FAILED ($(tail -1 "$WORK/logs/$name.quant.log"))"
  return 1
}

# The shipped 3-bit model was made by the CPU encoder from the same source, rows and flags.
compare_with_shipped() {
  local dir=$1 ship=models/tiny-glm-3bit all=MATCH f
  for f in "$ship"/*; do
    case "$(basename "$f")" in README*) continue ;; esac
    if cmp -s "$f" "$dir/$(basename "$f")"; then say "  k3 vs $ship: $(basename "$f") MATCH"
    else say "  k3 vs $ship: $(basename "$f") DIFFER"; all=DIFFER; fi
  done
  say "k3 (GPU encoder, cached Hessians) vs the shipped $ship (CPU encoder): $all"
  echo "$all" > "$WORK/logs/k3.vs_shipped"
}

rm -rf "$WORK/hessians"   # captured afresh by the first quantize
for k in $KS; do
  if quantize "k$k" "$k" "${CAL[@]}"; then
    [ "$k" = 3 ] && compare_with_shipped "$WORK/k3"
    perplexity "k$k" "$WORK/k$k"
  fi
  publish
done

if [ $have_numpy = 1 ]; then
  for b in 4 3; do
    t=$(date +%s)
    rm -rf "$WORK/rtn$b"
    if python3 scripts/rtn_quantize.py --model "$SRC" --bits $b --group 128 --out "$WORK/rtn$b" \
         > "$WORK/logs/rtn$b.quant.log" 2>&1; then
      cp "$WORK/rtn$b/rtn.json" "$WORK/logs/rtn$b.rtn.json"
      say "rtn$b: fake-quantized in $(( $(date +%s) - t )) s"
      perplexity "rtn$b" "$WORK/rtn$b"
    else
      say "rtn$b: rtn_quantize FAILED"
    fi
  done
fi

# An ablation row: K = 3 without calibration (plain per-tile Viterbi; no Hessians, GPU only).
if quantize k3_plain 3; then perplexity k3_plain "$WORK/k3_plain"; fi

# Diagnostics, if the cuda-labelled encoder tests were carried next to the binary (no test data needed): the
# CUDA Viterbi and quantize_linear on the GPU against the CPU, bit for bit.
for t in test_trellis_viterbi_cuda test_trellis_encode_cuda; do
  exe="$(dirname "$TRELLM")/$t"
  [ -x "$exe" ] || continue
  ( if timeout 300 "$exe" > "$WORK/logs/$t.log" 2>&1; then say "$t: $(grep -E '^\[  (PASSED  |SKIPPED )\] [0-9]+ test' "$WORK/logs/$t.log" | tr '\n' ' ')"
    else say "$t: FAILED (see $t.log)"; fi
    publish ) &
  ppl_pids+=($!)
done

say "waiting for ${#ppl_pids[@]} background jobs"
for p in ${ppl_pids[@]+"${ppl_pids[@]}"}; do wait "$p" || true; done
publish
say "done in $(( $(date +%s) - T0 )) s; results in $OUT"
[ -f "$OUT/table.md" ] && cat "$OUT/table.md"
exit 0
