# blip-catalog-search: `make demo` and `make test` work on a fresh clone (they create .venv).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The local CPU build of PyTorch, installed before the project so that pip never resolves an
# unpinned `torch` to a multi-GB CUDA build. Override for a GPU box: make TORCH_SPEC='torch==2.11.*'
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints/ci.txt
# pip prints one warning per package for index folders that this machine's pip.conf names but
# that do not exist; they say nothing about the install.
PIP_NOISE := is ignored: it is neither a file nor a directory
PIP := $(PY) -m pip --disable-pip-version-check

export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help venv test demo lint bench lock clean

help:
	@echo "make demo   - build a tiny model, encode a generated catalog, print rankings (EN / 汉字 / pinyin)"
	@echo "make test   - the whole test suite (what CI runs)"
	@echo "make lint   - ruff"
	@echo "make bench  - model-only throughput (blip_ops.bench) on CPU"
	@echo "make lock   - refresh $(CONSTRAINTS) from a fresh resolve"

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@echo ">> creating $(VENV) and installing (about 2 minutes on a fresh machine)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)" 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]' 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	$(PIP) check
	@touch $@

venv: $(VENV)/.installed

test: venv
	$(VENV)/bin/ruff check blip_ops pipelines tests benchmarks
	$(PY) -m pytest --durations=20 $(PYTEST_ARGS)

demo: venv
	$(PY) -m pipelines.demo --config configs/local.yaml

lint: venv
	$(VENV)/bin/ruff check blip_ops pipelines tests benchmarks

bench: venv
	$(PY) -m blip_ops.bench --model tiny --attention both
	$(PY) -m blip_ops.bench --model blip-base --attention both --batch-size 8

# Re-resolve the exact versions CI installs (run after changing dependency ranges).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q "$(TORCH_SPEC)" 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	.lock-venv/bin/pip install -q -e '.[dev]' 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	{ echo "# Exact versions CI installs (make lock). Ranges live in pyproject.toml."; \
	  .lock-venv/bin/pip freeze --exclude-editable | sed -e 's/+cpu$$//'; } > $(CONSTRAINTS)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .data build *.egg-info
