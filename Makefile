# Two entry points that work on a fresh machine with Python 3.11 and pip:
#   make run    set up .venv and run the main job (proxy quality harness, embedded default config)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: setup run test
setup: $(VENV)/.installed

run: setup
	$(PY) experiments/run_experiment.py --config experiments/hybrid_8x.yaml --out out/hybrid_8x

test: setup
	$(PY) -m pytest tests
