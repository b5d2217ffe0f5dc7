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
   (hntitles/analysis/grpo_semantics.py) and which setting ran.

Settings (--setting): `defaults` runs each library as a user gets it (the recipe's optimizer
knobs left empty); `aligned` (the default) sets the same optimizer, weight decay, betas and one
optimizer step per GRPO step on both, packs each ART group into one row, scores ART's tokens at
the sampling temperature and weighs every completion token the same, as TRL does
(experiment.SETTINGS and experiment.SETTING_ART_FLAGS); it writes to runs/<method>-<recipe>-aligned.
`defaults` costs ~2.5x more ART time on a CPU (8 full-prompt rows and 8 optimizer steps per GRPO step,
as LocalBackend does).

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
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hntitles.analysis import comparison, evaluation, experiment, grpo_semantics
from hntitles.runs import procs, rundir, settings

ROOT = settings.ROOT
REPORT_FILE = "demo_report.md"
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
    server_args: str = field(default="", metadata={
        "help": "Extra flags for local_reward.py (e.g. '--scorer hf --rm_model dir')."})
    server_timeout: float = field(default=300.0, metadata={"help": "Seconds to wait for the started server's /health."})
    trainer_args: str = field(default="", metadata={"help": "Extra flags for both trainers (e.g. '--max_steps 10')."})
    report_to: str = field(default="", metadata={
        "help": "Both trainers' tracker: tensorboard (under each run's tracker/, `make board`), wandb or none "
                "(default: the recipe's report_to)."})
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
    docs_dir: str = field(default="docs", metadata={
        "help": "Where `make study` wrote the seed spread this report quotes (study-<recipe>[-<setting>].json)."})
    strict: bool = field(default=False, metadata={
        "help": "Exit 1 unless every method is measurably better than the untrained model (interval above 0)."})


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# Report
# --------------------------------------------------------------------------------------


@dataclass
class Summary:
    """Everything the report shows; main() returns it."""

    recipe: settings.Recipe
    recipe_path: str
    setting: str
    before: evaluation.EvalResult
    runs: list[experiment.MethodRun]
    gains: dict[str, comparison.Comparison] = field(default_factory=dict)
    art_vs_trl: comparison.Comparison | None = None
    stages: list[tuple[str, float]] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    machine: str = ""
    curve: str = ""                 # how the in-training curve was validated
    pngs: list[Path] = field(default_factory=list)
    report_path: Path | None = None
    spread: dict | None = None      # the latest study's seed spread for this recipe and setting
    refs: dict[str, evaluation.EvalResult] = field(default_factory=dict)  # real titles, optional endpoint

    @property
    def failed(self) -> list[experiment.MethodRun]:
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
    overrides = experiment.SETTINGS[s.setting]
    knobs = ", ".join(f"`{k}: {v}`" for k, v in overrides.items()) or "none: every optimizer knob left to each library"
    return [
        f"# Demo report: {', '.join(mr.method.title for mr in s.runs)} on {Path(s.recipe_path).name}", "",
        f"Setting: **{experiment.SETTING_TITLES[s.setting]}**; recipe overrides: {knobs}.", "",
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
    return lines + [""] + comparison.spread_lines(s.spread, s.recipe_path, s.setting)


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
              "common subsequence of tokens with the story's real title (Google's rouge-score: lower case, letters "
              "and digits, no stemming).", ""]
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
                     + (f"{comparison.fmt_duration(experiment.recorded_train_seconds(mr.run_dir, mr.method.name))} "
                        "when it trained (reused) |" if mr.reused else
                        f"{comparison.fmt_duration(mr.train_wall)}, CPU {mr.train_cpu:.0f} s |"))
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


