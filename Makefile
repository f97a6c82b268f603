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

## The whole test suite: format, lints (with and without the GPU features), the Kubernetes
## manifests, and every unit and end-to-end test, built once, with --features cuda,nccl.
## The features change nothing for CPU workers (cudarc opens CUDA only when a GPU worker starts),
## and building the suite once instead of twice saves CI about three minutes. The default build,
## which `make up` runs, is linted here and run by `make up`.
## GPU code without a GPU: every CUDA kernel compiles for sm_80 and sm_90 with NVRTC 13.0 from
## PyPI, and the CUDA backend, its kernels and GPU workers run on a fake CUDA driver over a host
## emulator of the kernels, with a fake NCCL over loopback TCP: the conformance suite
## (kernels/tests/cuda_on_emulator.rs) and GPU workers in a local cluster
## (tests/gpu_worker_emulated.rs).
GPU_FEATURES := --features expertmesh/cuda,expertmesh/nccl

test: deps lint k8s-check
	lib=$$(./scripts/install-nvrtc.sh $(NVRTC_DIR)) && \
	  LD_LIBRARY_PATH="$$PWD/$$lib:$${LD_LIBRARY_PATH:-}" $(CARGO) test --workspace --all-targets $(GPU_FEATURES)

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --workspace --all-targets $(GPU_FEATURES) -- -D warnings

## Only the GPU tests above (the same build as `make test`).
cuda-check: deps
	lib=$$(./scripts/install-nvrtc.sh $(NVRTC_DIR)) && \
	  LD_LIBRARY_PATH="$$PWD/$$lib:$${LD_LIBRARY_PATH:-}" $(CARGO) test --workspace $(GPU_FEATURES) \
	    --test cuda_kernels --test cuda_on_emulator --test gpu_worker_emulated

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
