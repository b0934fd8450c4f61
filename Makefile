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

CJK_FONT := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc

.PHONY: help venv fonts browser test demo catalog lint bench lock clean

help:
	@echo "make demo   - tiny model + generated catalog -> encode, rank held-out queries (EN / 汉字 / pinyin)"
	@echo "make catalog - a 10,000-product demo catalog in .data/catalog-10k (timed)"
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

# The demo catalog prints Chinese brand names with Debian's WenQuanYi Micro Hei.
fonts: $(CJK_FONT)
$(CJK_FONT):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo ">> installing fonts-wqy-microhei"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fonts-wqy-microhei >/dev/null; \
	else echo "error: $(CJK_FONT) is missing: install the Debian package fonts-wqy-microhei" >&2; exit 1; fi

# The search page test drives Debian's Chromium through Playwright (no browser download). Without
# it the suite still runs and that test fails, saying what to install.
CHROMIUM := /usr/bin/chromium
browser: $(CHROMIUM)
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo ">> installing chromium"; \
	  { DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "warning: installing chromium failed; tests/test_search_page.py will fail" >&2; \
	else echo "warning: $(CHROMIUM) is missing (install the Debian package chromium); tests/test_search_page.py will fail" >&2; fi

test: venv fonts browser
	$(VENV)/bin/ruff check blip_ops pipelines tests benchmarks
	$(PY) -m pytest --durations=20 $(PYTEST_ARGS)

demo: venv fonts
	$(PY) -m pipelines.demo --config configs/local.yaml

lint: venv
	$(VENV)/bin/ruff check blip_ops pipelines tests benchmarks

catalog: venv fonts
	$(PY) -m pipelines.make_catalog --out .data/catalog-10k --products 10000 --seed 0 --overwrite

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
