"""The main job: TRL and ART trained on one recipe, measured on the same stories, explained side by side.

`make demo` runs this after `make setup`. The stages, each timed (wall and CPU seconds):

1. reward server: start `local_reward.py` on a free loopback port and wait for GET /health
   (or, with --reward_url, use a server that is already running and healthy). A server the
   demo started is always stopped at the end, also on failure, Ctrl-C or SIGTERM;
2. data: load and filter the train and val splits exactly as a trainer would, and report them;
3. baseline: evaluate the untrained model on val (evaluate.py: greedy + eval_samples sampled
   titles per story, the trainers' validation code) -> runs/base-<recipe>;
4. train each method (--methods, default both), output streamed and kept in <run>/demo_train.log:
   TRL = `reference_grpo_trainer.py` -> runs/trl-<recipe>, ART = `train.py --backend cpu` (ART's
   loop on the CPU engine) -> runs/art-<recipe>. Both validate every max_steps/curve_points steps
   on greedy titles only (a cheap curve; the full protocol costs ~5x more) for `make compare`;
5. evaluate each trained adapter (its newest checkpoint) with the full protocol: the same
   stories, samples per story and seed as the baseline -> <run>/demo-eval;
6. report -> runs/demo-<recipe>/demo_report.md and compare.png: each method's gain over the
   untrained model and ART - TRL, each a paired bootstrap 95% interval over stories; ROUGE-L to
   the real titles and the top template's share (the reward sees neither), copy fraction, title
   length, match rate; cost per step (wall and CPU seconds, optimizer steps, trained tokens);
   titles side by side; the curves; what differs between the two libraries' GRPO
   (grpo_semantics.py) and which setting ran.

Settings (--setting): `defaults` runs each library as a user gets it (the recipe's optimizer
knobs left empty); `aligned` (the default) sets the same optimizer, weight decay, betas and one
optimizer step per GRPO step on both, packs each ART group into one row, scores ART's tokens at
the sampling temperature and weighs every completion token the same, as TRL does (SETTINGS and
SETTING_ART_FLAGS below); it writes to
runs/<method>-<recipe>-aligned. `defaults` costs ~2.5x more ART time on a CPU (8 full-prompt rows
and 8 optimizer steps per GRPO step, as LocalBackend does).

A method that fails mid-run does not stop the demo: the report says which, why (exit code,
log) and how far it got, and compares what finished. A rerun resumes every method from its
last checkpoint (a finished run is not retrained); the evaluations are redone. --fresh deletes
the demo's run directories first. Exit code: 0, or 1 when a method failed (or, with --strict,
when a method is not measurably better than the untrained model).

    python demo.py                                       # recipes/cpu.yaml, both methods, aligned
    python demo.py --setting defaults                    # each library as a user gets it
    python demo.py --methods trl                         # one method
    python demo.py --fresh                               # retrain from scratch
    python demo.py --reward_url http://127.0.0.1:7000    # score with an already running `make reward`
    python demo.py --recipe recipes/tiny.yaml --fresh    # every stage in a few minutes (learns nothing)
    python demo.py --threads 1                           # on a machine shared with other jobs
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
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import comparison
import evaluation
import grpo_semantics
import procs
import rundir
import settings
import utils

ROOT = settings.ROOT
REPORT_FILE = "demo_report.md"
AFTER_DIR = "demo-eval"  # <run dir>/demo-eval: the demo's evaluation of the final adapter
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
# trajectory's tokens 1 / its length, packed or not). update_parity.py measures what each changes in one update.
SETTING_ART_FLAGS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "aligned": ("--pack_groups", "true", "--score_temperature", "true", "--token_level_loss", "true")}
SETTING_TITLES = {"defaults": "framework defaults (each library as a user gets it)",
                  "aligned": "aligned (same optimizer, weight decay, betas, one optimizer step per GRPO step; "
                             "ART packs each group into one row, scores tokens at the sampling temperature and "
                             "weighs every completion token the same, as TRL)"}


@dataclass
class DemoArgs:
    recipe: str = field(default="recipes/cpu.yaml", metadata={"help": "Recipe YAML shared by training and evaluation."})
    methods: str = field(default="trl,art", metadata={"help": "Comma-separated methods to train: trl, art."})
    setting: str = field(default="aligned", metadata={
        "help": "'defaults' (each library's own optimizer settings) or 'aligned' (the same optimizer, weight decay, "
                "betas and optimizer steps per batch on both)."})
    fresh: bool = field(default=False, metadata={"help": "Delete the demo's run directories first (default: resume)."})
    curve_points: int = field(default=3, metadata={
        "help": "Validations during training (every ceil(max_steps / N) steps), greedy titles only; 0 = the recipe's "
                "eval_every and eval_samples."})
    reward_url: str = field(default="", metadata={
        "help": "Use this already running reward server (must answer /health) instead of starting one."})
    server_args: str = field(default="", metadata={"help": "Extra flags for local_reward.py (e.g. '--rm_path dir')."})
    server_timeout: float = field(default=300.0, metadata={"help": "Seconds to wait for the started server's /health."})
    trainer_args: str = field(default="", metadata={"help": "Extra flags for both trainers (e.g. '--max_steps 10')."})
    trl_args: str = field(default="", metadata={
        "help": "Extra flags for the TRL trainer only (e.g. '--gradient_checkpointing true': the same math in a "
                "fraction of the memory, slower)."})
    art_args: str = field(default="", metadata={
        "help": "Extra flags for the ART trainer only (e.g. '--pack_groups true')."})
    threads: int = field(default=0, metadata={
        "help": "Torch CPU threads for evaluation and training (0 = torch's default, one per core). On a machine "
                "busy with other jobs, 1 avoids threads waiting on each other and is often several times faster."})
    show_titles: int = field(default=5, metadata={"help": "Val stories whose titles the report shows."})
    report_only: bool = field(default=False, metadata={
        "help": "Train and evaluate nothing: rebuild the report and plot from the evaluations already on disk "
                "(runs/base-<recipe>/eval/before.jsonl, <run>/demo-eval/eval/after.jsonl)."})
    strict: bool = field(default=False, metadata={
        "help": "Exit 1 unless every method is measurably better than the untrained model (interval above 0)."})


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------


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


def run_names(recipe_path: str, setting: str = "defaults") -> dict[str, str]:
    """Run directory names: base-<recipe>, <method>-<recipe>[-<setting>], demo-<recipe>[-<setting>]."""
    stem = Path(recipe_path).stem
    tag = "" if setting == "defaults" else f"-{setting}"
    return {"base": f"base-{stem}", "demo": f"demo-{stem}{tag}", **{m: f"{m}-{stem}{tag}" for m in METHODS}}


def curve_flags(recipe: settings.Recipe, points: int) -> list[str]:
    """Trainer flags for the in-training curve: `points` validations on greedy titles only."""
    if points <= 0:
        return []
    every = max(1, math.ceil(recipe.max_steps / points))
    return ["--eval_every", str(every), "--eval_samples", "0"]


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
    import policy

    recipe = dataclasses.replace(copy.deepcopy(recipe), run_name=run_name)
    result, path = policy.evaluate_policy(recipe, adapter, label, method, step)
    print(f"[{label}] {evaluation.eval_summary(result)}\ntitles -> {path}")
    return result


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


def train_method(mr: MethodRun, recipe_path: str, url: str, flags: Sequence[str], max_steps: int) -> None:
    """Run the method's trainer to the end; on failure record why (the demo goes on)."""
    script = ROOT / mr.method.script
    cmd = [sys.executable, str(script), "--recipe", recipe_path, "--reward_url", url,
           "--run_name", mr.run_dir.name, *mr.method.args, *flags]
    print("$ " + shlex.join(cmd), flush=True)
    mr.run_dir.mkdir(parents=True, exist_ok=True)
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


