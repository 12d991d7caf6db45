#!/bin/bash
# One device call (issue 5): tests, benchmarks and sanitizers of the trellis kernels from prebuilt binaries
# in build-bin/ (built on the dev machine: cudart static, cuBLAS 13 dynamic). Logs go to $OUT.
#   bash dev/kernels/run_device.sh COMMIT [bench args...]
set -o pipefail
COMMIT=${1:-unknown}; shift
B=build-bin
chmod +x $B/* 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee $OUT/gpu.txt
echo "== tests"; timeout 240 $B/test_trellis_kernels 2>&1 | tee $OUT/tests.log | grep -E "^\[  (FAILED|PASSED|  OK) |Failure|Expected|Which is|err|dequant|moe m" | head -150
echo "== bench"; timeout 200 $B/trellis_bench --json $OUT/kernels.jsonl --commit $COMMIT "$@" 2>&1 | tee $OUT/bench.log
echo "== memcheck"; timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 $B/test_trellis_kernels \
  --gtest_filter='*Small*:*Route*:*GraphReplay*' > $OUT/memcheck.log 2>&1; echo "memcheck rc=$?"; tail -4 $OUT/memcheck.log
echo "== racecheck"; timeout 120 compute-sanitizer --tool racecheck --error-exitcode 9 $B/test_trellis_kernels \
  --gtest_filter='*MatmulSmall*:*DequantizeSmall*:*MoeSmall*' > $OUT/racecheck.log 2>&1; echo "racecheck rc=$?"; tail -4 $OUT/racecheck.log
