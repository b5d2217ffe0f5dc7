"""GRPO with OpenPipe ART (0.5.18): rollouts through the model's OpenAI-compatible server,
validator + reward server, trajectory groups, `backend.train`, validation every N steps.

Two engines under the same loop (`--backend`):
- `cpu`: ART's LocalBackend with a CPU ModelService (hntitles/art/cpu_backend.py): ART's own
  tokenization, packing, loss and checkpoints; a PEFT LoRA model in fp32 and a loopback
  OpenAI-compatible server instead of Unsloth + vLLM. Runs in the main .venv.
- `local`: ART's LocalBackend as shipped (vLLM + Unsloth on a CUDA GPU, from .venv-art,
  `make setup-art`; its torch/transformers/trl pins clash with the TRL stack).
- `auto` (default): local when CUDA is usable and ART's GPU extra (unsloth) is importable
  here, i.e. when run from .venv-art on a GPU node; cpu otherwise.

    make reward                                         # in another shell: the reward server
    make train-art                                      # recipes/cpu.yaml on the CPU engine
    python train.py --recipe recipes/tiny.yaml --backend cpu --max_steps 2
    make setup-art && make train-art RECIPE=recipes/gpu.yaml    # a GPU node: LocalBackend
    METHOD=art sbatch slurm/train.sbatch                # through Slurm

The recipe's `shared:` block holds the knobs both trainers read (model, data, group size,
completion length, learning rate, loss, KL, LoRA, optimizer, steps, eval); `art:` holds ArtArgs.
Everything goes to runs/art-<recipe>/: metrics.jsonl (the schema reference_grpo_trainer.py
writes), eval/step-NNNNN.jsonl, config.json (with the engine settings really used) and ART's
own directory art/ (checkpoints, history.jsonl, trajectories). Rerunning the same command
resumes from ART's last checkpoint; rerunning a finished run trains nothing.

Failures: a reward-server error (after RewardClient's bounded retries on transport errors and
5xx) stops the run with the error before anything of that step is trained or logged, and a
rerun resumes at that step; it never becomes a reward. A step whose groups cannot teach (all
rewards equal, or fewer than 2 trajectories) is skipped untrained with the reason in its
metrics row. Failed rollout requests fail the step unless --max_exceptions allows some.

main() reads top to bottom: settings, run directory, data, then the loop (`run_loop`: reward
server, backend, model; per step rollouts, rewards, train, validate); the pieces of a step follow it.

Exit codes (hntitles/runs/runtime.py, shared with the TRL trainer):
    0   finished (max_steps reached), or nothing left to do
    75  SIGTERM / SIGUSR1 / Ctrl-C: the current step was finished (trained, checkpointed, its
        row written), then the run stopped; rerun to resume
    130 a second signal while stopping: exited at once (rerun resumes from the last checkpoint)
    3   the reward server failed or is unreachable (start it with `make reward`, rerun)
    73  the run directory is in use by another live process (named in the message)
    1   bad settings or data, or the local backend on a machine without a usable GPU
"""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import utils
from hntitles.analysis import evaluation
from hntitles.art import config as art_config
from hntitles.art import cpu_backend as art_cpu_backend
from hntitles.art.compat import import_art
from hntitles.art.config import ArtArgs, ArtPlan
from hntitles.runs import completions, model_card, rundir, runtime, settings, tracking
from hntitles.runs.settings import Recipe

METHOD = "art"
GPU_HELP = """\
train.py --backend local (ART's LocalBackend) needs a CUDA GPU: {problem}.
ART's LocalBackend generates with vLLM and trains with Unsloth on the GPU; neither runs on a CPU.
  On a GPU node:  make setup-art                          # once: .venv-art with openpipe-art[backend]
                  make reward                             # in another shell: the reward server
                  make train-art RECIPE=recipes/gpu.yaml
  Through Slurm:  METHOD=art RECIPE=recipes/gpu.yaml sbatch slurm/train.sbatch  (starts the reward server too)
On this machine, ART's loop runs on the CPU engine: --backend cpu (or auto), as `make train-art` does."""


