"""Time a TRL GRPO step on the CPU recipe: where it goes, and what the repo's reward path costs.

Two GRPOTrainers on the same model, data and GRPOConfig (the trainer's own `grpo_config`):

- repo: reference_grpo_trainer.py's reward function (validator + batched reward-server
  request + the shared reward rule) and its per-step metrics callback;
- bare: a constant reward (0.0 for every completion), nothing else.

Each trainer runs `--warmup` untimed steps then `--steps` timed ones, `--rounds` times per variant
in the order repo, bare, bare, repo (a load that drifts hits both alike). A step is split into
generation (GRPOTrainer._generate), reward (GRPOTrainer._calculate_rewards: validator +
server), the rest of the rollout bookkeeping (tokenising, padding, advantages) and the
optimizer part (loss forward + backward + optimizer step: the remainder of the step).
Printed: the split as shares of the repo step, the reward share (goal <= 10%), and repo / bare
step time (goal <= 1.15x), and generation alone (the same code in both: a difference there comes
from completion lengths, since the repo policy moves after the warm-up and the bare one cannot:
its advantages are all 0). Starts and stops its own
reward server. Wall time and CPU time (this process + the reward server) are both reported: on
a shared machine wall time follows the load, CPU time the work. One run, ratios.

    python bench/grpo_step.py                           # recipes/cpu.yaml: repo, bare, bare, repo; 1 warm-up + 1 timed step each
    python bench/grpo_step.py --threads 1               # on a machine busy with other jobs
    python bench/grpo_step.py --rounds 4 --steps 2 --recipe recipes/tiny.yaml
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo  # noqa: E402  (reward_server: start/stop local_reward.py)
import utils  # noqa: E402

PARTS = ("generation", "reward", "rollout_other", "optimizer")


@dataclass
class BenchArgs:
    recipe: str = field(default="recipes/cpu.yaml", metadata={"help": "Recipe whose model and step settings are timed."})
    steps: int = field(default=1, metadata={"help": "Timed steps per trainer run."})
    rounds: int = field(default=2, metadata={"help": "Trainer runs per variant, in the order repo, bare, bare, repo, ..."})
    warmup: int = field(default=1, metadata={"help": "Untimed steps first (allocator, caches, lazy imports)."})
    reward_url: str = field(default="", metadata={"help": "Use this running reward server instead of starting one."})
    threads: int = field(default=0, metadata={"help": "Torch CPU threads (0 = torch's default); 1 on a busy machine."})


def constant_reward(completions, **kwargs) -> list[float]:
    """The bare baseline's reward: the same number for every completion, no I/O."""
    return [0.0] * len(completions)


