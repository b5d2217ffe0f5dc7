"""A verdict that holds across training runs: both methods trained with several seeds, evaluated on the
same stories, and compared over seeds and stories.

    make study                                   # 3 seeds, recipes/cpu.yaml, aligned, both methods
    make study SEEDS=5 RECIPE=recipes/tiny.yaml  # SETTING and METHODS work as in the demo
    python study.py --seeds 1                    # the recipe's seed alone: the demo's run and numbers
    python study.py --report_only                # the report again, from the evaluations on disk

The seeds are the recipe's `seed` and the ones after it (42, 43, 44 for --seeds 3). A seed is a
training seed and drives what it drives in each library: TRL's sampler seed and data_seed, the LoRA
init and the rollout sampling; ART's story order, LoRA init and every step's sampling seeds. The
evaluation protocol stays fixed (the recipe's val stories, samples per story and evaluation seed,
as in the demo), so runs differ only by training. The recipe's seed trains the demo's runs
(runs/<method>-<recipe>[-<setting>], reused: a study after `make demo` retrains nothing for it);
another seed s trains runs/<method>-<recipe>[-<setting>]-s<s>. Every run resumes like the demo's,
an evaluation of the same adapter already on disk is reused, and a run that fails is reported, not
hidden (the study goes on with the others and exits 1).

The stages: the reward server, the data check, the untrained model's evaluation (once), then per
seed each method trained and evaluated. The report (runs/study-<recipe>[-<setting>]/study_report.md
and study.png): each method's gain per seed (a paired bootstrap over stories) and over all seeds,
ART - TRL the same, the over-seeds intervals two-level (stats.two_level_bootstrap: training seeds and
stories), the between-seed standard deviation of each gain, how often one run's story-only interval
missed the mean over seeds, ROUGE-L to the real titles and the top template's share, and the val
curves with a band per method across seeds; the reference rows (the real Hacker News titles of the
val stories through the same validator, reward and rule; each gain as a share of the gap to them);
ART - TRL's power (variance components, the minimum detectable difference at 80% power, the seeds
that would detect 0.05 and 0.02, P(ART > TRL) from the two-level bootstrap; stats.mde); and, last,
"which method should I use?": gain, spread, difference, cost per step and the independent metrics'
warnings (a reward gain ROUGE-L does not show; a template whose share doubled: likely reward hacking).
It also writes docs/study-<recipe>[-<setting>].json (the seed spread and the power, with the date and
the commit), which the demo's report quotes next to its one-run verdict.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hntitles.analysis import comparison, evaluation, experiment, stats
from hntitles.runs import procs, rundir, settings

REPORT_FILE = "study_report.md"
STAGES_FILE = "stages.json"  # the last full run's stage times, for --report_only
POWER_TARGETS = (0.05, 0.02)  # ART - TRL differences the report says how many seeds would detect


@dataclass
class StudyArgs:
    recipe: str = field(default="recipes/cpu.yaml", metadata={"help": "Recipe YAML shared by training and evaluation."})
    seeds: int = field(default=3, metadata={"help": "Training seeds: the recipe's seed and the ones after it."})
    methods: str = field(default="trl,art", metadata={"help": "Comma-separated methods to train: trl, art."})
    setting: str = field(default="aligned", metadata={"help": "'defaults' or 'aligned', as in the demo."})
    curve_points: int = field(default=3, metadata={
        "help": "Validations during training per run, greedy titles only (as in the demo)."})
    reward_url: str = field(default="", metadata={
        "help": "Use this already running reward server (must answer /health) instead of starting one."})
    server_args: str = field(default="", metadata={"help": "Extra flags for local_reward.py."})
    server_timeout: float = field(default=300.0, metadata={"help": "Seconds to wait for the started server's /health."})
    trainer_args: str = field(default="", metadata={"help": "Extra flags for both trainers."})
    report_to: str = field(default="", metadata={
        "help": "Both trainers' tracker: tensorboard (under each run's tracker/, `make board`), wandb or none "
                "(default: the recipe's report_to)."})
    threads: int = field(default=0, metadata={"help": "Torch CPU threads (0 = torch's default)."})
    fresh: bool = field(default=False, metadata={
        "help": "Delete the study's run directories first, the recipe's seed's included (they are the demo's)."})
    report_only: bool = field(default=False, metadata={
        "help": "Train and evaluate nothing: rebuild the report from the evaluations on disk."})
    parity_steps: int = field(default=3, metadata={
        "help": "Same batch, same update: updates of one fixed group compared per step (update_parity), with the "
                "aligned setting's ART knobs and without them; 0 = skip. Aligned setting only."})
    docs_dir: str = field(default="docs", metadata={
        "help": "Where the seed spread goes (study-<recipe>[-<setting>].json), for the demo's report to quote."})


@dataclass
class Study:
    """Everything the report shows."""

    recipe: settings.Recipe
    recipe_path: str
    setting: str
    seeds: list[int]
    before: evaluation.EvalResult
    runs: dict[int, list[experiment.MethodRun]]  # seed -> one MethodRun per method
    stages: list[tuple[str, float]] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    machine: str = ""
    parity: dict[str, list[dict]] = field(default_factory=dict)  # variant -> update_parity rows
    refs: dict[str, evaluation.EvalResult] = field(default_factory=dict)  # real titles, optional endpoint

    def done(self, method: str) -> dict[int, evaluation.EvalResult]:
        """seed -> evaluation of `method`'s run, for the runs that finished."""
        return {s: mr.result for s, runs in self.runs.items() for mr in runs if mr.method.name == method and mr.ok}

    @property
    def failed(self) -> list[tuple[int, experiment.MethodRun]]:
        return [(s, mr) for s, runs in self.runs.items() for mr in runs if not mr.ok]


