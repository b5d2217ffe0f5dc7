"""Prove a GPU node can train: one short GRPO step of every installed engine, one line each.

    make gpu-check                                   # after make setup-gpu (and make setup-art)
    make gpu-check ARGS="--model /cache/Qwen2.5-0.5B-Instruct"   # a cached copy, no Hub needed
    make gpu-check-bare                              # a bare CUDA box: torch+transformers+peft+trl only
    python gpu_check.py --bare --device cpu --tiny   # the same plumbing on a CPU, tiny shapes (tests)

Checks, each in its own process (a vLLM engine does not give its memory back), skipped with a
line when its package is missing:

- transformers: transformers + PEFT + the repo's GRPOTrainer class, HF generate;
- unsloth: Unsloth's FastLanguageModel (+ its vLLM when installed), through fast_backend;
- trl-vllm: transformers + PEFT, generation with TRL's colocated vLLM;
- art: ART's LocalBackend from .venv-art (vLLM + Unsloth): one rollout group, one backend.train;
- shared-prefix: the shared-prefix equivalence tests (tests/test_shared_prefix.py) with
  TEST_DEVICE=cuda.

The model is the GPU recipe's (or --model). `--bare` needs no Hub and no model files: the
policy is Qwen2.5-0.5B-Instruct's architecture (configs/qwen2.5-0.5b-instruct.json) with
random weights and a word-level tokenizer built on the spot (hntitles/engines/bare_policy.py, which
bench/gpu_step.py uses too), and the step has the GPU recipe's shape (8 prompts x 6
generations, 8092-token prompts, 100 new tokens, loss micro-batches of one group and gradient
checkpointing as in recipes/gpu.yaml) inside --memory_cap_gb of GPU memory, the share vLLM
leaves on an 80 GB card. Rewards are a fixed function of the completion (no reward server).

Each line: check, ok/FAIL/skip, wall seconds (load + step), step seconds, torch peak GPU
memory (allocated / reserved) and the device-wide peak from nvidia-smi. Exit 0 when nothing
failed, 1 when a check failed, 2 when this machine cannot run the checks (said in one message).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import utils
from hntitles.engines import bare_policy, fast_backend
from hntitles.runs import settings
from hntitles.runs.settings import Recipe
from hntitles.trl import config as trl_config
from hntitles.trl.config import TrlArgs

ROOT = Path(__file__).resolve().parent
CHECKS = ("transformers", "unsloth", "trl-vllm", "art", "shared-prefix")
RESULT = "GPU_CHECK_RESULT "  # prefix of the one JSON line a child prints
EXIT_OK, EXIT_FAILED, EXIT_CANNOT = 0, 1, 2


@dataclass
class CheckArgs:
    bare: bool = field(default=False, metadata={
        "help": "Only torch + transformers + peft + trl: random-init Qwen2.5-0.5B shapes, no Hub, no model files."})
    device: str = field(default="cuda", metadata={"help": "cuda, or cpu for a dry run of the plumbing (with --bare)."})
    tiny: bool = field(default=False, metadata={
        "help": "Tiny shapes (2 layers, hidden 64) and a tiny step: for the CPU dry run."})
    recipe: str = field(default="recipes/gpu.yaml", metadata={
        "help": "Recipe whose model, LoRA and trl block the checks use."})
    model: str = field(default="", metadata={"help": "Model id or local folder instead of the recipe's."})
    shape: str = field(default="", metadata={
        "help": "Step shape: recipe (the GPU recipe's), small or tiny (default: recipe with --bare, small otherwise, "
                "tiny with --tiny)."})
    memory_cap_gb: float = field(default=32.0, metadata={
        "help": "--bare: cap the trainer at this much GPU memory (what vLLM leaves on an 80 GB card at 0.6); 0 = no "
                "cap."})
    checks: str = field(default="", metadata={
        "help": "Comma-separated subset of " + ", ".join(CHECKS) + " (default: all)."})
    timeout: float = field(default=1800.0, metadata={"help": "Seconds per check."})
    only: str = field(default="", metadata={
        "help": "Internal: run this one check in this process and print its result line."})


# --------------------------------------------------------------------------------------
# Can this machine run the checks at all? (seconds, before anything heavy)
# --------------------------------------------------------------------------------------


def machine_problem(args: CheckArgs) -> str | None:
    """Why the checks cannot run here, in one message, or None."""
    if args.device == "cpu":
        return None if args.bare else "--device cpu is a dry run of the bare variant only: add --bare (and --tiny)"
    missing = [m for m in ("torch", "transformers", "peft", "trl") if importlib.util.find_spec(m) is None]
    if missing:
        return f"missing Python packages {missing}: `make setup` (or pip install them)"
    machine = fast_backend.Machine.detect()
    if machine.cuda:
        return None
    if machine.driver:
        return fast_backend.unusable_gpu_message(machine, "gpu_check needs the GPU")
    return (f"gpu_check needs an NVIDIA GPU that torch can use: no NVIDIA driver here (nvidia-smi not found) and "
            f"torch {machine.torch_version} sees no CUDA. Run it on a GPU node after `make setup-gpu` (and "
            "`make setup-art` for ART): `make gpu-check`; on a bare CUDA box with only torch + transformers + "
            "peft + trl: `make gpu-check-bare`. On a CPU, `python gpu_check.py --bare --device cpu --tiny` "
            "dry-runs the plumbing.")


def installed(check: str, args: CheckArgs) -> str | None:
    """Why `check` is skipped here, or None when it can run."""
    if args.bare and check in ("unsloth", "trl-vllm", "art"):
        return "not part of --bare"
    if check == "unsloth" and importlib.util.find_spec("unsloth") is None:
        return "unsloth not installed (`make setup-gpu`)"
    if check == "trl-vllm" and importlib.util.find_spec("vllm") is None:
        return "vllm not installed (`make setup-gpu`)"
    if check == "art" and not (ROOT / ".venv-art" / "bin" / "python").exists():
        return "no .venv-art (`make setup-art`)"
    if check == "shared-prefix" and importlib.util.find_spec("pytest") is None:
        return "pytest not installed"
    return None


# --------------------------------------------------------------------------------------
# The policy and the step
# --------------------------------------------------------------------------------------


def check_recipe(args: CheckArgs) -> tuple[Recipe, TrlArgs]:
    """The recipe and its trl block as the trainer reads them (settings.parse_args: a misspelt
    section or key is an error naming it), with this check's step shape and one step."""
    argv = ["--recipe", args.recipe] + (["--model", args.model] if args.model else [])
    recipe, trl_args = settings.parse_args((Recipe, TrlArgs), "trl", argv)
    prompts, gens, prompt_tokens, new_tokens, micro = bare_policy.SHAPES[step_shape(args)]
    recipe.prompts_per_step, recipe.num_generations = prompts, gens
    recipe.max_completion_tokens, recipe.max_prompt_tokens = new_tokens, prompt_tokens
    recipe.max_steps, recipe.stop_at_newline = 1, False
    trl_args.loss_micro_batch = micro
    if args.tiny:
        recipe.lora_r, recipe.lora_alpha = 4, 8
    return recipe, trl_args


