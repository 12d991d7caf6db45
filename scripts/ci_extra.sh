#!/usr/bin/env bash
# The CI phases written for issues 17 and 19 (sanitizers, fuzz smoke, the Arm cross test), not yet in .ci/run: the
# sanitized suite has not yet been seen to pass end to end in CI time. Run by hand: scripts/ci_extra.sh
set -euo pipefail
cd "$(dirname "$0")/.."
phase() { local name=$1; shift; local t0=$SECONDS; echo "=== $name"; "$@"; echo "=== $name: $((SECONDS - t0)) s"; }
# The NEON trellis kernels (issue 19): cross-compiled for aarch64, run under qemu-user against the scalar reference.
phase "arm cross (qemu)" scripts/arm_cross_test.sh

# Sanitizers (issue 17). A CPU-only build of its own with AddressSanitizer + UndefinedBehaviorSanitizer (every
# report fatal, asserts on) runs the unit label, the pytest suites against its trellm binary included; then every
# libFuzzer target (tests/fuzz, clang-19) gets a short smoke from the committed seeds and reproducers.
asan_build() {
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTRELLM_CUDA=OFF \
    -DTRELLM_SANITIZE=address,undefined >/dev/null
  cmake --build build-asan -j 2
}
fuzz_build() {
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo=sudo
  if ! dpkg -s clang-19 libclang-rt-19-dev >/dev/null 2>&1; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq clang-19 libclang-rt-19-dev >/dev/null
  fi
  CC=clang-19 CXX=clang++-19 cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTRELLM_CUDA=OFF \
    -DTRELLM_FUZZ=ON -DTRELLM_SANITIZE=address,undefined -DBUILD_TESTING=OFF >/dev/null
  cmake --build build-fuzz -j 2 --target fuzz
}
# Left out under the sanitizers, and only there (the "tests" phase above runs them): the five slowest, two thirds
# of the sanitized suite's 2,930 s on 2 shared cores (py_server > 600 s, py_quantize 584 s, EncoderQuality 333 s,
# QuantizeModel.HessianCache 233 s, QuantizeQuality 174 s; the rest takes ~6 min at -j 2). They repeat the Viterbi
# encoder and model-forward loops that Encoder.*, QuantizeModel.*, Exl3Checkpoint.*, Engine.* and py_cli run here;
# the server's request parsing is fuzzed (fuzz_server_request) and tested without HTTP (test_server_parts).
ASAN_SLOW='^(py_server|py_quantize|EncoderQuality\..*|QuantizeQuality\..*|QuantizeModel\.HessianCacheGivesTheSameFiles)$'
phase "asan+ubsan build" asan_build
phase "asan+ubsan tests" ctest --test-dir build-asan -L unit -E "$ASAN_SLOW" --output-on-failure -j 2
phase "fuzz build" fuzz_build
# 20 s per target (9 targets); the long runs are scripts/fuzz.sh's default (bench/results/fuzz.md).
phase "fuzz smoke" env FUZZ_RESULTS=- FUZZ_RUNS=1000000000 FUZZ_JOBS=2 scripts/fuzz.sh 20