def main(recipe: Recipe, args: ArtArgs,  # noqa: C901 (the flow top to bottom: its branches are the exit codes)
         backend_factory: Callable[[ArtPlan, Path], Any] | None = None) -> int:
    """Train ART's loop to max_steps (or resume); returns the exit code. `backend_factory(plan,
    art_path)` builds the backend (the seam the tests of the GPU wiring use)."""
    # ---- The settings: the recipe turned into ART's, once; what ART cannot honour is refused here
    try:
        args.backend = resolve_backend(args)
        plan = art_config.plan(recipe, args)
    except ValueError as e:
        return runtime.fail(e, runtime.EXIT_USAGE)
    if backend_factory is None:
        if plan.backend == "local" and (problem := gpu_problem()):
            return runtime.fail(GPU_HELP.format(problem=problem), runtime.EXIT_USAGE)
        backend_factory = make_backend
    run_dir = rundir.run_dir_for(recipe, METHOD)
    stopper = runtime.StopOnSignal("[art]", "finishing this step (checkpoint + metrics row)")
    tracker = tracking.Tracker()
    try:
        # A stop signal from here on finishes the step under way (or stops before the first one).
        with rundir.RunLock(run_dir, METHOD), stopper:
            # ---- The run directory: the settings really used, said once
            settings.set_seed(recipe.seed)
            engine = plan.engine
            rundir.save_config(run_dir, recipe=recipe, art=args, internal_config=plan.internal_config,
                               train_kwargs=plan.train_kwargs, engine=engine)
            runtime.log_arguments("[art]", recipe=recipe, art=args, train_kwargs=plan.train_kwargs, engine=engine)
            if engine.get("requested_optim", "").endswith("8bit"):
                print(f"note: ART's optimizer {engine['requested_optim']} needs CUDA; the CPU engine uses "
                      f"{engine['optimizer']} with weight decay {engine['weight_decay']} and betas "
                      f"{engine['adam_betas']}")
            # Said, not silently dropped: ART writes a checkpoint after every step.
            print(f"note: save_every={recipe.save_every} does not apply to ART (a checkpoint per step); "
                  + ("each validation keeps only the best and latest" if args.keep_best else
                     "all are kept (--no_keep_best)"))
            # ART 0.5.18 logs to W&B only from its GPU backend and has no TensorBoard hook: the loop logs the
            # shared keys through the tracker itself (and history.jsonl through ART's model.log).
            tracker = tracking.open_tracker(recipe, run_dir, METHOD)

            # ---- The data, loaded and filtered as the TRL trainer does
            from transformers import AutoTokenizer

            with settings.hub_errors(recipe.model):
                tokenizer = AutoTokenizer.from_pretrained(recipe.model)
            train_ds, report = utils.load_split(recipe, recipe.train_split, tokenizer, recipe.max_train_stories)
            val_ds, val_report = utils.load_split(recipe, recipe.val_split, tokenizer, recipe.max_val_stories)
            print(f"{report.summary()}\n{val_report.summary()}")
            rundir.record_in_config(run_dir, data=model_card.split_sizes((report, train_ds), (val_report, val_ds)))
            if not len(train_ds) or not len(val_ds):
                raise utils.DatasetError(f"{recipe.dataset}: nothing left to train or validate on after filtering")

            # ---- The loop: reward server, backend, model; then rollouts, rewards, train, validate
            asyncio.run(run_loop(recipe, args, plan, run_dir, [dict(r) for r in train_ds],
                                 [dict(r) for r in val_ds], backend_factory, stopper, tracker))
    except rundir.RunDirBusy as e:
        return runtime.fail(e, runtime.EXIT_RUN_DIR_BUSY)
    except rundir.NoIntactCheckpoint as e:
        return runtime.fail(e, runtime.EXIT_NO_CHECKPOINT)
    except (utils.DatasetError, settings.HubUnavailable, tracking.TrackerError) as e:
        return runtime.fail(e, runtime.EXIT_USAGE)
    except utils.RewardServerError as e:
        return runtime.fail(f"reward server failed: {e}\nNothing was trained for the failing step; fix the server "
                    "(`make reward`) and rerun the same command to resume from it", runtime.EXIT_REWARD_SERVER)
    except KeyboardInterrupt:
        return runtime.fail("[art] aborted by a second signal; rerun to resume from the last checkpoint",
                    runtime.EXIT_ABORTED)
    finally:
        tracker.close()

    # ---- Report
    print(f"metrics -> {run_dir / rundir.METRICS_FILE}")
    if stopper.received:
        print(f"[art] stopped by {stopper.received}; rerun the same command to resume ({run_dir}) "
              f"(exit {runtime.EXIT_INTERRUPTED})")
        return runtime.EXIT_INTERRUPTED
    return runtime.EXIT_OK


