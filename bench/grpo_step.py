"""Time a TRL GRPO step on the CPU recipe: the repo's trainer against TRL's own GRPOTrainer.

Two trainers on the same model, data and GRPOConfig (trl_config.grpo_config):

- repo: the repo's trainer class (fast_backend.trainer_class: each distinct prompt encoded once
  in the loss, one prefill per prompt and the LoRA folded into the weights in rollouts) with its
  reward function (validator + batched reward-server request + the shared reward rule) and its
  per-step metrics callback;
- bare: TRL's `GRPOTrainer`, unmodified, with a constant reward (0.0 for every completion).

Each trainer runs in its own process (so each one's peak RSS is its own): `--warmup` untimed
steps then `--steps` timed ones, `--rounds` times per variant in the order repo, bare, bare,
repo (a load that drifts hits both alike). A step is split into generation
(GRPOTrainer._generate), reward (_calculate_rewards: validator + server), the rest of the
rollout bookkeeping (tokenising, padding, advantages) and the loss part (forward + backward +
optimizer step: the remainder of the step). The bare trainer's constant reward gives zero
advantages, so its policy cannot move; the repo's can, and its completion lengths drift.

Then the loss pass alone on a long-prompt shape (`--long_prompt_tokens` of article, the
recipe's num_generations completions of max_completion_tokens each): TRL's own logprob
computation against the repo's, forward + backward, each in its own process. TRL's batched
path keeps every row's full attention matrices for the backward (about 35 GB for 8 rows of
2,000 tokens on SmolLM2-135M), so it runs one row at a time, the way it fits in memory; the
gradients are the same sum.

Wall time and CPU time (this process + the reward server) are both reported: on a shared
machine wall time follows the load, CPU time the work. One run, ratios. The last line is
`step speedup vs bare GRPOTrainer: N.NNx wall`.

    python bench/grpo_step.py                           # recipes/cpu.yaml: repo, bare, bare, repo;
                                                        # 1 warm-up + 1 timed step each
    python bench/grpo_step.py --threads 1               # on a machine busy with other jobs
    python bench/grpo_step.py --rounds 1 --long_prompt_tokens 0   # the step only
    python bench/grpo_step.py --rounds 4 --steps 2 --recipe recipes/tiny.yaml
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils
from hntitles.runs import procs, rundir, runtime, settings
from hntitles.trl import config as trl_config

PARTS = ("generation", "reward", "rollout_other", "optimizer")


@dataclass
class BenchArgs:
    recipe: str = field(default="recipes/cpu.yaml", metadata={
        "help": "Recipe whose model and step settings are timed."})
    steps: int = field(default=1, metadata={"help": "Timed steps per trainer run."})
    rounds: int = field(default=2, metadata={
        "help": "Trainer runs per variant, in the order repo, bare, bare, repo, ..."})
    warmup: int = field(default=1, metadata={"help": "Untimed steps first (allocator, caches, lazy imports)."})
    reward_url: str = field(default="", metadata={"help": "Use this running reward server instead of starting one."})
    threads: int = field(default=0, metadata={"help": "Torch CPU threads (0 = torch's default); 1 on a busy machine."})
    long_prompt_tokens: int = field(default=2000, metadata={
        "help": "Prompt length of the long-prompt loss shape (0 = skip it)."})


def constant_reward(completions, **kwargs) -> list[float]:
    """The bare baseline's reward: the same number for every completion, no I/O."""
    return [0.0] * len(completions)


def server_cpu() -> float:
    """CPU seconds used so far by the reward server the bench started (a child of the bench's
    main process; the trainers run in sibling processes)."""
    import psutil

    total = 0.0
    root = psutil.Process(os.getppid()) if multiprocessing.parent_process() else psutil.Process()
    for proc in root.children(recursive=True):
        try:
            if any("local_reward" in part for part in proc.cmdline()):
                t = proc.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


