"""Statistics of the comparison: summaries of a list of rewards and bootstrap intervals (scipy).

- `describe(values)`: mean, std, p5, median, p95 and n (what a metrics row reports);
- `paired_bootstrap(after, before)`: mean(after - before) over the same stories and its 95%
  percentile interval (`scipy.stats.bootstrap` over the per-story differences);
- `bootstrap_ci(values)`: the same interval for one list's mean (None below 2 values);
- `two_level_bootstrap(matrix)`: the mean of a (seeds x stories) matrix and a 95% interval that
  covers both the training seed's variance and the stories' (resample seeds, then stories);
  `prob_positive(matrix)`: the share of those resampled means above 0 (P(ART > TRL));
- power of the rule "the two-level interval excludes 0": `variance_components(matrix)` (seed, story,
  residual variances), `standard_error`, `mde` (the minimum detectable difference for S seeds and J
  stories), `story_floor` (the mde with infinitely many seeds) and `seeds_needed`;
- `is_finite_number`: what a score, a reward or a metric must be.

    python -c "from hntitles.analysis import stats; print(stats.paired_bootstrap([0.3, 0.5, 0.4], [0.1, 0.2, 0.3]))"
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

N_BOOT = 5000  # resamples per interval


def is_finite_number(value: Any) -> bool:
    """A real, finite number: what a score, a reward or a metric must be (True/False are not scores).

    >>> [is_finite_number(v) for v in (1, 0.5, True, float("nan"), "1", None)]
    [True, True, False, False, False, False]
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def describe(values: Iterable[float]) -> dict[str, float]:
    """mean/std/p5/median/p95/n of a list (empty -> n=0 and NaNs).

    >>> describe([1.0, 2.0, 3.0])["median"], describe([])["n"]
    (2.0, 0)
    """
    import numpy as np

    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "p5": float("nan"),
                "median": float("nan"), "p95": float("nan"), "n": 0}
    p5, med, p95 = np.percentile(arr, [5, 50, 95])
    return {"mean": float(arr.mean()), "std": float(arr.std()), "p5": float(p5),
            "median": float(med), "p95": float(p95), "n": int(arr.size)}