async def run_loop(recipe: Recipe, args: ArtArgs, plan: ArtPlan, run_dir: Path, train_rows: list[dict],
                   val_rows: list[dict], backend_factory, stopper: runtime.StopOnSignal,
                   tracker: tracking.Tracker | None = None) -> None:
    """ART's model on its backend, the reward client and the validator around one Loop; all closed after."""
    art = import_art()
    art_path = run_dir / "art"
    model = art.TrainableModel(name=args.model_name or run_dir.name, project=args.project, base_model=recipe.model,
                               base_path=str(art_path), _internal_config=plan.internal_config)
    restore_point(run_dir, model)  # before ART reads its step: what cannot be resumed is set aside
    reward = utils.RewardClient(recipe.reward_url, timeout=recipe.reward_timeout, retries=recipe.reward_retries)
    backend = None
    try:
        # before the model loads: a missing server is a one-line error
        rundir.record_in_config(run_dir, reward_server=await reward.health())
        backend = backend_factory(plan, art_path)
        await model.register(backend)
        validator = make_validator(recipe, args, model)
        await Loop(recipe, args, plan, run_dir, train_rows, val_rows, model, backend, reward, validator,
                   stopper, tracker).run()
    finally:
        await reward.aclose()
        if backend is not None:
            await backend.close()


# --------------------------------------------------------------------------------------
# Settings and the backend seam
# --------------------------------------------------------------------------------------


def gpu_problem() -> str | None:
    """Why ART's LocalBackend cannot run here, or None. Cheap checks first; loads no model."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA driver on this machine (nvidia-smi not found)"
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed ({type(e).__name__})"
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return f"nvidia-smi lists no GPU ({(listed.stderr or listed.stdout).strip()[:200]})"
    try:
        import torch
    except ImportError:
        return "torch is not installed in this environment (run `make setup-art`; it creates .venv-art)"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} sees no CUDA device (a CPU build? `make setup-art` installs ART's "
                "CUDA stack)")
    return None


def resolve_backend(args: ArtArgs) -> str:
    """'auto' -> 'local' where ART's GPU stack can run (CUDA + unsloth importable), else 'cpu'."""
    if args.backend != "auto":
        return args.backend
    import importlib.util

    if importlib.util.find_spec("unsloth") is None or gpu_problem() is not None:
        return "cpu"
    return "local"


def make_backend(plan: ArtPlan, art_path: Path):
    """The one place a backend is built; tests of the GPU wiring pass a double through main(backend_factory=)."""
    if plan.backend == "local":
        import_art()
        from art.local import LocalBackend

        return LocalBackend(path=str(art_path))
    return art_cpu_backend.cpu_backend_class()(path=str(art_path), options=plan.engine_options)


# --------------------------------------------------------------------------------------
# Inference through the OpenAI-compatible server (sync: utils.Generator and validators are sync)
# --------------------------------------------------------------------------------------


def server_generator(model, name: str, args: ArtArgs, progress: bool = True, seed: int | None = None):
    """utils.Generator over the model's OpenAI-compatible server (vLLM under LocalBackend); with
    `seed`, conversation i is sampled with seed + i."""
    from hntitles.engines.openai_generator import OpenAIGenerator

    return OpenAIGenerator(model=name, base_url=model.inference_base_url, api_key=model.inference_api_key,
                           timeout=args.request_timeout, concurrency=args.concurrency, progress=progress, seed=seed)


def base_model_name(generator, wanted: str = "") -> str:
    """The served name of the base model: `wanted` if served, else the one root model listed.

    vLLM lists LoRA adapters with `parent` set to the base. ART 0.5.18 serves the base under
    an alias, `--served-model-name <name>@<step at start>`, not under its Hugging Face id, and
    loads the adapter of that step under the same name. On a fresh run that adapter is the
    untrained LoRA (= the base); after a resume it is a trained checkpoint, hence the warning.
    """
    models = list(generator.client.models.list())
    names = [m.id for m in models]
    if wanted:
        if wanted not in names:
            raise SystemExit(f"validator_model {wanted!r} is not served (served: {names})")
        return wanted
    roots = [m.id for m in models if getattr(m, "parent", None) is None]
    if len(roots) != 1:
        raise SystemExit(f"cannot tell the base model among {names}; set --validator_model")
    alias = roots[0]
    if alias in {m.id for m in models if getattr(m, "parent", None) is not None} and not alias.endswith("@0"):
        print(f"warning: the base model is served as {alias!r}, which is also a trained adapter's name; the "
              "validator may judge with that checkpoint (serve the base separately and pass --validator_model, "
              "or use validator=embedding)")
    return alias


