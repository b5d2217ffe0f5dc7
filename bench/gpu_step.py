"""Time a GRPO step at the GPU recipe's shape: the repo's trainer against TRL's stock GRPOTrainer.

Both sides train hntitles/engines/bare_policy.py's policy (random-init Qwen2.5-0.5B shapes from configs/, a
word tokenizer, ~8,092-token prompts; no Hub, no model files) on recipes/gpu.yaml's step:
8 prompts x 6 completions of 100 new tokens, the recipe's LoRA (r8 on 7 projections) and loss
(cispo), HF generate, bf16. Both GRPOConfigs come from trl_config.grpo_config:

- repo: fast_backend.trainer_class (shared-prefix loss over group-aligned micro-batches, one
  prefill per prompt in rollouts) with the recipe's trl block (loss micro-batch, checkpointing);
- stock: trl.GRPOTrainer unmodified, with what a TRL user picks at this size: gradient
  checkpointing and loss micro-batch 4.

Each side runs in its own process (its peak memory its own) under --memory_cap_gb of GPU memory
(the share vLLM at 0.6 leaves on an 80 GB card, as in gpu_check.py); a side that runs out of
memory under the cap runs again uncapped, and the table says so. Two steps each, the second
(warm) one reported: the whole step, generation (GRPOTrainer._generate) and the loss part (the
step minus the rollout: forward + backward + optimizer), CUDA synchronised at every mark; peak
GPU memory (torch.cuda.max_memory_allocated), or the process's peak RSS on the CPU. The last
two lines are `gpu loss speedup vs stock GRPOTrainer: N.NNx` and
`gpu step speedup vs stock GRPOTrainer: N.NNx`.

`--attention sdpa,eager,flex_attention` times the shared-prefix loss pass alone instead: forward +
backward of one group (a --prompt_tokens prompt, default the shape's, x num_generations
completions of max_completion_tokens) per attention kernel, each kernel in its own process, in
each layout shared_prefix offers it ("cached" and "packed"; flex only "packed"), and lists the
attention ops the profiler saw run (which SDPA kernel: flash, memory-efficient or math).

    make gpu-bench                                    # the recipe's shape on the GPU
    python bench/gpu_step.py --device cpu --tiny      # the same plumbing on a CPU (tests)
    python bench/gpu_step.py --attention sdpa,eager,flex_attention --prompt_tokens 8092
    python bench/gpu_step.py --attention sdpa --checkpointing   # the packed layout, layers recomputed
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hntitles.engines import bare_policy, fast_backend
from hntitles.runs import settings
from hntitles.trl import config as trl_config

ROOT = Path(__file__).resolve().parents[1]
RESULT = "GPU_BENCH_RESULT "  # prefix of the one JSON line a child prints
SIDES = ("repo", "stock")
STOCK_MICRO = {"recipe": 4, "tiny": 2}  # the stock side's loss micro-batch (a TRL user's pick at this size)
KERNEL_OPS = re.compile(r"scaled_dot_product|flash|efficient_attention|fmha|flex|cutlass", re.I)


@dataclass
class GpuBenchArgs:
    device: str = field(default="cuda", metadata={"help": "cuda, or cpu for a dry run of the plumbing (with --tiny)."})
    tiny: bool = field(default=False, metadata={
        "help": "Tiny shapes (2 layers, hidden 64) and a tiny step (2 prompts x 2 completions): the CPU dry run."})
    recipe: str = field(default="recipes/gpu.yaml", metadata={
        "help": "Recipe whose LoRA, loss and trl block (the repo side's micro-batch and checkpointing) are used."})
    memory_cap_gb: float = field(default=32.0, metadata={
        "help": "GPU memory each side may use (what vLLM at 0.6 leaves on an 80 GB card); 0 = no cap. A side that "
                "runs out of memory under it runs again uncapped (said in the output)."})
    steps: int = field(default=2, metadata={"help": "Steps per side; the last (warm) one is reported."})
    attention: str = field(default="", metadata={
        "help": "Comma-separated attention kernels (sdpa, eager, flex_attention): time the loss pass per kernel "
                "instead of the step."})
    prompt_tokens: int = field(default=0, metadata={"help": "Prompt length (0 = the shape's: 8092, tiny 24)."})
    checkpointing: bool = field(default=False, metadata={
        "help": "--attention: gradient checkpointing on (the shared-prefix loss then runs the packed layout)."})
    repeats: int = field(default=3, metadata={"help": "--attention: timed passes per layout (the best is kept)."})
    timeout: float = field(default=1800.0, metadata={"help": "Seconds per child process."})
    only: str = field(default="", metadata={"help": "Internal: run this side (or attention:KERNEL) here."})


# --------------------------------------------------------------------------------------
# Child side: one trainer (or one attention kernel) in this process
# --------------------------------------------------------------------------------------


def shape(args: GpuBenchArgs) -> str:
    return "tiny" if args.tiny else "recipe"


def side_recipe(args: GpuBenchArgs, side: str):
    """The recipe and trl block as the trainer reads them, with the bench's step shape and steps:
    the repo side keeps the recipe's checkpointing and micro-batch (one group at the tiny shape),
    the stock side gets gradient checkpointing and STOCK_MICRO."""
    recipe, trl_args = settings.parse_args((settings.Recipe, trl_config.TrlArgs), "trl", ["--recipe", args.recipe])
    prompts, gens, prompt_tokens, new_tokens, micro = bare_policy.SHAPES[shape(args)]
    recipe.prompts_per_step, recipe.num_generations = prompts, gens
    recipe.max_completion_tokens, recipe.max_prompt_tokens = new_tokens, args.prompt_tokens or prompt_tokens
    recipe.max_steps, recipe.stop_at_newline, recipe.save_every = args.steps, False, 10 ** 6
    if args.tiny:
        recipe.lora_r, recipe.lora_alpha = 4, 8
    if side == "stock":
        trl_args.gradient_checkpointing, trl_args.loss_micro_batch = True, STOCK_MICRO[shape(args)]
    elif args.tiny or not trl_args.loss_micro_batch:
        trl_args.loss_micro_batch = micro
    return recipe, trl_args


def cap_memory(args: GpuBenchArgs) -> None:
    """Hold this process to --memory_cap_gb of the GPU (what vLLM would leave it)."""
    import torch

    if args.device == "cuda" and args.memory_cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        torch.cuda.set_per_process_memory_fraction(min(args.memory_cap_gb / total, 1.0))


def clock(device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_gb(device: str) -> float:
    """Peak GPU memory torch allocated (cuda) or the process's peak RSS (cpu), in GiB."""
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class PartTimer:
    """Times each optimizer step by part: generation, the rest of the rollout, the loss part."""

    def __init__(self, device: str):
        self.device = device
        self.acc: dict[str, float] = defaultdict(float)
        self.steps: list[dict] = []
        self._begin: tuple = ()

    def wrap(self, trainer) -> None:
        for method, key in (("_generate", "generation"), ("_generate_and_score_completions", "rollout")):
            original = getattr(trainer, method)

            def timed(*a, _original=original, _key=key, **kw):
                t0 = clock(self.device)
                try:
                    return _original(*a, **kw)
                finally:
                    self.acc[_key] += clock(self.device) - t0

            setattr(trainer, method, timed)  # instance attribute: TRL calls self.<method>(...)

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class Marks(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                outer._begin = (clock(outer.device), dict(outer.acc))

            def on_step_end(self, args, state, control, **kw):
                t0, acc0 = outer._begin
                total = clock(outer.device) - t0
                part = {k: outer.acc[k] - acc0.get(k, 0.0) for k in ("generation", "rollout")}
                outer.steps.append({"step_s": total, "generation_s": part["generation"],
                                    "loss_s": total - part["rollout"]})

        return Marks()


def trl_side(args: GpuBenchArgs, side: str) -> dict:
    """Train `args.steps` steps of `side` here; the warm step's parts, peak memory and settings."""
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    recipe, trl_args = side_recipe(args, side)
    backend = fast_backend.Backend("cpu" if args.device == "cpu" else "transformers", args.device, use_vllm=False)
    cap_memory(args)
    model, tokenizer = bare_policy.bare_policy(recipe, args.device, tiny=args.tiny)
    config = trl_config.grpo_config(recipe, trl_args, backend, Path(tempfile.mkdtemp(prefix="gpu-bench-")),
                                    {"save_strategy": "no", "logging_steps": 1})
    cls = fast_backend.trainer_class(backend) if side == "repo" else GRPOTrainer
    timer = PartTimer(args.device)
    data = Dataset.from_list(bare_policy.prompts(tokenizer, recipe.prompts_per_step, recipe.max_prompt_tokens))
    trainer = cls(model=model, reward_funcs=[bare_policy.length_reward], args=config, processing_class=tokenizer,
                  train_dataset=data, callbacks=[timer.callback()])
    timer.wrap(trainer)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    settings_line = (f"{cls.__name__}, loss micro-batch {config.per_device_train_batch_size} x "
                     f"{config.gradient_accumulation_steps}, checkpointing {config.gradient_checkpointing}")
    if side == "repo":
        off = sorted(getattr(trainer, "_shared_prefix_fallbacks", set()))
        settings_line += "; " + ("; ".join(off) if off else "shared-prefix loss on every micro-batch")
    return {**timer.steps[-1], "peak_gb": peak_gb(args.device), "settings": settings_line,
            "shape": f"{recipe.prompts_per_step} prompts x {recipe.num_generations} completions, "
                     f"~{recipe.max_prompt_tokens}-token prompts, {recipe.max_completion_tokens} new tokens, "
                     f"{recipe.loss_type}, LoRA r{recipe.lora_r}"}


def attention_side(args: GpuBenchArgs, kernel: str) -> dict:
    """The shared-prefix loss pass (forward + backward of one group) with `kernel`, per layout."""
    import torch

    from hntitles.engines import shared_prefix

    recipe, _ = side_recipe(args, "repo")
    cap_memory(args)
    model, tok = bare_policy.bare_policy(recipe, args.device, tiny=args.tiny, attn=kernel)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    messages = bare_policy.prompts(tok, 1, recipe.max_prompt_tokens)[0]["prompt"]
    prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    g, n = recipe.num_generations, recipe.max_completion_tokens
    completions = torch.randint(4, len(tok), (g, n), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([torch.tensor([prompt] * g), completions], dim=1).to(args.device)
    mask = torch.ones_like(ids)
    groups = shared_prefix.group_rows(ids, mask, n)
    layouts = ["packed"] if args.checkpointing or kernel == "flex_attention" else list(shared_prefix.LAYOUTS)
    rows = []
    for layout in layouts:
        def loss_pass(layout=layout):
            model.zero_grad(set_to_none=True)
            logps, _ = shared_prefix.per_token_logps(model, ids, mask, n, groups, compute_entropy=True, layout=layout)
            logps.sum().backward()

        rows.append({"kernel": kernel, "layout": layout, **time_pass(loss_pass, args)})
    return {"rows": rows, "prompt_tokens": len(prompt), "completions": g, "new_tokens": n,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}


def time_pass(loss_pass, args: GpuBenchArgs) -> dict:
    """Best of args.repeats timed passes after a warm-up, peak memory, and the attention ops that ran
    (from the profiler); or the error, in one line, when the kernel cannot run this pass here."""
    import torch

    try:
        loss_pass()  # warm-up: allocator, kernel selection, flex attention's compile
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            t0 = clock(args.device)
            loss_pass()
            times.append(clock(args.device) - t0)
        return {"s": min(times), "peak_gb": peak_gb(args.device), "ops": ops_seen(loss_pass, args.device)}
    except Exception as e:  # a kernel this machine cannot run (flex on a CPU has no backward): reported, not fatal
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"}


def ops_seen(fn, device: str) -> list[str]:
    """Names of the forward attention ops and kernels the profiler saw during fn(): what SDPA
    dispatched to (flash, memory-efficient or math), not its dispatcher or the autograd nodes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
    names = sorted({e.key for e in prof.key_averages() if KERNEL_OPS.search(e.key)
                    and not e.key.startswith("autograd::") and not e.key.endswith("Backward0")
                    and "backward" not in e.key and e.key != "aten::scaled_dot_product_attention"})
    return [n[:60] for n in names][:4]


def run_child(args: GpuBenchArgs) -> int:
    """Child: run args.only and print one RESULT line (also for a failure or out of memory)."""
    out: dict = {"only": args.only}
    try:
        kernel = args.only.partition("attention:")[2]
        out.update(attention_side(args, kernel) if kernel else trl_side(args, args.only))
        out["status"] = "ok"
    except Exception as e:  # reported in the parent's table; out of memory makes it rerun uncapped
        oom = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
        out.update(status="oom" if oom else "FAIL", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    print(RESULT + json.dumps(out), flush=True)
    return 0 if out["status"] == "ok" else 1


# --------------------------------------------------------------------------------------
# Parent: one child per side, the table, the speedups
# --------------------------------------------------------------------------------------


def in_child(only: str, argv: list[str], args: GpuBenchArgs, extra: tuple = ()) -> dict:
    """Run `--only only` in a fresh process; its result line, or a FAIL made from its output."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, *extra, "--only", only]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"only": only, "status": "FAIL", "error": f"timed out after {args.timeout:.0f}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if lines:
        result = json.loads(lines[-1][len(RESULT):])
    else:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        result = {"only": only, "status": "FAIL", "error": f"exit {proc.returncode}: {tail}"}
    if result["status"] != "ok":
        result["log"] = (proc.stdout + proc.stderr)[-3000:]
    return result


def run_side(side: str, argv: list[str], args: GpuBenchArgs) -> dict:
    """One side in its own process; out of memory under the cap: once more, uncapped."""
    result = in_child(side, argv, args)
    if result["status"] == "oom" and args.device == "cuda" and args.memory_cap_gb:
        print(f"[{side}] out of memory under the {args.memory_cap_gb:g} GB cap ({result['error'][:120]}); "
              "running it again uncapped", flush=True)
        result = in_child(side, argv, args, ("--memory_cap_gb", "0"))
        result["uncapped"] = True
    return result


def step_table(results: dict, args: GpuBenchArgs) -> list[str]:
    memory = "peak GPU GB" if args.device == "cuda" else "peak RSS GB"
    lines = [f"{'side':<6}{'step s':>9}{'generation s':>14}{'loss s':>9}{memory:>13}  settings"]
    for side in SIDES:
        r = results[side]
        cap = (f" (out of memory under the {args.memory_cap_gb:g} GB cap: this run uncapped)"
               if r.get("uncapped") else "")
        lines.append(f"{side:<6}{r['step_s']:>9.2f}{r['generation_s']:>14.2f}{r['loss_s']:>9.2f}"
                     f"{r['peak_gb']:>13.2f}  {r['settings']}{cap}")
    repo, stock = results["repo"], results["stock"]
    lines += [f"gpu loss speedup vs stock GRPOTrainer: {stock['loss_s'] / repo['loss_s']:.2f}x",
              f"gpu step speedup vs stock GRPOTrainer: {stock['step_s'] / repo['step_s']:.2f}x"]
    return lines


def attention_table(results: list[dict], args: GpuBenchArgs) -> list[str]:
    first = next((r for r in results if r["status"] == "ok"), {})
    lines = [f"attention kernels: forward + backward of the shared-prefix loss on one group "
             f"({first.get('prompt_tokens', '?')}-token prompt x {first.get('completions', '?')} completions of "
             f"{first.get('new_tokens', '?')} tokens, {first.get('dtype', '?')}), checkpointing {args.checkpointing}, "
             f"best of {args.repeats}, each kernel in its own process",
             f"{'kernel':<16}{'layout':<8}{'seconds':>9}{'peak GB':>9}  attention ops that ran"]
    timed = []
    for r in results:
        if r["status"] != "ok":
            lines.append(f"{r['only'].partition(':')[2]:<16}{'-':<8}{'-':>9}{'-':>9}  {r['status']}: {r['error']}")
            continue
        for row in r["rows"]:
            if "error" in row:
                lines.append(f"{row['kernel']:<16}{row['layout']:<8}{'-':>9}{'-':>9}  not run: {row['error']}")
                continue
            timed.append(row)
            lines.append(f"{row['kernel']:<16}{row['layout']:<8}{row['s']:>9.3f}{row['peak_gb']:>9.2f}  "
                         f"{', '.join(row['ops']) or '-'}")
    if timed:
        best = min(timed, key=lambda row: row["s"])
        lines.append(f"fastest: {best['kernel']} {best['layout']} {best['s']:.3f} s")
    return lines


def header(args: GpuBenchArgs) -> str:
    import torch

    where = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__} CUDA {torch.version.cuda}"
             if args.device == "cuda" else f"cpu, torch {torch.__version__}, {os.cpu_count()} cores")
    cap = f"memory cap {args.memory_cap_gb:g} GB" if args.device == "cuda" and args.memory_cap_gb else "no memory cap"
    return (f"gpu_step {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {where}; bare random-init "
            f"{bare_policy.QWEN_CONFIG.name}{' (tiny)' if args.tiny else ''}, step shape {shape(args)}, {cap}")