def main(args: StudyArgs) -> Study:
    # ---- The recipe, the seeds and every run directory
    settings.load_env()
    procs.set_threads(args.threads)
    if args.setting not in experiment.SETTINGS or args.seeds < 1:
        raise SystemExit(f"--setting {args.setting!r} / --seeds {args.seeds}: a setting of "
                         f"{', '.join(experiment.SETTINGS)} and at least one seed")
    methods = experiment.parse_methods(args.methods)
    recipe = experiment.load_recipe(args.recipe, experiment.SETTINGS[args.setting])
    seeds = [recipe.seed + k for k in range(args.seeds)]
    runs_dir = Path(recipe.runs_dir)
    names = experiment.run_names(args.recipe, args.setting)
    base_dir, study_dir = runs_dir / names["base"], runs_dir / names["study"]
    runs = {s: [experiment.MethodRun(experiment.METHODS[m], runs_dir / run_name(args, recipe, s, m)) for m in methods]
            for s in seeds}
    if args.report_only:
        study = reread(args, recipe, seeds, base_dir, study_dir, runs)
        return finish(study, study_dir, experiment.ROOT / args.docs_dir)
    if args.fresh:
        for path in [base_dir, study_dir, *(mr.run_dir for rs in runs.values() for mr in rs)]:
            shutil.rmtree(path, ignore_errors=True)
    study_dir.mkdir(parents=True, exist_ok=True)
    flags = experiment.trainer_flags(args.setting, recipe, args.curve_points, args.trainer_args,
                                          args.report_to)
    parity_due = bool(args.parity_steps) and args.setting == "aligned"
    load0, stages = os.getloadavg(), experiment.Stages(3 + 2 * len(seeds) * len(methods) + parity_due)

    with contextlib.ExitStack() as stack:
        # ---- The reward server, the data, the untrained model (once for every seed)
        with stages("reward server"):
            recipe.reward_url = stack.enter_context(experiment.server_url(
                args.reward_url, args.server_args, args.server_timeout, study_dir / "study_reward_server.log"))
        with stages("data check"):
            experiment.check_data(recipe)
        with stages("evaluate untrained (baseline)"):
            before = baseline(recipe, base_dir)

        # ---- Per seed: train each method, then evaluate each (an evaluation of the same adapter is reused)
        for seed in seeds:
            for mr in runs[seed]:
                with stages(f"seed {seed}: train {mr.method.title}"):
                    t0, c0 = time.perf_counter(), experiment.cpu_seconds()
                    own = experiment.method_flags(mr.method.name, args.setting)
                    experiment.train_method(mr, args.recipe, recipe.reward_url, [*flags, "--seed", str(seed), *own],
                                            recipe.max_steps)
                    mr.train_wall, mr.train_cpu = time.perf_counter() - t0, experiment.cpu_seconds() - c0
                stages.reused(mr)
            for mr in runs[seed]:
                if not mr.error:
                    with stages(f"seed {seed}: evaluate {mr.method.title}"):
                        experiment.evaluate_method(mr, recipe, reuse=True)

    # ---- Same batch, same update? One fixed group through both trainers' own update code
    parity = {}
    if parity_due:
        with stages("same batch, same update"):
            parity = same_update(recipe, args.parity_steps, study_dir / "parity.json")

    # ---- The report
    study = Study(recipe=recipe, recipe_path=args.recipe, setting=args.setting, seeds=seeds, before=before,
                  runs=runs, stages=stages.done, cpu=stages.cpu, machine=experiment.machine_note(load0), parity=parity)
    return finish(study, study_dir, experiment.ROOT / args.docs_dir)