def make_validator(recipe: Recipe, args: ArtArgs, model) -> Any:
    if recipe.validator == "embedding":
        return utils.EmbeddingValidator(recipe.validator_threshold)
    if recipe.validator == "none":
        return None
    probe = server_generator(model, "probe", args, progress=False)
    name = base_model_name(probe, args.validator_model)
    print(f"validator: base model served as {name!r}")
    return utils.LLMValidator(server_generator(model, name, args, progress=False))  # the server serves the base


# --------------------------------------------------------------------------------------
# Rollouts, rewards, groups
# --------------------------------------------------------------------------------------


async def rollout_group(client, model_name: str, row: dict, index: int, recipe: Recipe, step: int):
    """One request with n = num_generations; each choice (with its logprobs) is a trajectory.

    The request's sampling seed is a function of the recipe's seed, the step and the group
    (settings.derived_seed): a step's rollouts are the same whether or not the run was resumed
    before it (vLLM and the CPU engine both honour a request's seed). The reward starts as NaN,
    not 0.0: an unscored trajectory must never look like a score.
    """
    art = import_art()
    messages = utils.title_messages(row["scraped_body"])
    resp = await client.chat.completions.create(
        model=model_name, messages=messages, n=recipe.num_generations, max_tokens=recipe.max_completion_tokens,
        temperature=recipe.temperature, logprobs=True, seed=settings.derived_seed(recipe.seed, step, index),
        **({"stop": list(stop)} if (stop := utils.stop_strings(recipe)) else {}))
    trajectories = [art.Trajectory(messages_and_choices=[*messages, choice], reward=math.nan,
                                   metadata={"story_id": str(row.get("id"))})
                    for choice in sorted(resp.choices, key=lambda c: c.index)]
    # batch_index maps the group back to its story when failed groups were dropped
    return art.TrajectoryGroup(trajectories, metadata={"story_id": str(row.get("id")), "batch_index": index})


async def score_groups(groups, rows: Sequence[dict], reward: utils.RewardClient, validator,
                       recipe: Recipe) -> list[utils.Scored]:
    """Validator + ONE batched reward request for every completion of the step.

    A RewardServerError propagates: no trajectory of this step gets a reward, nothing trains.
    """
    flat_rows, texts, trajectories = [], [], []
    for group, row in zip(groups, rows, strict=True):
        for t in group.trajectories:
            flat_rows.append(row)
            texts.append(t.messages_and_choices[-1].message.content or "")
            trajectories.append(t)
    scored = await utils.score_completions(reward, validator, flat_rows, texts, recipe.trailing_penalty)
    for t, s in zip(trajectories, scored, strict=True):
        t.reward = s.reward
        t.metrics.update(rm=s.rm, matches=float(s.matches), length=float(s.length), copy=s.copy,
                         trailing=float(s.trailing))
    return scored


def split_teachable(groups) -> tuple[list, Counter]:
    """Groups that can teach (>= 2 trajectories, not all rewards equal) and why others cannot."""
    keep, dropped = [], Counter()
    for g in groups:
        rewards = [t.reward for t in g.trajectories]
        if len(rewards) < 2:
            dropped["fewer than 2 trajectories"] += 1
        elif max(rewards) - min(rewards) <= 1e-9:
            dropped["all rewards equal"] += 1
        else:
            keep.append(g)
    return keep, dropped


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def is_eval_step(step: int, recipe: Recipe) -> bool:
    return step == recipe.max_steps or (recipe.eval_every > 0 and step % recipe.eval_every == 0)


def checkpoints_dir(model) -> Path:
    """ART's checkpoint folders of `model` (checkpoints/NNNN, NNNN = ART's step)."""
    from art.utils.output_dirs import get_model_dir

    return Path(get_model_dir(model=model, art_path=model.base_path)) / "checkpoints"


