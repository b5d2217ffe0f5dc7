"""An experiment's stages, shared by the demo (one seed) and the study (several): which methods and
settings exist, where each run writes, and how a method is trained and evaluated.

- `METHODS` (trl, art), `SETTINGS` (`defaults`, `aligned`) with their ART-only flags and titles;
- `load_recipe`, `run_names` (base-<recipe>, <method>-<recipe>[-<setting>][-s<seed>]),
  `curve_flags`, `check_data`;
- `MethodRun`, `train_method` (a trainer as a child process, its output streamed to a log; a
  failure is recorded with its exit code and last line, never raised), `evaluate_method` (the
  full-protocol evaluation of the newest adapter that loads, into <run>/demo-eval),
  `evaluate_policy`, `write_curve_baseline`, `find_checkpoint`, `trained_steps`;
- `server_url` (a running reward server, or one started and always stopped), `Stages` (wall and
  CPU time per stage), `machine_note`.

    python demo.py --recipe recipes/tiny.yaml --fresh      # the stages, one seed
    python study.py --recipe recipes/tiny.yaml --seeds 2   # the stages, two seeds
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import math
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import utils
from hntitles.analysis import evaluation
from hntitles.runs import procs, rundir, settings, tracking

ROOT = settings.ROOT
AFTER_DIR = "demo-eval"  # <run dir>/demo-eval: the demo's evaluation of the final adapter
REFERENCE_LABEL = "reference"  # <base dir>/eval/reference.jsonl: the real titles, scored
OPENAI_LABEL = "openai"  # <base dir>/eval/openai.jsonl: a prompted endpoint's titles (optional)
CURVE_LABEL = "before-greedy"  # the baseline's greedy titles: the in-training curve's protocol


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    script: str
    args: tuple[str, ...] = ()


METHODS = {
    "trl": Method("trl", "TRL GRPOTrainer", "reference_grpo_trainer.py"),
    "art": Method("art", "ART loop (CPU engine)", "train.py", ("--backend", "cpu")),
}

# `aligned`: one optimizer configuration for both. TRL cannot take one step per trajectory
# (reference_grpo_trainer.optimizer_kwargs refuses it), so both take one per GRPO step, with
# TRL's CPU optimizer (torch AdamW, no weight decay, betas 0.9 / 0.999).
SETTINGS: dict[str, dict[str, str]] = {
    "defaults": {},
    "aligned": {"optimizer": "adamw", "weight_decay": "0.0", "adam_beta1": "0.9", "adam_beta2": "0.999",
                "optimizer_steps": "per_step"},
}
# ART-only flags of a setting. `aligned` packs each group into one row, prompt stored once (a step costs
# what TRL's shared-prefix step costs), scores ART's tokens at the sampling temperature and weighs every
# completion token of a step the same, as TRL's CISPO does (ART scores at temperature 1 and weighs each
# trajectory's tokens 1 / its length, packed or not). update_parity measures what each changes in one update.
SETTING_ART_FLAGS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "aligned": ("--pack_groups", "true", "--score_temperature", "true", "--token_level_loss", "true")}
SETTING_TITLES = {"defaults": "framework defaults (each library as a user gets it)",
                  "aligned": "aligned (same optimizer, weight decay, betas, one optimizer step per GRPO step; "
                             "ART packs each group into one row, scores tokens at the sampling temperature and "
                             "weighs every completion token the same, as TRL)"}





def load_recipe(path: str, overrides: dict[str, str] | None = None) -> settings.Recipe:
    """The recipe as evaluate.py and the trainers resolve it (YAML + environment + the setting's flags)."""
    argv = ["--recipe", path] + [a for k, v in (overrides or {}).items() for a in (f"--{k}", v)]
    (recipe,) = settings.parse_args((settings.Recipe,), "eval", argv)
    return recipe


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise SystemExit(f"--methods {text!r}: give one or more of {', '.join(METHODS)}, comma-separated, once each")
    return methods


def run_names(recipe_path: str, setting: str = "defaults", seed: int | None = None) -> dict[str, str]:
    """Run directory names: base-<recipe>, <method>-<recipe>[-<setting>][-s<seed>], demo-<recipe>[-<setting>],
    study-<recipe>[-<setting>]. `seed` is a training seed other than the recipe's (the recipe's seed
    trains the demo's runs, which a study reuses).

    >>> run_names("recipes/cpu.yaml", "aligned", 43)["trl"], run_names("recipes/cpu.yaml")["art"]
    ('trl-cpu-aligned-s43', 'art-cpu')
    """
    stem = Path(recipe_path).stem
    tag = "" if setting == "defaults" else f"-{setting}"
    runs = "" if seed is None else f"-s{seed}"
    return {"base": f"base-{stem}", "demo": f"demo-{stem}{tag}", "study": f"study-{stem}{tag}",
            **{m: f"{m}-{stem}{tag}{runs}" for m in METHODS}}


def curve_flags(recipe: settings.Recipe, points: int) -> list[str]:
    """Trainer flags for the in-training curve: `points` validations on greedy titles only."""
    if points <= 0:
        return []
    every = max(1, math.ceil(recipe.max_steps / points))
    return ["--eval_every", str(every), "--eval_samples", "0"]


def trainer_flags(setting: str, recipe: settings.Recipe, curve_points: int, extra: str = "",
                  report_to: str = "") -> list[str]:
    """Both trainers' flags: the setting's recipe overrides, the curve's validations, the tracker
    (`report_to`, "" = the recipe's), then `extra`."""
    if report_to and report_to not in tracking.REPORT_TO:
        raise SystemExit(f"--report_to {report_to!r}: use one of {', '.join(tracking.REPORT_TO)}")
    flags = [a for k, v in SETTINGS[setting].items() for a in (f"--{k}", v)]
    tracker = ["--report_to", report_to] if report_to else []
    return flags + curve_flags(recipe, curve_points) + tracker + shlex.split(extra)


def method_flags(method: str, setting: str, own: str = "") -> list[str]:
    """One method's own flags: the setting's ART-only ones for ART, then `own`."""
    return [*(SETTING_ART_FLAGS[setting] if method == "art" else ()), *shlex.split(own)]


def check_data(recipe: settings.Recipe) -> dict[str, int]:
    """Both splits loaded and filtered as the trainers do (utils.load_split; `make check` reports
    more); fail if training or validation cannot work. Returns the stories used per split."""
    from transformers import AutoTokenizer

    with settings.hub_errors(recipe.model):
        tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    used = {}
    for split, limit, need in ((recipe.train_split, recipe.max_train_stories, recipe.prompts_per_step),
                               (recipe.val_split, recipe.max_val_stories, 2)):
        ds, report = utils.load_split(recipe, split, tokenizer, limit)
        used[split] = len(ds)
        print(f"{report.summary()}; {used[split]} used")
        if used[split] < need:
            raise utils.DatasetError(f"{recipe.dataset}: split '{split}' has {used[split]} usable stories, "
                                     f"needs {need}")
    return used


def evaluate_policy(recipe: settings.Recipe, run_name: str, label: str, method: str, step: int, adapter: str = ""):
    """`make eval`'s procedure (policy.evaluate_policy: the trainers' validation) into runs/<run_name>."""
    from hntitles.engines import policy

    recipe = dataclasses.replace(copy.deepcopy(recipe), run_name=run_name)
    result, path = policy.evaluate_policy(recipe, adapter, label, method, step)
    print(f"[{label}] {evaluation.eval_summary(result)}\ntitles -> {path}")
    return result


def evaluate_reference(recipe: settings.Recipe, run_name: str) -> evaluation.EvalResult:
    """The val stories' real titles through the same validator, reward server and rule (policy.evaluate_reference)
    into runs/<run_name>/eval/reference.jsonl: the reports' reference row."""
    from hntitles.engines import policy

    result = policy.evaluate_reference(dataclasses.replace(copy.deepcopy(recipe), run_name=run_name), REFERENCE_LABEL)
    print(f"[{REFERENCE_LABEL}] real titles: {evaluation.eval_summary(result)}")
    return result


def read_references(base_dir: Path) -> dict[str, evaluation.EvalResult]:
    """The reference evaluations beside the untrained model's: the real titles (always written by the
    demo and the study) and a prompted endpoint's (eval/openai.jsonl, when a user ran evaluate.py for it)."""
    found = {label: evaluation.read_eval(base_dir, label) for label in (REFERENCE_LABEL, OPENAI_LABEL)}
    return {label: r for label, r in found.items() if r is not None}


def evaluated_adapter(run_dir: Path) -> str | None:
    """The adapter whose full-protocol evaluation is in <run_dir>/demo-eval (its metrics row says), or None."""
    if not (run_dir / AFTER_DIR / "eval" / "after.jsonl").exists():
        return None
    found = [r for r in rundir.read_metrics(run_dir / AFTER_DIR)[0] if r["split"] == "val"]
    return (found[-1]["extra"] or {}).get("adapter") if found else None


def write_curve_baseline(base_dir: Path, before: evaluation.EvalResult, model: str = "") -> None:
    """The untrained model's greedy titles as their own row, so the curves have a baseline band
    on their own protocol (greedy decoding is deterministic: no second generation needed)."""
    result = evaluation.greedy_only(before)
    row = evaluation.eval_metrics_row(result, method="base", step=0, wall_time=0.0, run=base_dir.name,
                                 extra={"label": CURVE_LABEL, "derived_from": "before", "model": model})
    evaluation.write_eval(base_dir, CURVE_LABEL, result, row)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest adapter folder of a run that loads: TRL's checkpoint-N, or ART's checkpoints/NNNN
    (any depth); a newer one that does not load (rundir.adapter_problem) is passed over, said."""
    def step_of(p: Path) -> int | None:
        tail = p.name.split("-")[-1]
        return int(tail) if tail.isdigit() and (p.name.isdigit() or p.name.startswith("checkpoint-")) else None

    found = [p.parent for p in run_dir.rglob("adapter_config.json")
             if step_of(p.parent) is not None and AFTER_DIR not in p.parts]
    for path in sorted(found, key=lambda p: (step_of(p), str(p)), reverse=True):
        if (problem := rundir.adapter_problem(path)) is None:
            return path
        print(f"[demo] passing over {path}: its adapter cannot be loaded ({problem})", flush=True)
    return None


def trained_steps(run_dir: Path, method: str) -> int:
    """The last step the run logged (its train rows; an ART step skipped untrained counts too)."""
    rows, _ = rundir.read_metrics(run_dir)
    return max((r["step"] for r in rows if r["split"] == "train" and r["method"] == method), default=0)


@dataclass
class MethodRun:
    """One method's part of the demo: training outcome, evaluation, cost."""

    method: Method
    run_dir: Path
    code: int | None = None       # the trainer's exit code (None: not run)
    error: str = ""               # why it failed; empty when it finished
    step: int = 0                 # last step logged
    checkpoint: Path | None = None
    result: evaluation.EvalResult | None = None
    train_wall: float = 0.0       # this invocation's training stage
    train_cpu: float = 0.0
    reused: bool = False          # the run had all its steps before this invocation: nothing was trained

    @property
    def ok(self) -> bool:
        return not self.error and self.result is not None


TRAINER_EXITS = {3: "the reward server failed; no reward was made up",
                 75: "interrupted; a checkpoint was saved, rerun to resume"}


def exit_reason(code: int) -> str:
    """A signal's name for a negative exit code (SIGKILL without a Ctrl-C is usually the OOM killer)."""
    if code >= 0:
        return ""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"killed by {name}" + (" (out of memory? the kernel's OOM killer sends it)"
                                  if -code == signal.SIGKILL else "")


def last_line(log: Path) -> str:
    """The log's last non-empty line (usually the trainer's one-line error), without progress bars."""
    lines = [ln.strip() for raw in procs.tail(log, 40).splitlines() for ln in raw.split("\r")]
    lines = [ln for ln in lines if ln and not ("%|" in ln and "it/s" in ln or "it]" in ln)]
    return lines[-1][:300] if lines else "no output"


def recorded_train_seconds(run_dir: Path, method: str) -> float:
    """How long the run took when it trained: its last metrics row's wall time (training and its validations)."""
    rows, _ = rundir.read_metrics(run_dir)
    return max((float(r["wall_time"]) for r in rows if r["method"] == method), default=0.0)


def train_method(mr: MethodRun, recipe_path: str, url: str, flags: Sequence[str], max_steps: int) -> None:
    """Run the method's trainer to the end; on failure record why (the demo goes on)."""
    script = ROOT / mr.method.script
    cmd = [sys.executable, str(script), "--recipe", recipe_path, "--reward_url", url,
           "--run_name", mr.run_dir.name, *mr.method.args, *flags]
    print("$ " + shlex.join(cmd), flush=True)
    mr.run_dir.mkdir(parents=True, exist_ok=True)
    mr.reused = trained_steps(mr.run_dir, mr.method.name) >= max_steps
    mr.code = procs.stream(cmd, mr.run_dir / "demo_train.log") if script.exists() else 127
    mr.step = trained_steps(mr.run_dir, mr.method.name)
    mr.checkpoint = find_checkpoint(mr.run_dir)
    log = mr.run_dir / "demo_train.log"
    if mr.code != 0:
        why = TRAINER_EXITS.get(mr.code, f"{script.name} not found" if mr.code == 127 else
                                exit_reason(mr.code) or last_line(log))
        mr.error = f"training failed at step {mr.step} of {max_steps} (exit {mr.code}: {why}); log: {log}"
    elif mr.checkpoint is None:
        mr.error = f"training finished but {mr.run_dir} holds no adapter checkpoint; log: {log}"
    elif mr.step < max_steps:
        mr.error = f"training stopped at step {mr.step} of {max_steps} (exit 0); log: {log}"
    if mr.error:
        print(f"\n[{mr.method.name}] {mr.error}", flush=True)


def evaluate_method(mr: MethodRun, recipe: settings.Recipe, reuse: bool = False) -> None:
    """The full-protocol evaluation of the method's newest adapter; a failure is recorded, not raised.

    `reuse`: an evaluation already on disk of this same adapter is read back instead (a study
    resumed, or a study after the demo: the evaluation is deterministic, the same titles and rewards).
    """
    if reuse and (done := evaluated_adapter(mr.run_dir)) == str(mr.checkpoint):
        mr.result = evaluation.read_eval(mr.run_dir / AFTER_DIR, "after")
        print(f"[{mr.method.name}] {done} evaluated before: {evaluation.eval_summary(mr.result)}", flush=True)
        return
    # Its own run dir inside the training run: the trainer already logged a val row at this step.
    shutil.rmtree(mr.run_dir / AFTER_DIR, ignore_errors=True)  # redone, like the baseline
    try:
        mr.result = evaluate_policy(recipe, f"{mr.run_dir.name}/{AFTER_DIR}", "after", mr.method.name, mr.step,
                                    adapter=str(mr.checkpoint))
    except (Exception, SystemExit) as e:  # one method's broken adapter must not cost the other's report
        mr.error = f"evaluation of {mr.checkpoint} failed: {type(e).__name__}: {e}"
        print(f"\n[{mr.method.name}] {mr.error}", flush=True)


def machine_note(load_before: tuple[float, ...]) -> str:
    load_after = os.getloadavg()
    return (f"Machine: {os.cpu_count()} cores, load average {load_before[0]:.1f} at the start and "
            f"{load_after[0]:.1f} at the end (1-min); `make setup` time is not included. "
            f"Finished {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}.")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the trainers): a load-independent cost."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


