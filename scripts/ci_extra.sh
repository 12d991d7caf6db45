#!/usr/bin/env bash
# CI phases kept out of .ci/run: the Arm cross test of issue 19 (the sanitizer and fuzz-smoke phases written here
# first are in .ci/run now). Run by hand: scripts/ci_extra.sh
set -euo pipefail
cd "$(dirname "$0")/.."
phase() { local name=$1; shift; local t0=$SECONDS; echo "=== $name"; "$@"; echo "=== $name: $((SECONDS - t0)) s"; }
# The NEON trellis kernels (issue 19): cross-compiled for aarch64, run under qemu-user against the scalar reference.
phase "arm cross (qemu)" scripts/arm_cross_test.sh