def main(args: GpuBenchArgs, argv: list[str]) -> int:
    if args.only:
        return run_child(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: bench/gpu_step.py needs a GPU torch can use (torch.cuda.is_available() is False); "
                  "`python bench/gpu_step.py --device cpu --tiny` dry-runs the plumbing on a CPU", file=sys.stderr)
            return 2
    print(header(args), flush=True)
    if args.attention:
        results = [in_child(f"attention:{k.strip()}", argv, args) for k in args.attention.split(",") if k.strip()]
        print("\n".join(attention_table(results, args)))
        return 0 if any(r["status"] == "ok" for r in results) else 1
    results = {}
    for side in SIDES:
        results[side] = run_side(side, argv, args)
        r = results[side]
        print(f"[{side}] {r['status']}" + (f": {r.get('shape')}" if r["status"] == "ok" else f": {r['error']}"),
              flush=True)
        if r["status"] != "ok":
            print("  " + r.get("log", "").replace("\n", "\n  "), file=sys.stderr)
            return 1
    print("\n".join(step_table(results, args)))
    return 0


def parse(argv: list[str]) -> GpuBenchArgs:
    """The flags (transformers' HfArgumentParser over GpuBenchArgs); --help ends with this docstring's commands."""
    import argparse

    from transformers import HfArgumentParser

    parser = HfArgumentParser(GpuBenchArgs, description=__doc__.splitlines()[0], epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.parse_args_into_dataclasses(args=argv)[0]


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(parse(sys.argv[1:]), sys.argv[1:]))
