# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
FIXTURES ?= $(abspath ../shared/fixtures/var_reference)
export VAR_REFERENCE_FIXTURES ?= $(FIXTURES)
export HF_HUB_OFFLINE ?= 1
export OMP_NUM_THREADS ?= 2
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test demo lint

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 transformers==5.23.0  # 5.24 needs a peft that is not released yet
	$(PY) -m pip install -q -e ".[test,train]"
	touch $@

install: $(VENV)/.installed

test: install
	@test -f "$(VAR_REFERENCE_FIXTURES)/README.md" || { echo "Reference fixtures not found at $(VAR_REFERENCE_FIXTURES): set VAR_REFERENCE_FIXTURES. Parity is never skipped." >&2; exit 1; }
	$(PY) -m pytest tests -q -p no:cacheprovider

# The main job: the bundled var-digits model, every class → grid.png (offline).
demo: install
	$(VENV)/bin/diffusers-var generate

lint: install
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/ruff check src tests benchmarks examples
