#!/usr/bin/env bash
# The measurements behind bench/results/default_model_quality.md, in one run on a machine with a GPU: trellis
# (EXL3) and round-to-nearest (RTN) quantizations of models/tiny-glm compared at equal *stored* bits per weight,
# and the decision on quantizing the MTP layer.
#   - calibration Hessians captured once, by the first quantize (the shipped recipe with its MTP layer at K = 3:
#     a CPU forward pass over 262,144 tokens, main model and MTP layer), into a cache every later quantize reads;
#     the Viterbi on the GPU (--device cuda), QUANT_JOBS quantizes at a time (each is launch-bound on the GPU).
#   - the trellis ladder kK, K = KS (default 1..8): LDLQ on all 232 decoder Linears, lm_head and the MTP layer kept
#     bf16 (as the RTN rows keep them), so only the decoder Linears differ from bf16; k3_plain: K = 3 without
#     calibration (plain per-tile Viterbi), an ablation.
#   - RTN baselines (scripts/rtn_quantize.py; numpy): RTN = list of <K><s|a><G>, s = symmetric (fp16 scale per
#     group), a = asymmetric (fp16 scale + K-bit zero per group), e.g. 4s128 = int4 g128.
#   - the shipped recipe (models/tiny-glm-3bit: K = 3, lm_head K = 6): s3 keeps the MTP layer bf16 (compared byte
#     for byte with the shipped directory: MATCH says the GPU encoder and the cache reproduce it), s3_mtpM
#     quantizes it at K = M (MTPS, default 3 4 2 6) with LDLQ from the MTP calibration pass, shared_head.head at 6.
#     Their main models are checked identical to s3's, tensor by tensor.
#   - every ladder/RTN row and s3_mtp3: `trellm perplexity --ref models/tiny-glm --device cpu --json` on the
#     held-out Austen text (CPU, f32: thread-count independent, comparable with rows measured elsewhere), and the
#     weight error (scripts/exl3_weight_error.py) with the stored bits per real weight (trellis: padded tiles +
#     suh/svh + mcg; RTN: K + the scale/zero of each group, counted exactly by rtn_quantize.py).
#   - the MTP variants, s3 and the bf16 model: `trellm perplexity --mtp` on the same text (draft top-1 agreement
#     with the model's own greedy next token); then on the GPU (after the last quantize): the same on held-out
#     chat conversations (CHAT_IDS), and `trellm bench --speculative mtp` acceptance on a prose prompt.
# Perplexities run in the background, PPL_JOBS at a time (PPL_JOBS_CAPTURE while the capture runs) with
# PPL_THREADS threads each (the perplexity loop scales poorly with threads: one job per core is the throughput);
# jobs queued after the last quantize get PPL_TAIL_THREADS.
#
# Usage (from the repository root):
#   scripts/quality_table.sh TRELLM OUT CALIB_IDS [WORK]
#     TRELLM     trellm built with CUDA (e.g. build/trellm); test_trellis_viterbi_cuda and test_trellis_encode_cuda
#                beside it, if present, run at the end as diagnostics
#     OUT        results: summary.txt, results.jsonl (one record per variant), table.md, curves.svg, logs.tar.gz,
#                s3_mtp3.tar.gz (the candidate model directory; <= 8 files, rewritten as each step ends, so a run cut
#                short still leaves what was finished)
#     CALIB_IDS  the calibration rows: 256 x 1024 token ids of the Austen training split, made by
#                scripts/austen_calibration.py (models/tiny-glm-3bit/README.md); checked against its sha256 below
#     WORK       quantized models and the Hessian cache (default /tmp/trellm_quality; ~250 MB)
# Settings from the environment: KS, RTN, RTN_EXTRA, MTPS, CHAT_IDS (held-out chat token ids: scripts/make_chat_corpus.py
# --data DATA --out CHAT --fixtures '', then CHAT/heldout.npz's ids written space-separated; checked against its
# sha256 below; unset or missing: the chat rows are skipped), PPL_JOBS, PPL_JOBS_CAPTURE, PPL_THREADS,
# PPL_TAIL_THREADS, CAPTURE_THREADS, QUANT_JOBS, Q_THREADS, QUANT_DEADLINE / PPL_DEADLINE (no quantize /
# perplexity starts after this many seconds, so a 10-minute limit still sees the started ones finish); for a smoke
# test of the script itself: QDEVICE / GDEVICE (cuda), PPL_MAX_TOKENS (0 = all), SPEC_TOKENS (256).
# Time: estimated 7-8 min on a 16-core H200 machine; summary.txt has the time of every step.
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
fi
TRELLM=$(realpath "$1")
OUT=$(realpath -m "$2")
CALIB=$(realpath "$3")
WORK=$(realpath -m "${4:-/tmp/trellm_quality}")
NCPU=$(nproc)
KS=${KS:-"3 4 2 1 5 6 8 7"}
RTN=${RTN:-"4s128 3s128 2s128 5s128 6s128 8s128 4s32 3s32 2s32 5s32 6s32 4a128 3a128 2a128"}
RTN_EXTRA=${RTN_EXTRA:-"4s64 3s64 3a32 2a32"}   # queued last (after the trellis rows): skipped first by PPL_DEADLINE
MTPS=${MTPS:-"4 2 6"}          # s3_mtp3 is always made first (it fills the Hessian cache, MTP layer included)
QUANT_DEADLINE=${QUANT_DEADLINE:-330}
PPL_DEADLINE=${PPL_DEADLINE:-400}
PPL_JOBS=${PPL_JOBS:-$(( NCPU > 3 ? NCPU - 2 : 1 ))}
PPL_JOBS_CAPTURE=${PPL_JOBS_CAPTURE:-$(( NCPU / 2 > 0 ? NCPU / 2 : 1 ))}
PPL_THREADS=${PPL_THREADS:-1}
PPL_TAIL_THREADS=${PPL_TAIL_THREADS:-2}
CAPTURE_THREADS=${CAPTURE_THREADS:-$(( NCPU / 2 > 0 ? NCPU / 2 : 1 ))}
QUANT_JOBS=${QUANT_JOBS:-2}
Q_THREADS=${Q_THREADS:-2}
QDEVICE=${QDEVICE:-cuda}         # where the Viterbi runs (cpu only for a smoke test of this script)
GDEVICE=${GDEVICE:-cuda}         # the chat agreement and the speculative bench
PPL_MAX_TOKENS=${PPL_MAX_TOKENS:-0}  # 0: the whole held-out text (smoke tests: fewer)
CALIB_SHA256=eee20822874a52c9e184c71bdf7ebeae289e9cc9772f2b8df9a886ee18e422d5
CHAT_SHA256=976790192b6aec6c780dff7cc21725ebd989f16e5e30e9a7f4835a3e40c2d37f
SRC=models/tiny-glm
SHIP=models/tiny-glm-3bit
TEXT=tests/data/text/austen_heldout.txt

