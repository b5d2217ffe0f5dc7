"""Train the HN title writer with TRL's GRPOTrainer + LoRA (the reference side of the comparison).

Needs the reward server (`make reward`). The knobs shared with train.py (ART) come from the
recipe's `shared:` block; TRL-only knobs (trl_config.TrlArgs) from its `trl:` block or flags.
main() reads top to bottom: settings, where to start, reward server, model and data, trainer,
train, report; the callbacks (metrics rows, validation, checkpoint-then-stop) follow it.

    make reward &                                  # 127.0.0.1:7000
    make train-trl                                 # recipes/cpu.yaml -> runs/trl-cpu
    python reference_grpo_trainer.py --recipe recipes/tiny.yaml --max_steps 2
    python reference_grpo_trainer.py --recipe recipes/gpu.yaml --backend unsloth --report_to tensorboard

Backends (hntitles/engines/fast_backend.py): on a CPU `auto` runs transformers + PEFT; on a CUDA machine with
`make setup-gpu`, Unsloth + its vLLM (or `--backend trl-vllm --vllm_mode colocate|server`).

Run directory (<runs_dir>/<run_name>, default runs/trl-<recipe stem>): config.json,
checkpoint-N/ (LoRA adapter + optimizer + trainer state, every save_every steps and at the
end), final/ (the last adapter + tokenizer), metrics.jsonl (one `train` row per optimizer
step and one `val` row per validation, the schema train.py also writes), eval/step-N.jsonl
(val titles beside the originals), failures.jsonl (reward-server failures, one line each),
completions/step-N.parquet (every step's rollouts: story, completion, reward and its parts,
validator verdict, advantage, tokens; the schema train.py also writes) and tracker/ (the
--report_to tracker's data: TensorBoard by default, `make board` opens it).

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
        was written. A lock left by a dead process is taken over (rundir.RunLock).
    1   bad arguments, data or backend (e.g. --backend unsloth on a machine without CUDA).
(The codes live in hntitles/runs/runtime.py, shared with train.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import utils
from hntitles.analysis import evaluation
from hntitles.engines import fast_backend, generation
from hntitles.runs import completions, model_card, procs, rundir, runtime, settings, tracking
from hntitles.runs.settings import Recipe
from hntitles.trl import config as trl_config
from hntitles.trl.config import TrlArgs
from hntitles.trl.trainer import attach_run, trainer_class

METHOD = "trl"
REWARD_NAME = "hn_reward"  # TRL logs rewards/<name>/mean


def main(recipe: Recipe, args: TrlArgs) -> int:  # noqa: C901 (the flow top to bottom: its branches are the exit codes)
    """Train to max_steps (or resume, or finish a trained run); returns the exit code."""
    # ---- The settings: the recipe as TRL's GRPOConfig, once; what cannot run is refused before anything loads
    try:
        recipe.check()  # parse_args checks it too; main() may get a Recipe built in code
        backend = fast_backend.select_backend(args.backend, args.use_vllm, args.vllm_mode,
                                              require_gpu=args.require_gpu)
        # refuses a batch that cannot be split; the run directory is created only once all is well
        config = trl_config.grpo_config(recipe, args, backend, rundir.run_path(recipe, METHOD))
    except (ValueError, fast_backend.BackendError) as e:
        return runtime.fail(e, runtime.EXIT_USAGE)
    print(f"[trl] {backend.describe()}")
    run_dir = rundir.run_dir_for(recipe, METHOD)
    tracker = tracking.Tracker()
    try:
        # Until training starts a stop signal stops at once: nothing is being written.
        with rundir.RunLock(run_dir, METHOD), runtime.refuse_signals():
            # ---- Where to start: the newest complete checkpoint, the metrics kept up to it
            start = start_point(recipe, args.resume, run_dir)
            if start.finished and start.step in start.val_done and rundir.final_complete(run_dir):
                print(f"[trl] nothing to do: {run_dir} is finished at step {start.step} "
                      f"(max_steps={recipe.max_steps}); raise --max_steps to train further")
                return runtime.EXIT_OK
            runtime.log_arguments("[trl]", recipe=recipe, trl=args, backend=backend)
            rundir.save_config(run_dir, recipe=recipe, trl=args, backend=backend)
            if start.checkpoint:
                print(f"[trl] resuming from {start.checkpoint} (step {start.step}); dropped {start.dropped} "
                      "metrics rows past it")
            elif start.dropped:
                print(f"[trl] no checkpoint in {run_dir}: starting at step 0, dropped {start.dropped} "
                      "earlier metrics rows")
            settings.set_seed(recipe.seed)
            procs.set_threads(args.torch_threads)  # 0: torch's default

            # ---- The tracker, before anything heavy loads: one that cannot start fails now
            tracker = tracking.open_tracker(recipe, run_dir, METHOD, first_step=start.step + 1)

            # ---- The reward server, before anything heavy loads: no run can do without it
            client = utils.RewardClient(recipe.reward_url, timeout=recipe.reward_timeout, retries=recipe.reward_retries)
            try:
                health = client.health_sync()
            except utils.RewardServerError as e:
                return runtime.fail(f"reward server not usable: {e}", runtime.EXIT_REWARD_SERVER)
            print(f"[trl] reward server {recipe.reward_url}: {str(health)[:200]}")

            # ---- The policy, the data, the validator
            from hntitles.engines import policy  # transformers and peft load with it

            t_load = time.perf_counter()
            model, tokenizer = fast_backend.load_policy(backend, recipe, args)
            train_ds, report = utils.load_split(recipe, recipe.train_split, tokenizer, recipe.max_train_stories)
            val_ds, val_report = utils.load_split(recipe, recipe.val_split, tokenizer, recipe.max_val_stories)
            print(f"[trl] data: {report.summary()}; {val_report.summary()}")
            if len(train_ds) < recipe.prompts_per_step:
                raise utils.DatasetError(f"{len(train_ds)} train stories left after filtering, fewer than "
                                         f"prompts_per_step ({recipe.prompts_per_step})")
            # The title is the first line: with stop_at_newline a line break ends the completion.
            fast_backend.stop_at_tokens(backend, model, config,
                                        generation.stop_token_ids(tokenizer, utils.stop_strings(recipe)))
            validator = policy.make_validator(recipe, model, tokenizer)
            print(f"[trl] model, data and validator ({recipe.validator}) ready in {time.perf_counter() - t_load:.1f}s")

            # ---- The trainer: TRL's GRPOTrainer, our reward function and callbacks
            stopper = runtime.StopOnSignal("[trl]", "saving a checkpoint at the end of this step")
            run = RunState(recipe, args, run_dir, client, rundir.Timer(start.offset), start.val_done, stopper, tracker)
            validate = trainer_callback(Validate)(run, tokenizer, list(val_ds), validator)
            trainer = trainer_class(backend)(
                model=model,
                reward_funcs=[make_reward_func(client, validator, recipe, run.reward_log)],
                args=config, train_dataset=train_ds, processing_class=tokenizer,
                # The stopper last: a signal during a validation still stops at the end of that step.
                callbacks=[trainer_callback(TrainRows)(run), validate, trainer_callback(StopAtStepEnd)(stopper)],
            )
            validate.trainer = trainer
            attach_run(trainer, run.reward_log, tracker)  # advantages to the rollout tables, TRL's logs to the tracker
            rank0 = trainer.is_world_process_zero()  # the process that validates and writes final/
            if rank0:
                rundir.record_in_config(run_dir, optimizer_used=trl_config.optimizer_used(trainer.args),
                                        batch={k: getattr(trainer.args, k) for k in BATCH_FIELDS}, reward_server=health,
                                        data=model_card.split_sizes((report, train_ds), (val_report, val_ds)))

            # ---- Train to max_steps, validate, save final/ (a stop signal now saves first)
            with stopper:
                try:
                    if start.finished:  # trained to the end before; its final validation or final/ is missing
                        print(f"[trl] step {start.step} of max_steps={recipe.max_steps} is trained: "
                              "finishing the run, no training")
                        if start.step not in start.val_done:
                            load_adapter_weights(model, start.checkpoint)
                            validate.validate(model, start.step)
                    else:
                        trainer.train(resume_from_checkpoint=start.checkpoint)
                except utils.RewardServerError as e:
                    step = validate.current or trainer.state.global_step + 1
                    return reward_server_failed(run, step, bool(validate.current), e)
                except KeyboardInterrupt:
                    print(f"\n[trl] aborted by a second signal at step {trainer.state.global_step}, without a new "
                          f"checkpoint; rerun to resume from the last one in {run_dir}", file=sys.stderr)
                    return runtime.EXIT_ABORTED
                finally:
                    close_client(trainer, client)
                step = max(trainer.state.global_step, start.step)
                done = step >= recipe.max_steps and (step in run.val_done or not rank0)
                if done and rank0:
                    model_card.save_final(run_dir, run_dir / f"checkpoint-{step}", METHOD, step)

            # ---- Report
            if not done:
                print(f"[trl] stopped by {stopper.received or 'the trainer'} at step {step}; checkpoint saved in "
                      f"{run_dir}. Rerun the same command to resume (exit {runtime.EXIT_INTERRUPTED}).")
                return runtime.EXIT_INTERRUPTED
            if stopper.received:
                print(f"[trl] {stopper.received} arrived after the last step: the run is complete")
            print(f"[trl] done: step {step}, {run.timer():.0f}s of training wall time; adapter -> "
                  f"{run_dir / 'final'}; metrics -> {run_dir / rundir.METRICS_FILE}")
            print(f"run dir: {run_dir}")
            return runtime.EXIT_OK
    except rundir.RunDirBusy as e:
        return runtime.fail(e, runtime.EXIT_RUN_DIR_BUSY)
    except rundir.NoIntactCheckpoint as e:
        return runtime.fail(e, runtime.EXIT_NO_CHECKPOINT)
    except runtime.StartInterrupted as e:
        return runtime.fail(f"[trl] {e} outside the training loop (while loading): stopped at once, no checkpoint was "
                    "being written. Rerun the same command to start or resume", runtime.EXIT_INTERRUPTED)
    except (utils.DatasetError, settings.HubUnavailable, tracking.TrackerError) as e:  # a bad file, a hub id out
        return runtime.fail(e, runtime.EXIT_USAGE)                                     # of reach, a tracker
    finally:
        tracker.close()


# --------------------------------------------------------------------------------------
# Where a run starts
# --------------------------------------------------------------------------------------


@dataclass
class StartPoint:
    """Where a run starts, read from its run directory."""

    checkpoint: str | None  # the newest complete checkpoint, or None: start at step 0
    step: int
    offset: float  # training wall time already spent: the timer continues from it
    val_done: set[int]  # steps already validated
    dropped: int  # metrics rows dropped past the checkpoint
    finished: bool  # max_steps trained before: only the final validation or final/ can be missing


def start_point(recipe: Recipe, resume: bool, run_dir: Path) -> StartPoint:
    """The newest complete checkpoint and the metrics kept up to it (later rows are dropped).

    >>> start_point(Recipe(max_steps=2), True, Path("no-such-run"))
    StartPoint(checkpoint=None, step=0, offset=0.0, val_done=set(), dropped=0, finished=False)
    """
    checkpoint, step = rundir.resume_point(run_dir, resume)
    offset, val_done, dropped = rundir.trim_metrics(run_dir, step, METHOD)
    # A run whose steps are all trained: a rerun trains nothing (TRL's loop would take one more step).
    return StartPoint(checkpoint, step, offset, val_done, dropped, checkpoint is not None and step >= recipe.max_steps)


def load_adapter_weights(model, checkpoint: str) -> None:
    """The checkpoint's LoRA weights into the policy (to validate a run whose training is done)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    loaded = set_peft_model_state_dict(model, load_file(str(Path(checkpoint) / "adapter_model.safetensors")))
    if getattr(loaded, "unexpected_keys", None):
        raise RuntimeError(f"{checkpoint}: adapter weights do not fit the model ({loaded.unexpected_keys[:3]})")


