# jobd: `make run` serves from source (nothing to install); `make test` sets up .venv
# from the pinned requirements-dev.txt and runs the tests; `make bench` measures.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bench clean

run:
	$(PYTHON) jobd.py $(ARGS)

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest tests

bench: $(VENV)/.installed
	$(PY) tests/bench.py

clean:
	rm -rf $(VENV) build dist .pytest_cache tests/__pycache__ __pycache__
