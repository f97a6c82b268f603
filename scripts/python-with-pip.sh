#!/usr/bin/env bash
# Print a python3 that has pip, installing python3 and python3-pip from apt if there is none.
# Used by scripts/install-nvrtc.sh and scripts/install-pyclient.sh (which fetch from PyPI).
set -euo pipefail
py=$(command -v python3 || true)
if [ -z "$py" ] || ! "$py" -m pip --version >/dev/null 2>&1; then
  echo "installing: python3 python3-pip (to fetch packages from PyPI)" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq --no-install-recommends python3 python3-pip >&2
  py=$(command -v python3)
fi
echo "$py"