# What aligning changed: the aligned setting's ART knobs, and the setting as it was without them.
PARITY_VARIANTS = {"aligned": {}, "aligned without score_temperature and token_level_loss":
                   {"score_temperature": False, "token_level_loss": False}}


def same_update(recipe: settings.Recipe, steps: int, cache: Path) -> dict[str, list[dict]]:
    """update_parity's rows for each variant (read back from `cache` when it holds them: they are a
    function of the recipe and the code, not of the training seeds)."""
    from hntitles.analysis import update_parity

    found = json.loads(cache.read_text()) if cache.exists() else {}
    if found.get("steps") == steps and set(found.get("rows", {})) == set(PARITY_VARIANTS):
        return found["rows"]
    rows = {name: update_parity.compare_updates(recipe, steps, **knobs) for name, knobs in PARITY_VARIANTS.items()}
    cache.write_text(json.dumps({"steps": steps, "rows": rows}, indent=1, default=str))
    return rows


def baseline(recipe: settings.Recipe, base_dir: Path) -> evaluation.EvalResult:
    """The untrained model's evaluation: the one on disk (the demo's, or an earlier study's: the
    evaluation is deterministic), else a new one with its greedy curve baseline; and the real titles'
    reference row likewise."""
    before = evaluation.read_eval(base_dir, "before")
    if before is None:
        before = experiment.evaluate_policy(recipe, base_dir.name, "before", "base", 0)
        experiment.write_curve_baseline(base_dir, before, recipe.model)
    if evaluation.read_eval(base_dir, experiment.REFERENCE_LABEL) is None:
        experiment.evaluate_reference(recipe, base_dir.name)
    return before


def run_name(args: StudyArgs, recipe: settings.Recipe, seed: int, method: str) -> str:
    """The recipe's seed trains the demo's run; another seed a run of its own."""
    return experiment.run_names(args.recipe, args.setting, None if seed == recipe.seed else seed)[method]


