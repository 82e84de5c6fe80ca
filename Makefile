# Two entry points (see README): `make demo` runs the main job on a generated demo cohort,
# `make test` runs the test suite. Both create .venv and install the package when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out
# the suite runs on two worker processes, one test file per worker at a time (session fixtures stay per file)
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wsienc demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/ruff check wsi_encoder tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check wsi_encoder tests benchmarks examples

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
