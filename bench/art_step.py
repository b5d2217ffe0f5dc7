"""Time an ART step on the CPU engine against a TRL step, same recipe, same run.

ART's loop as train.py runs it (hntitles/art/cpu_backend.py: rollouts over the loopback server,
validator + one batched reward request, `backend.train` = ART's tokenize/pack + the CPU
engine's optimizer step(s) + checkpoint), split into rollout / reward (validator + server) /
training / other (ART's model.log and bookkeeping). The TRL step comes from
bench/grpo_step.py's "repo" variant (the trainer's own reward path), split into generation /
reward / rollout bookkeeping / optimizer. ART variants:

- `default`: LocalBackend's GPU behaviour: one trajectory per row, one optimizer step per row;
- `per_step`: one optimizer step per ART step, one trajectory per row (TRL's step count and
  TRL's training tokens without shared-prefix training: G rows of prompt + completion);
- `per_step+pack`: one optimizer step per ART step, the group packed into one row with its
  prompt once (TRL's tokens when TRL encodes a group's prompt once).

Each runs `--warmup` untimed steps then `--steps` timed ones; wall time (the fastest timed
step) and CPU time of this process (median) are printed, with each ART variant's step as a
ratio of the TRL step (goal: per_step variants <= 1.2x TRL). Starts its own reward server.

    python bench/art_step.py                                # recipes/cpu.yaml, 1 warm-up + 1 timed step each
    python bench/art_step.py --variants per_step+pack --trl false    # the packed variant alone
    python bench/art_step.py --steps 2 --threads 1          # on a machine busy with other jobs
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils
from hntitles.art import compat as art_compat
from hntitles.art import config as art_config
from hntitles.runs import procs, settings
from hntitles.trl import config as trl_config

ART_VARIANTS = {"default": (None, False), "per_step": ("per_step", False), "per_step+pack": ("per_step", True)}
ART_PARTS = ("rollout", "reward", "training", "other")


@dataclass
class ArtBenchArgs:
    recipe: str = field(default="recipes/cpu.yaml", metadata={
        "help": "Recipe whose model and step settings are timed."})
    steps: int = field(default=1, metadata={"help": "Timed steps per variant."})
    warmup: int = field(default=1, metadata={"help": "Untimed steps first (allocator, caches, lazy imports)."})
    variants: str = field(default="default,per_step,per_step+pack", metadata={"help": "ART variants, comma-separated."})
    trl: bool = field(default=True, metadata={
        "help": "Also time the TRL step (bench/grpo_step.py's repo variant, in a child process, after the ART "
                "variants)."})
    reward_url: str = field(default="", metadata={"help": "Use this running reward server instead of starting one."})
    threads: int = field(default=0, metadata={"help": "Torch CPU threads (0 = torch's default)."})


async def art_steps(recipe: settings.Recipe, variant: str, reward_url: str, steps: int, warmup: int) -> list[dict]:
    """train.py's step (rollouts, scoring, backend.train, model.log), timed by part."""
    from transformers import AutoTokenizer

    import train
    from hntitles.art import cpu_backend as art_cpu_backend

    art = art_compat.import_art()
    optimizer_steps, pack = ART_VARIANTS[variant]
    recipe = dataclasses.replace(recipe, optimizer_steps=optimizer_steps, reward_url=reward_url)
    args = art_config.ArtArgs(backend="cpu", pack_groups=pack)
    plan = art_config.plan(recipe, args)
    settings.set_seed(recipe.seed)
    rows = [dict(r) for r in utils.load_split(recipe, recipe.train_split, AutoTokenizer.from_pretrained(recipe.model),
                                              recipe.max_train_stories)[0]]
    out: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="art-bench-") as tmp:
        backend = art_cpu_backend.cpu_backend_class()(path=tmp, options=plan.engine_options)
        model = art.TrainableModel(name="bench", project="bench", base_model=recipe.model, base_path=tmp,
                                   _internal_config=plan.internal_config)
        reward = utils.RewardClient(reward_url, timeout=recipe.reward_timeout, retries=recipe.reward_retries)
        try:
            await model.register(backend)
            validator = train.make_validator(recipe, args, model)
            i = 0
            # A step none of whose groups can teach trains nothing: it does not count (at most 4x as many tried).
            while len(out) < steps and i < warmup + 4 * steps and (i + 1) * recipe.prompts_per_step <= len(rows):
                batch = rows[i * recipe.prompts_per_step:(i + 1) * recipe.prompts_per_step]
                row = await one_step(art, train, model, backend, reward, validator, recipe, plan, batch, i + 1)
                print(f"[art {variant}] step {i + 1}{' (warm-up)' if i < warmup else ''}: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
                if i >= warmup and row["trained"]:
                    out.append(row)
                i += 1
        finally:
            await reward.aclose()
            await backend.close()
    if not out:
        raise SystemExit(f"[art {variant}] no step trained (every group's rewards were equal): nothing to time")
    return out


async def one_step(art, train, model, backend, reward, validator, recipe, plan, batch, step: int) -> dict:
    marks = [(time.perf_counter(), time.process_time())]
    client, name = model.openai_client(), model.get_inference_name()
    groups = await art.gather_trajectory_groups(
        (train.rollout_group(client, name, row, j, recipe, step) for j, row in enumerate(batch)),
        pbar_desc=None, max_exceptions=0, max_metrics=0)
    marks.append((time.perf_counter(), time.process_time()))
    await train.score_groups(groups, [batch[int(g.metadata["batch_index"])] for g in groups], reward, validator, recipe)
    marks.append((time.perf_counter(), time.process_time()))
    keep, _ = train.split_teachable(groups)
    result = await backend.train(model, keep, **plan.train_kwargs) if keep else None
    marks.append((time.perf_counter(), time.process_time()))
    if result is not None:
        await model.log(groups, split="train", metrics=dict(result.metrics), step=result.step)
    marks.append((time.perf_counter(), time.process_time()))
    row = {"trained": float(bool(keep)), "completion_tokens": float(sum(
        len(t.messages_and_choices[-1].logprobs.content or []) for g in groups for t in g.trajectories))}
    for part, (a, b) in zip(ART_PARTS, zip(marks, marks[1:]), strict=True):
        row[f"wall_{part}"], row[f"cpu_{part}"] = b[0] - a[0], b[1] - a[1]
    row["wall_total"], row["cpu_total"] = marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1]
    return row