def reread(args: StudyArgs, recipe, seeds: list[int], base_dir: Path, study_dir: Path, runs: dict) -> Study:
    """The study from the evaluations on disk (no server, no training, no generation)."""
    before = evaluation.read_eval(base_dir, "before")
    if before is None:
        raise SystemExit(f"{base_dir}/eval/before.jsonl not found: run the study first")
    for mr in (mr for rs in runs.values() for mr in rs):
        mr.step, mr.checkpoint = experiment.trained_steps(mr.run_dir, mr.method.name), None
        mr.result = evaluation.read_eval(mr.run_dir / experiment.AFTER_DIR, "after")
        if mr.result is None:
            mr.error = f"no evaluation at {mr.run_dir / experiment.AFTER_DIR} (training failed or not run)"
    stages = study_dir / STAGES_FILE
    if stages.exists():  # the stage times of the run that trained them
        saved = json.loads(stages.read_text(encoding="utf-8"))
        return Study(recipe=recipe, recipe_path=args.recipe, setting=args.setting, seeds=seeds, before=before,
                     runs=runs, stages=[tuple(x) for x in saved["stages"]], cpu=saved["cpu"],
                     machine=saved["machine"] + " Report rebuilt from the evaluations on disk (--report_only).")
    return Study(recipe=recipe, recipe_path=args.recipe, setting=args.setting, seeds=seeds, before=before,
                 runs=runs, machine="Rebuilt from the evaluations on disk (--report_only): no stage times.")


# --------------------------------------------------------------------------------------
# Over seeds: per-seed comparisons, two-level intervals, the spread
# --------------------------------------------------------------------------------------


@dataclass
class OverSeeds:
    """One quantity (a method's gain, or ART - TRL) per seed and over all seeds."""

    name: str
    per_seed: dict[int, comparison.Comparison]
    mean: float
    lo: float
    hi: float
    sd: float  # between-seed standard deviation of the per-seed means (nan below 2 seeds)
    missed: int  # seeds whose story-only interval does not hold the mean over seeds
    rouge: tuple[float, float, float]  # the same, two-level, for ROUGE-L to the real titles
    p_positive: float = float("nan")  # share of two-level bootstrap means above 0
    components: dict = field(default_factory=dict)  # stats.variance_components of the (seeds x stories) matrix

    def mde(self) -> float:
        """The smallest |difference| this design (its seeds x stories) detects at 80% power (nan with 1 seed)."""
        c = self.components
        return stats.mde(c, c["S"], c["J"]) if c and c["S"] > 1 else float("nan")

    def seeds_for(self, target: float) -> int | None:
        """Seeds (on these stories) that detect `target` at 80% power; None when the stories alone cannot."""
        c = self.components
        return stats.seeds_needed(c, c["J"], target) if c and c["S"] > 1 else None

    def power_sentence(self) -> str:
        """What this study could have detected and what it would take, in one sentence."""
        if not self.components or self.components["S"] < 2:
            return "With one seed the seed-to-seed variance is unknown: run `make study` (3 seeds) for the power."
        floor = stats.story_floor(self.components, self.components["J"])
        parts = [f"this study would detect |d| >= {self.mde():.3f} at 80% power"]
        for target in POWER_TARGETS:
            n = self.seeds_for(target)
            parts.append(f"about {n} seeds would detect {target:.2f}" if n is not None else
                         f"no number of seeds detects {target:.2f} on these {self.components['J']} stories (the "
                         f"stories alone set a floor of {floor:.3f}: it takes more val stories)")
        return "; ".join(parts)

    @property
    def line(self) -> str:
        seeds = len(self.per_seed)
        stories = next(iter(self.per_seed.values())).n
        return (f"{self.name} over {seeds} seed{'s' if seeds > 1 else ''} x {stories} stories: "
                f"{comparison.interval(self.mean, self.lo, self.hi)}")


def over_seeds(name: str, before: dict[int, evaluation.EvalResult], after: dict[int, evaluation.EvalResult]
               ) -> OverSeeds | None:
    """`after` - `before`, paired by seed (the seeds both have) and story; None without a common seed."""
    import numpy as np

    seeds = sorted(set(before) & set(after))
    if not seeds:
        return None
    per_seed = {s: comparison.compare(before[s], after[s]) for s in seeds}
    reward = [np.subtract(after[s].per_story_reward(), before[s].per_story_reward()) for s in seeds]
    rouge = [np.subtract(after[s].per_story_rouge_l(), before[s].per_story_rouge_l()) for s in seeds]
    mean, lo, hi = stats.two_level_bootstrap(reward)
    sd = float(np.std([c.diff for c in per_seed.values()], ddof=1)) if len(seeds) > 1 else float("nan")
    missed = sum(not c.lo <= mean <= c.hi for c in per_seed.values())
    return OverSeeds(name, per_seed, mean, lo, hi, sd, missed, stats.two_level_bootstrap(rouge),
                     stats.prob_positive(reward), stats.variance_components(reward))


