#!/usr/bin/env bash
# Builds what run_device.sh carries, on this machine (CUDA 13 installed, no GPU needed): main + patch 1 as
# .devbuild/ho.tar.xz, main + patches 1-2 as .devbuild/hl.tar.xz and main + patches 1-3 as .devbuild/hz.tar.xz,
# each with trellm, a kernel-clocks trellm (trellm_clk), the six CUDA test binaries and the shared libraries the
# device lacks (cpp-httplib, brotli, PCRE2). About 20 minutes a build on 2 cores. Run from the repository root:
#   bash dev/pending/pack.sh
set -euo pipefail
root=$PWD
out=$root/.devbuild
mkdir -p "$out"
tests=(test_trellis_kernels test_cuda_ops test_cuda_step_runner test_cuda_model test_cuda_trellis_model test_cuda_engine)
libs=(libcpp-httplib.so.0.11 libbrotlidec.so.1 libbrotlienc.so.1 libbrotlicommon.so.1 libpcre2-8.so.0)
build() {  # name, patches...
  local name=$1 wt=/tmp/trellm-pending-$1
  shift
  git worktree remove --force "$wt" 2>/dev/null || true
  git worktree add -q --detach "$wt" HEAD
  (cd "$wt" && git -c user.name=pack -c user.email=pack@localhost am -q "${@/#/$root/}")
  cmake -S "$wt" -B "$wt/build" -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
  ninja -C "$wt/build" trellm "${tests[@]/#/tests/backend/}"
  cmake -S "$wt" -B "$wt/build-clocks" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTRELLM_KERNEL_CLOCKS=ON > /dev/null
  ninja -C "$wt/build-clocks" trellm
  rm -rf "${out:?}/$name"
  mkdir "$out/$name"
  cp "$wt/build/trellm" "$out/$name/"
  cp "$wt/build-clocks/trellm" "$out/$name/trellm_clk"
  for t in "${tests[@]}"; do cp "$wt/build/tests/backend/$t" "$out/$name/"; done
  strip "$out/$name"/*
  for l in "${libs[@]}"; do cp -L "/usr/lib/x86_64-linux-gnu/$l" "$out/$name/"; done
  (cd "$out" && tar cf - "$name" | xz -9 -T2 > "$name.tar.xz")
  git worktree remove --force "$wt"
  ls -la "$out/$name.tar.xz"
}
p=dev/pending
build ho $p/0001-oproj-cluster-split.patch
build hl $p/0001-oproj-cluster-split.patch $p/0002-lazy-input-norm.patch
build hz $p/0001-oproj-cluster-split.patch $p/0002-lazy-input-norm.patch $p/0003-gemv-no-zero-row.patch
