#!/usr/bin/env bash
# One device call for the pending patches (README.md): the CUDA tests of the builds, then the end-to-end A/B
# interleaved, then kernel clocks. Carry .devbuild/ho.tar.xz, hl.tar.xz and hz.tar.xz (dev/pending/pack.sh) and
# this file; run from the repository root:  bash dev/pending/run_device.sh   (logs and all.jsonl under $OUT)
# Variants: o0 = main + patch 1 with TRELLM_GEMV_CLUSTER_SPLIT=0 (main's kernels: the baseline), o1 = o_proj in
# two clusters, l1 = + patch 2 (the input norm in the q_a/kv_a prologue), z1 = + patch 3 (no zero row).
# GUARD (s from the start, default 210; the tests take ~75 s): no new bench run starts after it, so a short device
# budget still brings figures back.
set -u
T0=$SECONDS
GUARD=${GUARD:-210}
(cd .devbuild && for t in ho hl hz; do tar xJf $t.tar.xz; done)
L=$OUT/logs
mkdir -p $L
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
for b in hz hl ho; do
  export LD_LIBRARY_PATH=$PWD/.devbuild/$b
  for t in test_trellis_kernels test_cuda_ops test_cuda_step_runner test_cuda_model test_cuda_trellis_model test_cuda_engine; do
    s=$SECONDS
    timeout 150 .devbuild/$b/$t --gtest_brief=1 > $L/$b.$t.log 2>&1
    rc=$?
    echo "$b $t rc=$rc $((SECONDS - s)) s $(grep -E '^\[  (PASSED|FAILED)' $L/$b.$t.log | tr '\n' ' ')"
    [ $rc -ne 0 ] && grep -E "Failure|FAILED|error" $L/$b.$t.log | head -12
  done
done
grep -E "gemv tail 2048x5120|normed pair" $L/hz.test_trellis_kernels.log | head -12
BENCH=(bench --synthetic glm-4.7-flash --bits 3 --head-bits 6 --device cuda --repeats 3 --decode-tokens 64 --prompt-lens 16)
dec() {  # the decode tok/s of a bench JSON file, one line
  python3 -c "
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    if d['unit'] == 'tok/s' and 'decode' in d['metric']: print(d['shape'].split()[-1], round(d['value'], 1), end='; ')
" "$1"
}
run() {  # variant (o0 o1 l1 z1), kind (d: depths, b: batch), round
  local v=$1 b=h${1:0:1} sp=${1:1:1} args
  [ $((SECONDS - T0)) -lt $GUARD ] || return 0
  export LD_LIBRARY_PATH=$PWD/.devbuild/$b
  if [ $2 = d ]; then args=(--depths 0,1024,32768); else args=(--batch 1,8 --batch-depth 512 --prefix-prompt 0); fi
  TRELLM_GEMV_CLUSTER_SPLIT=$sp timeout 120 .devbuild/$b/trellm "${BENCH[@]}" "${args[@]}" --json $L/$v.$3.$2.jsonl \
    > $L/$v.$3.$2.log 2>&1
  echo "$2 round $3 $v rc=$?: $(dec $L/$v.$3.$2.jsonl)"
}
for r in 1 2; do for v in o0 o1 l1 z1; do run $v d $r; done; done
for v in o0 o1 l1 z1; do run $v b 1; done
for v in o0 o1 l1 z1; do run $v d 3; done
for v in o0 z1; do
  [ $((SECONDS - T0)) -lt $((GUARD + 20)) ] || break
  b=h${v:0:1}
  export LD_LIBRARY_PATH=$PWD/.devbuild/$b
  TRELLM_GEMV_CLUSTER_SPLIT=${v:1:1} timeout 100 .devbuild/$b/trellm_clk "${BENCH[@]}" --depths 0 --kernel-clocks $L/clk_$v.csv \
    > $OUT/clk_$v.log 2>&1
  echo "clocks $v rc=$?"
done
python3 - "$OUT" "$L" <<'PY'
import glob, json, os, sys
out, logs = sys.argv[1:]
with open(os.path.join(out, "all.jsonl"), "w") as o:
    for f in sorted(glob.glob(os.path.join(logs, "*.jsonl"))):
        v, r = os.path.basename(f).split(".")[:2]
        for line in open(f):
            d = json.loads(line)
            d.update(variant=v, round=int(r))
            o.write(json.dumps(d, separators=(",", ":")) + "\n")
PY
python3 - "$OUT/all.jsonl" <<'PY'
import collections, json, statistics, sys
runs = collections.defaultdict(list)  # (shape, variant) -> decode tok/s of each round
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["unit"] == "tok/s" and d["metric"] in ("decode_tok_s", "decode_tok_s_total"):
        runs[(d["shape"].split(" head 6 ")[-1], d["variant"])].append(d["value"])
variants = ["o0", "o1", "l1", "z1"]
print("decode tok/s, mean of the rounds [n] (ratio to o0)")
for shape in sorted({k[0] for k in runs}):
    base = statistics.mean(runs[(shape, "o0")]) if runs.get((shape, "o0")) else None
    cells = []
    for v in variants:
        r = runs.get((shape, v))
        if not r:
            cells.append(f"{v} -")
            continue
        m = statistics.mean(r)
        cells.append(f"{v} {m:.1f} [{len(r)}]" + (f" ({m / base:.3f})" if base else ""))
    print(f"  {shape:28s} " + "  ".join(cells))
PY
rm -f $L/*.csv  # the per-launch CSVs are large; the clocks' summaries are in clk_*.log
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
echo "total $((SECONDS - T0)) s"