[ -f "$SRC/config.json" ] && [ -f "$TEXT" ] || { echo "run from the repository root ($SRC, $TEXT)" >&2; exit 2; }
[ -x "$TRELLM" ] || { echo "$TRELLM: not an executable" >&2; exit 2; }
sha=$(sha256sum "$CALIB" | cut -d' ' -f1)
if [ "$sha" != "$CALIB_SHA256" ]; then
  echo "$CALIB: sha256 $sha, expected $CALIB_SHA256 (scripts/austen_calibration.py --rows 256 --seq-len 1024)" >&2
  exit 2
fi
CHAT=""
if [ -n "${CHAT_IDS:-}" ] && [ -f "$CHAT_IDS" ]; then
  CHAT=$(realpath "$CHAT_IDS")
  [ "$(sha256sum "$CHAT" | cut -d' ' -f1)" = "$CHAT_SHA256" ] || { echo "$CHAT: not the held-out chat ids (sha256)" >&2; exit 2; }
fi
mkdir -p "$OUT" "$WORK/logs"
SUMMARY="$OUT/summary.txt"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { printf '[%4ds] %s\n' "$(elapsed)" "$*" | tee -a "$SUMMARY"; }
have_numpy=0
python3 -c "import numpy" 2>/dev/null && have_numpy=1

