# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-stamp
DEV := $(VENV)/.dev-stamp
MODEL ?= weights/default

.PHONY: install install-dev install-eval serve test test-tools lint weights clean

# Torch first, pinned: a looser spec would pull the CUDA build and gigabytes with it.
$(RUNTIME): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	touch $(RUNTIME)

# Tests also need the reference implementation (transformers), the SDK, Playwright and matplotlib.
$(DEV): $(RUNTIME)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $(DEV)

install: $(RUNTIME)

install-dev: $(DEV)

# lm-evaluation-harness for its test (tests/api/test_api_lm_eval.py, skipped loudly without it): kept out
# of the dev extra because it roughly doubles the install (datasets, pandas, pyarrow, scikit-learn, ...).
install-eval: install-dev
	$(BIN)/python -m pip install -q -e '.[eval]'

serve: install
	$(BIN)/python -m server --model $(MODEL)

test: install-dev
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Debian's prometheus, nginx and docker-compose for tests/deploy (which also installs them itself, as root).
test-tools:
	sh tests/deploy/install_tools.sh

lint: install-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

weights: install
	$(BIN)/python -m model.train --preset default --out $(MODEL)

clean:
	rm -rf $(VENV) build *.egg-info
