# ExpertMesh: the two quickstart commands are `make up` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
UP_ARGS ?= --workers 4 --duration 20

NVRTC_DIR ?= target/nvrtc-13.0

.PHONY: deps build up test lint fmt bench cuda-check gpu-build k8s-check

deps:
	@./scripts/install-deps.sh

build: deps
	$(CARGO) build --release --bin expertmesh

## Bring up a local cluster (coordinator + 4 workers on loopback) and run the demo workload.
up: build
	$(CARGO) run --quiet --release --bin expertmesh -- up $(UP_ARGS)

## The whole test suite: format, lints, unit and end-to-end tests, the GPU build and kernels.
test: deps lint cuda-check k8s-check
	$(CARGO) test --workspace --all-targets

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## GPU code without a GPU: everything builds and lints with --features cuda,nccl (cudarc opens
## CUDA at run time), and every CUDA kernel compiles for sm_80 and sm_90 with NVRTC 13.0 from PyPI.
## The CUDA backend and its kernels also run here, on a fake CUDA driver over a host emulator of
## the kernels: the conformance suite (kernels/tests/cuda_on_emulator.rs) and a GPU worker in a
## local cluster (tests/gpu_worker_emulated.rs).
cuda-check: deps
	$(CARGO) clippy --workspace --all-targets --features expertmesh/cuda,expertmesh/nccl -- -D warnings
	lib=$$(./scripts/install-nvrtc.sh $(NVRTC_DIR)) && \
	  LD_LIBRARY_PATH="$$PWD/$$lib:$${LD_LIBRARY_PATH:-}" $(CARGO) test -p expertmesh-kernels --features cuda,nccl && \
	  LD_LIBRARY_PATH="$$PWD/$$lib:$${LD_LIBRARY_PATH:-}" $(CARGO) test -p expertmesh --features cuda,nccl --test gpu_worker_emulated

## Every Kubernetes overlay renders (pinned kustomize; `kubectl kustomize` too where installed)
## and validates strictly against a pinned Kubernetes release and the CRDs, and passes the rules
## of deploy/k8s/check.py (Pod Security "restricted", budgets, policies, references, drain).
k8s-check:
	tools=$$(./scripts/install-k8s-tools.sh) && \
	  PYTHONPATH="$$tools/python" "$$(./scripts/python-with-pip.sh)" deploy/k8s/check.py "$$tools" --self-test

## The binary for GPU machines (copied into .device-bin/ for scripts/gpu-check.sh).
gpu-build: deps
	$(CARGO) build --release --bin expertmesh --features cuda,nccl
	mkdir -p .device-bin && cp target/release/expertmesh .device-bin/expertmesh

fmt:
	$(CARGO) fmt --all

bench: build
	$(CARGO) run --quiet --release --bin expertmesh -- bench
