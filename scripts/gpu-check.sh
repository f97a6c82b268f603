#!/usr/bin/env bash
# Issue 10's GPU checks as one script that ends in one table.
#
#   scripts/gpu-check.sh build       here (Rust, no GPU needed): builds .device-bin/expertmesh
#                                    with --features cuda,nccl
#   scripts/gpu-check.sh run [DIR]   on the GPU machine (CUDA 13.0, driver 580, PyTorch): runs
#                                    everything below with that binary, JSON and logs in DIR
#                                    (default $OUT, else /tmp/gpu-check)
#
# What `run` does, in order (about 6 minutes on one H100):
#   1. the backend conformance suite on cuda:0 (the CPU backend's test bodies, outputs poisoned)
#   2. the start-up probe (throughput and memory a GPU worker reports)
#   3. expert FFN at V4-Pro and V3 shapes, bf16 and FP8, 128/1024/8192 tokens, with the
#      device's copy, upload/download and permute/combine rates (`expertmesh backend bench`)
#   4. the baselines on the same GPU: dense cuBLAS GEMM, copy bandwidth, PyTorch's per-expert
#      loop and torch._grouped_mm (benches/gpu_baselines.py)
#   5. distributed layers checked against the float64 reference: a GPU worker alone, and a
#      cluster of two CPU workers and a GPU worker; a CPU worker alone for the comparison
#   6. NCCL at world size 1: calls sent to the GPU worker's own MoeLayer service, whose
#      dispatcher reaches its experts through its NCCL group of one (checked against the
#      reference, and the worker's log must say it joined the group)
#   7. one table (benches/gpu_table.py)
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-run}" in
  build)
    make gpu-build
    exit $?
    ;;
  run) ;;
  *)
    echo "usage: $0 build | run [DIR]" >&2
    exit 2
    ;;
esac
out="${2:-${OUT:-/tmp/gpu-check}}"
mkdir -p "$out"
bin=.device-bin/expertmesh
if [ ! -x "$bin" ]; then
  echo "no $bin: run \`$0 build\` on the build machine first and carry .device-bin" >&2
  exit 2
fi
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
status=0
step() {
  local name=$1
  shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" >"$out/$name.json" 2>"$out/$name.log"
  local rc=$?
  tail -4 "$out/$name.log"
  cat "$out/$name.json" | head -c 400
  echo
  echo "   ($((SECONDS - t0)) s, exit $rc)"
  if [ $rc -ne 0 ]; then
    echo "FAILED: $name (exit $rc; log in $out/$name.log)"
    status=1
  fi
}
nvidia-smi -L || true
step conformance "$bin" backend check --device cuda:0
step probe "$bin" backend probe --device cuda:0
step ours "$bin" backend bench --device cuda:0
step baselines python3 benches/gpu_baselines.py
step bench_cuda "$bin" bench --workers cuda:1 --batches 1,8,64,256,1024 --iters 3 --check
step bench_mixed "$bin" bench --workers cpu:2,cuda:1 --batches 8,256 --iters 2 --check
step bench_cpu "$bin" bench --workers cpu:1 --batches 1,8,64,256,1024 --iters 3
step nccl1 "$bin" bench --workers cuda:1 --batches 1,8,64,256 --iters 3 --check --via-worker --log-dir "$out/nccl1-logs"
if grep -h "NCCL group joined" "$out"/nccl1-logs/worker-*.log; then
  echo "nccl1: the worker joined its group of one"
else
  echo "FAILED: nccl1: no worker joined an NCCL group (logs in $out/nccl1-logs)"
  status=1
fi
echo "== table"
python3 benches/gpu_table.py "$out/ours.json" "$out/baselines.json" "$out/bench_cuda.json" "$out/bench_cpu.json" |
  tee "$out/table.txt"
[ $status -eq 0 ] && echo "gpu-check: every step ran" || echo "gpu-check: some steps FAILED (above)"
exit $status