def max_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(fn, *args):
    """fn(*args) in a fresh process: its own peak RSS, nothing left over from the previous run."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


class StepTimer:
    """Wraps a GRPOTrainer's methods and a callback to time each optimizer step by part.

    Wall time (what a user waits) and CPU time (this process, all threads, plus the reward
    server's): on a shared machine wall time follows the load, CPU time follows the work.
    """

    KEYS = ("generation", "reward", "rollout")

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self._begin: tuple = ()

    def wrap(self, trainer) -> None:
        for method, key in (("_generate", "generation"), ("_calculate_rewards", "reward"),
                            ("_generate_and_score_completions", "rollout")):
            original = getattr(trainer, method)

            def timed(*a, _original=original, _key=key, **kw):
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    return _original(*a, **kw)
                finally:
                    self.wall[_key] += time.perf_counter() - t0
                    self.cpu[_key] += time.process_time() - c0

            setattr(trainer, method, timed)  # instance attribute: TRL calls self.<method>(...)

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                outer._begin = (time.perf_counter(), time.process_time(), server_cpu(),
                                dict(outer.wall), dict(outer.cpu))

            def on_step_end(self, args, state, control, **kw):
                t0, c0, s0, wall0, cpu0 = outer._begin
                row = {}
                for kind, acc, total in (("wall", outer.wall, time.perf_counter() - t0),
                                         ("cpu", outer.cpu, time.process_time() - c0)):
                    prev = wall0 if kind == "wall" else cpu0
                    d = {k: acc[k] - prev.get(k, 0.0) for k in StepTimer.KEYS}
                    row.update({f"{kind}_total": total, f"{kind}_generation": d["generation"],
                                f"{kind}_reward": d["reward"],
                                f"{kind}_rollout_other": d["rollout"] - d["generation"] - d["reward"],
                                f"{kind}_optimizer": total - d["rollout"]})
                # The server works while this process waits for it: its CPU belongs to the reward part.
                row["cpu_server"] = server_cpu() - s0
                outer.steps.append(row)

        return Cb()


def variant_child(name: str, recipe_path: str, reward_url: str, steps: int, warmup: int,
                  threads: int) -> tuple[list[dict], float]:
    """run_variant in this (child) process: (timed steps, peak RSS in MB)."""

    procs.set_threads(threads)
    recipe, trl_args = settings.parse_args((settings.Recipe, trl_config.TrlArgs), "trl", ["--recipe", recipe_path])
    return run_variant(name, recipe, trl_args, reward_url, steps, warmup), max_rss_mb()


def run_variant(name: str, recipe: settings.Recipe, trl_args, reward_url: str, steps: int, warmup: int) -> list[dict]:
    """Build the trainer the way reference_grpo_trainer.main does; time `steps` steps after `warmup`."""
    import reference_grpo_trainer as rgt
    from hntitles.engines import fast_backend, generation

    settings.set_seed(recipe.seed)
    backend = fast_backend.select_backend("cpu")
    model, tokenizer = fast_backend.load_policy(backend, recipe, trl_args)
    train_ds, _ = utils.load_split(recipe, recipe.train_split, tokenizer, recipe.max_train_stories)
    with tempfile.TemporaryDirectory(prefix=f"grpo-bench-{name}-") as tmp:
        run_dir = Path(tmp)
        recipe_run = dataclasses.replace(recipe, max_steps=warmup + steps, save_every=10 ** 6, reward_url=reward_url)
        config = trl_config.grpo_config(recipe_run, trl_args, backend, run_dir)
        fast_backend.stop_at_tokens(backend, model, config, generation.stop_token_ids(tokenizer,
                                                                                       utils.stop_strings(recipe)))
        timer = StepTimer()
        callbacks = [timer.callback()]
        client = None
        if name == "repo":
            from hntitles.engines import policy

            client = utils.RewardClient(reward_url, timeout=recipe.reward_timeout, retries=recipe.reward_retries)
            validator = policy.make_validator(recipe_run, model, tokenizer)
            run = rgt.RunState(recipe_run, trl_args, run_dir, client, rundir.Timer(), set(),
                               runtime.StopOnSignal("[bench]", "stopping"))
            reward_funcs = [rgt.make_reward_func(client, validator, recipe_run, run.reward_log)]
            callbacks.append(rgt.trainer_callback(rgt.TrainRows)(run))  # the repo's metrics row is part of its step
        else:
            reward_funcs = [constant_reward]
        if name == "repo":
            trainer_cls = fast_backend.trainer_class(backend)
        else:  # TRL's own class, unmodified: what the repo's subclass is measured against
            from trl import GRPOTrainer as trainer_cls
        trainer = trainer_cls(model=model, reward_funcs=reward_funcs, args=config, train_dataset=train_ds,
                              processing_class=tokenizer, callbacks=callbacks)
        timer.wrap(trainer)
        print(f"[{name}] {warmup} warm-up + {steps} timed steps ...", flush=True)
        try:
            trainer.train()
        finally:
            if client is not None:
                rgt.close_client(trainer, client)
    return timer.steps[warmup:]


def long_prompt(tokenizer, stories: list[str], tokens: int) -> list[int]:
    """A title prompt whose article is the shipped stories' bodies joined and cut to ~`tokens` tokens."""
    body_ids = tokenizer("\n\n".join(stories), add_special_tokens=False)["input_ids"]
    overhead = len(tokenizer(tokenizer.apply_chat_template(utils.title_messages(""), add_generation_prompt=True,
                                                            tokenize=False), add_special_tokens=False)["input_ids"])
    body = tokenizer.decode(body_ids[:max(tokens - overhead, 1)])
    text = tokenizer.apply_chat_template(utils.title_messages(body), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def long_loss_child(kind: str, recipe_path: str, tokens: int, threads: int) -> dict:
    """Forward + backward of the policy logprobs on one long prompt x num_generations completions.

    kind "trl": GRPOTrainer's own _get_per_token_logps_and_entropies, one row at a time;
    kind "repo": the repo trainer's, the whole group at once. Returns wall/CPU seconds, peak RSS.
    """
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    from hntitles.engines import fast_backend

    procs.set_threads(threads)
    recipe, trl_args = settings.parse_args((settings.Recipe, trl_config.TrlArgs), "trl", ["--recipe", recipe_path])
    settings.set_seed(recipe.seed)
    backend = fast_backend.select_backend("cpu")
    model, tok = fast_backend.load_policy(backend, recipe, trl_args)
    bodies = [r["scraped_body"] for r in utils.load_stories(recipe.dataset, recipe.train_split)]
    prompt = long_prompt(tok, bodies, tokens)
    g, n = recipe.num_generations, recipe.max_completion_tokens
    gen = torch.Generator().manual_seed(0)
    completions = torch.randint(3, len(tok) - 1, (g, n), generator=gen)  # full length: no padding anywhere
    ids = torch.cat([torch.tensor([prompt] * g), completions], dim=1)
    mask = torch.ones_like(ids)
    with tempfile.TemporaryDirectory() as tmp:
        config = trl_config.grpo_config(recipe, trl_args, backend, Path(tmp))
        trainer = fast_backend.shared_prefix_trainer_class()(
            model=model, reward_funcs=[constant_reward], args=config, processing_class=tok,
            train_dataset=Dataset.from_list([{"prompt": utils.title_messages("x")}]))
    stock = GRPOTrainer._get_per_token_logps_and_entropies

    def loss_pass(rows: slice) -> None:
        fn = stock if kind == "trl" else type(trainer)._get_per_token_logps_and_entropies
        logps, _, _ = fn(trainer, trainer.model, ids[rows], mask[rows], n, compute_entropy=True)
        logps.sum().backward()

    loss_pass(slice(0, 1))  # warm-up (allocator, lazy init) on one row
    trainer.model.zero_grad()
    wall, cpu = time.perf_counter(), time.process_time()
    for rows in ([slice(i, i + 1) for i in range(g)] if kind == "trl" else [slice(0, g)]):
        loss_pass(rows)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "rss_mb": max_rss_mb(),
            "prompt_tokens": len(prompt), "rows": g, "completion_tokens": n}


def summarize_steps(steps: list[dict]) -> dict[str, float]:
    """Wall parts from the fastest step (the one other jobs disturbed least), CPU parts as medians."""
    fastest = min(steps, key=lambda s: s["wall_total"])
    return {k: fastest[k] if k.startswith("wall_") else statistics.median(s[k] for s in steps) for k in steps[0]}


def report(repo: dict[str, float], bare: dict[str, float], recipe: settings.Recipe, steps: int,
           load: tuple[float, float], threads: int, rss: dict[str, float], long: dict | None) -> str:
    lines = [
        f"GRPO step on {Path(recipe.model).name}: {recipe.prompts_per_step} prompts x {recipe.num_generations} "
        f"generations, <= {recipe.max_completion_tokens} tokens, LoRA r{recipe.lora_r}; {steps} timed steps "
        f"per variant, order repo, bare, bare, repo (wall: the fastest step, CPU: the median); "
        f"{os.cpu_count()} cores, {threads} torch threads, "
        f"load average {load[0]:.1f} -> {load[1]:.1f}",
        "repo: the repo's trainer (shared-prefix loss and rollouts, reward server + validator); "
        "bare: TRL's GRPOTrainer unmodified, constant reward; same GRPOConfig",
        f"{'part':<16}{'repo wall s':>12}{'share':>8}{'bare wall s':>12}{'speedup':>9}"
        f"{'repo CPU s':>12}{'bare CPU s':>12}",
    ]
    for part in PARTS:
        rc = repo[f"cpu_{part}"] + (repo["cpu_server"] if part == "reward" else 0.0)
        bc = bare[f"cpu_{part}"] + (bare["cpu_server"] if part == "reward" else 0.0)
        rw, bw = repo[f"wall_{part}"], bare[f"wall_{part}"]
        speed = f"{bw / rw:>8.2f}x" if min(rw, bw) >= 0.01 else f"{'-':>9}"
        lines.append(f"{part:<16}{rw:>12.2f}{rw / repo['wall_total']:>8.1%}{bw:>12.2f}{speed}{rc:>12.2f}{bc:>12.2f}")
    repo_cpu, bare_cpu = repo["cpu_total"] + repo["cpu_server"], bare["cpu_total"] + bare["cpu_server"]
    ratio, ratio_cpu = bare["wall_total"] / repo["wall_total"], bare_cpu / repo_cpu
    lines.append(f"{'step':<16}{repo['wall_total']:>12.2f}{1:>8.0%}{bare['wall_total']:>12.2f}{ratio:>8.2f}x"
                 f"{repo_cpu:>12.2f}{bare_cpu:>12.2f}")
    share = repo["wall_reward"] / repo["wall_total"]
    ok = lambda met: "met" if met else "NOT met"  # noqa: E731
    lines += [
        f"reward share of the repo step: {share:.1%} of wall time (goal <= 10%: {ok(share <= 0.10)})",
        f"peak RSS of the process (model, validator, steps): repo {rss['repo'] / 1024:.2f} GB, bare "
        f"{rss['bare'] / 1024:.2f} GB (goal <= 4 GB: {ok(rss['repo'] <= 4096)})",
    ]
    if long:
        t, r = long["trl"], long["repo"]
        lines.append(
            f"long-prompt loss pass ({r['prompt_tokens']}-token prompt x {r['rows']} completions of "
            f"{r['completion_tokens']} tokens, forward + backward): TRL {t['wall']:.1f} s (one row at a time), "
            f"repo {r['wall']:.1f} s: {t['wall'] / r['wall']:.2f}x wall, {t['cpu'] / r['cpu']:.2f}x CPU "
            f"(goal >= 5x: {ok(t['wall'] / r['wall'] >= 5)}); peak RSS TRL {t['rss_mb'] / 1024:.2f} GB, "
            f"repo {r['rss_mb'] / 1024:.2f} GB")
    lines.append(f"step CPU speedup (incl. the reward server): {ratio_cpu:.2f}x (goal >= 3x: {ok(ratio >= 3)} by wall)")
    lines.append(f"step speedup vs bare GRPOTrainer: {ratio:.2f}x wall")
    return "\n".join(lines)


def run_order(rounds: int) -> list[str]:
    """repo, bare, bare, repo, ...: a load that drifts during the run hits both variants alike.

    >>> run_order(2)
    ['repo', 'bare', 'bare', 'repo']
    """
    order: list[str] = []
    for i in range(rounds):
        order += ["repo", "bare"] if i % 2 == 0 else ["bare", "repo"]
    return order


def main(args: BenchArgs) -> str:
    procs.set_threads(args.threads)
    recipe = settings.parse_args((settings.Recipe,), "trl", ["--recipe", args.recipe])[0]
    load0 = os.getloadavg()
    results: dict[str, list[dict]] = {"repo": [], "bare": []}
    rss: dict[str, float] = {"repo": 0.0, "bare": 0.0}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if args.reward_url:
            url = args.reward_url.rstrip("/")
            procs.wait_healthy(url, timeout=10.0)
        else:  # stopped when the block exits, also on failure
            url, _ = stack.enter_context(procs.reward_server(Path(tmp) / "reward_server.log"))
        for name in run_order(args.rounds):
            steps, peak = in_child(variant_child, name, args.recipe, url, args.steps, args.warmup, args.threads)
            results[name] += steps
            rss[name] = max(rss[name], peak)
            for s in steps:  # as soon as it is known: a later run can still be killed (e.g. out of memory)
                print(f"[{name}] peak RSS {peak:.0f} MB, step: " + ", ".join(f"{k} {v:.2f}s" for k, v in s.items()),
                      flush=True)
    long = None
    if args.long_prompt_tokens:
        long = {}
        for kind in ("repo", "trl"):
            print(f"[long prompt] {kind} loss pass ...", flush=True)
            long[kind] = in_child(long_loss_child, kind, args.recipe, args.long_prompt_tokens, args.threads)
            print(f"[long prompt] {kind}: {long[kind]}", flush=True)
    import torch

    text = report(summarize_steps(results["repo"]), summarize_steps(results["bare"]), recipe,
                  len(results["repo"]), (load0[0], os.getloadavg()[0]), torch.get_num_threads(), rss, long)
    print(text)
    return text


if __name__ == "__main__":
    from transformers import HfArgumentParser

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(HfArgumentParser(BenchArgs, description=__doc__.splitlines()[0]).parse_args_into_dataclasses()[0])