def summarize(study: Study) -> dict[str, OverSeeds]:
    """Each method's gain over the untrained model, and ART - TRL, over the seeds that finished."""
    untrained = {s: study.before for s in study.seeds}
    out = {m: over_seeds(f"{m.upper()} gain", untrained, study.done(m)) for m in experiment.METHODS}
    out["art-trl"] = over_seeds("ART - TRL", study.done("trl"), study.done("art"))
    return {k: v for k, v in out.items() if v is not None}


def spread_record(study: Study, summary: dict[str, OverSeeds]) -> dict:
    """What the demo's report quotes: the seed spread of this study, with its date and commit."""
    def entry(o: OverSeeds) -> dict:
        return {"mean": o.mean, "lo": o.lo, "hi": o.hi, "sd": o.sd, "line": o.line,
                "per_seed": {str(s): c.diff for s, c in o.per_seed.items()}, "p_positive": o.p_positive,
                "mde": o.mde(), **{f"seeds_for_{t}": o.seeds_for(t) for t in POWER_TARGETS}}

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=experiment.ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    return {"recipe": Path(study.recipe_path).name, "setting": study.setting, "seeds": study.seeds,
            "stories": len(study.before.rows), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "commit": commit, **{k: entry(v) for k, v in summary.items()}}


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


def verdict(o: OverSeeds, name: str, ref: str, power: bool = False) -> str:
    """One sentence: detected or not, P(name > ref) from the two-level bootstrap, and (`power`: for ART - TRL,
    where a difference may be too small to see) what this design detects and what would settle it."""
    if o.lo > 0:
        head = f"**{name} is measurably better than {ref} over seeds and stories** ({o.line})"
    elif o.hi < 0:
        head = f"**{name} is measurably worse than {ref} over seeds and stories** ({o.line})"
    else:
        head = f"**No difference between {name} and {ref} detected over seeds and stories** ({o.line})"
    return f"{head}; P({name} > {ref}) = {o.p_positive:.2f} (two-level bootstrap)" + (
        f"; {o.power_sentence()}." if power else ".")


def render(study: Study, summary: dict[str, OverSeeds], png: Path | None) -> str:
    """The study's report as Markdown (what it prints and writes to study_report.md)."""
    r = study.recipe
    lines = [f"# Study: {', '.join(m.upper() for m in summary if m != 'art-trl')} over {len(study.seeds)} "
             f"training seeds on {Path(study.recipe_path).name}", "",
             f"Setting: **{experiment.SETTING_TITLES[study.setting]}**. Seeds {study.seeds} (training only). "
             f"Evaluation fixed for every run: {len(study.before.rows)} val stories x {1 + r.eval_samples} titles, "
             f"evaluation seed {r.seed}. Per-seed intervals: paired bootstrap over stories; over seeds: two-level "
             "bootstrap (training seeds and stories).", ""]
    if "art-trl" in summary:
        lines += [f"**{summary['art-trl'].line}**", ""]
    gains = {o.name.removesuffix(" gain"): o.mean for k, o in summary.items() if k != "art-trl"}
    lines += (_per_seed(study, summary) + _over_seeds(summary) + _power(summary)
              + comparison.reference_lines(study.before, study.refs, gains, experiment.run_names(
                  study.recipe_path, study.setting)["base"]) + _independent(study) + _parity(study))
    if png is not None:
        lines += ["## Curves", "", f"![val reward per method across seeds]({png.name})", "",
                  "Greedy-title validation during training; a line per seed, the band spans the seeds.", ""]
    if study.failed:
        lines += ["## Failed", ""] + [f"- seed {s}, {mr.method.title}: {mr.error}" for s, mr in study.failed] + [""]
    return "\n".join(lines + _runs(study) + ["", study.machine, ""] + decision(study, summary))


