# Two commands do all the set-up on a fresh machine:
#   make train   # create .venv if missing, install pinned deps, lay out the offline models, run the quickstart
#   make test    # same set-up, then the test suite (no network)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gist-installed
ARGS ?=
PYTEST_ARGS ?=

# The embedded default and the tests run offline; `make train HF_HUB_OFFLINE=0 ARGS=...` uses the hub.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= $(HF_HUB_OFFLINE)
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

BENCH_OUT ?= bench.json

.PHONY: setup train test test-fast test-slow test-all lint format bench ablation clean

# torch is pinned in the SAME pip command as everything else: unpinned, pip pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q torch==2.13.0 -c requirements.lock -e ".[dev,offline-models]"
	@touch $(STAMP)

setup: $(STAMP)
	@$(PY) -m gist.infra.offline_models --check >/dev/null 2>&1 || $(PY) -m gist.infra.offline_models

train: setup
	$(PY) scripts/train.py $(ARGS)

# Test tiers (markers in pyproject.toml): test-fast = unit tests only (< 30 s on 2 cores); test = the
# default tier, every feature end to end on tiny models (< 3 min of test time on 2 cores; what CI runs);
# test-slow = the slow tier alone; test-all = both.
test: setup lint
	WANDB_MODE=offline $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Form (config in pyproject.toml): lint and formatting are checked, never rewritten, by `make test`.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Apply ruff's fixes and formatting.
format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test-fast: setup
	WANDB_MODE=offline $(PY) -m pytest -m "unit and not slow" $(PYTEST_ARGS)

test-slow: setup
	WANDB_MODE=offline $(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: setup
	WANDB_MODE=offline $(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# Our training step vs sentence-transformers' trainer on this machine (docs/PERFORMANCE.md).
bench: setup
	$(PY) scripts/bench.py --out $(BENCH_OUT)

# The ablation study (docs/RESULTS.md): 7 variants x 3 seeds of the quickstart (~2 h on 2 CPU cores), each
# evaluated on the five tasks; the guide's vetoes per training task; docs/RESULTS.md from both.
ablation: setup
	$(PY) scripts/train.py -m sweep=ablation $(ARGS)
	$(PY) scripts/guide_masking.py --output docs/guide_masking.json
	$(PY) scripts/results.py

clean:
	rm -rf .cache .pytest_cache logs outputs multirun wandb