: > "$SUMMARY"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
[ "$commit" != '?' ] && ! git diff --quiet HEAD -- src tools scripts 2>/dev/null && commit="$commit (modified)"
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
say "trellm quality table at commit $commit; binary $TRELLM ($("$TRELLM" --version 2>&1 | head -1))"
say "calibration $CALIB (sha256 ok); chat ids ${CHAT:-none}; work folder $WORK"
say "host $(hostname): $NCPU CPUs ($cpu); GPU ${gpu:-none}"
say "perplexity: $PPL_JOBS jobs ($PPL_JOBS_CAPTURE during the capture) x $PPL_THREADS threads ($PPL_TAIL_THREADS at the tail); capture $CAPTURE_THREADS threads; quantize $QUANT_JOBS at a time x $Q_THREADS threads; numpy: $([ $have_numpy = 1 ] && echo yes || echo 'no (RTN rows and weight errors skipped)')"
{ echo "date=$(date -u +%Y-%m-%d)"; echo "commit=$commit"; echo "ppl_threads=$PPL_THREADS"
  echo "machine=CPU: $cpu, $NCPU CPUs (perplexity $PPL_JOBS jobs x $PPL_THREADS thread(s)); GPU: ${gpu:-none} (quantize --device cuda)"
} > "$WORK/logs/env.txt"

# Results: per variant files in $WORK/logs (see scripts/quality_table.py), gathered into $OUT at every step.
# Several background jobs publish: one at a time (flock).
publish() {
  (
    flock 9 2> /dev/null || true
    (cd "$WORK/logs" && tar czf "$OUT/logs.tar.gz.tmp" --exclude='*.tmp' . && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz") || true
    python3 scripts/quality_table.py --logs "$WORK/logs" --jsonl "$OUT/results.jsonl" --markdown "$OUT/table.md" \
      --svg "$OUT/curves.svg" > /dev/null 2>> "$WORK/logs/quality_table_py.log" || true
  ) 9> "$WORK/publish.lock" || true
}

# ---- the perplexity queue: jobs start in the order they were queued, at most max_jobs at once ----
# Each job is a background subshell holding a ticket (taken under a lock, so quantize jobs may queue too); it
# starts when every earlier ticket has started and one of the max_jobs slot locks is free, and holds that lock
# while it runs. max_jobs and the thread count are read from $QDIR when a job starts.
QDIR=$WORK/queue
rm -rf "$QDIR"; mkdir -p "$QDIR"
echo "$PPL_JOBS_CAPTURE" > "$QDIR/max_jobs"
echo "$PPL_THREADS" > "$QDIR/threads"
echo 0 > "$QDIR/started"
echo 0 > "$QDIR/tickets"
take_ticket() { ( flock 8; n=$(cat "$QDIR/tickets"); echo $((n + 1)) > "$QDIR/tickets"; echo "$n" ) 8> "$QDIR/tickets.lock"; }
# perplexity NAME DIR MODE: MODE "ref" (perplexity, KL and top-1 against bf16), "ref+mtp" (also the MTP drafts),
# "mtp" (perplexity and MTP drafts, no reference). Then the weight error of a trellis model, and publish.
perplexity() {
  local name=$1 dir=$2 mode=$3 my args=()
  my=$(take_ticket)
  case $mode in
    ref) args=(--ref "$SRC") ;;
    ref+mtp) args=(--ref "$SRC" --mtp) ;;
    mtp) args=(--mtp) ;;
  esac
  (
    while :; do
      if [ "$(cat "$QDIR/started")" -eq "$my" ]; then
        maxj=$(cat "$QDIR/max_jobs")
        for ((s = 0; s < maxj; s++)); do
          exec {fd}> "$QDIR/slot$s"
          if flock -n "$fd"; then break 2; fi
          exec {fd}>&-
        done
      fi
      sleep 0.5
    done
    echo $((my + 1)) > "$QDIR/started"  # only the holder of ticket `started` writes it
    if [ "$(elapsed)" -gt "$PPL_DEADLINE" ]; then
      say "$name: perplexity SKIPPED (past PPL_DEADLINE = $PPL_DEADLINE s)"
      exit 0
    fi
    threads=$(cat "$QDIR/threads")
    echo "$threads" > "$WORK/logs/$name.ppl_threads"
    t=$(date +%s)
    if "$TRELLM" --threads "$threads" perplexity --model "$dir" --text "$TEXT" --device cpu --json "${args[@]}" \
         --max-tokens "$PPL_MAX_TOKENS" \
         > "$WORK/logs/$name.ppl.json.tmp" 2> "$WORK/logs/$name.ppl.log"; then
      mv "$WORK/logs/$name.ppl.json.tmp" "$WORK/logs/$name.ppl.json"
      say "$name: perplexity ($mode, $threads thr) done in $(( $(date +%s) - t )) s: $(python3 -c "
import json; j = json.load(open('$WORK/logs/$name.ppl.json')); s = 'ppl %.4f' % j['perplexity']
if 'mean_kl' in j: s += '  mean KL %.6f  max KL %.4f  top-1 %.4f' % (j['mean_kl'], j['max_kl'], j['top1_agree'])
if 'mtp_agreement' in j: s += '  MTP agreement %.4f' % j['mtp_agreement']
print(s)" 2> /dev/null || cat "$WORK/logs/$name.ppl.json")"
    else
      say "$name: perplexity FAILED (see $name.ppl.log)"
    fi
    if [ $have_numpy = 1 ] && [ -f "$dir/quantization_config.json" ]; then
      python3 scripts/exl3_weight_error.py --model "$dir" --source "$SRC" --json > "$WORK/logs/$name.werr.json" \
        2> "$WORK/logs/$name.werr.log" || say "$name: weight error FAILED"
    fi
    publish
  ) &
}

