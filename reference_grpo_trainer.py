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

Resume is the default: rerunning the same command continues from the newest checkpoint (the
step count and wall time continue; metrics rows past that checkpoint are dropped so none
is duplicated). `--resume false` with an existing checkpoint is refused: pick a new run_name.

Exit codes:
    0   finished (max_steps reached)
    75  interrupted by SIGTERM / SIGUSR1 / Ctrl-C: a checkpoint was saved at the end of the
        current step; rerun to resume. Slurm: `#SBATCH --signal=USR1@120` (or plain SIGTERM
        at the time limit; a batch script that traps the signal must forward it), then
        requeue when the exit code is 75.
    130 a second signal while stopping: exited at once, no new checkpoint (rerun resumes
        from the previous one).
    3   the reward server failed (after utils.RewardClient's bounded retries); nothing was
        scored as 0. The last checkpoint is intact: restart the server and rerun to resume.
    1   bad arguments or backend (e.g. --backend unsloth on a machine without CUDA).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import resource
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
# Callbacks (built lazily: importing transformers costs seconds)
# --------------------------------------------------------------------------------------


def build_callbacks(*, recipe: utils.Recipe, args: TrlArgs, run_dir: Path, tokenizer, val_rows: list[dict],
                    validator, reward_log: RewardLog, timer: utils.Timer, val_done: set[int]):
    from transformers import TrainerCallback

    batch = recipe.prompts_per_step * recipe.num_generations

    class StopOnSignal(TrainerCallback):
        """SIGTERM/SIGUSR1/SIGINT -> save a checkpoint at the end of this step, then stop."""

        SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT) if s)

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

    stopper = StopOnSignal()

    class TrainRows(TrainerCallback):
        """One shared-schema `train` row per optimizer step, from what the reward function scored."""

        def __init__(self):
            self.writer = utils.MetricsWriter(run_dir)
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_begin(self, args_, state, control, **kw):
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args_, state, control, **kw):
            # With steps_per_generation > 1 one generation batch feeds several steps; each row
            # then takes the next `batch` completions in generation order.
            scored, reward_log.pending[:] = reward_log.pending[:batch], reward_log.pending[batch:]
            tokens = reward_log.completion_tokens[:batch]
            del reward_log.completion_tokens[:batch]
            step_s = time.perf_counter() - self.t0
            # CPU seconds of this process too: on a shared machine wall time mostly measures the neighbours.
            extra = {"step_seconds": round(step_s, 3), "step_cpu_seconds": round(time.process_time() - self.cpu0, 3),
                     "reward_seconds": round(reward_log.seconds, 3),
                     "completion_tokens_mean": sum(tokens) / max(len(tokens), 1),
                     # Cost in the units the demo compares across methods: TRL takes one optimizer
                     # step per step (no gradient accumulation) and computes the loss over every
                     # completion token of the batch (zero-advantage ones included).
                     "optimizer_steps": 1, "trained_tokens": sum(tokens),
                     "hit_token_cap": sum(t >= recipe.max_completion_tokens for t in tokens) / max(len(tokens), 1),
                     "reward_requests": client_stats().get("requests", 0), "epoch": state.epoch,
                     "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
            reward_log.seconds = 0.0
            if not state.is_world_process_zero:
                return  # multi-process (accelerate): one writer; the row covers rank 0's completions
            self.writer.write(utils.metrics_row(method="trl", step=state.global_step, split="train", scored=scored,
                                                wall_time=timer(), run=run_dir.name, extra=extra))

    class Validate(TrainerCallback):
        """Validation with the current adapter every eval_every steps and at the end."""

        def __init__(self):
            self.trainer = None  # set after GRPOTrainer exists (to send val numbers to its loggers)
            self.current: int | None = None  # the step being validated (for error messages)

        def on_train_begin(self, args_, state, control, model=None, **kw):
            # A run interrupted right at an eval step saved its checkpoint before validating.
            step = state.global_step
            if step and recipe.eval_every and step % recipe.eval_every == 0 and step not in val_done:
                self.validate(model, step)

        def on_step_end(self, args_, state, control, model=None, **kw):
            step = state.global_step
            if stopper.received:
                return  # the job is being stopped: checkpoint first, validate after the resume
            if recipe.eval_every and step % recipe.eval_every == 0 and step not in val_done:
                self.validate(model, step)

        def on_train_end(self, args_, state, control, model=None, **kw):
            if not stopper.received and state.global_step and state.global_step not in val_done:
                self.validate(model, state.global_step)

        def validate(self, model, step: int) -> None:
            import evaluate

            if self.trainer is not None and not self.trainer.is_world_process_zero():
                return  # validate once, on rank 0 (inference only: the other ranks just wait at the next step)

            generator = evaluate.HFGenerator(model, tokenizer, batch_size=args.eval_batch_size, name="trl")
            t0 = time.perf_counter()
            self.current = step
            result = evaluate.score_val(recipe, generator, val_rows, validator)
            self.current = None
            row = utils.eval_metrics_row(result, method="trl", step=step, wall_time=timer(), run=run_dir.name,
                                         extra={"eval_seconds": round(time.perf_counter() - t0, 1)})
            path = evaluate.write_eval(run_dir, f"step-{step:05d}", result, row)
            val_done.add(step)
            print(f"\n[val step {step}] {evaluate.summary(result)}  ({time.perf_counter() - t0:.0f}s, {path})")
            for rec in result.records()[:args.show_titles]:
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

    client_holder: dict = {}

    def client_stats() -> dict:
        c = client_holder.get("client")
        return dict(c.stats) if c is not None else {}

    return stopper, TrainRows(), Validate(), client_holder


# --------------------------------------------------------------------------------------
# Run directory: resume point, metrics, failures
# --------------------------------------------------------------------------------------


def resume_point(run_dir: Path, resume: bool) -> tuple[str | None, int]:
    """(checkpoint folder or None, its step). Refuses to silently overwrite a resumable run."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(run_dir)) if run_dir.exists() else None
    if last and not resume:
        raise SystemExit(f"{run_dir} already has {Path(last).name}; resume (the default) or choose "
                         "another --run_name (refusing to mix two runs in one directory)")
    if not last:
        return None, 0
    state = json.loads((Path(last) / "trainer_state.json").read_text())
    return last, int(state["global_step"])


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
        per_device_train_batch_size=recipe.prompts_per_step * recipe.num_generations,  # completions per step
        gradient_accumulation_steps=1,
        steps_per_generation=args.steps_per_generation,
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


def main(recipe: utils.Recipe, args: TrlArgs, recipe_path: str | None = None) -> int:
    try:
        backend = fast_backend.select_backend(args.backend, args.use_vllm, args.vllm_mode)
    except fast_backend.BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"[trl] {backend.describe()}")
    run_dir = utils.run_dir_for(recipe, "trl", recipe_path)
    print_args(recipe, args, backend)
    utils.save_config(run_dir, recipe=recipe, trl=args, backend=backend, recipe_path=recipe_path)
    checkpoint, start_step = resume_point(run_dir, args.resume)
    offset, val_done, dropped = trim_metrics(run_dir, start_step)
    if checkpoint:
        print(f"[trl] resuming from {checkpoint} (step {start_step}); dropped {dropped} metrics rows past it")
    elif dropped:
        print(f"[trl] no checkpoint in {run_dir}: starting at step 0, dropped {dropped} earlier metrics rows")
    utils.set_seed(recipe.seed)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
        print(f"[trl] torch threads: {torch.get_num_threads()}")

    client = utils.RewardClient(recipe.reward_url, timeout=recipe.reward_timeout, retries=recipe.reward_retries)
    try:  # before loading anything heavy: a run without a reward server cannot do anything
        health = client.health_sync()
    except utils.RewardServerError as e:
        print(f"error: reward server not usable: {e}", file=sys.stderr)
        return EXIT_REWARD_SERVER
    print(f"[trl] reward server {recipe.reward_url}: {json.dumps(health)[:200]}")

    t_load = time.perf_counter()
    model, tokenizer = fast_backend.load_policy(backend, recipe, args)
    try:
        train_ds, report = utils.load_split(recipe, recipe.train_split, tokenizer, recipe.max_train_stories)
        val_ds, val_report = utils.load_split(recipe, recipe.val_split, tokenizer, recipe.max_val_stories)
    except utils.DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"[trl] data: {report.summary()}; {val_report.summary()}")
    if len(train_ds) < recipe.prompts_per_step:
        print(f"error: {len(train_ds)} train stories left after filtering, fewer than prompts_per_step "
              f"({recipe.prompts_per_step})", file=sys.stderr)
        return EXIT_USAGE
    # The title is the first line: with stop_at_newline a line break ends the completion (utils.Recipe).
    stop_overrides = fast_backend.stop_at_tokens(
        backend, model, utils.stop_token_ids(tokenizer, utils.stop_strings(recipe)))
    validator = _make_validator(recipe, model, tokenizer)
    print(f"[trl] model, data and validator ({recipe.validator}) ready in {time.perf_counter() - t_load:.1f}s")

    GRPOTrainer = fast_backend.trainer_class(backend)  # noqa: N806 (a class)

    timer = utils.Timer(offset)
    reward_log = RewardLog()
    stopper, train_rows, validate, client_holder = build_callbacks(
        recipe=recipe, args=args, run_dir=run_dir, tokenizer=tokenizer, val_rows=list(val_ds), validator=validator,
        reward_log=reward_log, timer=timer, val_done=val_done)
    client_holder["client"] = client
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[make_reward_func(client, validator, recipe.trailing_penalty, reward_log,
                                       recipe.max_completion_tokens)],
        args=grpo_config(recipe, args, backend, run_dir, stop_overrides),
        train_dataset=train_ds,
        processing_class=tokenizer,
        callbacks=[stopper, train_rows, validate],
    )
    validate.trainer = trainer
    stopper.install()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except utils.RewardServerError as e:
        step = validate.current or trainer.state.global_step + 1
        where = f"validation at step {step}" if validate.current else f"step {step}; the step was not trained"
        total = record_failure(run_dir, step, e, dict(client.stats))
        print(f"\nerror: the reward server failed during {where} and no reward "
              f"was made up.\n  {e}\n  client: {client.stats['requests']} requests, {client.stats['retries']} "
              f"retries, {client.stats['failures']} failures in this process; {reward_log.failures} failed reward "
              f"batch(es) now, {total} failure(s) recorded in {run_dir / 'failures.jsonl'}.\n  Restart the server "
              f"(`make reward`) and rerun the same command to resume from the last checkpoint.", file=sys.stderr)
        return EXIT_REWARD_SERVER
    except KeyboardInterrupt:
        print(f"\n[trl] aborted by a second signal at step {trainer.state.global_step}, without a new checkpoint; "
              f"rerun to resume from the last one in {run_dir}", file=sys.stderr)
        return EXIT_ABORTED
    finally:
        stopper.uninstall()
        _close_client(trainer, client)
    if stopper.received:
        print(f"[trl] stopped by {stopper.received} at step {trainer.state.global_step}; checkpoint saved in "
              f"{run_dir}. Rerun the same command to resume (exit {EXIT_INTERRUPTED}).")
        return EXIT_INTERRUPTED
    final = run_dir / "final"
    trainer.save_model(str(final))  # the adapter (PEFT) + tokenizer, a stable path for `make eval`
    print(f"[trl] done: step {trainer.state.global_step}, {timer():.0f}s of training wall time; "
          f"adapter -> {final}; metrics -> {run_dir / utils.METRICS_FILE}")
    print(f"run dir: {run_dir}")
    return EXIT_OK


def _make_validator(recipe: utils.Recipe, model, tokenizer):
    import evaluate

    return evaluate.make_validator(recipe, model, tokenizer)


def _close_client(trainer, client: utils.RewardClient) -> None:
    """Close the reward client's connection on the event loop TRL ran the reward function on."""
    loop = getattr(trainer, "async_loop", None)
    if loop is not None and loop.is_running():
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=5)


def recipe_path_from(argv: Sequence[str] | None) -> str | None:
    import argparse
    import os

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=os.environ.get("RECIPE") or "recipes/cpu.yaml")
    return pre.parse_known_args(argv)[0].recipe


def cli(argv: Sequence[str] | None = None) -> int:
    """Parse `--recipe` + flags (utils.parse_args) and run; returns the exit code."""
    recipe, args = utils.parse_args((utils.Recipe, TrlArgs), "trl", argv, description=__doc__.splitlines()[0],
                                    default_recipe="recipes/cpu.yaml")
    return main(recipe, args, recipe_path_from(argv))


if __name__ == "__main__":
    fast_backend.import_unsloth_first(sys.argv[1:])  # Unsloth must patch transformers/TRL before they load
    sys.exit(cli())
