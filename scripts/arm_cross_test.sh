#!/usr/bin/env bash
# The Arm check of the CPU trellis kernels: cross-compiles tests/backend/test_trellis_cpu.cpp and the kernels it
# tests (src/backend/cpu/trellis_gemm*.cpp) for aarch64 with Debian's g++-aarch64-linux-gnu, and runs the binary
# under qemu-user: the NEON (+fp16) variant against the scalar reference and the decode definition, bit for bit.
# Correctness only: speed under emulation means nothing (Arm speed is not measured on this project's machines).
# Installs what it needs (apt-get; sudo when not root). Usage: scripts/arm_cross_test.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build-arm}

need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || command -v qemu-aarch64-static >/dev/null || need+=(qemu-user)
[ -f /usr/src/googletest/googletest/src/gtest-all.cc ] || need+=(googletest)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

cxx=aarch64-linux-gnu-g++
command -v ccache >/dev/null && cxx="ccache $cxx"
gt=/usr/src/googletest/googletest
flags=(-O2 -std=c++20 -Wall -Wextra -Wno-unused-parameter -pthread -Isrc -Itests -I"$gt/include" -I"$gt")
srcs=(tests/backend/test_trellis_cpu.cpp src/backend/cpu/trellis_gemm.cpp src/backend/cpu/trellis_gemm_neon.cpp
      src/backend/cpu/trellis_gemm_avx2.cpp src/backend/cpu/trellis_gemm_avx512.cpp
      src/backend/cpu/trellis_gemm_avx512fp16.cpp src/core/error.cpp "$gt/src/gtest-all.cc" "$gt/src/gtest_main.cc")
mkdir -p "$out"
objs=()
pids=()
for s in "${srcs[@]}"; do
  o="$out/$(basename "${s%.*}").o"
  objs+=("$o")
  $cxx "${flags[@]}" -c "$s" -o "$o" &
  pids+=($!)
  # two compilers at a time (the machine has 2 cores)
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
$cxx -pthread "${objs[@]}" -o "$out/test_trellis_cpu"
file "$out/test_trellis_cpu" | grep -q aarch64

qemu=$(command -v qemu-aarch64 || command -v qemu-aarch64-static)
"$qemu" -L /usr/aarch64-linux-gnu "$out/test_trellis_cpu"
