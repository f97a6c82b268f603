# ExpertMesh: the two quickstart commands are `make up` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
UP_ARGS ?= --workers 4 --duration 20

.PHONY: deps build up test lint fmt bench

deps:
	@./scripts/install-deps.sh

build: deps
	$(CARGO) build --release --bin expertmesh

## Bring up a local cluster (coordinator + 4 workers on loopback) and run the demo workload.
up: build
	$(CARGO) run --quiet --release --bin expertmesh -- up $(UP_ARGS)

## The whole test suite: format, lints, unit and end-to-end tests.
test: deps lint
	$(CARGO) test --workspace --all-targets

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench: build
	$(CARGO) run --quiet --release --bin expertmesh -- bench