def mean_interval(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its 95% percentile bootstrap interval.

    Resampling is scipy's (`scipy.stats.bootstrap`, method "percentile"), seeded by `seed`, so
    the same inputs give the same interval. Needs at least 2 values.
    """
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    if data.ndim != 1 or data.size < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 values, got {data.size}")
    res = bootstrap((data,), np.mean, n_resamples=n_boot, confidence_level=0.95, method="percentile",
                    vectorized=True, rng=np.random.default_rng(seed))
    return float(data.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_bootstrap(after: Sequence[float], before: Sequence[float], n_boot: int = N_BOOT,
                     seed: int = 0) -> tuple[float, float, float]:
    """Paired bootstrap over stories: mean(after - before) and its 95% interval.

    >>> d, lo, hi = paired_bootstrap([0.3, 0.5, 0.4, 0.6], [0.1, 0.2, 0.3, 0.2])
    >>> round(d, 3), lo <= d <= hi
    (0.25, True)
    """
    if len(after) != len(before) or not len(after):
        raise ValueError(f"paired bootstrap needs two equal, non-empty lists (got {len(after)} and {len(before)})")
    return mean_interval([a - b for a, b in zip(after, before, strict=True)], n_boot=n_boot, seed=seed)


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of the mean; None below 2 values.

    >>> bootstrap_ci([0.5]) is None
    True
    """
    if len(values) < 2:
        return None
    _, lo, hi = mean_interval(values, n_boot=n_boot, seed=seed)
    return lo, hi


def two_level_bootstrap(matrix: Sequence[Sequence[float]], n_boot: int = N_BOOT,
                        seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of `matrix[s][j]` (training seed s, story j) with a two-level 95% interval.

    Each resample draws the stories with replacement, then the seeds with replacement, and takes
    the mean of the drawn seeds' rows at the drawn stories: the interval covers what another set
    of training runs would give on another set of stories. Every seed is evaluated on the same
    stories (a crossed design), so one story draw serves all seeds; drawing stories anew within
    each seed would average the story variance away (three seeds that agree would then give an
    interval ~1/sqrt(3) of the story bootstrap's). With one seed, or seeds that agree, it is the
    story bootstrap's interval (the same numbers for the same `seed`, to rounding); seed-to-seed variance widens it.

    Written out (a few lines of numpy) because neither library at hand does it: scipy.stats.bootstrap
    resamples one level, and rliable 1.2 (Agarwal et al. 2021, whose stratified bootstrap would) needs
    arch < 8, which does not import beside pandas 3.

    >>> m, lo, hi = two_level_bootstrap([[0.1, 0.3, 0.2], [0.4, 0.6, 0.5]])
    >>> round(m, 2), lo < m < hi
    (0.35, True)
    >>> same = [round(x, 12) for x in two_level_bootstrap([[0.1, 0.3, 0.2]] * 3)]
    >>> same == [round(x, 12) for x in two_level_bootstrap([[0.1, 0.3, 0.2]])]
    True
    """
    import numpy as np

    data, boots = _two_level_means(matrix, n_boot, seed)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(data.mean()), float(lo), float(hi)


def _two_level_means(matrix: Sequence[Sequence[float]], n_boot: int, seed: int):
    """(data, means): `matrix` as a float array and the `n_boot` two-level resampled means (stories
    drawn once per resample and shared by every seed, then seeds), what the interval and
    `prob_positive` read."""
    import numpy as np

    data = np.asarray(matrix, dtype=float)
    if data.ndim != 2 or data.shape[1] < 2:
        raise ValueError(f"a two-level interval needs a (seeds x stories) matrix with >= 2 stories, got {data.shape}")
    rng = np.random.default_rng(seed)
    seeds, stories = data.shape
    picked_stories = rng.integers(0, stories, size=(n_boot, 1, stories))  # one draw, shared by every seed
    picked_seeds = rng.integers(0, seeds, size=(n_boot, seeds, 1))
    return data, data[picked_seeds, picked_stories].mean(axis=(1, 2))


def prob_positive(matrix: Sequence[Sequence[float]], n_boot: int = N_BOOT, seed: int = 0) -> float:
    """The share of two-level resampled means (as in `two_level_bootstrap`, same draws) above 0:
    P(ART > TRL) when `matrix` is ART - TRL per (seed, story).

    >>> prob_positive([[0.1, 0.3, 0.2], [0.4, 0.6, 0.5]]), prob_positive([[-0.1, -0.3], [-0.2, -0.4]])
    (1.0, 0.0)
    """
    _, boots = _two_level_means(matrix, n_boot, seed)
    return float((boots > 0).mean())


# Power of the study's rule: "ART and TRL differ when the two-level 95% interval excludes 0", for the
# model d[s][j] = mu + a_s + b_j + e_sj (a_s ~ N(0, seed), b_j ~ N(0, story), e_sj ~ N(0, resid)).

def variance_components(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    """{"seed", "story", "resid", "S", "J"}: the variance components of a (seeds x stories) matrix.

    Method of moments from the two-way ANOVA without replication: resid = MS_resid,
    seed = max(0, (MS_seed - MS_resid) / J), story = max(0, (MS_story - MS_resid) / S). The mean
    squares are written out in numpy (statsmodels' anova_lm would give the same; it is not a
    dependency). With one seed the seed variance cannot be estimated (nan) and the seed x story
    residual cannot be told from the story variance: `story` is their sum (the sample variance
    across stories) and `resid` 0, which `standard_error` reads the same way for one seed.

    >>> variance_components([[0, 2], [2, 4]])
    {'seed': 2.0, 'story': 2.0, 'resid': 0.0, 'S': 2, 'J': 2}
    >>> variance_components([[0, 2, 4]])
    {'seed': nan, 'story': 4.0, 'resid': 0.0, 'S': 1, 'J': 3}
    """
    import numpy as np

    data = np.asarray(matrix, dtype=float)
    if data.ndim != 2 or data.shape[0] < 1 or data.shape[1] < 2:
        raise ValueError(f"variance components need a (seeds x stories) matrix with >= 2 stories, got {data.shape}")
    seeds, stories = data.shape
    if seeds == 1:
        return {"seed": float("nan"), "story": float(data[0].var(ddof=1)), "resid": 0.0, "S": 1, "J": stories}
    grand, rows, cols = data.mean(), data.mean(axis=1, keepdims=True), data.mean(axis=0, keepdims=True)
    ms_seed = stories * float(((rows - grand) ** 2).sum()) / (seeds - 1)
    ms_story = seeds * float(((cols - grand) ** 2).sum()) / (stories - 1)
    ms_resid = float(((data - rows - cols + grand) ** 2).sum()) / ((seeds - 1) * (stories - 1))
    return {"seed": max(0.0, (ms_seed - ms_resid) / stories), "story": max(0.0, (ms_story - ms_resid) / seeds),
            "resid": ms_resid, "S": seeds, "J": stories}


def standard_error(components: dict[str, float], seeds: int, stories: int) -> float:
    """The standard error of the mean difference over `seeds` x `stories` crossed runs:
    sqrt(seed / S + story / J + resid / (S J)). A nan seed variance (components of one seed) counts as
    0: the estimate then leaves out seed-to-seed variance, so it is too small for any S.

    >>> round(standard_error({"seed": 0.02 ** 2, "story": 0.08 ** 2, "resid": 0.06 ** 2}, 3, 24), 4)
    0.0212
    """
    if seeds < 1 or stories < 1:
        raise ValueError(f"a standard error needs >= 1 seed and >= 1 story, got {seeds} and {stories}")
    seed = components["seed"]
    seed = 0.0 if math.isnan(seed) else seed
    return math.sqrt(seed / seeds + components["story"] / stories + components["resid"] / (seeds * stories))


def _z_sum(power: float, alpha: float) -> float:
    """z_{1-alpha/2} + z_{power}: how many standard errors a detectable difference is (scipy's quantiles)."""
    from scipy.stats import norm

    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"power and alpha must lie in (0, 1), got {power} and {alpha}")
    return float(norm.ppf(1 - alpha / 2) + norm.ppf(power))


def mde(components: dict[str, float], seeds: int, stories: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The minimum detectable effect: the smallest |mean difference| a two-sided test at `alpha`
    detects with probability `power`, (z_{1-alpha/2} + z_power) * `standard_error`.

    A normal-theory (z) formula. It describes the study's rule (the `two_level_bootstrap` interval
    excludes 0) when the story variance dominates, as in the study: there, with S = 3 and 6 seeds and
    24 stories, the bootstrap's spread is ~the true standard error (its (S-1)/S shrink of the seed
    term is offset by the crossed resampling counting the residual more than once), and simulated
    power at the mde is ~0.8 with a ~0.06 false-positive rate (tests/test_power.py). When the seed
    variance dominates and S is small, the percentile interval is too narrow (one seed variance from
    S - 1 df, read with z): the rule then rejects more often than `alpha` (simulated with seed 0.08^2,
    story 0.02^2, resid 0.06^2, 24 stories: 0.24 at S = 3, 0.13 at S = 6), so its power at the mde
    exceeds `power` (0.86, 0.84), but through false positives.

    >>> c = {"seed": 0.02 ** 2, "story": 0.08 ** 2, "resid": 0.06 ** 2}
    >>> round(mde(c, 3, 24), 4), round(mde(c, 6, 24), 4)
    (0.0594, 0.053)
    """
    return _z_sum(power, alpha) * standard_error(components, seeds, stories)


def story_floor(components: dict[str, float], stories: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The mde with infinitely many seeds, (z_{1-alpha/2} + z_power) * sqrt(story / J): the story
    variance does not shrink with seeds, so no number of seeds detects a smaller difference.

    >>> round(story_floor({"seed": 0.02 ** 2, "story": 0.08 ** 2, "resid": 0.06 ** 2}, 24), 4)
    0.0457
    """
    if stories < 1:
        raise ValueError(f"a story floor needs >= 1 story, got {stories}")
    return _z_sum(power, alpha) * math.sqrt(components["story"] / stories)


def seeds_needed(components: dict[str, float], stories: int, target: float, power: float = 0.8,
                 alpha: float = 0.05, most: int = 1000) -> int | None:
    """The smallest number of seeds S >= 2 whose `mde` is <= `target`; None when even `most` seeds
    cannot get there (always when `target` <= `story_floor`: then only more stories help).

    >>> c = {"seed": 0.02 ** 2, "story": 0.08 ** 2, "resid": 0.06 ** 2}
    >>> seeds_needed(c, 24, 0.06), seeds_needed(c, 24, 0.05), seeds_needed(c, 24, 0.04)
    (3, 11, None)
    """
    if target <= story_floor(components, stories, power, alpha):
        return None
    return next((s for s in range(2, most + 1) if mde(components, s, stories, power, alpha) <= target), None)
