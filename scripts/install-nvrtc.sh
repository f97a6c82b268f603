#!/usr/bin/env bash
# Install NVRTC from PyPI (CUDA 13.0.x, the version the GPU machines' driver 580 runs) into DIR
# if it is not there yet, and print its library directory. No GPU and no CUDA toolkit needed:
# CI uses it to compile every CUDA kernel for sm_80 and sm_90. Safe to run twice.
#   usage: scripts/install-nvrtc.sh [DIR]      (default: target/nvrtc-13.0)
set -euo pipefail
dir="${1:-target/nvrtc-13.0}"
lib="$dir/nvidia/cu13/lib"
if [ -f "$lib/libnvrtc.so.13" ] && [ -f "$lib/libnvrtc-builtins.so.13.0" ]; then
  echo "$lib"
  exit 0
fi
mkdir -p "$dir"
py=$("$(dirname "$0")/python-with-pip.sh")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading nvidia-cuda-nvrtc 13.0.x from PyPI" >&2
"$py" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_17_x86_64 \
  --platform manylinux2010_x86_64 --python-version 3.11 "nvidia-cuda-nvrtc==13.0.*" -d "$tmp" >&2
whl=$(ls "$tmp"/nvidia_cuda_nvrtc-13.0.*.whl | head -1)
"$py" -m zipfile -e "$whl" "$dir" >&2
test -f "$lib/libnvrtc.so.13" || { echo "no libnvrtc.so.13 in $whl" >&2; exit 1; }
echo "$lib"