def restore_point(run_dir: Path, model) -> int:
    """Make the run directory consistent before ART reads its step; returns the step it resumes after.

    ART's step is its newest numeric checkpoint folder. A checkpoint that cannot be loaded (a
    file cut short: rundir.folder_problem), or whose step has no metrics row (the process died
    between the two), is set aside, so that step is trained again; every step is a function of
    the seed and the step (Loop.run), so it is trained the same. Metrics rows and skipped steps
    past the resume point are dropped, so each step is logged once. NoIntactCheckpoint when
    there are checkpoints and none can be resumed.
    """
    folder = checkpoints_dir(model)
    found = sorted(((int(p.name), p) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
                   reverse=True) if folder.is_dir() else []
    rows = [r for r in rundir.read_metrics(run_dir)[0] if r["method"] == METHOD and r["split"] == "train"]
    logged = {r["extra"].get("art_step") for r in rows if not r["extra"].get("skipped")}

    def problem(path: Path) -> str | None:
        if not int(path.name):
            return rundir.folder_problem(path, rundir.ADAPTER_FILES)  # step 0: the untrained adapter
        if int(path.name) not in logged:
            return "its step has no metrics row: the process stopped between the checkpoint and the row"
        return rundir.folder_problem(path, rundir.ADAPTER_FILES)

    intact = rundir.newest_intact(found, problem, run_dir)
    art_step = intact[0] if intact else 0
    step = max((r["step"] for r in rows if (r["extra"].get("art_step") or 0) <= art_step), default=0)
    _, _, dropped = rundir.trim_metrics(run_dir, step, METHOD)
    state = model.read_state() or {}
    if state.get("skipped_steps"):
        model.merge_state({"skipped_steps": [s for s in state["skipped_steps"] if s <= step]})
    if dropped:
        print(f"[art] resuming after step {step} (ART step {art_step}): dropped {dropped} metrics rows past it")
    return step


class Loop:
    """State of one run: the model, its clients, the data and the metrics writer."""

    def __init__(self, recipe: Recipe, args: ArtArgs, plan: ArtPlan, run_dir: Path, train_rows: list[dict],
                 val_rows: list[dict], model, backend, reward: utils.RewardClient, validator,
                 stopper: runtime.StopOnSignal | None = None, tracker: tracking.Tracker | None = None):
        self.recipe, self.args, self.plan, self.run_dir = recipe, args, plan, run_dir
        self.stopper, self.tracker = stopper, tracker or tracking.Tracker()
        self.train_rows, self.val_rows = train_rows, val_rows
        self.model, self.backend, self.reward, self.validator = model, backend, reward, validator
        self.writer = rundir.MetricsWriter(run_dir)
        rows, _ = rundir.read_metrics(run_dir)
        self.logged = {(r["split"], r["step"]) for r in rows if r["method"] == METHOD}
        self.timer = rundir.Timer(max((r["wall_time"] for r in rows), default=0.0))

    def stopping(self) -> bool:
        return bool(self.stopper and self.stopper.received)

    async def done_steps(self) -> tuple[int, list[int]]:
        """Steps already consumed: ART's checkpoint step (trained) + the steps skipped untrained.

        Skipped steps are kept in ART's model state (state.json) because they leave no
        checkpoint; without them a resume would replay the batch that could not teach.
        """
        skipped = list((self.model.read_state() or {}).get("skipped_steps", []))
        return await self.model.get_step() + len(skipped), skipped

    async def run(self) -> None:
        art = import_art()
        from art.utils import iterate_dataset
        from tqdm.auto import tqdm

        recipe = self.recipe
        done, skipped = await self.done_steps()
        self.tracker.start(done + 1)
        if (folder := checkpoints_dir(self.model) / f"{await self.model.get_step():04d}").is_dir():
            model_card.write(folder, self.run_dir, METHOD, done)  # ART's step-0 adapter too, over PEFT's template
        if done:
            print(f"resuming after step {done} (ART step {done - len(skipped)}, {len(skipped)} skipped)")
            if is_eval_step(done, recipe) and ("val", done) not in self.logged:
                await self.validate(done)  # the run stopped between training and validating
        if done >= recipe.max_steps:
            print(f"nothing to do: {done} of max_steps={recipe.max_steps} steps are done")
            if not rundir.final_complete(self.run_dir):
                await self.save_final()
            return
        steps_per_epoch = math.ceil(len(self.train_rows) / recipe.prompts_per_step)
        # ART's iterate_dataset shuffles each epoch by the epoch number alone; the stories are put in
        # an order of the recipe's seed first, so the seed drives the story order (as it does TRL's).
        stories = list(self.train_rows)
        random.Random(recipe.seed).shuffle(stories)
        batches = iterate_dataset(stories, groups_per_step=recipe.prompts_per_step,
                                  num_epochs=math.ceil(recipe.max_steps / steps_per_epoch),
                                  initial_step=done, use_tqdm=False)
        bar = tqdm(total=recipe.max_steps, initial=done, desc="art steps", unit="step")
        for batch in batches:
            step = batch.step + 1
            if step > recipe.max_steps or self.stopping():
                break
            # Everything random in the step (ART's shuffles while tokenizing and packing, dropout) is a
            # function of the seed and the step: a resumed run takes the uninterrupted run's steps.
            settings.set_seed(settings.derived_seed(recipe.seed, step))
            inference_name = self.model.get_inference_name()
            t0, self.cpu0 = time.perf_counter(), time.process_time()
            groups = await art.gather_trajectory_groups(
                (rollout_group(self.model.openai_client(), inference_name, row, i, recipe, step)
                 for i, row in enumerate(batch.items)),
                pbar_desc=f"rollouts step {step}", max_exceptions=self.args.max_exceptions,
                max_metrics=0)  # the unscored rewards are NaN: keep them out of the bar
            row = await self.train_step(step, batch, groups, inference_name, t0)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", match=f"{row['match_rate']:.2f}",
                            trained=row["extra"]["trainable_groups"])
            if is_eval_step(step, recipe) and not self.stopping():  # a resume validates it first
                await self.validate(step)
        bar.close()
        await self.save_final()

    async def save_final(self) -> None:
        """final/: the newest checkpoint's adapter and its card, once max_steps are done (as the TRL trainer's)."""
        done, _ = await self.done_steps()
        folder = checkpoints_dir(self.model) / f"{await self.model.get_step():04d}"
        if done >= self.recipe.max_steps and not self.stopping() and (folder / "adapter_config.json").exists():
            print(f"adapter -> {model_card.save_final(self.run_dir, folder, METHOD, done)}")

    async def train_step(self, step: int, batch, groups, inference_name: str, t0: float) -> dict:
        """Score, keep the groups that can teach, train (or skip, saying why), write the row."""
        from tqdm.auto import tqdm

        rollout_s = time.perf_counter() - t0
        rows = [batch.items[int(g.metadata["batch_index"])] for g in groups]
        scored = await score_groups(groups, rows, self.reward, self.validator, self.recipe)
        reward_s = time.perf_counter() - t0 - rollout_s
        keep, dropped = split_teachable(groups)
        choices = [t.messages_and_choices[-1] for g in groups for t in g.trajectories]
        tokens = [len(c.logprobs.content or []) if c.logprobs else 0 for c in choices]
        # Same extras as the TRL trainer where they mean the same (compare.py reads them).
        extra: dict[str, Any] = {
            "epoch": batch.epoch, "stories": [str(r.get("id")) for r in batch.items], "groups": len(groups),
            "trainable_groups": len(keep), "dropped_groups": dict(dropped),
            "failed_groups": len(batch.items) - len(groups), "model": self.recipe.model, "policy": inference_name,
            "completion_tokens_mean": sum(tokens) / max(len(tokens), 1),
            "hit_token_cap": sum(c.finish_reason == "length" for c in choices) / max(len(choices), 1),
            "rollout_seconds": round(rollout_s, 3), "reward_seconds": round(reward_s, 3),
            "reward_requests": self.reward.stats.get("requests", 0)}
        if getattr(self.validator, "unparsed", None) is not None:
            extra["validator_unparsed"] = self.validator.unparsed
        if not keep:
            reason = ("no group can teach: " + ", ".join(f"{k}: {v}" for k, v in dropped.items())
                      if dropped else "every rollout group failed")
            _, skipped = await self.done_steps()
            # Recorded before the metrics row: a crash in between loses a row, never duplicates one.
            self.model.merge_state({"skipped_steps": [*skipped, step]})
            extra.update(skipped=reason, art_step=await self.model.get_step())
            tqdm.write(f"step {step}: skipped ({reason})")
        else:
            if not all(math.isfinite(t.reward) for g in keep for t in g.trajectories):
                raise RuntimeError(f"step {step}: a trajectory has no reward; refusing to train on it")
            result = await self.backend.train(self.model, keep, **self.plan.train_kwargs)
            if (folder := checkpoints_dir(self.model) / f"{result.step:04d}").is_dir():
                model_card.write(folder, self.run_dir, METHOD, step)  # over PEFT's empty template
            await self.model.log(groups, split="train", metrics=dict(result.metrics), step=result.step)
            extra.update(art_step=result.step, train_metrics=dict(result.metrics),
                         loss=result.metrics.get("loss/train", result.metrics.get("loss")))
        extra["step_seconds"] = round(time.perf_counter() - t0, 3)
        # CPU seconds of this process (the CPU engine's server and trainer run in it), as the TRL trainer logs them
        extra["step_cpu_seconds"] = round(time.process_time() - getattr(self, "cpu0", time.process_time()), 3)
        row = utils.metrics_row(method=METHOD, step=step, split="train", scored=scored, wall_time=self.timer(),
                                run=self.run_dir.name, extra=extra)
        self.writer.write(row)
        self.logged.add(("train", step))
        teach = {id(g) for g in keep}
        rollouts = completions.records(
            method=METHOD, step=step, story_ids=[g.metadata["story_id"] for g in groups for _ in g.trajectories],
            completions=[c.message.content or "" for c in choices], scored=scored, tokens=tokens,
            # ART's own advantages (a group that cannot teach is dropped: 0), scaled as plan.train_kwargs asks
            advantages=[a for g in groups for a in (
                completions.art_advantages([t.reward for t in g.trajectories], self.args.scale_rewards)
                if id(g) in teach else [0.0] * len(g.trajectories))],
            group_size=self.recipe.num_generations)
        completions.write_step(self.run_dir, step, rollouts)
        self.tracker.log_row(row)
        self.tracker.log_optimizer(step, extra.get("train_metrics") or {})
        self.tracker.log_rollouts(step, rollouts)
        return row

    async def validate(self, step: int) -> dict:
        """The TRL trainer's validation (evaluation.evaluate_generator) on the current checkpoint."""
        t0 = time.perf_counter()
        art_step = await self.model.get_step()
        name = self.model.get_inference_name()
        generator = server_generator(self.model, name, self.args,
                                     seed=settings.derived_seed(self.recipe.seed, "val", step))
        result = await evaluation.evaluate_generator(
            generator, self.val_rows, self.reward, self.validator, self.recipe.eval_samples,
            self.recipe.max_completion_tokens, self.recipe.temperature, self.recipe.trailing_penalty,
            utils.stop_strings(self.recipe))
        row = evaluation.eval_metrics_row(result, method=METHOD, step=step, wall_time=self.timer(),
                                          run=self.run_dir.name,
                                          extra={"art_step": art_step, "model": self.recipe.model, "policy": name,
                                                 "eval_seconds": round(time.perf_counter() - t0, 1)})
        path = evaluation.write_eval(self.run_dir, f"step-{step:05d}", result, row)
        self.logged.add(("val", step))
        # history.jsonl is keyed by ART's step (= checkpoint number): delete_checkpoints reads
        # the best val/reward from it, so the val metrics describe that checkpoint.
        await self.model.log(split="val", step=art_step, metrics={
            "reward": row["reward_mean"], "greedy_reward": row["extra"]["greedy_reward_mean"],
            "match_rate": row["match_rate"], "title_len": row["title_len_mean"], "copy_frac": row["copy_frac_mean"]})
        self.tracker.log_row(row)
        if self.args.keep_best:
            await self.model.delete_checkpoints(best_checkpoint_metric="val/reward")
        print(f"[val step {step}] {evaluation.eval_summary(result)} -> {path}")
        return row


def cli(argv: Sequence[str] | None = None) -> int:
    """Parse `--recipe` + flags (settings.parse_args) and train; returns the exit code."""
    recipe, args = settings.parse_args((Recipe, ArtArgs), METHOD, argv, description=__doc__.splitlines()[0])
    return main(recipe, args)


if __name__ == "__main__":
    sys.exit(cli())
