# LatentForge: `make demo` and `make test` are the two set-up commands (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test test-fast mlflow benchmarks clean

# The venv is created once; the project is (re)installed when pyproject.toml changes.
$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --upgrade "pip>=24" "setuptools>=68" wheel
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) jobs/demo.py

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything except the slow end-to-end tests, for quick iteration.
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

mlflow: install
	bash infra/mlflow/serve_local.sh

clean:
	rm -rf demo_output mlruns .pytest_cache
