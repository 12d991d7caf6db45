#!/usr/bin/env bash
# A/B of a decode-path switch in one run on one GPU (e.g. TRELLM_MLA_DECODE=v2|v3, TRELLM_PDL=0|1): `trellm bench` on the
# synthetic full-size GLM-4.7-Flash (3 bpw, 6-bit head), the variants interleaved ROUNDS times so that drift
# between them shows, then the median decode tok/s per (variant, depth) and the ratio to the first variant.
# JSON lines (with the variant in "variant") go to OUT_DIR/decode_ab.jsonl, the table to OUT_DIR/decode_ab.md.
#
#   scripts/bench_decode_ab.sh [TRELLM] [OUT_DIR]
# Environment: VAR=TRELLM_MLA_DECODE  VALUES="v2 v3"  ROUNDS=2  DEPTHS=0,1024,32768  TOKENS=64
#              BATCH=1,2,4,8 (the batched engine's figures too; empty: skip)  TIMEOUT=150 (per bench call)
#              COMMIT=rev  GPU=name
set -euo pipefail
TRELLM=${1:-build/trellm}
OUT_DIR=${2:-${OUT:-/tmp/decode_ab}}
VAR=${VAR:-TRELLM_MLA_DECODE} VALUES=${VALUES:-v2 v3} ROUNDS=${ROUNDS:-2}
DEPTHS=${DEPTHS:-0,1024,32768} TOKENS=${TOKENS:-64} BATCH=${BATCH-1,2,4,8} TIMEOUT=${TIMEOUT:-150}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
GPU=${GPU:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)}
mkdir -p "$OUT_DIR"
RAW="$OUT_DIR/raw"
mkdir -p "$RAW"
BENCH=("$TRELLM" bench --synthetic glm-4.7-flash --bits 3 --head-bits 6 --device cuda --repeats 3
       --decode-tokens "$TOKENS" --prompt-lens 16)

for r in $(seq 1 "$ROUNDS"); do
  for v in $VALUES; do
    echo "=== round $r: $VAR=$v"
    env "$VAR=$v" timeout "$TIMEOUT" "${BENCH[@]}" --depths "$DEPTHS" --json "$RAW/$v.$r.jsonl" \
      > "$RAW/$v.$r.log" 2>&1 || echo "bench failed (rc $?): $RAW/$v.$r.log"
    if [ -n "$BATCH" ]; then
      env "$VAR=$v" timeout "$TIMEOUT" "${BENCH[@]}" --batch "$BATCH" --batch-depth 512 --prefix-prompt 0 \
        --json "$RAW/$v.$r.batch.jsonl" > "$RAW/$v.$r.batch.log" 2>&1 || echo "batched bench failed (rc $?)"
    fi
  done
done

python3 - "$RAW" "$OUT_DIR" "$VAR" "$COMMIT" "$GPU" $VALUES <<'EOF'
import glob, json, os, statistics, sys
raw, out, var, commit, gpu, *values = sys.argv[1:]
rows = {}  # (variant, bench, metric, shape) -> [values]
with open(os.path.join(out, "decode_ab.jsonl"), "a") as js:
    for v in values:
        for f in sorted(glob.glob(os.path.join(raw, f"{v}.*.jsonl"))):
            for line in open(f):
                d = json.loads(line)
                d.update(variant=f"{var}={v}", commit=commit, gpu=gpu or d.get("gpu"))
                js.write(json.dumps(d) + "\n")
                if d["unit"] == "tok/s":
                    rows.setdefault((v, d["bench"], d["metric"], d["shape"]), []).append(d["value"])
keys = sorted({k[1:] for k in rows})
lines = [f"| bench | metric | shape | " + " | ".join(f"{var}={v}" for v in values) + f" | {values[-1]} / {values[0]} |",
         "|---|---|---|" + "---:|" * (len(values) + 1)]
for b, m, s in keys:
    med = [statistics.median(rows[(v, b, m, s)]) if (v, b, m, s) in rows else float("nan") for v in values]
    lines.append(f"| {b} | {m} | {s} | " + " | ".join(f"{x:.1f}" for x in med) + f" | {med[-1] / med[0]:.3f} |")
table = "\n".join(lines)
open(os.path.join(out, "decode_ab.md"), "w").write(f"commit {commit}, {gpu}; medians of the rounds\n\n{table}\n")
print(table)
EOF
