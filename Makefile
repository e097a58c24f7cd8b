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
# Compile every installed module to bytecode at install time: where Python may not write
# __pycache__ (PYTHONDONTWRITEBYTECODE, a read-only venv) each import would otherwise compile
# from source on every run, which made `import mlflow` 8 s instead of 3 (docs/performance.md).
export UV_COMPILE_BYTECODE := 1

.PHONY: help setup repro exps test test-fast test-cluster test-folders lint params ui screenshots server serve bench cluster cluster-down
# The experiments table: fits 120 columns (all six metrics: dvc metrics show).
EXP_SHOW_DROP := Created|fit_accuracy|train_loss|models|data/.*|src/.*|conf

# A venv's scripts (dvc, mlflow, ...) name its absolute path: after the project is moved or
# copied they point at the old folder (or at the original's venv). Rebuild it then.
VENV_HOME := $(shell sed -n '1s|^\#!\(.*\)/bin/python[0-9.]*$$|\1|p' $(VENV)/bin/dvc 2>/dev/null)
VENV_MOVED := $(if $(VENV_HOME),$(filter-out $(CURDIR)/$(VENV),$(VENV_HOME)))

# `dvc plots show`/`diff` pages that open offline: DVC's own page loads the Vega scripts from a
# CDN; this one carries them (tools/plots_page.py, set in .dvc/config.local).
PLOTS_PAGE := .dvc/tmp/offline-plots.html

## Set up .venv/ from uv.lock (every target does this first).
setup: $(STAMP) $(PLOTS_PAGE)

$(PLOTS_PAGE): | $(STAMP)
	python tools/plots_page.py

# --inexact: a sync adds what a target needs and removes nothing, so switching between
# targets never uninstalls and reinstalls an extra.
SYNC = $(UV) sync --frozen --inexact --python python3
# When the lock changes, .venv is synced exactly (what the lock no longer lists goes: the
# packages [tool.uv] override-dependencies leaves out, if an older lock had them), keeping the
# extras an earlier target installed. mlflow and mlflow-skinny install the same files:
# uninstalling the one deletes the other's, so the client is reinstalled in the same sync.
KEPT_EXTRAS = $(if $(wildcard $(ALL_STAMP)),--all-extras,$(if $(wildcard $(SERVER_STAMP)),--extra server))

$(STAMP): pyproject.toml uv.lock $(if $(VENV_MOVED),FORCE)
	@case "$(CURDIR)" in *%*) echo "error: the project's folder path holds '%': MLflow reads" \
		"the path of its own package (in .venv, inside the project) as configuration syntax" \
		"when it opens a store, so no stage could log; clone or move it to a path without '%'" >&2; \
		exit 1;; esac
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet uv
	$(if $(VENV_MOVED),@echo ".venv was built for $(VENV_MOVED) (the project moved): rebuilding it"; \
		rm -rf $(VENV))
	$(UV) sync --frozen --python python3 $(KEPT_EXTRAS) --reinstall-package mlflow-skinny
	@touch $@

# Always out of date (no recipe, no file): a prerequisite that forces a rebuild.
FORCE:

$(SERVER_STAMP): $(STAMP)
	$(SYNC) --extra server
	@touch $@

$(ALL_STAMP): $(STAMP)
	$(SYNC) --all-extras
	@touch $@

## Run the pipeline: check -> download -> preprocess -> train -> evaluate (only what changed).
repro: setup
	dvc repro

## The experiments: name, params that differ, train/test accuracy, test loss and gap.
exps: setup
	dvc exp show --only-changed --drop '$(EXP_SHOW_DROP)' $(ARGS)

# Both tiers run on every core (pytest-xdist). A file's tests stay on one worker, so a
# module's set-up (a trained DVC project, a server) is made once; files go out longest first
# (tests/conftest.py orders them). Not --dist loadgroup: on pytest 9.2 it silently stops
# grouping (pytest-dev/pytest-xdist#1386). TESTS=tests/test_x.py runs one file.
PYTEST_PARALLEL := -n logical --dist loadfile --no-loadscope-reorder
TESTS ?=

## The whole suite with line and branch coverage of src/ (CI runs this; about 10 minutes).
## Not the namespace cluster's tests (make test-cluster) nor the odd folders' (make test-folders).
test: $(ALL_STAMP)
	python -m pytest $(PYTEST_PARALLEL) -m "not cluster and not folders" --cov --cov-report=term:skip-covered $(TESTS)

