# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration bench lint typecheck clean

# One resolve for everything (numpy 1.26.4, pyarrow<26, torch==2.13.0 CPU), pinned by
# requirements/constraints.txt; then the project itself without touching those pins.
$(STAMP): pyproject.toml requirements/base.in requirements/dev.in requirements/constraints.txt requirements/nodeps.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -r requirements/base.in -r requirements/dev.in
	$(BIN)/python -m pip install -q --no-deps -r requirements/nodeps.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-unit: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

test-integration: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/integration

# The benches also compare generator candidates that the tests never need (~250 MB).
bench: install
	$(BIN)/python -m pip install -q -r requirements/bench.txt
	$(BIN)/python -m bench.run

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/python scripts/typecheck_tree.py
	$(BIN)/mypy

clean:
	rm -rf .ragstream build dist *.egg-info .mypy_cache .ruff_cache
