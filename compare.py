"""Compare runs of either trainer (and baselines) from their metrics.jsonl: plots and one table.

Reads any number of run directories (default: every run under runs/, e.g. the demo's
TRL and ART runs and their untrained baseline), draws PNG plots (val reward vs step and vs
wall-clock time, train reward, match rate, title length, copying, ROUGE-L to the real title
and the top template's share vs step; one colour per method, the untrained baseline as a
band) and writes a markdown table with one row per run. Runs that are still going are fine: a partial last
line, a run with only train rows or no metrics yet each give a note, never a crash.

    python compare.py                                   # every run under runs/ -> runs/compare/
    python compare.py runs/trl-cpu runs/art-cpu runs/base-cpu --out_dir docs
    make compare RUNS="runs/trl-cpu runs/base-cpu"
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hntitles.analysis import stats
from hntitles.runs import rundir, settings

# Recipe fields that name places, not experimental choices: never reported as differences.
NOT_KNOBS = {"run_name", "runs_dir", "reward_url", "reward_timeout", "reward_retries", "dataset"}
TOKENS_PER_S_KEYS = ("tokens_per_s", "tokens_per_second", "completion_tokens_per_s")


@dataclass
class CompareArgs:
    # Not a default read from os.environ here: that would run at import, before parse() loads .env.
    runs_dir: str = field(default="", metadata={
        "help": "Where to look for runs when none are given (every folder with metrics.jsonl "
                "or config.json; default: RUNS_DIR from the environment or .env, else runs/)."})
    out_dir: str = field(default="", metadata={
        "help": "Where compare.md and the PNGs go (default: <runs_dir>/compare)."})
    n_boot: int = field(default=2000, metadata={
        "help": "Bootstrap resamples for the 95 percent interval over val stories."})
    plots: bool = field(default=True, metadata={"help": "Draw the PNGs (--no_plots for the table only)."})
    panels: bool = field(default=True, metadata={
        "help": "Besides compare.png, one PNG per panel (--no_panels: compare.png only)."})
    examples: int = field(default=4, metadata={"help": "Val stories shown with each run's greedy title (0 = none)."})


@dataclass
class Run:
    """One run (or one method inside a run folder) as read from disk."""

    path: Path
    label: str
    rows: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    exists: bool = True  # False: the path given is not a run folder (a note, no table row)

    @property
    def method(self) -> str:
        methods = Counter(r.get("method") or "?" for r in self.rows)
        return methods.most_common(1)[0][0] if methods else "n/a"

    def split(self, name: str) -> list[dict]:
        """Rows of one split ordered by step, one per step: a resumed run may log a step again,
        and the later row (the run that went on) wins."""
        by_step = {r["step"]: r for r in self.rows if r.get("split") == name}
        return [by_step[k] for k in sorted(by_step)]

    @property
    def titles_per_story(self) -> int | None:
        """The validation protocol of the latest val row: 1 = greedy only, 1 + eval_samples otherwise."""
        val = [r for r in self.split("val") if r.get("n") and (r.get("extra") or {}).get("stories")]
        return round(val[-1]["n"] / val[-1]["extra"]["stories"]) if val else None

    @property
    def is_reference(self) -> bool:
        """A baseline: one validation and no training (drawn as a horizontal line)."""
        return len(self.split("val")) == 1 and not self.split("train")


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def find_runs(runs_dir: Path, exclude: Path | None = None) -> list[Path]:
    if not runs_dir.is_dir():
        return []
    found = []
    for p in sorted(runs_dir.iterdir()):
        if not p.is_dir() or (exclude is not None and p.resolve() == exclude.resolve()):
            continue
        if (p / rundir.METRICS_FILE).exists() or (p / "config.json").exists():
            found.append(p)
    return found


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_config(run_dir: Path) -> tuple[dict, list[str]]:
    path = run_dir / "config.json"
    if not path.exists():
        return {}, []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return {}, [f"{_display(path)}: unreadable ({type(e).__name__}); model and recipe unknown"]
    if not isinstance(data, dict):
        return {}, [f"{_display(path)}: not a JSON object; ignored"]
    return data, []


def load_run(path: Path) -> list[Run]:
    """The runs in one folder: one per method (and evaluation label) in its metrics, usually one."""
    if path.name == rundir.METRICS_FILE:
        path = path.parent
    label = path.name
    if not path.is_dir():
        return [Run(path, label, notes=[f"{_display(path)}: no such run directory"], exists=False)]
    config, notes = read_config(path)
    rows, metric_notes = rundir.read_metrics(path)
    notes += [n.replace(str(path / rundir.METRICS_FILE), f"{_display(path)}/{rundir.METRICS_FILE}")
              for n in metric_notes]
    if (path / rundir.METRICS_FILE).exists() and not rows and not metric_notes:
        notes.append(f"{_display(path)}/{rundir.METRICS_FILE} is empty (run just started?)")
    bad = [r for r in rows
           if not isinstance(r["step"], int) or isinstance(r["step"], bool) or not isinstance(r["split"], str)]
    if bad:
        notes.append(f"{_display(path)}/{rundir.METRICS_FILE}: {len(bad)} row(s) with a non-integer step or no split; "
                     "skipped")
        rows = [r for r in rows if not any(r is x for x in bad)]
    groups: dict[str, list[dict]] = {}
    trained = {r.get("method") or "?" for r in rows if r["split"] == "train"}
    labels: dict[str, set] = {}
    for r in rows:
        labels.setdefault(r.get("method") or "?", set()).add((r.get("extra") or {}).get("label"))
    for r in rows:
        method, eval_label = r.get("method") or "?", (r.get("extra") or {}).get("label")
        # evaluate.py output (no training) with several labels: one series per label
        key = f"{method}: {eval_label}" if eval_label and method not in trained and len(labels[method]) > 1 else method
        groups.setdefault(key, []).append(r)
    if len(groups) <= 1:
        return [_checked(Run(path, label, rows, config, notes))]
    # One folder, several series: e.g. an eval folder holding 'base' and 'eval' rows, or the
    # evaluations `--label before` and `--label after` of evaluate.py, all at step 0.
    return [_checked(Run(path, f"{label} ({g})", group_rows, config, list(notes) if i == 0 else []))
            for i, (g, group_rows) in enumerate(sorted(groups.items()))]


def _checked(run: Run) -> Run:
    train, val = run.split("train"), run.split("val")
    seen: dict[tuple, list[dict]] = {}
    for r in run.rows:
        seen.setdefault((r["split"], r["step"]), []).append(r)
    for (split, step), same in seen.items():
        if len(same) < 2:
            continue
        labels = [(r.get("extra") or {}).get("label") or "-" for r in same]
        why = (f"validated {len(same)} times (labels: {', '.join(labels)}; e.g. by the trainer, then by evaluate.py)"
               if split == "val" and len(set(labels)) > 1 else f"logged {len(same)} times (a resumed run?)")
        run.notes.append(f"{run.label}: {split} step {step} {why}; the last row is used")
    if run.rows and not val:
        last = train[-1]["step"] if train else "?"
        run.notes.append(f"{run.label}: no validation yet ({len(train)} train rows up to step {last}); "
                         "not in the val columns")
    for r in val:
        if not stats.is_finite_number(r.get("reward_mean")) or not r.get("n"):
            run.notes.append(f"{run.label}: val row at step {r['step']} scored no titles; ignored")
    return run


# --------------------------------------------------------------------------------------
# Summary numbers
# --------------------------------------------------------------------------------------


def valid_val(run: Run) -> list[dict]:
    return [r for r in run.split("val") if stats.is_finite_number(r.get("reward_mean")) and r.get("n")]


def spread(row: dict, n_boot: int) -> tuple[str, tuple[float, float] | None]:
    """Text and interval for a val row: bootstrap over extra.story_reward, else ± std over titles."""
    values = [float(v) for v in (row.get("extra") or {}).get("story_reward") or [] if stats.is_finite_number(v)]
    ci = stats.bootstrap_ci(values, n_boot)
    if ci is not None:
        return f"[{ci[0]:.3f}, {ci[1]:.3f}]", ci
    if stats.is_finite_number(row.get("reward_std")):
        return f"± {row['reward_std']:.3f}", None
    return "", None


def model_of(run: Run) -> str:
    for r in reversed(run.split("val")):
        model = (r.get("extra") or {}).get("model")
        if model:
            return _short_model(str(model))
    recipe = run.config.get("recipe")
    if isinstance(recipe, dict) and recipe.get("model"):
        return _short_model(str(recipe["model"]))
    return "n/a"


def _short_model(model: str) -> str:
    # Local folders print as their last part; hub ids (org/name) stay whole.
    p = Path(model)
    return p.name if (p.is_absolute() or model.startswith((".", "models/"))) else model


def recipe_of(run: Run) -> str:
    """The recipe file's name: from config.json if saved, else the default run name <method>-<recipe>."""
    # Trainers save it as a top-level recipe_path / recipe_file, or inside their args section.
    for key, value in run.config.items():
        if key.startswith("recipe") and isinstance(value, str) and value:
            return Path(value).stem
    for section in run.config.values():
        if isinstance(section, dict) and isinstance(section.get("recipe"), str) and section["recipe"]:
            return Path(section["recipe"]).stem
    name = run.path.name
    if run.method != "n/a" and name.startswith(f"{run.method}-"):
        return name[len(run.method) + 1:]
    return "n/a"