def evaluate_method(mr: MethodRun, recipe: settings.Recipe) -> None:
    """The full-protocol evaluation of the method's newest adapter; a failure is recorded, not raised."""
    # Its own run dir inside the training run: the trainer already logged a val row at this step.
    shutil.rmtree(mr.run_dir / AFTER_DIR, ignore_errors=True)  # redone on every run, like the baseline
    try:
        mr.result = evaluate_policy(recipe, f"{mr.run_dir.name}/{AFTER_DIR}", "after", mr.method.name, mr.step,
                                    adapter=str(mr.checkpoint))
    except (Exception, SystemExit) as e:  # one method's broken adapter must not cost the other's report
        mr.error = f"evaluation of {mr.checkpoint} failed: {type(e).__name__}: {e}"
        print(f"\n[{mr.method.name}] {mr.error}", flush=True)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


@dataclass
class Summary:
    """Everything the report shows; main() returns it."""

    recipe: settings.Recipe
    recipe_path: str
    setting: str
    before: evaluation.EvalResult
    runs: list[MethodRun]
    gains: dict[str, comparison.Comparison] = field(default_factory=dict)
    art_vs_trl: comparison.Comparison | None = None
    stages: list[tuple[str, float]] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    machine: str = ""
    curve: str = ""                 # how the in-training curve was validated
    pngs: list[Path] = field(default_factory=list)
    report_path: Path | None = None

    @property
    def failed(self) -> list[MethodRun]:
        return [mr for mr in self.runs if not mr.ok]


