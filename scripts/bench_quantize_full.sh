#!/usr/bin/env bash
# Issue 18's full-size measurement (bench/results/quantize_full.md): a synthetic bf16 GLM-4.7-Flash checkpoint of
# LAYERS layers in the real shapes, random calibration ids, then `trellm quantize` on the GPU with its progress
# timestamped, GPU memory and utilisation sampled each second, and at the end the wall time, the time a MoE layer
# takes (from the progress lines: a MoE layer is 200 Linears) and the projection to the 47 layers.
#
#   scripts/bench_quantize_full.sh [TRELLM] [OUT_DIR]
#     TRELLM   the trellm binary (default build/trellm)
#     OUT_DIR  logs: quantize.log (timestamped), gpu.csv, summary.txt (default $OUT when set, else /tmp/qbench)
# Environment: LAYERS=8 BITS=3 HEAD_BITS=6 ROWS=128 SEQ=2048 WORK=/tmp (checkpoint, ids and output live there)
#              TIMEOUT=540 (seconds for the quantize command; device commands are limited to 10 minutes)
set -euo pipefail
TRELLM=${1:-build/trellm}
OUT_DIR=${2:-${OUT:-/tmp/qbench}}
LAYERS=${LAYERS:-8} BITS=${BITS:-3} HEAD_BITS=${HEAD_BITS:-6} ROWS=${ROWS:-128} SEQ=${SEQ:-2048}
WORK=${WORK:-/tmp} TIMEOUT=${TIMEOUT:-540}
mkdir -p "$OUT_DIR"
SRC="$WORK/syn$LAYERS" IDS="$WORK/cal_${ROWS}x$SEQ.ids" DST="$WORK/q${LAYERS}_$BITS"

[ -f "$SRC/config.json" ] || "$TRELLM" bench --synthetic glm-4.7-flash --bits 0 --head-bits 0 --layers "$LAYERS" \
  --save "$SRC" --device cuda 2>&1 | tail -1
[ -f "$IDS" ] || python3 -c "
import numpy as np
r = np.random.default_rng(7).integers(0, 154880, size=($ROWS, $SEQ))
open('$IDS', 'w').write('\n'.join(' '.join(map(str, row)) for row in r))"
rm -rf "$DST" "$DST.partial"

nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 1000 > "$OUT_DIR/gpu.csv" &
SMI=$!
trap 'kill $SMI 2>/dev/null || true' EXIT
t0=$(date +%s)
/usr/bin/time -v timeout "$TIMEOUT" "$TRELLM" quantize -m "$SRC" -o "$DST" -b "$BITS" --head-bits "$HEAD_BITS" \
  --calibration "$IDS" --calibration-rows "$ROWS" --seq-len "$SEQ" --device cuda 2>&1 | stdbuf -o0 tr '\r' '\n' | \
  grep --line-buffered -vE '^\s*$' | while IFS= read -r l; do echo "$(( $(date +%s) - t0 )) $l"; done \
  > "$OUT_DIR/quantize.log" || echo "trellm quantize failed or timed out: see $OUT_DIR/quantize.log"
kill $SMI 2>/dev/null || true

# Per MoE layer: the slope of the timestamp over the Linears count between the second progress line and the last one
# before lm_head (layer 0 is dense; its Linears and the load come before).
python3 - "$OUT_DIR" "$LAYERS" <<'EOF' | tee "$OUT_DIR/summary.txt"
import re, sys
out, layers = sys.argv[1], int(sys.argv[2])
pts, wall = [], None
for line in open(f"{out}/quantize.log"):
    m = re.match(r"(\d+) .*\] +\d+% (\d+)/(\d+) Linears", line)
    if m:
        pts.append((int(m.group(1)), int(m.group(2)), int(m.group(3))))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", line)
    if m:
        wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    if "Maximum resident" in line or "wrote " in line:
        print(line.split(" ", 1)[1].strip())
gpu = [l.split(",") for l in open(f"{out}/gpu.csv") if "," in l]
if gpu:
    print(f"peak GPU memory {max(int(g[0]) for g in gpu)} MiB; GPU busy (utilization > 50 %) in "
          f"{sum(int(g[1]) > 50 for g in gpu)} of {len(gpu)} one-second samples")
inner = [p for p in pts if p[1] < p[2]]
if wall and len(inner) >= 3:
    (t1, n1, _), (t2, n2, _) = inner[1], inner[-1]
    per_layer = (t2 - t1) / ((n2 - n1) / 200)
    fixed = wall - (layers - 1) * per_layer
    print(f"wall {wall:.1f} s; a MoE layer {per_layer:.1f} s (Linears {n1}..{n2}); fixed part {fixed:.1f} s; "
          f"47 layers projected: {(fixed + 46 * per_layer) / 60:.1f} min")
else:
    print("too few progress lines for a per-layer figure (did the run finish?)")
EOF