def _per_seed(study: Study, summary: dict[str, OverSeeds]) -> list[str]:
    lines = ["## Per seed", "", "| seed | " + " | ".join(o.name for o in summary.values()) + " |",
             "|---|" + "---|" * len(summary)]
    for seed in study.seeds:
        cells = [comparison.interval(c.diff, c.lo, c.hi) if (c := o.per_seed.get(seed)) else "failed"
                 for o in summary.values()]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return lines + [""]


def _over_seeds(summary: dict[str, OverSeeds]) -> list[str]:
    lines = ["## Over seeds", "", "| quantity | mean [95%, two-level] | between-seed sd | one run's story "
             "interval missed the mean | ROUGE-L [95%, two-level] |", "|---|---|---|---|---|"]
    for o in summary.values():
        lines.append(f"| {o.name} | **{comparison.interval(o.mean, o.lo, o.hi)}** | {comparison.fmt(o.sd, '.3f')} | "
                     f"{o.missed} of {len(o.per_seed)} seeds | {comparison.interval(*o.rouge)} |")
    names = {"art-trl": ("ART", "TRL")}
    return lines + [""] + [f"- {verdict(o, *names.get(k, (k.upper(), 'the untrained model')), power=k == 'art-trl')}"
                           for k, o in summary.items()] + [""]


def _power(summary: dict[str, OverSeeds]) -> list[str]:
    """ART - TRL: the variance components behind its interval, what the design detects, what would settle it."""
    o = summary.get("art-trl")
    if o is None or o.components.get("S", 0) < 2:
        return []
    c = o.components
    sd = {k: math.sqrt(c[k]) for k in ("seed", "story", "resid")}
    cells = [f"{n} seeds" if (n := o.seeds_for(t)) is not None else "no number (story floor)" for t in POWER_TARGETS]
    return ["## Power (ART - TRL)", "",
            "Variance components of the (seeds x stories) differences (two-way ANOVA, method of moments); the "
            "minimum detectable difference (MDE) at 80% power, two-sided 5%, for this design and on these stories "
            "(stats.mde: the two-level interval's rule, checked against a simulation in tests/test_power.py).", "",
            "| sd between seeds | sd between stories | sd residual | MDE (this design) | seeds to detect 0.05 | "
            "seeds to detect 0.02 | P(ART > TRL) |", "|---|---|---|---|---|---|---|",
            f"| {sd['seed']:.3f} | {sd['story']:.3f} | {sd['resid']:.3f} | {o.mde():.3f} | {cells[0]} | {cells[1]} | "
            f"{o.p_positive:.2f} |", ""]