# --------------------------------------------------------------------------------------
# The reward function
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
    story_ids: list = field(default_factory=list)  # the story of each pending completion
    texts: list = field(default_factory=list)  # each pending completion's text
    advantages: list = field(default_factory=list)  # GRPOTrainer's advantage of each (RunTrainer hands them over)
    batches: int = 0
    failures: int = 0
    seconds: float = 0.0


def make_reward_func(client: utils.RewardClient, validator, recipe: Recipe, log: RewardLog):
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
            scored = await utils.score_completions(client, validator, rows, texts, recipe.trailing_penalty)
        except utils.RewardServerError:
            log.failures += 1
            raise
        finally:
            log.seconds += time.perf_counter() - t0
        log.batches += 1
        log.pending.extend(scored)
        lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [math.nan] * len(texts)
        log.completion_tokens.extend(lengths)
        log.story_ids.extend(str(x) for x in columns.get("id", [""] * len(texts)))
        log.texts.extend(texts)
        n = max(len(scored), 1)
        if log_metric is not None:  # TRL averages these per logging step next to its own metrics
            log_metric("hn/rm", sum(s.rm for s in scored) / n)
            log_metric("hn/match_rate", sum(s.matches for s in scored) / n)
            log_metric("hn/title_words", sum(s.length for s in scored) / n)
            log_metric("hn/copy_frac", sum(s.copy for s in scored) / n)
            log_metric("hn/trailing_rate", sum(s.trailing for s in scored) / n)
            log_metric("hn/hit_token_cap", sum(x >= recipe.max_completion_tokens for x in lengths) / n)
        if log_extra is not None:
            log_extra("title", [s.title for s in scored])
        return [s.reward for s in scored]

    hn_reward.__name__ = hn_reward.__qualname__ = REWARD_NAME
    return hn_reward