# ---- quantize NAME K [--capture] [trellm quantize args]: GPU Viterbi; the caller passes --head-bits / --mtp-bits ----
CAL=(--calibration "$CALIB" --seq-len 1024 --calibration-rows 256 --hessian-cache "$WORK/hessians")
quantize() {
  local name=$1 k=$2 threads=$Q_THREADS t; shift 2
  if [ "${1:-}" = "--capture" ]; then threads=$CAPTURE_THREADS; shift; fi
  t=$(date +%s)
  if [ "$(elapsed)" -gt "$QUANT_DEADLINE" ]; then
    say "$name: SKIPPED (past QUANT_DEADLINE = $QUANT_DEADLINE s)"
    return 1
  fi
  rm -rf "$WORK/$name" "$WORK/$name.partial"
  echo "trellm quantize --model $SRC --out $name --bits $k $* --device cuda" | sed "s|$CALIB|austen_calib.ids|; s|$WORK/||g" \
    > "$WORK/logs/$name.quant_command"
  if "$TRELLM" quantize --model "$SRC" --out "$WORK/$name" --bits "$k" --device "$QDEVICE" --threads "$threads" "$@" \
       > "$WORK/logs/$name.quant.log" 2>&1; then
    echo "$(( $(date +%s) - t ))" > "$WORK/logs/$name.quant_seconds"
    stat -c %s "$WORK/$name/model.safetensors" > "$WORK/logs/$name.bytes"
    say "$name: quantized in $(( $(date +%s) - t )) s ($threads threads): $(grep 'wrote' "$WORK/logs/$name.quant.log" | sed 's/^trellm quantize: //')"
    return 0
  fi
  say "$name: quantize FAILED ($(tail -1 "$WORK/logs/$name.quant.log"))"
  return 1
}
# qjob NAME K MODE [quantize args]: at most QUANT_JOBS at once, in the background; a finished model is checked
# (after_quantize) and its perplexity queued (the job then waits for it).
q_pids=()
quant_running() {
  local p n=0
  for p in ${q_pids[@]+"${q_pids[@]}"}; do kill -0 "$p" 2> /dev/null && [ ! -f "$WORK/logs/q$p.done" ] && n=$((n + 1)); done
  echo $n
}
qjob() {
  local name=$1 k=$2 mode=$3; shift 3
  while [ "$(quant_running)" -ge "$QUANT_JOBS" ]; do sleep 0.5; done
  (
    if quantize "$name" "$k" "$@"; then ok=1; else ok=0; fi
    touch "$WORK/logs/q$BASHPID.done"  # the quantize is over (its perplexity may still be queued)
    if [ $ok = 1 ]; then after_quantize "$name"; perplexity "$name" "$WORK/$name" "$mode"; wait; fi
  ) &
  q_pids+=($!)
}
wait_quantizes() { while [ "$(quant_running)" -gt 0 ]; do sleep 0.5; done; }

