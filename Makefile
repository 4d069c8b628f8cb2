# LatentForge: `make demo` and `make test` are the two set-up commands (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?= --durations=30

.PHONY: install chromium demo test test-fast mlflow clean

# The venv is created once; the project is (re)installed when pyproject.toml changes.
$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --upgrade "pip>=24" "setuptools>=68" wheel
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

# Headless Chromium for the MLflow UI test (Debian's `chromium`): a no-op when one is present.
# Under CI (the CI environment variable set, as .ci/run and CI services set it) a browser that
# cannot be installed (no apt-get, not root, no passwordless sudo, apt failing) FAILS the target:
# the UI test must run there. Elsewhere it only warns, and the UI test skips itself.
CHROMIUM_FOUND := command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	|| command -v google-chrome >/dev/null 2>&1
chromium:
	@if $(CHROMIUM_FOUND); then exit 0; fi; \
	fail() { if [ -n "$$CI" ]; then echo "error: $$1; CI needs Chromium for the MLflow UI test" >&2; exit 1; fi; \
	         echo "warning: $$1; the MLflow UI test will be skipped (install chromium to run it)"; exit 0; }; \
	command -v apt-get >/dev/null 2>&1 || fail "no Chromium and no apt-get to install it"; \
	SUDO=; if [ "$$(id -u)" != 0 ]; then \
	  command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || fail "no Chromium; installing it needs root or passwordless sudo"; \
	  SUDO="sudo -n"; fi; \
	{ $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	  || fail "apt-get could not install chromium"; \
	$(CHROMIUM_FOUND) || fail "apt-get installed chromium but no chromium binary is on PATH"

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