def _decision(s: Summary) -> list[str]:
    """Which method should I use, and why: this run's numbers, then what a verdict needs (the latest study's)."""
    if not s.gains:
        return []
    gap = comparison.real_title_gap(s.before, s.refs)
    lines = ["## Which method should I use?", "", "- **This run's gain** (one training seed): " + "; ".join(
        f"{m.upper()} {comparison.interval(c.diff, c.lo, c.hi)}{comparison.gap_share(c.diff, gap)}"
        for m, c in s.gains.items()) + "."]
    cost = {mr.method.name: comparison.run_cost(mr.run_dir, mr.method.name) for mr in s.runs if mr.ok}
    lines.append("- **Cost per step**: " + "; ".join(
        f"{m.upper()} {comparison.fmt(c['step_seconds'], '.1f')} s wall, {comparison.fmt(c['step_cpu_seconds'], '.1f')}"
        " s CPU" for m, c in cost.items()) + " (this machine; validation not included).")
    for m, c in s.gains.items():
        if c.significant and not c.rouge_confirms:
            lines.append(f"- **{m.upper()}'s reward rose but ROUGE-L to the real titles did not** "
                         f"({comparison.interval(c.rouge_diff, c.rouge_lo, c.rouge_hi)}).")
        mr = next(mr for mr in s.runs if mr.method.name == m)
        if flag := comparison.template_takeover(s.before, mr.result, m.upper()):
            lines.append(f"- {flag}")
    d = (s.spread or {}).get("art-trl")
    if s.art_vs_trl is not None and d is not None:
        power = (f", P(ART > TRL) = {d['p_positive']:.2f}, it would detect |d| >= {d['mde']:.3f}"
                 if d.get("mde") is not None and d.get("p_positive") is not None else "")
        this = comparison.interval(s.art_vs_trl.diff, s.art_vs_trl.lo, s.art_vs_trl.hi)
        lines.append(f"- **So**: one seed decides nothing (this run: ART - TRL {this}). The latest study: "
                     f"{d['line']}{power}; its report closes with the choice over seeds.")
    elif s.art_vs_trl is not None:
        lines.append("- **So**: one seed decides nothing; `make study` trains 3 seeds and says which method to use.")
    return lines + [""]


def render_report(s: Summary, show_titles: int = 5) -> str:
    """The demo's report as Markdown (what it prints and writes to demo_report.md)."""
    gains = {mr.method.title: s.gains[mr.method.name].diff for mr in s.runs if mr.method.name in s.gains}
    lines = (_header(s) + _gains(s) + comparison.reference_lines(s.before, s.refs, gains, experiment.run_names(
        s.recipe_path, s.setting)["base"]) + _metrics(s) + _cost(s))
    if s.pngs:
        lines += ["## Curves", "", f"![comparison]({s.pngs[0].name})", "", s.curve, ""]
    lines += _titles(s, show_titles)
    if s.failed:
        lines += ["## Failed", ""] + [f"- {mr.method.title}: {mr.error}" for mr in s.failed] + [""]
    lines += ["## What differs between the two libraries' GRPO", "",
              f"This run: {experiment.SETTING_TITLES[s.setting]}. The other setting is one flag away "
              f"(`--setting {'aligned' if s.setting == 'defaults' else 'defaults'}`).", "",
              grpo_semantics.markdown(), ""]
    lines += ["## Runs and wall time", ""]
    lines += [f"- {mr.method.title}: `{rundir.shown(mr.run_dir)}` (adapter "
              f"`{rundir.shown(mr.checkpoint) if mr.checkpoint else None}`)" for mr in s.runs]
    lines += ["", "| stage | wall time | CPU time |", "|---|---|---|"]
    lines += [f"| {name} | {comparison.fmt_duration(sec)} | {comparison.fmt_cpu(s.cpu[i]) if i < len(s.cpu) else ''} |"
              for i, (name, sec) in enumerate(s.stages)]
    lines += [f"| **total** | **{comparison.fmt_duration(sum(sec for _, sec in s.stages))}** | "
              f"{comparison.fmt_cpu(sum(c for c in s.cpu if c == c)) if s.cpu else ''} |", "",
              "CPU time = user + system seconds of the demo and its trainers (not the reward server).", ""]
    if s.machine:
        lines += [s.machine, ""]
    return "\n".join(lines + _decision(s))


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


def prepare(args: DemoArgs) -> tuple[settings.Recipe, dict[str, Path], list[experiment.MethodRun]]:
    """The recipe with the setting applied, the run directories (emptied by --fresh), one MethodRun per method."""
    if args.setting not in experiment.SETTINGS:
        raise SystemExit(f"--setting {args.setting!r}: use one of {', '.join(experiment.SETTINGS)}")
    methods = experiment.parse_methods(args.methods)
    recipe = experiment.load_recipe(args.recipe, experiment.SETTINGS[args.setting])
    dirs = {k: Path(recipe.runs_dir) / v for k, v in experiment.run_names(args.recipe, args.setting).items()}
    if args.fresh:
        for key in ("base", "demo", *methods):
            shutil.rmtree(dirs[key], ignore_errors=True)
    # The baseline is recomputed on every run, so its old rows would only duplicate step 0.
    shutil.rmtree(dirs["base"], ignore_errors=True)
    dirs["demo"].mkdir(parents=True, exist_ok=True)
    return recipe, dirs, [experiment.MethodRun(experiment.METHODS[m], dirs[m]) for m in methods]