def compute(summary: Summary) -> Summary:
    """Each finished method vs the untrained model, and ART - TRL when both finished."""
    done = {mr.method.name: mr for mr in summary.runs if mr.ok}
    summary.gains = {m: comparison.compare(summary.before, mr.result) for m, mr in done.items()}
    if "trl" in done and "art" in done:
        summary.art_vs_trl = comparison.compare(done["trl"].result, done["art"].result)
    return summary


def _header(s: Summary) -> list[str]:
    r = s.recipe
    overrides = SETTINGS[s.setting]
    knobs = ", ".join(f"`{k}: {v}`" for k, v in overrides.items()) or "none: every optimizer knob left to each library"
    return [
        f"# Demo report: {', '.join(mr.method.title for mr in s.runs)} on {Path(s.recipe_path).name}", "",
        f"Setting: **{SETTING_TITLES[s.setting]}**; recipe overrides: {knobs}.", "",
        f"Model `{r.model}`, {r.max_steps} GRPO steps of {r.prompts_per_step} x {r.num_generations} completions, "
        f"lr {r.learning_rate:g}, loss {r.loss_type}, beta {r.beta:g}, LoRA r{r.lora_r}/a{r.lora_alpha}. "
        f"Evaluation: {len(s.before.rows)} val stories x {1 + r.eval_samples} titles (1 greedy + {r.eval_samples} "
        f"sampled at T={r.temperature}, <= {r.max_completion_tokens} tokens), validator `{r.validator}`, seed "
        f"{r.seed}, the same stories, samples per story and seed for every policy. Intervals: paired bootstrap "
        "95% over stories.", ""]


def _gains(s: Summary) -> list[str]:
    lines = ["## Gains", "", "| method | steps | val reward: untrained -> trained | gain [95% interval] | "
             "stories better / worse | ROUGE-L gain [95% interval] |", "|---|---|---|---|---|---|"]
    for mr in s.runs:
        c = s.gains.get(mr.method.name)
        if c is None:
            lines.append(f"| {mr.method.title} | {mr.step} | **failed** (see below) | n/a | n/a | n/a |")
            continue
        lines.append(f"| {mr.method.title} | {mr.step} | {c.before['reward_mean']:.3f} -> {c.after['reward_mean']:.3f} "
                     f"| **{comparison.interval(c.diff, c.lo, c.hi)}** | {c.improved} / {c.worse} of {c.n} "
                     f"| {comparison.interval(c.rouge_diff, c.rouge_lo, c.rouge_hi)} |")
    if s.art_vs_trl is not None:
        c = s.art_vs_trl
        lines.append(f"| **ART - TRL** | | {c.before['reward_mean']:.3f} vs {c.after['reward_mean']:.3f} | "
                     f"**{comparison.interval(c.diff, c.lo, c.hi)}** | ART better on {c.improved}, worse on {c.worse} "
                     f"of {c.n} | {comparison.interval(c.rouge_diff, c.rouge_lo, c.rouge_hi)} |")
    lines.append("")
    for mr in s.runs:
        if mr.method.name in s.gains:
            lines += [f"- {mr.method.title}: "
                      + comparison.verdict(s.gains[mr.method.name], mr.method.title, "the untrained model")]
    if s.art_vs_trl is not None:
        lines += ["- ART vs TRL: " + comparison.verdict(s.art_vs_trl, "ART", "TRL")]
    elif len(s.runs) > 1:
        lines += ["- ART vs TRL: not compared (a method did not finish)."]
    return lines + [""]


