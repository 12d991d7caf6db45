#!/usr/bin/env bash
# The MLA attention GPU session in one go (device time is scarce): the CUDA tests, bench_attention,
# compute-sanitizer memcheck and racecheck on the small split/early-exit/prefill/graph cases, then an ncu
# breakdown of the v2 kernels (one call per shape). Eight files land in OUT_DIR.
# Usage: bench/run_attention.sh BIN_DIR OUT_DIR COMMIT      (BIN_DIR holds test_cuda_* and bench_attention)
set -u
BIN=$1 OUT=$2 COMMIT=$3
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv >"$OUT/bench.md" 2>&1
summ() { grep -E "^\[ +(mla|FAILED|PASSED|SKIPPED) |Failure|error:|Expected|Which is|rc=" | head -${1:-40}; }
(timeout 200 "$BIN/test_cuda_mla"; echo "rc=$?") >"$OUT/test_mla.log" 2>&1; summ <"$OUT/test_mla.log"
( (timeout 60 "$BIN/test_cuda_ops"; echo "rc=$?"); (timeout 90 "$BIN/test_cuda_model"; echo "rc=$?") ) >"$OUT/test_other.log" 2>&1
summ 12 <"$OUT/test_other.log"
(timeout 150 "$BIN/bench_attention" --commit "$COMMIT" --json "$OUT/attention.jsonl"; echo "rc=$?") >>"$OUT/bench.md" 2>&1
cat "$OUT/bench.md"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
(timeout 100 $CS --tool memcheck --error-exitcode 9 "$BIN/test_cuda_mla" \
   --gtest_filter='CudaMla.SplitsAndEarlyExits:CudaMla.DecodeGraph*'; echo "rc=$?") >"$OUT/memcheck.log" 2>&1
tail -3 "$OUT/memcheck.log"
(timeout 100 $CS --tool racecheck --error-exitcode 9 "$BIN/test_cuda_mla" --gtest_filter='CudaMla.SplitsAndEarlyExits'; \
   echo "rc=$?") >"$OUT/racecheck.log" 2>&1
tail -3 "$OUT/racecheck.log"
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
(timeout 150 $NCU -k 'regex:attend|qlat|out_decode|combine|prefill_prepare' --section SpeedOfLight --section WarpStateStats \
   --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,dram__bytes_read.sum,lts__t_bytes.sum \
   "$BIN/bench_attention" --profile; echo "rc=$?") >"$OUT/ncu.txt" 2>&1
grep -E "(attend|qlat_decode|out_decode|combine|prefill_prepare)_?kernel|profiled|Duration|DRAM Throughput|Compute \(SM\) Th|hmma|dram__bytes|rc=|==ERR|==WARN" \
  "$OUT/ncu.txt" | grep -v "^ *----" | cut -c1-110 | head -90