## The inner loop: all but the end-to-end runs (-m "not slow"; about 2 minutes).
test-fast: $(ALL_STAMP)
	python -m pytest $(PYTEST_PARALLEL) -m "not slow and not cluster and not folders" $(TESTS)

# A file's tests share its cluster (one worker per file, as in make test); each file's cluster
# has namespaces of its own, so the two files run side by side.
## The tests on a cluster of hosts in network namespaces (needs root; a few minutes).
test-cluster: $(ALL_STAMP)
	python -m pytest $(PYTEST_PARALLEL) -m cluster $(TESTS)

## A fresh clone in folders named with #, ?, &, non-ASCII, 200 characters: set up, run (minutes).
test-folders: $(ALL_STAMP)
	python -m pytest $(PYTEST_PARALLEL) -m folders $(TESTS)

## Style, the floor plan (no import cycle, no stage importing another), no address off this machine.
lint: setup
	ruff check src tests tools bench
	ruff format --check src tests tools bench
	lint-imports  # the floor plan: [tool.importlinter] in pyproject.toml
	python tools/check_addresses.py src tests bench tools Makefile .ci

# The baseline's own environment: the book's readers run its script with TensorFlow, Keras
# and NumPy alone (uv.lock's versions, bench/requirements-tf.txt), not in .venv, where Keras
# imports the pandas, scikit-learn and Matplotlib it finds. Rebuilt only when the pins change.
# (Defined before the rule: make reads a rule's prerequisites as it reaches them.)
BENCH_VENV := bench/.venv-tf
BENCH_STAMP := $(BENCH_VENV)/.synced

## The benchmark against the book's plain script (about 20 minutes).
## Needs MNIST_MIRROR or network access. Writes bench/results.md and bench/results.json.
bench: setup $(BENCH_STAMP)
	@command -v ab >/dev/null || apt-get install -y apache2-utils \
		|| { echo "error: make bench needs ab (Debian: apt-get install apache2-utils)" >&2; exit 1; }
	python -m bench.run --baseline-python $(BENCH_VENV)/bin/python --repeat $${REPEAT:-3}

bench/requirements-tf.txt: uv.lock | $(STAMP)
	UV="$(UV)" python bench/tf_requirements.py

$(BENCH_STAMP): bench/requirements-tf.txt
	$(UV) venv --quiet --allow-existing --python python3 $(BENCH_VENV)
	$(UV) pip sync --quiet --python $(BENCH_VENV)/bin/python bench/requirements-tf.txt
	@touch $@

## Re-compose conf/ into params.yaml after editing conf/ (dvc exp run does this itself).
params: setup
	python -m mnist_pipeline.params

PORT ?= 5000
HOST ?= 127.0.0.1
## Compare the runs in MLflow's UI: prints the address to open (docs/mlflow-ui.md).
## PORT=5001 for another port; HOST=0.0.0.0 UI_ARGS="--allowed-hosts ..." to share it.
ui: setup
	python -m mnist_pipeline.ui --host "$(HOST)" --port "$(PORT)" $(UI_ARGS)

## Regenerate the pictures in docs/mlflow-ui/ (the browser test, a few minutes).
screenshots: $(ALL_STAMP)
	MNIST_SCREENSHOTS="$(CURDIR)/docs/mlflow-ui" python -m pytest tests/test_ui.py -k browser

## Serve the registered champion model (docs/serving.md): POST to http://127.0.0.1:5001/invocations
serve: setup
	python -m mnist_pipeline.serve --model "models:/$${MODEL:-mnist@champion}" --port "$${PORT:-5001}"

## A shared MLflow tracking server on PostgreSQL (docs/operations.md).
## Runs in PostgreSQL, artifacts stored and served by the server. Settings:
## MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000).
server: $(SERVER_STAMP)
	python -m mnist_pipeline.tracking_server

## A cluster of hosts on this machine, in network namespaces (root): docs/operations.md.
## Tracking (PostgreSQL, mlflow server with logins), storage (sshd: a DVC remote), 2 workers.
cluster: $(ALL_STAMP)
	python -m tools.cluster up

## Remove the cluster: its processes, namespaces, links and state.
cluster-down:
	python3 -m tools.cluster down

## This list: one line per target (the first line of the `##` comment above each).
help:
	@awk '/^## / { if (!doc) doc = substr($$0, 4); next } \
		/^[a-zA-Z_-]+:/ { if (doc) printf "  make %-12s %s\n", substr($$1, 1, length($$1) - 1), doc } \
		{ doc = "" }' $(firstword $(MAKEFILE_LIST))
