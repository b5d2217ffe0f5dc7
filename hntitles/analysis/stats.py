"""Statistics of the comparison: summaries of a list of rewards and bootstrap intervals (scipy).

- `describe(values)`: mean, std, p5, median, p95 and n (what a metrics row reports);
- `paired_bootstrap(after, before)`: mean(after - before) over the same stories and its 95%
  percentile interval (`scipy.stats.bootstrap` over the per-story differences);
- `bootstrap_ci(values)`: the same interval for one list's mean (None below 2 values);
- `two_level_bootstrap(matrix)`: the mean of a (seeds x stories) matrix and a 95% interval that
  covers both the training seed's variance and the stories' (resample seeds, then stories);
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

    data = np.asarray(matrix, dtype=float)
    if data.ndim != 2 or data.shape[1] < 2:
        raise ValueError(f"a two-level interval needs a (seeds x stories) matrix with >= 2 stories, got {data.shape}")
    rng = np.random.default_rng(seed)
    seeds, stories = data.shape
    picked_stories = rng.integers(0, stories, size=(n_boot, 1, stories))  # one draw, shared by every seed
    picked_seeds = rng.integers(0, seeds, size=(n_boot, seeds, 1))
    boots = data[picked_seeds, picked_stories].mean(axis=(1, 2))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(data.mean()), float(lo), float(hi)
