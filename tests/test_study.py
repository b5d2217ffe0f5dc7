"""study.py's numbers on built evaluations (the whole study runs on the tiny recipe in
tests/test_demo.py), and its same-update section on the tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import utils
from hntitles.analysis import comparison, evaluation, stats
from hntitles.runs import settings


def result(rewards: list[float]) -> evaluation.EvalResult:
    scored = [utils.Scored(title="A title of five words", rm=r, matches=True, trailing=False, reward=r)
              for r in rewards]
    rows = [{"id": i, "title": f"Original {i}"} for i in range(len(rewards))]
    return evaluation.EvalResult(greedy=scored, sampled=[[] for _ in rewards], rows=rows)


BEFORE = [0.20, 0.25, 0.30, 0.22, 0.28, 0.26]


def test_over_seeds_pairs_by_seed_and_story_and_counts_misses():
    import study

    untrained = {42: result(BEFORE), 43: result(BEFORE), 44: result(BEFORE)}
    # seed 42 gains 0.3 on every story, 43 and 44 gain 0.05: one run's story interval is [0.3, 0.3]
    trained = {42: result([b + 0.3 for b in BEFORE]), 43: result([b + 0.05 for b in BEFORE]),
               44: result([b + 0.05 for b in BEFORE])}
    o = study.over_seeds("TRL gain", untrained, trained)
    assert o.mean == pytest.approx((0.3 + 0.05 + 0.05) / 3)
    assert o.sd == pytest.approx(math.sqrt(((0.3 - o.mean) ** 2 + 2 * (0.05 - o.mean) ** 2) / 2))
    assert o.missed == 3  # every seed's story-only interval is a point away from the mean over seeds
    assert o.lo <= 0.05 + 1e-9 and o.hi >= 0.3 - 1e-9  # the two-level interval spans the seeds
    assert o.line.startswith("TRL gain over 3 seeds x 6 stories: +0.133 [")
    assert study.over_seeds("x", untrained, {}) is None  # no seed in common: nothing to compare


@pytest.mark.slow  # loads the tiny model and MiniLM, runs both trainers' update code
def test_same_update_runs_both_trainers_once_and_caches(tmp_path):
    import study

    recipe = settings.parse_args((settings.Recipe,), "eval", ["--recipe", "recipes/tiny.yaml", "--optimizer", "adamw",
                                                              "--weight_decay", "0.0", "--adam_beta2", "0.999",
                                                              "--optimizer_steps", "per_step"])[0]
    cache = tmp_path / "parity.json"
    rows = study.same_update(recipe, 1, cache)
    assert set(rows) == set(study.PARITY_VARIANTS) and all(len(r) == 1 for r in rows.values())
    assert rows["aligned"][0]["cosine"] > 0.999  # the aligned knobs: the same update (tests/test_update_parity.py)
    assert study.same_update(recipe, 1, cache) == rows  # read back: the same rows, nothing recomputed
    text = "\n".join(study._parity(study.Study(recipe=recipe, recipe_path="recipes/tiny.yaml", setting="aligned",
                                               seeds=[42], before=result(BEFORE), runs={}, parity=rows)))
    assert "## Same batch, same update?" in text and "| step | cosine |" in text


def _study(trl_gain: list[float], art_gain: list[float], art_titles: str = "A title of five words"):
    """A 3-seed study of built evaluations: per seed s, TRL gains trl_gain[s] and ART art_gain[s] on every story
    (plus a per-story wobble so the story variance is not zero)."""
    import study
    from hntitles.analysis import experiment

    wobble = [0.00, 0.03, -0.02, 0.01, -0.03, 0.02]
    runs = {}
    for k, seed in enumerate((42, 43, 44)):
        runs[seed] = []
        for name, gain in (("trl", trl_gain[k]), ("art", art_gain[k])):
            mr = experiment.MethodRun(experiment.METHODS[name], Path(f"/nonexistent/{name}-{seed}"))
            mr.result = result([b + gain + (w if name == "art" else 0.0) for b, w in zip(BEFORE, wobble)])
            if name == "art":
                for g in mr.result.greedy:
                    g.title = art_titles
            runs[seed].append(mr)
    return study.Study(recipe=settings.Recipe(), recipe_path="recipes/cpu.yaml", setting="aligned",
                       seeds=[42, 43, 44], before=result(BEFORE), runs=runs)


def test_the_verdict_carries_the_power_and_the_decision_its_numbers():
    import study

    s = _study([0.20, 0.21, 0.22], [0.15, 0.19, 0.17])
    s.refs = {"reference": result([b + 0.5 for b in BEFORE])}
    summary = study.summarize(s)
    d = summary["art-trl"]
    assert 0.0 <= d.p_positive < 0.05 and d.components["S"] == 3 and d.components["J"] == len(BEFORE)
    assert d.mde() == pytest.approx(stats.mde(d.components, 3, len(BEFORE)))
    text = study.render(s, summary, None)
    assert f"this study would detect |d| >= {d.mde():.3f} at 80% power" in text
    assert f"P(ART > TRL) = {d.p_positive:.2f}" in text and "## Power (ART - TRL)" in text
    n = stats.seeds_needed(d.components, len(BEFORE), 0.05)
    assert (f"about {n} seeds would detect 0.05" if n else "no number of seeds detects 0.05") in text
    decision = text[text.index("## Which method should I use?"):]
    assert f"TRL {comparison.interval(summary['trl'].mean, summary['trl'].lo, summary['trl'].hi)}" in decision
    assert "of the gap to the real titles (+0.500)" in decision and "- **So**: use TRL" in decision
    assert "reward hacking" not in decision  # every title has the untrained model's template


def test_the_decision_flags_a_template_that_took_over_and_a_gain_rouge_does_not_show():
    import study

    s = _study([0.20, 0.21, 0.22], [0.20, 0.22, 0.21], art_titles="The Thing: A Story")
    s.before = result(BEFORE)  # the untrained model's titles: a different template on every story
    for i, g in enumerate(s.before.greedy):
        g.title = ["Why A", "How B", "A new C", "D is out", "Show HN: E", "F at G"][i]
    summary = study.summarize(s)
    text = "\n".join(study.decision(s, summary))
    assert "**Likely reward hacking (ART)**: `the …: a …` went from" in text and "'The Thing: A Story'" in text
    assert "TRL's reward rose but ROUGE-L to the real titles did not" in text  # TRL kept the untrained titles