METRIC_ROWS = [("reward mean (all titles)", "reward_mean", "{:.3f}"),
               ("greedy reward mean", "greedy_reward_mean", "{:.3f}"),
               ("reward-model score mean", "rm_mean", "{:.3f}"), ("match rate (validator)", "match_rate", "{:.0%}"),
               ("copy fraction", "copy_frac_mean", "{:.2f}"), ("title length (words)", "title_len_mean", "{:.1f}"),
               ("trailing-text rate", "trailing_rate", "{:.0%}"),
               ("ROUGE-L to the real title (not in the reward)", "rouge_l_mean", "{:.3f}"),
               ("top template's share (not in the reward)", "template_share", "{:.0%}")]


def _metrics(s: Summary) -> list[str]:
    cols = ([("untrained", comparison.summarize(s.before))]
            + [(mr.method.title, comparison.summarize(mr.result)) for mr in s.runs if mr.ok])
    lines = ["## Every metric", "", "| metric | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for label, key, fmt in METRIC_ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(v[key]) for _, v in cols) + " |")
    lines.append("| top template | " + " | ".join(f"`{v['template_top']}`" for _, v in cols) + " |")
    b = cols[0][1]
    lines += ["", f"Original titles: top template `{b['original_template_top']}` on "
              f"{b['original_template_share']:.0%}. "
              "Template = a title's first word, plus the first word after the colon for 'X: Y' titles; its share "
              "is the fraction of all titles (greedy + sampled) with the commonest one. ROUGE-L = F1 of the longest "
              "common word subsequence with the story's real title.", ""]
    return lines


def _cost(s: Summary) -> list[str]:
    lines = ["## Cost per method", "", "| method | steps | wall s / step | CPU s / step | optimizer steps / step | "
             "trained tokens / step | in-training validation | training stage (this run) |",
             "|---|---|---|---|---|---|---|---|"]
    for mr in s.runs:
        c = comparison.run_cost(mr.run_dir, mr.method.name)
        lines.append(f"| {mr.method.title} | {c['steps']} | {comparison.fmt(c['step_seconds'], '.1f')} | "
                     f"{comparison.fmt(c['step_cpu_seconds'], '.1f')} | "
                     f"{comparison.fmt(c['optimizer_steps'], '.1f')} | "
                     f"{comparison.fmt(c['trained_tokens'], '.0f')} | {c['vals']} x, {c['val_seconds']:.0f} s | "
                     f"{comparison.fmt_duration(mr.train_wall)}, CPU {mr.train_cpu:.0f} s |")
    return lines + ["", "Per step: means over the run's train rows (rollouts, reward and update; validation not "
                    "included). CPU seconds are the trainer process's own; on a shared machine the wall time grows "
                    "with the load while CPU time stays the work done. Trained tokens = completion tokens the loss "
                    "is computed over (ART drops zero-advantage trajectories before that).", ""]


def _titles(s: Summary, k: int) -> list[str]:
    done = [mr for mr in s.runs if mr.ok]
    head = ["original", "untrained"] + [mr.method.name.upper() for mr in done]
    lines = ["## Titles side by side (greedy, reward in brackets)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    recs = [s.before.records()] + [mr.result.records() for mr in done]

    def cell(g: dict) -> str:
        return f"{(g['title'] or '(empty)').replace('|', '/')} ({g['reward']:.2f})"

    for i in range(min(k, len(recs[0]))):
        lines.append(f"| {str(recs[0][i]['original']).replace('|', '/')} | "
                     + " | ".join(cell(r[i]["greedy"]) for r in recs) + " |")
    return lines + [""]


def render_report(s: Summary, show_titles: int = 5) -> str:
    """The demo's report as Markdown (what it prints and writes to demo_report.md)."""
    lines = _header(s) + _gains(s) + _metrics(s) + _cost(s)
    if s.pngs:
        lines += ["## Curves", "", f"![comparison]({s.pngs[0].name})", "", s.curve, ""]
    lines += _titles(s, show_titles)
    if s.failed:
        lines += ["## Failed", ""] + [f"- {mr.method.title}: {mr.error}" for mr in s.failed] + [""]
    lines += ["## What differs between the two libraries' GRPO", "",
              f"This run: {SETTING_TITLES[s.setting]}. The other setting is one flag away "
              f"(`--setting {'aligned' if s.setting == 'defaults' else 'defaults'}`).", "",
              grpo_semantics.markdown(), ""]
    lines += ["## Runs and wall time", ""]
    lines += [f"- {mr.method.title}: `{mr.run_dir}` (adapter `{mr.checkpoint}`)" for mr in s.runs]
    lines += ["", "| stage | wall time | CPU time |", "|---|---|---|"]
    lines += [f"| {name} | {comparison.fmt_duration(sec)} | {f'{s.cpu[i]:.0f} s' if i < len(s.cpu) else ''} |"
              for i, (name, sec) in enumerate(s.stages)]
    lines += [f"| **total** | **{comparison.fmt_duration(sum(sec for _, sec in s.stages))}** | "
              f"{f'{sum(s.cpu):.0f} s' if s.cpu else ''} |", "",
              "CPU time = user + system seconds of the demo and its trainers (not the reward server).", ""]
    if s.machine:
        lines += [s.machine, ""]
    return "\n".join(lines)


def machine_note(load_before: tuple[float, ...]) -> str:
    load_after = os.getloadavg()
    return (f"Machine: {os.cpu_count()} cores, load average {load_before[0]:.1f} at the start and "
            f"{load_after[0]:.1f} at the end (1-min); `make setup` time is not included. "
            f"Finished {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}.")


def plot_curves(summary: Summary, base_dir: Path, out_dir: Path) -> list[Path]:
    """`make compare` on this demo's runs (compare.py, its own process): compare.png with one colour
    per method and the baseline as a band, and its table in compare.md; output in demo_compare.log."""
    png, log = out_dir / "compare.png", out_dir / "demo_compare.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)  # an old plot must not pass for this run's
    cmd = [sys.executable, str(ROOT / "compare.py"),
           *[str(p) for p in [base_dir, *(mr.run_dir for mr in summary.runs)]],
           "--out_dir", str(out_dir), "--n_boot", "2000", "--no_panels", "--examples", "0"]
    with log.open("w", encoding="utf-8") as out:
        code = subprocess.run(cmd, cwd=ROOT, env=procs.child_env(), stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(f"warning: compare.py exited {code}, no plot; last lines of {log}:\n{procs.tail(log)}")
    return [png] if png.exists() else []


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


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


def prepare(args: DemoArgs) -> tuple[settings.Recipe, dict[str, Path], list[MethodRun]]:
    """The recipe with the setting applied, the run directories (emptied by --fresh), one MethodRun per method."""
    if args.setting not in SETTINGS:
        raise SystemExit(f"--setting {args.setting!r}: use one of {', '.join(SETTINGS)}")
    methods = parse_methods(args.methods)
    recipe = load_recipe(args.recipe, SETTINGS[args.setting])
    dirs = {k: Path(recipe.runs_dir) / v for k, v in run_names(args.recipe, args.setting).items()}
    if args.fresh:
        for key in ("base", "demo", *methods):
            shutil.rmtree(dirs[key], ignore_errors=True)
    # The baseline is recomputed on every run, so its old rows would only duplicate step 0.
    shutil.rmtree(dirs["base"], ignore_errors=True)
    dirs["demo"].mkdir(parents=True, exist_ok=True)
    return recipe, dirs, [MethodRun(METHODS[m], dirs[m]) for m in methods]


@contextlib.contextmanager
def server_url(args: DemoArgs, log: Path) -> Iterator[str]:
    """The reward server's URL: the running one given, or one started (and always stopped) here."""
    if args.reward_url:
        url = args.reward_url.rstrip("/")
        health = procs.wait_healthy(url, timeout=10.0)
        print(f"using the running server at {url}: {health}")
        yield url
        return
    with procs.reward_server(log, args.server_timeout, shlex.split(args.server_args)) as (url, health):
        print(f"started local_reward.py at {url} (log {log}): {health}")
        yield url


def report_only(args: DemoArgs) -> Summary:
    """The report from the evaluations on disk (no server, no training, no generation)."""
    if args.setting not in SETTINGS:
        raise SystemExit(f"--setting {args.setting!r}: use one of {', '.join(SETTINGS)}")
    recipe = load_recipe(args.recipe, SETTINGS[args.setting])
    dirs = {k: Path(recipe.runs_dir) / v for k, v in run_names(args.recipe, args.setting).items()}
    before = evaluation.read_eval(dirs["base"], "before")
    if before is None:
        raise SystemExit(f"{dirs['base']}/eval/before.jsonl not found: run the demo first")
    runs = [MethodRun(METHODS[m], dirs[m]) for m in parse_methods(args.methods)]
    for mr in runs:
        mr.step, mr.checkpoint = trained_steps(mr.run_dir, mr.method.name), find_checkpoint(mr.run_dir)
        mr.result = evaluation.read_eval(mr.run_dir / AFTER_DIR, "after")
        if mr.result is None:
            mr.error = f"no evaluation at {mr.run_dir / AFTER_DIR} (training failed or not run)"
    summary = compute(Summary(recipe=recipe, recipe_path=args.recipe, setting=args.setting, before=before, runs=runs,
                              machine="Rebuilt from the evaluations on disk (--report_only): no stage times."))
    return finish(summary, args, dirs, curve_note(curve_flags(recipe, args.curve_points)))


def curve_note(flags: Sequence[str]) -> str:
    if "--eval_every" not in flags:
        return "Curves: the recipe's own validations (eval_every, eval_samples)."
    return (f"Curves: validation during training every {flags[list(flags).index('--eval_every') + 1]} steps on the "
            "greedy titles only (one per story; the full protocol costs ~5x more), against the untrained model's "
            "greedy titles (band: its 95% interval). The tables above use the full protocol.")


def finish(summary: Summary, args: DemoArgs, dirs: dict[str, Path], curve: str) -> Summary:
    """Plot, render, write and print the report."""
    summary.curve = curve
    summary.pngs = plot_curves(summary, dirs["base"], dirs["demo"])
    text = render_report(summary, args.show_titles)
    summary.report_path = dirs["demo"] / REPORT_FILE
    summary.report_path.parent.mkdir(parents=True, exist_ok=True)
    summary.report_path.write_text(text + "\n", encoding="utf-8")
    print("\n" + text)
    print(f"report -> {summary.report_path}" + (f"; plot -> {summary.pngs[0]}" if summary.pngs else ""))
    return summary


def main(args: DemoArgs) -> Summary:
    settings.load_env()
    if args.report_only:
        return report_only(args)
    procs.set_threads(args.threads)
    recipe, dirs, runs = prepare(args)
    flags = [a for k, v in SETTINGS[args.setting].items() for a in (f"--{k}", v)]
    flags += curve_flags(recipe, args.curve_points) + shlex.split(args.trainer_args)
    load0, stages = os.getloadavg(), Stages(3 + 2 * len(runs))

    with contextlib.ExitStack() as stack:
        with stages("reward server"):
            recipe.reward_url = stack.enter_context(server_url(args, dirs["demo"] / "demo_reward_server.log"))
        with stages("data check"):
            check_data(recipe)
        with stages("evaluate untrained (baseline)"):
            before = evaluate_policy(recipe, dirs["base"].name, "before", "base", 0)
            write_curve_baseline(dirs["base"], before, recipe.model)
        for mr in runs:
            with stages(f"train {mr.method.title}"):
                t0, c0 = time.perf_counter(), cpu_seconds()
                own = shlex.split({"trl": args.trl_args, "art": args.art_args}.get(mr.method.name, ""))
                if mr.method.name == "art":
                    own = [*SETTING_ART_FLAGS[args.setting], *own]
                train_method(mr, args.recipe, recipe.reward_url, flags + own, recipe.max_steps)
                mr.train_wall, mr.train_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        for mr in runs:
            if not mr.error:
                with stages(f"evaluate {mr.method.title}"):
                    evaluate_method(mr, recipe)

    summary = compute(Summary(recipe=recipe, recipe_path=args.recipe, setting=args.setting, before=before, runs=runs,
                              stages=stages.done, cpu=stages.cpu, machine=machine_note(load0)))
    return finish(summary, args, dirs, curve_note(flags))


def exit_code(summary: Summary, strict: bool) -> int:
    if summary.failed:
        print(f"demo: {', '.join(mr.method.name for mr in summary.failed)} failed; the report says why",
              file=sys.stderr)
        return 1
    if strict and not all(c.significant for c in summary.gains.values()):
        return 1
    return 0


if __name__ == "__main__":
    from transformers import HfArgumentParser

    signal.signal(signal.SIGTERM, _raise_interrupt)  # so every `finally` (server stop) runs on SIGTERM too
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli_args = HfArgumentParser(DemoArgs, description=__doc__.splitlines()[0]).parse_args_into_dataclasses()[0]
    sys.exit(exit_code(main(cli_args), cli_args.strict))
