# The two commands a new user runs: `make demo` (the main job on the bundled tiny example, no SLURM)
# and `make test` (the whole suite, with a throwaway SLURM cluster). Both build .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hfhpc-installed

.PHONY: venv demo test clean-demo

$(STAMP): requirements/test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0 -r requirements/test.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(STAMP)

demo: venv
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean-demo:
	rm -rf demo