def step_shape(args: CheckArgs) -> str:
    return args.shape or ("tiny" if args.tiny else "recipe" if args.bare else "small")


def trl_step(args: CheckArgs, engine: str) -> dict:
    """One GRPO step through the repo's backend seam and GRPOConfig builder (trl_config.grpo_config);
    returns the step's seconds and settings."""
    import torch
    from datasets import Dataset

    recipe, trl_args = check_recipe(args)
    device = "cpu" if args.device == "cpu" else "cuda"
    use_vllm = engine == "trl-vllm" or (engine == "unsloth" and importlib.util.find_spec("vllm") is not None)
    backend = fast_backend.Backend(engine if engine != "transformers" else ("cpu" if device == "cpu" else engine),
                                   device, use_vllm=use_vllm, vllm_mode="colocate" if engine == "trl-vllm" else "")
    if args.bare:
        cap_memory(args)
        model, tokenizer = bare_policy.bare_policy(recipe, device, tiny=args.tiny)
    else:
        model, tokenizer = fast_backend.load_policy(backend, recipe, trl_args)
    config = trl_config.grpo_config(recipe, trl_args, backend, Path(tempfile.mkdtemp(prefix="gpu-check-")),
                                    {"save_strategy": "no"})
    trainer = fast_backend.trainer_class(backend)(
        model=model, reward_funcs=[bare_policy.length_reward], args=config, processing_class=tokenizer,
        train_dataset=Dataset.from_list(bare_policy.prompts(tokenizer, recipe.prompts_per_step,
                                                            recipe.max_prompt_tokens)))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    return {"step_s": time.perf_counter() - t0, "detail": f"{recipe.prompts_per_step}x{recipe.num_generations} seqs, "
            f"~{recipe.max_prompt_tokens}+{recipe.max_completion_tokens} tokens, loss micro-batch "
            f"{config.per_device_train_batch_size} x {config.gradient_accumulation_steps}, checkpointing "
            f"{config.gradient_checkpointing}, {recipe.loss_type} epsilon_high {config.epsilon_high}, "
            f"loss {trainer.state.log_history[0].get('loss')}" + shared_prefix_note(trainer)}


