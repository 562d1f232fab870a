# Two entry points: `make test` (set-up + test suite) and `make demo` (set-up + the main job).
# Set-up is a .venv in the checkout; it is rebuilt only when pyproject.toml or this file change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision must come from PyPI together: a PyPI torchvision next to a local
# CPU-only torch wheel fails to import (and breaks timm and transformers with it).
TORCH_PINS := torch==2.15.0 torchvision==0.29.2
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "import torch, torchvision, timm, transformers; print('environment ready: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/engine_demo.py

clean:
	rm -rf $(VENV) .pytest_cache
