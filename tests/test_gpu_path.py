"""The GPU path's CPU-testable parts: Hub mode, a GPU torch cannot see, optimizer knobs per engine,
batch sizing over processes, `.env` before Unsloth, and gpu_check.py's refusal and dry run.

GPU-only libraries are replaced by recorded fakes (a fake `nvidia-smi` on PATH, Unsloth's
GRPOConfig defaults, ART 0.5.18's get_model_config merge); the code around them is the real code.

    .venv/bin/python -m pytest tests/test_gpu_path.py -q
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from servers import JsonHandler, serve

import reference_grpo_trainer as rgt
import utils
from hntitles.art import config as art_config
from hntitles.engines import fast_backend as fb
from hntitles.runs import runtime, settings
from hntitles.trl import config as trl_config

ROOT = Path(__file__).resolve().parents[1]


def env_without_hub_mode(**extra: str) -> dict[str, str]:
    """This environment minus every Hub-mode variable (as on a fresh shell), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HN_HUB_MODE")}
    env.update(extra)
    return env


def run_py(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------------------
# Hub or offline
# --------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("recipe, user, expected", [
    # the GPU recipe names a hub model and dataset: online
    ("recipes/gpu.yaml", None, "online False"),
    # local paths only: offline (nothing to fetch, nothing waits on a network)
    ("recipes/tiny.yaml", None, "offline True"),
    # the user's own HF_HUB_OFFLINE=1 wins over a hub recipe
    ("recipes/gpu.yaml", "1", "offline True"),
])
def test_hub_mode_follows_the_recipe(recipe, user, expected):
    env = env_without_hub_mode(**({"HF_HUB_OFFLINE": user} if user else {}))
    proc = run_py(f"""
        from hntitles.runs import settings
        mode = settings.prepare_env(["--recipe", "{recipe}"])
        import huggingface_hub.constants as c   # imported after: reads what prepare_env set
        print(mode.split()[0], c.HF_HUB_OFFLINE)
    """, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


@pytest.mark.integration
def test_a_hub_id_on_the_command_line_goes_online_and_updates_an_imported_client():
    proc = run_py("""
        import huggingface_hub.constants as c   # already imported, with the variable unset
        from hntitles.runs import settings
        print(settings.prepare_env(["--recipe", "recipes/tiny.yaml", "--model", "Qwen/Qwen2.5-0.5B-Instruct"]),
              c.HF_HUB_OFFLINE)
    """, env_without_hub_mode())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "online (hub id(s) ['Qwen/Qwen2.5-0.5B-Instruct']) False"


@pytest.mark.parametrize("load, what", [
    # a model id that is neither local nor cached, with the Hub off
    (lambda: fb.load_policy(fb.Backend("cpu", "cpu", False), settings.Recipe(model="no-such-org/no-such-model"), None),
     "model 'no-such-org/no-such-model'"),
    # the same for a hub dataset
    (lambda: utils.load_stories("no-such-org/no-such-dataset", "train"), "dataset 'no-such-org/no-such-dataset'"),
    # evaluation's loader (evaluate.py, titles.py, the demo)
    (lambda: importlib.import_module("hntitles.engines.policy").load_model("no-such-org/no-such-model"),
     "model 'no-such-org/no-such-model'"),
])
def test_unreachable_hub_id_names_it_and_the_way_out(load, what, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(settings.HubUnavailable) as e:
        load()
    message = str(e.value)
    assert what in message and "HF_HUB_OFFLINE=1" in message and "local copy" in message and "\n" not in message


class Healthy(JsonHandler):
    def do_GET(self):
        self.reply(200, {"status": "ok"})


def test_trainer_prints_one_line_for_an_unreachable_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with serve(Healthy) as (_, url):
        code = rgt.cli(["--recipe", str(ROOT / "recipes/tiny.yaml"), "--model", "no-such-org/no-such-model",
                        "--reward_url", url, "--runs_dir", str(tmp_path)])
    assert code == runtime.EXIT_USAGE
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: cannot load the model 'no-such-org/no-such-model'")


def test_local_path_errors_are_not_dressed_up_as_hub_errors(tmp_path):
    with pytest.raises(OSError), settings.hub_errors(str(tmp_path / "missing")):
        raise OSError("not found")


def test_import_unsloth_first_loads_dotenv_before_anything(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("HF_HOME=/tmp/hf-home-from-dotenv\nHF_TOKEN=hf_dotenv_only\n")
    monkeypatch.setattr(settings, "ROOT", tmp_path)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fb.import_unsloth_first(["--backend", "cpu"]) is False  # returns early, after .env
    assert os.environ["HF_HOME"] == "/tmp/hf-home-from-dotenv" and os.environ["HF_TOKEN"] == "hf_dotenv_only"


# --------------------------------------------------------------------------------------
# A CUDA machine whose torch cannot see the GPU
# --------------------------------------------------------------------------------------


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """nvidia-smi of an old driver (R535) on PATH; this machine's torch sees no CUDA."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '535.104.05, NVIDIA A100-SXM4-80GB'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_machine_detects_a_driver_torch_cannot_use(fake_nvidia_smi, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    machine = fb.Machine.detect()
    assert (machine.cuda, machine.driver, machine.gpu_name) == (False, "535.104.05", "NVIDIA A100-SXM4-80GB")
    assert machine.torch_version == torch.__version__


@pytest.mark.parametrize("requested, require_gpu", [
    ("auto", True),           # the GPU recipe: no silent CPU fallback
    ("transformers", False),  # an explicit GPU backend
    ("unsloth", False),
    ("trl-vllm", False),
])
def test_unusable_gpu_stops_gpu_runs(requested, require_gpu):
    machine = fb.Machine(cuda=False, unsloth=True, vllm=True, gpu_name="NVIDIA A100", driver="535.104.05",
                         torch_version="2.13.0+cu130", torch_cuda="13.0")
    with pytest.raises(fb.BackendError) as e:
        fb.select_backend(requested, machine=machine, require_gpu=require_gpu)
    message = str(e.value)
    for part in ("driver 535.104.05", "torch 2.13.0+cu130 (CUDA 13.0)", "driver >= 580", "--backend cpu"):
        assert part in message


def test_cpu_stays_an_explicit_choice_and_auto_says_why():
    machine = fb.Machine(cuda=False, unsloth=False, vllm=False, driver="535.104.05", torch_version="2.13.0")
    assert fb.select_backend("cpu", machine=machine, require_gpu=True).device == "cpu"
    auto = fb.select_backend("auto", machine=machine)  # a CPU recipe: the CPU, with the reason said
    assert auto.device == "cpu" and "but torch 2.13.0 cannot use it" in auto.describe()
    with pytest.raises(fb.BackendError, match="needs a GPU"):  # no driver at all, GPU recipe
        fb.select_backend("auto", machine=fb.Machine(cuda=False, unsloth=False, vllm=False), require_gpu=True)


@pytest.mark.integration
def test_gpu_recipe_on_a_cuda_less_torch_exits_with_the_message(fake_nvidia_smi, tmp_path):
    env = {**os.environ, "PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "reference_grpo_trainer.py", "--recipe", "recipes/gpu.yaml",
                           "--runs_dir", str(tmp_path / "runs")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == runtime.EXIT_USAGE, proc.stdout + proc.stderr
    assert "driver 535.104.05" in proc.stderr and "torch.cuda.is_available() is False" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()  # stopped before any run dir


# --------------------------------------------------------------------------------------
# Optimizer knobs per engine
# --------------------------------------------------------------------------------------


def unsloth_grpo_config_class():
    """A recorded fake of Unsloth's patched GRPOConfig (unsloth 2026.10.9, unsloth/models/rl.py
    `replacements`): TRL's class with optim adamw_8bit and weight decay 0.001 as defaults."""
    from trl import GRPOConfig

    class UnslothGRPOConfig(GRPOConfig):
        def __init__(self, *args, optim="adamw_8bit", weight_decay=0.001, **kwargs):
            super().__init__(*args, optim=optim, weight_decay=weight_decay, **kwargs)

    return UnslothGRPOConfig


@pytest.mark.parametrize("knobs, expected", [
    # empty knobs: Unsloth's own defaults are kept, and recorded as what ran
    ({}, {"optim": "adamw_8bit", "weight_decay": 0.001, "adam_beta1": 0.9, "adam_beta2": 0.999}),
    # the recipe's knobs reach Unsloth's GRPOConfig
    ({"optimizer": "adamw", "weight_decay": 0.1, "adam_beta2": 0.99},
     {"optim": "adamw_torch", "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.99}),
])
def test_optimizer_knobs_reach_unsloths_grpo_config(monkeypatch, tmp_path, knobs, expected):
    import trl

    monkeypatch.setattr(trl, "GRPOConfig", unsloth_grpo_config_class())  # what `import unsloth` does
    recipe = settings.Recipe(**knobs)
    config = trl_config.grpo_config(recipe, trl_config.TrlArgs(), fb.Backend("cpu", "cpu", use_vllm=False), tmp_path)
    used = trl_config.optimizer_used(config)
    assert {k: used[k] for k in expected} == expected
    assert used["optimizer_steps"] == "per_step" and used["engine"].endswith("UnslothGRPOConfig")


# ART 0.5.18, art/dev/get_model_config.py: the trainer_args defaults that _internal_config's
# trainer_args are merged over (`trainer_args.update(config.get("trainer_args", {}))`).
ART_0518_TRAINER_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.99, "gradient_accumulation_steps": 1,
                             "gradient_checkpointing": True, "learning_rate": 5e-6, "lr_scheduler_type": "constant",
                             "max_grad_norm": 0.1, "optim": "paged_adamw_8bit", "weight_decay": 0.1}


@pytest.mark.parametrize("knobs, merged", [
    # empty knobs: ART's defaults
    ({}, {"optim": "paged_adamw_8bit", "adam_beta1": 0.9, "adam_beta2": 0.99, "weight_decay": 0.1}),
    # aligned: the recipe's optimizer and betas reach Unsloth's GRPOConfig inside LocalBackend
    ({"optimizer": "adamw", "adam_beta2": 0.999, "weight_decay": 0.1},
     {"optim": "adamw_torch", "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 0.1}),
])
def test_optimizer_knobs_reach_arts_local_backend(knobs, merged):
    from hntitles.art import config as art_config

    recipe = settings.Recipe(**knobs)
    config = art_config.internal_config(recipe, art_config.ArtArgs())
    assert config["init_args"]["use_exact_model_name"] is True  # ART's Unsloth loads the named model too
    trainer_args = {**ART_0518_TRAINER_DEFAULTS, **config["trainer_args"]}
    assert {k: trainer_args[k] for k in merged} == merged
    _, used = art_config.local_backend_optimizer(recipe)
    assert {k: used[k] for k in merged} == merged
    assert used["optimizer_steps"] == "per_sequence"


@pytest.mark.parametrize("knobs, message", [
    # 0.5.18 overwrites weight decay with 0.1 on every train call: refused, not ignored
    ({"weight_decay": 0.0}, "cannot reach ART 0.5.18's LocalBackend"),
    # one optimizer step per trajectory is all LocalBackend does
    ({"optimizer_steps": "per_step"}, "'per_step' is not available"),
])
def test_art_refuses_knobs_local_backend_cannot_honour(knobs, message):
    with pytest.raises(ValueError, match=message):
        art_config.check(settings.Recipe(**knobs), art_config.ArtArgs(backend="local"))  # the CPU engine honours both


# --------------------------------------------------------------------------------------
# Batches: the same step on any number of processes, the loss in micro-batches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts, gens, micro, processes, expected", [
    # one process, one pass (the default)
    (2, 4, 0, 1, {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "steps_per_generation": 1}),
    # two processes share the 8 completions: 4 each, still one optimizer step
    (2, 4, 0, 2, {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "steps_per_generation": 1}),
    # the GPU recipe: 48 completions, 4 per loss pass -> 12 accumulated passes, one step
    (8, 6, 4, 1, {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 12, "steps_per_generation": 12}),
])
def test_batch_kwargs(prompts, gens, micro, processes, expected):
    recipe = settings.Recipe(prompts_per_step=prompts, num_generations=gens)
    assert trl_config.batch_kwargs(recipe, trl_config.TrlArgs(loss_micro_batch=micro), processes) == expected


@pytest.mark.parametrize("prompts, gens, micro, processes, message", [
    (1, 3, 0, 2, "cannot be split evenly over 2 processes"),  # 3 completions on 2 processes: refused
    (2, 4, 3, 1, "must divide the 8 completions"),
])
def test_batch_kwargs_refuses_uneven_splits(prompts, gens, micro, processes, message):
    with pytest.raises(ValueError, match=message):
        trl_config.batch_kwargs(settings.Recipe(prompts_per_step=prompts, num_generations=gens),
                         trl_config.TrlArgs(loss_micro_batch=micro), processes)


def test_gpu_recipe_runs_the_loss_one_group_at_a_time():
    recipe, args = settings.parse_args((settings.Recipe, trl_config.TrlArgs), "trl",
                                       ["--recipe", str(ROOT / "recipes/gpu.yaml")])
    assert args.require_gpu and not args.gradient_checkpointing  # 15.0 GB measured without it (the recipe's comment)
    kwargs = trl_config.batch_kwargs(recipe, args, 1)
    assert kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"] == 48
    assert kwargs["per_device_train_batch_size"] == recipe.num_generations  # a loss pass = one group


# --------------------------------------------------------------------------------------
# gpu_check.py: refusal on a CPU, and the bare variant's plumbing in a CPU dry run
# --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_gpu_check_refuses_on_a_cpu_machine_in_seconds():
    proc = subprocess.run([sys.executable, "gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env_without_hub_mode(HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: gpu_check needs an NVIDIA GPU") and proc.stderr.count("\n") == 1
    assert "make gpu-check-bare" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_gpu_check_bare_dry_run_trains_one_step_on_tiny_qwen_shapes():
    proc = subprocess.run([sys.executable, "gpu_check.py", "--bare", "--device", "cpu", "--tiny",
                           "--checks", "transformers,unsloth"], cwd=ROOT, capture_output=True, text=True,
                          timeout=400, env=env_without_hub_mode(HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "bare (random-init qwen2.5-0.5b-instruct.json)" in lines[0]
    ok = next(line for line in lines if line.startswith("transformers"))
    # one line per check: status, times, memory, and the step that ran (micro-batches + checkpointing)
    assert " ok " in ok and "loss micro-batch 2 x 2, checkpointing False" in ok
    assert any(line.startswith("unsloth") and " skip " in line and "not part of --bare" in line for line in lines)


def test_bare_config_has_qwen2_5_0_5b_shapes():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    values = {k: v for k, v in json.loads((ROOT / "configs/qwen2.5-0.5b-instruct.json").read_text()).items()
              if k not in ("architectures", "torch_dtype")}

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**values))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 494  # Qwen2.5-0.5B: 0.49B parameters


# --------------------------------------------------------------------------------------
# make setup-art's preflight
# --------------------------------------------------------------------------------------


def preflight_machine(**over):
    from hntitles.art import preflight as art_preflight

    base = dict(glibc="glibc 2.36", nvidia_smi=True, python312=False, runtime_bin="", reachable=lambda url: True)
    return art_preflight.Machine(**{**base, **over})


@pytest.mark.parametrize("over, expected", [
    # everything there (uv may download Python 3.12 from GitHub): nothing to say
    ({}, []),
    # Debian 11 / Ubuntu 20.04: glibc 2.31 is too old for the runtime's manylinux_2_34 vLLM wheel
    ({"glibc": "glibc 2.31"}, ["glibc >= 2.34 for ART's vLLM runtime wheel (this system has glibc 2.31"]),
    # an offline node: every download host is named, and Python 3.12 cannot be fetched either
    ({"reachable": lambda url: False}, ["Python 3.12 for ART's vLLM runtime", "internet access to https://pypi.org"]),
    # offline but with python3.12 installed: only the hosts
    ({"reachable": lambda url: "github" in url, "python312": True}, ["internet access to https://pypi.org/simple/, "
                                                                      "https://files.pythonhosted.org/, https://wheels"]),
    # no GPU and an old glibc at once: both, in one message
    ({"nvidia_smi": False, "glibc": "glibc 2.28"}, ["an NVIDIA GPU and driver", "glibc >= 2.34"]),
    # a prebuilt runtime: no glibc/Python/runtime-host checks, only that it exists
    ({"runtime_bin": "/nonexistent/art-vllm", "glibc": "glibc 2.17"},
     ["ART_VLLM_RUNTIME_BIN=/nonexistent/art-vllm is not an executable file"]),
])
def test_art_preflight_names_everything_missing(over, expected):
    from hntitles.art import preflight as art_preflight

    found = art_preflight.problems(preflight_machine(**over))
    assert len(found) == len(expected), found
    for clause, wanted in zip(found, expected, strict=True):
        assert clause.startswith(wanted), (clause, wanted)


def test_art_preflight_is_one_message(monkeypatch, capsys):
    from hntitles.art import preflight as art_preflight

    machine = preflight_machine(nvidia_smi=False, glibc="glibc 2.31")
    monkeypatch.setattr(art_preflight, "Machine", lambda: machine)
    assert art_preflight.main([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("make setup-art cannot work on this machine; it needs: ")


# --------------------------------------------------------------------------------------
# Loss micro-batches change memory, not the update
# --------------------------------------------------------------------------------------


def lengths_reward(completions, **_) -> list[float]:
    """Varies within a group, so the step has a gradient; no server needed."""
    return [float(len(c[0]["content"])) for c in completions]


def one_step_lora(tiny_model, tmp_path, micro: int, policy) -> dict:
    import copy

    import torch
    from transformers import AutoTokenizer

    recipe = settings.Recipe(model=str(tiny_model), dataset=str(ROOT / "data/stories.jsonl"), prompts_per_step=2,
                          num_generations=4, max_completion_tokens=6, max_steps=1, max_train_stories=4,
                          learning_rate=0.5, max_grad_norm=1e9, loss_type="cispo", lora_r=4, lora_alpha=8)
    args = trl_config.TrlArgs(loss_micro_batch=micro)
    backend = fb.Backend("cpu", "cpu", use_vllm=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    train_ds, _ = utils.load_split(recipe, "train", tokenizer, recipe.max_train_stories)
    model = copy.deepcopy(policy)  # the same LoRA init for both runs
    # plain SGD: the update is lr x gradient, so equal weights mean equal gradients (Adam's first
    # step would only compare signs)
    config = trl_config.grpo_config(recipe, args, backend, tmp_path / f"m{micro}",
                             {"optim": "sgd", "save_strategy": "no", "report_to": "none"})
    trainer = fb.trainer_class(backend)(model=model, reward_funcs=[lengths_reward], args=config,
                                        train_dataset=train_ds, processing_class=tokenizer)
    torch.manual_seed(0)
    trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


@pytest.mark.slow
def test_loss_micro_batches_give_the_same_update(tiny_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():  # PEFT starts lora_B at 0, which would make every lora_A gradient 0
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    before = {k: v.detach().clone() for k, v in policy.named_parameters() if "lora_" in k}
    whole = one_step_lora(tiny_model, tmp_path, 0, policy)    # 8 completions in one loss pass
    pieces = one_step_lora(tiny_model, tmp_path, 2, policy)   # 4 passes of 2, accumulated
    moved = max((whole[k] - before[k]).abs().max().item() for k in whole)
    assert moved > 1e-4  # the step really changed the adapter (A and B)
    assert all((whole[k] - before[k]).abs().max() > 0 for k in whole)
    diff = max((whole[k] - pieces[k]).abs().max().item() for k in whole)
    assert diff <= 1e-5 * moved, (diff, moved)