def shared_prefix_note(trainer) -> str:
    """What the repo's trainer said about its shared-prefix loss (its fallbacks), or that it ran throughout."""
    if not hasattr(trainer, "_shared_prefix_groups"):
        return ""  # TRL's own class (Unsloth)
    off = sorted(getattr(trainer, "_shared_prefix_fallbacks", set()))
    return ", " + ("; ".join(off) if off else "shared-prefix loss on every micro-batch")


def cap_memory(args: CheckArgs) -> None:
    """Hold the trainer to what vLLM would leave it (--memory_cap_gb), so a fit here means a fit there."""
    import torch

    if args.device != "cuda" or not args.memory_cap_gb:
        return
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(args.memory_cap_gb / total, 1.0))


def art_step(args: CheckArgs) -> dict:
    """ART's LocalBackend (in .venv-art): register, one rollout group, one backend.train."""
    import asyncio

    from hntitles.art import config as art_config
    from hntitles.art.compat import import_art

    recipe, _ = check_recipe(args)
    art = import_art()
    from art.local import LocalBackend

    async def run() -> dict:
        path = tempfile.mkdtemp(prefix="gpu-check-art-")
        plan = art_config.plan(recipe, art_config.ArtArgs(backend="local"))
        backend = LocalBackend(path=path)
        model = art.TrainableModel(name="gpu-check", project="gpu-check", base_model=recipe.model, base_path=path,
                                   _internal_config=plan.internal_config)
        try:
            await model.register(backend)
            messages = utils.title_messages("We rewrote our build system in a weekend and cut CI times to six minutes.")
            resp = await model.openai_client().chat.completions.create(
                model=model.get_inference_name(), messages=messages, n=recipe.num_generations,
                max_tokens=recipe.max_completion_tokens, temperature=1.0, logprobs=True)
            # rewards that differ within the group (ART drops groups whose rewards are all equal)
            trajectories = [art.Trajectory(messages_and_choices=[*messages, c], reward=float(i))
                            for i, c in enumerate(sorted(resp.choices, key=lambda c: c.index))]
            t0 = time.perf_counter()
            result = await backend.train(model, [art.TrajectoryGroup(trajectories)], **plan.train_kwargs)
            return {"step_s": time.perf_counter() - t0, "detail": f"art step {result.step}, {len(trajectories)} "
                    f"trajectories, loss {result.metrics.get('loss/train', result.metrics.get('loss'))}"}
        finally:
            await backend.close()

    return asyncio.run(run())


SHARED_PREFIX_TESTS = "tests/test_shared_prefix.py"


def shared_prefix_tests(args: CheckArgs) -> dict:
    """The shared-prefix equivalence tests (outputs and gradients against TRL's path) with
    TEST_DEVICE set to this check's device, or a skip line when the file is not there."""
    if not (ROOT / SHARED_PREFIX_TESTS).exists():
        return {"skip": f"no {SHARED_PREFIX_TESTS} (it comes with the shared-prefix training path)"}
    env = {**os.environ, "TEST_DEVICE": args.device}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", SHARED_PREFIX_TESTS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode:
        raise RuntimeError(f"{SHARED_PREFIX_TESTS} failed: {tail}\n{proc.stdout[-3000:]}")
    return {"step_s": time.perf_counter() - t0, "detail": f"{SHARED_PREFIX_TESTS} (TEST_DEVICE={args.device}): {tail}"}


# --------------------------------------------------------------------------------------
# Parent: one child per check, one line per check
# --------------------------------------------------------------------------------------


