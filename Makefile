# LatentForge: `make demo` and `make test` are the two set-up commands (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install chromium demo test test-fast mlflow benchmarks clean

# The venv is created once; the project is (re)installed when pyproject.toml changes.
$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --upgrade "pip>=24" "setuptools>=68" wheel
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

# Headless Chromium for the MLflow UI test (Debian's `chromium`): a no-op when one is present,
# and never fails the build: without apt-get (or root / passwordless sudo) it only says so, and
# the UI test skips itself.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: no apt-get; install Chromium yourself to run the MLflow UI test (it is skipped)"; \
	else \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	    || echo "warning: could not install chromium with apt-get; the MLflow UI test will be skipped"; \
	fi

install: $(STAMP)

demo: install
	$(PY) jobs/demo.py

test: install chromium
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything except the slow end-to-end tests, for quick iteration.
test-fast: install chromium
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

mlflow: install
	bash infra/mlflow/serve_local.sh

clean:
	rm -rf demo_output mlruns .pytest_cache
