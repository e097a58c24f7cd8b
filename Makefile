# Two commands matter: `make repro` and `make test`. Both set up .venv/ from uv.lock first;
# running them again skips what is already in place.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.synced
# The optional extras (pyproject.toml): `server` for `make server`, every extra for the tests.
SERVER_STAMP := $(VENV)/.synced-server
ALL_STAMP := $(VENV)/.synced-all-extras
# Stage commands call `python`/`dvc`; put the project's environment first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# uv: the one on PATH, else the one pip installs for the machine's python3.
UV = $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
export UV_PYTHON_DOWNLOADS := never

.PHONY: setup repro test test-fast lint params ui screenshots server bench

setup: $(STAMP)

# --inexact: a sync adds what a target needs and removes nothing, so switching between
# targets never uninstalls and reinstalls an extra.
SYNC = $(UV) sync --frozen --inexact --python python3

$(STAMP): pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet uv
	$(SYNC)
	@touch $@

$(SERVER_STAMP): $(STAMP)
	$(SYNC) --extra server
	@touch $@

$(ALL_STAMP): $(STAMP)
	$(SYNC) --all-extras
	@touch $@

## Run the pipeline: download -> preprocess -> train -> evaluate (only what changed).
repro: setup
	dvc repro

## The test suite (CI runs this), with every optional extra installed.
test: $(ALL_STAMP)
	python -m pytest

## The quick part: everything but the end-to-end DVC runs and sweeps (-m "not slow").
test-fast: $(ALL_STAMP)
	python -m pytest -m "not slow"

## Style, and the floor plan: no import cycle, no stage importing another stage.
lint: setup
	ruff check src tests tools bench
	ruff format --check src tests tools bench
	python tools/check_imports.py src

## The benchmark against the book's plain script (about 12 minutes; needs MNIST_MIRROR or
## network access). Writes bench/results.md and bench/results.json.
bench: setup
	python bench/run.py --repeat $${REPEAT:-3}

## Re-compose conf/ into params.yaml after editing conf/ (dvc exp run does this itself).
params: setup
	python -m mnist_pipeline.params

## Compare the runs in MLflow's UI: prints the address to open (docs/mlflow-ui.md).
## PORT=5001 for another port; HOST=0.0.0.0 UI_ARGS="--allowed-hosts ..." to share it.
PORT ?= 5000
HOST ?= 127.0.0.1
ui: setup
	python -m mnist_pipeline.ui --host "$(HOST)" --port "$(PORT)" $(UI_ARGS)

## Regenerate the pictures in docs/mlflow-ui/ (the browser test, a few minutes).
screenshots: $(ALL_STAMP)
	MNIST_SCREENSHOTS="$(CURDIR)/docs/mlflow-ui" python -m pytest tests/test_ui.py -k browser

## A shared MLflow tracking server: runs in PostgreSQL, artifacts stored and served by the
## server (docs/operations.md). Settings: MLFLOW_BACKEND_STORE_URI,
## MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000).
server: $(SERVER_STAMP)
	python -m mnist_pipeline.tracking_server