# s3 against the shipped directory (made by the CPU encoder from the same source, rows and flags), file by file.
after_quantize() {
  local name=$1 all=MATCH f
  [ "$name" = s3 ] || return 0
  for f in "$SHIP"/*; do
    case "$(basename "$f")" in README*) continue ;; esac
    if cmp -s "$f" "$WORK/s3/$(basename "$f")"; then say "  s3 vs $SHIP: $(basename "$f") MATCH"
    else say "  s3 vs $SHIP: $(basename "$f") DIFFER"; all=DIFFER; fi
  done
  say "s3 (GPU encoder, cached Hessians) vs the shipped $SHIP (CPU encoder): $all"
  echo "$all" > "$WORK/logs/s3.vs_shipped"
}
# compare_main A B: the tensors outside the MTP layer, byte for byte (the MTP Linears come last in the plan).
compare_main() {
  python3 -c '
import json, struct, sys
def load(p):
    f = open(p + "/model.safetensors", "rb"); n = struct.unpack("<Q", f.read(8))[0]; h = json.loads(f.read(n)); d = f.read()
    return {k: d[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in h.items() if k != "__metadata__"}
a, b = load(sys.argv[1]), load(sys.argv[2])
mtp = "model.layers.%d." % json.load(open(sys.argv[3] + "/config.json"))["num_hidden_layers"]
ka = {k for k in a if not k.startswith(mtp)}; kb = {k for k in b if not k.startswith(mtp)}
same = ka == kb and all(a[k] == b[k] for k in ka)
print("MATCH" if same else "DIFFER", len(ka), "tensors outside", mtp + "*")' "$1" "$2" "$SRC"
}

# ================================ the run ================================
rm -rf "$WORK/hessians"   # captured afresh by the first quantize
say "capture + s3_mtp3 (the shipped recipe, MTP layer at K = 3) in the background; RTN baselines meanwhile"
qjob s3_mtp3 3 ref+mtp --capture --head-bits 6 --mtp-bits 3 "${CAL[@]}"
rtn_variant() {  # rtn_variant <K><s|a><G>: write it, queue its perplexity
  local spec=$1 b s g name scheme
  b=${spec:0:1}; s=${spec:1:1}; g=${spec:2}
  if [ "$s" = a ]; then name="rtn${b}a_g$g" scheme=asym; else name="rtn${b}_g$g" scheme=sym; fi
  rm -rf "$WORK/$name"
  if python3 scripts/rtn_quantize.py --model "$SRC" --bits "$b" --group "$g" --scheme "$scheme" --out "$WORK/$name" \
       > "$WORK/logs/$name.quant.log" 2>&1; then
    cp "$WORK/$name/rtn.json" "$WORK/logs/$name.rtn.json"
    perplexity "$name" "$WORK/$name" ref
  else
    say "$name: rtn_quantize FAILED ($(tail -1 "$WORK/logs/$name.quant.log"))"
  fi
}
if [ $have_numpy = 1 ]; then
  for spec in $RTN; do rtn_variant "$spec"; done
  say "RTN variants written and queued"
fi
wait_quantizes   # the capture: every later quantize reads its Hessians
echo "$PPL_JOBS" > "$QDIR/max_jobs"
publish

for k in $KS; do qjob "k$k" "$k" ref --head-bits 16 "${CAL[@]}"; done
qjob s3 3 mtp --head-bits 6 "${CAL[@]}"
for m in $MTPS; do qjob "s3_mtp$m" 3 mtp --head-bits 6 --mtp-bits "$m" "${CAL[@]}"; done
qjob k3_plain 3 ref --head-bits 16
wait_quantizes
say "quantizes done"
echo "$PPL_TAIL_THREADS" > "$QDIR/threads"
perplexity bf16 "$SRC" mtp
if [ $have_numpy = 1 ]; then for spec in $RTN_EXTRA; do rtn_variant "$spec"; done; fi
for m in 3 $MTPS; do
  if [ -f "$WORK/s3_mtp$m/config.json" ] && [ -f "$WORK/s3/config.json" ]; then
    r=$(compare_main "$WORK/s3" "$WORK/s3_mtp$m")
    echo "$r" > "$WORK/logs/s3_mtp$m.main_vs_s3"
    say "s3_mtp$m main model vs s3: $r"
  fi
done
[ -f "$WORK/s3_mtp3/config.json" ] && tar czf "$OUT/s3_mtp3.tar.gz" -C "$WORK" s3_mtp3 && say "candidate s3_mtp3 -> $OUT/s3_mtp3.tar.gz"
publish

# ---- on the GPU, after the quantizes: MTP drafts on held-out chat, speculative acceptance (one job, in order) ----
(
  if [ -n "$CHAT" ]; then
    for v in bf16 s3 s3_mtp3 $(for m in $MTPS; do echo "s3_mtp$m"; done); do
      dir=$WORK/$v; [ "$v" = bf16 ] && dir=$SRC
      [ -f "$dir/config.json" ] || continue
      if "$TRELLM" --threads 2 perplexity --model "$dir" --ids "$CHAT" --device "$GDEVICE" --mtp --json --max-tokens "$PPL_MAX_TOKENS" \
           > "$WORK/logs/$v.chat.json.tmp" 2> "$WORK/logs/$v.chat.log"; then
        mv "$WORK/logs/$v.chat.json.tmp" "$WORK/logs/$v.chat.json"
        say "$v: chat MTP agreement (GPU) $(python3 -c "import json;j=json.load(open('$WORK/logs/$v.chat.json'));print('%.4f over %d positions, ppl %.3f' % (j['mtp_agreement'], j['mtp_positions'], j['perplexity']))")"
      else
        say "$v: chat MTP agreement FAILED (see $v.chat.log)"
      fi
    done
  fi
  for v in s3 s3_mtp3 $(for m in $MTPS; do echo "s3_mtp$m"; done); do
    [ -f "$WORK/$v/config.json" ] || continue
    rm -f "$WORK/logs/$v.spec.jsonl"
    if timeout 120 "$TRELLM" --threads 2 bench --model "$WORK/$v" --speculative mtp --draft-tokens 1,2,3 \
         --prompt-file "$TEXT" --batch-depth 512 --decode-tokens "${SPEC_TOKENS:-256}" --repeats 1 --device "$GDEVICE" \
         --json "$WORK/logs/$v.spec.jsonl" > "$WORK/logs/$v.spec.log" 2>&1; then
      say "$v: speculative acceptance (GPU, K = 1,2,3) $(python3 -c "
import json
a = [json.loads(l) for l in open('$WORK/logs/$v.spec.jsonl')]
print(' '.join('%.3f' % r['value'] for r in a if r.get('metric') == 'acceptance'))" 2> /dev/null)"
    else
      say "$v: speculative bench FAILED (see $v.spec.log)"
    fi
  done
  publish
) &
gpu_pid=$!

# Diagnostics, if the cuda-labelled encoder tests were carried next to the binary (no test data needed): the
# CUDA Viterbi and quantize_linear on the GPU against the CPU, bit for bit.
for t in test_trellis_viterbi_cuda test_trellis_encode_cuda; do
  exe="$(dirname "$TRELLM")/$t"
  [ -x "$exe" ] || continue
  ( if timeout 300 "$exe" > "$WORK/logs/$t.log" 2>&1; then say "$t: $(grep -E '^\[  (PASSED  |SKIPPED )\] [0-9]+ test' "$WORK/logs/$t.log" | tr '\n' ' ')"
    else say "$t: FAILED (see $t.log)"; fi
    publish ) &
done

say "waiting for the background jobs"
wait "$gpu_pid" || true
wait || true   # every perplexity (queued by this shell or by the quantize jobs, which wait for theirs)
publish
say "done in $(elapsed) s; results in $OUT"
[ -f "$OUT/table.md" ] && cat "$OUT/table.md"
exit 0