def reward_server_failed(run: RunState, step: int, validating: bool, e: utils.RewardServerError) -> int:
    """Record the failure in failures.jsonl and say what to do; no reward was made up."""
    where = f"validation at step {step}" if validating else f"step {step}; the step was not trained"
    stats = run.client.stats
    total = rundir.record_failure(run.run_dir, step, e, dict(stats))
    print(f"\nerror: the reward server failed during {where} and no reward was made up.\n  {e}\n  client: "
          f"{stats['requests']} requests, {stats['retries']} retries, {stats['failures']} failures in this process; "
          f"{run.reward_log.failures} failed reward batch(es) now, {total} failure(s) recorded in "
          f"{run.run_dir / 'failures.jsonl'}.\n  Restart the server (`make reward`) and rerun the same command to "
          f"resume from the last checkpoint (exit {runtime.EXIT_REWARD_SERVER}).", file=sys.stderr)
    return runtime.EXIT_REWARD_SERVER


def close_client(trainer, client: utils.RewardClient) -> None:
    """Close the reward client's connection on the event loop TRL ran the reward function on."""
    loop = getattr(trainer, "async_loop", None)
    if loop is not None and loop.is_running():
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=5)


# --------------------------------------------------------------------------------------
# Callbacks: a metrics row per step, validation, checkpoint-then-stop on a signal. Plain
# classes here; trainer_callback puts transformers' TrainerCallback under them when a run
# builds them (transformers must not load before Unsloth, see import_unsloth_first).
# --------------------------------------------------------------------------------------


