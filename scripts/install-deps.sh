#!/usr/bin/env bash
# Install the system packages ExpertMesh's build and tests need, if missing. Safe to run twice.
#   protoc (protobuf-compiler): compiles proto/ (and etcd-client's protos)
#   google/protobuf/*.proto (libprotobuf-dev): the well-known types etcd-client's protos import
#     (only a Recommends of protobuf-compiler, so --no-install-recommends leaves it out)
#   etcd   (etcd-server):       the real metadata store the etcd tests start on loopback
#   ip     (iproute2):          network namespaces and veth links for the partition test
#   promtool (prometheus):      checks the metrics endpoints' text in the metrics test
#   g++    (g++):               builds the host emulator the CUDA kernels' tests run them on
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v g++ >/dev/null 2>&1 || need+=(g++)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "installing: ${need[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
