"""Train the HN title writer with TRL's GRPOTrainer + LoRA (the reference side of the comparison).

Needs the reward server (`make reward`). The knobs shared with train.py (ART) come from the
recipe's `shared:` block; TRL-only knobs (TrlArgs below) from its `trl:` block or flags.

    make reward &                                  # 127.0.0.1:7000
    make train-trl                                 # recipes/cpu.yaml -> runs/trl-cpu
    python reference_grpo_trainer.py --recipe recipes/tiny.yaml --max_steps 2
    python reference_grpo_trainer.py --recipe recipes/gpu.yaml --backend unsloth --report_to tensorboard

Backends (fast_backend.py): on a CPU `auto` runs transformers + PEFT; on a CUDA machine with
`make setup-gpu`, Unsloth + its vLLM (or `--backend trl-vllm --vllm_mode colocate|server`).

Run directory (<runs_dir>/<run_name>, default runs/trl-<recipe stem>): config.json,
checkpoint-N/ (LoRA adapter + optimizer + trainer state, every save_every steps and at the
end), final/ (the last adapter + tokenizer), metrics.jsonl (one `train` row per optimizer
step and one `val` row per validation, the schema train.py also writes), eval/step-N.jsonl
(val titles beside the originals), failures.jsonl (reward-server failures, one line each).

Resume is the default: rerunning the same command continues from the newest complete
checkpoint (the step count and wall time continue; metrics rows past that checkpoint are
dropped so none is duplicated; a checkpoint cut off by a kill is moved aside to
incomplete-checkpoint-N-<time>). A finished run (max_steps trained, validated, final/ saved)
trains nothing on a rerun; a larger --max_steps continues it. `--resume false` with an
existing checkpoint is refused: pick a new run_name. One process per run directory (run.lock).

Exit codes:
    0   finished (max_steps reached)
    75  interrupted by SIGTERM / SIGUSR1 / Ctrl-C: a checkpoint was saved at the end of the
        current step (or of the validation or save under way); while loading, it stops at
        once with nothing to save. Rerun to resume. Slurm: `#SBATCH --signal=USR1@120` (or
        plain SIGTERM at the time limit; a batch script that traps the signal must forward
        it), then requeue when the exit code is 75. A signal during the final validation or
        the final save lets them finish: exit 0.
    130 a second signal while stopping: exited at once, no new checkpoint (rerun resumes
        from the previous one).
    3   the reward server failed (after utils.RewardClient's bounded retries); nothing was
        scored as 0. The last checkpoint is intact: restart the server and rerun to resume.
    73  the run directory is in use by another live process (named in the message); nothing
        was written. A lock left by a dead process is taken over (utils.RunLock).
    1   bad arguments or backend (e.g. --backend unsloth on a machine without CUDA).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import resource
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fast_backend
import utils

EXIT_OK, EXIT_USAGE, EXIT_REWARD_SERVER, EXIT_INTERRUPTED, EXIT_ABORTED = 0, 1, 3, 75, 130
REWARD_NAME = "hn_reward"  # TRL logs rewards/<name>/mean


@dataclass
class TrlArgs:
    """TRL-side knobs only; anything shared with the ART trainer lives in utils.Recipe."""

    backend: str = field(default="auto", metadata={"help": "auto | cpu | transformers | unsloth | trl-vllm (see fast_backend.py)."})
    use_vllm: bool = field(default=True, metadata={"help": "On a GPU backend, generate with vLLM (Unsloth's own, or TRL's for trl-vllm)."})
    vllm_mode: str = field(default="colocate", metadata={"help": "trl-vllm only: 'colocate' (in-process) or 'server' (`trl vllm-serve`)."})
    vllm_server_base_url: str = field(default="", metadata={"help": "trl-vllm server mode: URL of `trl vllm-serve` (default host:port 0.0.0.0:8000)."})
    gpu_memory_utilization: float = field(default=0.6, metadata={"help": "GPU memory share for the vLLM engine (Unsloth / colocate)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Unsloth only: QLoRA (4-bit base weights)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward; TRL turns it on by default, but on CPU with short completions it only costs time."})
    steps_per_generation: int = field(default=1, metadata={"help": "Optimizer steps per generation batch (1 = fully on-policy)."})
    loss_micro_batch: int = field(default=0, metadata={"help": "Completions per loss forward/backward on each process (0 = the whole step at once). Gradients accumulate to one optimizer step per GRPO step; TRL normalises cispo/dapo by the step's token count, so the update is the same, in less memory."})
    require_gpu: bool = field(default=False, metadata={"help": "Refuse to fall back to the CPU (the GPU recipe sets it); --backend cpu still runs on the CPU on purpose."})
    logging_steps: int = field(default=1, metadata={"help": "TRL logging interval in steps (metrics.jsonl gets every step regardless)."})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb (comma-separated for several)."})
    log_completions: bool = field(default=False, metadata={"help": "Print/log a table of sampled completions at each log step."})
    save_total_limit: int = field(default=0, metadata={"help": "Keep only the newest N checkpoints (0 = keep all)."})
    torch_threads: int = field(default=0, metadata={"help": "torch intra-op threads (0 = torch's default, one per core). Measured on a busy shared 2-core box: 1 thread generated 8x24 tokens in 34 s vs 78-91 s with 2 (they spin-wait on decoding's small ops)."})
    resume: bool = field(default=True, metadata={"help": "Continue from the newest checkpoint in the run directory."})
    eval_batch_size: int = field(default=8, metadata={"help": "Val stories per generate() call."})
    show_titles: int = field(default=3, metadata={"help": "Val titles printed beside the originals at each validation."})


# --------------------------------------------------------------------------------------
# Reward
# --------------------------------------------------------------------------------------


def completion_text(completion) -> str:
    """Text of one TRL completion: conversational ([{'role', 'content'}]) or plain.

    >>> completion_text([{"role": "assistant", "content": "Rust ships"}]), completion_text("A title")
    ('Rust ships', 'A title')
    """
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))


@dataclass
class RewardLog:
    """What the reward function saw, for the per-step metrics rows and the failure count."""

    pending: list = field(default_factory=list)  # Scored, in generation order, not yet written
    completion_tokens: list = field(default_factory=list)  # token count per pending completion
    batches: int = 0
    failures: int = 0
    seconds: float = 0.0


def make_reward_func(client: utils.RewardClient, validator, trailing_penalty: float, log: RewardLog,
                     max_completion_tokens: int):
    """The TRL reward function: one batched reward-server request per generation batch.

    TRL calls it with the whole generation batch and the dataset's other columns
    (scraped_body, by, time, url, title, ...) as lists; async reward functions run on TRL's
    event loop thread. A RewardServerError propagates: the step fails, it never scores 0.
    """

    async def hn_reward(prompts, completions, completion_ids=None, log_metric=None, log_extra=None, **columns):
        t0 = time.perf_counter()
        texts = [completion_text(c) for c in completions]
        rows = [{k: columns[k][i] for k in ("title", "by", "time", "url", "scraped_body")} for i in range(len(texts))]
        try:
            scored = await utils.score_completions(client, validator, rows, texts, trailing_penalty)
        except utils.RewardServerError:
            log.failures += 1
            raise
        finally:
            log.seconds += time.perf_counter() - t0
        log.batches += 1
        log.pending.extend(scored)
        lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [math.nan] * len(texts)
        log.completion_tokens.extend(lengths)
        n = max(len(scored), 1)
        if log_metric is not None:  # TRL averages these per logging step next to its own metrics
            log_metric("hn/rm", sum(s.rm for s in scored) / n)
            log_metric("hn/match_rate", sum(s.matches for s in scored) / n)
            log_metric("hn/title_words", sum(s.length for s in scored) / n)
            log_metric("hn/copy_frac", sum(s.copy for s in scored) / n)
            log_metric("hn/trailing_rate", sum(s.trailing for s in scored) / n)
            log_metric("hn/hit_token_cap", sum(x >= max_completion_tokens for x in lengths) / n)
        if log_extra is not None:
            log_extra("title", [s.title for s in scored])
        return [s.reward for s in scored]

    hn_reward.__name__ = hn_reward.__qualname__ = REWARD_NAME
    return hn_reward


# --------------------------------------------------------------------------------------
# Callbacks. Plain classes at module level; build_callbacks puts transformers' TrainerCallback
# under them when a run builds them (importing transformers costs seconds, this module does not).
# --------------------------------------------------------------------------------------

STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT) if s)


class StopOnSignal:
    """SIGTERM/SIGUSR1/SIGINT -> save a checkpoint at the end of this step, then stop."""

    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received:  # a second signal: stop now, without a checkpoint
            self.uninstall()
            raise KeyboardInterrupt(f"second signal ({name})")
        self.received = name
        print(f"\n[trl] {name}: saving a checkpoint at the end of this step, then exiting "
              f"(exit {EXIT_INTERRUPTED}; send it again to quit at once)", flush=True)

    def on_step_end(self, args_, state, control, **kw):
        if self.received:
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args_, state, control, **kw):
        if self.received:  # it arrived during the save: that checkpoint is complete, stop now
            control.should_training_stop = True


@dataclass
class CallbackContext:
    """What the callbacks share: the run's settings and data, and the state they update together
    (the validated steps, the reward log, whether a stop signal arrived)."""

    recipe: utils.Recipe
    args: TrlArgs
    run_dir: Path
    tokenizer: Any
    val_rows: list[dict]
    validator: Any
    reward_log: RewardLog
    timer: utils.Timer
    val_done: set[int]  # steps with a val row in metrics.jsonl
    stopper: StopOnSignal
    client_holder: dict = field(default_factory=dict)  # {"client": the RewardClient}, set once it exists

    def stop_requested(self) -> str | None:
        return self.stopper.received

    def client_stats(self) -> dict:
        c = self.client_holder.get("client")
        return dict(c.stats) if c is not None else {}


def _mean(values) -> float:
    return sum(values) / max(len(values), 1)


class TrainRows:
    """One shared-schema `train` row per optimizer step, from what the reward function scored."""

    def __init__(self, ctx: CallbackContext):
        self.ctx = ctx
        self.writer = utils.MetricsWriter(ctx.run_dir)
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def on_train_begin(self, args_, state, control, **kw):
        # A resumed TrainerState brings the checkpoint's save/logging/eval steps back; this run's
        # flags win, as on a fresh start (a changed --save_every on resume is honoured, not ignored).
        state.compute_steps(args_, state.max_steps)

    def on_step_begin(self, args_, state, control, **kw):
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        utils.fault_pause("step", state.global_step + 1, until=self.ctx.stop_requested)

    def on_step_end(self, args_, state, control, **kw):
        ctx = self.ctx
        scored, tokens = self.take_batch()
        extra = self.step_extra(state, tokens)
        ctx.reward_log.seconds = 0.0
        if args_.world_size > 1:  # every rank scored its share of the step: the row covers them all
            from accelerate.utils import gather_object

            scored, tokens = gather_object(scored), gather_object(tokens)
            extra["completion_tokens_mean"] = _mean(tokens)
            extra["hit_token_cap"] = _mean([t >= ctx.recipe.max_completion_tokens for t in tokens])
        if not state.is_world_process_zero:
            return  # multi-process (accelerate): one writer
        self.writer.write(utils.metrics_row(method="trl", step=state.global_step, split="train", scored=scored,
                                            wall_time=ctx.timer(), run=ctx.run_dir.name, extra=extra))

    def take_batch(self) -> tuple[list, list]:
        """This step's scored completions and their token counts, taken off the reward log.

        With steps_per_generation > 1 one generation batch feeds several steps; each row then
        takes the next prompts_per_step x num_generations completions in generation order.
        """
        log, batch = self.ctx.reward_log, self.ctx.recipe.prompts_per_step * self.ctx.recipe.num_generations
        scored, log.pending[:] = log.pending[:batch], log.pending[batch:]
        tokens = log.completion_tokens[:batch]
        del log.completion_tokens[:batch]
        return scored, tokens

    def step_extra(self, state, tokens: list) -> dict:
        """The row's `extra` fields: timings, cost and memory of this process's share of the step."""
        return {"step_seconds": round(time.perf_counter() - self.t0, 3),
                # CPU seconds of this process too: on a shared machine wall time mostly measures the neighbours.
                "step_cpu_seconds": round(time.process_time() - self.cpu0, 3),
                "reward_seconds": round(self.ctx.reward_log.seconds, 3),
                "completion_tokens_mean": _mean(tokens),
                # Cost in the units the demo compares across methods: TRL takes one optimizer
                # step per step (no gradient accumulation) and computes the loss over every
                # completion token of the batch (zero-advantage ones included).
                "optimizer_steps": 1, "trained_tokens": sum(tokens),
                "hit_token_cap": _mean([t >= self.ctx.recipe.max_completion_tokens for t in tokens]),
                "reward_requests": self.ctx.client_stats().get("requests", 0), "epoch": state.epoch,
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


class Validate:
    """Validation with the current adapter every eval_every steps and at the end."""

    def __init__(self, ctx: CallbackContext):
        self.ctx = ctx
        self.trainer = None  # set after GRPOTrainer exists (to send val numbers to its loggers)
        self.current: int | None = None  # the step being validated (for error messages)

    def due(self, step: int) -> bool:
        """An eval_every step not validated yet."""
        every = self.ctx.recipe.eval_every
        return bool(every) and step % every == 0 and step not in self.ctx.val_done

    def on_train_begin(self, args_, state, control, model=None, **kw):
        # A run interrupted right at an eval step saved its checkpoint before validating.
        if state.global_step and self.due(state.global_step):
            self.validate(model, state.global_step)

    def on_step_end(self, args_, state, control, model=None, **kw):
        if self.ctx.stopper.received:
            return  # the job is being stopped: checkpoint first, validate after the resume
        if self.due(state.global_step):
            self.validate(model, state.global_step)

    def on_train_end(self, args_, state, control, model=None, **kw):
        step = state.global_step
        if not self.ctx.stopper.received and step and step not in self.ctx.val_done:
            self.validate(model, step)

    def validate(self, model, step: int) -> None:
        import policy

        if self.trainer is not None and not self.trainer.is_world_process_zero():
            return  # validate once, on rank 0 (inference only: the other ranks just wait at the next step)
        ctx = self.ctx
        generator = policy.HFGenerator(model, ctx.tokenizer, batch_size=ctx.args.eval_batch_size, name="trl")
        t0 = time.perf_counter()
        self.current = step
        utils.fault_pause("validation", step, until=ctx.stop_requested)
        result = utils.score_val(ctx.recipe, generator, ctx.val_rows, ctx.validator)
        self.current = None
        row = utils.eval_metrics_row(result, method="trl", step=step, wall_time=ctx.timer(), run=ctx.run_dir.name,
                                     extra={"eval_seconds": round(time.perf_counter() - t0, 1)})
        path = utils.write_eval(ctx.run_dir, f"step-{step:05d}", result, row)
        ctx.val_done.add(step)
        print(f"\n[val step {step}] {utils.eval_summary(result)}  ({time.perf_counter() - t0:.0f}s, {path})")
        for rec in result.records()[:ctx.args.show_titles]:
            print(f"  original: {rec['original']}\n  greedy:   {rec['greedy']['title']}")
        self.report(row)

    def report(self, row: dict) -> None:
        """Val numbers to TRL's loggers (TensorBoard/W&B as report_to asks), as eval/* scalars."""
        if self.trainer is None:
            return
        logs = {f"eval_{k}": row[k] for k in ("reward_mean", "reward_std", "reward_p5", "reward_median",
                                              "reward_p95", "rm_mean", "match_rate", "title_len_mean",
                                              "copy_frac_mean", "trailing_rate")}
        logs["eval_greedy_reward_mean"] = row["extra"]["greedy_reward_mean"]
        model, control = self.trainer.model, self.trainer.control
        was_training, should_log = model.training, control.should_log
        model.eval()  # GRPOTrainer.log picks the metric bucket by model.training
        try:
            self.trainer.log({k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        finally:
            model.train(was_training)
            # on_log clears should_log; keep TRL's own train log for this step
            control.should_log = should_log


@functools.cache
def as_trainer_callback(cls: type) -> type:
    """`cls` with transformers' TrainerCallback under it: TrainerCallback's no-op methods answer
    every event `cls` does not handle, and the trainer sees a real TrainerCallback."""
    from transformers import TrainerCallback

    return type(cls.__name__, (cls, TrainerCallback), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def build_callbacks(*, recipe: utils.Recipe, args: TrlArgs, run_dir: Path, tokenizer, val_rows: list[dict],
                    validator, reward_log: RewardLog, timer: utils.Timer, val_done: set[int]):
    """(stopper, train_rows, validate, client_holder): the run's three callbacks, sharing one
    CallbackContext. Put the reward client in client_holder["client"] once it exists: the train
    rows count its requests."""
    stopper = as_trainer_callback(StopOnSignal)()
    ctx = CallbackContext(recipe=recipe, args=args, run_dir=run_dir, tokenizer=tokenizer, val_rows=val_rows,
                          validator=validator, reward_log=reward_log, timer=timer, val_done=val_done, stopper=stopper)
    return stopper, as_trainer_callback(TrainRows)(ctx), as_trainer_callback(Validate)(ctx), ctx.client_holder


# --------------------------------------------------------------------------------------
# Run directory: resume point, metrics, failures
# --------------------------------------------------------------------------------------


# What a checkpoint needs to resume from. transformers writes trainer_state.json last, after the
# adapter, optimizer, scheduler and RNG state: a process killed while saving leaves a folder without
# it (or with a cut-off one).
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` (checkpoint-N) cannot be resumed from, or None when it is complete."""
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        return f"no {', '.join(missing)}"
    try:
        step = json.loads((path / "trainer_state.json").read_text())["global_step"]
    except (ValueError, KeyError, TypeError):
        return "trainer_state.json is cut off"
    if f"checkpoint-{step}" != path.name:
        return f"trainer_state.json says step {step}"
    return None


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """checkpoint-N folders, newest first."""
    found = [(int(p.name.split("-")[1]), p) for p in run_dir.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, reverse=True)


def resume_point(run_dir: Path, resume: bool) -> tuple[str | None, int]:
    """(newest complete checkpoint folder or None, its step). Refuses to silently overwrite a
    resumable run. Newer incomplete checkpoints (a kill during a save) are moved aside to
    incomplete-checkpoint-N-<time>, where neither a resume nor TRL's rotation sees them."""
    found = checkpoints(run_dir) if run_dir.exists() else []
    if found and not resume:
        raise SystemExit(f"{run_dir} already has {found[0][1].name}; resume (the default) or choose "
                         "another --run_name (refusing to mix two runs in one directory)")
    for step, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path), step
        aside = path.with_name(f"incomplete-{path.name}-{time.strftime('%Y%m%dT%H%M%S')}")
        path.rename(aside)
        print(f"[trl] {path.name} is incomplete ({problem}; the process stopped while saving it): "
              f"moved to {aside.name}, resuming from an earlier one")
    return None, 0


# The run's adapter for `make eval`: the last checkpoint's files without the training state.
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "rng_state")


def final_complete(run_dir: Path) -> bool:
    return all((run_dir / "final" / name).is_file() for name in ("adapter_config.json", "adapter_model.safetensors"))


def save_final(run_dir: Path, checkpoint: Path, stopper) -> Path:
    """final/ = the last checkpoint minus its training state, swapped in whole: a signal or a
    kill during the copy leaves the previous final/ (or none), never half of one."""
    import shutil

    final, tmp, old = run_dir / "final", run_dir / "final.tmp", run_dir / "final.old"
    for path in (tmp, old):
        shutil.rmtree(path, ignore_errors=True)
    tmp.mkdir()
    for src in checkpoint.iterdir():
        if src.is_file() and not src.name.startswith(TRAINING_STATE):
            shutil.copy2(src, tmp / src.name)
    utils.fault_pause("final", until=lambda: stopper.received)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_adapter_weights(model, checkpoint: str) -> None:
    """The checkpoint's LoRA weights into the policy (to validate a run whose training is done)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    loaded = set_peft_model_state_dict(model, load_file(str(Path(checkpoint) / "adapter_model.safetensors")))
    if getattr(loaded, "unexpected_keys", None):
        raise RuntimeError(f"{checkpoint}: adapter weights do not fit the model ({loaded.unexpected_keys[:3]})")


def trim_metrics(run_dir: Path, keep_until: int) -> tuple[float, set[int], int]:
    """Keep metrics rows up to the resume step (later ones will be redone).

    Returns (wall-time offset, val steps already done, rows dropped).
    """
    path = run_dir / utils.METRICS_FILE
    if not path.exists():
        return 0.0, set(), 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a partial line from a killed run
            continue
        if int(row.get("step", 0)) <= keep_until:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
    rows = [json.loads(line) for line in kept]
    offset = max((float(r.get("wall_time", 0.0)) for r in rows), default=0.0)
    val_done = {int(r["step"]) for r in rows if r.get("split") == "val" and r.get("method") == "trl"}
    return offset, val_done, dropped


def record_failure(run_dir: Path, step: int, error: Exception, stats: dict) -> int:
    """Append the failure to failures.jsonl; return how many this run directory has seen."""
    path = run_dir / "failures.jsonl"
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": step,
                            "error": str(error)[:500], "client": stats}) + "\n")
    return sum(1 for line in path.read_text().splitlines() if line.strip())


# --------------------------------------------------------------------------------------
# Config and main
# --------------------------------------------------------------------------------------


def grpo_config(recipe: utils.Recipe, args: TrlArgs, backend: fast_backend.Backend, run_dir: Path,
                extra: dict | None = None):
    """GRPOConfig from the shared recipe + TRL knobs (trl 1.14: no max_prompt_length; prompts
    are length-filtered in utils.load_split)."""
    from trl import GRPOConfig

    kwargs = dict(
        output_dir=str(run_dir),
        **batch_kwargs(recipe, args, world_size()),
        num_generations=recipe.num_generations,
        max_completion_length=recipe.max_completion_tokens,
        temperature=recipe.temperature,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type="constant",  # ART's backend.train uses a constant lr too
        warmup_steps=0,
        max_grad_norm=recipe.max_grad_norm,
        loss_type=recipe.loss_type,
        beta=recipe.beta,
        # CISPO clips the detached importance weight; TRL's default cap is epsilon (0.2), ART's is
        # 1 + epsilon_high (5). One shared knob keeps the two methods' updates the same size.
        **({"epsilon_high": recipe.cispo_max_weight} if recipe.loss_type == "cispo" else {}),
        **optimizer_kwargs(recipe),
        max_steps=recipe.max_steps,
        save_strategy="steps",
        save_steps=recipe.save_every,
        save_total_limit=args.save_total_limit or None,
        logging_steps=args.logging_steps,
        report_to=[s.strip() for s in args.report_to.split(",") if s.strip()] or "none",
        log_completions=args.log_completions,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=recipe.seed,
        data_seed=recipe.seed,
        dataloader_num_workers=0,
    )
    kwargs.update(fast_backend.grpo_overrides(backend, args))
    kwargs.update(extra or {})
    return GRPOConfig(**kwargs)


def world_size() -> int:
    """Processes training together: what the launcher (accelerate launch, torchrun, mpirun) told
    this process, read the way accelerate reads it. Not PartialState(): building it here would
    fix the device before GRPOConfig's use_cpu is known."""
    from accelerate.utils.environment import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def batch_kwargs(recipe: utils.Recipe, args: TrlArgs, processes: int) -> dict:
    """GRPOConfig batch fields: prompts_per_step x num_generations completions per optimizer
    step in total, however many processes share them, the loss in args.loss_micro_batch pieces.

    >>> batch_kwargs(utils.Recipe(prompts_per_step=8, num_generations=6), TrlArgs(loss_micro_batch=4), 2)
    {'per_device_train_batch_size': 4, 'gradient_accumulation_steps': 6, 'steps_per_generation': 6}
    """
    return fast_backend.batch_kwargs(recipe.prompts_per_step * recipe.num_generations, processes,
                                     args.loss_micro_batch, args.steps_per_generation)


OPTIMIZER_FIELDS = ("optim", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "learning_rate",
                    "lr_scheduler_type", "max_grad_norm")


def optimizer_used(config) -> dict:
    """What the trainer's optimizer really gets, read from the built GRPOConfig: a knob left empty
    in the recipe shows the engine's own default here (Unsloth's GRPOConfig: adamw_8bit, 0.001)."""
    out = {k: getattr(config, k) for k in OPTIMIZER_FIELDS}
    out["optim"] = str(getattr(out["optim"], "value", out["optim"]))
    out["optimizer_steps"] = "per_step"  # one optimizer step per generation batch (steps_per_generation=1)
    out["engine"] = type(config).__module__ + "." + type(config).__name__
    return out


def record_in_config(run_dir: Path, **entries) -> None:
    """Add entries to the run's config.json (written by utils.save_config at the start)."""
    path = run_dir / "config.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    payload.update(entries)
    path.write_text(json.dumps(payload, indent=2, default=str))


def resumable_on_cpu(trainer_cls):
    """`trainer_cls` that can resume a multi-process CPU run.

    transformers 5.17 loads the optimizer state with map_location=args.device when
    world_size > 1, and on the CPU that device is `cpu:<rank>`, which torch.load cannot map
    ("don't know how to restore data location ... cpu:0"). Every CPU tensor lives in one
    memory, so the load is told plain "cpu"; GPU runs are untouched.
    """
    import torch

    class CpuResumable(trainer_cls):
        def _load_optimizer_and_scheduler(self, checkpoint):
            device = self.args.device
            if checkpoint is None or device.type != "cpu" or device.index is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            load = torch.load

            def cpu_load(*a, map_location=None, **kw):
                if isinstance(map_location, torch.device) and map_location.type == "cpu":
                    map_location = "cpu"
                return load(*a, map_location=map_location, **kw)

            torch.load = cpu_load
            try:
                return super()._load_optimizer_and_scheduler(checkpoint)
            finally:
                torch.load = load

    CpuResumable.__name__ = CpuResumable.__qualname__ = trainer_cls.__name__
    return CpuResumable


TRL_OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}


def optimizer_kwargs(recipe: utils.Recipe) -> dict:
    """GRPOConfig fields for the recipe's optimizer knobs; a knob left empty keeps TRL's default
    (transformers' AdamW, weight decay 0.0, betas 0.9/0.999; Unsloth's GRPOConfig changes the
    optimizer to adamw_8bit and weight decay to 0.001).

    >>> optimizer_kwargs(utils.Recipe(optimizer="adamw", weight_decay=0.1, adam_beta2=0.99))
    {'optim': 'adamw_torch', 'weight_decay': 0.1, 'adam_beta2': 0.99}
    """
    utils.check_optimizer_knobs(recipe)
    if recipe.optimizer_steps == "per_sequence":
        raise ValueError("optimizer_steps 'per_sequence' is not available in the TRL trainer yet "
                         "(TRL takes one optimizer step per generation batch: use 'per_step' or leave it empty)")
    out = {"optim": TRL_OPTIMIZERS[recipe.optimizer]} if recipe.optimizer else {}
    out.update({k: getattr(recipe, k) for k in ("weight_decay", "adam_beta1", "adam_beta2")
                if getattr(recipe, k) is not None})
    return out


def print_args(*objs) -> None:
    for obj in objs:
        print(f"[trl] {type(obj).__name__}: " + json.dumps(dataclasses.asdict(obj), default=str))


def main(recipe: utils.Recipe, args: TrlArgs) -> int:
    try:
        recipe.check()  # parse_args checks it too; main() may get a Recipe built in code
        backend = fast_backend.select_backend(args.backend, args.use_vllm, args.vllm_mode,
                                              require_gpu=args.require_gpu)
        batch_kwargs(recipe, args, world_size())  # a batch that cannot be split is refused before any load
    except (ValueError, fast_backend.BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"[trl] {backend.describe()}")
    run_dir = utils.run_dir_for(recipe, "trl")
    try:
        with utils.RunLock(run_dir, "trl"), _refuse_signals_while_starting():
            return train(recipe, args, backend, run_dir)
    except utils.RunDirBusy as e:
        print(f"error: {e} (exit {utils.EXIT_RUN_DIR_BUSY})", file=sys.stderr)
        return utils.EXIT_RUN_DIR_BUSY
    except StartInterrupted as e:
        print(f"[trl] {e} outside the training loop (while loading): stopped at once, no checkpoint was being "
              f"written. Rerun the same command to start or resume (exit {EXIT_INTERRUPTED}).", file=sys.stderr)
        return EXIT_INTERRUPTED


class StartInterrupted(Exception):
    """A stop signal while loading: nothing is being written yet, so stop at once."""


@contextlib.contextmanager
def _refuse_signals_while_starting():
    """SIGTERM/SIGUSR1/SIGINT before training starts raise StartInterrupted (the training loop
    installs its own checkpoint-then-stop handler over this one); old handlers come back after."""
    def refuse(signum, frame):
        raise StartInterrupted(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, refuse) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@dataclass
class StartPoint:
    """Where a run starts, read from its run directory (resume_point + trim_metrics)."""

    checkpoint: str | None  # the newest complete checkpoint, or None: start at step 0
    step: int
    offset: float  # training wall time already spent: the timer continues from it
    val_done: set[int]  # steps already validated
    dropped: int  # metrics rows dropped past the checkpoint
    finished: bool  # max_steps trained before: only the final validation or final/ can be missing


def start_point(recipe: utils.Recipe, resume: bool, run_dir: Path) -> StartPoint:
    """The newest complete checkpoint and the metrics kept up to it (later rows are dropped).

    >>> start_point(utils.Recipe(max_steps=2), True, Path("no-such-run"))
    StartPoint(checkpoint=None, step=0, offset=0.0, val_done=set(), dropped=0, finished=False)
    """
    checkpoint, step = resume_point(run_dir, resume)
    offset, val_done, dropped = trim_metrics(run_dir, step)
    # A run whose steps are all trained: a rerun trains nothing (TRL's loop would take one more step).
    finished = checkpoint is not None and step >= recipe.max_steps
    return StartPoint(checkpoint, step, offset, val_done, dropped, finished)


def train(recipe: utils.Recipe, args: TrlArgs, backend: fast_backend.Backend, run_dir: Path) -> int:
    """Everything main() does while holding the run directory: decide where to start, load, build
    the trainer, train (or finish a trained run), report."""
    print_args(recipe, args, backend)
    start = start_point(recipe, args.resume, run_dir)
    if start.finished and start.step in start.val_done and final_complete(run_dir):
        print(f"[trl] nothing to do: {run_dir} is finished at step {start.step} (max_steps={recipe.max_steps}); "
              "raise --max_steps to train further")
        return EXIT_OK
    prepare_run_dir(recipe, args, backend, run_dir, start)
    client = connect_reward_server(recipe)
    if client is None:
        return EXIT_REWARD_SERVER
    loaded = load_policy_and_data(recipe, args, backend)
    if loaded is None:
        return EXIT_USAGE
    return run_training(build_run(recipe, args, backend, run_dir, start, client, loaded))


def prepare_run_dir(recipe: utils.Recipe, args: TrlArgs, backend: fast_backend.Backend, run_dir: Path,
                    start: StartPoint) -> None:
    """config.json, what the resume kept and dropped, the seed and the torch threads."""
    utils.save_config(run_dir, recipe=recipe, trl=args, backend=backend)
    if start.checkpoint:
        print(f"[trl] resuming from {start.checkpoint} (step {start.step}); "
              f"dropped {start.dropped} metrics rows past it")
    elif start.dropped:
        print(f"[trl] no checkpoint in {run_dir}: starting at step 0, dropped {start.dropped} earlier metrics rows")
    utils.set_seed(recipe.seed)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
        print(f"[trl] torch threads: {torch.get_num_threads()}")


def connect_reward_server(recipe: utils.Recipe) -> utils.RewardClient | None:
    """The reward client once the server answers /health; None (after one error line) when it does not."""
    client = utils.RewardClient(recipe.reward_url, timeout=recipe.reward_timeout, retries=recipe.reward_retries)
    try:  # before loading anything heavy: a run without a reward server cannot do anything
        health = client.health_sync()
    except utils.RewardServerError as e:
        print(f"error: reward server not usable: {e}", file=sys.stderr)
        return None
    print(f"[trl] reward server {recipe.reward_url}: {json.dumps(health)[:200]}")
    return client


@dataclass
class Loaded:
    """The policy, its tokenizer, the data and the validator."""

    model: Any
    tokenizer: Any
    train_ds: Any
    val_ds: Any
    stop_overrides: dict  # GRPOConfig fields that end a completion at the title's line break
    validator: Any


def load_policy_and_data(recipe: utils.Recipe, args: TrlArgs, backend: fast_backend.Backend) -> Loaded | None:
    """Load the model, data and validator; None (after one error line) for a bad file, a hub id
    out of reach or too few train stories."""
    t_load = time.perf_counter()
    utils.fault_pause("load")
    try:
        model, tokenizer = fast_backend.load_policy(backend, recipe, args)
        train_ds, report = utils.load_split(recipe, recipe.train_split, tokenizer, recipe.max_train_stories)
        val_ds, val_report = utils.load_split(recipe, recipe.val_split, tokenizer, recipe.max_val_stories)
    except (utils.DatasetError, utils.HubUnavailable) as e:  # one line: a bad file, or a hub id out of reach
        print(f"error: {e}", file=sys.stderr)
        return None
    print(f"[trl] data: {report.summary()}; {val_report.summary()}")
    if len(train_ds) < recipe.prompts_per_step:
        print(f"error: {len(train_ds)} train stories left after filtering, fewer than prompts_per_step "
              f"({recipe.prompts_per_step})", file=sys.stderr)
        return None
    # The title is the first line: with stop_at_newline a line break ends the completion (utils.Recipe).
    stop_overrides = fast_backend.stop_at_tokens(
        backend, model, utils.stop_token_ids(tokenizer, utils.stop_strings(recipe)))
    validator = _make_validator(recipe, model, tokenizer)
    print(f"[trl] model, data and validator ({recipe.validator}) ready in {time.perf_counter() - t_load:.1f}s")
    return Loaded(model, tokenizer, train_ds, val_ds, stop_overrides, validator)


@dataclass
class Run:
    """A built run: what the training phase and its error reports need."""

    recipe: utils.Recipe
    run_dir: Path
    start: StartPoint
    client: utils.RewardClient
    model: Any
    trainer: Any
    stopper: StopOnSignal
    validate: Validate
    reward_log: RewardLog
    timer: utils.Timer


def build_run(recipe: utils.Recipe, args: TrlArgs, backend: fast_backend.Backend, run_dir: Path,
              start: StartPoint, client: utils.RewardClient, loaded: Loaded) -> Run:
    """The GRPOTrainer with the reward function and the callbacks; its batch and optimizer go
    into config.json."""
    GRPOTrainer = resumable_on_cpu(fast_backend.trainer_class(backend))  # noqa: N806 (a class)

    timer = utils.Timer(start.offset)
    reward_log = RewardLog()
    stopper, train_rows, validate, client_holder = build_callbacks(
        recipe=recipe, args=args, run_dir=run_dir, tokenizer=loaded.tokenizer, val_rows=list(loaded.val_ds),
        validator=loaded.validator, reward_log=reward_log, timer=timer, val_done=start.val_done)
    client_holder["client"] = client
    trainer = GRPOTrainer(
        model=loaded.model,
        reward_funcs=[make_reward_func(client, loaded.validator, recipe.trailing_penalty, reward_log,
                                       recipe.max_completion_tokens)],
        args=grpo_config(recipe, args, backend, run_dir, loaded.stop_overrides),
        train_dataset=loaded.train_ds,
        processing_class=loaded.tokenizer,
        # The stopper last: a signal that arrives during a validation still stops at the end of that step.
        callbacks=[train_rows, validate, stopper],
    )
    validate.trainer = trainer
    _pause_inside_saves(trainer, stopper)
    if trainer.is_world_process_zero():
        record_in_config(run_dir, optimizer_used=optimizer_used(trainer.args),
                         batch={k: getattr(trainer.args, k) for k in ("per_device_train_batch_size",
                                "gradient_accumulation_steps", "steps_per_generation", "generation_batch_size",
                                "world_size", "gradient_checkpointing")})
    return Run(recipe, run_dir, start, client, loaded.model, trainer, stopper, validate, reward_log, timer)


def run_training(run: Run) -> int:
    """Train (or finish a trained run) with the checkpoint-then-stop signal handler installed;
    returns the exit code."""
    run.stopper.install()
    try:
        step, done = train_or_finish(run)
    except utils.RewardServerError as e:
        return reward_server_failed(run, e)
    except KeyboardInterrupt:
        print(f"\n[trl] aborted by a second signal at step {run.trainer.state.global_step}, without a new "
              f"checkpoint; rerun to resume from the last one in {run.run_dir}", file=sys.stderr)
        return EXIT_ABORTED
    finally:
        run.stopper.uninstall()
        _close_client(run.trainer, run.client)
    if not done:
        print(f"[trl] stopped by {run.stopper.received or 'the trainer'} at step {step}; checkpoint saved in "
              f"{run.run_dir}. Rerun the same command to resume (exit {EXIT_INTERRUPTED}).")
        return EXIT_INTERRUPTED
    if run.stopper.received:
        print(f"[trl] {run.stopper.received} arrived after the last step: the run is complete")
    print(f"[trl] done: step {step}, {run.timer():.0f}s of training wall time; "
          f"adapter -> {run.run_dir / 'final'}; metrics -> {run.run_dir / utils.METRICS_FILE}")
    print(f"run dir: {run.run_dir}")
    return EXIT_OK


def train_or_finish(run: Run) -> tuple[int, bool]:
    """(the step reached, whether the run is done): train to max_steps, validate and save final/."""
    start, trainer = run.start, run.trainer
    if start.finished:  # trained to the end before; its final validation or final/ is missing
        print(f"[trl] step {start.step} of max_steps={run.recipe.max_steps} is trained: finishing the run, "
              "no training")
        if start.step not in start.val_done:
            load_adapter_weights(run.model, start.checkpoint)
            run.validate.validate(run.model, start.step)
    else:
        trainer.train(resume_from_checkpoint=start.checkpoint)
    step = max(trainer.state.global_step, start.step)
    rank0 = trainer.is_world_process_zero()  # the one that validates and writes final/
    done = step >= run.recipe.max_steps and (step in start.val_done or not rank0)
    if done and rank0:
        save_final(run.run_dir, run.run_dir / f"checkpoint-{step}", run.stopper)
    return step, done


def reward_server_failed(run: Run, e: utils.RewardServerError) -> int:
    """Record the failure in failures.jsonl and say what to do; no reward was made up."""
    validating = run.validate.current
    step = validating or run.trainer.state.global_step + 1
    where = f"validation at step {step}" if validating else f"step {step}; the step was not trained"
    stats = run.client.stats
    total = record_failure(run.run_dir, step, e, dict(stats))
    print(f"\nerror: the reward server failed during {where} and no reward "
          f"was made up.\n  {e}\n  client: {stats['requests']} requests, {stats['retries']} "
          f"retries, {stats['failures']} failures in this process; {run.reward_log.failures} failed reward "
          f"batch(es) now, {total} failure(s) recorded in {run.run_dir / 'failures.jsonl'}.\n  Restart the server "
          f"(`make reward`) and rerun the same command to resume from the last checkpoint.", file=sys.stderr)
    return EXIT_REWARD_SERVER


def _pause_inside_saves(trainer, stopper) -> None:
    """Test hook (HN_PAUSE_AT=save[@N]): pause inside a checkpoint save, after the adapter is
    written and before the optimizer and trainer state, where a kill leaves half a checkpoint."""
    import os

    if "save" not in os.environ.get(utils.PAUSE_ENV, ""):
        return
    save_model = trainer.save_model

    def paused_save_model(output_dir=None, _internal_call=False):
        save_model(output_dir, _internal_call)
        if _internal_call:
            utils.fault_pause("save", trainer.state.global_step, until=lambda: stopper.received)

    trainer.save_model = paused_save_model


def _make_validator(recipe: utils.Recipe, model, tokenizer):
    import policy  # transformers and peft load with it: not at import time

    return policy.make_validator(recipe, model, tokenizer)


def _close_client(trainer, client: utils.RewardClient) -> None:
    """Close the reward client's connection on the event loop TRL ran the reward function on."""
    loop = getattr(trainer, "async_loop", None)
    if loop is not None and loop.is_running():
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=5)


def cli(argv: Sequence[str] | None = None) -> int:
    """Parse `--recipe` + flags (utils.parse_args) and run; returns the exit code."""
    recipe, args = utils.parse_args((utils.Recipe, TrlArgs), "trl", argv, description=__doc__.splitlines()[0])
    return main(recipe, args)


if __name__ == "__main__":
    fast_backend.import_unsloth_first(sys.argv[1:])  # Unsloth must patch transformers/TRL before they load
    sys.exit(cli())
