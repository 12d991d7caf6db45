#!/usr/bin/env bash
# One device call for the pending patches (README.md): the CUDA tests of the builds, then the end-to-end A/B
# interleaved, then kernel clocks. Carry .devbuild/ho.tar.xz, hl.tar.xz and hz.tar.xz (dev/pending/pack.sh) and
# this file; run from the repository root:  bash dev/pending/run_device.sh   (under $OUT: decode_ab.md, the table
# of medians; decode_ab.jsonl, every bench line with its variant; raw/ the bench logs; logs.tgz the tests')
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
# The A/B: rounds of the four variants interleaved (scripts/bench_decode_ab.sh), until GUARD
left=$((GUARD - (SECONDS - T0)))
VAR=TRELLM_GEMV_CLUSTER_SPLIT ROUNDS=3 BATCH=1,8 GUARD=$((left > 1 ? left : 1)) \
  VARIANTS="o0=.devbuild/ho/trellm:0 o1=.devbuild/ho/trellm:1 l1=.devbuild/hl/trellm:1 z1=.devbuild/hz/trellm:1" \
  bash scripts/bench_decode_ab.sh - $OUT
for v in o0 z1; do
  [ $((SECONDS - T0)) -lt $((GUARD + 20)) ] || break
  b=.devbuild/h${v:0:1}
  LD_LIBRARY_PATH=$PWD/$b TRELLM_GEMV_CLUSTER_SPLIT=${v:1:1} timeout 100 $b/trellm_clk bench --synthetic glm-4.7-flash \
    --bits 3 --head-bits 6 --device cuda --repeats 3 --decode-tokens 64 --prompt-lens 16 --depths 0 \
    --kernel-clocks $L/clk_$v.csv > $OUT/clk_$v.log 2>&1
  echo "clocks $v rc=$?"
done
rm -f $L/*.csv  # the per-launch CSVs are large; the clocks' summaries are in clk_*.log
tar czf $OUT/logs.tgz -C $OUT logs raw && rm -rf $L $OUT/raw
echo "total $((SECONDS - T0)) s"
