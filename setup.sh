#!/usr/bin/env bash
# One-step set-up on a fresh Debian/Ubuntu machine: system packages, Python test oracles, then a build.
#   ./setup.sh            install what is missing and build into ./build
#   ./setup.sh --no-deps  only build
# Options for cmake can be passed in CMAKE_ARGS, e.g. CMAKE_ARGS="-DTRELLM_CUDA=OFF" ./setup.sh
set -euo pipefail
cd "$(dirname "$0")"

DEBS=(build-essential cmake ninja-build pkg-config ccache nlohmann-json3-dev libpcre2-dev libcli11-dev
      libcpp-httplib-dev libgtest-dev libgmock-dev libbenchmark-dev python3 python3-pip
      nginx)  # nginx: the load balancer in tests/py/test_server_load.py (started there in the foreground, no service)

if [[ "${1:-}" != "--no-deps" ]]; then
  missing=()
  for p in "${DEBS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  python3 -m pip install -q -r tests/py/requirements.txt 2>/dev/null \
    || python3 -m pip install -q --break-system-packages -r tests/py/requirements.txt
fi

jobs=$(nproc 2>/dev/null || echo 2)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-}
cmake --build build -j "$jobs"
