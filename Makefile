# Fluxgate: `make demo` runs the product on a working demo, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m demo.run

PY_SOURCES := fluxgate supervisor demo tests bench gunicorn.conf.py

lint: $(STAMP)
	$(BIN)/ruff check $(wildcard $(PY_SOURCES))
	$(BIN)/ruff format --check $(wildcard $(PY_SOURCES))
	$(BIN)/mypy fluxgate supervisor demo

test: lint
	$(BIN)/pytest -n 2 $(PYTEST_ARGS)

bench: $(STAMP)
	sh bench/setup.sh $(BIN)/python
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