def report_only(args: DemoArgs) -> Summary:
    """The report from the evaluations on disk (no server, no training, no generation)."""
    if args.setting not in experiment.SETTINGS:
        raise SystemExit(f"--setting {args.setting!r}: use one of {', '.join(experiment.SETTINGS)}")
    recipe = experiment.load_recipe(args.recipe, experiment.SETTINGS[args.setting])
    dirs = {k: Path(recipe.runs_dir) / v for k, v in experiment.run_names(args.recipe, args.setting).items()}
    before = evaluation.read_eval(dirs["base"], "before")
    if before is None:
        raise SystemExit(f"{dirs['base']}/eval/before.jsonl not found: run the demo first")
    runs = [experiment.MethodRun(experiment.METHODS[m], dirs[m]) for m in experiment.parse_methods(args.methods)]
    for mr in runs:
        mr.step = experiment.trained_steps(mr.run_dir, mr.method.name)
        mr.checkpoint = experiment.find_checkpoint(mr.run_dir)
        mr.result = evaluation.read_eval(mr.run_dir / experiment.AFTER_DIR, "after")
        if mr.result is None:
            mr.error = f"no evaluation at {mr.run_dir / experiment.AFTER_DIR} (training failed or not run)"
    summary = compute(Summary(recipe=recipe, recipe_path=args.recipe, setting=args.setting, before=before, runs=runs,
                              machine="Rebuilt from the evaluations on disk (--report_only): no stage times."))
    return finish(summary, args, dirs, curve_note(experiment.curve_flags(recipe, args.curve_points)))


def curve_note(flags: Sequence[str]) -> str:
    if "--eval_every" not in flags:
        return "Curves: the recipe's own validations (eval_every, eval_samples)."
    return (f"Curves: validation during training every {flags[list(flags).index('--eval_every') + 1]} steps on the "
            "greedy titles only (one per story; the full protocol costs ~5x more), against the untrained model's "
            "greedy titles (band: its 95% interval). The tables above use the full protocol.")


def finish(summary: Summary, args: DemoArgs, dirs: dict[str, Path], curve: str) -> Summary:
    """Plot, render, write and print the report."""
    summary.curve = curve
    summary.spread = comparison.read_spread(ROOT / args.docs_dir, args.recipe, args.setting)
    summary.refs = experiment.read_references(dirs["base"])
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
    flags = experiment.trainer_flags(args.setting, recipe, args.curve_points, args.trainer_args,
                                          args.report_to)
    load0, stages = os.getloadavg(), experiment.Stages(3 + 2 * len(runs))

    with contextlib.ExitStack() as stack:
        with stages("reward server"):
            recipe.reward_url = stack.enter_context(experiment.server_url(
                args.reward_url, args.server_args, args.server_timeout, dirs["demo"] / "demo_reward_server.log"))
        with stages("data check"):
            experiment.check_data(recipe)
        with stages("evaluate untrained (baseline)"):
            before = experiment.evaluate_policy(recipe, dirs["base"].name, "before", "base", 0)
            experiment.write_curve_baseline(dirs["base"], before, recipe.model)
            experiment.evaluate_reference(recipe, dirs["base"].name)
        for mr in runs:
            with stages(f"train {mr.method.title}"):
                t0, c0 = time.perf_counter(), experiment.cpu_seconds()
                own = experiment.method_flags(mr.method.name, args.setting,
                                              {"trl": args.trl_args, "art": args.art_args}[mr.method.name])
                experiment.train_method(mr, args.recipe, recipe.reward_url, flags + own, recipe.max_steps)
                mr.train_wall, mr.train_cpu = time.perf_counter() - t0, experiment.cpu_seconds() - c0
            stages.reused(mr)
        for mr in runs:
            if not mr.error:
                with stages(f"evaluate {mr.method.title}"):
                    experiment.evaluate_method(mr, recipe)

    summary = compute(Summary(recipe=recipe, recipe_path=args.recipe, setting=args.setting, before=before, runs=runs,
                              stages=stages.done, cpu=stages.cpu, machine=experiment.machine_note(load0)))
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
