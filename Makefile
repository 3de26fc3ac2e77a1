# The two commands of the quick start: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two installs: `make run` needs the package and its `run` extra only; the tests, lint and
# benchmarks add the `dev` extra (pytest, schemathesis, hypothesis, mypy, ruff: ~290 MB).
RUN_STAMP := $(VENV)/.run-installed-stamp
STAMP := $(VENV)/.installed-stamp
# Three test processes on two cores: much of the suite waits (rates, leases, processes
# starting), so a third worker fills the idle CPU (2,457 tests: 8.5 min, against ~12-14 min
# with two). PYTEST_WORKERS=2 for the old split.
PYTEST_WORKERS ?= 3

.PHONY: install run test bench lint format clean

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[run]'
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Everything: what `make test`, `make lint` and `make bench` need (CI runs this).
install: $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/python -m devtools.run

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# Every benchmark of bench/, about 5 minutes; prints one Markdown table.
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .run