def trl_steps(recipe: settings.Recipe, reward_url: str, steps: int, warmup: int) -> list[dict]:
    """bench/grpo_step.py's "repo" variant: the TRL trainer's own step, timed by part."""

    spec = importlib.util.spec_from_file_location("bench_grpo_step", Path(__file__).with_name("grpo_step.py"))
    grpo_step = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = grpo_step
    spec.loader.exec_module(grpo_step)
    _, trl_args = settings.parse_args((settings.Recipe, trl_config.TrlArgs), "trl", [])
    return grpo_step.run_variant("repo", recipe, trl_args, reward_url, steps, warmup)


def summarize(steps: list[dict]) -> dict[str, float]:
    """Wall parts from the fastest step (the one other jobs disturbed least), CPU parts as medians."""
    fastest = min(steps, key=lambda s: s["wall_total"])
    return {k: fastest[k] if k.startswith("wall_") else statistics.median(s[k] for s in steps) for k in steps[0]}


def report(art: dict[str, dict], trl: dict | None, recipe: settings.Recipe, load: tuple[float, float]) -> str:
    import torch

    lines = [f"ART step (CPU engine) vs TRL step on {Path(recipe.model).name}: {recipe.prompts_per_step} prompt(s) x "
             f"{recipe.num_generations} generations, <= {recipe.max_completion_tokens} tokens, LoRA r{recipe.lora_r}; "
             f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load {load[0]:.1f} -> {load[1]:.1f}",
             f"{'part':<14}" + "".join(f"{name + ' wall s':>22}" for name in art)]
    for part in ART_PARTS:
        lines.append(f"{part:<14}" + "".join(f"{s[f'wall_{part}']:>22.2f}" for s in art.values()))
    lines.append(f"{'step':<14}" + "".join(f"{s['wall_total']:>22.2f}" for s in art.values()))
    lines.append(f"{'step CPU s':<14}" + "".join(f"{s['cpu_total']:>22.2f}" for s in art.values()))
    if trl is not None:
        lines.append("TRL step: " + ", ".join(f"{p} {trl[f'wall_{p}']:.2f}s" for p in
                                              ("generation", "reward", "rollout_other", "optimizer"))
                     + f"; total {trl['wall_total']:.2f}s wall, {trl['cpu_total']:.2f}s CPU")
        for name, s in art.items():
            goal = ("" if name == "default"
                    else f" (goal <= 1.2x: {'met' if s['wall_total'] <= 1.2 * trl['wall_total'] else 'NOT met'})")
            lines.append(f"ART {name} / TRL: {s['wall_total'] / trl['wall_total']:.2f}x wall, "
                         f"{s['cpu_total'] / trl['cpu_total']:.2f}x CPU; rollout / TRL generation "
                         f"{s['wall_rollout'] / trl['wall_generation']:.2f}x, training / TRL optimizer "
                         f"{s['wall_training'] / trl['wall_optimizer']:.2f}x{goal}")
    return "\n".join(lines)


def main(args: ArtBenchArgs) -> str:
    procs.set_threads(args.threads)
    (recipe,) = settings.parse_args((settings.Recipe,), "art", ["--recipe", args.recipe])
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ART_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(ART_VARIANTS)}")
    load0 = os.getloadavg()
    art_results: dict[str, dict] = {}
    trl = None
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if args.reward_url:
            url = args.reward_url.rstrip("/")
            procs.wait_healthy(url, timeout=10.0)
        else:
            url, _ = stack.enter_context(procs.reward_server(Path(tmp) / "reward_server.log"))
        for variant in variants:
            art_results[variant] = summarize(asyncio.run(art_steps(recipe, variant, url, args.steps, args.warmup)))
        if args.trl:
            # In a child process: TRL's batched loss over G full rows peaks near 10 GB on cpu.yaml, and
            # that memory goes back to the machine when the child ends.
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                trl = summarize(pool.submit(trl_steps, dataclasses.replace(recipe, reward_url=url), url,
                                            args.steps, args.warmup).result())
    text = report(art_results, trl, recipe, (load0[0], os.getloadavg()[0]))
    print(text)
    return text


if __name__ == "__main__":
    from transformers import HfArgumentParser

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    main(HfArgumentParser(ArtBenchArgs, description=__doc__.splitlines()[0]).parse_args_into_dataclasses()[0])
