# `make test` and `make demo` set everything up on a fresh machine: the virtualenv in .venv
# (created once, reused after), the Python packages, and the Debian packages the tests need.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
SYSTEM_PYTHON ?= python3
# Reinstall the Python packages only when pyproject.toml changes.
INSTALLED := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
# libcairo2 renders the emoji dataset's SVGs (cairosvg).
APT_PACKAGES := dataset-fashion-mnist chromium libcairo2
# Commands installed from the Debian package of that name only where none is on PATH:
# npm fetches the emoji dataset's packages, and NodeSource's nodejs ships its own npm,
# which conflicts with Debian's.
APT_COMMANDS := npm
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The offline stand-in model is built once per checkout into this folder.
export DMC_TEST_CACHE ?= $(CURDIR)/.cache/test-models
# Datasets built from fetched files (`make datasets`, the one step that downloads them).
export DMC_TEST_DATASETS ?= $(CURDIR)/.cache/datasets
# The integration tests' servers; set here so that an unreachable one fails the run
# instead of skipping its tests.
export DMC_TEST_POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
export DMC_TEST_REDIS_URL ?= redis://127.0.0.1:6379/9
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install system-packages datasets test lint typecheck unit demo bench clean

$(PYTHON):
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip

$(INSTALLED): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	for c in $(APT_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

install: $(INSTALLED) system-packages

# The emoji dataset: pinned npm packages (~160 MB, checked against their sha512), rendered
# at 64 px (~1 minute); kept once built.
datasets: install
	$(PYTHON) -m dmc_cli.main datasets fetch emoji -o root=$(DMC_TEST_DATASETS)/emoji

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

unit: install datasets
	$(PYTHON) -m pytest

test: lint typecheck unit

demo: install
	$(PYTHON) -m dmc_cli.main demo

bench: install
	@echo "benchmarks: see bench/README.md"

clean:
	rm -rf .cache .pytest_cache .mypy_cache .ruff_cache runs
