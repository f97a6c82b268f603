#!/usr/bin/env bash
# Install the Python client's dependencies (clients/python/requirements.txt, from PyPI) into DIR
# if they are not there yet, generate its gRPC stubs from proto/, and print DIR. The test of the
# Python client runs `PYTHONPATH=DIR:clients/python python3 clients/python/example.py`. Safe to
# run twice.
#   usage: scripts/install-pyclient.sh [DIR]      (default: target/pyclient)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir="${1:-$root/target/pyclient}"
py=$("$root/scripts/python-with-pip.sh")
stamp="$dir/.installed-$(sha256sum "$root/clients/python/requirements.txt" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing the Python client's dependencies into $dir" >&2
  mkdir -p "$dir"
  "$py" -m pip install --quiet --disable-pip-version-check --target "$dir" -r "$root/clients/python/requirements.txt" >&2
  touch "$stamp"
fi
(cd "$root/clients/python" && PYTHONPATH="$dir" "$py" build_stubs.py >&2)
echo "$dir"
