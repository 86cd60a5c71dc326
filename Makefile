# fleetlearn developer commands. `make demo` and `make test` are the whole set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test lint bench demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[host,dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b; done

demo: install
	$(PY) examples/digits_local.py --epochs 10
	$(PY) examples/federated_digits.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
