# Fluxgate: `make demo` runs the product on a working demo, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# The versions the suite last passed with; empty (as test-latest sets it) = the newest.
CONSTRAINTS ?= constraints.txt

.PHONY: demo test image-test test-latest constraints lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m demo.run

PY_SOURCES := fluxgate supervisor demo tests bench gunicorn.conf.py

lint: $(STAMP)
	$(BIN)/ruff check $(wildcard $(PY_SOURCES))
	$(BIN)/ruff format --check $(wildcard $(PY_SOURCES))
	$(BIN)/mypy fluxgate supervisor demo bench

test: lint
	$(BIN)/pytest -n 2 $(PYTEST_ARGS)

# Builds the Dockerfile with podman and runs the image against the fake provider
# (tests/image; skipped, saying why, where podman cannot run at all).
image-test: $(STAMP)
	$(BIN)/pytest tests/image -v -rs -s

# The same suite on the newest versions pip picks today, in a venv of its own.
test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# Record what .venv holds now as the tested versions (after a green make test-latest,
# copy its venv's versions: make constraints VENV=.venv-latest).
constraints: $(STAMP)
	{ grep '^#' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
	    | grep -v '^fluxgate-gateway=='; grep '^async-timeout==' constraints.txt || true; } \
	    > constraints.txt.new
	mv constraints.txt.new constraints.txt

bench: $(STAMP)
	sh bench/setup.sh $(BIN)/python
	$(BIN)/python -m bench.run

clean:
	rm -rf .venv .venv-latest build *.egg-info .pytest_cache .mypy_cache .ruff_cache