def server_cpu() -> float:
    """CPU seconds used so far by this process's children (the reward server we started)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


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


def run_variant(name: str, recipe: utils.Recipe, trl_args, reward_url: str, steps: int, warmup: int) -> list[dict]:
    """Build the trainer the way reference_grpo_trainer.main does; time `steps` steps after `warmup`."""
    import fast_backend
    import reference_grpo_trainer as rgt

    utils.set_seed(recipe.seed)
    backend = fast_backend.select_backend("cpu")
    model, tokenizer = fast_backend.load_policy(backend, recipe, trl_args)
    train_ds, _ = utils.load_split(recipe, recipe.train_split, tokenizer, recipe.max_train_stories)
    with tempfile.TemporaryDirectory(prefix=f"grpo-bench-{name}-") as tmp:
        run_dir = Path(tmp)
        recipe_run = dataclasses.replace(recipe, max_steps=warmup + steps, save_every=10 ** 6, reward_url=reward_url)
        stops = fast_backend.stop_at_tokens(backend, model, utils.stop_token_ids(tokenizer, utils.stop_strings(recipe)))
        config = rgt.grpo_config(recipe_run, trl_args, backend, run_dir, stops)
        timer = StepTimer()
        callbacks = [timer.callback()]
        client = None
        if name == "repo":
            import evaluate

            client = utils.RewardClient(reward_url, timeout=recipe.reward_timeout, retries=recipe.reward_retries)
            validator = evaluate.make_validator(recipe_run, model, tokenizer)
            log = rgt.RewardLog()
            reward_funcs = [rgt.make_reward_func(client, validator, recipe.trailing_penalty, log,
                                                 recipe.max_completion_tokens)]
            _, train_rows, _, holder = rgt.build_callbacks(
                recipe=recipe_run, args=trl_args, run_dir=run_dir, tokenizer=tokenizer, val_rows=[],
                validator=validator, reward_log=log, timer=utils.Timer(), val_done=set())
            holder["client"] = client
            callbacks.append(train_rows)  # the repo's per-step metrics row is part of its step
        else:
            reward_funcs = [constant_reward]
        # Both variants generate with the trainer's own class (one prefill per distinct prompt):
        # the comparison isolates the reward path. bench/generation.py times that class's gain.
        trainer_cls = fast_backend.trainer_class(backend)
        trainer = trainer_cls(model=model, reward_funcs=reward_funcs, args=config, train_dataset=train_ds,
                              processing_class=tokenizer, callbacks=callbacks)
        timer.wrap(trainer)
        print(f"[{name}] {warmup} warm-up + {steps} timed steps ...", flush=True)
        try:
            trainer.train()
        finally:
            if client is not None:
                rgt._close_client(trainer, client)
    return timer.steps[warmup:]


def summarize_steps(steps: list[dict]) -> dict[str, float]:
    """Wall parts from the fastest step (the one other jobs disturbed least), CPU parts as medians."""
    fastest = min(steps, key=lambda s: s["wall_total"])
    return {k: fastest[k] if k.startswith("wall_") else statistics.median(s[k] for s in steps) for k in steps[0]}


def report(repo: dict[str, float], bare: dict[str, float], recipe: utils.Recipe, steps: int,
           load: tuple[float, float], threads: int) -> str:
    lines = [
        f"GRPO step on {Path(recipe.model).name}: {recipe.prompts_per_step} prompts x {recipe.num_generations} "
        f"generations, <= {recipe.max_completion_tokens} tokens, LoRA r{recipe.lora_r}; {steps} timed steps "
        f"per variant, order repo, bare, bare, repo (wall: the fastest step, CPU: the median); "
        f"{os.cpu_count()} cores, {threads} torch threads, "
        f"load average {load[0]:.1f} -> {load[1]:.1f}",
        f"{'part':<16}{'repo wall s':>12}{'share':>8}{'bare wall s':>12}{'repo CPU s':>12}{'bare CPU s':>12}",
    ]
    for part in PARTS:
        rc = repo[f"cpu_{part}"] + (repo["cpu_server"] if part == "reward" else 0.0)
        bc = bare[f"cpu_{part}"] + (bare["cpu_server"] if part == "reward" else 0.0)
        lines.append(f"{part:<16}{repo[f'wall_{part}']:>12.2f}{repo[f'wall_{part}'] / repo['wall_total']:>8.1%}"
                     f"{bare[f'wall_{part}']:>12.2f}{rc:>12.2f}{bc:>12.2f}")
    repo_cpu, bare_cpu = repo["cpu_total"] + repo["cpu_server"], bare["cpu_total"] + bare["cpu_server"]
    lines.append(f"{'step':<16}{repo['wall_total']:>12.2f}{1:>8.0%}{bare['wall_total']:>12.2f}"
                 f"{repo_cpu:>12.2f}{bare_cpu:>12.2f}")
    share = repo["wall_reward"] / repo["wall_total"]
    share_cpu = (repo["cpu_reward"] + repo["cpu_server"]) / repo_cpu
    ratio, ratio_cpu = repo["wall_total"] / bare["wall_total"], repo_cpu / bare_cpu
    ok = lambda met: "met" if met else "NOT met"  # noqa: E731
    lines += [
        f"reward share of the repo step: {share:.1%} of wall time, {share_cpu:.1%} of CPU time incl. the server "
        f"(goal <= 10%: {ok(max(share, share_cpu) <= 0.10)})",
        f"repo step / bare step: {ratio:.2f}x wall, {ratio_cpu:.2f}x CPU incl. the server (goal <= 1.15x: "
        f"{ok(ratio <= 1.15)} by wall, {ok(ratio_cpu <= 1.15)} by CPU); generation alone {repo['wall_generation'] / bare['wall_generation']:.2f}x "
        f"wall, {repo['cpu_generation'] / bare['cpu_generation']:.2f}x CPU (same code: the policies' completion lengths differ)",
    ]
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
    import reference_grpo_trainer as rgt

    demo.set_threads(args.threads)
    recipe, trl_args = utils.parse_args((utils.Recipe, rgt.TrlArgs), "trl", ["--recipe", args.recipe])
    load0 = os.getloadavg()
    results: dict[str, list[dict]] = {"repo": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if args.reward_url:
            url = args.reward_url.rstrip("/")
            demo.wait_healthy(url, timeout=10.0)
        else:  # stopped when the block exits, also on failure
            url, _ = stack.enter_context(demo.reward_server(Path(tmp) / "reward_server.log"))
        for name in run_order(args.rounds):
            results[name] += run_variant(name, recipe, trl_args, url, args.steps, args.warmup)
    for name, steps in results.items():
        for i, s in enumerate(steps):
            print(f"[{name}] step {i + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in s.items()))
    import torch

    text = report(summarize_steps(results["repo"]), summarize_steps(results["bare"]), recipe,
                  len(results["repo"]), (load0[0], os.getloadavg()[0]), torch.get_num_threads())
    print(text)
    return text


if __name__ == "__main__":
    from transformers import HfArgumentParser

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(HfArgumentParser(BenchArgs, description=__doc__.splitlines()[0]).parse_args_into_dataclasses()[0])
