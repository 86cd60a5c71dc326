# fleetlearn developer commands. `make demo` and `make test` are the whole set-up on a fresh clone,
# in either order. Each installs what it needs and records it in a stamp file inside .venv:
#   demo: the host extra (compiler, accounting) and scikit-learn's digits, nothing else
#   test, lint, bench: everything, including the CPU build of torch that tests compare against
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.demo-installed
FULL_STAMP := $(VENV)/.full-installed

.PHONY: install test lint bench demo clean

install: $(FULL_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[host,sim,demo]'
	touch $@

$(FULL_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[host,sim,postgres,demo,dev,torch]'
	touch $@ $(DEMO_STAMP)

test: $(FULL_STAMP)
	$(PY) -m pytest -q

lint: $(FULL_STAMP)
	$(VENV)/bin/ruff check .

bench: $(FULL_STAMP)
	@set -e; for b in benchmarks/[!_]*.py; do echo "== $$b"; $(PY) $$b; done

demo: $(DEMO_STAMP)
	$(PY) examples/federated_digits.py --devices 100 --rounds 20 --epsilon 3 --expect-accuracy 0.85

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
