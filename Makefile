# K2 Operator: the stable developer commands (see docs/development.md).
SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .tools/bin
PYTEST_ARGS ?=

.PHONY: venv tools system-packages image cluster-up cluster-down demo demo-down crds chart-crds lint test test-unit clean

# The virtualenv is rebuilt only when pyproject.toml changes; pip downloads come from the user's pip cache.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

tools:
	hack/build-tools.sh

# Debian packages the real node, the worker image and the Prometheus tests need (a no-op when all are installed).
system-packages:
	hack/install-system-packages.sh

# The worker image (docs/development.md, "The worker image"): needs root; layers cached in ~/.cache/k2-image.
# CONTAINERD_SOCKET=PATH also imports it into that containerd's k8s.io namespace.
CONTAINERD_SOCKET ?=
image: venv
	$(BIN)/python hack/image build $(if $(CONTAINERD_SOCKET),--import $(CONTAINERD_SOCKET))

# The control plane, the kwok GPU nodes and the real node (a kubelet with containerd, running the worker image).
cluster-up: venv tools system-packages image
	$(BIN)/python hack/local_cluster.py up --real-node

cluster-down:
	$(BIN)/python hack/local_cluster.py down

# The README's main job: the local cluster with its real node, the chart, both examples and skewed traffic, with a
# live summary of each rebalance (hack/liveloop/demo.py). The cluster stays up for kubectl; `make demo-down` stops it.
demo: cluster-up
	$(BIN)/python hack/liveloop/demo.py $(DEMO_ARGS)

demo-down: cluster-down

# The CRD YAML is generated from the pydantic models in crds/k2_api; the chart carries a copy.
crds: venv
	$(BIN)/k2 crds generate --out crds --docs docs/api.md

chart-crds: crds
	mkdir -p charts/k2-operator/crds
	cp crds/*.k2.ai.yaml charts/k2-operator/crds/
	$(BIN)/python deploy/kustomize/render_base.py

lint: venv
	$(BIN)/k2 crds generate --out crds --docs docs/api.md --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p k2_api -p k2_operator -p k2_eplb -p k2_workers
	$(BIN)/mypy --strict hack/liveloop benchmarks/live_loop.py
	PYTHONPATH=hack/lint $(BIN)/lint-imports --no-cache

# The README's test command: installs what it needs, builds the tools, lints, and runs the whole suite in two pytest
# calls: first the tests that need this machine's only real node for a cluster of their own (teardown), then the rest,
# whose session cluster takes the real node. Exit status 5 (nothing collected, e.g. a PYTEST_ARGS filter) is success.
# The second call lists its 30 slowest tests: the suite's time is watched against CI's 60-minute goal.
test: system-packages venv tools lint image
	$(BIN)/pytest -m realnode_exclusive $(PYTEST_ARGS); status=$$?; [[ $$status -eq 0 || $$status -eq 5 ]] || exit $$status
	$(BIN)/pytest -m "not realnode_exclusive" --durations=30 $(PYTEST_ARGS); status=$$?; [[ $$status -eq 5 ]] && status=0; exit $$status

# Unit tests only: no control plane, no Prometheus, no multi-process torch.
test-unit: venv
	$(BIN)/pytest -m "not integration and not prometheus and not distributed and not e2e" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cluster .pytest_cache .mypy_cache .ruff_cache