def run_one(args: CheckArgs) -> int:
    """Child: run args.only here and print one RESULT line (also for a failure)."""
    t0 = time.perf_counter()
    out: dict = {"check": args.only}
    try:
        if args.only == "unsloth":
            importlib.import_module("unsloth")  # before transformers/trl, as the trainer does
        out.update(art_step(args) if args.only == "art" else shared_prefix_tests(args)
                   if args.only == "shared-prefix" else trl_step(args, args.only))
        out["status"] = "skip" if "skip" in out else "ok"
    except Exception as e:  # reported as this check's FAIL line; the other checks still run
        out.update(status="FAIL", detail=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    out["wall_s"] = time.perf_counter() - t0
    out.update(torch_peaks(args.device))
    print(RESULT + json.dumps(out), flush=True)
    return EXIT_OK if out["status"] != "FAIL" else EXIT_FAILED


def torch_peaks(device: str) -> dict:
    if device != "cuda" or "torch" not in sys.modules:
        return {}
    import torch

    if not torch.cuda.is_initialized():
        return {}
    return {"alloc_gb": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gb": torch.cuda.max_memory_reserved() / 2**30}


class DevicePeak(threading.Thread):
    """The GPU's used memory, polled from nvidia-smi while a check runs (vLLM's too, any process)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mb, self.stop = 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and shutil.which("nvidia-smi"):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout.split()
                self.peak_mb = max([self.peak_mb, *(float(x) for x in out[:1])])
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self.stop.wait(0.5)


def child_command(check: str, argv: list[str]) -> list[str]:
    python = str(ROOT / ".venv-art" / "bin" / "python") if check == "art" else sys.executable
    return [python, str(Path(__file__).resolve()), *argv, "--only", check]


def run_check(check: str, args: CheckArgs, argv: list[str]) -> dict:
    """Run one check in a child process; its result line, or a FAIL made from its output."""
    sampler = DevicePeak()
    if args.device == "cuda":
        sampler.start()
    env = dict(os.environ)
    if check == "art":  # ART runs uv and its vLLM runtime from its own venv's bin/
        env["PATH"] = f"{ROOT / '.venv-art' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(child_command(check, argv), cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
        result = json.loads(lines[-1][len(RESULT):]) if lines else {
            "check": check, "status": "FAIL",
            "detail": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1][:300]}"}
        if result["status"] == "FAIL":
            result["log"] = (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired:
        result = {"check": check, "status": "FAIL", "detail": f"timed out after {args.timeout:.0f}s"}
    sampler.stop.set()
    result["wall_s"] = time.perf_counter() - t0
    if sampler.peak_mb:
        result["device_gb"] = sampler.peak_mb / 1024
    return result


def line(result: dict) -> str:
    def gb(key: str) -> str:
        return f"{result[key]:.1f}" if key in result else "-"

    step = f"{result['step_s']:.1f}s" if "step_s" in result else "-"
    return (f"{result['check']:<14} {result['status']:<4} wall {result['wall_s']:6.1f}s  step {step:>7}  "
            f"torch peak {gb('alloc_gb')}/{gb('reserved_gb')} GB  device peak {gb('device_gb')} GB  "
            f"{result.get('detail') or result.get('skip', '')}")


def main(args: CheckArgs, argv: list[str]) -> int:
    if not args.bare:  # .env (HF_HOME, HF_TOKEN) and the Hub mode for the model, before transformers
        settings.prepare_env(["--recipe", args.recipe, *(["--model", args.model] if args.model else [])])
    if args.only:
        return run_one(args)
    problem = machine_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_CANNOT
    wanted = [c.strip() for c in args.checks.split(",") if c.strip()] or list(CHECKS)
    unknown = sorted(set(wanted) - set(CHECKS))
    if unknown:
        print(f"error: unknown check(s) {unknown}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return EXIT_CANNOT
    gpu = fast_backend.Machine.detect() if args.device == "cuda" else None
    policy = f"bare (random-init {bare_policy.QWEN_CONFIG.name})" if args.bare else f"model from {args.recipe}"
    print(f"gpu_check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: device {args.device}"
          + (f" ({gpu.gpu_name}, driver {gpu.driver}, torch {gpu.torch_version} CUDA {gpu.torch_cuda})" if gpu else "")
          + f", {policy}"
          + f", step shape {step_shape(args)}", flush=True)
    failed = 0
    for check in wanted:
        skip = installed(check, args)
        result = {"check": check, "status": "skip", "wall_s": 0.0, "detail": skip} if skip else \
            run_check(check, args, argv)
        print(line(result), flush=True)
        if result["status"] == "FAIL":
            failed += 1
            print("  " + result.get("log", "").replace("\n", "\n  ")[-3000:], file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def parse(argv: list[str]) -> CheckArgs:
    """The flags (transformers' HfArgumentParser over CheckArgs); --help ends with this docstring's commands."""
    import argparse

    from transformers import HfArgumentParser

    parser = HfArgumentParser(CheckArgs, description=__doc__.splitlines()[0], epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.parse_args_into_dataclasses(args=argv)[0]


if __name__ == "__main__":
    sys.exit(main(parse(sys.argv[1:]), sys.argv[1:]))
