#!/usr/bin/env bash
# Issue 18's full-size measurement (bench/results/quantize_full.md): a synthetic bf16 GLM-4.7-Flash checkpoint of
# LAYERS layers in the real shapes, random calibration ids, then `trellm quantize` on the GPU with its progress
# timestamped, GPU memory and utilisation sampled each second, and at the end the wall time, the time a MoE layer
# takes (from the progress lines: a MoE layer is 200 Linears) and the projection to the 47 layers, printed and
# appended as one JSON line to $JSON (default OUT_DIR/quantize_full.jsonl).
#
#   scripts/bench_quantize_full.sh [TRELLM] [OUT_DIR]
#     TRELLM   the trellm binary (default build/trellm)
#     OUT_DIR  logs: quantize.log (timestamped), gpu.csv, summary.txt (default $OUT when set, else /tmp/qbench)
# Environment: LAYERS=8 BITS=3 HEAD_BITS=6 ROWS=128 SEQ=2048 WORK=/tmp (checkpoint, ids and output live there)
#              TIMEOUT=540 (seconds for the quantize command; device commands are limited to 10 minutes)
#              JSON=FILE  COMMIT=rev (default: git rev-parse of the working tree)  GPU=name (default: nvidia-smi's)
#              TRACE=1: also write the conversion's timeline to OUT_DIR/trace.json (`trellm quantize --trace`)
#              SUMMARIZE_ONLY=1: no run, only the summary of the logs already in OUT_DIR
set -euo pipefail
TRELLM=${1:-build/trellm}
OUT_DIR=${2:-${OUT:-/tmp/qbench}}
LAYERS=${LAYERS:-8} BITS=${BITS:-3} HEAD_BITS=${HEAD_BITS:-6} ROWS=${ROWS:-128} SEQ=${SEQ:-2048}
WORK=${WORK:-/tmp} TIMEOUT=${TIMEOUT:-540}
JSON=${JSON:-$OUT_DIR/quantize_full.jsonl}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
GPU=${GPU:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)}
mkdir -p "$OUT_DIR"

if [ "${SUMMARIZE_ONLY:-0}" != 1 ]; then
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
    --calibration "$IDS" --calibration-rows "$ROWS" --seq-len "$SEQ" --device cuda \
    ${TRACE:+--trace "$OUT_DIR/trace.json"} 2>&1 | stdbuf -o0 tr '\r' '\n' | \
    grep --line-buffered -vE '^\s*$' | while IFS= read -r l; do echo "$(( $(date +%s) - t0 )) $l"; done \
    > "$OUT_DIR/quantize.log" || echo "trellm quantize failed or timed out: see $OUT_DIR/quantize.log"
  kill $SMI 2>/dev/null || true
fi

# Per MoE layer: the slope of the timestamp over the Linears count between the second progress line and the last one
# before lm_head (layer 0 is dense; its Linears and the load come before).
python3 - "$OUT_DIR" "$LAYERS" "$BITS" "$HEAD_BITS" "$ROWS" "$SEQ" "$COMMIT" "$GPU" "$JSON" <<'EOF' | \
  tee "$OUT_DIR/summary.txt"
import datetime, json, re, sys
out, layers, bits, head_bits, rows, seq, commit, gpu, json_path = sys.argv[1:]
layers, rows, seq = int(layers), int(rows), int(seq)
pts, wall, rss = [], None, None
for line in open(f"{out}/quantize.log"):
    m = re.match(r"(\d+) .*\] +\d+% (\d+)/(\d+) Linears", line)
    if m:
        pts.append((int(m.group(1)), int(m.group(2)), int(m.group(3))))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", line)
    if m:
        wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", line)
    if m:
        rss = int(m.group(1))
    if "wrote " in line:
        print(line.split(" ", 1)[1].strip())
# gpu.csv: "MiB, %" per line, with or without units
gpu_rows = [[int(re.sub(r"\D", "", v)) for v in l.split(",")[:2]] for l in open(f"{out}/gpu.csv") if "," in l]
peak_gpu = max((g[0] for g in gpu_rows), default=None)
busy = sum(g[1] > 50 for g in gpu_rows)
rec = {"date": datetime.date.today().isoformat(), "gpu": gpu, "commit": commit, "bench": "quantize_checkpoint",
       "layers": layers, "bits": float(bits), "head_bits": int(head_bits), "calibration_rows": rows,
       "calibration_seq": seq, "wall_s": wall, "peak_gpu_mib": peak_gpu, "peak_rss_kb": rss,
       "gpu_busy_samples": busy, "gpu_samples": len(gpu_rows)}
inner = [p for p in pts if p[1] < p[2]]
if wall and len(inner) >= 3:
    (t1, n1, _), (t2, n2, _) = inner[1], inner[-1]
    per_layer = (t2 - t1) / ((n2 - n1) / 200)
    fixed = wall - (layers - 1) * per_layer
    rec.update(moe_layer_s=round(per_layer, 2), fixed_s=round(fixed, 1),
               projected_47_layers_min=round((fixed + 46 * per_layer) / 60, 2))
    print(f"wall {wall:.1f} s; a MoE layer {per_layer:.1f} s (Linears {n1}..{n2}); fixed part {fixed:.1f} s; "
          f"47 layers projected: {(fixed + 46 * per_layer) / 60:.1f} min")
else:
    print("too few progress lines for a per-layer figure (did the run finish?)")
print(f"peak GPU memory {peak_gpu} MiB; GPU busy (utilization > 50 %) in {busy} of {len(gpu_rows)} one-second samples; "
      f"peak host RSS {rss} kB")
line = json.dumps(rec)
print(line)
with open(json_path, "a") as f:
    f.write(line + "\n")
EOF