def decision(study: Study, summary: dict[str, OverSeeds]) -> list[str]:
    """Which method to use, and why: three or four lines, each claim with its number."""
    gains = {k: o for k, o in summary.items() if k != "art-trl"}
    if not gains:
        return []
    gap = comparison.real_title_gap(study.before, study.refs)
    cost = {m: [comparison.run_cost(mr.run_dir, m) for rs in study.runs.values() for mr in rs
                if mr.method.name == m and mr.ok] for m in gains}

    def per_step(m: str, key: str) -> float:
        vals = [c[key] for c in cost[m] if c[key] is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    lines = ["## Which method should I use?", ""]
    lines.append("- **Gain**: " + "; ".join(
        f"{m.upper()} {comparison.interval(o.mean, o.lo, o.hi)} over {len(o.per_seed)} seeds "
        f"(sd {comparison.fmt(o.sd, '.3f')}){comparison.gap_share(o.mean, gap)}" for m, o in gains.items()) + ".")
    if (d := summary.get("art-trl")) is not None:
        lines.append(f"- **Difference**: ART - TRL {comparison.interval(d.mean, d.lo, d.hi)}, P(ART > TRL) = "
                     f"{d.p_positive:.2f}; {d.power_sentence()}.")
    lines.append("- **Cost per step**: " + "; ".join(
        f"{m.upper()} {per_step(m, 'step_seconds'):.1f} s wall, {per_step(m, 'step_cpu_seconds'):.1f} s CPU"
        for m in gains) + " (this machine; validation not included).")
    lines += [f"- {w}" for w in warnings(study, gains)]
    lines.append("- **So**: " + choice(summary, {m: per_step(m, "step_cpu_seconds") for m in gains}))
    return lines + [""]


def warnings(study: Study, gains: dict[str, OverSeeds]) -> list[str]:
    """The independent metrics' objections: a reward gain ROUGE-L does not show, one template taking over."""
    out = []
    for m, o in gains.items():
        if o.lo > 0 and not o.rouge[1] > 0:
            out.append(f"**{m.upper()}'s reward rose but ROUGE-L to the real titles did not** "
                       f"({comparison.interval(*o.rouge)}): its titles did not get closer to the real ones.")
        for r in study.done(m).values():
            if flag := comparison.template_takeover(study.before, r, m.upper()):
                out.append(flag)
                break
    return out


def choice(summary: dict[str, OverSeeds], cpu: dict[str, float]) -> str:
    """The recommendation the numbers support."""
    d = summary.get("art-trl")
    if d is None:
        return "one method only: compare it with the other by running both (`METHODS=trl,art`)."
    if d.lo > 0 or d.hi < 0:
        better = "ART" if d.lo > 0 else "TRL"
        return (f"use {better}: it is measurably better over seeds and stories "
                f"({comparison.interval(d.mean, d.lo, d.hi)}).")
    steadier = min((k for k in summary if k != "art-trl"), key=lambda k: summary[k].sd)
    cheaper = min(cpu, key=lambda k: cpu[k])
    return (f"no difference is detected, so pick on cost and steadiness: {cheaper.upper()} is cheaper per step "
            f"({cpu[cheaper]:.1f} s CPU), {steadier.upper()} moves less with the seed (sd "
            f"{summary[steadier].sd:.3f}); more seeds settle the rest (see Power).")


def _independent(study: Study) -> list[str]:
    lines = ["## Independent metrics per run (the reward sees neither)", "",
             "| seed | method | reward | ROUGE-L | top template's share | copy fraction | title words |",
             "|---|---|---|---|---|---|---|"]
    rows = [(str(s), mr.method.name, mr.result) for s in study.seeds for mr in study.runs[s] if mr.ok]
    for seed, method, result in [*rows, ("", "untrained", study.before)]:
        v = comparison.summarize(result)
        lines.append(f"| {seed} | {method} | {v['reward_mean']:.3f} | {v['rouge_l_mean']:.3f} | "
                     f"{v['template_share']:.0%} (`{v['template_top']}`) | {v['copy_frac_mean']:.2f} | "
                     f"{v['title_len_mean']:.1f} |")
    return lines + [""]


def _parity(study: Study) -> list[str]:
    """The same-update check: do the two methods' updates agree on one fixed group?"""
    if not study.parity:
        return []
    from hntitles.analysis import update_parity

    group = next(iter(study.parity.values()))[0].get("group", {})
    lines = ["## Same batch, same update?", "",
             f"One fixed group (story {group.get('story_id')}, {len(group.get('rewards', []))} completions of "
             f"{group.get('lengths')} tokens, fixed rewards) through each trainer's own update code from the same "
             "adapter (update_parity); per step, the cosine and relative L2 (||d_ART - d_TRL|| / ||d_TRL||) of "
             "the two adapter updates. Agreement here means a difference between the methods' results is a "
             "difference between the runs (seeds, sampling), not between the updates.", ""]
    for name, rows in study.parity.items():
        lines += [f"**{name}**", "", update_parity.markdown(rows), ""]
    return lines


def _runs(study: Study) -> list[str]:
    lines = ["## Runs and time", ""] + [f"- seed {s}, {mr.method.title}: `{rundir.shown(mr.run_dir)}`"
                                        for s, rs in study.runs.items() for mr in rs]
    lines += ["", "| stage | wall time | CPU time |", "|---|---|---|"]
    lines += [f"| {name} | {comparison.fmt_duration(sec)} | {comparison.fmt_cpu(cpu)} |"
              for (name, sec), cpu in zip(study.stages, study.cpu, strict=True)]
    if study.stages:
        lines += [f"| **total** | **{comparison.fmt_duration(sum(sec for _, sec in study.stages))}** | "
                  f"{comparison.fmt_cpu(sum(c for c in study.cpu if c == c))} |"]
    if any("(reused" in name for name, _ in study.stages):
        lines += ["", "A reused run trained nothing in this invocation: its row is the time it took when it trained "
                  "(its metrics' wall time); the total counts it."]
    return lines


def plot(study: Study, out: Path) -> Path | None:
    """Val reward during training per method: a thin line per seed, a band across seeds, the untrained line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for colour, method in zip(("tab:blue", "tab:orange"), experiment.METHODS, strict=True):
        curves = {}
        for mr in (mr for rs in study.runs.values() for mr in rs if mr.method.name == method):
            rows = [r for r in rundir.read_metrics(mr.run_dir)[0] if r["split"] == "val" and r["method"] == method]
            curves[mr.run_dir.name] = {r["step"]: r["reward_mean"] for r in rows}
        steps = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
        if not steps:
            continue
        drawn = True
        for curve in curves.values():
            ax.plot(steps, [curve[s] for s in steps], color=colour, alpha=0.35, linewidth=1)
        lows = [min(c[s] for c in curves.values()) for s in steps]
        highs = [max(c[s] for c in curves.values()) for s in steps]
        ax.fill_between(steps, lows, highs, color=colour, alpha=0.2, label=f"{method.upper()} ({len(curves)} seeds)")
    greedy = [s.reward for s in study.before.greedy]
    ax.axhline(sum(greedy) / max(len(greedy), 1), color="grey", linestyle="--", label="untrained (greedy)")
    ax.set(xlabel="step", ylabel="val reward (greedy titles)", title=f"{Path(study.recipe_path).name}, {study.setting}")
    ax.legend()
    fig.tight_layout()
    if drawn:
        fig.savefig(out, dpi=120)
    plt.close(fig)
    return out if drawn else None


def finish(study: Study, study_dir: Path, docs_dir: Path) -> Study:
    """Compute, plot, write the report and the seed spread; print the per-seed table and the one line."""
    summary = summarize(study)
    study.refs = experiment.read_references(study_dir.parent / experiment.run_names(
        study.recipe_path, study.setting)["base"])
    study_dir.mkdir(parents=True, exist_ok=True)
    if study.stages:  # what --report_only shows again: the stage times of the run that trained
        (study_dir / STAGES_FILE).write_text(json.dumps({"stages": study.stages, "cpu": study.cpu,
                                                         "machine": study.machine}) + "\n", encoding="utf-8")
    png = plot(study, study_dir / "study.png")
    text = render(study, summary, png)
    (study_dir / REPORT_FILE).write_text(text, encoding="utf-8")
    if summary:
        spread = comparison.spread_path(docs_dir, study.recipe_path, study.setting)
        spread.parent.mkdir(parents=True, exist_ok=True)
        spread.write_text(json.dumps(spread_record(study, summary), indent=2) + "\n", encoding="utf-8")
    print("\n" + text)
    print(f"report -> {study_dir / REPORT_FILE}" + (f"; plot -> {png}" if png else ""))
    return study


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    import signal

    from transformers import HfArgumentParser

    signal.signal(signal.SIGTERM, _raise_interrupt)  # so every `finally` (server stop) runs on SIGTERM too
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli_args = HfArgumentParser(StudyArgs, description=__doc__.splitlines()[0]).parse_args_into_dataclasses()[0]
    result = main(cli_args)
    sys.exit(1 if result.failed else 0)