def steps_per_hour(run: Run) -> float | None:
    """Optimizer steps per hour of wall-clock (validation time included), from the latest row."""
    timed = [r for r in run.rows if r["step"] > 0 and stats.is_finite_number(r.get("wall_time")) and r["wall_time"] > 0]
    if not timed or not run.split("train"):
        return None
    last = max(timed, key=lambda r: r["wall_time"])
    return last["step"] / last["wall_time"] * 3600


def tokens_per_s(run: Run) -> float | None:
    """Generated tokens per second of train-step time, where the trainer logs enough to know.

    Either a logged rate (extra.tokens_per_s and synonyms; mean over rows) or, from the
    TRL trainer's extras, completion_tokens_mean x completions / step_seconds summed over steps.
    """
    for split in ("train", "val"):
        vals = [(r.get("extra") or {}).get(k) for r in run.split(split) for k in TOKENS_PER_S_KEYS]
        vals = [v for v in vals if stats.is_finite_number(v)]
        if vals:
            return sum(vals) / len(vals)
    tokens = seconds = 0.0
    for r in run.split("train"):
        extra = r.get("extra") or {}
        if (stats.is_finite_number(extra.get("completion_tokens_mean"))
                and stats.is_finite_number(extra.get("step_seconds")) and extra["step_seconds"] > 0):
            tokens += extra["completion_tokens_mean"] * r["n"]
            seconds += extra["step_seconds"]
    return tokens / seconds if seconds else None


