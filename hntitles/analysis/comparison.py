"""Comparisons of evaluations on the same stories: paired intervals, verdicts, cost per step.

What the demo's report (and the study's) says about two policies comes from here:

- `compare(before, after)` -> `Comparison`: mean per-story reward difference with its paired
  bootstrap interval (stats.paired_bootstrap), stories better / worse, the same for ROUGE-L to the
  real titles, and each side's numbers (`summarize`);
- `verdict(comparison, name, ref)`: one sentence, with the independent metrics' warnings (a gain
  ROUGE-L does not confirm, titles collapsing onto one template, a copy fraction that rose);
- `run_cost(run_dir, method)`: per-step cost means from a run's train rows (costs.row_cost reads our
  own extras first, then ART's step metrics);
- `template_takeover`: the reward-hacking flag (one template's share doubled), with examples;
- `reference_lines`: the untrained model, the real titles and an optional prompted endpoint on the same
  reward, and each gain as a share of the gap to the real titles;
- `interval`, `fmt`, `fmt_duration`: how the reports print numbers;
- `spread_path`, `read_spread`, `spread_lines`: the seed spread the latest study measured
  (docs/study-<recipe>[-<setting>].json), which the demo's one-run report quotes.

    python -c "from hntitles.analysis import comparison; print(comparison.interval(0.215, 0.130, 0.283))"
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import utils
from hntitles.analysis import evaluation, stats
from hntitles.runs import costs, rundir


@dataclass
class Comparison:
    """Paired comparison of two evaluations on the same val stories (`after` - `before`)."""

    before: dict
    after: dict
    diff: float
    lo: float
    hi: float
    improved: int
    worse: int
    n: int
    rouge_diff: float = float("nan")
    rouge_lo: float = float("nan")
    rouge_hi: float = float("nan")

    @property
    def significant(self) -> bool:
        return self.lo > 0

    @property
    def copy_rose(self) -> bool:
        return self.after["copy_frac_mean"] > self.before["copy_frac_mean"] + 1e-9

    @property
    def template_rose(self) -> bool:
        """The commonest title skeleton gained 10 points or more: titles collapsing onto one form."""
        return self.after["template_share"] > self.before["template_share"] + 0.1

    @property
    def rouge_confirms(self) -> bool:
        return self.rouge_lo > 0


def summarize(result: evaluation.EvalResult) -> dict:
    """The shared-schema numbers of one evaluation, the greedy-only mean and the independent metrics."""
    row = utils.metrics_row(method="", step=0, split="val", scored=result.all_scored(), wall_time=0)
    row["greedy_reward_mean"] = stats.describe(s.reward for s in result.greedy)["mean"]
    row.update(result.independent())
    return row


def compare(before: evaluation.EvalResult, after: evaluation.EvalResult, seed: int = 0) -> Comparison:
    ids_b, ids_a = [r.get("id") for r in before.rows], [r.get("id") for r in after.rows]
    if ids_b != ids_a:
        raise ValueError("the two evaluations cover different stories; a paired comparison needs the same")
    b, a = before.per_story_reward(), after.per_story_reward()
    diff, lo, hi = stats.paired_bootstrap(a, b, seed=seed)
    rd, rlo, rhi = stats.paired_bootstrap(after.per_story_rouge_l(), before.per_story_rouge_l(), seed=seed)
    return Comparison(before=summarize(before), after=summarize(after), diff=diff, lo=lo, hi=hi,
                      improved=sum(x > y for x, y in zip(a, b)), worse=sum(x < y for x, y in zip(a, b)), n=len(a),
                      rouge_diff=rd, rouge_lo=rlo, rouge_hi=rhi)


def verdict(cmp: Comparison, name: str, ref: str) -> str:
    """One sentence on `name` vs `ref` and what the independent metrics say about it."""
    if cmp.significant:
        out = f"**{name} is measurably better than {ref}** (the interval excludes 0)."
    elif cmp.hi < 0:
        out = f"**{name} is measurably worse than {ref}** (the interval is below 0)."
    else:
        out = f"**No measurable difference between {name} and {ref}** (the interval includes 0)."
    if cmp.significant and not cmp.rouge_confirms:
        out += (f" **The reward gain does not show on ROUGE-L** ({cmp.rouge_diff:+.3f} [{cmp.rouge_lo:+.3f}, "
                f"{cmp.rouge_hi:+.3f}]): the titles did not get closer to the real ones.")
    if cmp.template_rose:
        out += (f" **Titles collapsed toward one template**: `{cmp.after['template_top']}` "
                f"{cmp.before['template_share']:.0%} -> {cmp.after['template_share']:.0%}.")
    if cmp.copy_rose and cmp.significant:
        out += " **The copy fraction rose**: part of the gain may come from copying the article."
    return out


def template_takeover(before: evaluation.EvalResult, after: evaluation.EvalResult, name: str) -> str | None:
    """A warning when one title skeleton's share at least doubled (and is over 20%): likely reward hacking,
    with two of the titles as examples; None otherwise."""
    from hntitles.reward.text_metrics import title_template

    b, a = summarize(before), summarize(after)
    if not (a["template_share"] >= 2 * b["template_share"] and a["template_share"] > 0.2):
        return None
    examples = [x.title for x in after.all_scored() if title_template(x.title) == a["template_top"]][:2]
    return (f"**Likely reward hacking ({name})**: `{a['template_top']}` went from {b['template_share']:.0%} of the "
            f"untrained model's titles to {a['template_share']:.0%} (e.g. {'; '.join(repr(e) for e in examples)}).")


def real_title_gap(before: evaluation.EvalResult, refs: dict[str, evaluation.EvalResult]) -> float:
    """The real titles' mean val reward minus the untrained model's (nan when the real titles were not scored)."""
    real = refs.get("reference")
    return summarize(real)["reward_mean"] - summarize(before)["reward_mean"] if real is not None else float("nan")


def gap_share(gain: float, gap: float) -> str:
    """The text ", N% of the gap to the real titles (+G)" for a positive gap; empty otherwise."""
    return f", {gain / gap:.0%} of the gap to the real titles ({gap:+.3f})" if gap > 0 else ""


def reference_lines(before: evaluation.EvalResult, refs: dict[str, evaluation.EvalResult],
                    gains: dict[str, float], base_name: str) -> list[str]:
    """The report's reference rows: what the untrained model, the real Hacker News titles and (when a user
    scored one) a prompted endpoint get on the same stories, reward and rule; each method's gain as a share
    of the gap between the untrained model and the real titles."""
    lines = ["## References: what a title scores on this reward", "",
             "| titles | val reward | ROUGE-L to the real title | top template's share |", "|---|---|---|---|"]
    named = {"untrained": ("untrained model", before), "reference": ("real Hacker News titles", refs.get("reference")),
             "openai": ("prompted endpoint (optional)", refs.get("openai"))}
    for key, (label, result) in named.items():
        if result is None:
            if key == "openai":
                lines.append(f"| {label} | not run: set `OPENAI_*` and run `python evaluate.py --generator openai "
                             f"--run_name {base_name} --label openai` | | |")
            continue
        v = summarize(result)
        lines.append(f"| {label} | {v['reward_mean']:.3f} | {v['rouge_l_mean']:.3f} | "
                     f"{v['template_share']:.0%} (`{v['template_top']}`) |")
    if refs.get("reference") is None:
        return lines + ["", "The real titles were not scored (an older run): run the demo again for this row.", ""]
    gap = real_title_gap(before, refs)
    lines.append("")
    if gap <= 0:
        return lines + [f"The untrained model already scores {-gap:.3f} above the real titles on this reward, so a "
                        "gain is no step toward them: read it with ROUGE-L.", ""]
    shares = "; ".join(f"{name} {gain:+.3f} = {gain / gap:.0%} of it" for name, gain in gains.items())
    return lines + [f"Gap from the untrained model to the real titles: {gap:+.3f}. " + (shares + "." if shares else ""),
                    ""]


def mean_cost(rows: Sequence[dict], name: str) -> float | None:
    vals = [v for v in (costs.row_cost(r, name) for r in rows) if v is not None]
    return sum(vals) / len(vals) if vals else None


def run_cost(run_dir: Path, method: str) -> dict:
    """Per-step cost means from a run's own train rows (every step it ever trained, each once) and
    its in-training validations."""
    rows, _ = rundir.read_metrics(run_dir)
    by_step = {r["step"]: r for r in rows if r["split"] == "train" and r["method"] == method}
    train = [by_step[k] for k in sorted(by_step)]
    val = [r for r in rows if r["split"] == "val" and r["method"] == method]
    return {"steps": len(train), **{name: mean_cost(train, name) for name in costs.COST_KEYS},
            "val_seconds": sum((r.get("extra") or {}).get("eval_seconds") or 0.0 for r in val), "vals": len(val)}


def fmt(x, spec: str) -> str:
    """`x` formatted, or n/a for a missing or non-finite number."""
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def fmt_cpu(seconds: float) -> str:
    """A stage's CPU seconds; a reused stage's (not recorded: NaN) shows as such.

    >>> fmt_cpu(12.4), fmt_cpu(float("nan"))
    ('12 s', 'not recorded (reused)')
    """
    return "not recorded (reused)" if seconds != seconds else f"{seconds:.0f} s"


def fmt_duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)" if seconds >= 60 else f"{seconds:.0f} s"


def interval(diff: float, lo: float, hi: float) -> str:
    """A difference and its interval as the reports print them.

    >>> interval(-0.0617, -0.1291, 0.0)
    '-0.062 [-0.129, +0.000]'
    """
    return f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def spread_path(docs_dir: Path, recipe_path: str, setting: str) -> Path:
    """Where a study of this recipe and setting writes its seed spread.

    >>> spread_path(Path("docs"), "recipes/cpu.yaml", "aligned").as_posix()
    'docs/study-cpu-aligned.json'
    """
    return docs_dir / f"study-{Path(recipe_path).stem}{'' if setting == 'defaults' else '-' + setting}.json"


def read_spread(docs_dir: Path, recipe_path: str, setting: str) -> dict | None:
    """The latest study's seed spread for this recipe and setting, or None when there is none."""
    path = spread_path(docs_dir, recipe_path, setting)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def spread_lines(spread: dict | None, recipe_path: str, setting: str) -> list[str]:
    """The demo report's paragraph on the seed spread: one run's verdict is one draw of the training seed."""
    if spread is None:
        return ["One training seed: the intervals above cover the stories, not the training run. No study has "
                f"measured the seed spread of {Path(recipe_path).name} ({setting}) yet: `make study` does.", ""]
    lines = [f"One training seed: the intervals above cover the stories, not the training run. The latest study "
             f"({len(spread['seeds'])} seeds {spread['seeds']}, {spread['date'][:10]}, commit {spread['commit']}):", ""]
    for key in ("trl", "art", "art-trl"):
        if key in spread:
            e = spread[key]
            lines.append(f"- {e['line']}; between-seed sd {fmt(e['sd'], '.3f')}; per seed "
                         + ", ".join(f"{s}: {v:+.3f}" for s, v in e["per_seed"].items()))
    return lines + [""]
