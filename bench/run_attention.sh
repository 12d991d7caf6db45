#!/usr/bin/env bash
# The MLA attention GPU session in one go (device time is scarce): the CUDA tests, bench_attention, then
# compute-sanitizer memcheck and racecheck on the small split/early-exit/prefill/graph cases.
# Usage: bench/run_attention.sh BIN_DIR OUT_DIR COMMIT      (BIN_DIR holds test_cuda_* and bench_attention)
set -u
BIN=$1 OUT=$2 COMMIT=$3
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
summ() { grep -E "^\[ +(mla|OK|FAILED|PASSED|SKIPPED) |Failure|error:|Expected|Which is|rel|rc=" | grep -v "^\[       OK" | head -${2:-40}; }
(timeout 200 "$BIN/test_cuda_mla"; echo "rc=$?") >"$OUT/test_mla.log" 2>&1; summ <"$OUT/test_mla.log"
(timeout 60 "$BIN/test_cuda_ops"; echo "rc=$?") >"$OUT/test_ops.log" 2>&1; summ <"$OUT/test_ops.log" 10
(timeout 90 "$BIN/test_cuda_model"; echo "rc=$?") >"$OUT/test_model.log" 2>&1; summ <"$OUT/test_model.log" 10
(timeout 150 "$BIN/bench_attention" --commit "$COMMIT" --json "$OUT/attention.jsonl"; echo "rc=$?") >"$OUT/bench.md" 2>&1
cat "$OUT/bench.md"
CS=compute-sanitizer
command -v $CS >/dev/null || CS=/usr/local/cuda/bin/compute-sanitizer
(timeout 100 $CS --tool memcheck --error-exitcode 9 "$BIN/test_cuda_mla" \
   --gtest_filter='CudaMla.SplitsAndEarlyExits:CudaMla.DecodeGraph*'; echo "rc=$?") >"$OUT/memcheck.log" 2>&1
tail -4 "$OUT/memcheck.log"
(timeout 100 $CS --tool racecheck --error-exitcode 9 "$BIN/test_cuda_mla" --gtest_filter='CudaMla.SplitsAndEarlyExits'; \
   echo "rc=$?") >"$OUT/racecheck.log" 2>&1
tail -4 "$OUT/racecheck.log"
