# `make demo` and `make test` set up .venv when needed, then run.
# torch is pinned and installed first: a bare `torch` pulls a multi-GB build from the
# registry. 2.14.1 because the [gptq] extra (gptqmodel) needs it; demo and tests use
# the same venv, so they run on the same pins.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | sha256sum | cut -c1-12)
export GPTQMODEL_CPU_WORKERS ?= $(shell nproc)

.PHONY: demo test lint install clean-state

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,gptq]" "$(TORCH)"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/squeeze run recipes/default.yaml
	$(VENV)/bin/squeeze list minilm-compressed

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy compression kernels evaluation registry

clean-state:
	rm -rf mlflow.db mlartifacts mlruns .squeezeflow .prefect
