"""study.py's numbers on built evaluations (the whole study runs on the tiny recipe in
tests/test_demo.py), and its same-update section on the tiny model."""

from __future__ import annotations

import math

import pytest

import utils
from hntitles.analysis import evaluation
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
