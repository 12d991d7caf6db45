#!/usr/bin/env bash
# A/B of a decode-path switch in one run on one GPU (e.g. TRELLM_MLA_DECODE=v2|v3, TRELLM_PDL=0|1): `trellm bench` on the
# synthetic full-size GLM-4.7-Flash (3 bpw, 6-bit head), the variants interleaved ROUNDS times so that drift
# between them shows, then the median decode tok/s per (variant, depth) and each one's ratio to the first variant.
# JSON lines (with the variant in "variant") go to OUT_DIR/decode_ab.jsonl, the table to OUT_DIR/decode_ab.md.
#
#   scripts/bench_decode_ab.sh [TRELLM] [OUT_DIR]
# Environment: VAR=TRELLM_MLA_DECODE  VALUES="v2 v3"  ROUNDS=2  DEPTHS=0,1024,32768  TOKENS=64
#              BATCH=1,2,4,8 (the batched engine's figures too; empty: skip)  TIMEOUT=150 (per bench call)
#              COMMIT=rev  GPU=name
#              VARIANTS="name=BINARY:VALUE ..." (instead of TRELLM and VALUES): variants that differ in the binary
#                too (builds of unlanded patches), each run as VAR=VALUE with BINARY and shared libraries from
#                BINARY's folder first; named in the table and in "variant" by `name`
#              GUARD=seconds: no bench call starts after that long (a device call's budget), 0: none
set -euo pipefail
TRELLM=${1:-build/trellm}
OUT_DIR=${2:-${OUT:-/tmp/decode_ab}}
VAR=${VAR:-TRELLM_MLA_DECODE} VALUES=${VALUES:-v2 v3} ROUNDS=${ROUNDS:-2}
DEPTHS=${DEPTHS:-0,1024,32768} TOKENS=${TOKENS:-64} BATCH=${BATCH-1,2,4,8} TIMEOUT=${TIMEOUT:-150}
GUARD=${GUARD:-0}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
GPU=${GPU:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)}
mkdir -p "$OUT_DIR"
RAW="$OUT_DIR/raw"
mkdir -p "$RAW"
# name=BINARY:VALUE per variant; without VARIANTS, each value of VALUES with TRELLM, named by the value
declare -A BIN VAL LABEL
NAMES=()
if [ -n "${VARIANTS:-}" ]; then
  for spec in $VARIANTS; do
    n=${spec%%=*} rest=${spec#*=}
    NAMES+=("$n") BIN[$n]=${rest%:*} VAL[$n]=${rest##*:} LABEL[$n]="$n ($VAR=${rest##*:})"
  done
else
  for v in $VALUES; do NAMES+=("$v") BIN[$v]=$TRELLM VAL[$v]=$v LABEL[$v]="$VAR=$v"; done
fi
T0=$SECONDS
bench() {  # name, output stem, bench arguments...
  local n=$1 stem=$2
  shift 2
  if [ "$GUARD" -gt 0 ] && [ $((SECONDS - T0)) -ge "$GUARD" ]; then echo "guard: $stem not run"; return 0; fi
  env "$VAR=${VAL[$n]}" LD_LIBRARY_PATH="$(dirname "${BIN[$n]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    timeout "$TIMEOUT" "${BIN[$n]}" bench --synthetic glm-4.7-flash --bits 3 --head-bits 6 --device cuda --repeats 3 \
    --decode-tokens "$TOKENS" --prompt-lens 16 "$@" --json "$RAW/$stem.jsonl" > "$RAW/$stem.log" 2>&1 \
    || echo "bench failed (rc $?): $RAW/$stem.log"
}

for r in $(seq 1 "$ROUNDS"); do
  for n in "${NAMES[@]}"; do
    echo "=== round $r: ${LABEL[$n]}"
    bench "$n" "$n.$r" --depths "$DEPTHS"
    if [ -n "$BATCH" ]; then bench "$n" "$n.$r.batch" --batch "$BATCH" --batch-depth 512 --prefix-prompt 0; fi
  done
done

labels=()
for n in "${NAMES[@]}"; do labels+=("$n=${LABEL[$n]}"); done
python3 - "$RAW" "$OUT_DIR" "$COMMIT" "$GPU" "${labels[@]}" <<'EOF'
import glob, json, os, statistics, sys
raw, out, commit, gpu, *named = sys.argv[1:]
values = [x.split("=", 1)[0] for x in named]
label = dict(x.split("=", 1) for x in named)
rows = {}  # (variant, bench, metric, shape) -> [values]
with open(os.path.join(out, "decode_ab.jsonl"), "a") as js:
    for v in values:
        for f in sorted(glob.glob(os.path.join(raw, f"{v}.*.jsonl"))):
            for line in open(f):
                d = json.loads(line)
                d.update(variant=label[v], commit=commit, gpu=gpu or d.get("gpu"))
                js.write(json.dumps(d) + "\n")
                if d["unit"] == "tok/s":
                    rows.setdefault((v, d["bench"], d["metric"], d["shape"]), []).append(d["value"])
keys = sorted({k[1:] for k in rows})
lines = [f"| bench | metric | shape | " + " | ".join(label[v] for v in values) + " |",
         "|---|---|---|" + "---:|" * len(values)]
for b, m, s in keys:
    med = [statistics.median(rows[(v, b, m, s)]) if (v, b, m, s) in rows else float("nan") for v in values]
    # after the first variant: the median and its ratio to the first's
    cells = [f"{med[0]:.1f}"] + [f"{x:.1f} ({x / med[0]:.3f})" for x in med[1:]]
    lines.append(f"| {b} | {m} | {s} | " + " | ".join(cells) + " |")
table = "\n".join(lines)
open(os.path.join(out, "decode_ab.md"), "w").write(f"commit {commit}, {gpu}; medians of the rounds\n\n{table}\n")
print(table)
EOF
