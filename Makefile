# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MODEL ?= weights/default

.PHONY: install serve test test-tools lint weights clean

# Torch first, pinned: a looser spec would pull the CUDA build and gigabytes with it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/python -m server --model $(MODEL)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Debian's prometheus, nginx and docker-compose for tests/deploy (which also installs them itself, as root).
test-tools:
	sh tests/deploy/install_tools.sh

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

weights: install
	$(BIN)/python -m model.train --preset default --out $(MODEL)

clean:
	rm -rf $(VENV) build *.egg-info