def summarize(run: Run, n_boot: int = 2000) -> dict:
    """The numbers of one table row (None where unknown)."""
    val = valid_val(run)
    out = {"run": run.label, "method": run.method, "model": model_of(run), "recipe": recipe_of(run),
           "steps": max((r["step"] for r in run.rows), default=None), "best": None, "final": None,
           "match_rate": None, "title_len": None, "rouge_l": None, "template_share": None,
           "titles_per_story": run.titles_per_story, "steps_per_hour": steps_per_hour(run),
           "tokens_per_s": tokens_per_s(run)}
    if val:
        best = max(val, key=lambda r: r["reward_mean"])  # the earliest step on ties
        final = val[-1]
        for key, row in (("best", best), ("final", final)):
            text, ci = spread(row, n_boot)
            out[key] = {"reward": row["reward_mean"], "step": row["step"], "spread": text, "ci": ci,
                        "std": row.get("reward_std")}
        out["match_rate"], out["title_len"] = final["match_rate"], final["title_len_mean"]
        extra = final.get("extra") or {}
        out["rouge_l"], out["template_share"] = extra.get("rouge_l_mean"), extra.get("template_share")
    return out


def _fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None or not stats.is_finite_number(x) else format(x, spec)


def _reward_cell(v: dict | None) -> str:
    return "n/a" if v is None else " ".join(x for x in (f"{v['reward']:.3f}", v["spread"], f"@{v['step']}") if x)


