# The two commands of the README, each doing its own set-up on a fresh machine:
#   make demo   the whole DVC pipeline on the embedded CIFAR-10 sample, on CPU, offline
#   make test   the test suite (what .ci/run calls)
# Both create .venv and install the locked dependency set (requirements.lock) when needed.

PYTHON ?= python3
VENV   ?= .venv
UV_VERSION := 0.13.8
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# stage commands run as `python -m tasks.X`; DVC finds the venv's python and dvc on PATH
export PATH := $(abspath $(BIN)):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 3
export DVC_NO_ANALYTICS := 1

.PHONY: demo test lint install clean-run prefect-up prefect-down

install: $(STAMP)

# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set, nothing else writes .pyc files and
# every dvc call or stage would recompile its imports (no-op `dvc repro` 2.0 s instead of 0.9 s)
$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "deepnets needs Python 3.11 or newer: set PYTHON=python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip sync -q --compile-bytecode --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python --no-deps -e .
	touch $@

demo: $(STAMP)
	@start=$$(date +%s); \
	$(BIN)/dvc repro && \
	$(BIN)/python -m tasks.report --print && \
	echo "main job finished in $$(( $$(date +%s) - start )) s"

test: $(STAMP)
	bash scripts/test-data.sh
	$(BIN)/ruff check nets tasks flows tests scripts benchmarks
	$(BIN)/python -m pytest -m "not slow" -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check nets tasks flows tests scripts benchmarks

# a local Prefect server, the gpu pool, the deployments of prefect.yaml and a worker
# (docs/orchestration.md); prefect-down stops them
prefect-up: $(STAMP)
	bash scripts/prefect-up.sh --worker

prefect-down:
	bash scripts/prefect-up.sh --down

# remove everything the pipeline wrote (the DVC cache stays, so a rerun restores from it)
clean-run:
	rm -rf data models metrics plots export reports backups