@dataclass
class RunState:
    """What the callbacks and main() share during training."""

    recipe: Recipe
    args: TrlArgs
    run_dir: Path
    client: utils.RewardClient
    timer: rundir.Timer
    val_done: set[int]  # steps with a val row in metrics.jsonl
    stopper: runtime.StopOnSignal
    tracker: tracking.Tracker = field(default_factory=tracking.Tracker)
    reward_log: RewardLog = field(default_factory=RewardLog)


BATCH_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                "generation_batch_size", "world_size", "gradient_checkpointing")


def _mean(values) -> float:
    return sum(values) / max(len(values), 1)


class StopAtStepEnd:
    """After a stop signal: save a checkpoint at the end of this step, then stop training."""

    def __init__(self, stopper: runtime.StopOnSignal):
        self.stopper = stopper

    def on_step_end(self, args_, state, control, **kw):
        if self.stopper.received:
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args_, state, control, **kw):
        if self.stopper.received:  # it arrived during the save: that checkpoint is complete, stop now
            control.should_training_stop = True


class TrainRows:
    """One shared-schema `train` row per optimizer step, from what the reward function scored."""

    def __init__(self, run: RunState):
        self.run = run
        self.writer = rundir.MetricsWriter(run.run_dir)
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def on_train_begin(self, args_, state, control, **kw):
        # A resumed TrainerState brings the checkpoint's save/logging/eval steps back; this run's
        # flags win, as on a fresh start (a changed --save_every on resume is honoured, not ignored).
        state.compute_steps(args_, state.max_steps)

    def on_step_begin(self, args_, state, control, **kw):
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def on_step_end(self, args_, state, control, **kw):
        run = self.run
        batch = self.take_batch()
        extra = self.step_extra(state, batch["tokens"])
        run.reward_log.seconds = 0.0
        if args_.world_size > 1:  # every rank scored its share of the step: the row covers them all
            from accelerate.utils import gather_object

            batch = {k: gather_object(v) for k, v in batch.items()}
            extra["completion_tokens_mean"] = _mean(batch["tokens"])
            extra["hit_token_cap"] = _mean([t >= run.recipe.max_completion_tokens for t in batch["tokens"]])
        if not state.is_world_process_zero:
            return  # multi-process (accelerate): one writer
        step = state.global_step
        row = utils.metrics_row(method=METHOD, step=step, split="train", scored=batch["scored"],
                                wall_time=run.timer(), run=run.run_dir.name, extra=extra)
        self.writer.write(row)
        rollouts = completions.records(method=METHOD, step=step, story_ids=batch["story_ids"],
                                       completions=batch["texts"], scored=batch["scored"],
                                       advantages=batch["advantages"], tokens=batch["tokens"],
                                       group_size=run.recipe.num_generations)
        completions.write_step(run.run_dir, step, rollouts)
        run.tracker.log_row(row)
        run.tracker.log_rollouts(step, rollouts)

    def on_log(self, args_, state, control, logs=None, **kw):
        if state.is_world_process_zero and logs:  # loss, grad norm, learning rate, entropy, KL under shared names
            self.run.tracker.log_optimizer(state.global_step, logs)

    def take_batch(self) -> dict[str, list]:
        """This step's scored completions, with their token counts, stories, texts and advantages, taken off
        the reward log.

        With steps_per_generation > 1 one generation batch feeds several steps; each row then
        takes the next prompts_per_step x num_generations completions in generation order.
        """
        log, n = self.run.reward_log, self.run.recipe.prompts_per_step * self.run.recipe.num_generations
        lists = {"scored": log.pending, "tokens": log.completion_tokens, "story_ids": log.story_ids,
                 "texts": log.texts, "advantages": log.advantages}
        batch = {k: v[:n] for k, v in lists.items()}
        for v in lists.values():
            del v[:n]
        if len(batch["advantages"]) < len(batch["scored"]):  # a trainer that did not hand them over
            batch["advantages"] += [math.nan] * (len(batch["scored"]) - len(batch["advantages"]))
        return batch

    def step_extra(self, state, tokens: list) -> dict:
        """The row's `extra` fields: timings, cost and memory of this process's share of the step."""
        return {"step_seconds": round(time.perf_counter() - self.t0, 3),
                # CPU seconds of this process too: on a shared machine wall time mostly measures the neighbours.
                "step_cpu_seconds": round(time.process_time() - self.cpu0, 3),
                "reward_seconds": round(self.run.reward_log.seconds, 3),
                "completion_tokens_mean": _mean(tokens),
                # Cost in the units the demo compares across methods: TRL takes one optimizer
                # step per step (no gradient accumulation) and computes the loss over every
                # completion token of the batch (zero-advantage ones included).
                "optimizer_steps": 1, "trained_tokens": sum(tokens),
                "hit_token_cap": _mean([t >= self.run.recipe.max_completion_tokens for t in tokens]),
                "reward_requests": self.run.client.stats.get("requests", 0), "epoch": state.epoch,
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


class Validate:
    """Validation with the current adapter every eval_every steps and at the end (evaluation.score_val)."""

    def __init__(self, run: RunState, tokenizer, val_rows: list[dict], validator):
        self.run, self.tokenizer, self.val_rows, self.validator = run, tokenizer, val_rows, validator
        self.trainer = None  # set after GRPOTrainer exists (to send val numbers to its loggers)
        self.current: int | None = None  # the step being validated (for error messages)

    def due(self, step: int) -> bool:
        """An eval_every step not validated yet."""
        every = self.run.recipe.eval_every
        return bool(every) and step % every == 0 and step not in self.run.val_done

    def on_train_begin(self, args_, state, control, model=None, **kw):
        # A run interrupted right at an eval step saved its checkpoint before validating.
        if state.global_step and self.due(state.global_step):
            self.validate(model, state.global_step)

    def on_step_end(self, args_, state, control, model=None, **kw):
        if self.run.stopper.received:
            return  # the job is being stopped: checkpoint first, validate after the resume
        if self.due(state.global_step):
            self.validate(model, state.global_step)

    def on_train_end(self, args_, state, control, model=None, **kw):
        step = state.global_step
        if not self.run.stopper.received and step and step not in self.run.val_done:
            self.validate(model, step)

    def validate(self, model, step: int) -> None:
        from hntitles.engines.generation import HFGenerator

        if self.trainer is not None and not self.trainer.is_world_process_zero():
            return  # validate once, on rank 0 (inference only: the other ranks just wait at the next step)
        run = self.run
        generator = HFGenerator(model, self.tokenizer, batch_size=run.args.eval_batch_size, name=METHOD)
        t0 = time.perf_counter()
        self.current = step
        result = evaluation.score_val(run.recipe, generator, self.val_rows, self.validator)
        self.current = None
        row = evaluation.eval_metrics_row(result, method=METHOD, step=step, wall_time=run.timer(),
                                          run=run.run_dir.name,
                                          extra={"eval_seconds": round(time.perf_counter() - t0, 1)})
        path = evaluation.write_eval(run.run_dir, f"step-{step:05d}", result, row)
        run.val_done.add(step)
        print(f"\n[val step {step}] {evaluation.eval_summary(result)}  ({time.perf_counter() - t0:.0f}s, {path})")
        for rec in result.records()[:run.args.show_titles]:
            print(f"  original: {rec['original']}\n  greedy:   {rec['greedy']['title']}")
        self.report(row)
        run.tracker.log_row(row)

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
def trainer_callback(cls: type) -> type:
    """`cls` with transformers' TrainerCallback under it: TrainerCallback's no-op methods answer
    every event `cls` does not handle, and the trainer sees a real TrainerCallback."""
    from transformers import TrainerCallback

    return type(cls.__name__, (cls, TrainerCallback), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def cli(argv: Sequence[str] | None = None) -> int:
    """Parse `--recipe` + flags (settings.parse_args) and run; returns the exit code."""
    recipe, args = settings.parse_args((Recipe, TrlArgs), METHOD, argv, description=__doc__.splitlines()[0])
    return main(recipe, args)


if __name__ == "__main__":
    fast_backend.import_unsloth_first(sys.argv[1:])  # Unsloth must patch transformers/TRL before they load
    sys.exit(cli())