def table(summaries: list[dict]) -> str:
    head = ["Run", "Method", "Model", "Recipe", "Steps", "Titles/story", "Best val reward", "Final val reward",
            "Match rate", "Title words", "ROUGE-L", "Top template", "Steps/h", "Tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 5 + ["---:"] * 9) + "|"]
    for s in summaries:
        cells = [s["run"], s["method"], s["model"], s["recipe"], "n/a" if s["steps"] is None else str(s["steps"]),
                 "n/a" if s["titles_per_story"] is None else str(s["titles_per_story"]),
                 _reward_cell(s["best"]), _reward_cell(s["final"]),
                 "n/a" if s["match_rate"] is None else f"{s['match_rate']:.0%}",
                 _fmt(s["title_len"], ".1f"), _fmt(s["rouge_l"], ".3f"), _fmt(s["template_share"], ".0%"),
                 _fmt(s["steps_per_hour"], ".1f"), _fmt(s["tokens_per_s"], ".1f")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def knob_differences(runs: list[Run]) -> list[str]:
    """Shared recipe knobs that differ between runs that saved a config (fairness check)."""
    recipes = {r.label: r.config["recipe"] for r in runs if isinstance(r.config.get("recipe"), dict)}
    if len(recipes) < 2:
        return []
    keys = sorted({k for rec in recipes.values() for k in rec} - NOT_KNOBS)
    out = []
    for k in keys:
        values = {label: json.dumps(rec.get(k, "unset"), default=str) for label, rec in recipes.items()}
        if len(set(values.values())) > 1:
            out.append(f"`{k}`: " + ", ".join(f"{label}={v}" for label, v in values.items()))
    return out


def eval_records(run: Run) -> list[dict]:
    """Titles of the run's final validation: eval/<label>.jsonl (evaluate.py) or eval/step-NNNNN.jsonl (trainers)."""
    val = valid_val(run)
    if not val:
        return []
    final = val[-1]
    label = (final.get("extra") or {}).get("label") or f"step-{final['step']:05d}"
    path = run.path / "eval" / f"{label}.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # still being written
        if isinstance(rec, dict) and isinstance(rec.get("greedy"), dict):
            records.append(rec)
    return records


def examples_table(runs: list[Run], k: int) -> str:
    """The first k val stories: original title, then each run's greedy title (reward)."""
    per_run = {r.label: {str(rec.get("id")): rec for rec in eval_records(r)} for r in runs}
    per_run = {label: recs for label, recs in per_run.items() if recs}
    if not per_run or k <= 0:
        return ""
    ids: list[str] = []
    for recs in per_run.values():
        ids += [i for i in recs if i not in ids]
    ids = ids[:k]

    def cell(text: str, limit: int = 70) -> str:
        text = " ".join(str(text).split()).replace("|", "/")
        return text if len(text) <= limit else text[:limit - 1] + "…"

    lines = ["| Original | " + " | ".join(per_run) + " |", "|---|" + "---|" * len(per_run)]
    for i in ids:
        original = next((recs[i].get("original") for recs in per_run.values() if i in recs), "")
        cells = [cell(original or "")]
        for recs in per_run.values():
            g = recs.get(i, {}).get("greedy")
            cells.append("n/a" if g is None
                         else f"{cell(g.get('title') or '(empty)')} ({g.get('reward', float('nan')):.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------

PANELS = {
    # file stem: (title, y label, split, x, y)
    "val_reward_step": ("Val reward vs step", "val reward (mean over the validated titles)", "val", "step",
                        "reward_mean"),
    "val_reward_time": ("Val reward vs wall-clock", "val reward (mean over the validated titles)", "val", "wall_time",
                        "reward_mean"),
    "train_reward_step": ("Train reward vs step", "train reward (group mean)", "train", "step", "reward_mean"),
    "match_rate_step": ("Match rate vs step (val)", "titles supported by the body", "val", "step", "match_rate"),
    "title_len_step": ("Title length vs step (val)", "words per title", "val", "step", "title_len_mean"),
    "copy_frac_step": ("Copying vs step (val)", "longest verbatim body run / title words", "val", "step",
                       "copy_frac_mean"),
    # The reward never sees these two: similarity to the real title, and mode collapse onto one template.
    "rouge_l_step": ("ROUGE-L to the real title vs step (val)", "ROUGE-L F1 (not in the reward)", "val", "step",
                     "extra.rouge_l_mean"),
    "template_share_step": ("Top template's share vs step (val)", "share of titles with the commonest skeleton", "val",
                            "step", "extra.template_share"),
}
METHOD_COLORS = {"trl": "#1f77b4", "art": "#ff7f0e", "base": "#7f7f7f"}  # one colour per method, every plot
LINESTYLES = ("-", ":", "-.", (0, (5, 1)))  # several runs of one method (e.g. two settings)


def _get(row: dict, key: str):
    """row[key], or row['extra'][name] for 'extra.name'."""
    if key.startswith("extra."):
        return (row.get("extra") or {}).get(key[len("extra."):])
    return row.get(key)


def run_styles(runs: list[Run]) -> dict[str, tuple[str, object]]:
    """(colour, line style) per run: the colour names the method, the style tells its runs apart."""
    import matplotlib

    palette = [c for c in matplotlib.colormaps["tab10"].colors[2:]]
    extra_colors: dict[str, str] = {}
    seen: dict[str, int] = {}
    out = {}
    for run in runs:
        method = run.method
        if method not in METHOD_COLORS and method not in extra_colors:
            extra_colors[method] = matplotlib.colors.to_hex(palette[len(extra_colors) % len(palette)])
        color = METHOD_COLORS.get(method) or extra_colors[method]
        i = seen.get(method, 0)
        seen[method] = i + 1
        out[run.label] = (color, "--" if run.is_reference else LINESTYLES[i % len(LINESTYLES)])
    return out


def shown_references(runs: list[Run]) -> list[Run]:
    """Baselines whose validation protocol (titles per story) matches a training curve's.

    A curve validated with greedy titles only is compared with the baseline's greedy titles,
    not with its greedy + sampled mean (a different number). With no curves, every baseline shows.
    """
    curves = {r.titles_per_story for r in runs if not r.is_reference and r.split("val")}
    refs = [r for r in runs if r.is_reference]
    return refs if not curves else [r for r in refs if r.titles_per_story in curves]


def draw_panel(ax, panel: str, runs: list[Run], styles: dict[str, tuple[str, object]], n_boot: int) -> None:
    title, ylabel, split, x, y = PANELS[panel]
    drawn = False
    refs = {r.label for r in shown_references(runs)}
    for run in runs:
        if run.is_reference and run.label not in refs:
            continue
        rows = (valid_val(run) if split == "val"
                else [r for r in run.split("train") if stats.is_finite_number(_get(r, y))])
        rows = [r for r in rows if stats.is_finite_number(r.get(x)) and stats.is_finite_number(_get(r, y))]
        if not rows:
            continue
        drawn = True
        color, style = styles[run.label]
        xs = [r[x] / 60 if x == "wall_time" else r[x] for r in rows]
        ys = [_get(r, y) for r in rows]
        cis = [spread(r, n_boot)[1] for r in rows] if y == "reward_mean" and split == "val" else []
        if split == "val" and run.is_reference:
            # A baseline is one point; a horizontal line (and its interval as a band) makes it
            # a reference for every step. On the time axis it sits at 0: its wall_time is its
            # own evaluation, not training.
            ax.axhline(ys[0], color=color, linestyle=style, linewidth=1.2)
            if cis and cis[0] is not None:
                ax.axhspan(cis[0][0], cis[0][1], color=color, alpha=0.12, linewidth=0)
            ax.plot([0] if x == "wall_time" else xs, ys, marker="D", color=color, linestyle="none")
            continue
        ax.plot(xs, ys, marker="o" if split == "val" else None, markersize=4, color=color, linestyle=style,
                linewidth=1.5 if split == "val" else 1.0, alpha=1.0 if split == "val" else 0.8)
        if cis and all(ci is not None for ci in cis):
            lo, hi = [c[0] for c in cis], [c[1] for c in cis]
            if len(xs) > 1:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
            else:  # one validation so far: an error bar
                ax.errorbar(xs, ys, yerr=[[ys[0] - lo[0]], [hi[0] - ys[0]]], color=color, capsize=4, linestyle="none")
    if not drawn:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    # Every panel spans from 0 to the furthest any run got, so a baseline alone or a run that
    # has not validated yet still shows on the scale of the training so far.
    seen = [r for run in runs if not run.is_reference for r in run.rows if stats.is_finite_number(r.get(x))]
    right = max((r[x] / 60 if x == "wall_time" else r[x] for r in seen), default=0)
    if right > 0:
        ax.set_xlim(-0.03 * right, right * 1.03)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("wall-clock (minutes)" if x == "wall_time" else "step")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)


def plot(runs: list[Run], out_dir: Path, n_boot: int, panels: bool = True) -> list[Path]:
    """compare.png (all panels, one legend) and, if asked, one PNG per panel."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and in CI
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    styles = run_styles(runs)
    refs = {r.label for r in shown_references(runs)}

    def legend_label(r: Run) -> str:
        tps = r.titles_per_story
        protocol = "" if tps is None else f", val {'greedy only' if tps == 1 else f'{tps} titles/story'}"
        return f"{r.label} ({r.method}{protocol})"

    shown = [r for r in runs if not r.is_reference or r.label in refs]
    handles = [Line2D([], [], color=styles[r.label][0], linestyle=styles[r.label][1],
                      marker="D" if r.is_reference else "o", label=legend_label(r)) for r in shown]
    paths = []
    fig, axes = plt.subplots(2, 4, figsize=(19, 8.5))
    for ax, panel in zip(axes.flat, PANELS, strict=True):
        draw_panel(ax, panel, runs, styles, n_boot)
    fig.legend(handles=handles, loc="lower center", ncol=max(1, min(len(handles), 4)), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(handles) - 1) // 4), 1, 1))
    paths.append(out_dir / "compare.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for panel in PANELS if panels else ():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        draw_panel(ax, panel, runs, styles, n_boot)
        ax.legend(handles=handles, fontsize=7, loc="best")
        fig.tight_layout()
        paths.append(out_dir / f"{panel}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def report(runs: list[Run], summaries: list[dict], pngs: list[Path], examples: int = 0) -> str:
    parts = ["# Run comparison", "", table(summaries), "",
             "Val reward: mean reward over the greedy and sampled titles of the val stories (the same "
             "validator, reward model and rule for every run); `[a, b]` is a 95% bootstrap interval over "
             "stories, `±` the std over titles when per-story rewards are missing; `@N` is the step. "
             "Titles/story is the validation protocol (1 = greedy only, the demo's cheap in-training curve). "
             "Match rate, title words, ROUGE-L (F1 of the longest common word subsequence with the story's real "
             "title) and top template (share of titles with the commonest skeleton: first word, and for 'X: Y' "
             "titles the first word after the colon) are from the final validation; the reward sees neither of "
             "the last two. Steps/h counts wall-clock time "
             "including validation; tokens/s is completions' tokens per second of train-step time, shown when the "
             "trainer logs it."]
    shown = examples_table([r for r in runs if r.exists], examples)
    if shown:
        parts += ["", "## Greedy titles on the first val stories (final validation, reward in brackets)", "", shown]
    diffs = knob_differences(runs)
    if diffs:
        parts += ["", "## Recipe knobs that differ between runs", "", *[f"- {d}" for d in diffs]]
    notes = [n for r in runs for n in r.notes]
    if notes:
        parts += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    if pngs:
        parts += ["", f"![comparison]({pngs[0].name})"]
    return "\n".join(parts) + "\n"


def main(args: CompareArgs, run_paths: list[str] | None = None) -> dict:
    # resolved like the trainers' runs_dir, so `compare` finds what they wrote from any directory
    runs_dir = settings.resolve_runs_dir(args.runs_dir or os.environ.get("RUNS_DIR") or str(settings.ROOT / "runs"))
    out_dir = Path(args.out_dir) if args.out_dir else runs_dir / "compare"
    paths = [Path(p) for p in run_paths] if run_paths else find_runs(runs_dir, exclude=out_dir)
    if not paths:
        raise SystemExit(f"no runs found under {_display(runs_dir)} (folders with metrics.jsonl or config.json): "
                         "train with `make demo` / `make train-trl`, or pass run directories")
    runs = [run for p in paths for run in load_run(p)]
    summaries = [summarize(r, args.n_boot) for r in runs if r.exists]
    out_dir.mkdir(parents=True, exist_ok=True)
    plotted = [r for r in runs if r.rows]
    pngs = plot(plotted, out_dir, args.n_boot, args.panels) if args.plots and plotted else []
    text = report(runs, summaries, pngs, args.examples)
    (out_dir / "compare.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {_display(out_dir / 'compare.md')}"
          + (f" and {', '.join(_display(p) for p in pngs)}" if pngs else ""))
    return {"runs": runs, "summaries": summaries, "pngs": pngs, "markdown": text, "out_dir": out_dir}


def parse(argv: list[str] | None = None) -> tuple[CompareArgs, list[str]]:
    settings.load_env()  # RUNS_DIR may be set only in .env; main() reads it
    from transformers import HfArgumentParser

    parser = HfArgumentParser(CompareArgs, description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="Run directories (default: every run under --runs_dir).")
    args, rest = parser.parse_args_into_dataclasses(args=argv)
    return args, rest.runs


if __name__ == "__main__":
    cli_args, cli_runs = parse()
    main(cli_args, cli_runs)