class Stages:
    """Wall and CPU time per stage, printed as each one starts and ends."""

    def __init__(self, total: int):
        self.total, self.done, self.cpu = total, [], []

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"\n=== [{len(self.done) + 1}/{self.total}] {name} ===", flush=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            self.done.append((name, time.perf_counter() - t0))
            self.cpu.append(cpu_seconds() - c0)
            print(f"=== {name}: {self.done[-1][1]:.0f}s (CPU {self.cpu[-1]:.0f}s) ===", flush=True)

    def reused(self, mr: MethodRun) -> None:
        """The last stage trained nothing (its run was complete): it shows what the run cost when it trained,
        marked reused, instead of the seconds this rerun spent finding that out (CPU: not recorded)."""
        if mr.reused and not mr.error:
            name, _ = self.done[-1]
            self.done[-1] = (f"{name} (reused: its time when it trained)", recorded_train_seconds(mr.run_dir,
                                                                                                mr.method.name))
            self.cpu[-1] = float("nan")


@contextlib.contextmanager
def server_url(reward_url: str, server_args: str, timeout: float, log: Path) -> Iterator[str]:
    """The reward server's URL: the running one given, or one started (and always stopped) here."""
    if reward_url:
        url = reward_url.rstrip("/")
        health = procs.wait_healthy(url, timeout=10.0)
        print(f"using the running server at {url}: {health}")
        yield url
        return
    with procs.reward_server(log, timeout, shlex.split(server_args)) as (url, health):
        print(f"started local_reward.py at {url} (log {log}): {health}")
        yield url
