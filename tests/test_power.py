"""stats' power functions: the variance components recovered from simulated (seeds x stories) data, and
the minimum detectable effect against a simulation of the study's own rule ("the two-level bootstrap
95% interval excludes 0") on the same crossed design: d[s][j] = mu + a_s + b_j + e_sj."""

import math

import numpy as np
import pytest

from hntitles.analysis import stats

# Story variance dominating, as in the real study (per-cell ART - TRL reward differences).
STUDY = {"seed": 0.02 ** 2, "story": 0.08 ** 2, "resid": 0.06 ** 2}
STORIES = 24


def simulate(components: dict, seeds: int, stories: int, n: int, mean: float = 0.0, seed: int = 0) -> np.ndarray:
    """`n` datasets (n x seeds x stories) of the two-level model, drawn at once."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, math.sqrt(components["seed"]), (n, seeds, 1))
    b = rng.normal(0, math.sqrt(components["story"]), (n, 1, stories))
    e = rng.normal(0, math.sqrt(components["resid"]), (n, seeds, stories))
    return mean + a + b + e


def detection_rate(datasets: np.ndarray, n_boot: int = 1000) -> float:
    """The study's rule on every dataset: the share whose two-level 95% interval excludes 0."""
    hits = 0
    for i, d in enumerate(datasets):
        _, lo, hi = stats.two_level_bootstrap(d, n_boot=n_boot, seed=i)
        hits += lo > 0 or hi < 0
    return hits / len(datasets)


def test_variance_components_are_recovered():
    truth = {"seed": 0.05 ** 2, "story": 0.08 ** 2, "resid": 0.06 ** 2}
    estimates = [stats.variance_components(d) for d in simulate(truth, 5, STORIES, 200, mean=0.1, seed=1)]
    assert {(e["S"], e["J"]) for e in estimates} == {(5, STORIES)}
    for key, value in truth.items():
        assert np.mean([e[key] for e in estimates]) == pytest.approx(value, rel=0.15), key


def test_one_seed_reports_story_plus_residual_and_no_seed_variance():
    estimates = [stats.variance_components(d) for d in simulate(STUDY, 1, STORIES, 200, seed=2)]
    assert all(math.isnan(e["seed"]) and e["resid"] == 0.0 for e in estimates)
    assert np.mean([e["story"] for e in estimates]) == pytest.approx(STUDY["story"] + STUDY["resid"], rel=0.15)
    one = estimates[0]  # ... and standard_error reads it as the story bootstrap would: sqrt(var / J)
    assert stats.standard_error(one, 1, STORIES) == pytest.approx(math.sqrt(one["story"] / STORIES))
    with pytest.raises(ValueError, match=">= 2 stories"):
        stats.variance_components([[0.1], [0.2]])


# Tolerances for the rule simulated at the mde (N datasets each): binomial SE sqrt(0.8 * 0.2 / 400) = 0.02,
# so 3 SE = 0.06; plus 0.06 for the percentile bootstrap's known small-S bias (its spread is a plug-in:
# (S-1)/S on the seed term, the residual counted more than once), which is the power shift of a
# bootstrap standard error 10% off the true one (Phi(2.80 - 1.96 * 1.1) = 0.74, Phi(2.80 - 1.96 * 0.9)
# = 0.85). Hence 0.68 - 0.92. At mean 0: nominal 0.05; a 10% too narrow interval rejects 0.078, plus
# 3 binomial SE (0.04): <= 0.12. (Observed here: S=3 power 0.800, size 0.070; S=6 0.778, 0.038; with
# 3000 datasets: S=3 0.796, 0.062; S=6 0.788, 0.056.)
N_DATASETS = 400


@pytest.mark.parametrize("seeds", [3, 6])
def test_the_mde_is_what_the_two_level_rule_detects_80_percent_of_the_time(seeds):
    effect = stats.mde(STUDY, seeds, STORIES)
    assert stats.mde(STUDY, seeds, STORIES) > stats.story_floor(STUDY, STORIES)
    power = detection_rate(simulate(STUDY, seeds, STORIES, N_DATASETS, mean=effect, seed=10 + seeds))
    false_positives = detection_rate(simulate(STUDY, seeds, STORIES, N_DATASETS, mean=0.0, seed=20 + seeds))
    assert 0.68 <= power <= 0.92, (seeds, effect, power)
    assert false_positives <= 0.12, (seeds, false_positives)


def test_mde_scales_as_the_standard_error():
    assert stats.mde(STUDY, 3, STORIES) / stats.standard_error(STUDY, 3, STORIES) == pytest.approx(1.959964 + 0.841621)
    assert stats.mde(STUDY, 3, STORIES, power=0.5) == pytest.approx(1.959964 * stats.standard_error(STUDY, 3, STORIES))
    assert stats.mde(STUDY, 6, STORIES) < stats.mde(STUDY, 3, STORIES)
    assert stats.mde(STUDY, 3, 4 * STORIES) < stats.mde(STUDY, 3, STORIES)


def test_seeds_needed_is_monotone_and_agrees_with_the_mde():
    floor = stats.story_floor(STUDY, STORIES)
    targets = np.linspace(floor * 1.01, stats.mde(STUDY, 2, STORIES) * 1.2, 25)
    needed = [stats.seeds_needed(STUDY, STORIES, t) for t in targets]
    assert all(n is not None for n in needed)
    assert needed == sorted(needed, reverse=True)  # a larger target needs no more seeds
    for target, n in zip(targets, needed):
        assert stats.mde(STUDY, n, STORIES) <= target
        assert n == 2 or stats.mde(STUDY, n - 1, STORIES) > target
    assert stats.seeds_needed(STUDY, STORIES, floor * 0.99) is None  # below the story floor no seed count helps
    assert stats.seeds_needed(STUDY, STORIES, floor) is None
    assert stats.seeds_needed(STUDY, STORIES, floor * 1.01, most=5) is None


def test_prob_positive():
    clear = simulate(STUDY, 3, STORIES, 1, mean=0.2, seed=30)[0]
    assert stats.prob_positive(clear) > 0.99
    assert stats.prob_positive(-clear) < 0.01
    noise = simulate(STUDY, 3, STORIES, 1, seed=31)[0]
    symmetric = np.hstack([noise, -noise])  # every story's mirror: the resampled means are symmetric about 0
    assert stats.prob_positive(symmetric) == pytest.approx(0.5, abs=0.05)
    # the same draws as the interval: an interval above 0 means at least 97.5% of the means are
    _, lo, _ = stats.two_level_bootstrap(clear, seed=4)
    assert lo > 0 and stats.prob_positive(clear, seed=4) >= 0.975
