# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-stamp
DEV := $(VENV)/.dev-stamp
MODEL ?= weights/default

.PHONY: install install-dev serve test test-tools lint weights clean

# Python caches the bytecode of what it imports, once: a PYTHONDONTWRITEBYTECODE=1 inherited from the
# environment would make every process (each test server) compile torch's modules again (~2 s each).
unexport PYTHONDONTWRITEBYTECODE

# Torch first, pinned: a looser spec would pull the CUDA build and gigabytes with it. pip installs it
# (it finds the CPU wheel this machine keeps on disk; uv does not look there) without byte-compiling
# its thousands of files (75 s of a fresh install here; Python compiles what it imports, once). uv
# installs the rest: it sees torch installed and keeps it, and fetches in parallel (13 s vs 80 s).
$(RUNTIME): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile torch==2.13.0 uv
	$(BIN)/uv pip install -q --python $(BIN)/python -e .
	touch $(RUNTIME)

# Tests also need the reference implementation (transformers), the SDK, Playwright, matplotlib and
# lm-evaluation-harness (the eval extra: about 40 packages, 37 s more with uv).
$(DEV): $(RUNTIME)
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev,bench,eval]'
	touch $(DEV)

install: $(RUNTIME)

install-dev: $(DEV)

serve: install
	$(BIN)/python -m server --model $(MODEL)

# Two workers, whole files to each (a module's servers start once): much of a test's time is a server
# starting or a client waiting on one, so a second worker uses the second core.
test: install-dev
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

# Debian's prometheus, nginx and docker-compose for tests/deploy (which also installs them itself, as root).
test-tools:
	sh tests/deploy/install_tools.sh

lint: install-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

weights: install
	$(BIN)/python -m model.train --preset default --out $(MODEL)

clean:
	rm -rf $(VENV) build *.egg-info
